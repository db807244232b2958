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

set troubled [runAllTests]
file delete -force $tmp

puts "tcltest: $totals(Passed) passed, $totals(Failed) failed, $totals(Skipped) skipped"
if {$troubled || $totals(Failed) > 0 || $totals(Total) == 0} {
    puts "socketserver tests FAILED"
    exit 1
}
exit 0
