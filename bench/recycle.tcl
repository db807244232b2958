# recycle.tcl --
#
#	What -maxrss costs, run by `make bench` after security.tcl. Each
#	worker of a -maxrss pool measures its own resident memory after every
#	connection it closes (Linux: one read of /proc/self/statm). In one
#	run, on this machine, against its baseline measured in the same run,
#	interleaved and repeated; figures are medians:
#	  R1. a 4-worker pool with -maxrss 1G (never reached: every check runs,
#	      no worker leaves) against the same pool without it; requests/s
#	      must not change (at least 0.98x).
#
#	Usage: tclsh bench/recycle.tcl ?-quick? ?-reps N? ?-requests N? ?-raw 1?

package require Tclx

set here [file dirname [file normalize [info script]]]
set top [file dirname $here]

source [file join $here lib.tcl]
parseOptions {-raw 0} {}

proc fmt {value {digits 0}} {format %.${digits}f $value}

puts "socketserver recycling benchmark: [exec nproc] cores, [exec uname -sr], [info patchlevel]"
puts "load: $opt(-abs) ab processes side by side, $opt(-requests) requests per measurement,\
      concurrency $opt(-concurrency); $opt(-reps) repetitions, interleaved"
puts ""

set entries [list [list "no -maxrss" [startServer pool 4 0]] [list "-maxrss 1G" [startServer poolmaxrss 4 0]]]
try {
    for {set rep 1} {$rep <= $opt(-reps)} {incr rep} {
        foreach entry [shuffle $entries] {
            lassign $entry label server
            set m [runLoad [dict get $server port] $opt(-requests) $opt(-concurrency)]
            lappend rps($label) [dict get $m rps]
            lappend failed($label) [dict get $m failed]
            puts -nonewline stderr "."
            flush stderr
        }
    }
    puts stderr ""
    puts "R1. A 4-worker pool without and with -maxrss 1G (medians)"
    puts [format "%-28s %9s %8s" configuration req/s failed]
    foreach entry $entries {
        set label [lindex $entry 0]
        puts [format "%-28s %9s %8s" $label [fmt [median $rps($label)]] [tcl::mathop::+ {*}$failed($label)]]
        if {$opt(-raw)} {puts "  $label: [lmap v $rps($label) {fmt $v}]"}
    }
    set paired [median [lmap a $rps(no -maxrss) b $rps(-maxrss 1G) {expr {$b / $a}}]]
    puts "-maxrss 1G vs no -maxrss: requests/s [fmt [expr {[median $rps(-maxrss 1G)] / [median $rps(no -maxrss)]}] 3]x\
          (median of the ratios of each repetition: [fmt $paired 3]x)"
} finally {
    foreach entry $entries {stopServer [lindex $entry 1]}
}
