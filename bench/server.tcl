# server.tcl --
#
#	The Tcl servers that bench/run.tcl measures: the same HTTP "ok"
#	handler, one request per connection, either on socketserver with N
#	forked workers or on Tcl's own socket -server in one process.
#
#	Usage: tclsh server.tcl socketserver|tcl WORKERS SLOW_PERCENT
#	Prints "port P pids PID..." when ready; stops on SIGTERM.

package require Tclx

lassign $argv mode workerCount slowPercent

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
}

proc shutdown {} {
    foreach pid $::pids {
        catch {kill KILL $pid}
        catch {wait $pid}
    }
    exit 0
}
signal trap {SIGTERM SIGINT} shutdown
# Never outlive a benchmark that died: stop by ourselves after 10 minutes.
after 600000 shutdown

puts "port $port pids [pid] $pids"
flush stdout
vwait forever
