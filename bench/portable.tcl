# portable.tcl --
#
#	The portable path (FreeBSD, macOS: the waiting turn instead of
#	EPOLLEXCLUSIVE, pipes instead of eventfd, accept + fcntl instead of
#	accept4) against Linux's own path, on Linux, in one run: the pool of
#	server.tcl with the library of build/ and with the one of
#	build/portable/ (make build-portable), interleaved and repeated.
#	Throughput at 1, 4 and 16 workers under section 1's load of run.tcl;
#	and the herd test: one request at a time (ab -c 1), context switches
#	per request with 16 idle workers against 1 (a server that woke every
#	idle worker would show about 16 times as many). Medians and ratios.
#
#	Usage: tclsh8.6 bench/portable.tcl ?-quick? ?-reps N? ?-requests N? ?-workers {1 4 16}?

package require Tclx

set here [file dirname [file normalize [info script]]]
set top [file dirname $here]
source [file join $here lib.tcl]
parseOptions {
    -workers {1 4 16} -herdRequests 3000
} {
    -herdRequests 1500
}
set libraries [dict create linux [file join $top build] portable [file join $top build portable]]
foreach {path dir} $libraries {
    if {![file exists [file join $dir socketserver1.2.0 pkgIndex.tcl]] && ![llength [glob -nocomplain $dir/socketserver*/pkgIndex.tcl]]} {
        puts stderr "no library in $dir: run make build and make build-portable first"
        exit 2
    }
}

# measureOn path workers concurrency requests --
#	measure (lib.tcl) with the server's TCLLIBPATH set to the path's library.
proc measureOn {path workers concurrency requests} {
    set saved $::env(TCLLIBPATH)
    set ::env(TCLLIBPATH) [dict get $::libraries $path]
    try {
        measure pool $workers $requests $concurrency
    } finally {
        set ::env(TCLLIBPATH) $saved
    }
}
if {![info exists ::env(TCLLIBPATH)]} {set ::env(TCLLIBPATH) {}}

expr {srand([clock clicks])}
set herdWorkers [list 1 [lindex [lsort -integer $opt(-workers)] end]]
set configs {}
foreach path {linux portable} {
    foreach n $opt(-workers) {lappend configs [list $path load $n]}
    foreach n $herdWorkers {lappend configs [list $path herd $n]}
}
puts "the portable path against Linux's, on Linux: [exec nproc] cores, [exec uname -sr], Tcl [info patchlevel]"
puts "load: $opt(-abs) ab side by side, $opt(-requests) requests, concurrency $opt(-concurrency);\
      herd: 1 ab, concurrency 1, $opt(-herdRequests) requests; $opt(-reps) repetitions, interleaved"
puts ""
for {set rep 1} {$rep <= $opt(-reps)} {incr rep} {
    foreach config [shuffle $configs] {
        lassign $config path test n
        if {$test eq "load"} {
            set m [measureOn $path $n $opt(-concurrency) $opt(-requests)]
        } else {
            set saved $opt(-abs)
            set opt(-abs) 1
            set m [measureOn $path $n 1 $opt(-herdRequests)]
            set opt(-abs) $saved
        }
        foreach key {rps failed cs} {
            lappend results($path,$test,$n,$key) [dict get $m $key]
        }
        puts -nonewline stderr "."
        flush stderr
    }
}
puts stderr ""

proc fig {path test n key} {median $::results($path,$test,$n,$key)}
proc failed {test n} {
    tcl::mathop::+ {*}$::results(linux,$test,$n,failed) {*}$::results(portable,$test,$n,failed)
}
puts "Throughput (requests/s, medians; cs: context switches per request over every thread of the server)"
puts [format "%7s %11s %11s %10s %9s %9s %7s" workers linux-req/s port-req/s port/linux cs-linux cs-port failed]
foreach n $opt(-workers) {
    set linux [fig linux load $n rps]
    set port [fig portable load $n rps]
    puts [format "%7s %11.0f %11.0f %9.2fx %9.2f %9.2f %7d" $n $linux $port [expr {$port / $linux}] \
        [fig linux load $n cs] [fig portable load $n cs] [failed load $n]]
}
puts ""
lassign $herdWorkers few many
puts "Herd test: one request at a time, context switches per request with $many idle workers against $few"
puts [format "%-9s %9s %9s %11s %9s" path cs-$few cs-$many "$many/$few" req/s-$many]
foreach path {linux portable} {
    set one [fig $path herd $few cs]
    set all [fig $path herd $many cs]
    puts [format "%-9s %9.2f %9.2f %10.2fx %9.0f" $path $one $all [expr {$all / $one}] [fig $path herd $many rps]]
}
