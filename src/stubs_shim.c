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

/*
 * Tcl_PushCallFrame and Tcl_PopCallFrame are in Tcl's internal stubs table
 * (slots 129 and 128, in Tcl 8.6 and 9.0 alike), whose header is private;
 * tcl.h declares Tcl_CallFrame for them. The table starts as every stubs
 * table does: a magic number, a hooks pointer, then the slots.
 */
struct socketserver_int_stubs {
    int magic;
    void *hooks;
    void *slot[130];
};

static const struct socketserver_int_stubs *int_stubs(void)
{
    return (const struct socketserver_int_stubs *) tclStubsPtr->hooks->tclIntStubs;
}

int socketserver_push_call_frame(Tcl_Interp *interp, Tcl_CallFrame *frame, Tcl_Namespace *ns)
{
    int (*push)(Tcl_Interp *, Tcl_CallFrame *, Tcl_Namespace *, int) =
        (int (*)(Tcl_Interp *, Tcl_CallFrame *, Tcl_Namespace *, int)) int_stubs()->slot[129];
    /* 0: a namespace's frame, as `namespace eval` pushes, not a proc's. */
    return push(interp, frame, ns, 0);
}

void socketserver_pop_call_frame(Tcl_Interp *interp)
{
    void (*pop)(Tcl_Interp *) = (void (*)(Tcl_Interp *)) int_stubs()->slot[128];
    pop(interp);
}
