//! Signal hooks: `pool signal name ?script? ?-workers boolean?` runs the
//! script's own Tcl code on a signal (USR1 to reopen a log file, WINCH,
//! ...), without TclX.
//!
//! A hooked signal comes in through the same self-pipe as the pool's own
//! (`signals`): the supervisor reads it in its event loop and runs the
//! script there, at global level of the interpreter that set the hook,
//! after the pool's state is released. With `-workers 1` the supervisor
//! also sends the signal on to each of its workers that was started with
//! the hook, and each worker runs the script in its own event loop: its
//! control thread reads the signal from the worker's pipe and queues a
//! Tcl event. A worker started before the hook was set has the signal's
//! old disposition and is not sent it (`pool reload` gives the hook to
//! every worker). An error in a hook goes to `interp bgerror` of the
//! process it ran in; nothing else changes.
//!
//! TERM, INT, HUP, TTIN, TTOU and USR2 are the pool's own while a pool of
//! the process acts on signals (`-signals 1`): hooking one of them then
//! is an error, as is creating such a pool while one of them is hooked.
//! Hooks act while the process has a pool; without one a signal does what
//! it did before the pools.
//!
//! Hooks are kept, held and run by the thread that runs the pools of the
//! process: one set in another thread would never run, and its signal,
//! held by nobody, would end the process. So setting a hook claims the
//! pools' thread as `pool create` does, and both are refused in any other
//! thread while this one has hooks or pools.

use std::cell::RefCell;
use std::sync::Mutex;

use nix::sys::signal::{kill, Signal};
use nix::unistd::{getpid, Pid};

use crate::tcl::{self, Interp, NameTable, Obj, TclError, TclResult, Tcl_Obj};

use super::signals;
use super::state::{release_supervisor_thread_if_idle, Supervisor, ACTED_ON};
use super::supervisor_access::pools_act_on_signals;
use super::supervisor_thread;

/// The signals a hook may be set on, by name without "SIG".
static HOOKABLE: NameTable<11> = NameTable([
    c"ALRM".as_ptr(),
    c"HUP".as_ptr(),
    c"INT".as_ptr(),
    c"QUIT".as_ptr(),
    c"TERM".as_ptr(),
    c"TTIN".as_ptr(),
    c"TTOU".as_ptr(),
    c"USR1".as_ptr(),
    c"USR2".as_ptr(),
    c"WINCH".as_ptr(),
    std::ptr::null(),
]);
const HOOKABLE_SIGNALS: [Signal; 10] = [
    Signal::SIGALRM,
    Signal::SIGHUP,
    Signal::SIGINT,
    Signal::SIGQUIT,
    Signal::SIGTERM,
    Signal::SIGTTIN,
    Signal::SIGTTOU,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGWINCH,
];

const USAGE: &str = "?name? ?script? ?-workers boolean?";

#[derive(Clone)]
struct Hook {
    signal: Signal,
    interp: Interp,
    script: Obj,
    workers: bool,
}

thread_local! {
    /// The hooks of the process, on the thread that runs its pools (a
    /// worker has the copy it was forked with).
    static HOOKS: RefCell<Vec<Hook>> = const { RefCell::new(Vec::new()) };
}

/// The thread that holds the hooks of this process, while it has any. The
/// pools' thread claim (`supervisor`) is let go when the last pool ends;
/// this one stays while hooks are left.
static HOOKS_THREAD: Mutex<Option<(Pid, std::thread::ThreadId)>> = Mutex::new(None);

/// Refuses to set hooks or create pools in this thread while another
/// thread of the process has hooks or runs pools.
pub fn check_thread() -> TclResult<()> {
    let owner = HOOKS_THREAD.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    match *owner {
        Some((pid, thread)) if pid == getpid() && thread != std::thread::current().id() => Err(TclError::new(
            "signal hooks of this process are set by another thread",
            &["SOCKETSERVER", "SIGNAL", "THREAD"],
        )),
        _ if supervisor_thread::pools_run_by_another_thread() => {
            Err(TclError::new("pools of this process are run by another thread", &["SOCKETSERVER", "POOL", "THREAD"]))
        }
        _ => Ok(()),
    }
}

/// Records whether this thread holds hooks now; with none left, and no
/// pool, it lets another thread claim the pools.
fn record_thread(held: bool) {
    let mut owner = HOOKS_THREAD.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let here = (getpid(), std::thread::current().id());
    if held {
        *owner = Some(here);
    } else if *owner == Some(here) || owner.is_some_and(|(pid, _)| pid != here.0) {
        *owner = None;
    }
}

/// The set of signals `signals` as a bit mask (every signal number is
/// below 64).
pub fn mask(signals: impl IntoIterator<Item = Signal>) -> u64 {
    signals.into_iter().fold(0, |mask, signal| mask | 1 << (signal as i32))
}

fn hooks() -> Vec<Hook> {
    HOOKS.with(|hooks| hooks.borrow().clone())
}

/// The hooked signals, which the supervisor holds while it has a pool.
pub fn signals() -> Vec<Signal> {
    hooks().iter().map(|h| h.signal).collect()
}

/// The signals a worker started now handles itself.
pub fn worker_signals() -> Vec<Signal> {
    hooks().iter().filter(|h| h.workers).map(|h| h.signal).collect()
}

/// `pool signal ?name? ?script? ?-workers boolean?`: with no name, the
/// hooked signals; with a name alone, its script; with a script, sets the
/// hook (an empty script removes it). Also whether a hook was set: the
/// caller then holds the pools' signals again (`supervisor`). Never in a
/// worker: the caller refuses it first.
pub fn command(interp: Interp, objv: &[*mut Tcl_Obj], args: &[Obj]) -> TclResult<(Obj, bool)> {
    check_thread()?;
    let (mut words, mut workers) = (args, false);
    if let [rest @ .., option, value] = words {
        if option.to_string_lossy() == "-workers" {
            workers = value.get_boolean(interp)?;
            words = rest;
        }
    }
    let signal = |word: &Obj| -> TclResult<Signal> {
        let text = word.to_string_lossy();
        let bare = Obj::new_string(text.strip_prefix("SIG").unwrap_or(&text));
        Ok(HOOKABLE_SIGNALS[interp.get_index(&bare, &HOOKABLE, c"signal")?])
    };
    match words {
        [] if words.len() == args.len() => Ok((
            Obj::new_list(&hooks().iter().map(|h| Obj::new_string(&h.signal.as_str()[3..])).collect::<Vec<_>>()),
            false,
        )),
        [name] if words.len() == args.len() => {
            let signal = signal(name)?;
            Ok((
                hooks()
                    .into_iter()
                    .find(|h| h.signal == signal)
                    .map(|h| h.script)
                    .unwrap_or_else(|| Obj::new_string("")),
                false,
            ))
        }
        [name, script] => {
            let signal = signal(name)?;
            let script = script.clone();
            if !script.to_string_lossy().is_empty() && ACTED_ON.contains(&signal) && pools_act_on_signals() {
                return Err(TclError::new(
                    format!(
                        "signal \"{}\" is the pool's: create the pools of this process with -signals 0 to hook it",
                        &signal.as_str()[3..]
                    ),
                    &["SOCKETSERVER", "SIGNAL", "POOL"],
                ));
            }
            if !script.to_string_lossy().is_empty() {
                // Atomic with every other thread's `pool create` and hook.
                supervisor_thread::claim_supervisor_thread()?;
            }
            set(signal, interp, script, workers);
            Ok((Obj::new_string(""), true))
        }
        _ => Err(interp.wrong_num_args(objv, 2, USAGE)),
    }
}

fn set(signal: Signal, interp: Interp, script: Obj, workers: bool) {
    HOOKS.with(|hooks| {
        let mut hooks = hooks.borrow_mut();
        hooks.retain(|h| h.signal != signal);
        if !script.to_string_lossy().is_empty() {
            hooks.push(Hook { signal, interp, script, workers });
        }
        signals::keep_in_workers(mask(hooks.iter().filter(|h| h.workers).map(|h| h.signal)));
        record_thread(!hooks.is_empty());
    });
    if hooks().is_empty() {
        release_supervisor_thread_if_idle();
    }
}

/// Refuses a pool that would act on a signal the script has hooked.
pub fn check_pool_signals() -> TclResult<()> {
    match hooks().into_iter().find(|h| ACTED_ON.contains(&h.signal)) {
        None => Ok(()),
        Some(hook) => Err(TclError::new(
            format!(
                "signal \"{}\" has a hook: remove it, or create the pool with -signals 0",
                &hook.signal.as_str()[3..]
            ),
            &["SOCKETSERVER", "SIGNAL", "HOOKED"],
        )),
    }
}

/// The interpreter that set hooks is being deleted: they go with it.
pub fn interp_deleted(interp: Interp) {
    let _ = HOOKS.try_with(|hooks| {
        if let Ok(mut hooks) = hooks.try_borrow_mut() {
            hooks.retain(|h| h.interp.as_ptr() != interp.as_ptr());
            signals::keep_in_workers(mask(hooks.iter().filter(|h| h.workers).map(|h| h.signal)));
            record_thread(!hooks.is_empty());
        }
    });
}

/// In the supervisor, for the signals just read from the pipe: sends each
/// hooked one on to the workers started with its hook (`-workers 1`),
/// logs it, and returns the hooks to run once the state is released.
pub(super) fn forward(sup: &mut Supervisor, received: &[Signal]) -> Vec<Signal> {
    let hooks = hooks();
    let hooked: Vec<Signal> = received.iter().copied().filter(|s| hooks.iter().any(|h| h.signal == *s)).collect();
    for &signal in &hooked {
        let to_workers = hooks.iter().any(|h| h.signal == signal && h.workers);
        for index in 0..sup.pools.len() {
            let pool = &sup.pools[index];
            let mut sent = 0;
            if to_workers {
                let alive = |c: &&super::state::Child| pool.worker_of(c).is_some_and(|w| w.killed.is_none());
                for child in pool.children.iter().filter(alive).filter(|c| c.hooks & mask([signal]) != 0) {
                    if kill(child.pid, signal).is_ok() {
                        sent += 1;
                    }
                }
            }
            let entry = pool.entry(
                "signal",
                vec![("signal", Obj::new_string(&signal.as_str()[3..])), ("workers", Obj::new_int(sent))],
            );
            sup.log.push(entry);
        }
    }
    hooked
}

/// Runs the hooks of `signals` in this process, at global level; an error
/// goes to `interp bgerror`. Queued as events of this thread, run from its
/// event loop: never while the pool's state is borrowed (a hook may call
/// `pool` commands), and outside the caller's `catch_unwind` (a hook may
/// end its thread, see `run_hook`).
pub fn run(signals: &[Signal]) {
    let thread = tcl::current_thread();
    for signal in signals {
        tcl::queue_unwinding_event(thread, run_hook, *signal as i32);
    }
}

/// In a worker's control thread: queues the hooks of `received` on the
/// worker's Tcl thread, one event per signal. Returns whether SIGTERM is
/// among them unhooked (the pool's stop signal: the worker leaves).
pub fn in_worker(thread: tcl::ThreadId, received: &[Signal], hooked: u64) -> bool {
    for signal in received.iter().filter(|s| hooked & mask([**s]) != 0) {
        tcl::queue_unwinding_event(thread, run_hook, *signal as i32);
    }
    received.contains(&Signal::SIGTERM) && hooked & mask([Signal::SIGTERM]) == 0
}

/// Runs a signal's hook (queued by `run` or `in_worker`): "C-unwind", and
/// the hook's script outside `catch_unwind`, as it may end the thread
/// (`tcl::ScriptCall`).
unsafe extern "C-unwind" fn run_hook(event: *mut tcl::Tcl_Event, _flags: std::ffi::c_int) -> std::ffi::c_int {
    let call = tcl::rust_part(|| {
        // SAFETY: queued by `run` or `in_worker` with an `i32` payload, taken once.
        let number = unsafe { tcl::Event::<i32>::take_payload(event) };
        let signal = Signal::try_from(number).ok()?;
        let hook = hooks().into_iter().find(|h| h.signal == signal)?;
        Some(tcl::ScriptCall::new(hook.interp, hook.script, None, |_| {}))
    })
    .flatten();
    if let Some(call) = call {
        // SAFETY: on the worker's Tcl thread, right after it was made; this
        // frame holds nothing to drop.
        unsafe { call.run() };
    }
    1
}
