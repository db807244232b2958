# server.tcl --
#
#	The Tcl servers that the benchmarks measure: the same HTTP "ok"
#	handler, one request per connection, on socketserver with N workers
#	forked by hand (TclX) or by ::socketserver::pool, with an event-driven
#	handler and -concurrency K on the pool, or on Tcl's own socket -server
#	in one process.
#
#	Usage: tclsh server.tcl socketserver|pool|poolevent|poolproxy|pooluser|poolproxyfrom|poolmaxrss|tcl WORKERS SLOW_PERCENT ?K? ?MAXCONNECTIONS?
#	(poolproxy: a pool whose connections begin with a PROXY protocol header;
#	pooluser: a pool whose workers run as nobody; poolproxyfrom: poolproxy
#	that believes headers only from 10.0.0.0/8 and 127.0.0.0/8;
#	poolmetrics: a pool with -metrics on the port in $env(METRICS_PORT);
#	poolmaxrss: a pool with -maxrss 1G, whose workers measure their memory
#	after each connection)
#	Prints "port P pids PID..." when ready; stops on SIGTERM.

lassign $argv mode workerCount slowPercent concurrency maxConnections
# Forking by hand takes TclX's fork and signal trap; the other servers
# need nothing more than the Tcl at hand (8.6 or 9).
if {$mode eq "socketserver"} {
    package require Tclx
}

# Answers one request; SLOW_PERCENT of them take 100 ms, for the
# mixed-latency run.
proc answer {chan} {
    fconfigure $chan -translation crlf -buffering full -blocking 1
    gets $chan
    while {[gets $chan header] > 0} {}
    if {$::slowPercent > 0 && rand() * 100 < $::slowPercent} {
        after 100
    }
    puts $chan "HTTP/1.1 200 OK\nContent-Type: text/plain\nContent-Length: 3\nConnection: close\n"
    fconfigure $chan -translation binary
    puts -nonewline $chan "ok\n"
    close $chan
}

proc socketserverAccept {chan addr port} {
    catch {answer $chan}
    ::socketserver::socket client socketserverAccept
}

proc tclAccept {chan addr port} {
    catch {answer $chan}
}

proc poolAccept {chan addr port} {
    answer $chan
}

# The event-driven handler: the request is read from fileevents, and a
# slow request waits on a timer, so one worker serves several at once.
proc eventAccept {chan addr port} {
    fconfigure $chan -translation crlf -buffering full -blocking 0
    fileevent $chan readable [list eventRead $chan]
}

proc eventRead {chan} {
    while {[gets $chan line] > 0} {}
    if {[eof $chan]} {
        close $chan
        return
    }
    if {[fblocked $chan]} return
    fileevent $chan readable {}
    if {$::slowPercent > 0 && rand() * 100 < $::slowPercent} {
        after 100 [list eventReply $chan]
    } else {
        eventReply $chan
    }
}

proc eventReply {chan} {
    puts $chan "HTTP/1.1 200 OK\nContent-Type: text/plain\nContent-Length: 3\nConnection: close\n"
    fconfigure $chan -translation binary
    puts -nonewline $chan "ok\n"
    catch {close $chan}
}

set pids {}
switch -- $mode {
    socketserver {
        package require socketserver
        set port [::socketserver::socket server -myaddr 127.0.0.1 0]
        for {set i 0} {$i < $workerCount} {incr i} {
            set pid [fork]
            if {$pid == 0} {
                expr {srand([pid])}
                ::socketserver::socket client socketserverAccept
                vwait forever
            }
            lappend pids $pid
        }
    }
    tcl {
        set listener [socket -server tclAccept -myaddr 127.0.0.1 0]
        set port [lindex [fconfigure $listener -sockname] 2]
    }
    pool - poolevent - poolproxy - pooluser - poolproxyfrom - poolmetrics - poolmaxrss {
        package require socketserver
        set handler [expr {$mode eq "poolevent" ? "eventAccept" : "poolAccept"}]
        set proxy [dict get {
            pool {} poolevent {} poolproxy {-proxy any}
            pooluser {-user nobody} poolproxyfrom {-proxy any -proxyfrom {10.0.0.0/8 127.0.0.0/8}}
            poolmetrics {-metrics $::env(METRICS_PORT)}
            poolmaxrss {-maxrss 1G}
        } $mode]
        set proxy [subst $proxy]
        set port [::socketserver::pool create -myaddr 127.0.0.1 -workers $workerCount {*}$proxy \
            -concurrency [expr {$concurrency eq "" ? 1 : $concurrency}] -log {} \
            -maxconnections [expr {$maxConnections eq "" ? 0 : $maxConnections}] -jitter 100 \
            -init {expr {srand([pid])}} 0 $handler]
        puts "port $port pids [pid] [dict keys [dict get [::socketserver::pool info $port] workers]]"
        flush stdout
        # Never outlive a benchmark that died: stop by ourselves after 10 minutes.
        after 600000 {::socketserver::pool stop}
        ::socketserver::pool wait
        exit 0
    }
}

proc shutdown {} {
    foreach pid $::pids {
        catch {kill KILL $pid}
        catch {wait $pid}
    }
    exit 0
}
# Tcl's own server is one process: SIGTERM's default action is enough.
if {$mode eq "socketserver"} {
    signal trap {SIGTERM SIGINT} shutdown
}
# Never outlive a benchmark that died: stop by ourselves after 10 minutes.
after 600000 shutdown

puts "port $port pids [pid] $pids"
flush stdout
vwait forever
