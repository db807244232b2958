//! Reload progress: a reload starts a new generation; it is done once the
//! new generation's workers are ready (as many as the target), and
//! abandoned after `RELOAD_FAILURES` failed starts in a row, when the
//! generation that served before it serves on and is restored to the
//! target; the abandoned generation's workers, ready ones included, are
//! told to leave as the old one's become ready again, and none of it is
//! forked any more. The next reload tries again.

use super::backoff::{FailureRun, RELOAD_FAILURES};

/// Where the last reload stands, for `pool info`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reload {
    None,
    /// Its workers are starting; `previous` is the generation serving
    /// before it, which serves on if it is abandoned.
    Running {
        previous: u32,
    },
    Done,
    Failed {
        reason: String,
    },
}

/// How a running reload ended in this turn of the loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settled {
    Done,
    /// Given up: `serve` is the generation that serves on; `failures` in
    /// a row, the last for `reason`.
    Abandoned {
        serve: u32,
        failures: u32,
        reason: String,
    },
}

impl Reload {
    pub fn running(&self) -> bool {
        matches!(self, Reload::Running { .. })
    }

    /// Starts a reload of a pool serving `serving`. A reload during a
    /// reload keeps the generation that served before both, to fall back on.
    pub fn start(&mut self, serving: u32) {
        let previous = match self {
            Reload::Running { previous } => *previous,
            _ => serving,
        };
        *self = Reload::Running { previous };
    }

    /// The generation whose workers serve on, starting ones included,
    /// while `current` starts: the one before a running reload, else
    /// `current` itself.
    pub fn fallback(&self, current: u32) -> u32 {
        match self {
            Reload::Running { previous } => *previous,
            _ => current,
        }
    }

    /// Ends a running reload when its generation is ready (`ready` of
    /// `target`), or abandons it after too many failures in a row (which
    /// then end: the generation that serves on is not backed off). The
    /// one that served before the reload serves on, even when a few of
    /// the abandoned generation's workers are ready: a generation that
    /// served is known to work, one that fails 5 times in a row is not
    /// (serving on with its few ready workers, it was forked and backed
    /// off for good and the old one never restored).
    pub fn settle(&mut self, ready: usize, target: usize, failures: &mut FailureRun) -> Option<Settled> {
        let Reload::Running { previous } = *self else { return None };
        if ready >= target {
            *self = Reload::Done;
            return Some(Settled::Done);
        }
        if failures.failures < RELOAD_FAILURES {
            return None;
        }
        let reason = std::mem::take(&mut failures.last_failure);
        let count = failures.failures;
        failures.end();
        *self = Reload::Failed { reason: reason.clone() };
        Some(Settled::Abandoned { serve: previous, failures: count, reason })
    }
}
