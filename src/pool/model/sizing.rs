//! A pool sized by its load: the target moves one worker at a time
//! between `-workers min-max`, as Apache's MinSpareServers and
//! MaxSpareServers: one more when fewer than `-minspare` are idle or
//! starting, or when more connections wait in the queue than workers are
//! starting; one fewer when more than `-maxspare` have been idle for
//! `-idletimeout`. Never more than one change per `INTERVAL`, never while
//! the last change is still under way, never outside the range.

use std::time::{Duration, Instant};

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
/// Workers a pool may have at most (`-workers`, SIGTTIN).
pub const MAX_WORKERS: usize = 512;

/// A pool's range of workers, its spare targets, and what it did last.
#[derive(Clone, Debug)]
pub struct Sizing {
    pub min: usize,
    pub max: usize,
    pub min_spare: usize,
    pub max_spare: usize,
    pub idle_timeout: Duration,
    last_change: Option<Instant>,
    /// Since when more than `max_spare` workers have been idle.
    surplus_since: Option<Instant>,
    pub grown: u64,
    pub shrunk: u64,
    /// Why the target last moved, as the log said it: "grow: 0 idle, 3 busy".
    pub reason: String,
}

/// The workers that count toward the target, by what they do, and the
/// connections waiting in the queue.
#[derive(Clone, Copy, Default, Debug)]
pub struct Load {
    pub idle: usize,
    pub busy: usize,
    pub starting: usize,
    pub queued: usize,
}

/// A move of the target.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub grow: bool,
    /// For the log: "0 idle, 3 busy", "5 idle for 10.0 s".
    pub reason: String,
    /// Since the last change.
    pub after: Option<Duration>,
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

    /// Spare targets from the options given: one not given follows the
    /// other; `Err` with the message when `-maxspare` is below `-minspare`.
    pub fn spares(min_spare: Option<usize>, max_spare: Option<usize>) -> Result<(usize, usize), String> {
        let (min_spare, max_spare) = match (min_spare, max_spare) {
            (Some(low), Some(high)) => (low, high),
            (Some(low), None) => (low, low.max(DEFAULT_MAX_SPARE)),
            (None, Some(high)) => (high.min(DEFAULT_MIN_SPARE), high),
            (None, None) => (DEFAULT_MIN_SPARE, DEFAULT_MAX_SPARE),
        };
        if max_spare < min_spare {
            return Err(format!("bad spare targets: -maxspare {max_spare} is below -minspare {min_spare}"));
        }
        Ok((min_spare, max_spare))
    }

    pub fn ranged(&self) -> bool {
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
    /// move; a fixed pool moves by one. At 1 (down) or `MAX_WORKERS` (up)
    /// nothing moves: clamping each bound alone would narrow the range for
    /// good (`2-4`, three TTOU, three TTIN gave a fixed 4).
    pub fn shifted(&self, up: bool) -> (usize, usize) {
        if up && self.max < MAX_WORKERS {
            (self.min + 1, self.max + 1)
        } else if !up && self.min > 1 {
            (self.min - 1, self.max - 1)
        } else {
            (self.min, self.max)
        }
    }

    /// Sets the range; returns `target` put inside it.
    pub fn set_range(&mut self, min: usize, max: usize, target: usize) -> usize {
        self.min = min;
        self.max = max;
        self.surplus_since = None;
        target.clamp(min, max)
    }

    /// Where a ranged pool's target starts: its minimum, or the size of
    /// the generation it replaces (`inherited`, an upgrade), within range.
    pub fn initial(&self, inherited: Option<usize>) -> usize {
        inherited.map_or(self.min, |n| n.clamp(self.min, self.max))
    }

    /// Moves `target` one worker toward the load, when it is time to.
    /// `settled`: no change under way (no reload starting, no failures
    /// backing off, every worker of the target started). While one is,
    /// nothing moves, but the idle timer runs on: a worker that recycles
    /// itself is replaced in a moment, and must not restart the wait for
    /// a shrink (8 idle workers stayed 12 s under light load when it did).
    pub fn decide(&mut self, now: Instant, target: &mut usize, settled: bool, load: Load) -> Option<Change> {
        if !self.ranged() {
            self.surplus_since = None;
            return None;
        }
        if !settled {
            return None;
        }
        let Load { idle, busy, starting, queued } = load;
        // A worker starting counts as idle for the wait: the replacement of
        // a recycled worker (whose turn holder no longer counts) is one in
        // a moment, and must not restart it (a pool recycling every few
        // connections never shrank under light load when it did).
        let surplus_since =
            if idle + starting > self.max_spare { Some(self.surplus_since.unwrap_or(now)) } else { None };
        self.surplus_since = surplus_since;
        let since_last = self.last_change.map(|at| now.saturating_duration_since(at));
        if since_last.is_some_and(|since| since < INTERVAL) {
            return None;
        }
        let counts = format!(
            "{idle} idle, {busy} busy{}",
            if starting > 0 { format!(", {starting} starting") } else { String::new() }
        );
        let idle_for = surplus_since.map(|since| now.saturating_duration_since(since));
        let (grow, reason) = if *target < self.max && idle + starting < self.min_spare {
            (true, counts)
        } else if *target < self.max && queued > starting {
            (true, format!("{counts}, {queued} queued"))
        } else if *target > self.min && idle > 0 && idle_for.is_some_and(|idle_for| idle_for >= self.idle_timeout) {
            (false, format!("{idle} idle for {:.1} s", idle_for.unwrap_or_default().as_secs_f64()))
        } else {
            return None;
        };
        if grow {
            *target += 1;
            self.grown += 1;
        } else {
            *target -= 1;
            self.shrunk += 1;
        }
        self.last_change = Some(now);
        self.reason = format!("{}: {reason}", if grow { "grow" } else { "shrink" });
        Some(Change { grow, reason, after: since_last })
    }
}

#[cfg(test)]
mod shift_tests {
    use super::*;

    fn range(min: usize, max: usize) -> Sizing {
        let mut sizing = Sizing::fixed(1);
        sizing.set_range(min, max, min);
        sizing
    }

    #[test]
    fn a_shift_keeps_the_range_width_at_its_ends() {
        let mut sizing = range(2, 4);
        for _ in 0..3 {
            let (min, max) = sizing.shifted(false);
            sizing.set_range(min, max, min);
        }
        assert_eq!((sizing.min, sizing.max), (1, 3));
        for _ in 0..3 {
            let (min, max) = sizing.shifted(true);
            sizing.set_range(min, max, min);
        }
        assert_eq!((sizing.min, sizing.max), (4, 6));
        assert_eq!(range(MAX_WORKERS - 2, MAX_WORKERS).shifted(true), (MAX_WORKERS - 2, MAX_WORKERS));
    }
}
