//! socketserver: pre-forked TCP servers for Tcl.
//!
//! One process opens the listener and accepts in a background thread
//! (`accept_loop`); each connection travels over a `SOCK_SEQPACKET`
//! socketpair (`handoff`) to exactly one idle worker (`receiver`), which
//! hands it to the Tcl handler that registered for it (`registration`) as
//! an ordinary Tcl TCP channel. `command` parses `::socketserver::socket`;
//! `port_table` is the process-wide table of ports; `tcl` is the only code
//! that touches the Tcl C API. `pool` runs worker processes for a port:
//! it forks, watches and replaces them; `process` has `fork` and `wait`
//! for scripts that fork by hand without TclX; `fork_safety` runs the steps
//! that the rooms register for every `fork` (our locks stay sound, a child
//! under Tcl 9 gets an event notifier of its own from `notifier_fork`, and
//! keeps nothing of the supervisor's but what `pool::after_fork` allows).
//! `proxy_header` reads a connection's PROXY header in the worker, and
//! believes it only from the peers `proxy_trust` admits (`-proxyfrom`).

#![deny(unsafe_op_in_unsafe_fn)]

mod tcl;

pub mod accept_loop;
mod command;
pub mod counters;
mod fork_safety;
pub mod handoff;
mod inherited;
pub mod listener;
mod notifier_fork;
mod pool;
mod port_table;
mod process;
mod proxy_header;
pub mod proxy_protocol;
mod proxy_trust;
pub mod queue_stats;
mod queue_time;
pub mod receiver;
mod registration;
mod shared_pages;
#[doc(hidden)]
pub mod sys;
mod upgrade;

use std::ffi::{c_int, c_void};

use registration::InterpState;
use tcl::{Interp, Obj, TclError, Tcl_Interp, Tcl_Obj, TCL_ERROR};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Stack size of the accepting and receiving threads. They make system
/// calls only, and a pool of thread workers has one receiver each: the
/// default 2 MiB of address space per thread would be waste.
const THREAD_STACK_SIZE: usize = 128 * 1024;
const ASSOC_KEY: &std::ffi::CStr = c"socketserver";

/// Entry point for `load` and `package require`.
///
/// # Safety
/// Called by Tcl with a live interpreter, on the thread that owns it.
#[no_mangle]
pub unsafe extern "C" fn Socketserver_Init(interp: *mut Tcl_Interp) -> c_int {
    // SAFETY: Tcl passes a live interpreter.
    if !unsafe { tcl::init_stubs(interp) } {
        return TCL_ERROR;
    }
    // SAFETY: as above; stubs are ready.
    let interp = unsafe { Interp::from_raw(interp) };
    tcl::run_command(interp, || init(interp).map(|()| Obj::new_string("")))
}

/// Refuses safe interpreters: the extension opens sockets and is meant to
/// run in processes that fork.
///
/// # Safety
/// Called by Tcl with a live interpreter, on the thread that owns it.
#[no_mangle]
pub unsafe extern "C" fn Socketserver_SafeInit(interp: *mut Tcl_Interp) -> c_int {
    // SAFETY: Tcl passes a live interpreter.
    if !unsafe { tcl::init_stubs(interp) } {
        return TCL_ERROR;
    }
    // SAFETY: as above; stubs are ready.
    let interp = unsafe { Interp::from_raw(interp) };
    interp.set_error(TclError::new(
        "socketserver cannot be loaded into a safe interpreter: it opens sockets and is meant for processes that fork",
        &["SOCKETSERVER", "SAFE"],
    ));
    TCL_ERROR
}

fn init(interp: Interp) -> tcl::TclResult<()> {
    // Each room that a fork concerns registers its steps, in this order:
    // the locks first (the exit flag, then the port table), then what the
    // child is given (a notifier of its own, then what it keeps of the
    // supervisor's: nothing but a worker's notify end).
    registration::watch_for_exit();
    port_table::watch_forks();
    if tcl::NOTIFIER_SHARED_ACROSS_FORK {
        notifier_fork::watch_forks();
    }
    pool::watch_forks();
    // Before any script runs `cd`: where the default upgrade command runs.
    pool::remember_starting_directory();
    let mut state = interp.get_assoc_data(ASSOC_KEY);
    if state.is_null() {
        state = Box::into_raw(Box::new(InterpState::new(interp))).cast::<c_void>();
        interp.set_assoc_data(ASSOC_KEY, Some(registration::on_interp_deleted), state);
        registration::watch_thread_exit(state);
    }
    interp.create_command(c"::socketserver::socket", Some(socket_command), state);
    interp.create_command(c"::socketserver::pool", Some(pool_command), state);
    interp.create_command(c"::socketserver::fork", Some(fork_command), state);
    interp.create_command(c"::socketserver::wait", Some(wait_command), state);
    interp.export(c"::socketserver", c"socket");
    let version = std::ffi::CString::new(VERSION).expect("version has no NUL");
    if interp.provide_package(c"socketserver", &version) != tcl::TCL_OK {
        return Err(TclError::AlreadySet);
    }
    Ok(())
}

/// Defines the command procedure `$name`, which runs `$dispatch` under
/// `run`.
macro_rules! command_procedure {
    ($name:ident, $dispatch:path) => {
        unsafe extern "C" fn $name(
            state: *mut c_void,
            interp: *mut Tcl_Interp,
            objc: c_int,
            objv: *const *mut Tcl_Obj,
        ) -> c_int {
            // SAFETY: Tcl's contract for a command procedure, passed on.
            unsafe { run(state, interp, objc, objv, $dispatch) }
        }
    };
}

command_procedure!(socket_command, command::dispatch);
command_procedure!(pool_command, pool::dispatch);
command_procedure!(fork_command, process::fork);
command_procedure!(wait_command, process::wait);

type Dispatch = fn(&InterpState, Interp, &[*mut Tcl_Obj]) -> tcl::TclResult<Obj>;

/// Runs a command's `dispatch` under the trampoline (errors and panics
/// become Tcl errors).
///
/// # Safety
/// The arguments are those Tcl passes a command procedure: a live
/// interpreter, `objc` live words, and the `InterpState` registered with
/// the command (freed only with the interpreter).
unsafe fn run(
    state: *mut c_void,
    interp: *mut Tcl_Interp,
    objc: c_int,
    objv: *const *mut Tcl_Obj,
    dispatch: Dispatch,
) -> c_int {
    // SAFETY: see the contract above.
    let (interp, objv, state) = unsafe {
        (Interp::from_raw(interp), std::slice::from_raw_parts(objv, objc as usize), &*state.cast::<InterpState>())
    };
    tcl::run_command(interp, || dispatch(state, interp, objv))
}
