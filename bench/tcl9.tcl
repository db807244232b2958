# tcl9.tcl --
#
#	Tcl 9.0 against Tcl 8.6, in one run: the same servers of server.tcl
#	(the pool with the blocking handler, the pool with the event-driven
#	handler, and Tcl's own socket -server as the interpreter's baseline),
#	each started once under tclsh8.6 and once under tclsh9.0, interleaved
#	and repeated; requests/s, context switches per request (every thread
#	of every server process) and the accepting process's CPU per
#	connection. Reported as medians and 9.0/8.6 ratios.
#
#	Usage: tclsh8.6 bench/tcl9.tcl TCLSH9 ?-quick? ?-reps N? ?-requests N? ?-workers {1 4}?

package require Tclx

set here [file dirname [file normalize [info script]]]
set top [file dirname $here]

set tclsh9 [lindex $argv 0]
set argv [lrange $argv 1 end]
if {$tclsh9 eq "" || ![file executable $tclsh9]} {
    puts stderr "usage: tclsh8.6 bench/tcl9.tcl TCLSH9 ?-quick? ?-option value ...? (make tcl9 provides build/tcl9/tclsh9.0)"
    exit 2
}
source [file join $here lib.tcl]
parseOptions {
    -workers {1 4}
} {}
set tclshs [dict create 8.6 [info nameofexecutable] 9.0 $tclsh9]

proc measureUnder {version kind workers} {
    set ::serverTclsh [dict get $::tclshs $version]
    measure $kind $workers
}

expr {srand([clock clicks])}
set configs {}
foreach version {8.6 9.0} {
    lappend configs [list $version tcl 1]
    foreach n $opt(-workers) {
        lappend configs [list $version pool $n] [list $version poolevent $n]
    }
}
set patchlevels [lmap version {8.6 9.0} {
    exec [dict get $tclshs $version] << {puts [info patchlevel]}
}]
puts "Tcl 9.0 against Tcl 8.6: [exec nproc] cores, [exec uname -sr], Tcl [join $patchlevels { and }]"
puts "load: $opt(-abs) ab processes side by side, $opt(-requests) requests per measurement,\
      concurrency $opt(-concurrency), one connection per request; $opt(-reps) repetitions, interleaved"
puts ""
for {set rep 1} {$rep <= $opt(-reps)} {incr rep} {
    foreach config [shuffle $configs] {
        lassign $config version kind n
        set m [measureUnder $version $kind $n]
        foreach key {rps failed cs acc} {
            lappend results($version,$kind,$n,$key) [dict get $m $key]
        }
        puts -nonewline stderr "."
        flush stderr
    }
}
puts stderr ""

proc fig {version kind n key} {median $::results($version,$kind,$n,$key)}
puts [format "%-10s %7s %10s %10s %8s %8s %8s %10s %10s %7s" \
    server workers 8.6-req/s 9.0-req/s 9.0/8.6 cs-8.6 cs-9.0 acc-us-8.6 acc-us-9.0 failed]
foreach config [lsearch -all -inline -index 0 $configs 8.6] {
    lassign $config - kind n
    set old [fig 8.6 $kind $n rps]
    set new [fig 9.0 $kind $n rps]
    set failed [expr {[tcl::mathop::+ {*}$results(8.6,$kind,$n,failed)] + [tcl::mathop::+ {*}$results(9.0,$kind,$n,failed)]}]
    puts [format "%-10s %7s %10.0f %10.0f %7.2fx %8.2f %8.2f %10.2f %10.2f %7d" \
        [expr {$kind eq "tcl" ? "tcl-socket" : $kind}] $n $old $new [expr {$new / $old}] \
        [fig 8.6 $kind $n cs] [fig 9.0 $kind $n cs] [fig 8.6 $kind $n acc] [fig 9.0 $kind $n acc] $failed]
}
