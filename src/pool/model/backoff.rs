//! Failed starts in a row, and the back-off between tries (as Erlang/OTP
//! supervisors bound their restart intensity): after a failure, one worker
//! tries at a time, after a delay that doubles from `FIRST` up to `CAP`;
//! a worker forked after the last failure that proves the code works
//! ends the run.

use std::time::{Duration, Instant};

/// A worker forked after the last failure that is ready this long (or
/// has served) ends the run.
pub const YOUNG: Duration = Duration::from_secs(1);
/// Failures in a row after which a reload is abandoned.
pub const RELOAD_FAILURES: u32 = 5;
/// Back-off after the first failure, doubled for each further one...
const FIRST: Duration = Duration::from_millis(100);
/// ...up to this.
pub const CAP: Duration = Duration::from_secs(30);

/// The back-off before the next try after `failures` failures in a row.
pub fn delay(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    (FIRST * 2u32.pow(doublings)).min(CAP)
}

/// A run of failed starts.
#[derive(Default, Debug, Clone)]
pub struct FailureRun {
    /// Failures in a row; while non-zero, one worker at a time is tried.
    pub failures: u32,
    retry_at: Option<Instant>,
    /// When the last failure was counted: only the death of a worker
    /// forked after it is one more failure in a row (those forked before
    /// were started before anything was known, and die of the same cause).
    failed_at: Option<Instant>,
    /// Why the last worker failed, as the log says it.
    pub last_failure: String,
}

impl FailureRun {
    pub fn failed_at(&self) -> Option<Instant> {
        self.failed_at
    }

    /// Whether replacements can be started now: no failure in a row.
    pub fn healthy(&self) -> bool {
        self.failures == 0
    }

    /// Counts a failed start (of a worker forked at `forked`; `None`: no
    /// worker could be forked); returns the back-off before the next try,
    /// or `None` when it was counted already: workers killed together,
    /// or a whole generation whose `-init` fails, are one failure in a
    /// row, not one each. A worker killed at `-inittimeout` is counted at
    /// its kill, before its replacement is forked (counted at its exit,
    /// the replacement forked meanwhile was "forked before the failure"
    /// and its own failure was not backed off).
    ///
    pub fn count(&mut self, reason: String, forked: Option<Instant>, now: Instant) -> Option<Duration> {
        self.last_failure = reason;
        if forked.zip(self.failed_at).is_some_and(|(forked, failed_at)| forked <= failed_at) {
            return None;
        }
        self.failures += 1;
        self.failed_at = Some(now);
        let delay = delay(self.failures);
        self.retry_at = Some(now + delay);
        Some(delay)
    }

    pub fn end(&mut self) {
        self.failures = 0;
        self.retry_at = None;
        self.failed_at = None;
    }

    /// Whether a worker forked at `forked` was forked after the last
    /// failure (it can say something about the code that failed).
    pub fn forked_since(&self, forked: Instant) -> bool {
        self.failed_at.is_some_and(|at| forked > at)
    }

    /// Whether a worker forked at `forked`, ready since `ready_at`,
    /// `served` connections, ends the run at `now`: forked or become ready
    /// after the failure, and lived a while or served (a pool that
    /// recycles after a few connections has workers that never live long
    /// under load). Ready after the failure whenever it was forked: the
    /// replacement of a recycled worker, forked before that worker was
    /// killed, may be the only worker left to start, and a run that only
    /// a later fork could end would stop recycling and sizing for good.
    pub fn proven_by(&self, forked: Instant, ready_at: Option<Instant>, served: u64, now: Instant) -> bool {
        (self.forked_since(forked) || ready_at.is_some_and(|at| self.forked_since(at)))
            && (now.saturating_duration_since(forked) >= YOUNG || served > 0)
    }

    /// How many of `wanted` workers may be forked now: all of them, or,
    /// while failures back off, one when its turn has come and no other
    /// try (`trying`) is still under way.
    pub fn forks_allowed(&mut self, now: Instant, wanted: usize, trying: bool) -> usize {
        if self.failures == 0 {
            wanted
        } else if trying {
            0
        } else if self.retry_at.is_none_or(|at| now >= at) {
            self.retry_at = Some(now + delay(self.failures));
            wanted.min(1)
        } else {
            0
        }
    }
}
