//! `-inittimeout`: a worker that is not ready (its `-init` done, waiting
//! for connections) in time is killed, and counted as a failed start, so
//! that an `-init` that hangs backs off as one that fails does (`reap`).
//! The failure is counted at the kill, before the replacement is forked
//! (`model::backoff`). Apart from the busy `-timeout`, which is for
//! workers that serve.

use nix::sys::signal::{kill, Signal};

use crate::tcl::Obj;

use super::model::timeouts::init_overdue;
use super::model::Kill;
use super::scoreboard::State;
use super::state::LogEntry;
use super::state::Pool;

impl Pool {
    pub(super) fn kill_slow_starters(&mut self, entries: &mut Vec<LogEntry>) {
        let Some(limit) = self.config.init_timeout else { return };
        for index in 0..self.children.len() {
            let child = &self.children[index];
            let now = std::time::Instant::now();
            if child.killed.is_some()
                || child.retired.is_some()
                || self.scoreboard.slot(child.slot).state() != State::Starting
                || !init_overdue(child.forked, now, limit)
            {
                continue;
            }
            let pid = child.pid;
            let _ = kill(pid, Signal::SIGKILL);
            self.children[index].killed = Some(Kill::InitTimeout);
            self.totals.init_timed_out += 1;
            entries.push(self.entry(
                "inittimeout",
                vec![
                    ("pid", Obj::new_int(pid.as_raw().into())),
                    ("generation", Obj::new_int(self.children[index].generation.into())),
                    ("after", Obj::new_double(limit.as_secs_f64())),
                ],
            ));
            // A failed start, counted now, as the kill is decided: its
            // replacement waits for the back-off (counted at the reap, it
            // was forked before the failure was known and not backed off).
            let reason = format!("not ready within -inittimeout ({} s)", limit.as_secs_f64());
            let forked = self.children[index].forked;
            entries.extend(self.count_failed_start(reason, forked, now));
        }
    }
}
