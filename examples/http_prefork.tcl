#!/usr/bin/env tclsh
# http_prefork.tcl --
#
#	A small pre-forked HTTP responder: N workers answer every request with
#	a short page naming the worker that served it. One request per
#	connection (HTTP/1.0 style, "Connection: close"), one connection at a
#	time per worker: the classic pre-fork model, with the kernel's queue
#	in front.
#
#	Usage: tclsh http_prefork.tcl ?port? ?workers?
#	    defaults: 8080 4; 0 picks a free port.
#
#	Try it: curl http://127.0.0.1:8080/   or   ab -n 1000 -c 8 http://127.0.0.1:8080/

package require socketserver
package require Tclx

lassign [concat $argv [lrange {8080 4} $argc end]] port workerCount

proc handle_accept {chan addr port} {
    fconfigure $chan -translation crlf -buffering full -blocking 1
    # Request line, then headers up to the blank line.
    set request [gets $chan]
    while {[gets $chan header] > 0} {}
    set body "ok from worker [pid]\n"
    if {![regexp {^(GET|HEAD) (\S+)} $request -> method path]} {
        set status "400 Bad Request"
        set body "bad request\n"
    } else {
        set status "200 OK"
    }
    puts $chan "HTTP/1.1 $status"
    puts $chan "Content-Type: text/plain"
    puts $chan "Content-Length: [string length $body]"
    puts $chan "Connection: close"
    puts $chan ""
    fconfigure $chan -translation binary
    if {![info exists method] || $method ne "HEAD"} {
        puts -nonewline $chan $body
    }
    close $chan
    ::socketserver::socket client handle_accept
}

proc worker_bgerror {message options} {
    if {[lrange [dict get $options -errorcode] 0 1] eq {SOCKETSERVER CLOSED}} {
        exit 0
    }
    # A client that disconnects mid-request is not worth more than a note.
    puts stderr "worker [pid]: $message"
    ::socketserver::socket client handle_accept
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
signal trap {SIGINT SIGTERM} shutdown

puts "http on port $port with [llength $workers] workers: $workers"
flush stdout
vwait forever
