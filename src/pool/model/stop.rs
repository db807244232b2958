//! Stop progress: a stop closes the port at once (the shell's part) and
//! gives the workers `-graceful` to finish what they hold; when it is
//! over, those still there are killed. Every connection accepted before
//! the stop is served: while some wait in the queue and no worker will
//! take them (recycled, dead), one more worker is started for them,
//! given up after `RELOAD_FAILURES` failed starts in a row. The pool is
//! gone once no worker is left and nothing waits.

use std::time::{Duration, Instant};

use super::backoff::RELOAD_FAILURES;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Running,
    Stopping { deadline: Instant },
}

impl Phase {
    pub fn stopping(&self) -> bool {
        matches!(self, Phase::Stopping { .. })
    }

    /// Stops, with `graceful` to finish, or now (`at_once`: a second stop
    /// signal does not wait for busy workers); whether the stop is new
    /// (a stop under way is only hurried).
    pub fn stop(&mut self, now: Instant, graceful: Duration, at_once: bool) -> bool {
        let deadline = if at_once { now } else { now + graceful };
        match self {
            Phase::Running => {
                *self = Phase::Stopping { deadline };
                true
            }
            Phase::Stopping { deadline: before } => {
                if at_once {
                    *before = deadline;
                }
                false
            }
        }
    }

    /// When workers still there are killed: the stop's deadline, or, for
    /// a pool that runs, `graceful` from `now`.
    pub fn deadline(&self, now: Instant, graceful: Duration) -> Instant {
        match *self {
            Phase::Stopping { deadline } => deadline,
            Phase::Running => now + graceful,
        }
    }

    /// The graceful period is over: workers still there are killed.
    pub fn graceful_over(&self, now: Instant) -> bool {
        matches!(*self, Phase::Stopping { deadline } if now >= deadline)
    }
}

/// Whether what is queued still waits to be served during a stop, before
/// the deadline and while starts for it have not failed too often in a
/// row (`pending` peeks at the queue: asked last).
pub fn queue_to_serve(now: Instant, deadline: Instant, failures: u32, pending: impl FnOnce() -> bool) -> bool {
    now < deadline && failures < RELOAD_FAILURES && pending()
}
