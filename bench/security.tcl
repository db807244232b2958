# security.tcl --
#
#	What the security options cost, run by `make bench` after pool.tcl. In
#	one run, on this machine, each against its baseline measured in the
#	same run, interleaved and repeated; figures are medians of requests/s
#	and of the CPU time per connection of every process of the server
#	(supervisor and workers, all threads), each as a ratio:
#	  S1. a 4-worker pool whose workers run as nobody (-user) against the
#	      same pool as root: dropping, leaving the session and making the
#	      shared memory read-only happen once per worker, before -init,
#	      so requests/s must not change (at least 0.98x) nor the CPU per
#	      connection grow;
#	  S2. a 4-worker -proxy pool behind HAProxy (send-proxy-v2) with
#	      -proxyfrom against the same pool without it: the peer check is
#	      a few comparisons per connection (at least 0.98x).
#	S1 needs root (skipped otherwise), S2 HAProxy.
#
#	Usage: tclsh bench/security.tcl ?-quick? ?-reps N? ?-requests N? ?-raw 1? ?-only S1|S2?

package require Tclx

set here [file dirname [file normalize [info script]]]
set top [file dirname $here]

source [file join $here lib.tcl]
parseOptions {-raw 0 -only {}} {}

proc fmt {value {digits 0}} {format %.${digits}f $value}

# compare title kinds ports --
#	Runs the load $opt(-reps) times on each server of $kinds (a list of
#	label server port), interleaved; prints requests/s medians and the
#	ratio of the second to the first.
proc compare {title entries} {
    for {set rep 1} {$rep <= $::opt(-reps)} {incr rep} {
        foreach entry [shuffle $entries] {
            lassign $entry label server port
            set cpuBefore [serverCpuNs $server]
            set m [runLoad $port $::opt(-requests) $::opt(-concurrency)]
            set cpuAfter [serverCpuNs $server]
            lappend ::cpu($label) [expr {($cpuAfter - $cpuBefore) / 1000.0 / max(1, [dict get $m complete])}]
            lappend ::rps($label) [dict get $m rps]
            lappend ::failed($label) [dict get $m failed]
            puts -nonewline stderr "."
            flush stderr
        }
    }
    puts stderr ""
    puts $title
    puts [format "%-28s %9s %12s %8s" configuration req/s "CPU us/conn" failed]
    foreach entry $entries {
        set label [lindex $entry 0]
        puts [format "%-28s %9s %12s %8s" $label [fmt [median $::rps($label)]] [fmt [median $::cpu($label)] 1] \
            [tcl::mathop::+ {*}$::failed($label)]]
    }
    if {$::opt(-raw)} {
        foreach entry $entries {puts "  [lindex $entry 0]: [lmap v $::rps([lindex $entry 0]) {fmt $v}]"}
    }
    lassign [lmap e $entries {lindex $e 0}] base other
    # Each repetition ran both back to back: the median of their ratios
    # is steadier than the ratio of medians on a machine whose speed drifts.
    set paired [median [lmap a $::rps($base) b $::rps($other) {expr {$b / $a}}]]
    puts "$other vs $base: requests/s [fmt [expr {[median $::rps($other)] / [median $::rps($base)]}] 3]x\
          (median of the ratios of each repetition: [fmt $paired 3]x)"
    set pairedCpu [median [lmap a $::cpu($base) b $::cpu($other) {expr {$b / $a}}]]
    puts "$other vs $base: CPU per connection [fmt [expr {[median $::cpu($other)] / [median $::cpu($base)]}] 3]x\
          (median of the ratios of each repetition: [fmt $pairedCpu 3]x)"
    puts ""
}

# CPU nanoseconds so far of every process of a server: the supervisor and
# the workers it has now (children of the supervisor, whatever their user).
proc serverCpuNs {server} {
    set supervisor [pid [dict get $server pipe]]
    set pids [list $supervisor]
    foreach file [glob -nocomplain /proc/$supervisor/task/*/children] {
        lappend pids {*}[readProc $file]
    }
    tcl::mathop::+ 0 {*}[lmap pid $pids {cpuNs $pid}]
}

puts "socketserver security benchmark: [exec nproc] cores, [exec uname -sr], [info patchlevel]"
puts "load: $opt(-abs) ab processes side by side, $opt(-requests) requests per measurement,\
      concurrency $opt(-concurrency); $opt(-reps) repetitions, interleaved"
puts ""

# --- S1. -user ------------------------------------------------------------

if {$opt(-only) ni {{} S1}} {
} elseif {[exec id -u] != 0 || [catch {exec getent passwd nobody}]} {
    puts "S1. skipped: not root, or no user nobody"
} else {
    set asRoot [startServer pool 4 0]
    set asNobody [startServer pooluser 4 0]
    try {
        compare "S1. A 4-worker pool, workers as root against -user nobody (medians)" [list \
            [list root $asRoot [dict get $asRoot port]] \
            [list "-user nobody" $asNobody [dict get $asNobody port]]]
    } finally {
        stopServer $asRoot
        stopServer $asNobody
    }
}

# --- S2. -proxyfrom -------------------------------------------------------

if {$opt(-only) ni {{} S2}} {
    exit 0
}
if {[auto_execok haproxy] eq ""} {
    puts "S2. skipped: no haproxy"
    exit 0
}
set open [startServer poolproxy 4 0]
set trusting [startServer poolproxyfrom 4 0]
set haproxy [startHaproxy security [list \
    [list open [dict get $open port] send-proxy-v2] \
    [list trusting [dict get $trusting port] send-proxy-v2]]]
set openFront [dict get $haproxy fronts open]
set trustingFront [dict get $haproxy fronts trusting]
try {
    compare "S2. A 4-worker -proxy pool behind HAProxy, without and with -proxyfrom (medians)" [list \
        [list "-proxy" $open $openFront] \
        [list "-proxy -proxyfrom" $trusting $trustingFront]]
} finally {
    stopHaproxy $haproxy
    stopServer $open
    stopServer $trusting
}
