# soak.tcl --
#
#	The steady-state check behind `make soak`: many connections through a
#	socketserver HTTP server, its workers forked by hand (-server
#	socketserver) or by ::socketserver::pool (-server pool), sampling the
#	descriptor count (/proc/PID/fd) and RSS of the accepting process and of
#	every worker as it goes. Figures must stay flat. With -maxconnections
#	the pool recycles its workers as it goes: then the accepting process
#	alone is compared, over thousands of workers' lives. Traffic goes to
#	127.0.0.1 only, bounded by a count and a time limit.
#
#	Usage: tclsh bench/soak.tcl ?-server socketserver|pool? ?-connections N?
#	                            ?-workers W? ?-seconds S? ?-maxconnections N?
#	Exits 1 if a descriptor count changed or a process grew more than
#	-maxGrowthKb.

package require Tclx

set here [file dirname [file normalize [info script]]]
array set opt {-server socketserver -connections 100000 -workers 4 -seconds 600 -checkpoints 10 -maxGrowthKb 256 -maxconnections 0}
foreach {name value} $argv {
    if {![info exists opt($name)]} {
        puts stderr "unknown option $name: must be one of [lsort [array names opt]]"
        exit 2
    }
    set opt($name) $value
}

proc readProc {path} {
    if {[catch {open $path} f]} {return {}}
    try {read $f} finally {close $f}
}
proc fds {pid} {llength [glob -nocomplain -directory /proc/$pid/fd *]}
proc rssKb {pid} {
    if {[regexp -line {^VmRSS:\s+(\d+)} [readProc /proc/$pid/status] -> kb]} {return $kb}
    return 0
}

set pipe [open |[list [info nameofexecutable] [file join $here server.tcl] $opt(-server) $opt(-workers) 0 1 $opt(-maxconnections)] r]
regexp {^port (\d+) pids (.*)$} [gets $pipe] -> port pids
set parent [lindex $pids 0]
set workers [lrange $pids 1 end]
# Recycled workers come and go: follow the accepting process only.
if {$opt(-maxconnections) > 0} {
    set pids [list $parent]
}

# Warm up, so that caches and Tcl's allocator reach their working size.
exec ab -q -r -n 2000 -c 8 http://127.0.0.1:$port/ >/dev/null 2>@1

proc sample {} {
    set row {}
    foreach pid $::pids {lappend row [fds $pid] [rssKb $pid]}
    return $row
}

set start [clock seconds]
set chunk [expr {max(1, $opt(-connections) / $opt(-checkpoints))}]
set done 0
set failed 0
set samples [list [list 0 [sample]]]
puts "soak: $opt(-server), $opt(-connections) connections to port $port, accepting pid $parent, workers $workers\
      [expr {$opt(-maxconnections) ? "(recycled after $opt(-maxconnections) connections)" : ""}]"
puts [format "%10s  %s" connections "fds/RSS(kB) of accepting, then each worker"]
puts [format "%10d  %s" 0 [lindex $samples 0 1]]
while {$done < $opt(-connections) && [clock seconds] - $start < $opt(-seconds)} {
    set out [exec ab -r -n $chunk -c 8 http://127.0.0.1:$port/ 2>@1]
    regexp {Failed requests:\s+(\d+)} $out -> f
    incr failed $f
    incr done $chunk
    set row [sample]
    lappend samples [list $done $row]
    puts [format "%10d  %s" $done $row]
}
kill TERM [pid $pipe]
catch {close $pipe}

# Compare the last sample with the first.
set first [lindex $samples 0 1]
set last [lindex $samples end 1]
set problems {}
foreach pid $pids {fdsA rssA} $first {fdsB rssB} $last {
    if {$fdsA != $fdsB} {lappend problems "pid $pid descriptors $fdsA -> $fdsB"}
    if {$rssB - $rssA > $opt(-maxGrowthKb)} {
        lappend problems "[expr {$pid == $parent ? "accepting process" : "worker"}] $pid RSS grew [expr {$rssB - $rssA}] kB"
    }
}
set perConn [expr {$done ? ([tcl::mathop::+ {*}[lmap {f r} [lrange $last 2 end] {set r}]] - [tcl::mathop::+ {*}[lmap {f r} [lrange $first 2 end] {set r}]]) * 1024.0 / $done : 0}]
puts "served $done connections in [expr {[clock seconds] - $start}] s, $failed failed;\
      worker RSS change [format %.3f $perConn] bytes per connection"
if {[llength $problems] || $failed} {
    puts "soak FAILED: [join $problems {; }]"
    exit 1
}
puts "soak passed: descriptor counts flat, RSS flat"
