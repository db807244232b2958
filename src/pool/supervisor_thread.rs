//! Which thread of the process runs its pools: a pool made in another
//! thread would share the process's signals and pipe with the first, and
//! the signals act on one thread's pools only. A leaf: it knows nothing of
//! the pools themselves.

use std::sync::Mutex;

use nix::unistd::Pid;

use crate::tcl::{TclError, TclResult};

/// The thread that runs the pools of this process, while it has any: a
/// pool made in another thread would share the process's signals and
/// pipe with it, and the signals act on one thread's pools only.
static SUPERVISOR_THREAD: Mutex<Option<(Pid, std::thread::ThreadId)>> = Mutex::new(None);

/// Whether this thread may run pools: no other thread of this process does.
/// Setting a signal hook claims the thread too (`hooks`).
pub(super) fn claim_supervisor_thread() -> TclResult<()> {
    let mut owner = SUPERVISOR_THREAD.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let here = (nix::unistd::getpid(), std::thread::current().id());
    match *owner {
        Some((pid, thread)) if pid == here.0 && thread != here.1 => {
            Err(TclError::new("pools of this process are run by another thread", &["SOCKETSERVER", "POOL", "THREAD"]))
        }
        _ => {
            *owner = Some(here);
            Ok(())
        }
    }
}

/// Lets another thread run pools; returns whether this one did.
pub(super) fn release_supervisor_thread() -> bool {
    let mut owner = SUPERVISOR_THREAD.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let ours = *owner == Some((nix::unistd::getpid(), std::thread::current().id()));
    if ours {
        *owner = None;
    }
    ours
}

/// Whether another thread of this process runs pools now.
pub(super) fn pools_run_by_another_thread() -> bool {
    let owner = SUPERVISOR_THREAD.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    matches!(*owner, Some((pid, thread)) if pid == nix::unistd::getpid() && thread != std::thread::current().id())
}

pub(super) fn not_here() -> TclError {
    TclError::new(
        "pools are run by the process that created them, not by its workers",
        &["SOCKETSERVER", "POOL", "WORKER"],
    )
}
