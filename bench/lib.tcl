# lib.tcl --
#
#	What the benchmark scripts share: the native baseline's build, starting
#	and stopping the servers of bench/server.tcl, running ab, and reading
#	/proc, and their options. Sourced by run.tcl, pool.tcl and tcl9.tcl,
#	which set ::here and ::top first, then call parseOptions (-abs: ab
#	processes side by side).

# parseOptions defaults quick --
#	Fills the ::opt array: the load every benchmark shares, then the
#	script's $defaults, then (when ::argv has -quick) fewer repetitions
#	and requests and the script's $quick, then the -option value pairs of
#	::argv; exits with a usage message on anything else.
proc parseOptions {defaults quick} {
    array set ::opt {-reps 5 -requests 20000 -concurrency 16 -abs 2}
    array set ::opt $defaults
    set args $::argv
    if {"-quick" in $args} {
        array set ::opt {-reps 3 -requests 6000}
        array set ::opt $quick
        set args [lsearch -all -inline -not -exact $args -quick]
    }
    if {[llength $args] % 2} {
        puts stderr "usage: tclsh [file tail $::argv0] ?-quick? ?-option value ...?"
        exit 2
    }
    foreach {name value} $args {
        if {![info exists ::opt($name)]} {
            puts stderr "unknown option $name: must be one of [lsort [array names ::opt]] or -quick"
            exit 2
        }
        set ::opt($name) $value
    }
}

# --- the native baseline ------------------------------------------------

set native [file join $top build bench native_prefork]
file mkdir [file dirname $native]
if {![file exists $native] || [file mtime $native] < [file mtime [file join $here native_prefork.c]]} {
    exec cc -O2 -Wall -o $native [file join $here native_prefork.c]
}

# --- servers ------------------------------------------------------------

# The tclsh that runs the Tcl servers (bench/tcl9.tcl switches it).
set ::serverTclsh [info nameofexecutable]

# startServer kind workers slowPercent ?concurrency? --
#	kind: socketserver (forked by hand), pool, poolevent (an event-driven
#	handler, -concurrency), tcl, native (shared accept) or reuseport.
#	Returns a dict: pipe, port, pids (every process of the server).
proc startServer {kind workers slow {concurrency 1}} {
    switch -- $kind {
        socketserver - tcl - pool - poolevent - poolproxy - pooluser - poolproxyfrom - poolmetrics - poolmaxrss {
            set command [list $::serverTclsh [file join $::here server.tcl] $kind $workers $slow $concurrency]
        }
        native {set command [list $::native 0 $workers shared $slow]}
        reuseport {set command [list $::native 0 $workers reuseport $slow]}
    }
    set pipe [open |$command r]
    set line [gets $pipe]
    if {![regexp {^port (\d+) pids(.*)$} $line -> port pids]} {
        error "server $kind did not start: $line"
    }
    set pids [lsort -unique [concat [pid $pipe] $pids]]
    # Warm up: every worker registered and paged in.
    exec ab -q -r -n [expr {max(200, 20 * $workers)}] -c 4 http://127.0.0.1:$port/ >/dev/null 2>@1
    return [dict create pipe $pipe port $port pids $pids kind $kind]
}

proc stopServer {server} {
    set pid [pid [dict get $server pipe]]
    kill TERM $pid
    catch {close [dict get $server pipe]}
}

# --- HAProxy in front of servers ------------------------------------------

proc freePort {} {
    set probe [socket -server {apply {args {}}} -myaddr 127.0.0.1 0]
    set port [lindex [fconfigure $probe -sockname] 2]
    close $probe
    return $port
}

# startHaproxy name backends --
#	HAProxy in TCP mode on 127.0.0.1: for each {label port options} of
#	$backends (options: e.g. send-proxy-v2), a frontend on a free port in
#	front of the server on $port. Returns a dict: pipe, config, and fronts
#	(label -> the frontend's port). stopHaproxy ends it.
proc startHaproxy {name backends} {
    set text "global\n    maxconn 1000\ndefaults\n    mode tcp\n    timeout connect 2s\n"
    append text "    timeout client 10s\n    timeout server 10s\n"
    set fronts {}
    foreach {label port options} [concat {*}$backends] {
        set front [freePort]
        dict set fronts $label $front
        append text "frontend $label\n    bind 127.0.0.1:$front\n    default_backend $label\n"
        append text "backend $label\n    server s 127.0.0.1:$port $options\n"
    }
    set config [file join [file dirname $::native] haproxy-$name.cfg]
    set f [open $config w]
    puts -nonewline $f $text
    close $f
    set pipe [open |[list haproxy -db -f $config 2>@1] r]
    after 300
    return [dict create pipe $pipe config $config fronts $fronts]
}

proc stopHaproxy {haproxy} {
    kill TERM [pid [dict get $haproxy pipe]]
    catch {close [dict get $haproxy pipe]}
    file delete [dict get $haproxy config]
}

# --- measurements -------------------------------------------------------

# measure kind workers --
#	One measurement of one configuration: requests/s, failures and
#	latencies (runLoad), context switches per request over every thread
#	of the server (cs) and the accepting process's CPU per connection in
#	microseconds (acc).
proc measure {kind workers {requests {}} {concurrency {}}} {
    if {$requests eq {}} {set requests $::opt(-requests)}
    if {$concurrency eq {}} {set concurrency $::opt(-concurrency)}
    set server [startServer $kind $workers 0]
    try {
        set pids [dict get $server pids]
        set accepting [pid [dict get $server pipe]]
        set before [contextSwitches $pids]
        set cpuBefore [cpuNs $accepting]
        set load [runLoad [dict get $server port] $requests $concurrency]
        set cpuAfter [cpuNs $accepting]
        set after [contextSwitches $pids]
        dict set load cs [expr {double($after - $before) / max(1, [dict get $load complete])}]
        # The accepting process's CPU per connection, in microseconds (for
        # native servers every process accepts: the figure is one of them).
        dict set load acc [expr {($cpuAfter - $cpuBefore) / 1000.0 / max(1, [dict get $load complete])}]
        return $load
    } finally {
        stopServer $server
    }
}

proc readProc {path} {
    if {[catch {open $path} f]} {return {}}
    try {read $f} finally {close $f}
}

# Context switches (voluntary and not) over every thread of $pids.
proc contextSwitches {pids} {
    set total 0
    foreach pid $pids {
        foreach status [glob -nocomplain /proc/$pid/task/*/status] {
            foreach {- value} [regexp -all -inline -line {ctxt_switches:\s+(\d+)} [readProc $status]] {
                incr total $value
            }
        }
    }
    return $total
}

# CPU nanoseconds so far of every thread of a process (schedstat).
proc cpuNs {pid} {
    set total 0
    foreach stat [glob -nocomplain /proc/$pid/task/*/schedstat] {
        incr total [lindex [readProc $stat] 0]
    }
    return $total
}

proc rssKb {pid} {
    if {[regexp -line {^VmRSS:\s+(\d+)} [readProc /proc/$pid/status] -> kb]} {return $kb}
    return 0
}

# runLoad port requests concurrency ?perRequest? ?path? --
#	Runs -abs ab processes side by side, each with its share of the
#	requests and of the concurrency, against http://127.0.0.1:PORT/PATH.
#	Returns a dict of the totals; with perRequest, exact percentiles and
#	the share of requests of 50 ms or more (late) from every request's time.
proc runLoad {port requests concurrency {perRequest 0} {path /}} {
    set count $::opt(-abs)
    set pipes {}
    set files {}
    set started [clock microseconds]
    for {set i 0} {$i < $count} {incr i} {
        set extra {}
        if {$perRequest} {
            set file [file join [file dirname $::native] timings-[pid]-$i.tsv]
            lappend files $file
            set extra [list -g $file]
        }
        lappend pipes [open |[list ab -r {*}$extra -n [expr {$requests / $count}] \
            -c [expr {max(1, $concurrency / $count)}] http://127.0.0.1:$port$path 2>@1] r]
    }
    # Read in the event loop, so that timers set by the caller (signals to
    # the server during the load) fire while it runs.
    set ::loadOpen [llength $pipes]
    foreach pipe $pipes {
        set ::loadOutput($pipe) {}
        fconfigure $pipe -blocking 0
        fileevent $pipe readable [list collectLoad $pipe]
    }
    while {$::loadOpen > 0} {vwait ::loadOpen}
    set outputs [lmap pipe $pipes {set ::loadOutput($pipe)}]
    set seconds [expr {([clock microseconds] - $started) / 1e6}]
    foreach pipe $pipes {
        unset ::loadOutput($pipe)
        fconfigure $pipe -blocking 1
        catch {close $pipe}
    }
    set result [dict create rps 0.0 failed 0 complete 0 mean {} p50 {} p99 {} max {}]
    foreach out $outputs {
        foreach {key pattern} {
            rps {Requests per second:\s+([\d.]+)}
            failed {Failed requests:\s+(\d+)}
            complete {Complete requests:\s+(\d+)}
            mean {Time per request:\s+([\d.]+) \[ms\] \(mean\)}
            p50 {\n\s+50%\s+(\d+)}
            p99 {\n\s+99%\s+(\d+)}
            max {\n\s+100%\s+(\d+)}
        } {
            if {![regexp $pattern $out -> value]} {
                error "ab gave no '$key':\n$out"
            }
            switch -- $key {
                rps - failed - complete {dict set result $key [expr {[dict get $result $key] + $value}]}
                default {dict lappend result $key $value}
            }
        }
    }
    # Requests per second over the wall time of the whole batch: summing
    # each ab's own figure would overstate it when one finishes early.
    dict set result rps [expr {[dict get $result complete] / $seconds}]
    # Across the ab processes: mean of means, worst of the tails.
    dict set result mean [expr {[tcl::mathop::+ {*}[dict get $result mean]] / $count}]
    dict set result p50 [median [dict get $result p50]]
    foreach key {p99 max} {
        dict set result $key [tcl::mathfunc::max {*}[dict get $result $key]]
    }
    if {$perRequest} {
        # Exact percentiles from every request's total time (ab -g).
        set times {}
        foreach file $files {
            foreach line [lrange [split [readProc $file] \n] 1 end] {
                if {[llength $line] >= 5} {lappend times [lindex $line end-1]}
            }
            file delete $file
        }
        set times [lsort -integer $times]
        set n [llength $times]
        foreach {key fraction} {p50 0.50 p99 0.99 p999 0.999} {
            dict set result $key [lindex $times [expr {min($n - 1, int(ceil($fraction * $n)) - 1)}]]
        }
        dict set result max [lindex $times end]
        # Share of requests that took 50 ms or more: the 1% that sleep, plus
        # any fast request that waited behind one of them.
        set late [expr {$n - [lsearch -bisect -integer $times 49] - 1}]
        dict set result late [expr {100.0 * $late / max(1, $n)}]
        dict set result mean [expr {double([tcl::mathop::+ {*}$times]) / max(1, $n)}]
    }
    return $result
}

proc collectLoad {pipe} {
    append ::loadOutput($pipe) [read $pipe]
    if {[eof $pipe]} {
        fileevent $pipe readable {}
        incr ::loadOpen -1
    }
}

proc median {values} {
    set sorted [lsort -real $values]
    set n [llength $sorted]
    if {$n == 0} {return 0}
    if {$n % 2} {return [lindex $sorted [expr {$n / 2}]]}
    expr {([lindex $sorted [expr {$n / 2 - 1}]] + [lindex $sorted [expr {$n / 2}]]) / 2.0}
}

proc shuffle {list} {
    set result {}
    while {[llength $list]} {
        set i [expr {int(rand() * [llength $list])}]
        lappend result [lindex $list $i]
        set list [lreplace $list $i $i]
    }
    return $result
}

