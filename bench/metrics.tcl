# metrics.tcl --
#
#	The cost of `-metrics`, run by `make bench`. In one run, against a
#	baseline measured in the same run:
#	  M1. a 4-worker pool with -metrics, scraped every 100 ms (ten times
#	      Prometheus's usual rate) while ab loads it, against the same pool
#	      without -metrics: requests/s (goal: at least 0.98x), p99,
#	      context switches per request;
#	  M2. the cost of one scrape: its latency under that load (connect to
#	      the last byte), and the supervisor's CPU per scrape, from 1000
#	      scrapes one after another on the idle pool.
#	Configurations are interleaved and repeated; figures are medians.
#
#	Usage: tclsh bench/metrics.tcl ?-quick? ?-reps N? ?-requests N? ?-workers N? ?-interval MS?

package require Tclx

set here [file dirname [file normalize [info script]]]
set top [file dirname $here]

source [file join $here lib.tcl]
parseOptions {-workers 4 -interval 100} {}

proc fmt {value {digits 0}} {format %.${digits}f $value}

# Scrapes 127.0.0.1:$port every $interval ms from this event loop (runLoad
# reads ab in it) until ::scrapeTimer is cancelled; each scrape's
# microseconds are appended to ::scrapeTimes.
proc scrapeEvery {port interval} {
    set ::scrapeTimer [after $interval [list scrapeEvery $port $interval]]
    set started [clock microseconds]
    set chan [socket 127.0.0.1 $port]
    fconfigure $chan -translation binary -blocking 0
    puts -nonewline $chan "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    flush $chan
    fileevent $chan readable [list apply {{chan started} {
        set data [read $chan]
        if {[eof $chan]} {
            close $chan
            lappend ::scrapeTimes [expr {[clock microseconds] - $started}]
        }
    }} $chan $started]
}

# One scrape, waited for; returns the body's length.
proc scrapeOnce {port} {
    set chan [socket 127.0.0.1 $port]
    fconfigure $chan -translation binary
    puts -nonewline $chan "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    flush $chan
    try {string length [read $chan]} finally {close $chan}
}

proc percentile {values fraction} {
    set sorted [lsort -integer $values]
    lindex $sorted [expr {max(0, int(ceil($fraction * [llength $sorted])) - 1)}]
}

puts "socketserver metrics benchmark: [exec nproc] cores, [exec uname -sr], [info patchlevel]"
puts "load: $opt(-abs) ab processes side by side, $opt(-requests) requests per measurement,\
      concurrency $opt(-concurrency), $opt(-workers) workers; scraped every $opt(-interval) ms;\
      $opt(-reps) repetitions, interleaved"
puts ""

set ::scrapeTimes {}
for {set rep 1} {$rep <= $opt(-reps)} {incr rep} {
    foreach kind [shuffle {pool poolmetrics}] {
        set metricsPort [freePort]
        set ::env(METRICS_PORT) $metricsPort
        set server [startServer $kind $opt(-workers) 0]
        try {
            set pids [dict get $server pids]
            set supervisor [pid [dict get $server pipe]]
            set before [contextSwitches $pids]
            set scrapes [llength $::scrapeTimes]
            if {$kind eq "poolmetrics"} {
                scrapeEvery $metricsPort $opt(-interval)
            }
            set m [runLoad [dict get $server port] $opt(-requests) $opt(-concurrency)]
            set switches [expr {double([contextSwitches $pids] - $before) / max(1, [dict get $m complete])}]
            if {$kind eq "poolmetrics"} {
                after cancel $::scrapeTimer
                # The supervisor's CPU per scrape, on the idle pool.
                set idleCpu [cpuNs $supervisor]
                for {set i 0} {$i < 1000} {incr i} {scrapeOnce $metricsPort}
                lappend r(cpuPerScrape) [expr {([cpuNs $supervisor] - $idleCpu) / 1000.0 / 1000}]
            }
            lappend r($kind,scrapes) [expr {[llength $::scrapeTimes] - $scrapes}]
            lappend r($kind,rps) [dict get $m rps]
            lappend r($kind,failed) [dict get $m failed]
            lappend r($kind,p99) [dict get $m p99]
            lappend r($kind,cs) $switches
        } finally {
            stopServer $server
        }
        puts -nonewline stderr "."
        flush stderr
    }
}
puts stderr ""

set off [median $r(pool,rps)]
set on [median $r(poolmetrics,rps)]
puts "M1. -metrics scraped every $opt(-interval) ms against no -metrics (medians)"
puts [format "%-22s %10s %8s %8s %10s" server r/s failed p99-ms cs/req]
foreach {kind label} {pool "pool" poolmetrics "pool -metrics, scraped"} {
    puts [format "%-22s %10s %8s %8s %10s" $label [fmt [median $r($kind,rps)]] \
        [fmt [tcl::mathop::+ {*}$r($kind,failed)]] [fmt [median $r($kind,p99)]] [fmt [median $r($kind,cs)] 2]]
}
# Each repetition's pair ran side by side in time: their ratio is less
# exposed to the machine's drift than the ratio of medians.
set pairs [lmap a $r(poolmetrics,rps) b $r(pool,rps) {expr {$a / $b}}]
puts "ratio on/off: [fmt [expr {$on / $off}] 3]x of medians, [fmt [median $pairs] 3]x median of the\
      repetitions' ratios (goal: at least 0.98x)"
puts ""

set scrapes [median $r(poolmetrics,scrapes)]
puts "M2. One scrape ([llength $::scrapeTimes] under load, about [fmt $scrapes] per run)"
puts "latency under load: median [fmt [expr {[percentile $::scrapeTimes 0.5] / 1000.0}] 2] ms,\
      p99 [fmt [expr {[percentile $::scrapeTimes 0.99] / 1000.0}] 2] ms"
puts "supervisor CPU per scrape (1000 in a row, idle pool): median [fmt [median $r(cpuPerScrape)]] us"
