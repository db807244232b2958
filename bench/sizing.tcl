# sizing.tcl --
#
#	A pool sized by its load against fixed pools of its maximum and its
#	minimum, run by `make bench` after security.tcl. One step load per
#	measurement: one client at a time, then eight, then one again, every
#	request held by the handler for -hold ms (a slow backend). In one run,
#	interleaved and repeated; figures are medians:
#	  Z1. requests/s and p99 over the whole step, and memory: the resident
#	      set of every worker added up, sampled every 100 ms (its mean over
#	      the step and its peak), and the most workers seen;
#	  ratios of -workers 1-8 against a fixed 8 (the memory it saves, what
#	      it costs in requests/s and p99 while it grows) and against a
#	      fixed 1 (what growing buys).
#
#	Usage: tclsh bench/sizing.tcl ?-quick? ?-reps N? ?-hold MS? ?-step {N1 N8 N1}?
#	       tclsh bench/sizing.tcl -serve WORKERS HOLD_MS   (the server)

if {[lindex $argv 0] eq "-serve"} {
    lassign $argv - workers hold
    package require socketserver
    proc answer {chan addr port} {
        fconfigure $chan -translation crlf -buffering full -blocking 1
        gets $chan
        while {[gets $chan header] > 0} {}
        after $::hold
        puts $chan "HTTP/1.1 200 OK\nContent-Type: text/plain\nContent-Length: 3\nConnection: close\n"
        fconfigure $chan -translation binary
        puts -nonewline $chan "ok\n"
        close $chan
    }
    set port [::socketserver::pool create -myaddr 127.0.0.1 -workers $workers -idletimeout 1 -log {} 0 answer]
    puts "port $port"
    flush stdout
    after 600000 {::socketserver::pool stop}
    ::socketserver::pool wait
    exit 0
}

set here [file dirname [file normalize [info script]]]
set top [file dirname $here]
source [file join $here lib.tcl]
# One ab: the step's concurrency is exactly 1, then 8, then 1.
parseOptions {-abs 1 -reps 5 -hold 10 -step {100 1600 300}} {-reps 3 -step {50 800 200}}

proc fmt {value {digits 0}} {format %.${digits}f $value}

proc children {pid} {
    set result {}
    foreach stat [glob -nocomplain /proc/\[0-9\]*/stat] {
        if {[catch {readProc $stat} text]} continue
        if {[regexp {\) \S+ (\d+) } $text -> parent] && $parent == $pid} {
            lappend result [lindex [file split $stat] 2]
        }
    }
    return $result
}

# sample pid --
#	Every 100 ms while ::sampling is $token: the workers' RSS added up, and their count.
proc sample {pid token} {
    if {$token != $::sampling} return
    set workers [children $pid]
    lappend ::rssSamples [tcl::mathop::+ 0 {*}[lmap w $workers {rssKb $w}]]
    set ::mostWorkers [expr {max($::mostWorkers, [llength $workers])}]
    after 100 [list sample $pid $token]
}

# step workers --
#	Starts a pool of $workers, runs the step load, stops it; returns a dict.
proc step {workers} {
    set pipe [open |[list [info nameofexecutable] [file join $::here sizing.tcl] -serve $workers $::opt(-hold)] r]
    set line [gets $pipe]
    if {![regexp {^port (\d+)$} $line -> port]} {error "server did not start: $line"}
    set pid [pid $pipe]
    try {
        # The first worker registered and paged in, at concurrency 1.
        exec ab -q -r -n 20 -c 1 http://127.0.0.1:$port/ >/dev/null 2>@1
        # A new token: the chain of samples of the step before ends.
        set token [incr ::samplingToken]
        set ::sampling $token
        set ::rssSamples {}
        set ::mostWorkers 0
        sample $pid $token
        set started [clock microseconds]
        set complete 0
        set failed 0
        set p99 {}
        foreach requests $::opt(-step) concurrency {1 8 1} {
            set m [runLoad $port $requests $concurrency 1]
            incr complete [dict get $m complete]
            incr failed [dict get $m failed]
            lappend p99 [dict get $m p99]
        }
        set seconds [expr {([clock microseconds] - $started) / 1e6}]
        set ::sampling 0
        set rss [lsort -integer $::rssSamples]
        return [dict create rps [expr {$complete / $seconds}] p99 [tcl::mathfunc::max {*}$p99] \
            failed $failed rssMean [expr {[tcl::mathop::+ {*}$rss] / double(max(1, [llength $rss])) / 1024}] \
            rssPeak [expr {[lindex $rss end] / 1024.0}] workers $::mostWorkers]
    } finally {
        set ::sampling 0
        exec kill -TERM $pid
        catch {close $pipe}
    }
}

lassign $opt(-step) n1 n8 n1b
puts "socketserver sizing benchmark: [exec nproc] cores, [exec uname -sr], [info patchlevel]"
puts "step load: $n1 requests one at a time, $n8 by 8 at a time, $n1b one at a time; each held\
      $opt(-hold) ms by the handler; $opt(-reps) repetitions, interleaved"
puts ""

set configs {8 1 1-8}
for {set rep 1} {$rep <= $opt(-reps)} {incr rep} {
    foreach workers [shuffle $configs] {
        set m [step $workers]
        dict for {key value} $m {lappend ::figures($workers,$key) $value}
        puts -nonewline stderr "."
        flush stderr
    }
}
puts stderr ""
proc med {workers key} {median $::figures($workers,$key)}
puts "Z1. Step load 1, 8, 1 on a pool of -workers 1-8 (-idletimeout 1) and fixed pools of 8 and 1 (medians)"
puts [format "%-10s %8s %8s %12s %12s %8s %7s" workers req/s p99ms rss-mean-MB rss-peak-MB most failed]
foreach workers $configs {
    puts [format "%-10s %8s %8s %12s %12s %8s %7s" $workers [fmt [med $workers rps]] [fmt [med $workers p99]] \
        [fmt [med $workers rssMean] 1] [fmt [med $workers rssPeak] 1] [fmt [med $workers workers]] \
        [tcl::mathop::+ {*}$::figures($workers,failed)]]
}
foreach base {8 1} {
    puts [format "1-8 vs %s: requests/s %.2fx, p99 %.2fx, mean worker memory %.2fx, peak %.2fx" $base \
        [expr {[med 1-8 rps] / [med $base rps]}] [expr {double([med 1-8 p99]) / max(1.0, [med $base p99])}] \
        [expr {[med 1-8 rssMean] / [med $base rssMean]}] [expr {[med 1-8 rssPeak] / [med $base rssPeak]}]]
}
