#!/usr/bin/env tclsh
# twoports.tcl --
#
#	One accepting process, two ports, a pool of workers for each: port A
#	answers "upper" (each line in capitals), port B answers "reverse".
#	The handlers are event-driven, and each worker holds up to 8 clients
#	at once (-concurrency 8).
#
#	Usage: tclsh twoports.tcl ?portA? ?portB? ?workersPerPort?
#	    defaults: 9911 9912 2; 0 picks a free port.
#
#	Try it: echo hello | tclsh examples/client.tcl 127.0.0.1 9911

package require socketserver

# Arguments not given take their defaults.
lassign [concat $argv [lrange {9911 9912 2} $argc end]] portA portB perPort

# serve transform chan addr port --
#	Answers every line with [transform line] until the client leaves.
proc serve {transform chan addr port} {
    fconfigure $chan -encoding utf-8 -buffering line -blocking 0
    fileevent $chan readable [list answer $transform $chan]
}

proc answer {transform chan} {
    if {[gets $chan line] >= 0} {
        puts $chan "[pid] [{*}$transform $line]"
    } elseif {[eof $chan]} {
        close $chan
    }
}

set portA [::socketserver::pool create -workers $perPort -concurrency 8 $portA {serve {string toupper}}]
set portB [::socketserver::pool create -workers $perPort -concurrency 8 $portB {serve {string reverse}}]

proc pids {port} {dict keys [dict get [::socketserver::pool info $port] workers]}
puts "upper on port $portA, workers: [pids $portA]"
puts "reverse on port $portB, workers: [pids $portB]"
flush stdout
::socketserver::pool wait
