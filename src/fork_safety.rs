//! Forking while other threads run.
//!
//! `fork` copies only the calling thread. A lock that another thread holds
//! at that moment stays held forever in the child, so the child would hang
//! the first time it takes it. The process-wide locks of this library (the
//! port table, and the exit flag that receivers read while queueing events)
//! are therefore taken before every `fork` in the process, whoever calls it
//! (our pool, TclX's `fork`, C code), and released on both sides after it:
//! `pthread_atfork`. No other thread can then be inside them at the fork.

use std::cell::RefCell;
use std::sync::{MutexGuard, Once, RwLockWriteGuard};

use crate::port_table::{self, PortTable};
use crate::registration;

/// The locks held across a `fork`, on the forking thread.
struct Held {
    _exiting: RwLockWriteGuard<'static, bool>,
    _table: MutexGuard<'static, PortTable>,
}

thread_local! {
    static HELD: RefCell<Option<Held>> = const { RefCell::new(None) };
}

/// Installs the fork handlers once per process.
pub fn install() {
    static INSTALLED: Once = Once::new();
    INSTALLED.call_once(|| {
        // SAFETY: the handlers are plain functions that live as long as the
        // process (Tcl never unloads a library that is in use).
        unsafe { libc::pthread_atfork(Some(before_fork), Some(after_fork), Some(after_fork)) };
    });
}

extern "C" fn before_fork() {
    // Always in the same order: the exit flag, then the table.
    let held = Held { _exiting: registration::lock_exit_flag(), _table: port_table::lock() };
    let _ = HELD.try_with(|slot| *slot.borrow_mut() = Some(held));
}

/// In the parent and in the child alike: release what `before_fork` took.
extern "C" fn after_fork() {
    let _ = HELD.try_with(|slot| slot.borrow_mut().take());
}
