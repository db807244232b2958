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
#	registration), not per connection. So is, in a forked child, what
#	another thread of the parent (a Thread-package thread) had allocated
#	at the moment of the fork: that thread, and its stack, which held the
#	only pointers, do not exist in the child.
#
#	Usage: tclsh scripts/memcheck-summary.tcl DIRECTORY

set dir [lindex $argv 0]
set ours {}
set threadOwned {}
set theirs {}
set processes 0
set forked 0

# The command line and parent of each process.
proc header {log} {
    set f [open $log]
    set text [read $f 4000]
    close $f
    regexp -line {^==\d+== Command: (.*)$} $text -> command
    regexp -line {^==\d+== Parent PID: (\d+)$} $text -> parent
    list [expr {[info exists command] ? $command : {}}] [expr {[info exists parent] ? $parent : {}}]
}

foreach log [lsort [glob -nocomplain -directory $dir *.log]] {
    set f [open $log]
    set text [read $f]
    close $f
    if {![string match *tclsh* $text]} continue
    incr processes
    # A forked child carries its parent's command line (an exec'd process
    # has its own).
    lassign [header $log] command parent
    set parentLog [file join $dir $parent.log]
    set isForked [expr {$command ne {} && [file exists $parentLog]
                        && [lindex [header $parentLog] 0] eq $command}]
    incr forked $isForked
    # A report is a block of "==PID== " lines between blank report lines.
    set block {}
    foreach line [split $text \n] {
        set body [regsub {^==\d+== ?} $line {}]
        if {$body eq {}} {
            if {[regexp {^(Invalid (read|write|free)|Conditional jump|Syscall param|Mismatched free|.*definitely lost in loss record)} [lindex $block 0]]} {
                set report [join $block \n]
                if {[regexp {libsocketserver|socketserver::} $report]} {
                    if {[string match *definitely* [lindex $block 0]]
                            && ([regexp {thread_start|spawn_unchecked|AcceptLoop::start|Receiver::spawn} $report]
                                || ($isForked && [string match *start_thread* $report]))} {
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

puts "memcheck: $processes tclsh processes checked ($forked of them forked children)"
puts "reports involving socketserver: [llength $ours]"
puts "memory owned by socketserver threads running at exit or left behind by fork: [llength $threadOwned]"
foreach report $ours {puts "\n$report"}
set counts [dict create]
foreach first $theirs {
    dict incr counts [regsub -all {[0-9][0-9,]*} $first N]
}
puts "reports elsewhere (Tcl core, libc, TclX, Thread), by kind: [llength $theirs]"
dict for {kind n} $counts {puts [format "  %5d  %s" $n $kind]}
exit [expr {[llength $ours] > 0}]
