# pool.tcl --
#
#	The pool's benchmark, run by `make bench` after run.tcl. In one run,
#	on this machine, against baselines measured in the same run:
#	  P1. ::socketserver::pool against the same workers forked by hand
#	      (TclX fork and a re-registering handler) at 1, 4 and 16
#	      workers: the pool's bookkeeping (close handler, scoreboard) must
#	      not cost throughput;
#	  P2. requests failed and latency while the pool goes through 10
#	      rolling reloads (SIGHUP) under load, against the same load with
#	      no reload;
#	  P3. 2 workers with -concurrency 4 and an event-driven handler against
#	      8 workers with -concurrency 1 (Apache prefork): requests/s and
#	      memory (PSS of every process of the server), with plain requests
#	      and with 1% of requests taking 100 ms;
#	  P4. a port with -proxy behind HAProxy (send-proxy-v2) against a plain
#	      port behind the same HAProxy: the header read must cost no
#	      wakeup (context switches per request in the server).
#	Load: ab on 127.0.0.1, bounded counts. Configurations are interleaved
#	and repeated; figures are medians.
#
#	Usage: tclsh bench/pool.tcl ?-quick? ?-reps N? ?-requests N? ?-reloadRequests N?

package require Tclx

set here [file dirname [file normalize [info script]]]
set top [file dirname $here]

source [file join $here lib.tcl]
parseOptions {
    -workers {1 4 16}
    -reloads 10
    -reloadRequests 40000
} {-reloadRequests 20000}

proc fmt {value {digits 0}} {format %.${digits}f $value}

# Proportional set size of every process of a server, in kB: pages shared
# after fork count once in all.
proc pssKb {pids} {
    set total 0
    foreach pid $pids {
        if {[regexp -line {^Pss:\s+(\d+)} [readProc /proc/$pid/smaps_rollup] -> kb]} {
            incr total $kb
        }
    }
    return $total
}

# Every process of a server now (a pool's workers change with reloads).
proc serverPids {server} {
    set parent [pid [dict get $server pipe]]
    set children [split [string trim [readProc /proc/$parent/task/$parent/children]]]
    concat $parent $children
}

expr {srand([clock clicks])}
puts "socketserver pool benchmark: [exec nproc] cores, [exec uname -sr], [info patchlevel]"
puts "load: $opt(-abs) ab processes side by side, $opt(-requests) requests per measurement,\
      concurrency $opt(-concurrency); $opt(-reps) repetitions, interleaved"
puts ""

# --- P1. pool against the fork loop ------------------------------------

set configs {}
foreach n $opt(-workers) {
    lappend configs [list socketserver $n] [list pool $n]
}
for {set rep 1} {$rep <= $opt(-reps)} {incr rep} {
    foreach config [shuffle $configs] {
        lassign $config kind n
        set server [startServer $kind $n 0]
        try {
            set pids [serverPids $server]
            set before [contextSwitches $pids]
            set m [runLoad [dict get $server port] $opt(-requests) $opt(-concurrency)]
            set cs [expr {double([contextSwitches $pids] - $before) / max(1, [dict get $m complete])}]
        } finally {
            stopServer $server
        }
        lappend p1($kind,$n,rps) [dict get $m rps]
        lappend p1($kind,$n,failed) [dict get $m failed]
        lappend p1($kind,$n,p99) [dict get $m p99]
        lappend p1($kind,$n,cs) $cs
        puts -nonewline stderr "."
        flush stderr
    }
}
puts stderr ""
puts "P1. The pool against the same workers forked by hand (medians)"
puts [format "%-8s %12s %12s %9s %8s %8s %10s %10s" workers fork-loop-r/s pool-r/s pool/loop failed p99-ms cs/req-loop cs/req-pool]
foreach n $opt(-workers) {
    set loop [median $p1(socketserver,$n,rps)]
    set pool [median $p1(pool,$n,rps)]
    puts [format "%-8s %12s %12s %9s %8s %8s %10s %10s" $n [fmt $loop] [fmt $pool] [fmt [expr {$pool / $loop}] 2]x \
        [fmt [expr {[median $p1(socketserver,$n,failed)] + [median $p1(pool,$n,failed)]}]] \
        [fmt [median $p1(pool,$n,p99)]] [fmt [median $p1(socketserver,$n,cs)] 2] [fmt [median $p1(pool,$n,cs)] 2]]
}
puts ""

# --- P2. reloads under load --------------------------------------------

# One run of the load on a 4-worker pool, with $reloads SIGHUPs spread over
# it; returns the load's figures, with "sent": the reloads that came while
# the load ran.
proc reloadRun {reloads} {
    set server [startServer pool 4 0]
    try {
        set port [dict get $server port]
        set supervisor [pid [dict get $server pipe]]
        # One every 100 ms from 100 ms on (the load reads ab's output in the
        # event loop, so the timers fire while it runs).
        for {set i 0} {$i < $reloads} {incr i} {
            after [expr {100 + 100 * $i}] [list kill HUP $supervisor]
        }
        set m [runLoad $port $::opt(-reloadRequests) $::opt(-concurrency) 1]
        dict set m sent [expr {$reloads - [llength [after info]]}]
        foreach id [after info] {after cancel $id}
        return $m
    } finally {
        stopServer $server
    }
}

for {set rep 1} {$rep <= $opt(-reps)} {incr rep} {
    foreach reloads [shuffle [list 0 $opt(-reloads)]] {
        set m [reloadRun $reloads]
        foreach key {rps failed complete p50 p99 p999 max sent} {lappend p2($reloads,$key) [dict get $m $key]}
        puts -nonewline stderr "."
        flush stderr
    }
}
puts stderr ""
set r $opt(-reloads)
puts "P2. $r rolling reloads (SIGHUP, one every 100 ms) during $opt(-reloadRequests) requests on 4 workers (medians;\
      reloads that came while the load ran: [lsort -unique $p2($r,sent)])"
puts [format "%-16s %9s %8s %10s %7s %7s %8s %7s" run req/s failed complete p50-ms p99-ms p99.9-ms max-ms]
foreach reloads [list 0 $r] label [list "steady" "$r reloads"] {
    puts [format "%-16s %9s %8s %10s %7s %7s %8s %7s" $label [fmt [median $p2($reloads,rps)]] \
        [tcl::mathop::+ {*}$p2($reloads,failed)] [fmt [median $p2($reloads,complete)]] \
        [fmt [median $p2($reloads,p50)]] [fmt [median $p2($reloads,p99)]] [fmt [median $p2($reloads,p999)]] \
        [fmt [median $p2($reloads,max)]]]
}
puts "reloads vs steady: failed requests [tcl::mathop::+ {*}$p2($r,failed)] in all [llength $p2($r,failed)] runs,\
      requests/s [fmt [expr {[median $p2($r,rps)] / [median $p2(0,rps)]}] 2]x,\
      p99 [fmt [expr {double([median $p2($r,p99)]) / max(1, [median $p2(0,p99)])}] 2]x"
puts ""

# --- P3. concurrency in a worker ------------------------------------------

set configs {}
foreach slow {0 1} {
    lappend configs [list poolevent 2 4 $slow] [list pool 8 1 $slow]
}
for {set rep 1} {$rep <= $opt(-reps)} {incr rep} {
    foreach config [shuffle $configs] {
        lassign $config kind n k slow
        set server [startServer $kind $n $slow $k]
        try {
            set m [runLoad [dict get $server port] $opt(-requests) $opt(-concurrency) $slow]
            set kb [pssKb [serverPids $server]]
        } finally {
            stopServer $server
        }
        foreach key {rps failed p99} {lappend p3($kind,$slow,$key) [dict get $m $key]}
        lappend p3($kind,$slow,pss) $kb
        puts -nonewline stderr "."
        flush stderr
    }
}
puts stderr ""
puts "P3. 2 workers x -concurrency 4 (event-driven handler) against 8 workers x 1 (medians; memory: PSS of all processes)"
puts [format "%-30s %-10s %9s %7s %7s %9s" server requests req/s failed p99-ms PSS-kB]
foreach slow {0 1} {
    set label [expr {$slow ? "1% take 100 ms" : "plain"}]
    foreach {kind desc} {poolevent "2 workers x 4, event-driven" pool "8 workers x 1, blocking"} {
        puts [format "%-30s %-10s %9s %7s %7s %9s" $desc [lindex $label 0] [fmt [median $p3($kind,$slow,rps)]] \
            [fmt [median $p3($kind,$slow,failed)]] [fmt [median $p3($kind,$slow,p99)]] [fmt [median $p3($kind,$slow,pss)]]]
    }
    puts "  $label: 2x4 vs 8x1: requests/s [fmt [expr {[median $p3(poolevent,$slow,rps)] / [median $p3(pool,$slow,rps)]}] 2]x,\
          memory [fmt [expr {double([median $p3(poolevent,$slow,pss)]) / [median $p3(pool,$slow,pss)]}] 2]x"
}

# --- P4. PROXY protocol -------------------------------------------------

if {[auto_execok haproxy] eq ""} {
    puts "P4. skipped: no haproxy"
    exit 0
}
set plain [startServer pool 4 0]
set proxied [startServer poolproxy 4 0]
set haproxy [startHaproxy bench [list \
    [list plain [dict get $plain port] {}] \
    [list proxied [dict get $proxied port] send-proxy-v2]]]
set plainFront [dict get $haproxy fronts plain]
set proxyFront [dict get $haproxy fronts proxied]
try {
    for {set rep 1} {$rep <= $opt(-reps)} {incr rep} {
        foreach entry [shuffle [list [list plain $plain $plainFront] [list proxied $proxied $proxyFront]]] {
            lassign $entry kind server front
            set pids [serverPids $server]
            set before [contextSwitches $pids]
            set m [runLoad $front $opt(-requests) $opt(-concurrency)]
            lappend p4($kind,rps) [dict get $m rps]
            lappend p4($kind,failed) [dict get $m failed]
            lappend p4($kind,cs) [expr {double([contextSwitches $pids] - $before) / max(1, [dict get $m complete])}]
            puts -nonewline stderr "."
            flush stderr
        }
    }
} finally {
    stopHaproxy $haproxy
    stopServer $plain
    stopServer $proxied
}
puts stderr ""
puts "P4. The same 4-worker pool behind HAProxy, plain against -proxy (send-proxy-v2) (medians)"
puts [format "%-22s %9s %8s %14s" port req/s failed cs/req-server]
foreach kind {plain proxied} label {"plain" "-proxy v2"} {
    puts [format "%-22s %9s %8s %14s" $label [fmt [median $p4($kind,rps)]] \
        [tcl::mathop::+ {*}$p4($kind,failed)] [fmt [median $p4($kind,cs)] 2]]
}
puts "-proxy vs plain: requests/s [fmt [expr {[median $p4(proxied,rps)] / [median $p4(plain,rps)]}] 2]x,\
      context switches per request in the server [fmt [expr {[median $p4(proxied,cs)] / [median $p4(plain,cs)]}] 2]x"
