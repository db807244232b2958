# run.tcl --
#
#	Runs tests/compat/scenarios.tcl under the socketserver package that
#	TCLLIBPATH finds (this one, or socketservertcl 1.1.3 built from its
#	repository), and says for each scenario whether it behaves as 1.1.3
#	and as this package. Usage:
#
#	    TCLLIBPATH=DIR tclsh8.6 tests/compat/run.tcl ?name ...?
#
#	The last line counts the scenarios that behave as 1.1.3.

source [file join [file dirname [file normalize [info script]]] scenarios.tcl]
set ipv6 [expr {![catch {close [socket -server {apply {args {}}} -myaddr ::1 0]}]}]
set same 0
set total 0
foreach {name row old new constraints script} $::compatScenarios {
    if {[llength $argv] && $name ni $argv} continue
    if {"ipv6" in $constraints && !$ipv6} continue
    set outcome [compatRun $script]
    # An outcome 1.1.3 does not repeat from run to run (`*`) is not
    # counted as its behaviour.
    set as113 [expr {$old ne "*" && [compatMatches $old $outcome]}]
    set asOurs [compatMatches $new $outcome]
    incr total
    incr same $as113
    puts [format "%-24s %-8s %-8s %s" $name [expr {$as113 ? "as1.1.3" : "-"}] [expr {$asOurs ? "as1.2" : "-"}] $outcome]
}
puts "$same of $total scenarios behave as 1.1.3"
