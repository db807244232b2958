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
//! A worker has a pipe of its own for the signals it handles (a stop signal
//! sent to the whole process group, as Ctrl-C and systemd do, must not cut
//! its connections short): see `worker`.

use std::cell::RefCell;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};

use nix::fcntl::OFlag;
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

/// The byte a worker writes to wake the supervisor.
pub const NOTIFY: u8 = 0;

/// The write end of this process's pipe, for the signal handler.
static WRITE_END: AtomicI32 = AtomicI32::new(-1);
/// Where `notify_supervisor` writes: the supervisor's pipe (in the
/// supervisor itself, the same as `WRITE_END`).
static SUPERVISOR_END: AtomicI32 = AtomicI32::new(-1);

struct Pipe {
    read_end: OwnedFd,
    _write_end: OwnedFd,
}

thread_local! {
    static PIPE: RefCell<Option<Pipe>> = const { RefCell::new(None) };
    /// The actions in force before ours, restored when we let go.
    static PREVIOUS: RefCell<Vec<(Signal, SigAction)>> = const { RefCell::new(Vec::new()) };
}

/// Makes the pipe (once) and returns its read end.
pub fn pipe_read_end() -> nix::Result<RawFd> {
    PIPE.with(|pipe| {
        let mut pipe = pipe.borrow_mut();
        if pipe.is_none() {
            let (read_end, write_end) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
            WRITE_END.store(write_end.as_raw_fd(), Ordering::SeqCst);
            // A worker keeps the supervisor's; only the supervisor's own is new.
            let _ = SUPERVISOR_END.compare_exchange(-1, write_end.as_raw_fd(), Ordering::SeqCst, Ordering::SeqCst);
            *pipe = Some(Pipe { read_end, _write_end: write_end });
        }
        Ok(pipe.as_ref().map(|p| p.read_end.as_raw_fd()).unwrap_or(-1))
    })
}

/// Handles `signal` from now on, unless it is handled already.
pub fn watch(signal: Signal) -> nix::Result<()> {
    if PREVIOUS.with(|p| p.borrow().iter().any(|(s, _)| *s == signal)) {
        return Ok(());
    }
    let flags = if signal == Signal::SIGCHLD { SaFlags::SA_RESTART | SaFlags::SA_NOCLDSTOP } else { SaFlags::SA_RESTART };
    let action = SigAction::new(SigHandler::Handler(on_signal), flags, SigSet::empty());
    // SAFETY: `on_signal` is async-signal-safe: it only calls write(2) and
    // touches errno.
    let previous = unsafe { sigaction(signal, &action) }?;
    PREVIOUS.with(|p| p.borrow_mut().push((signal, previous)));
    Ok(())
}

/// Gives every signal back to what handled it before.
pub fn release_all() {
    for (signal, previous) in PREVIOUS.with(|p| std::mem::take(&mut *p.borrow_mut())) {
        // SAFETY: restores an action the process had before.
        let _ = unsafe { sigaction(signal, &previous) };
    }
}

/// In a forked worker: signals act as they did before the pool existed,
/// and the pipe belongs to the supervisor alone; its write end stays open
/// for `notify_supervisor`.
pub fn reset_in_worker() {
    release_all();
    PIPE.with(|pipe| {
        if let Some(pipe) = pipe.borrow_mut().take() {
            crate::tcl::delete_file_handler(pipe.read_end.as_raw_fd());
            drop(pipe.read_end);
            std::mem::forget(pipe._write_end);
        }
    });
    WRITE_END.store(-1, Ordering::SeqCst);
}

/// Wakes the supervisor to look at the scoreboard.
pub fn notify_supervisor() {
    write_byte(SUPERVISOR_END.load(Ordering::Relaxed), NOTIFY);
}

/// Reads what is waiting in the pipe: the signals received (as numbers) and
/// whether a worker asked for attention.
pub fn drain(read_end: RawFd) -> (Vec<Signal>, bool) {
    let mut signals = Vec::new();
    let mut notified = false;
    let mut buffer = [0u8; 64];
    while let Ok(count @ 1..) = nix::unistd::read(read_end, &mut buffer) {
        for byte in &buffer[..count] {
            match *byte {
                NOTIFY => notified = true,
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
    // SAFETY: errno is thread-local; saving and restoring it keeps the
    // interrupted code's view intact, as a signal handler must.
    let saved = unsafe { *libc::__errno_location() };
    write_byte(WRITE_END.load(Ordering::Relaxed), signal as u8);
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = saved };
}
