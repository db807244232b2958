//! Signals of the accepting process, turned into events of its Tcl loop.
//!
//! A signal handler may do almost nothing: it writes the signal's number,
//! one byte, into a pipe (the self-pipe trick) and returns. The pipe's read
//! end is a Tcl file handler, so the supervisor acts on the signal from the
//! event loop, where Tcl may be called. Workers write a `NOTIFY` byte into
//! the same pipe when the supervisor should look at the scoreboard (a
//! worker is ready, or leaves by itself): a message per worker life, not per
//! connection.
//!
//! The pipe and the signal dispositions belong to the process, not to a
//! thread or an interpreter: the handler runs on whichever thread the
//! kernel picks, and writes wherever `WRITE_END` points. The pipe is made
//! with the first pool (`pipe_read_end`) and closed with the last
//! (`release_all`). Each signal is held only while something acts on it
//! (`hold_exactly`): a signal no pool acts on does what it did before.
//! Giving a signal back restores the disposition it replaced, but only if
//! ours is still in force: a handler the script set since (TclX's `signal
//! trap`) is the script's, and stays. A forked child never keeps them
//! (`in_child`): it gets the dispositions of before the pool, by the same
//! rule, and no pipe.
//!
//! A worker has a pipe of its own for the signals it handles (a stop signal
//! sent to the whole process group, as Ctrl-C and systemd do, must not cut
//! its connections short): see `worker`.

use std::cell::{Cell, RefCell};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use nix::sys::signal::{pthread_sigmask, sigaction, SaFlags, SigAction, SigHandler, SigSet, SigmaskHow, Signal};

/// The write end of this process's pipe, for the signal handler.
static WRITE_END: AtomicI32 = AtomicI32::new(-1);

/// The signals (`hooks::mask`) a worker handles itself: its fork keeps our
/// handler on them (writing nowhere until the worker watches them), so a
/// signal sent on to it before then is lost, not fatal.
static KEPT_IN_WORKERS: AtomicU64 = AtomicU64::new(0);

pub fn keep_in_workers(mask: u64) {
    KEPT_IN_WORKERS.store(mask, Ordering::SeqCst);
}

/// The signals this process handles through its pipe.
struct Handling {
    read_end: OwnedFd,
    /// Open while we handle signals: `WRITE_END` names it.
    _write_end: OwnedFd,
    /// The actions in force before ours, restored when we let go.
    previous: Vec<(Signal, SigAction)>,
}

static HANDLING: Mutex<Option<Handling>> = Mutex::new(None);

fn handling() -> MutexGuard<'static, Option<Handling>> {
    HANDLING.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

thread_local! {
    /// On the forking thread, from before a fork to after it: `HANDLING`
    /// locked, and the signal mask to restore.
    static HELD_ACROSS_FORK: RefCell<Option<(MutexGuard<'static, Option<Handling>>, SigSet)>> =
        const { RefCell::new(None) };
    /// Set while the supervisor forks one of its workers.
    static FORKING_WORKER: Cell<bool> = const { Cell::new(false) };
}

/// Makes the process's pipe (once) and returns its read end.
pub fn pipe_read_end() -> nix::Result<RawFd> {
    // Where close-on-exec is not set atomically, no fork may come between
    // making the pipe and marking it. The fork guard is taken before
    // `HANDLING`, in the order a fork takes them (`before_fork` holds the
    // guard while this room's `prepare` locks `HANDLING`): the other order
    // deadlocks with a fork in another thread.
    let _no_fork = (!crate::sys::CLOEXEC_IS_ATOMIC).then(crate::fork_safety::hold_off_forks);
    let mut handling = handling();
    if handling.is_none() {
        let (read_end, write_end) = crate::sys::pipe_cloexec(true)?;
        WRITE_END.store(write_end.as_raw_fd(), Ordering::SeqCst);
        *handling = Some(Handling { read_end, _write_end: write_end, previous: Vec::new() });
    }
    Ok(handling.as_ref().map(|h| h.read_end.as_raw_fd()).unwrap_or(-1))
}

/// Handles `signal` from now on, unless it is handled already; the pipe
/// must exist (`pipe_read_end`).
pub fn watch(signal: Signal) -> nix::Result<()> {
    let mut handling = handling();
    let Some(handling) = handling.as_mut() else { return Err(nix::errno::Errno::EBADF) };
    if handling.previous.iter().any(|(s, _)| *s == signal) {
        return Ok(());
    }
    let flags =
        if signal == Signal::SIGCHLD { SaFlags::SA_RESTART | SaFlags::SA_NOCLDSTOP } else { SaFlags::SA_RESTART };
    let action = SigAction::new(SigHandler::Handler(on_signal), flags, SigSet::empty());
    // SAFETY: `on_signal` is async-signal-safe: it only calls write(2) and
    // touches errno.
    let previous = unsafe { sigaction(signal, &action) }?;
    handling.previous.push((signal, previous));
    Ok(())
}

/// Handles exactly `wanted` from now on: the signals not handled yet are
/// taken, the others given back (`give_back`). The pipe must exist.
pub fn hold_exactly(wanted: &[Signal]) -> nix::Result<()> {
    {
        let mut handling = handling();
        let Some(handling) = handling.as_mut() else { return Err(nix::errno::Errno::EBADF) };
        let (kept, released): (Vec<_>, Vec<_>) =
            std::mem::take(&mut handling.previous).into_iter().partition(|(s, _)| wanted.contains(s));
        handling.previous = kept;
        give_back(&released);
    }
    wanted.iter().try_for_each(|&signal| watch(signal))
}

/// Gives every signal back to what handled it before, then closes the pipe.
pub fn release_all() {
    let Some(handling) = handling().take() else { return };
    give_back(&handling.previous);
    WRITE_END.store(-1, Ordering::SeqCst);
}

/// Restores each signal's previous action where our handler is still the
/// one in force; one set since is not ours to undo. Async-signal-safe (it
/// runs in a forked child): sigaction(2) only.
fn give_back(previous: &[(Signal, SigAction)]) {
    for (signal, previous) in previous {
        if handler_in_force(*signal) == Some(on_signal as extern "C" fn(libc::c_int) as usize) {
            // SAFETY: restores an action the process had before.
            let _ = unsafe { sigaction(*signal, previous) };
        }
    }
}

/// The signals we hold whose handler is no longer ours: the script set
/// another since (TclX's `signal trap`). Reported by `signal_watch`.
pub fn replaced() -> Vec<Signal> {
    let ours = on_signal as extern "C" fn(libc::c_int) as usize;
    let handling = handling();
    let held: Vec<Signal> = handling.as_ref().map(|h| h.previous.iter().map(|(s, _)| *s).collect()).unwrap_or_default();
    held.into_iter().filter(|&signal| handler_in_force(signal) != Some(ours)).collect()
}

/// The handler address (or SIG_DFL, SIG_IGN) now in force for `signal`.
fn handler_in_force(signal: Signal) -> Option<usize> {
    // SAFETY: a null new action only reads the current one into `current`,
    // which sigaction(2) fills in on success.
    unsafe {
        let mut current: libc::sigaction = std::mem::zeroed();
        (libc::sigaction(signal as libc::c_int, std::ptr::null(), &mut current) == 0).then_some(current.sa_sigaction)
    }
}

/// In a forked worker: what `in_child` left is all the worker keeps of the
/// supervisor's signals; nothing more to give back.
pub fn reset_in_worker() {
    release_all();
}

/// Runs `fork` as the fork of one of the supervisor's workers: its child
/// keeps our handler on the signals it handles itself (`keep_in_workers`).
pub fn fork_worker<R>(fork: impl FnOnce() -> R) -> R {
    FORKING_WORKER.with(|forking| forking.set(true));
    let result = fork();
    FORKING_WORKER.with(|forking| forking.set(false));
    result
}

/// Before any fork: no other thread may be changing what the child copies,
/// and no signal may reach the child's copy of our handler (it would write
/// into the supervisor's pipe) until `in_child` has restored the
/// dispositions.
pub fn before_fork() {
    let mut saved = SigSet::empty();
    let _ = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::all()), Some(&mut saved));
    let guard = handling();
    let _ = HELD_ACROSS_FORK.try_with(|held| *held.borrow_mut() = Some((guard, saved)));
}

pub fn in_parent() {
    let held = HELD_ACROSS_FORK.try_with(|held| held.borrow_mut().take()).ok().flatten();
    if let Some((guard, mask)) = held {
        drop(guard);
        let _ = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&mask), None);
    }
}

/// In any child: the dispositions of before the first pool, and no pipe
/// (both of its ends close here, in workers too).
pub fn in_child() {
    let held = HELD_ACROSS_FORK.try_with(|held| held.borrow_mut().take()).ok().flatten();
    let Some((mut guard, mask)) = held else { return };
    let worker = FORKING_WORKER.try_with(|forking| forking.replace(false)).unwrap_or(false);
    WRITE_END.store(-1, Ordering::SeqCst);
    if let Some(handling) = guard.take() {
        let kept = if worker { KEPT_IN_WORKERS.load(Ordering::SeqCst) } else { 0 };
        // One at a time: no allocation in a forked child.
        for previous in handling.previous.iter().filter(|(s, _)| kept & 1 << (*s as i32) == 0) {
            give_back(std::slice::from_ref(previous));
        }
        // Dropping `handling` closes both ends (close(2) only).
    }
    drop(guard);
    let _ = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&mask), None);
}

/// Wakes the supervisor to look at this worker's slot (`wake`).
pub fn notify_supervisor() {
    super::wake::notify();
}

/// Reads what is waiting in the pipe: the signals received (as numbers);
/// the second value is kept for callers and always false (workers no
/// longer write into this pipe).
pub fn drain(read_end: RawFd) -> (Vec<Signal>, bool) {
    let mut signals = Vec::new();
    let notified = false;
    let mut buffer = [0u8; 64];
    while let Ok(count @ 1..) = nix::unistd::read(read_end, &mut buffer) {
        for byte in &buffer[..count] {
            match *byte {
                0 => {}
                number => {
                    if let Ok(signal) = Signal::try_from(i32::from(number)) {
                        if !signals.contains(&signal) || signal == Signal::SIGTTIN || signal == Signal::SIGTTOU {
                            signals.push(signal);
                        }
                    }
                }
            }
        }
    }
    (signals, notified)
}

fn write_byte(fd: RawFd, byte: u8) {
    if fd >= 0 {
        // SAFETY: write(2) on a descriptor we own; a full pipe (EAGAIN)
        // already holds a wakeup, so the byte may be dropped.
        unsafe { libc::write(fd, (&byte as *const u8).cast(), 1) };
    }
}

extern "C" fn on_signal(signal: libc::c_int) {
    // errno is thread-local; saving and restoring it keeps the interrupted
    // code's view intact, as a signal handler must.
    let saved = crate::sys::errno();
    write_byte(WRITE_END.load(Ordering::Relaxed), signal as u8);
    crate::sys::set_errno(saved);
}
