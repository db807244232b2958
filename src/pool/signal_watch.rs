//! A pool's signals taken over by the script: TclX's `signal trap` (or any
//! `sigaction`) after `pool create` replaces the pool's handler, and HUP
//! stops reloading, TERM exits without a graceful stop. The supervisor
//! looks at its dispositions at each tick (`sigaction` with no new action
//! only reads) and says once, in the log (`signal-replaced`) and in `pool
//! info` (`signalsreplaced`), which signal it has lost. It does not take
//! the signal back: the script asked for it. A pool that should leave a
//! signal to the script is made with `-signals 0`.

use std::cell::RefCell;

use nix::sys::signal::Signal;

use crate::tcl::Obj;

use super::signals;
use super::state::Supervisor;

thread_local! {
    /// The signals found replaced and reported, while they stay so.
    static REPORTED: RefCell<Vec<Signal>> = const { RefCell::new(Vec::new()) };
}

/// Logs each signal of the pools newly found with another handler.
pub(super) fn check(sup: &mut Supervisor) {
    let replaced = signals::replaced();
    let new: Vec<Signal> = REPORTED.with(|reported| {
        let mut reported = reported.borrow_mut();
        // One taken back (a pool made since holds it again) may be lost again.
        reported.retain(|s| replaced.contains(s));
        let new: Vec<Signal> = replaced.iter().copied().filter(|s| !reported.contains(s)).collect();
        reported.extend(&new);
        new
    });
    for signal in new {
        let message = if signal == Signal::SIGCHLD {
            // Workers are still reaped and replaced at each tick; ignored
            // (TclX's `signal ignore SIGCHLD`), the kernel reaps them first.
            "another handler was set after pool create: worker exits are seen at the next tick, \
             and while SIGCHLD is ignored their status is lost (logged as unknown)"
        } else {
            "another handler was set after pool create; the pool no longer sees it"
        };
        for index in 0..sup.pools.len() {
            let entry = sup.pools[index].entry(
                "signal-replaced",
                vec![("signal", Obj::new_string(signal.as_str())), ("message", Obj::new_string(message))],
            );
            sup.log.push(entry);
        }
    }
}

/// The names of the signals the pools have lost, for `pool info`.
pub(super) fn replaced_names() -> Obj {
    REPORTED.with(|reported| {
        Obj::new_list(&reported.borrow().iter().map(|s| Obj::new_string(s.as_str())).collect::<Vec<_>>())
    })
}
