#!/usr/bin/env tclsh
# https_prefork.tcl --
#
#	A pre-forked HTTPS responder: a pool of workers, each wrapping the
#	channel it receives in TLS with tcltls (tls::import) and doing the
#	handshake itself, in the worker, never in the accepting process. A
#	client that does not speak TLS is closed and the worker serves on; one
#	that stalls the handshake is cut off after 10 seconds.
#
#	Usage: tclsh https_prefork.tcl ?port? ?workers? ?certdir?
#	    defaults: 8443 4 $TMPDIR/socketserver-https-cert (/tmp when TMPDIR
#	    is unset); 0 picks a free port.
#	    certdir holds cert.pem and key.pem; when they are missing, a
#	    self-signed certificate for localhost and 127.0.0.1 is made there
#	    with openssl.
#
#	Try it: curl --cacert /tmp/socketserver-https-cert/cert.pem https://127.0.0.1:8443/
#	(the server prints the command with its certificate's path).

package require socketserver
package require tls

set tmp [expr {[info exists ::env(TMPDIR)] ? $::env(TMPDIR) : "/tmp"}]
lassign [concat $argv [lrange [list 8443 4 [file join $tmp socketserver-https-cert]] $argc end]] port workers certdir

set cert [file join $certdir cert.pem]
set key [file join $certdir key.pem]
if {![file exists $cert] || ![file exists $key]} {
    file mkdir $certdir
    exec openssl req -x509 -newkey rsa:2048 -nodes -days 365 -subj /CN=localhost \
        -addext subjectAltName=DNS:localhost,IP:127.0.0.1 \
        -keyout $key -out $cert 2>@1
}

proc handle_request {chan addr port} {
    if {[catch {serve $chan} message]} {
        # Not TLS, or it broke off: close it, and serve the next.
        catch {close $chan}
    }
}

proc serve {chan} {
    tls::import $chan -server 1 -certfile $::cert -keyfile $::key
    fconfigure $chan -translation crlf -buffering full -blocking 1
    tls::handshake $chan
    set request [gets $chan]
    while {[gets $chan header] > 0} {}
    # The protocol in use: tcltls 1.7 calls it version, 1.8 protocol.
    set status [tls::status $chan]
    set protocol [expr {[dict exists $status protocol] ? [dict get $status protocol] : [dict get $status version]}]
    set body "ok from worker [pid] over $protocol\n"
    puts $chan "HTTP/1.1 200 OK"
    puts $chan "Content-Type: text/plain"
    puts $chan "Content-Length: [string length $body]"
    puts $chan "Connection: close"
    puts $chan ""
    fconfigure $chan -translation binary
    puts -nonewline $chan $body
    close $chan
}

set port [::socketserver::pool create -workers $workers -timeout 10 $port handle_request]

puts "https on port $port with $workers workers: [dict keys [dict get [::socketserver::pool info $port] workers]]"
puts "try: curl --cacert $cert https://127.0.0.1:$port/"
flush stdout
::socketserver::pool wait
