# queue.tcl --
#
#	The cost of the queue's bookkeeping on the per-connection path: the
#	accept stamp in the hand-off message, the queue figures in shared
#	memory (a count per send, a count and a histogram entry per take),
#	the abandoned-client peek (one MSG_PEEK per connection) and the stamp
#	kept per channel. The same pool (bench/server.tcl's "pool": the HTTP
#	"ok" handler, one request per connection) built from this tree and
#	from a baseline tree (by default main, built by `make build-baseline`),
#	at 1 and 4 workers, interleaved and repeated in one run; figures are
#	medians, reported as ratios this/baseline (goal: requests/s at least
#	0.98x, context switches per request unchanged), with the CPU time the
#	server's processes spent per request (all threads), which a machine
#	shared with other work disturbs less than requests/s.
#
#	Usage: tclsh bench/queue.tcl -baseline DIR ?-quick? ?-reps N? ?-requests N? ?-workers {1 4}?
#	(DIR: a directory for TCLLIBPATH holding the baseline's package)

package require Tclx

set here [file dirname [file normalize [info script]]]
set top [file dirname $here]

source [file join $here lib.tcl]
parseOptions {-workers {1 4} -baseline {}} {}
if {$opt(-baseline) eq ""} {
    puts stderr "usage: tclsh bench/queue.tcl -baseline DIR ?-quick? ?-option value ...?"
    exit 2
}

proc fmt {value {digits 0}} {format %.${digits}f $value}

# Every process of a server now: the supervisor and its workers.
proc serverPids {server} {
    set parent [pid [dict get $server pipe]]
    set children [split [string trim [readProc /proc/$parent/task/$parent/children]]]
    concat $parent $children
}

# CPU nanoseconds so far of every thread of every process of a server.
proc serverCpuNs {pids} {
    set total 0
    foreach pid $pids {incr total [cpuNs $pid]}
    return $total
}

set libraries [dict create this [file join $top build] baseline [file normalize $opt(-baseline)]]
set saved [expr {[info exists env(TCLLIBPATH)] ? $env(TCLLIBPATH) : ""}]

expr {srand([clock clicks])}
puts "socketserver queue benchmark: [exec nproc] cores, [exec uname -sr], [info patchlevel]"
puts "this: [dict get $libraries this]; baseline: [dict get $libraries baseline]"
puts "load: $opt(-abs) ab processes side by side, $opt(-requests) requests per measurement,\
      concurrency $opt(-concurrency); $opt(-reps) repetitions, interleaved"
puts ""

set configs {}
foreach n $opt(-workers) {
    foreach build {baseline this} {lappend configs [list $build $n]}
}
for {set rep 1} {$rep <= $opt(-reps)} {incr rep} {
    foreach config [shuffle $configs] {
        lassign $config build n
        set env(TCLLIBPATH) [dict get $libraries $build]
        set server [startServer pool $n 0]
        set env(TCLLIBPATH) $saved
        try {
            set pids [serverPids $server]
            set before [contextSwitches $pids]
            set cpuBefore [serverCpuNs $pids]
            set m [runLoad [dict get $server port] $opt(-requests) $opt(-concurrency)]
            set cs [expr {double([contextSwitches $pids] - $before) / max(1, [dict get $m complete])}]
            set cpu [expr {([serverCpuNs $pids] - $cpuBefore) / 1e3 / max(1, [dict get $m complete])}]
        } finally {
            stopServer $server
        }
        lappend q($build,$n,rps) [dict get $m rps]
        lappend q($build,$n,failed) [dict get $m failed]
        lappend q($build,$n,cs) $cs
        lappend q($build,$n,cpu) $cpu
        puts -nonewline stderr "."
        flush stderr
    }
}
puts stderr ""
puts "Q1. The pool with queue time, depth and abandoned-client checks against the baseline build (medians)"
puts [format "%-8s %12s %12s %10s %8s %11s %11s %9s %11s %11s %9s" workers base-r/s this-r/s this/base failed \
    cs/req-base cs/req-this cs-ratio cpu-us-base cpu-us-this cpu-ratio]
foreach n $opt(-workers) {
    set base [median $q(baseline,$n,rps)]
    set this [median $q(this,$n,rps)]
    set csBase [median $q(baseline,$n,cs)]
    set csThis [median $q(this,$n,cs)]
    set cpuBase [median $q(baseline,$n,cpu)]
    set cpuThis [median $q(this,$n,cpu)]
    puts [format "%-8s %12s %12s %10s %8s %11s %11s %9s %11s %11s %9s" $n [fmt $base] [fmt $this] \
        [fmt [expr {$this / $base}] 3]x \
        [fmt [expr {[tcl::mathop::+ {*}$q(baseline,$n,failed)] + [tcl::mathop::+ {*}$q(this,$n,failed)]}]] \
        [fmt $csBase 2] [fmt $csThis 2] [fmt [expr {$csThis / max(0.001, $csBase)}] 3]x \
        [fmt $cpuBase 1] [fmt $cpuThis 1] [fmt [expr {$cpuThis / max(0.001, $cpuBase)}] 3]x]
}
