#!/usr/bin/env tclsh
# http_prefork.tcl --
#
#	A small pre-forked HTTP responder: a pool of workers answers every
#	request with a short page naming the worker that served it. One
#	request per connection (HTTP/1.0 style, "Connection: close"), one
#	connection at a time per worker: Apache's prefork model. Each worker
#	is recycled after 1000 connections (give or take 100, so that they do
#	not all leave together), and one stuck on a request for 30 seconds is
#	replaced.
#
#	Usage: tclsh http_prefork.tcl ?port? ?workers?
#	    defaults: 8080 4; 0 picks a free port.
#
#	Try it: curl http://127.0.0.1:8080/   or   ab -n 1000 -c 8 http://127.0.0.1:8080/

package require socketserver

lassign [concat $argv [lrange {8080 4} $argc end]] port workers

proc handle_request {chan addr port} {
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
}

set port [::socketserver::pool create -workers $workers \
    -maxconnections 1000 -jitter 100 -timeout 30 $port handle_request]

puts "http on port $port with $workers workers: [dict keys [dict get [::socketserver::pool info $port] workers]]"
flush stdout
::socketserver::pool wait
