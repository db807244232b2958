//! What each process owns after a fork of a process that runs pools.
//!
//! The rule, stated here once and enforced by the fork's child step, which
//! runs in every child whoever forks (the pool, `::socketserver::fork`,
//! TclX, C code, on any thread):
//!
//! - The supervisor (the process, and the thread in it, that runs the
//!   pools) owns the signal dispositions it installed, the signal pipe, the
//!   Tcl file handler on the pipe, the tick timer, and the write ends of its
//!   workers' leave pipes.
//! - Any child gets none of these: the dispositions of before the first
//!   pool, no pipe, no file handler or timer of the supervisor's, and no
//!   leave pipe (a copy kept open would keep a worker from seeing end of
//!   file when it is asked to leave). The pools themselves are forgotten
//!   on the child's first pool command (`Supervisor::adopt_if_forked`).
//! - A worker keeps one thing more, its copy of the pipe's write end, to
//!   notify the supervisor; then it sets up its own signals (`worker`).
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

/// The supervisor's end of a worker's leave pipe: closing it asks the
/// worker to leave. Closed in every child at the fork.
pub struct LeaveEnd {
    fd: ManuallyDrop<OwnedFd>,
    /// The process it belongs to: a child's copy of the struct (in a pool
    /// forgotten after a fork) must not close a number reused since.
    pid: Pid,
}

impl LeaveEnd {
    /// A new leave pipe: the worker's read end, and ours. Made under the
    /// lock the fork takes, so that no child is forked before it knows.
    pub fn pipe() -> nix::Result<(OwnedFd, LeaveEnd)> {
        let mut ends = leave_ends();
        let (read_end, write_end) = crate::sys::pipe_cloexec(false)?;
        ends.push(write_end.as_raw_fd());
        Ok((read_end, LeaveEnd { fd: ManuallyDrop::new(write_end), pid: getpid() }))
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
        ends.retain(|&end| end != fd);
        // SAFETY: dropped once, here, in the process that owns it.
        unsafe { ManuallyDrop::drop(&mut self.fd) };
    }
}

/// What the supervisor thread has in Tcl's notifier: the file handler on
/// the signal pipe and the tick timer.
#[derive(Clone, Copy)]
pub struct EventSources {
    pub pipe: Option<RawFd>,
    pub tick: Option<tcl::Timer>,
}

thread_local! {
    static EVENT_SOURCES: Cell<EventSources> = const { Cell::new(EventSources { pipe: None, tick: None }) };
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
    let sources = EVENT_SOURCES.try_with(|cell| cell.replace(EventSources { pipe: None, tick: None }));
    if let Ok(EventSources { pipe, tick }) = sources {
        if let Some(pipe) = pipe {
            tcl::delete_file_handler(pipe);
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
    signals::in_child();
}
