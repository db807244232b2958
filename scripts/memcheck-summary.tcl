# memcheck-summary.tcl --
#
#	Reads the valgrind logs that `make memcheck` leaves in a directory and
#	separates reports that involve socketserver's library from those of
#	the Tcl core and other libraries. Definite losses of ours that are no
#	leak are counted by kind, each with its reason (scripts/memcheck.kinds).
#	Exits 1 if any other report involves our library: an invalid access,
#	a jump on an uninitialised value, a bad syscall parameter, or a
#	definite loss of no kind.
#
#	Usage: tclsh scripts/memcheck-summary.tcl DIRECTORY

set dir [lindex $argv 0]

# The kinds: name -> {where pattern exclude reason}.
set kinds [dict create]
proc kind {name where pattern exclude reason} {
    dict set ::kinds $name [list $where $pattern $exclude [string trim [regsub -all {\s+} $reason { }]]]
}
source [file join [file dirname [file normalize [info script]]] memcheck.kinds]

set ours {}
set byKind [dict create]
dict for {name -} $kinds {dict set byKind $name 0}
set theirs {}
set processes 0
set forked 0
set invalid 0
set invalidOurs 0

# The command line and parent of each process.
proc header {log} {
    set f [open $log]
    set text [read $f 4000]
    close $f
    regexp -line {^==\d+== Command: (.*)$} $text -> command
    regexp -line {^==\d+== Parent PID: (\d+)$} $text -> parent
    list [expr {[info exists command] ? $command : {}}] [expr {[info exists parent] ? $parent : {}}]
}

# The kind of a definite loss of ours, or {} if none.
proc kindOf {report isForked} {
    dict for {name entry} $::kinds {
        lassign $entry where pattern exclude
        if {$where eq "forked" && !$isForked} continue
        if {![regexp $pattern $report]} continue
        if {$exclude ne {} && [regexp $exclude $report]} continue
        return $name
    }
    return {}
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
            set first [lindex $block 0]
            if {[regexp {^(Invalid (read|write|free)|Conditional jump|Syscall param|Mismatched free|.*definitely lost in loss record)} $first]} {
                set report [join $block \n]
                set isOurs [regexp {libsocketserver|socketserver::} $report]
                if {[string match Invalid* $first]} {
                    incr invalid
                    incr invalidOurs $isOurs
                }
                if {!$isOurs} {
                    lappend theirs $first
                } elseif {[string match *definitely* $first]
                          && [set kind [kindOf $report $isForked]] ne {}} {
                    dict incr byKind $kind
                } else {
                    lappend ours "[file tail $log]: $report"
                }
            }
            set block {}
        } else {
            lappend block $body
        }
    }
}

puts "memcheck: $processes tclsh processes checked ($forked of them forked children)"
puts "invalid accesses: $invalid, of which involving socketserver: $invalidOurs"
puts "reports involving socketserver that are no known kind (failures): [llength $ours]"
puts "definite losses involving socketserver that are no leak, by kind (scripts/memcheck.kinds):"
dict for {name count} $byKind {
    puts [format "  %5d  %s: %s" $count $name [lindex [dict get $kinds $name] 3]]
}
foreach report $ours {puts "\n$report"}
set counts [dict create]
foreach first $theirs {
    dict incr counts [regsub -all {[0-9][0-9,]*} $first N]
}
puts "reports elsewhere (Tcl core, libc, TclX, Thread), by kind: [llength $theirs]"
dict for {kind n} $counts {puts [format "  %5d  %s" $n $kind]}
exit [expr {[llength $ours] > 0}]
