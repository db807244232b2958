#!/usr/bin/env tclsh
# client.tcl --
#
#	A line-mode TCP client, for trying the examples on a machine without
#	nc or telnet: what you type goes to the server, what the server sends
#	comes back to your terminal, until either side closes.
#
#	Usage: tclsh client.tcl host port
#	       echo hello | tclsh client.tcl 127.0.0.1 9901

if {$argc != 2} {
    puts stderr "usage: tclsh client.tcl host port"
    exit 2
}
lassign $argv host port

set server [socket $host $port]
fconfigure $server -buffering line -blocking 0 -translation auto
fconfigure stdin -blocking 0 -buffering line

proc fromServer {} {
    if {[gets $::server line] >= 0} {
        puts $line
    } elseif {[eof $::server]} {
        set ::done 1
    }
}

proc fromUser {} {
    if {[gets stdin line] >= 0} {
        puts $::server $line
    } elseif {[eof stdin]} {
        # Nothing more to send: let the server answer, then finish.
        fileevent stdin readable {}
        chan close $::server write
    }
}

fileevent $server readable fromServer
fileevent stdin readable fromUser
vwait ::done
close $server
