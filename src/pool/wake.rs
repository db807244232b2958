//! A worker's one way to wake the supervisor: a channel of its own.
//!
//! Each worker's leave pipe is a socketpair: the supervisor's end closes to
//! ask the worker to leave (`after_fork::LeaveEnd`), and the worker writes
//! a byte into its own end when the supervisor should look at its slot (it
//! is ready, it leaves by itself, it answered a hang report). A byte means
//! that and nothing else: the supervisor reads the slot, which is the
//! worker's claim about itself. The supervisor watches every worker's end
//! through one descriptor (`sys::ReadySet`), one file handler in its event
//! loop. A worker that writes more than a worker's life ever needs
//! (`WAKES_PER_LIFE`), or closes its end, loses its channel: the
//! supervisor stops listening to it and looks at its slot on its tick
//! only. Workers have no way into the supervisor's signal pipe.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Mutex, MutexGuard};

use nix::unistd::{getpid, Pid};

use crate::sys::ReadySet;

/// More wakes than a worker's life needs (ready, a recycle, a few hang
/// reports): a worker past this has lost its channel.
const WAKES_PER_LIFE: u32 = 256;

struct Watching {
    set: ReadySet,
    owner: Pid,
    /// Wakes read so far, per supervisor end.
    wakes: HashMap<RawFd, u32>,
}

static WATCHING: Mutex<Option<Watching>> = Mutex::new(None);
/// The set's descriptor, for a forked child to close without the lock.
static SET_FD: AtomicI32 = AtomicI32::new(-1);
/// In a worker: its end of its channel.
static OWN_END: AtomicI32 = AtomicI32::new(-1);

fn watching() -> MutexGuard<'static, Option<Watching>> {
    let mut guard = WATCHING.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if guard.as_ref().is_some_and(|w| w.owner != getpid()) {
        // The parent's, closed at the fork (`in_child`).
        std::mem::forget(guard.take());
    }
    guard
}

fn with_set<R>(f: impl FnOnce(&mut Watching) -> R) -> nix::Result<R> {
    let mut guard = watching();
    if guard.is_none() {
        let set = ReadySet::new()?;
        SET_FD.store(set.fd().as_raw_fd(), Ordering::SeqCst);
        *guard = Some(Watching { set, owner: getpid(), wakes: HashMap::new() });
    }
    Ok(f(guard.as_mut().expect("made above")))
}

/// The descriptor the supervisor's event loop watches (made once).
pub fn set_fd() -> nix::Result<RawFd> {
    with_set(|w| w.set.fd().as_raw_fd())
}

/// Listens to the supervisor's end of a new worker's channel.
pub fn watch(end: BorrowedFd<'_>) -> nix::Result<()> {
    crate::sys::set_nonblocking(end)?;
    with_set(|w| {
        w.wakes.insert(end.as_raw_fd(), 0);
        w.set.add(end)
    })?
}

/// Stops listening to it (before it is closed).
pub fn unwatch(end: BorrowedFd<'_>) {
    let _ = with_set(|w| {
        if w.wakes.remove(&end.as_raw_fd()).is_some() {
            w.set.remove(end);
        }
    });
}

/// In the supervisor: reads what the workers that woke it wrote. A
/// channel at its end of file, or past `WAKES_PER_LIFE`, is listened to
/// no more.
pub fn drain() {
    let _ = with_set(|w| {
        for fd in w.set.ready() {
            let mut buffer = [0u8; 64];
            let read = nix::sys::socket::recv(fd, &mut buffer, nix::sys::socket::MsgFlags::MSG_DONTWAIT);
            let Some(wakes) = w.wakes.get_mut(&fd) else { continue };
            let ended = match read {
                Ok(0) => true,
                Ok(count) => {
                    *wakes = wakes.saturating_add(count as u32);
                    *wakes > WAKES_PER_LIFE
                }
                Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => false,
                Err(_) => true,
            };
            if ended {
                w.wakes.remove(&fd);
                // SAFETY: the supervisor's end, open until its `LeaveEnd`
                // is dropped, which unwatches it first.
                w.set.remove(unsafe { BorrowedFd::borrow_raw(fd) });
            }
        }
    });
}

/// In a worker: its end of its channel, from now on.
pub fn set_own_end(fd: RawFd) {
    OWN_END.store(fd, Ordering::SeqCst);
}

/// In a worker: wakes the supervisor to look at this worker's slot.
pub fn notify() {
    let fd = OWN_END.load(Ordering::Relaxed);
    if fd >= 0 {
        let flags = nix::sys::socket::MsgFlags::MSG_DONTWAIT | crate::sys::SEND_FLAGS;
        // A full channel already holds a wake: the byte may be dropped.
        let _ = nix::sys::socket::send(fd, &[1], flags);
    }
}

/// In any child, at the fork: the set is the parent's. Async-signal-safe.
pub fn in_child() {
    let fd = SET_FD.swap(-1, Ordering::SeqCst);
    if fd >= 0 {
        let _ = nix::unistd::close(fd);
    }
}
