# all.tcl --
#
#	Runs every tests/*.test file, each in its own tclsh, prints the totals
#	and exits with status 1 when a test failed or a file did not run to
#	the end: tcltest's runAllTests by itself lets the process exit 0.

package require tcltest 2.5
namespace import ::tcltest::*

configure -testdir [file dirname [file normalize [info script]]] {*}$argv
singleProcess 0
set tmp [file join [expr {[info exists ::env(TMPDIR)] ? $::env(TMPDIR) : "/tmp"}] socketserver-tests-[pid]]
file mkdir $tmp
configure -tmpdir $tmp

# Called with the totals of every file before runAllTests prints them.
proc ::tcltest::cleanupTestsHook {} {
    variable numTests
    array set ::totals [array get numTests]
}

# A copy of everything the files print, so that each failure can be told
# again in one line at the end: a CI log is often read from its tail.
namespace eval ::printed {
    variable text ""
    proc initialize {handle mode} {return {initialize finalize write}}
    proc finalize {handle} {}
    proc write {handle data} {variable text; append text $data; return $data}
    namespace export *
    namespace ensemble create
}
chan push stdout ::printed

set troubled [runAllTests]
file delete -force $tmp
chan pop stdout

# failureSummary text --
#	One line per failed test or file error in tcltest's output: the name,
#	what came back and what was expected (or the error).
proc failureSummary {text} {
    set lines {}
    set said [set wanted [set next {}]]
    foreach line [split $text \n] {
        set line [string range $line 0 120]
        if {$next ne {}} {
            set $next $line
            set next {}
        } elseif {[regexp {^==== (\S+) FAILED$} $line -> name]} {
            lappend lines "FAILED $name: got {$said}, expected {$wanted}"
            set said [set wanted {}]
        } elseif {[regexp {^---- (Result|Output|Error output) was:$} $line]
                || [regexp {^---- Test (setup|cleanup) failed:$} $line]} {
            set next said
        } elseif {[regexp {^---- (Result|Output|Error output) should have} $line]} {
            set next wanted
        } elseif {[regexp {^---- (Test generated .*)$} $line -> said]} {
        } elseif {[regexp {^---- errorInfo: (.*)$} $line -> said]} {
        } elseif {[regexp {^Test file error: (.*)$} $line -> why]} {
            lappend lines "FILE ERROR: $why"
        }
    }
    return $lines
}
foreach line [failureSummary $::printed::text] {
    puts $line
}

puts "tcltest: $totals(Passed) passed, $totals(Failed) failed, $totals(Skipped) skipped"
if {$troubled || $totals(Failed) > 0 || $totals(Total) == 0} {
    puts "socketserver tests FAILED"
    exit 1
}
exit 0
