/*
 * Tcl_InitStubs is a macro, so it cannot be called from Rust directly.
 * This is the only C in the extension: it fills in tclStubsPtr, through
 * which every other Tcl call is made.
 */
#include <tcl.h>

int socketserver_init_stubs(Tcl_Interp *interp)
{
    /* "8.6" or "9.0": the version of the headers this is built with. */
    return Tcl_InitStubs(interp, TCL_VERSION, 0) != NULL;
}
