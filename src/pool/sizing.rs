//! A pool sized by its load: `-workers min-max` with spare targets, as
//! Apache's MinSpareServers/MaxSpareServers.
//!
//! The supervisor moves the pool's target, one worker at a time, and the
//! rest of the pool (`lifecycle`) follows it as it follows `pool resize`:
//! a missing worker is started, a surplus one retired (idle ones first).
//! One more worker is wanted when fewer than `-minspare` are idle or
//! starting, or when more connections wait in the queue than workers are
//! starting (the queue's depth, `pool info`'s `queued`);
//! one fewer when more than `-maxspare` have been idle for `-idletimeout`.
//! Never more than one change per `INTERVAL`, never while the last change
//! is still under way (a start not yet forked, a back-off after failures,
//! a reload whose generation is starting), never outside the range.
//!
//! A fixed `-workers N` is the range `N-N`: nothing here ever moves it.
//! The decision is `model::sizing`'s; this file parses `-workers`,
//! counts the load, logs the change and reports it.

use std::time::Instant;

use crate::tcl::{Interp, Obj, TclError, TclResult};

pub use super::model::sizing::Sizing;
use super::model::sizing::{Load, MAX_WORKERS};
use super::scoreboard::State;
use super::state::LogEntry;
use super::state::{Pool, Reload};

impl Sizing {
    /// Sets the spare targets: an option not given follows the other
    /// (a `-minspare` above the default `-maxspare` raises it, a
    /// `-maxspare` below the default `-minspare` lowers it).
    pub fn set_spares(&mut self, min_spare: Option<usize>, max_spare: Option<usize>) -> TclResult<()> {
        let (min_spare, max_spare) = Sizing::spares(min_spare, max_spare)
            .map_err(|message| TclError::new(message, &["TCL", "VALUE", "SPARE"]))?;
        self.min_spare = min_spare;
        self.max_spare = max_spare;
        Ok(())
    }
}

/// `-workers` (and `pool resize`): `N`, or a range `min-max`, each from 1
/// to `MAX_WORKERS`.
pub fn parse_workers(interp: Interp, value: &Obj) -> TclResult<(usize, usize)> {
    let text = value.to_string_lossy();
    let range = text.trim().split_once('-').filter(|(low, _)| !low.is_empty());
    let Some((low, high)) = range else {
        let n = crate::command::positive(interp, value)? as usize;
        return within_limit(n).map(|n| (n, n));
    };
    let bad = |why: String| TclError::new(format!("bad range \"{text}\": {why}"), &["TCL", "VALUE", "RANGE"]);
    let (Ok(low), Ok(high)) = (low.trim().parse::<i64>(), high.trim().parse::<i64>()) else {
        return Err(TclError::new(
            format!("expected positive integer or range min-max but got \"{text}\""),
            &["TCL", "VALUE", "NUMBER"],
        ));
    };
    if low < 1 {
        return Err(bad("the minimum must be at least 1".into()));
    }
    if high < low {
        return Err(bad(format!("the minimum {low} is above the maximum {high}")));
    }
    let low = within_limit(usize::try_from(low).unwrap_or(usize::MAX))?;
    let high = within_limit(usize::try_from(high).unwrap_or(usize::MAX))?;
    Ok((low, high))
}

fn within_limit(n: usize) -> TclResult<usize> {
    if n > MAX_WORKERS {
        return Err(TclError::new(
            format!("too many workers \"{n}\": must be at most {MAX_WORKERS}"),
            &["TCL", "VALUE", "NUMBER"],
        ));
    }
    Ok(n)
}

impl Pool {
    /// Moves the target one worker toward the load, when it is time to
    /// (`model::sizing`).
    pub(super) fn size_to_load(&mut self, now: Instant, entries: &mut Vec<LogEntry>) {
        let settled = !matches!(self.reload, Reload::Running { .. })
            && self.failures.healthy()
            && self.serving().count() == self.target;
        let mut load = Load::default();
        if settled {
            for child in self.serving() {
                match self.scoreboard.slot(child.slot).state() {
                    State::Idle => load.idle += 1,
                    State::Starting => load.starting += 1,
                    _ => load.busy += 1,
                }
            }
            // Accepted and not yet taken by a worker (`pool info`'s `queued`),
            // no more than the kernel says the queue holds.
            let unread = crate::sys::unread_payload_bytes(std::os::fd::AsFd::as_fd(&*self.queue));
            load.queued = usize::try_from(self.counters.queue.depth_at_most(unread)).unwrap_or(usize::MAX);
        }
        let Some(change) = self.config.sizing.decide(now, &mut self.target, settled, load) else { return };
        let mut fields =
            vec![("workers", Obj::new_int(self.target as i64)), ("reason", Obj::new_string(&change.reason))];
        if let Some(since) = change.after {
            fields.push(("after", Obj::new_double((since.as_secs_f64() * 1000.0).round() / 1000.0)));
        }
        entries.push(self.entry(if change.grow { "grow" } else { "shrink" }, fields));
    }

    /// Sets the range (`pool resize`, SIGTTIN/SIGTTOU) and puts the target
    /// inside it; returns the log entry.
    pub(super) fn set_range(&mut self, min: usize, max: usize) -> LogEntry {
        self.target = self.config.sizing.set_range(min, max, self.target);
        let mut fields = vec![("workers", Obj::new_int(self.target as i64))];
        if self.config.sizing.ranged() {
            fields = vec![
                ("workers", Obj::new_string(&self.config.sizing.range_text())),
                ("target", Obj::new_int(self.target as i64)),
            ];
        }
        self.entry("resize", fields)
    }

    /// The figures of `pool info` that say how the pool is sized.
    pub(super) fn sizing_info(&self) -> Vec<(&'static str, Obj)> {
        let sizing = &self.config.sizing;
        let idle = self.serving().filter(|c| self.scoreboard.slot(c.slot).state() == State::Idle).count();
        vec![
            ("minworkers", Obj::new_int(sizing.min as i64)),
            ("maxworkers", Obj::new_int(sizing.max as i64)),
            ("minspare", Obj::new_int(sizing.min_spare as i64)),
            ("maxspare", Obj::new_int(sizing.max_spare as i64)),
            ("idletimeout", Obj::new_double(sizing.idle_timeout.as_secs_f64())),
            ("idle", Obj::new_int(idle as i64)),
            ("grown", Obj::new_int(sizing.grown as i64)),
            ("shrunk", Obj::new_int(sizing.shrunk as i64)),
            ("sizing", Obj::new_string(&sizing.reason)),
        ]
    }
}
