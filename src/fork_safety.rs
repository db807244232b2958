//! Forking while other threads run.
//!
//! `fork` copies only the calling thread. A lock that another thread holds
//! at that moment stays held forever in the child, so the child would hang
//! the first time it takes it. The process-wide locks of this library (the
//! port table, the exit flag that receivers read while queueing events, the
//! pool's process-wide state) are therefore taken before every `fork` in
//! the process, whoever calls it (our pool, TclX's `fork`, C code), and
//! released on both sides after it: `pthread_atfork`. No other thread can
//! then be inside them at the fork.
//!
//! This room is a registry and imports nobody: each room that owns such a
//! lock, or state that a child must not keep, registers its steps with
//! `on_fork` (before the fork, then in the parent or in the child), as
//! `pthread_atfork` itself does. They run in the order they were
//! registered, on the forking thread.
//!
//! Descriptors are the other hazard: a child gets a copy of every one,
//! including a connection the accepting thread holds at that moment, and a
//! copy left open keeps the client's connection open after its worker has
//! closed it. The accepting thread publishes the connection it holds, under
//! `hold_off_forks`, and the child closes its copies of everything the port
//! table owns (listeners, accept ends, connections in hand) at once. A fork
//! must never wait for a client, so the accept itself is not under the
//! guard: a connection accepted an instant before the fork and not yet
//! published is found by a pool's new worker among its descriptors, by its
//! local address, and closed (`listener::close_copied_connections`).

use std::cell::RefCell;
use std::sync::{Mutex, MutexGuard, Once, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Taken for reading around short stretches that must not be split by a
/// fork; for writing by `before_fork`.
static FORK_GUARD: RwLock<()> = RwLock::new(());

/// Keeps any `fork` in the process waiting until the guard is dropped.
pub fn hold_off_forks() -> RwLockReadGuard<'static, ()> {
    FORK_GUARD.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What a room does around every fork of the process.
struct Steps {
    prepare: fn(),
    parent: fn(),
    child: fn(),
}

/// The registered steps; locked across each fork, so that a registration
/// cannot come between a room's `prepare` and its `child`.
static STEPS: Mutex<Vec<Steps>> = Mutex::new(Vec::new());

/// The locks held across a `fork`, on the forking thread.
struct Held {
    _forks: RwLockWriteGuard<'static, ()>,
    steps: MutexGuard<'static, Vec<Steps>>,
}

thread_local! {
    static HELD: RefCell<Option<Held>> = const { RefCell::new(None) };
}

/// Runs `prepare` before every fork of the process, on the forking thread,
/// and `parent` or `child` after it, on each side. Plain functions: they
/// live as long as the process, and may take no lock a step runs under.
pub fn on_fork(prepare: fn(), parent: fn(), child: fn()) {
    install();
    STEPS.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).push(Steps { prepare, parent, child });
}

/// Installs the fork handlers once per process.
fn install() {
    static INSTALLED: Once = Once::new();
    INSTALLED.call_once(|| {
        // SAFETY: the handlers are plain functions that live as long as the
        // process (Tcl never unloads a library that is in use).
        unsafe { libc::pthread_atfork(Some(before_fork), Some(in_parent), Some(in_child)) };
    });
}

extern "C" fn before_fork() {
    let forks = FORK_GUARD.write().unwrap_or_else(|poisoned| poisoned.into_inner());
    let steps = STEPS.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    steps.iter().for_each(|step| (step.prepare)());
    let held = Held { _forks: forks, steps };
    let _ = HELD.try_with(|slot| *slot.borrow_mut() = Some(held));
}

extern "C" fn in_parent() {
    let _ = HELD.try_with(|slot| {
        if let Some(held) = slot.borrow_mut().take() {
            held.steps.iter().for_each(|step| (step.parent)());
        }
    });
}

extern "C" fn in_child() {
    let _ = HELD.try_with(|slot| {
        if let Some(held) = slot.borrow_mut().take() {
            held.steps.iter().for_each(|step| (step.child)());
        }
    });
}
