//! The safe layer over the Tcl C API.
//!
//! This is the only module that calls into Tcl. Every call goes through the
//! stubs table (`tclStubsPtr`), which `Socketserver_Init` fills in before
//! anything else runs, so the library never links libtcl itself.
//!
//! Everything here is tied to the thread that owns the interpreter: `Obj`
//! and `Interp` are neither `Send` nor `Sync`.
//!
//! One file per thing wrapped: `obj` (values), `interp` (interpreters,
//! commands, evaluation), `channel` (channels), `events` (the event queue,
//! file handlers, timers, async handlers, exit handlers), `script_call`
//! (a handler's script, which may end its thread); this file holds
//! what they share (the stubs table, sizes, errors).

use std::ffi::{c_int, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

pub use tcl_sys::{Tcl_Event, Tcl_Interp, Tcl_Obj, Tcl_ThreadId};

/// Tcl's type for lengths and counts: `int` in Tcl 8.6, `Tcl_Size` (a
/// `ptrdiff_t`) in Tcl 9. The only place that knows which Tcl this is
/// built for (`cfg(tcl9)`, set by build.rs from the headers).
#[cfg(tcl9)]
pub type Size = tcl_sys::Tcl_Size;
#[cfg(not(tcl9))]
pub type Size = c_int;

/// Whether a forked child would share its parent's event notifier unless
/// it is given one of its own (`notifier_fork`): Tcl 9's on Linux is an
/// epoll instance per thread, with no fork handler; Tcl 8.6's (select and
/// a notifier thread) renews itself in the child.
pub const NOTIFIER_SHARED_ACROSS_FORK: bool = cfg!(tcl9);

pub const TCL_OK: c_int = tcl_sys::TCL_OK as c_int;
pub const TCL_ERROR: c_int = tcl_sys::TCL_ERROR as c_int;
pub const TCL_FILE_EVENTS: c_int = tcl_sys::TCL_FILE_EVENTS as c_int;
pub const TCL_READABLE: c_int = tcl_sys::TCL_READABLE as c_int;
const TCL_WRITABLE: c_int = tcl_sys::TCL_WRITABLE as c_int;

/// Looks up a function in Tcl's stubs table. Use only inside `unsafe`.
macro_rules! stub {
    ($name:ident) => {
        (*tcl_sys::tclStubsPtr).$name.expect(concat!("Tcl stubs table has no ", stringify!($name)))
    };
}

mod channel;
mod events;
mod interp;
mod obj;
mod script_call;

pub use channel::Channel;
pub use events::*;
pub use interp::Interp;
pub use obj::{NameTable, Obj};
pub use script_call::{rust_part, Evaluated, ScriptCall};

extern "C" {
    /// `Tcl_InitStubs(interp, "8.6", 0) != NULL`, from `src/stubs_shim.c`.
    fn socketserver_init_stubs(interp: *mut Tcl_Interp) -> c_int;
}

/// Fills in the stubs table from `interp`; returns false (with the
/// interpreter's result set by Tcl) when this Tcl cannot host the extension.
///
/// # Safety
/// `interp` must be a live interpreter, on the thread that owns it.
pub unsafe fn init_stubs(interp: *mut Tcl_Interp) -> bool {
    // SAFETY: the caller passes a live interpreter; the shim only reads it.
    unsafe { socketserver_init_stubs(interp) != 0 }
}

/// A Tcl error on its way to the interpreter.
#[derive(Debug)]
pub enum TclError {
    /// Tcl has already set the result and `-errorcode` (for example
    /// `Tcl_GetIntFromObj` or `Tcl_WrongNumArgs`).
    AlreadySet,
    /// A message and an `-errorcode` list to set.
    Message { message: String, code: Vec<String> },
}

impl TclError {
    pub fn new(message: impl Into<String>, code: &[&str]) -> Self {
        TclError::Message { message: message.into(), code: code.iter().map(|s| s.to_string()).collect() }
    }
}

impl TclError {
    /// A failed system call, worded as `Tcl_PosixError` words it:
    /// `couldn't open socket: address already in use`, with the
    /// `-errorcode` `POSIX EADDRINUSE {address already in use}`.
    pub fn posix(context: &str, errno: i32) -> TclError {
        let (message, name) = posix_error_words(errno);
        TclError::new(format!("{context}: {message}"), &["POSIX", &name, &message])
    }
}

pub type TclResult<T> = Result<T, TclError>;

/// The core's wording of an errno value (`address already in use`) and its
/// symbolic name (`EADDRINUSE`), as `Tcl_PosixError` reports them.
pub fn posix_error_words(errno: i32) -> (String, String) {
    // SAFETY: both calls return pointers to static strings in Tcl.
    unsafe {
        let message = CStr::from_ptr(stub!(tcl_ErrnoMsg)(errno)).to_string_lossy().into_owned();
        let name = format!("{:?}", nix::errno::Errno::from_raw(errno));
        (message, name)
    }
}

/// Tcl's `string match`: whether `text` matches the glob `pattern`.
pub fn string_match(pattern: &str, text: &str) -> bool {
    let (Ok(pattern), Ok(text)) = (CString::new(pattern), CString::new(text)) else { return false };
    // SAFETY: both are NUL-terminated strings that live across the call.
    unsafe { stub!(tcl_StringCaseMatch)(text.as_ptr(), pattern.as_ptr(), 0) != 0 }
}

/// Runs a command body: a `TclError` or a panic becomes a Tcl error in
/// `interp`; a panic never unwinds into Tcl.
pub fn run_command(interp: Interp, body: impl FnOnce() -> TclResult<Obj>) -> c_int {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(result)) => {
            interp.set_result(&result);
            TCL_OK
        }
        Ok(Err(error)) => {
            interp.set_error(error);
            TCL_ERROR
        }
        Err(panic) => {
            interp.set_error(panic_error(panic));
            TCL_ERROR
        }
    }
}

pub fn panic_error(panic: Box<dyn std::any::Any + Send>) -> TclError {
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    TclError::new(format!("socketserver: internal error: {what}"), &["SOCKETSERVER", "PANIC"])
}
