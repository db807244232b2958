//! Reload progress: a reload starts a new generation; it is done once the
//! new generation's workers are ready (as many as the target), and
//! abandoned after `RELOAD_FAILURES` failed starts in a row, when the
//! newest generation that still has a ready worker serves on (the one
//! that served before the reload, unless a reload during this one got
//! that far) and the next reload tries again.

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
    /// then end: the generation that serves on is not backed off);
    /// `newest_ready` names the newest generation with a ready worker.
    pub fn settle(
        &mut self,
        ready: usize,
        target: usize,
        failures: &mut FailureRun,
        newest_ready: impl FnOnce() -> Option<u32>,
    ) -> Option<Settled> {
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
        Some(Settled::Abandoned { serve: newest_ready().unwrap_or(previous), failures: count, reason })
    }
}
