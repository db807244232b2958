# memcheck-summary.tcl --
#
#	Reads the valgrind logs that `make memcheck` leaves in a directory and
#	separates reports that involve socketserver's library from those of
#	the Tcl core and other libraries. Exits 1 if any invalid access or
#	definite leak involves our library.
#
#	Memory that a thread of ours owns while it runs (its closure, its
#	buffers) is listed apart: valgrind reports it as lost when the process
#	exits with the thread still running, or in a forked child, where the
#	thread does not exist. It is bounded (one set per port and per
#	registration), not per connection.
#
#	Usage: tclsh scripts/memcheck-summary.tcl DIRECTORY

set dir [lindex $argv 0]
set ours {}
set threadOwned {}
set theirs {}
set processes 0
foreach log [lsort [glob -nocomplain -directory $dir *.log]] {
    set f [open $log]
    set text [read $f]
    close $f
    if {![string match *tclsh* $text]} continue
    incr processes
    # A report is a block of "==PID== " lines between blank report lines.
    set block {}
    foreach line [split $text \n] {
        set body [regsub {^==\d+== ?} $line {}]
        if {$body eq {}} {
            if {[regexp {^(Invalid (read|write|free)|Conditional jump|Syscall param|Mismatched free|.*definitely lost in loss record)} [lindex $block 0]]} {
                set report [join $block \n]
                if {[regexp {libsocketserver|socketserver::} $report]} {
                    if {[string match *definitely* [lindex $block 0]]
                            && [regexp {thread_start|AcceptLoop::start|Receiver::spawn} $report]} {
                        lappend threadOwned [lindex $block 0]
                    } else {
                        lappend ours "[file tail $log]: $report"
                    }
                } else {
                    lappend theirs [lindex $block 0]
                }
            }
            set block {}
        } else {
            lappend block $body
        }
    }
}

puts "memcheck: $processes tclsh processes checked"
puts "reports involving socketserver: [llength $ours]"
puts "memory owned by socketserver threads running at exit or left behind by fork: [llength $threadOwned]"
foreach report $ours {puts "\n$report"}
set counts [dict create]
foreach first $theirs {
    dict incr counts [regsub -all {[0-9,]+ bytes|[0-9,]+ \(|[0-9,]+ blocks?|record [0-9,]+ of [0-9,]+} $first {N}]
}
puts "reports elsewhere (Tcl core, libc, TclX, Thread), by kind: [llength $theirs]"
dict for {kind n} $counts {puts [format "  %5d  %s" $n $kind]}
exit [expr {[llength $ours] > 0}]
