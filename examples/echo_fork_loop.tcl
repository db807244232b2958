#!/usr/bin/env tclsh
# echo_fork_loop.tcl --
#
#	The pre-forked echo server from the talk that introduced socketserver:
#	the parent opens the port and forks workers; each worker serves one
#	client at a time, answering every line with its pid, and registers for
#	the next client when "quit" arrives or the client goes away.
#
#	Usage: tclsh echo_fork_loop.tcl ?port? ?workers?
#	    port     the TCP port (default 9901; 0 picks a free one)
#	    workers  how many worker processes to fork (default 4)
#
#	The low-level way: fork the workers by hand and register each one with
#	"client" again after every connection, as 1.1.3 scripts do with TclX.
#	echo_server.tcl does the same with ::socketserver::pool, in a third of
#	the code. TclX (fork, wait, kill, signal trap) exists for Tcl 8 only:
#	under Tcl 9 this script uses ::socketserver::fork and wait instead, and
#	has no signal trap (Ctrl-C reaches the workers too; a SIGTERM to the
#	parent alone closes the queue, and each worker leaves).
#
#	Try it: tclsh examples/client.tcl 127.0.0.1 9901, type lines, then
#	"quit". Stop with Ctrl-C.

package require socketserver
if {[package vsatisfies [package provide Tcl] 9]} {
    # Never "package require Tclx" under Tcl 9: Debian's TclX 8.4 is built
    # for Tcl 8 and would crash it.
    interp alias {} fork {} ::socketserver::fork
    interp alias {} wait {} ::socketserver::wait
} else {
    package require Tclx
}

set port [expr {$argc > 0 ? [lindex $argv 0] : 9901}]
set workerCount [expr {$argc > 1 ? [lindex $argv 1] : 4}]

proc handle_readable {chan} {
    if {[gets $chan line] < 0} {
        if {[eof $chan]} {
            finish $chan
        }
        return
    }
    if {[string trim $line] eq "quit"} {
        finish $chan
        return
    }
    puts $chan "[pid] $line"
}

proc finish {chan} {
    close $chan
    # Now that the channel is closed, this worker is ready for another client.
    ::socketserver::socket client handle_accept
}

proc handle_accept {chan addr port} {
    fconfigure $chan -encoding utf-8 -buffering line -blocking 0
    fileevent $chan readable [list handle_readable $chan]
}

# A worker whose parent is gone has nothing left to serve: leave quietly.
proc worker_bgerror {message options} {
    if {[lrange [dict get $options -errorcode] 0 1] eq {SOCKETSERVER CLOSED}} {
        exit 0
    }
    puts stderr "worker [pid]: $message"
}

proc make_worker {} {
    set pid [fork]
    if {$pid == 0} {
        interp bgerror {} worker_bgerror
        ::socketserver::socket client handle_accept
        vwait forever
    }
    return $pid
}

proc shutdown {} {
    foreach pid $::workers {
        catch {kill TERM $pid}
        catch {wait $pid}
    }
    exit 0
}

set port [::socketserver::socket server $port]
set workers {}
for {set i 0} {$i < $workerCount} {incr i} {
    lappend workers [make_worker]
}
if {[llength [info commands signal]]} {
    signal trap {SIGINT SIGTERM} shutdown
}

puts "echo server on port $port with [llength $workers] workers: $workers"
puts "connect with: tclsh [file join [file dirname [info script]] client.tcl] 127.0.0.1 $port; each line comes back with the pid of the worker that serves you, \"quit\" ends"
puts "stop with Ctrl-C"
flush stdout
vwait forever
