//! What a worker's exit counts as: each exit lands in exactly one
//! category, so that the pool's figures add up (`started` is the workers
//! alive plus the exits of every category).

use super::{Kill, Retired};

/// What the supervisor knows of a worker when it reaps it.
#[derive(Clone, Copy, Debug)]
pub struct ExitFacts {
    /// Of the generation the pool serves now.
    pub current: bool,
    /// The pool is stopping.
    pub stopping: bool,
    pub retired: Option<Retired>,
    pub killed: Option<Kill>,
    /// Exit status 0.
    pub clean: bool,
    /// Ended by a signal.
    pub signaled: bool,
    /// It received at least one connection.
    pub received: bool,
    /// It left by itself, due, and the supervisor had authorised it to
    /// (`recycling`) or given it a turn: a due worker that left unasked
    /// (a SIGTERM from outside) is not recycled.
    pub left_due: bool,
    /// It had registered (its `-init` done) before it left.
    pub ready: bool,
    /// It left within `backoff::YOUNG` of its fork.
    pub young: bool,
}

/// The category of an exit.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Outcome {
    /// Its turn to be recycled came: replaced (before it was retired, or
    /// as soon as it left by itself).
    Recycled,
    /// Asked to leave (reload, resize): nothing to replace.
    Retired,
    /// Ended during a stop; `failed`: one started to serve what was
    /// queued at the stop failed, and is backed off.
    Stopped { failed: bool },
    /// Killed past `-timeout`: replaced, counted as a timeout only.
    TimedOut,
    /// A failed start (its `-init` failed, it exited or crashed before
    /// it received a connection, or was not ready in time): replaced after
    /// the back-off, counted as a respawn.
    Failed,
    /// Lost unasked after it served (a handler that exits, a crash, a
    /// signal from outside): replaced at once, counted as a respawn; the
    /// code works.
    Lost,
    /// Of an older generation, unasked, during a reload: the new
    /// generation replaces it once ready.
    Superseded,
}

impl Outcome {
    /// Whether its replacement is counted as a respawn.
    pub fn respawned(self) -> bool {
        matches!(self, Outcome::Failed | Outcome::Lost)
    }
}

/// The category of an exit.
pub fn classify(facts: ExitFacts) -> Outcome {
    let failed_start = facts.killed.is_none() || facts.killed == Some(Kill::InitTimeout);
    match facts.retired {
        Some(Retired::Recycle) if !facts.stopping => return Outcome::Recycled,
        Some(_) => return Outcome::Retired,
        None => {}
    }
    if facts.left_due && facts.killed.is_none() && facts.clean && facts.received && !facts.stopping {
        return Outcome::Recycled;
    }
    if facts.stopping {
        return Outcome::Stopped { failed: failed_start && !facts.clean };
    }
    if facts.killed == Some(Kill::Timeout) {
        return Outcome::TimedOut;
    }
    if !facts.current {
        return Outcome::Superseded;
    }
    // A worker that was ready a while and left cleanly having received
    // nothing (a SIGTERM from outside to an idle worker) did not fail to
    // start: it is lost and replaced at once, not backed off. One that
    // left as young served nothing either, and says no more: an
    // application whose workers exit as soon as they are ready, or a
    // process that ends each worker as it appears, would otherwise have
    // the pool fork hundreds of times a second.
    let left_cleanly = facts.clean && facts.ready && !facts.young;
    if failed_start && (facts.signaled || (!facts.received && !left_cleanly)) {
        Outcome::Failed
    } else {
        Outcome::Lost
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> ExitFacts {
        ExitFacts {
            current: true,
            stopping: false,
            retired: None,
            killed: None,
            clean: true,
            signaled: false,
            received: true,
            left_due: false,
            ready: true,
            young: false,
        }
    }

    /// Issue 26, defect 10: a `-timeout` kill is no respawn, and a worker
    /// that left on a SIGTERM (not due, no turn) is no recycle.
    #[test]
    fn each_exit_in_its_own_category() {
        let timed_out = ExitFacts { killed: Some(Kill::Timeout), clean: false, signaled: true, ..facts() };
        assert_eq!(classify(timed_out), Outcome::TimedOut);
        assert!(!classify(timed_out).respawned());
        assert_eq!(classify(facts()), Outcome::Lost);
        assert_eq!(classify(ExitFacts { left_due: true, ..facts() }), Outcome::Recycled);
        assert_eq!(classify(ExitFacts { retired: Some(Retired::Recycle), ..facts() }), Outcome::Recycled);
        let init = ExitFacts { killed: Some(Kill::InitTimeout), received: false, signaled: true, ..facts() };
        assert_eq!(classify(init), Outcome::Failed);
        // An idle worker sent SIGTERM from outside: lost, not a failed start.
        assert_eq!(classify(ExitFacts { received: false, ..facts() }), Outcome::Lost);
        let init_fails = ExitFacts { received: false, clean: false, ready: false, ..facts() };
        assert_eq!(classify(init_fails), Outcome::Failed);
        // One that exits as soon as it is ready, having served nothing: a
        // failed start, backed off.
        assert_eq!(classify(ExitFacts { received: false, young: true, ..facts() }), Outcome::Failed);
        // Young, but it served: lost.
        assert_eq!(classify(ExitFacts { young: true, ..facts() }), Outcome::Lost);
    }
}
