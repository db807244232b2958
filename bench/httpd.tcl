# httpd.tcl --
#
#	A real Tcl web application, tcllib's httpd (examples/tcllib_httpd.tcl
#	through bench/httpd_server.tcl), on pools of 1, 2 and 4 forked workers
#	against the same application on tcllib's httpd alone (one process, its
#	own listening socket), in one run:
#	  H1. plain requests: requests/s and p99, as ratios of httpd alone;
#	  H2. the mixed workload (1% of requests take 100 ms in a blocking
#	      call): the share of requests of 50 ms or more. A single process
#	      makes every client wait behind the slow one; a pool only the
#	      clients of that worker.
#	Load: ab on 127.0.0.1, bounded counts. Configurations are interleaved
#	and repeated; figures are medians.
#
#	Usage: tclsh bench/httpd.tcl ?-quick? ?-reps N? ?-requests N? ?-workers {1 2 4}?

package require Tclx

set here [file dirname [file normalize [info script]]]
set top [file dirname $here]

source [file join $here lib.tcl]
parseOptions {-reps 3 -requests 4000 -concurrency 8 -workers {1 2 4}} {-reps 2 -requests 2000}

if {[catch {exec [info nameofexecutable] << {exit [catch {package require httpd}]}}]} {
    puts "tcllib's httpd is not available to [info nameofexecutable] (tcllib 1.21 needs Tcl 8.6): H1 and H2 skipped"
    return
}

proc startApp {mode workers slow} {
    set pipe [open |[list [info nameofexecutable] [file join $::here httpd_server.tcl] $mode $workers $slow] r]
    if {![regexp {^port (\d+) pids(.*)$} [gets $pipe] -> port pids]} {
        error "httpd server ($mode $workers) did not start"
    }
    exec ab -q -r -n [expr {max(200, 50 * $workers)}] -c 4 http://127.0.0.1:$port/ >/dev/null 2>@1
    return [dict create pipe $pipe port $port]
}

proc measureApp {mode workers slow} {
    set server [startApp $mode $workers $slow]
    try {
        runLoad [dict get $server port] $::opt(-requests) $::opt(-concurrency) [expr {$slow > 0}]
    } finally {
        stopServer $server
    }
}

proc fmt {value {digits 0}} {format %.${digits}f $value}

expr {srand([clock clicks])}
puts "tcllib httpd [exec [info nameofexecutable] << {puts [package require httpd]}] on the pool:\
      [exec nproc] cores, [info patchlevel]"
puts "load: $opt(-abs) ab processes side by side, $opt(-requests) requests per measurement,\
      concurrency $opt(-concurrency); $opt(-reps) repetitions, interleaved"

set configs [list {alone 1}]
foreach n $opt(-workers) {lappend configs [list pool $n]}
foreach slow {0 1} {
    for {set rep 0} {$rep < $opt(-reps)} {incr rep} {
        foreach config [shuffle $configs] {
            lassign $config mode n
            set r [measureApp $mode $n $slow]
            foreach key {rps p99 failed late} {
                if {[dict exists $r $key]} {lappend results($mode,$n,$slow,$key) [dict get $r $key]}
            }
        }
    }
}

proc fig {mode n slow key} {median $::results($mode,$n,$slow,$key)}
set base [fig alone 1 0 rps]
set baseP99 [fig alone 1 0 p99]
puts ""
puts "H1. plain requests (medians of $opt(-reps))"
puts [format "%-16s %10s %8s %10s %8s %7s" server req/s ratio "p99 ms" ratio failed]
foreach config $configs {
    lassign $config mode n
    set label [expr {$mode eq "alone" ? "httpd alone" : "pool of $n"}]
    puts [format "%-16s %10s %8s %10s %8s %7s" $label [fmt [fig $mode $n 0 rps]] \
        [fmt [expr {[fig $mode $n 0 rps] / $base}] 2] [fmt [fig $mode $n 0 p99]] \
        [fmt [expr {double([fig $mode $n 0 p99]) / max(1, $baseP99)}] 2] \
        [tcl::mathop::+ {*}$results($mode,$n,0,failed)]]
}
puts ""
puts "H2. 1% of requests take 100 ms: share of requests of 50 ms or more (the slow 1% themselves included)"
puts [format "%-16s %10s %10s %10s %7s" server req/s "p99 ms" ">=50 ms %" failed]
foreach config $configs {
    lassign $config mode n
    set label [expr {$mode eq "alone" ? "httpd alone" : "pool of $n"}]
    puts [format "%-16s %10s %10s %10s %7s" $label [fmt [fig $mode $n 1 rps]] [fmt [fig $mode $n 1 p99]] \
        [fmt [fig $mode $n 1 late] 1] [tcl::mathop::+ {*}$results($mode,$n,1,failed)]]
}
