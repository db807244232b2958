# run.tcl --
#
#	The benchmark behind `make bench`. Measures, in one run and on this
#	machine:
#	  1. throughput: an HTTP "ok" handler on socketserver with N forked
#	     workers, against the same handler on Tcl's own socket -server
#	     (one process) and against N native C processes blocking in
#	     accept() on one listener; with requests/s (median of the
#	     repetitions), failures, latency and context switches per request
#	     summed over every thread of every server process;
#	  2. mixed latency: 1% of requests take 100 ms; p99 and max latency of
#	     socketserver (only idle workers receive) against native
#	     SO_REUSEPORT workers (each its own listener) at the same count,
#	     native shared accept(), and Tcl's socket -server in one process;
#	  3. memory: a worker's RSS before and after many connections, and the
#	     accepting process's RSS over a bare tclsh.
#	Load comes from several ab processes side by side, on 127.0.0.1 only,
#	with bounded request counts. Configurations are interleaved and
#	repeated; the figures are medians.
#
#	Usage: tclsh bench/run.tcl ?-reps N? ?-requests N? ?-workers {1 2 ...}?
#	                           ?-memory N? ?-quick?

package require Tclx

set here [file dirname [file normalize [info script]]]
set top [file dirname $here]

source [file join $here lib.tcl]
parseOptions {
    -workers {1 2 4 8 16 32}
    -memory 100000
    -mixedWorkers 8
    -mixedRequests 4000
    -sequential 3000
} {-workers {1 4 16} -memory 20000 -mixedRequests 2000 -sequential 1000}

# --- 1. throughput ------------------------------------------------------

expr {srand([clock clicks])}
set configs {{tcl 1}}
foreach n $opt(-workers) {
    lappend configs [list socketserver $n] [list native $n]
}

puts "socketserver benchmark: [exec nproc] cores, [exec uname -sr], [info patchlevel]"
puts "load: $opt(-abs) ab processes side by side, $opt(-requests) requests per measurement,\
      concurrency $opt(-concurrency), one connection per request; $opt(-reps) repetitions, interleaved"
puts ""

for {set rep 1} {$rep <= $opt(-reps)} {incr rep} {
    foreach config [shuffle $configs] {
        lassign $config kind n
        set m [measure $kind $n]
        foreach key {rps failed mean p99 cs acc} {
            lappend results($kind,$n,$key) [dict get $m $key]
        }
        puts -nonewline stderr "."
        flush stderr
    }
}
puts stderr ""

proc fig {kind n key} {median $::results($kind,$n,$key)}
proc fmt {value {digits 0}} {format %.${digits}f $value}

set tclRps [fig tcl 1 rps]
set oneRps [fig socketserver [lindex $opt(-workers) 0] rps]
set oneCs [fig socketserver [lindex $opt(-workers) 0] cs]

puts "1. Throughput (medians; ratios against baselines from this run)"
proc spread {kind n} {
    set values [lsort -real $::results($kind,$n,rps)]
    format "%.0f-%.0f" [lindex $values 0] [lindex $values end]
}
puts [format "%-14s %7s %9s %13s %7s %8s %7s %9s %9s %9s %9s %9s" \
    server workers req/s range failed mean-ms p99-ms cs/req acc-us/c vs-tcl vs-native vs-1w]
puts [format "%-14s %7s %9s %13s %7s %8s %7s %9s" tcl-socket 1 [fmt $tclRps] [spread tcl 1] \
    [fmt [fig tcl 1 failed]] [fmt [fig tcl 1 mean] 2] [fmt [fig tcl 1 p99]] [fmt [fig tcl 1 cs] 2]]
foreach n $opt(-workers) {
    set rps [fig socketserver $n rps]
    set nativeRps [fig native $n rps]
    puts [format "%-14s %7s %9s %13s %7s %8s %7s %9s %9s %9s %9s %9s" socketserver $n [fmt $rps] [spread socketserver $n] \
        [fmt [fig socketserver $n failed]] [fmt [fig socketserver $n mean] 2] \
        [fmt [fig socketserver $n p99]] [fmt [fig socketserver $n cs] 2] [fmt [fig socketserver $n acc] 2] \
        [fmt [expr {$rps / $tclRps}] 2]x [fmt [expr {$rps / $nativeRps}] 2]x \
        [fmt [expr {$rps / $oneRps}] 2]x]
}
foreach n $opt(-workers) {
    puts [format "%-14s %7s %9s %13s %7s %8s %7s %9s" native-accept $n [fmt [fig native $n rps]] [spread native $n] \
        [fmt [fig native $n failed]] [fmt [fig native $n mean] 2] [fmt [fig native $n p99]] \
        [fmt [fig native $n cs] 2]]
}
set last [lindex $opt(-workers) end]
puts ""
puts "socketserver $last workers vs 1: requests/s [fmt [expr {[fig socketserver $last rps] / $oneRps}] 2]x,\
      context switches per request [fmt [expr {[fig socketserver $last cs] / $oneCs}] 2]x"
puts "acc-us/c: CPU time of socketserver's accepting process (all its threads) per connection, in microseconds"
puts ""

# --- 1b. one request at a time -------------------------------------------

# Every request finds the whole pool idle: the wakeups per request show
# whether a connection wakes one worker or all of them.
set saveAbs $opt(-abs)
set opt(-abs) 1
set first [lindex $opt(-workers) 0]
set idleCounts [lsort -unique -integer [list $first $last]]
for {set rep 1} {$rep <= $opt(-reps)} {incr rep} {
    foreach n [shuffle $idleCounts] {
        set m [measure socketserver $n $opt(-sequential) 1]
        lappend idle($n,rps) [dict get $m rps]
        lappend idle($n,cs) [dict get $m cs]
    }
}
set opt(-abs) $saveAbs
puts "1b. One request at a time ($opt(-sequential) requests, concurrency 1): every request finds all workers idle"
puts [format "%-14s %7s %9s %9s" server workers req/s cs/req]
foreach n $idleCounts {
    puts [format "%-14s %7s %9s %9s" socketserver $n [fmt [median $idle($n,rps)]] [fmt [median $idle($n,cs)] 2]]
}
puts "socketserver $last idle workers vs $first: requests/s [fmt [expr {[median $idle($last,rps)] / [median $idle($first,rps)]}] 2]x,\
      context switches per request [fmt [expr {[median $idle($last,cs)] / [median $idle($first,cs)]}] 2]x"
puts ""

# --- 2. mixed latency ---------------------------------------------------

set n $opt(-mixedWorkers)
puts "2. Mixed latency: 1% of requests take 100 ms, $n workers, $opt(-mixedRequests) requests,\
      concurrency [expr {$n}] (medians of $opt(-reps))"
puts [format "%-24s %8s %8s %7s %7s %8s %7s %9s" server req/s mean-ms p50-ms p99-ms p99.9-ms max-ms ">=50ms-%"]
foreach rep [lrepeat $opt(-reps) x] {
    foreach kind [shuffle {socketserver reuseport native tcl}] {
        set server [startServer $kind $n 1]
        try {
            set m [runLoad [dict get $server port] $opt(-mixedRequests) $n 1]
        } finally {
            stopServer $server
        }
        foreach key {rps mean p50 p99 p999 max late} {lappend mixed($kind,$key) [dict get $m $key]}
    }
}
foreach {kind label} {socketserver "socketserver" reuseport "native SO_REUSEPORT" native "native shared accept()" tcl "tcl socket -server (1)"} {
    puts [format "%-24s %8s %8s %7s %7s %8s %7s %9s" $label [fmt [median $mixed($kind,rps)]] \
        [fmt [median $mixed($kind,mean)] 2] [fmt [median $mixed($kind,p50)]] \
        [fmt [median $mixed($kind,p99)]] [fmt [median $mixed($kind,p999)]] [fmt [median $mixed($kind,max)]] \
        [fmt [median $mixed($kind,late)] 2]]
}
puts "socketserver vs SO_REUSEPORT: p99 [fmt [expr {[median $mixed(socketserver,p99)] / double(max(1, [median $mixed(reuseport,p99)]))}] 2]x, p99.9 [fmt [expr {[median $mixed(socketserver,p999)] / double(max(1, [median $mixed(reuseport,p999)]))}] 2]x,\
      max [fmt [expr {[median $mixed(socketserver,max)] / double(max(1, [median $mixed(reuseport,max)]))}] 2]x,\
      mean [fmt [expr {[median $mixed(socketserver,mean)] / max(0.01, [median $mixed(reuseport,mean)])}] 2]x,\
      requests taking >=50 ms [fmt [median $mixed(socketserver,late)] 2]% against [fmt [median $mixed(reuseport,late)] 2]%\
      (1% sleep in the handler; the rest waited behind them)"
puts ""

# --- 3. memory ----------------------------------------------------------

set bare [open |[list [info nameofexecutable]] r+]
after 300
set bareKb [rssKb [pid $bare]]
set server [startServer socketserver 1 0]
set parent [pid [dict get $server pipe]]
set worker [lindex [lsearch -all -inline -not [dict get $server pids] $parent] 0]
exec ab -q -r -n 2000 -c 4 http://127.0.0.1:[dict get $server port]/ >/dev/null 2>@1
set workerBefore [rssKb $worker]
set parentBefore [rssKb $parent]
set load [runLoad [dict get $server port] $opt(-memory) 8]
set workerAfter [rssKb $worker]
set parentAfter [rssKb $parent]
stopServer $server
close $bare
puts "3. Memory ($opt(-memory) connections to one worker; RSS in kB)"
puts "   worker:          [format %6d $workerBefore] before, [format %6d $workerAfter] after\
      ([fmt [expr {($workerAfter - $workerBefore) * 1024.0 / $opt(-memory)}] 3] bytes per connection;\
      [dict get $load failed] failed)"
puts "   accepting:       [format %6d $parentBefore] before, [format %6d $parentAfter] after"
puts "   bare tclsh:      [format %6d $bareKb]; accepting process overhead over it:\
      [expr {$parentAfter - $bareKb}] kB (Tclx, socketserver, threads)"
