# socketserver.tcl --
#
#	Tcl-side part of the socketserver package, sourced by pkgIndex.tcl
#	after the shared library has created ::socketserver::socket.

namespace eval ::socketserver {
    # The library exports the command already; say it here too, so a reader
    # of the Tcl side sees what the package offers.
    namespace export socket

    # Where this file was loaded from (examples and tools use it to find
    # their way around an installed package).
    variable library [file dirname [file normalize [info script]]]
}
