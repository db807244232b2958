//! Busy time on the supervisor's own clock. A worker says in its slot
//! since when it holds its oldest connection; that is a claim, not a
//! fact (a worker may be hostile, and may write any number there). The
//! supervisor times a busy period from when it first observed it, and a
//! new period from when it saw the claimed start move: a forged start (0,
//! 1, or far in the past) changes nothing but that worker's own fate.

use std::time::{Duration, Instant};

/// One worker's busy period, as the supervisor observed it.
#[derive(Default, Clone, Copy, Debug)]
pub struct BusyWatch {
    /// The start the worker claimed, and when the supervisor first saw it.
    seen: Option<(u64, Instant)>,
}

impl BusyWatch {
    /// Records what the slot says now (`claimed`: the start of its oldest
    /// connection, 0 while it holds none); returns how long the worker has
    /// been busy on the supervisor's clock.
    pub fn observe(&mut self, claimed: u64, now: Instant) -> Option<Duration> {
        if claimed == 0 {
            self.seen = None;
            return None;
        }
        let (_, since) = match self.seen {
            Some((before, since)) if before == claimed => (before, since),
            _ => (claimed, now),
        };
        self.seen = Some((claimed, since));
        Some(now.saturating_duration_since(since))
    }
}

/// Whether a worker forked at `forked`, still starting at `now`, is past
/// `-inittimeout`.
pub fn init_overdue(forked: Instant, now: Instant, limit: Duration) -> bool {
    now.saturating_duration_since(forked) > limit
}

/// Whether a worker that was asked to leave (or said it leaves, unasked)
/// at `since`, and is still there at `now`, has overstayed: it claims to
/// hold no connection (one that holds some finishes them; a lie that it
/// does keeps only itself out of the pool) and `grace` has passed.
pub fn overstays(since: Instant, now: Instant, grace: Duration, holds_connections: bool) -> bool {
    !holds_connections && now.saturating_duration_since(since) > grace
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A worker's claimed start is not believed: a forged 1 (as if busy
    /// since the machine booted) is timed from when the supervisor saw it.
    #[test]
    fn a_forged_start_changes_nothing() {
        let start = Instant::now();
        let mut watch = BusyWatch::default();
        assert_eq!(watch.observe(1, start), Some(Duration::ZERO));
        let later = start + Duration::from_millis(400);
        assert_eq!(watch.observe(1, later), Some(Duration::from_millis(400)));
        // A new busy period (the claim moved) starts a new count.
        assert_eq!(watch.observe(7, later), Some(Duration::ZERO));
        assert_eq!(watch.observe(0, later), None);
    }

    #[test]
    fn a_worker_that_does_not_leave_overstays_after_its_grace() {
        let asked = Instant::now();
        let grace = Duration::from_secs(3);
        assert!(!overstays(asked, asked + grace, grace, false));
        assert!(overstays(asked, asked + grace + Duration::from_millis(1), grace, false));
        assert!(!overstays(asked, asked + grace * 10, grace, true));
    }
}
