# scenarios.tcl --
#
#	Small scripts that a script written for socketservertcl 1.1.3 could
#	be, each run in a fresh tclsh, each printing one line: its outcome.
#	tests/compat.test runs them under this package and checks the
#	outcome; tests/compat/run.tcl runs them under any package on a
#	TCLLIBPATH (socketservertcl 1.1.3 built from its repository, say) and
#	compares. Each scenario is one line of README's "Migrating from
#	socketservertcl 1.1.3", or one of its promises ("scripts run
#	unchanged").
#
#	Every scenario: name, the README row it checks, the outcome under
#	1.1.3 (measured with 1.1.3 built from flightaware/socketservertcl, Tcl
#	8.6.13, TclX fork), the outcome under this package, constraints, the
#	script. Where the two outcomes differ the difference is deliberate and
#	the README row says what to do. A `*` in an outcome matches anything
#	(glob), for values that change from run to run.

# The prelude of every scenario: PORT and PORT2 are free ports; a watchdog
# ends the process; `child` forks a worker (TclX's fork where Tcl 8 has
# TclX, as 1.1.3's users did; the package's own elsewhere) that ends by
# itself; `connect` retries while refused (1.1.3 binds in the background);
# `reply` is the first line the peer sends, or eof, or timeout.
set ::compatPrelude {
    set port PORT
    set port2 PORT2
    after 7000 {puts TIMEOUT; exit 0}
    package require socketserver
    if {![package vsatisfies [info tclversion] 8] || [catch {package require Tclx}]} {
        interp alias {} fork {} ::socketserver::fork
    }
    set ::kids {}
    proc child {script} {
        flush stdout
        set pid [fork]
        if {$pid == 0} {
            after 6000 {exit 0}
            # The parent's reading end is the parent's to read.
            close $::readyIn
            uplevel #0 $script
            vwait ::forever
            exit 0
        }
        lappend ::kids $pid
        return $pid
    }
    proc finish {result} {
        puts $result
        flush stdout
        foreach kid $::kids {catch {exec kill -9 $kid}}
        exit 0
    }
    proc connect {{host 127.0.0.1} {to {}}} {
        if {$to eq {}} {set to $::port}
        for {set i 0} {$i < 250} {incr i} {
            if {![catch {socket $host $to} s]} {return $s}
            after 20
        }
        return -code error $s
    }
    proc replyReadable {s} {
        if {[gets $s line] >= 0} {
            set ::reply $line
            set ::replied 1
        } elseif {[eof $s]} {
            set ::reply eof
            set ::replied 1
        }
    }
    proc reply {s {ms 4000}} {
        fconfigure $s -blocking 0 -buffering line
        set ::reply timeout
        fileevent $s readable [list replyReadable $s]
        set timer [after $ms {set ::replied 1}]
        vwait ::replied
        after cancel $timer
        catch {close $s}
        return $::reply
    }
    # Until something listens on port $p (1.1.3 binds in the background).
    proc waitListening {p} {
        for {set i 0} {$i < 250} {incr i} {
            if {[catch {socket -server {apply {args {}}} -myaddr 127.0.0.1 $p} probe]} return
            close $probe
            after 20
        }
    }
    # A worker's answer: who answered, then what it was given.
    proc answer {who chan addr peerPort} {
        puts $chan [list $who $addr]
        close $chan
    }
    # Waits until a forked child says it is ready: a line on a pipe (each
    # child closes its copy of the reading end, so only the parent reads).
    set ::ready {}
    lassign [chan pipe] ::readyIn ::readyOut
    fconfigure $::readyIn -blocking 0 -buffering line
    fconfigure $::readyOut -buffering line
    fileevent $::readyIn readable {
        if {[gets $::readyIn line] >= 0} {lappend ::ready $line}
    }
    proc waitReady {n} {
        while {[llength $::ready] < $n} {vwait ::ready}
    }
    proc sayReady {what} {
        puts $::readyOut $what
    }
    # Until every thread of process `pid` sleeps (Linux: /proc): a worker
    # that said it registered may not yet have a thread blocked in the
    # queue's wait, and the kernel passes a wakeup over a waiter that is
    # not yet waiting (README, Design: a worker on a starved CPU is passed
    # over), so an order among waiting workers is only theirs once they wait.
    proc waitAsleep {pid} {
        if {![file isdirectory /proc/$pid/task]} return
        while 1 {
            set running 0
            foreach task [glob -nocomplain /proc/$pid/task/*/stat] {
                if {[catch {open $task} f]} continue
                set stat [read $f]
                close $f
                if {[lindex [split [lindex [split $stat )] end]] 1] ni {S D}} {incr running}
            }
            if {!$running} return
            after 20
        }
    }
}

set ::compatScenarios {
    later-proc
    {a handler defined after client}
    {later 127.0.0.1} {later 127.0.0.1} {} {
        ::socketserver::socket server $port
        child {
            ::socketserver::socket client h
            proc h {chan addr p} {answer later $chan $addr $p}
        }
        finish [reply [connect]]
    }

    auto-index
    {a handler that auto_index/unknown loads}
    {autoloaded 127.0.0.1} {autoloaded 127.0.0.1} {} {
        ::socketserver::socket server $port
        child {
            set ::auto_index(h) {proc h {chan addr p} {answer autoloaded $chan $addr $p}}
            ::socketserver::socket client h
        }
        finish [reply [connect]]
    }

    script-handler
    {a handler that is a script of two commands}
    {hB 127.0.0.1 hA} {hB 127.0.0.1 hA} {} {
        ::socketserver::socket server $port
        child {
            proc hA {} {set ::a hA}
            proc hB {chan addr p} {answer [list hB $addr $::a] $chan $addr $p}
            ::socketserver::socket client "hA; hB"
        }
        finish [lindex [reply [connect]] 0]
    }

    namespace-relative
    {a handler name relative to the registering namespace, a global one of the same name existing}
    {{::app::h 127.0.0.1}} {{::app::h 127.0.0.1}} {} {
        ::socketserver::socket server $port
        child {
            proc ::h {chan addr p} {answer ::h $chan $addr $p}
            namespace eval ::app {
                proc h {chan addr p} {answer ::app::h $chan $addr $p}
                proc run {} {
                    ::socketserver::socket client h
                    vwait ::forever
                }
            }
            ::app::run
        }
        finish [list [reply [connect]]]
    }

    namespace-script
    {handlers registered from a namespace that are not one list ("h {x}", "h  x"), a global one of the same name existing}
    {{::app::h five} {::app::h two}} {{::app::h five} {::app::h two}} {} {
        ::socketserver::socket server $port
        child {
            proc ::h {tag chan addr p} {answer [list ::h $tag] $chan $addr $p}
            namespace eval ::app {
                proc h {tag chan addr p} {
                    answer [list ::app::h $tag] $chan $addr $p
                    if {$tag eq "five"} {::socketserver::socket client "h  two"}
                }
                proc run {} {
                    ::socketserver::socket client "h {five}"
                    vwait ::forever
                }
            }
            ::app::run
        }
        finish [list [lindex [reply [connect]] 0] [lindex [reply [connect]] 0]]
    }

    namespace-unknown
    {a handler that the registering namespace's namespace unknown handler supplies}
    {{loaded 127.0.0.1}} {{loaded 127.0.0.1}} {} {
        ::socketserver::socket server $port
        child {
            namespace eval ::app {
                namespace unknown ::app::load
                proc load {name args} {
                    proc ::app::$name {chan addr p} {answer loaded $chan $addr $p}
                    tailcall ::app::$name {*}$args
                }
                proc run {} {
                    ::socketserver::socket client onConnection
                    vwait ::forever
                }
            }
            ::app::run
        }
        finish [list [reply [connect]]]
    }

    client-option-word
    {client with an option word other than -port}
    {{0 0}} {{1 1}} {} {
        ::socketserver::socket server $port
        proc h args {}
        finish [list [list [catch {::socketserver::socket client -Port $port h}] [catch {::socketserver::socket client --port $port h}]]]
    }

    server-extra-word
    {server with a word after the port}
    {{TCL WRONGARGS}} {{TCL WRONGARGS}} {} {
        catch {::socketserver::socket server $port x} msg opts
        finish [list [dict get $opts -errorcode]]
    }

    port-0
    {client -port 0 is the default port}
    {{h 127.0.0.1}} {{h 127.0.0.1}} {} {
        ::socketserver::socket server $port
        child {
            proc h {chan addr p} {answer h $chan $addr $p}
            ::socketserver::socket client -port 0 h
        }
        finish [list [reply [connect]]]
    }

    child-interp-port
    {a child interpreter that opened its own port gets it from client}
    {{kid 127.0.0.1}} {{kid 127.0.0.1}} {} {
        ::socketserver::socket server $port
        interp create kid
        kid eval [list set port2 $port2]
        kid eval {
            package require socketserver
            ::socketserver::socket server $port2
        }
        # 1.1.3 listens some time after server returns: its child
        # interpreter's handler never ran for a connection made before.
        waitListening $port2
        kid eval {
            proc h {chan addr p} {puts $chan [list kid $addr]; close $chan}
            ::socketserver::socket client h
        }
        # Waited for at global level: under 1.1.3 a child interpreter's
        # handler never ran while the parent waited inside a proc.
        set s [socket 127.0.0.1 $port2]
        fconfigure $s -blocking 0 -buffering line
        fileevent $s readable {set line [gets $s]; set replied 1}
        set line timeout
        after 4000 {set replied 1}
        vwait replied
        finish [list $line]
    }

    tcp-channel
    {the channel: a TCP channel, -peername and -sockname work (README once said 1.1.3's was a plain file channel)}
    {{sock 127.0.0.1 PORT}} {{sock 127.0.0.1 PORT}} {} {
        ::socketserver::socket server $port
        child {
            proc h {chan addr p} {
                puts $chan [list [string range $chan 0 3] [lindex [fconfigure $chan -peername] 0] [lindex [fconfigure $chan -sockname] 2]]
                close $chan
            }
            ::socketserver::socket client h
        }
        finish [list [reply [connect]]]
    }

    peer-address
    {the peer address of an IPv4 client (README once said 1.1.3 could report ::ffff:127.0.0.1)}
    {127.0.0.1} {127.0.0.1} {} {
        ::socketserver::socket server $port
        child {
            proc h {chan addr p} {answer h $chan $addr $p}
            ::socketserver::socket client h
        }
        finish [lindex [reply [connect]] 1]
    }

    global-level
    {the handler runs at global level}
    {local} {global} {} {
        ::socketserver::socket server $port
        child {
            proc run {} {
                set got {}
                ::socketserver::socket client {lappend got}
                while {1} {
                    set ::tick 0
                    after 20 {set ::tick 1}
                    vwait ::tick
                    if {[llength $got]} {set chan [lindex $got 0]; set where local; break}
                    if {[info exists ::got]} {set chan [lindex $::got 0]; set where global; break}
                }
                puts $chan $where
                close $chan
            }
            run
        }
        finish [reply [connect]]
    }

    handler-error
    {a handler that fails: bgerror, and its channel is closed}
    {timeout} {eof} {} {
        ::socketserver::socket server $port
        child {
            interp bgerror {} {apply {args {}}}
            proc h {chan addr p} {error boom}
            ::socketserver::socket client h
        }
        finish [reply [connect] 4000]
    }

    accepting-exits
    {the accepting process exits while a worker waits}
    {silent} {background error: {SOCKETSERVER CLOSED}} {} {
        ::socketserver::socket server $port
        child {
            after cancel [after info]
            after 4000 {puts silent; exit 0}
            interp bgerror {} {apply {{msg opts} {
                puts [list background error: [lrange [dict get $opts -errorcode] 0 1]]
                exit 0
            }}}
            proc h {args} {}
            ::socketserver::socket client h
            sayReady worker
        }
        waitReady 1
        # The worker's line (or "silent") ends the output.
        exit 0
    }

    listening-at-return
    {server listens when it returns (1.1.3: refused in 19 of 20 runs)}
    {refused} {connected} {} {
        ::socketserver::socket server $port
        if {[catch {close [socket 127.0.0.1 $port]}]} {
            finish refused
        }
        finish connected
    }

    busy-port
    {server on a port in use}
    {*bind failed} {1 {couldn't open socket: address already in use}} {} {
        set other [socket -server {apply {args {}}} $port]
        flush stdout
        set pid [fork]
        if {$pid == 0} {
            set code [catch {::socketserver::socket server $port} msg]
            after 500
            puts [list $code $msg]
            exit 0
        }
        lappend ::kids $pid
        # In 1.1.3 the child killed itself with SIGTERM: it prints nothing.
        after 1500 {set ::done 1}
        vwait ::done
        finish {}
    }

    server-result
    {server returns the port}
    {{}} {PORT} {} {
        finish [list [::socketserver::socket server $port]]
    }

    second-server-0
    {a second server 0 opens another port}
    {{} 1} {new 2} {} {
        ::socketserver::socket server $port
        set second [::socketserver::socket server 0]
        if {$second ne {} && $second != 0 && $second != $port} {set second new}
        finish [list $second [expr {[catch {::socketserver::socket info} ports] ? 1 : [llength $ports]}]]
    }

    out-of-range
    {server 70000}
    {0} {1} {} {
        set code [catch {::socketserver::socket server 70000}]
        after 300
        finish $code
    }

    fifo
    {delivery order among waiting workers}
    {*} {{w1 w2 w3}} {} {
        ::socketserver::socket server $port
        foreach who {w1 w2 w3} {
            child [string map [list WHO $who] {
                proc h {chan addr p} {answer WHO $chan $addr $p}
                ::socketserver::socket client h
                sayReady WHO
            }]
            waitReady [llength $::kids]
            waitAsleep [lindex $::kids end]
        }
        set order {}
        foreach i {1 2 3} {lappend order [lindex [reply [connect]] 0]}
        finish [list $order]
    }

    no-busy-loop
    {a worker holding its connection, another one queued}
    {busy} {idle} {} {
        ::socketserver::socket server $port
        set pid [child {
            proc h {chan addr p} {set ::held $chan; sayReady held}
            ::socketserver::socket client h
        }]
        set first [connect]
        waitReady 1
        set second [connect]
        # Long enough for the accepting side to queue the second one (a
        # wait that only 1.1.3 needs: here the worker is idle either way).
        after 300
        proc cpu {pid} {
            set f [open /proc/$pid/stat]
            set stat [read $f]
            close $f
            set fields [split [lindex [split $stat )] 1]]
            expr {[lindex $fields 12] + [lindex $fields 13]}
        }
        set before [cpu $pid]
        after 1000
        set used [expr {[cpu $pid] - $before}]
        close $first
        close $second
        # Clock ticks of 10 ms in 1 s: a busy loop takes most of them.
        finish [expr {$used > 30 ? "busy" : "idle"}]
    }

    ipv6-client
    {an IPv6 client}
    {refused} {{h ::1}} {ipv6} {
        ::socketserver::socket server $port
        child {
            proc h {chan addr p} {answer h $chan $addr $p}
            ::socketserver::socket client h
        }
        after 300
        if {[catch {socket ::1 $port} s]} {finish refused}
        finish [list [reply $s]]
    }

    child-interp-elsewhere
    {a child interpreter registers for a port its parent opened}
    {1} {{0 {kid 127.0.0.1}}} {} {
        ::socketserver::socket server $port
        interp create kid
        set code [kid eval {
            package require socketserver
            proc h {chan addr p} {puts $chan [list kid $addr]; close $chan}
            catch {::socketserver::socket client h}
        }]
        if {$code} {finish $code}
        finish [list [list $code [reply [connect]]]]
    }

    runtime-handler
    {a handler built at run time}
    {timeout} {h2 42} {} {
        ::socketserver::socket server $port
        child {
            proc h2 {x chan addr p} {answer [list h2 $x] $chan $addr $p}
            proc register {} {::socketserver::socket client [list h2 [expr {40 + 2}]]}
            register
            # Memory the handler's old words may have been in is used again.
            for {set i 0} {$i < 1000} {incr i} {set junk($i) [string repeat x [expr {$i % 50}]]}
        }
        finish [lindex [reply [connect]] 0]
    }

    exec-child
    {the handler starts a program in the background, then closes its channel}
    {held} {eof} {} {
        ::socketserver::socket server $port
        child {
            proc h {chan addr p} {
                exec sleep 5 >/dev/null 2>/dev/null &
                close $chan
            }
            ::socketserver::socket client h
        }
        set r [reply [connect] 3000]
        finish [expr {$r eq "eof" ? "eof" : "held"}]
    }

    argument-errors
    {argument errors}
    {{{wrong # args: should be "::socketserver::socket server port | client [-port N] handlerProc"} {TCL WRONGARGS}}} {{{wrong # args: should be "::socketserver::socket server ?-option value ...? ?port?"} {TCL WRONGARGS}}} {} {
        catch {::socketserver::socket server} msg opts
        finish [list [list $msg [dict get $opts -errorcode]]]
    }

    abbreviation
    {abbreviated subcommands}
    {1} {0} {} {
        set code [catch {::socketserver::socket ser $port}]
        finish $code
    }

    package-surface
    {version, commands and namespaces}
    {{1.1.3 1 0 1 socket}} {{1.2.0 0 1 0 *}} {} {
        set v [package present socketserver]
        finish [list [list $v [namespace exists ::sockerserver] [expr {[catch {package require -exact socketserver 1.1.3}]}] [expr {[namespace eval ::socketserver {namespace export}] eq {*}}] [lsort [lmap c [info commands ::socketserver::*] {namespace tail $c}]]]]
    }

    sigurg
    {signal handlers installed by server}
    {0} {1} {} {
        ::socketserver::socket server $port
        set f [open /proc/self/status]
        set status [read $f]
        close $f
        regexp {SigCgt:\s*([0-9a-f]+)} $status -> mask
        # SIGURG is 23.
        finish [expr {(("0x$mask") >> 22) & 1}]
    }
}

# compatFreePort --
#	A port free on every address a moment ago.
proc compatFreePort {} {
    set probe [socket -server {apply {args {}}} 0]
    set port [lindex [fconfigure $probe -sockname] 2]
    close $probe
    return $port
}

# compatRun script --
#	Runs a scenario in a new tclsh (the package found through TCLLIBPATH)
#	and returns its output, the port it served written PORT. A scenario
#	whose own server found its free port taken meanwhile by another
#	process of the machine runs again on other ports.
proc compatRun {script} {
    for {set try 0} {$try < 3} {incr try} {
        set output [compatRunOnce $script]
        if {![string match "couldn't open socket: address already in use*" $output]} break
    }
    return $output
}

proc compatRunOnce {script} {
    set port [compatFreePort]
    set port2 [compatFreePort]
    while {$port2 == $port} {set port2 [compatFreePort]}
    set f [file tempfile file socketserver-compat.tcl]
    puts $f [string map [list PORT2 $port2 PORT $port] $::compatPrelude]
    puts $f $script
    close $f
    catch {exec [info nameofexecutable] $file 2>@1} output
    file delete $file
    return [string map [list $port PORT] [string trim $output]]
}

# compatMatches expected outcome --
#	Whether an outcome is the one written down (`*` matches anything);
#	tcltest's customMatch calls it with the arguments in this order.
proc compatMatches {expected outcome} {
    string match [string map {[ \\[ ] \\] \\ \\\\ ? \\?} $expected] $outcome
}
