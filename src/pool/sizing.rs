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

use std::time::{Duration, Instant};

use crate::tcl::{Interp, Obj, TclError, TclResult};

use super::lifecycle::{Pool, Reload};
use super::report::LogEntry;
use super::scoreboard::State;
use super::supervisor::MAX_WORKERS;

/// At most one start (or one retirement) per this long. Apache's prefork
/// looks once a second and then starts 1, 2, 4 ... 32 at once; we look at
/// every tick (100 ms) and at every worker that becomes ready, so one
/// start at a time, each seen ready (or failed) before the next is
/// counted, reaches 16 workers in about 3 s without a burst of forks
/// that would compete with the workers already serving for the CPU.
pub const INTERVAL: Duration = Duration::from_millis(200);
pub const DEFAULT_MIN_SPARE: usize = 1;
pub const DEFAULT_MAX_SPARE: usize = 4;
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// A pool's range of workers, its spare targets, and what it did last.
pub struct Sizing {
    pub min: usize,
    pub max: usize,
    pub min_spare: usize,
    pub max_spare: usize,
    pub idle_timeout: Duration,
    last_change: Option<Instant>,
    /// Since when more than `max_spare` workers have been idle.
    surplus_since: Option<Instant>,
    grown: u64,
    shrunk: u64,
    /// Why the target last moved, as the log said it: "grow: 0 idle, 3 busy".
    reason: String,
}

impl Sizing {
    /// A fixed pool of `workers`, with the default spare targets.
    pub fn fixed(workers: usize) -> Sizing {
        Sizing {
            min: workers,
            max: workers,
            min_spare: DEFAULT_MIN_SPARE,
            max_spare: DEFAULT_MAX_SPARE,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            last_change: None,
            surplus_since: None,
            grown: 0,
            shrunk: 0,
            reason: String::new(),
        }
    }

    /// Sets the spare targets: an option not given follows the other
    /// (a `-minspare` above the default `-maxspare` raises it, a
    /// `-maxspare` below the default `-minspare` lowers it).
    pub fn set_spares(&mut self, min_spare: Option<usize>, max_spare: Option<usize>) -> TclResult<()> {
        let (min_spare, max_spare) = match (min_spare, max_spare) {
            (Some(low), Some(high)) => (low, high),
            (Some(low), None) => (low, low.max(DEFAULT_MAX_SPARE)),
            (None, Some(high)) => (high.min(DEFAULT_MIN_SPARE), high),
            (None, None) => (DEFAULT_MIN_SPARE, DEFAULT_MAX_SPARE),
        };
        if max_spare < min_spare {
            return Err(TclError::new(
                format!("bad spare targets: -maxspare {max_spare} is below -minspare {min_spare}"),
                &["TCL", "VALUE", "SPARE"],
            ));
        }
        self.min_spare = min_spare;
        self.max_spare = max_spare;
        Ok(())
    }

    fn ranged(&self) -> bool {
        self.min < self.max
    }

    /// The range as `-workers` takes it: `4`, or `2-16`.
    pub fn range_text(&self) -> String {
        if self.ranged() {
            format!("{}-{}", self.min, self.max)
        } else {
            self.min.to_string()
        }
    }

    /// The range one worker up (SIGTTIN) or down (SIGTTOU): both bounds
    /// move, within 1 and `MAX_WORKERS`; a fixed pool moves by one, as it
    /// always did.
    pub fn shifted(&self, up: bool) -> (usize, usize) {
        if up {
            ((self.min + 1).min(MAX_WORKERS), (self.max + 1).min(MAX_WORKERS))
        } else {
            (self.min.saturating_sub(1).max(1), self.max.saturating_sub(1).max(1))
        }
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
    /// Moves the target one worker toward the load, when it is time to.
    pub(super) fn size_to_load(&mut self, now: Instant, entries: &mut Vec<LogEntry>) {
        if !self.config.sizing.ranged()
            || matches!(self.reload, Reload::Running { .. })
            || self.failures > 0
            || self.serving().count() != self.target
        {
            // Fixed, or the last change (or a replacement) is under way.
            self.config.sizing.surplus_since = None;
            return;
        }
        let (mut idle, mut busy, mut starting) = (0, 0, 0);
        for child in self.serving() {
            match self.scoreboard.slot(child.slot).state() {
                State::Idle => idle += 1,
                State::Starting => starting += 1,
                _ => busy += 1,
            }
        }
        let sizing = &self.config.sizing;
        let surplus_since = if idle > sizing.max_spare { Some(sizing.surplus_since.unwrap_or(now)) } else { None };
        self.config.sizing.surplus_since = surplus_since;
        let sizing = &self.config.sizing;
        let since_last = sizing.last_change.map(|at| now.saturating_duration_since(at));
        if since_last.is_some_and(|since| since < INTERVAL) {
            return;
        }
        // Accepted and not yet taken by a worker (`pool info`'s `queued`):
        // more than the workers starting will take.
        let queued = usize::try_from(self.counters.queue.depth()).unwrap_or(usize::MAX);
        let counts = format!(
            "{idle} idle, {busy} busy{}",
            if starting > 0 { format!(", {starting} starting") } else { String::new() }
        );
        let (event, reason) = if self.target < sizing.max && idle + starting < sizing.min_spare {
            ("grow", counts)
        } else if self.target < sizing.max && queued > starting {
            ("grow", format!("{counts}, {queued} queued"))
        } else if self.target > sizing.min
            && surplus_since.is_some_and(|since| now.saturating_duration_since(since) >= sizing.idle_timeout)
        {
            let idle_for = surplus_since.map(|since| now.saturating_duration_since(since)).unwrap_or_default();
            ("shrink", format!("{idle} idle for {:.1} s", idle_for.as_secs_f64()))
        } else {
            return;
        };
        if event == "grow" {
            self.target += 1;
            self.config.sizing.grown += 1;
        } else {
            self.target -= 1;
            self.config.sizing.shrunk += 1;
        }
        let sizing = &mut self.config.sizing;
        sizing.last_change = Some(now);
        sizing.reason = format!("{event}: {reason}");
        let mut fields = vec![("workers", Obj::new_int(self.target as i64)), ("reason", Obj::new_string(&reason))];
        if let Some(since) = since_last {
            fields.push(("after", Obj::new_double((since.as_secs_f64() * 1000.0).round() / 1000.0)));
        }
        entries.push(self.entry(event, fields));
    }

    /// Sets the range (`pool resize`, SIGTTIN/SIGTTOU) and puts the target
    /// inside it; returns the log entry.
    pub(super) fn set_range(&mut self, min: usize, max: usize) -> LogEntry {
        let sizing = &mut self.config.sizing;
        sizing.min = min;
        sizing.max = max;
        sizing.surplus_since = None;
        self.target = self.target.clamp(min, max);
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
