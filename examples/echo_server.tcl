#!/usr/bin/env tclsh
# echo_server.tcl --
#
#	A pre-forked echo server: a pool of worker processes, each serving one
#	client at a time and answering every line with its pid, until "quit"
#	or the client goes away. The pool forks the workers, replaces any that
#	die, and stops gracefully on SIGTERM or Ctrl-C (SIGINT); SIGHUP
#	reloads, SIGTTIN/SIGTTOU add or remove a worker.
#
#	Usage: tclsh echo_server.tcl ?port? ?workers?
#	    port     the TCP port (default 9901; 0 picks a free one)
#	    workers  how many worker processes (default 4)
#
#	Try it: tclsh examples/client.tcl 127.0.0.1 9901, type lines, then "quit".
#	The same server written with the low-level API: echo_fork_loop.tcl.

package require socketserver

lassign [concat $argv [lrange {9901 4} $argc end]] port workers

proc echo {chan addr port} {
    fconfigure $chan -encoding utf-8 -buffering line
    while {[gets $chan line] >= 0 && [string trim $line] ne "quit"} {
        puts $chan "[pid] $line"
    }
    close $chan
}

if {[catch {::socketserver::pool create -workers $workers $port echo} result options]} {
    if {[lrange [dict get $options -errorcode] 0 1] eq {POSIX EADDRINUSE}} {
        puts stderr "port $port is taken: name another, or 0 for a free one\
            (tclsh [info script] PORT ?WORKERS?, or make demo DEMOFLAGS=\"PORT ?WORKERS?\")"
        exit 1
    }
    return -options $options $result
}
set port $result

set pids [dict keys [dict get [::socketserver::pool info $port] workers]]
puts "echo server on port $port with $workers workers: $pids"
puts "connect with: tclsh [file join [file dirname [info script]] client.tcl] 127.0.0.1 $port\
      (each line comes back with the pid of the worker that serves you; \"quit\" ends)"
puts "stop with Ctrl-C"
flush stdout
::socketserver::pool wait
