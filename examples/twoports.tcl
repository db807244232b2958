#!/usr/bin/env tclsh
# twoports.tcl --
#
#	One accepting process, two ports, a pool of workers for each: port A
#	answers "upper" (each line in capitals), port B answers "reverse".
#	A worker takes connections of its own port only (client -port).
#
#	Usage: tclsh twoports.tcl ?portA? ?portB? ?workersPerPort?
#	    defaults: 9911 9912 2; 0 picks a free port.
#
#	Try it: echo hello | nc -q1 127.0.0.1 9911; echo hello | nc -q1 127.0.0.1 9912

package require socketserver
package require Tclx

# Arguments not given take their defaults.
lassign [concat $argv [lrange {9911 9912 2} $argc end]] portA portB perPort

# serve port transform chan addr peerPort --
#	Answers every line with [transform line] until the client leaves,
#	then registers again for the same port.
proc serve {port transform chan addr peerPort} {
    fconfigure $chan -encoding utf-8 -buffering line -blocking 0
    fileevent $chan readable [list answer $port $transform $chan]
}

proc answer {port transform chan} {
    if {[gets $chan line] >= 0} {
        puts $chan "[pid] [{*}$transform $line]"
    } elseif {[eof $chan]} {
        close $chan
        ::socketserver::socket client -port $port [list serve $port $transform]
    }
}

proc worker_bgerror {message options} {
    if {[lrange [dict get $options -errorcode] 0 1] eq {SOCKETSERVER CLOSED}} {
        exit 0
    }
    puts stderr "worker [pid]: $message"
}

proc make_worker {port transform} {
    set pid [fork]
    if {$pid == 0} {
        interp bgerror {} worker_bgerror
        ::socketserver::socket client -port $port [list serve $port $transform]
        vwait forever
    }
    return $pid
}

proc shutdown {} {
    foreach pid [concat $::workersA $::workersB] {
        catch {kill TERM $pid}
        catch {wait $pid}
    }
    exit 0
}

set portA [::socketserver::socket server $portA]
set portB [::socketserver::socket server $portB]
set workersA {}
set workersB {}
for {set i 0} {$i < $perPort} {incr i} {
    lappend workersA [make_worker $portA {string toupper}]
    lappend workersB [make_worker $portB {string reverse}]
}
signal trap {SIGINT SIGTERM} shutdown

puts "upper on port $portA, workers: $workersA"
puts "reverse on port $portB, workers: $workersB"
flush stdout
vwait forever
