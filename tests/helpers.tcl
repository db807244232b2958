# helpers.tcl --
#
#	Shared by every test file: loads the package, forks real worker
#	processes, talks to them over 127.0.0.1, and bounds every wait with a
#	watchdog so that no test can hang.

package require tcltest 2.5
namespace import -force ::tcltest::*
package require socketserver

# fork, wait and kill are TclX's where TclX exists (Tcl 8.6: what scripts
# written for 1.1.3 use). Tcl 9 has no TclX: the package's own fork and
# wait, which give the same results, and the kill program. Tests of TclX
# itself (its fork, its signal trap, the example that uses it) need the
# constraint tclx. (Debian's TclX 8.4 would let Tcl 9 load its Tcl 8
# library, which crashes: it is not even tried there.)
testConstraint tclx [expr {[package vsatisfies [info tclversion] 8]
                           && ![catch {package require Tclx}]}]
if {![testConstraint tclx]} {
    interp alias {} fork {} ::socketserver::fork
    interp alias {} wait {} ::socketserver::wait
    proc kill {signal pids} {
        exec kill -[string map {SIG {}} $signal] {*}$pids
    }
}

# Every wait in the suite is bounded by this many milliseconds.
variable ::watchdogMs [expr {[info exists ::env(SOCKETSERVER_WATCHDOG_MS)] ? $::env(SOCKETSERVER_WATCHDOG_MS) : 8000}]

testConstraint ipv6 [expr {![catch {close [socket -server {apply {args {}}} -myaddr ::1 0]}]}]
# Under `make memcheck` memory figures are valgrind's, not ours.
testConstraint notMemcheck [expr {![info exists ::env(SOCKETSERVER_MEMCHECK)]}]
testConstraint thread [expr {![catch {package require Thread}]}]
testConstraint ab [expr {[auto_execok ab] ne ""}]
# Linux's waiting (EPOLLEXCLUSIVE), not the portable path's waiting turn
# (make test-portable): a worker stopped while it holds the turn stalls
# the port there, as Apache's accept mutex does (README, "Platforms").
testConstraint exclusiveWakeup [expr {![info exists ::env(SOCKETSERVER_PORTABLE)]}]

set ::workers {}

# A pipe whose write end only this process keeps: the workers it forks
# see its end of file when it is gone.
lassign [chan pipe] ::testAliveRead ::testAliveWrite

# forkWorker script --
#	Forks a worker process that evaluates $script at global level and then
#	serves events until killed. The worker exits by itself once the test
#	process is gone, so a failing test leaves no process behind. (Not
#	after a fixed time: a test of several requests on a loaded machine
#	outlasted the 16 s its workers were given, and its last request
#	found none.)
proc forkWorker {script} {
    flush stdout
    flush stderr
    set pid [fork]
    if {$pid == 0} {
        close $::testAliveWrite
        fileevent $::testAliveRead readable {exit 3}
        # A test that closes its port while a worker still waits is not an
        # error worth printing: anything on stderr fails the test file.
        interp bgerror {} {apply {{msg opts} {
            if {[lrange [dict get $opts -errorcode] 0 1] ne {SOCKETSERVER CLOSED}} {
                puts stderr "worker [pid]: $msg"
            }
        }}}
        if {[catch {uplevel #0 $script} err]} {
            puts stderr "worker [pid]: $err"
            exit 2
        }
        vwait ::forever
        exit 0
    }
    lappend ::workers $pid
    return $pid
}

# reapWorkers --
#	Kills and waits for every worker this test forked.
proc reapWorkers {} {
    foreach pid $::workers {
        catch {kill KILL $pid}
        catch {wait $pid}
    }
    set ::workers {}
}

# The script most workers run: an echo server that answers each line with
# "PID line" and registers again after each connection.
set ::echoWorker {
    proc echoLine {chan} {
        if {[gets $chan line] >= 0} {
            puts $chan "[pid] $line"
            flush $chan
        } elseif {[eof $chan]} {
            close $chan
        }
    }
    proc echoAccept {port chan addr peerPort} {
        fconfigure $chan -buffering line -blocking 0
        fileevent $chan readable [list echoLine $chan]
        ::socketserver::socket client -port $port [list echoAccept $port]
    }
}

# startEchoWorkers port count --
#	Forks $count echo workers for $port and returns their pids.
proc startEchoWorkers {port count} {
    set pids {}
    for {set i 0} {$i < $count} {incr i} {
        lappend pids [forkWorker "$::echoWorker
            ::socketserver::socket client -port $port \[list echoAccept $port\]"]
    }
    return $pids
}

# readLine chan ?timeout? --
#	Reads one line without blocking forever. Returns the line, or raises
#	an error "no reply: eof" / "no reply: timeout".
proc readLine {chan {timeout {}}} {
    if {$timeout eq {}} {set timeout $::watchdogMs}
    fconfigure $chan -blocking 0 -buffering line
    set var ::readLine[incr ::readLineSeq]
    set $var {}
    fileevent $chan readable [list apply {{chan var} {
        if {[gets $chan line] >= 0} {
            set $var [list ok $line]
        } elseif {[eof $chan]} {
            set $var {eof {}}
        }
    }} $chan $var]
    set timer [after $timeout [list set $var {timeout {}}]]
    vwait $var
    after cancel $timer
    fileevent $chan readable {}
    lassign [set $var] status line
    unset $var
    if {$status ne "ok"} {
        return -code error "no reply: $status"
    }
    return $line
}

# ask port text ?host? --
#	Connects, sends one line, returns the one-line reply.
proc ask {port text {host 127.0.0.1}} {
    set chan [socket $host $port]
    try {
        fconfigure $chan -buffering line
        puts $chan $text
        return [readLine $chan]
    } finally {
        close $chan
    }
}

# waitFor condition ?timeout? --
#	Runs the event loop until $condition (an expression evaluated at global
#	level) is true; returns 1, or 0 when the watchdog fires first.
proc waitFor {condition {timeout {}}} {
    if {$timeout eq {}} {set timeout $::watchdogMs}
    set deadline [expr {[clock milliseconds] + $timeout}]
    while {![uplevel #0 [list expr $condition]]} {
        if {[clock milliseconds] > $deadline} {return 0}
        set ::waitForTick 0
        after 10 {set ::waitForTick 1}
        vwait ::waitForTick
    }
    return 1
}

# openFds ?pid? --
#	The number of descriptors open in a process.
proc openFds {{pid {}}} {
    if {$pid eq {}} {set pid [pid]}
    llength [glob -nocomplain -directory /proc/$pid/fd *]
}

# settledFds ?pid? --
#	The number of descriptors open in a process once it has stopped
#	changing (sockets being closed by another thread or process take a
#	moment); a leak never settles back, so tests compare settled counts.
proc settledFds {{pid {}}} {
    set last [openFds $pid]
    for {set i 0} {$i < 40} {incr i} {
        after 50
        set now [openFds $pid]
        if {$now == $last} {return $now}
        set last $now
    }
    return $last
}

# fdsGrowth before ?pid? --
#	How many descriptors a process holds beyond $before, counted once it
#	is back to $before (or below: a baseline taken while one was still on
#	its way out) or the watchdog fires. Sockets closed by another thread
#	or process take a moment, longer on a loaded machine than two equal
#	reads 50 ms apart can tell (settledFds); a leak never comes back, so it
#	still shows, after the watchdog.
proc fdsGrowth {before {pid {}}} {
    waitFor "\[openFds [list $pid]\] <= $before"
    expr {max(0, [openFds $pid] - $before)}
}

# freshTclsh script --
#	Runs $script in a new tclsh that has the package on its path and
#	returns {exitcode output}. A crash gives a non-zero exit code.
proc freshTclsh {script} {
    set file [makeFile $script fresh[incr ::freshSeq].tcl]
    set code [catch {exec [info nameofexecutable] $file 2>@1} output opts]
    set status 0
    if {$code} {
        set status [lindex [dict get $opts -errorcode] end]
        if {[lindex [dict get $opts -errorcode] 0] eq "CHILDKILLED"} {
            set status "killed by [lindex [dict get $opts -errorcode] 2]"
        }
    }
    removeFile $file
    return [list $status $output]
}

# alive pid --
#	Whether a process runs (a zombie waiting to be reaped does not count).
proc alive {pid} {
    if {[catch {
        set f [open /proc/$pid/stat]
        try {read $f} finally {close $f}
    } stat]} {
        return 0
    }
    expr {[lindex [regexp -inline {\) (\S)} $stat] 1] ni {Z X}}
}

# freePort --
#	A port free on 127.0.0.1 a moment ago, for tests that need a fixed
#	port (another process, or a later generation, must find it again).
#	Below the ephemeral range (where port 0 binds): a connect to a port in
#	that range on which nothing listens yet may be given that same port as
#	its source and connect to itself, so a test asking "does the server
#	listen yet?" was answered by its own socket (faults-9.5 counted the
#	refusals that followed as lost connections).
proc freePort {} {
    set low 32768
    catch {
        set f [open /proc/sys/net/ipv4/ip_local_port_range]
        set low [lindex [read $f] 0]
        close $f
    }
    for {set i 0} {$i < 1000 && $low > 11024} {incr i} {
        set port [expr {10000 + int(rand() * ($low - 11024))}]
        if {![catch {socket -server {apply {args {}}} -myaddr 127.0.0.1 $port} probe]} {
            close $probe
            return $port
        }
    }
    set probe [socket -server {apply {args {}}} -myaddr 127.0.0.1 0]
    set port [lindex [fconfigure $probe -sockname] 2]
    close $probe
    return $port
}

# connectFrom source host port --
#	A client socket from address $source to $host:$port, and its own
#	port, chosen here (-myport) below the ephemeral range. Asking the
#	socket instead (fconfigure -sockname) also looks its address up by
#	name: 127.0.0.10 and the like are in no hosts file, and a resolver
#	that drops a burst of reverse look-ups (this machine's, with four such
#	tests at once) held the caller for its 5 s timeout, long enough for
#	HAProxy's own client timeout (5 s) to close the connection before the
#	request was sent (haproxy-1.1: "no reply: eof", tcplog "cD").
proc connectFrom {source host port} {
    set low 32768
    catch {
        set f [open /proc/sys/net/ipv4/ip_local_port_range]
        set low [lindex [read $f] 0]
        close $f
    }
    for {set i 0} {$i < 100} {incr i} {
        set mine [expr {10000 + int(rand() * ($low - 11024))}]
        if {![catch {socket -myaddr $source -myport $mine $host $port} chan]} {
            return [list $chan $mine]
        }
    }
    return -code error $chan
}

# abStart url ?option ...? --
#	Starts ab in the background, sending requests to $url until abStop
#	(and for 120 s at most, so that nothing is left running). A test that
#	asks "does nothing fail while X happens?" stops the load once X is
#	over: a fixed request count could be done before X on a fast machine,
#	or X could outlast it on a slow one. Returns a handle for abStop.
proc abStart {url args} {
    set out [makeFile {} ab-[incr ::abSeq].out]
    # -t first: it sets a count of its own, which -n then raises.
    set ab [exec ab -q -r -s 5 -t 120 -n 100000000 {*}$args $url > $out 2>@1 &]
    return [list $ab $out]
}

# abStop handle --
#	Ends the load of abStart as ab's own Ctrl-C does (SIGINT: ab prints
#	its report of the requests completed so far and exits) and returns a
#	dict: alive (whether ab was still sending when stopped), complete,
#	failed, non2xx, resets (whether the report names a reset or refused
#	connection) and report.
proc abStop {handle} {
    lassign $handle ab out
    set alive [alive $ab]
    catch {exec kill -INT $ab}
    if {![waitFor "!\[alive $ab\]"]} {catch {exec kill -KILL $ab}}
    catch {wait $ab}
    set f [open $out]
    set report [read $f]
    close $f
    removeFile $out
    set complete [set failed ?]
    set non2xx 0
    regexp {Complete requests:\s+(\d+)} $report -> complete
    regexp {Failed requests:\s+(\d+)} $report -> failed
    regexp {Non-2xx responses:\s+(\d+)} $report -> non2xx
    if {$complete eq "?"} {puts stderr "ab said: $report"}
    dict create alive $alive complete $complete failed $failed non2xx $non2xx \
        resets [regexp -nocase {reset|refused} $report] report $report
}
