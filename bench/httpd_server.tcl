# httpd_server.tcl --
#
#	The tcllib httpd application of examples/tcllib_httpd.tcl, for
#	bench/httpd.tcl: either alone (httpd's own listening socket, one
#	process, as tcllib runs it) or on a pool of WORKERS forked workers.
#	The benchmark's page is /: "ok" and the pid; SLOW_PERCENT of requests
#	take 100 ms in a blocking call (as a database query would).
#
#	Usage: tclsh httpd_server.tcl alone|pool WORKERS SLOW_PERCENT
#	Prints "port P pids PID..." when ready; stops on SIGTERM.

lassign $argv mode workerCount slowPercent
source [file join [file dirname [file dirname [file normalize [info script]]]] examples tcllib_httpd.tcl]

clay::define ::bench::page {
    superclass ::httpd::reply
    method content {} {
        if {$::slowPercent > 0 && rand() * 100 < $::slowPercent} {
            after 100
        }
        my reply set Content-Type text/plain
        my puts [format "ok %10d" [pid]]
    }
}

proc benchApp {server} {
    configureApp $server $::docroot
    $server uri add * / [list mixin {reply ::bench::page}]
}

# Never outlive a benchmark that died.
after 600000 {exit 0}
if {$mode eq "alone"} {
    ::httpd::server create ::app::httpd port 0 myaddr 127.0.0.1
    benchApp ::app::httpd
    # httpd asked for port 0: its listening socket knows the real one.
    set socket [lindex [set [info object namespace ::app::httpd]::socklist] 0]
    puts "port [lindex [fconfigure $socket -sockname] 2] pids [pid]"
    flush stdout
    vwait forever
}
set port [::socketserver::socket server -myaddr 127.0.0.1 0]
::socketserver::pool create -workers $workerCount -log {} \
    -init [list apply {{port} {
        expr {srand([pid])}
        ::pooled::server create ::app::httpd port $port
        benchApp ::app::httpd
    }} $port] $port serve
puts "port $port pids [pid] [dict keys [dict get [::socketserver::pool info $port] workers]]"
flush stdout
::socketserver::pool wait
