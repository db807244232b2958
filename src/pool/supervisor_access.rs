//! The one door to the supervisor's state on its thread
//! (`with_supervisor`), and what follows each visit: systemd is told
//! where the pools stand (`notify`), the log entries made are handed out
//! (`report`), and an exit asked for is taken. Below the rooms that are
//! called from Tcl's loop (`metrics`, `generation`, `hooks`, `supervisor`).

use crate::tcl;

use super::notify;
use super::report::flush_entries;
use super::state::{Supervisor, SUPERVISOR};

/// Runs `f` on the supervisor's state, then hands out the log entries it
/// made. The state is never borrowed while Tcl code of the user runs, so
/// `f` cannot be re-entered.
pub(super) fn with_supervisor<R>(f: impl FnOnce(&mut Supervisor) -> R) -> R {
    let result = SUPERVISOR.with(|s| {
        let mut sup = s.borrow_mut();
        let result = f(&mut sup);
        notify::observe(&sup);
        result
    });
    flush_log();
    if SUPERVISOR.with(|s| s.try_borrow().is_ok_and(|s| s.exit_requested)) {
        tcl::exit(0);
    }
    result
}

/// Hands the collected log entries to their pools' `-log` commands.
fn flush_log() {
    let entries = SUPERVISOR.with(|s| s.try_borrow_mut().map(|mut s| std::mem::take(&mut s.log)).unwrap_or_default());
    flush_entries(entries);
}

/// Whether a pool of this process acts on its signals (`-signals 1`).
pub(super) fn pools_act_on_signals() -> bool {
    with_supervisor(|sup| sup.pools.iter().any(|p| p.config.signals))
}
