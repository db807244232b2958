#!/usr/bin/env tclsh
# tcllib_httpd.tcl --
#
#	A web application written for tcllib's httpd (package httpd), served
#	by a pool of forked workers instead of httpd's single process. The
#	application is what it would be without the pool: a server object, a
#	dispatch table, reply classes. Three pages:
#	    /          a static file (htdocs/index.html beside this script)
#	    /worker    a dynamic page: the worker's pid and the client's address
#	    /form      a form POST, read in full: its size and CRC-32
#	Anything else is httpd's own 404.
#
#	What changes for the pool: the pool owns the listening socket, so the
#	server object must not open one (its `start` is replaced by one that
#	does not listen); each worker makes its own server object in -init
#	(httpd's timers belong to the process that runs them); the pool's
#	handler hands each connection to the object, as httpd's own listening
#	socket would (`connect chan addr port`). httpd closes the channel when
#	its reply is written, and the worker then takes the next connection.
#	The packages are loaded once, in the supervisor: the workers share
#	them copy-on-write.
#
#	Usage: tclsh tcllib_httpd.tcl ?port? ?workers?
#	    defaults: 8080 4; 0 picks a free port.
#	Signals as for every pool: TERM/INT stop gracefully, HUP reloads,
#	TTIN/TTOU add or remove a worker.
#
#	Try it: curl http://127.0.0.1:8080/worker
#	        curl --data-binary @/etc/services http://127.0.0.1:8080/form
#	        ab -n 2000 -c 8 http://127.0.0.1:8080/worker

package require socketserver
package require httpd

set docroot [file join [file dirname [file normalize [info script]]] htdocs]

# httpd's server, minus its listening socket: `start` as httpd's own, but
# with the pool's port and no `socket -server`.
clay::define ::pooled::server {
    superclass ::httpd::server
    method start {} {
        my variable port_listening
        set port_listening [my clay get server/ port]
        namespace eval [namespace current]::reply {}
        ::cron::every [self] 120 [namespace code {my CheckTimeout}]
        my Thread_start
    }
}

# /worker: which process served, and whom.
clay::define ::app::worker {
    superclass ::httpd::reply
    method content {} {
        my reply set Content-Type text/plain
        my puts "worker [pid]"
        my puts "client [my request get REMOTE_ADDR]"
    }
}

# /form: the body of a POST, read in full.
clay::define ::app::form {
    superclass ::httpd::reply
    method content {} {
        my reply set Content-Type text/plain
        if {[my request get REQUEST_METHOD] ne "POST"} {
            my puts "POST a body to this page"
            return
        }
        set body [my PostData [my request get CONTENT_LENGTH]]
        my puts "received [string length $body] bytes, crc32 [zlib crc32 $body]"
    }
}

# The application's dispatch table, on a server object.
proc configureApp {server docroot} {
    $server plugin dict_dispatch
    $server uri add * /worker [list mixin {reply ::app::worker}]
    $server uri add * /form [list mixin {reply ::app::form}]
    $server uri add * / [list mixin {reply ::httpd::content.file} path $docroot]
}

# What each worker runs in -init: its own server object.
proc makeApp {port docroot} {
    ::pooled::server create ::app::httpd port $port myaddr all
    configureApp ::app::httpd $docroot
}

# The pool's handler: one connection to the application.
proc serve {chan addr port} {
    ::app::httpd connect $chan $addr $port
}

# Sourced by another script (bench/httpd_server.tcl): the classes and
# procs above, no server.
if {[info script] ne $::argv0} return

lassign [concat $argv [lrange {8080 4} $argc end]] port workers

if {[catch {::socketserver::socket server $port} result options]} {
    if {[lrange [dict get $options -errorcode] 0 1] eq {POSIX EADDRINUSE}} {
        puts stderr "port $port is taken: name another, or 0 for a free one\
            (tclsh [info script] PORT ?WORKERS?)"
        exit 1
    }
    return -options $options $result
}
set port $result
# httpd itself gives up on a request only after 120 s: a client that
# connects and sends nothing would hold a worker that long. -timeout cuts a
# connection that holds its worker for 15 s (the worker is replaced).
::socketserver::pool create -workers $workers -timeout 15 -init [list makeApp $port $docroot] $port serve

set pids [dict keys [dict get [::socketserver::pool info $port] workers]]
puts "tcllib httpd on port $port with $workers workers: $pids"
puts "try: curl http://127.0.0.1:$port/worker"
puts "stop with Ctrl-C"
flush stdout
::socketserver::pool wait
