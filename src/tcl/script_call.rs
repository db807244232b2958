//! Calling a script that may end its thread, and the namespace a handler
//! is evaluated in.
//!
//! A script can end the thread it runs on: the Thread package's
//! `thread::exit` calls `Tcl_ExitThread`, that is `pthread_exit`, which
//! glibc carries out as a forced unwind of the thread's stack, through
//! every frame between the thread's start and the script, ours included.
//! A `catch_unwind` on that path catches the unwind and glibc then aborts
//! the whole process ("FATAL: exception not rethrown"); an `extern "C"`
//! frame or call on it aborts too (Rust takes them not to unwind). Rust
//! lets a forced unwind pass a frame of the "C-unwind" (or Rust) ABI that
//! holds nothing to drop (RFC 2945).
//!
//! So a Tcl callback that runs a script works in three steps: Rust code,
//! under `catch_unwind`, prepares a `ScriptCall`, which is plain data (raw
//! pointers only); the callback, an `extern "C-unwind"` function holding
//! nothing to drop, runs it (`ScriptCall::run`), outside any
//! `catch_unwind`, through a "C-unwind" pointer to Tcl's function; what
//! follows the script (its continuation) is Rust code under `catch_unwind`
//! again, on the heap until then. When the thread ends in the script, the
//! continuation and the references the call holds are left behind with it.

use std::ffi::{c_int, c_void, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr;

use tcl_sys::{Tcl_CallFrame, Tcl_Namespace};

use super::{Interp, Obj, Tcl_Interp, Tcl_Obj, TCL_OK};

extern "C" {
    /// `Tcl_PushCallFrame(interp, frame, ns, 0)`, from `src/stubs_shim.c`.
    fn socketserver_push_call_frame(
        interp: *mut Tcl_Interp,
        frame: *mut Tcl_CallFrame,
        ns: *mut Tcl_Namespace,
    ) -> c_int;
    /// `Tcl_PopCallFrame(interp)`, from `src/stubs_shim.c`.
    fn socketserver_pop_call_frame(interp: *mut Tcl_Interp);
}

/// `Tcl_EvalObjEx` as the stubs table declares it, and as a call that a
/// forced unwind may pass.
type EvalObjExC = unsafe extern "C" fn(*mut Tcl_Interp, *mut Tcl_Obj, c_int) -> c_int;
type EvalObjEx = unsafe extern "C-unwind" fn(*mut Tcl_Interp, *mut Tcl_Obj, c_int) -> c_int;

/// What a script call came to, for its continuation.
#[derive(Clone, Copy, Debug)]
pub struct Evaluated {
    /// The script returned TCL_OK (otherwise it was reported with
    /// `Tcl_BackgroundException`).
    pub succeeded: bool,
    /// The interpreter was deleted during the script: it may be used for
    /// nothing but `Tcl_Release` (which `ScriptCall::run` does last).
    pub interp_deleted: bool,
}

/// Runs the Rust part of a Tcl callback: a panic is caught (it must never
/// unwind into Tcl) and gives `None`.
pub fn rust_part<T>(body: impl FnOnce() -> T) -> Option<T> {
    catch_unwind(AssertUnwindSafe(body)).ok()
}

/// A script prepared for a call by `ScriptCall::new`: plain data, nothing
/// to drop, so that a frame holding one can be passed by a forced unwind.
#[derive(Clone, Copy)]
pub struct ScriptCall {
    interp: *mut Tcl_Interp,
    /// The namespace to evaluate in; null for the global one.
    namespace: *mut Tcl_Namespace,
    /// One reference, held for the call (`Obj::into_raw`).
    script: *mut Tcl_Obj,
    /// The continuation (`Box::into_raw`).
    then: *mut dyn FnOnce(Evaluated),
}

impl ScriptCall {
    /// Prepares the evaluation of `script` in `interp` at global level, in
    /// namespace `namespace` (a fully qualified name; the global namespace
    /// when `None` or when no namespace has that name now), then `then`.
    /// A pure list (`Obj::new_list`) is evaluated as one command with
    /// exactly its words. The interpreter is preserved (`Tcl_Preserve`)
    /// from now until the end of `run`: a script that deletes it leaves
    /// its memory, and its associated data, valid until then.
    pub fn new(interp: Interp, script: Obj, namespace: Option<&str>, then: impl FnOnce(Evaluated) + 'static) -> Self {
        let namespace = namespace.map_or(ptr::null_mut(), |name| find_namespace(interp, name));
        // SAFETY: the interpreter is live on this thread; `run` releases it.
        unsafe { stub!(tcl_Preserve)(interp.as_ptr().cast()) };
        let then: Box<dyn FnOnce(Evaluated)> = Box::new(then);
        ScriptCall { interp: interp.as_ptr(), namespace, script: script.into_raw(), then: Box::into_raw(then) }
    }

    /// Evaluates the script, reports a failure as a background error, runs
    /// the continuation (under `catch_unwind`) and releases the interpreter,
    /// which may free it. Does not return when the script ends the thread.
    ///
    /// # Safety
    /// On the interpreter's thread, once per `ScriptCall`, with no Tcl code
    /// run since `new` (the namespace found then is still there), from a
    /// frame a forced unwind may pass: an `extern "C-unwind"` function,
    /// outside any `catch_unwind`, holding nothing to drop.
    pub unsafe fn run(self) {
        // SAFETY: the caller's contract.
        let succeeded = unsafe { self.evaluate() };
        // SAFETY: preserved since `new`, so its memory is valid.
        let interp_deleted = unsafe { stub!(tcl_InterpDeleted)(self.interp) } != 0;
        let (script, then) = (self.script, self.then);
        rust_part(move || {
            // SAFETY: `new` made both with `into_raw`; taken once, here.
            let (script, then) = unsafe { (Obj::from_owned_raw(script), Box::from_raw(then)) };
            drop(script);
            then(Evaluated { succeeded, interp_deleted });
        });
        // SAFETY: the reference `new` took; this may delete the interpreter.
        unsafe { stub!(tcl_Release)(self.interp.cast()) };
    }

    /// # Safety
    /// As `run`.
    unsafe fn evaluate(&self) -> bool {
        // SAFETY: preserved since `new`; a deleted interpreter evaluates nothing.
        if unsafe { stub!(tcl_InterpDeleted)(self.interp) } != 0 {
            return false;
        }
        // SAFETY: the same function; "C-unwind" only tells Rust that it
        // may unwind (a forced unwind), which C code does not prevent.
        let eval = unsafe { std::mem::transmute::<EvalObjExC, EvalObjEx>(stub!(tcl_EvalObjEx)) };
        // SAFETY: a zeroed frame is what Tcl_PushCallFrame fills in; it
        // stays on this stack until popped below.
        let mut frame: Tcl_CallFrame = unsafe { std::mem::zeroed() };
        // SAFETY: live interpreter and namespace, see `run`.
        let pushed = unsafe { push_frame_at_global_level(self.interp, &mut frame, self.namespace) };
        let flags = if pushed.is_some() { 0 } else { tcl_sys::TCL_EVAL_GLOBAL as c_int };
        // SAFETY: live interpreter and script (a reference is held).
        let code = unsafe { eval(self.interp, self.script, flags) };
        if let Some(caller) = pushed {
            // SAFETY: the frame pushed above, the innermost one again now.
            unsafe { pop_frame(self.interp, &mut frame, caller) };
        }
        if code != TCL_OK {
            // SAFETY: a live interpreter (preserved) with the script's result.
            unsafe { stub!(tcl_BackgroundException)(self.interp, code) };
        }
        code == TCL_OK
    }
}

/// The namespace named `name` now, or null.
fn find_namespace(interp: Interp, name: &str) -> *mut Tcl_Namespace {
    let Ok(name) = CString::new(name) else { return ptr::null_mut() };
    // SAFETY: live interpreter and name; an absolute name is looked up
    // from the global namespace whatever the current one is.
    unsafe {
        stub!(tcl_FindNamespace)(interp.as_ptr(), name.as_ptr(), ptr::null_mut(), tcl_sys::TCL_GLOBAL_ONLY as c_int)
    }
}

/// The frame a pushed frame was called from (restored before it is popped).
type Caller = (*mut c_void, FrameLevel);
#[cfg(tcl9)]
type FrameLevel = tcl_sys::Tcl_Size;
#[cfg(not(tcl9))]
type FrameLevel = c_int;

/// Pushes a call frame of `namespace` at global level, as `namespace eval`
/// at top level has: commands and variables resolve in `namespace` (then
/// globally), `info level` is 1, `uplevel 1` is the global level, however
/// deep the event loop that calls the handler (`vwait` in a proc). `None`
/// (nothing pushed) for the global namespace.
///
/// # Safety
/// A live interpreter of this thread; `namespace` null or live; `frame`
/// stays where it is until `pop_frame`.
unsafe fn push_frame_at_global_level(
    interp: *mut Tcl_Interp,
    frame: &mut Tcl_CallFrame,
    namespace: *mut Tcl_Namespace,
) -> Option<Caller> {
    // SAFETY: the caller's contract.
    if namespace.is_null() || unsafe { stub!(tcl_GetGlobalNamespace)(interp) } == namespace {
        return None;
    }
    // SAFETY: as above.
    if unsafe { socketserver_push_call_frame(interp, frame, namespace) } != TCL_OK {
        return None;
    }
    // Tcl_CallFrame mirrors tclInt.h's CallFrame field for field ("if you
    // change one, change the other", tcl.h): dummy5 is `callerVarPtr`, the
    // frame whose variables `uplevel 1` reaches, and dummy6 is `level`. The
    // public API has no way to push a frame anywhere but on the current
    // variable frame, so the pushed one is pointed at the global frame, the
    // last of the chain (its `callerVarPtr` is null).
    let caller: Caller = (frame.dummy5, frame.dummy6);
    let mut global = frame.dummy5.cast::<Tcl_CallFrame>();
    // SAFETY: the frames of the chain are live while ours is pushed on them.
    while !global.is_null() && !unsafe { (*global).dummy5 }.is_null() {
        global = unsafe { (*global).dummy5 }.cast();
    }
    if !global.is_null() {
        frame.dummy5 = global.cast();
        frame.dummy6 = 1;
    }
    Some(caller)
}

/// Pops the frame `push_frame_at_global_level` pushed, restoring its caller
/// first (Tcl_PopCallFrame makes it the current variable frame again).
///
/// # Safety
/// `frame` is the interpreter's innermost frame, pushed by
/// `push_frame_at_global_level`, which returned `caller`.
unsafe fn pop_frame(interp: *mut Tcl_Interp, frame: &mut Tcl_CallFrame, caller: Caller) {
    (frame.dummy5, frame.dummy6) = caller;
    // SAFETY: the caller's contract.
    unsafe { socketserver_pop_call_frame(interp) }
}
