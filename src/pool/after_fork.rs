//! What each process owns after a fork of a process that runs pools.
//!
//! The rule, stated here once and enforced by the fork's child step, which
//! runs in every child whoever forks (the pool, `::socketserver::fork`,
//! TclX, C code, on any thread):
//!
//! - The supervisor (the process, and the thread in it, that runs the
//!   pools) owns the signal dispositions it installed, the signal pipe, the
//!   Tcl file handlers on the pipe and on the workers' wake channels
//!   (`wake`), the tick timer, and its ends of its workers' leave
//!   channels.
//! - Any child gets none of these: the dispositions of before the first
//!   pool, no pipe, no file handler or timer of the supervisor's, and no
//!   leave channel (a copy kept open would keep a worker from seeing end of
//!   file when it is asked to leave). The pools themselves are forgotten
//!   on the child's first pool command (`Supervisor::adopt_if_forked`).
//! - A worker keeps its own end of its leave channel, which is also its
//!   one way to wake the supervisor (`wake`); then it sets up its own
//!   signals (`worker`). Nothing of the supervisor's signal pipe.
//! - A new generation (`pool upgrade`) is such a child until its exec.

use std::cell::{Cell, RefCell};
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::{Mutex, MutexGuard, Once};

use nix::unistd::{getpid, Pid};

use crate::fork_safety;
use crate::tcl;

use super::signals;

/// The write ends of every leave pipe of the process's workers.
static LEAVE_ENDS: Mutex<Vec<RawFd>> = Mutex::new(Vec::new());

fn leave_ends() -> MutexGuard<'static, Vec<RawFd>> {
    LEAVE_ENDS.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The supervisor's end of a worker's leave channel: closing it asks the
/// worker to leave; what the worker writes into its end wakes the
/// supervisor (`wake`). Closed in every child at the fork.
pub struct LeaveEnd {
    fd: ManuallyDrop<OwnedFd>,
    /// The process it belongs to: a child's copy of the struct (in a pool
    /// forgotten after a fork) must not close a number reused since.
    pid: Pid,
}

impl LeaveEnd {
    /// A new leave channel (a stream socketpair): the worker's end, and
    /// ours, watched for wakes. Made under the lock the fork takes, so that
    /// no child is forked before it knows.
    pub fn pipe() -> nix::Result<(OwnedFd, LeaveEnd)> {
        let mut ends = leave_ends();
        let (worker_end, own_end) = crate::sys::socketpair_cloexec(nix::sys::socket::SockType::Stream)?;
        super::wake::watch(std::os::fd::AsFd::as_fd(&own_end))?;
        ends.push(own_end.as_raw_fd());
        Ok((worker_end, LeaveEnd { fd: ManuallyDrop::new(own_end), pid: getpid() }))
    }
}

impl AsRawFd for LeaveEnd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl Drop for LeaveEnd {
    fn drop(&mut self) {
        if self.pid != getpid() {
            // Closed at the fork already.
            return;
        }
        let mut ends = leave_ends();
        let fd = self.fd.as_raw_fd();
        super::wake::unwatch(std::os::fd::AsFd::as_fd(&*self.fd));
        ends.retain(|&end| end != fd);
        // SAFETY: dropped once, here, in the process that owns it.
        unsafe { ManuallyDrop::drop(&mut self.fd) };
    }
}

/// What the supervisor thread has in Tcl's notifier: the file handlers on
/// the signal pipe and on the workers' wake channels, and the tick timer.
#[derive(Clone, Copy)]
pub struct EventSources {
    pub pipe: Option<RawFd>,
    pub wake: Option<RawFd>,
    pub tick: Option<tcl::Timer>,
}

impl EventSources {
    pub const NONE: EventSources = EventSources { pipe: None, wake: None, tick: None };
}

thread_local! {
    static EVENT_SOURCES: Cell<EventSources> = const { Cell::new(EventSources::NONE) };
    static LEAVE_ENDS_HELD: RefCell<Option<MutexGuard<'static, Vec<RawFd>>>> = const { RefCell::new(None) };
}

/// This thread's event sources (none on a thread that runs no pool).
pub fn event_sources() -> EventSources {
    EVENT_SOURCES.with(Cell::get)
}

pub fn set_event_sources(sources: EventSources) {
    EVENT_SOURCES.with(|cell| cell.set(sources));
}

/// Registers the child step (and what it needs locked) once per process.
pub fn watch_forks() {
    static REGISTERED: Once = Once::new();
    REGISTERED.call_once(|| fork_safety::on_fork(before_fork, in_parent, in_child));
}

fn before_fork() {
    signals::before_fork();
    let ends = leave_ends();
    let _ = LEAVE_ENDS_HELD.try_with(|held| *held.borrow_mut() = Some(ends));
}

fn in_parent() {
    let _ = LEAVE_ENDS_HELD.try_with(|held| held.borrow_mut().take());
    signals::in_parent();
}

fn in_child() {
    // Only the forking thread goes on in the child: if it is the
    // supervisor's, its handler and timer are removed from Tcl's notifier
    // before the pipe closes under them.
    let sources = EVENT_SOURCES.try_with(|cell| cell.replace(EventSources::NONE));
    if let Ok(EventSources { pipe, wake, tick }) = sources {
        for fd in pipe.into_iter().chain(wake) {
            tcl::delete_file_handler(fd);
        }
        if let Some(tick) = tick {
            tcl::delete_timer(tick);
        }
    }
    let _ = LEAVE_ENDS_HELD.try_with(|held| {
        if let Some(mut ends) = held.borrow_mut().take() {
            for fd in ends.drain(..) {
                let _ = nix::unistd::close(fd);
            }
        }
    });
    super::wake::in_child();
    signals::in_child();
}
