//! Recycling: a worker is due after `-maxconnections` connections, once
//! its memory passes `-maxrss`, or once it has lived `-maxlifetime`; who
//! leaves, and when, is decided here, by the supervisor alone.
//!
//! Turns: a pool has `bound(target)` turns, counted by the supervisor
//! alone. A worker holds one while it leaves: either it left by itself,
//! at its limit, because the supervisor had authorised it (`Plan::authorised`:
//! a worker may then leave after exactly `-maxconnections` connections,
//! with no round trip), or the supervisor gave a due worker a turn: one
//! due by memory or age keeps serving while its replacement starts (it no
//! longer counts toward the target, so the pool forks one more) and is
//! retired only once the workers ready without it are the target again;
//! one past `-maxconnections` is retired at once while another ready
//! worker serves without a turn (otherwise it too serves until its
//! replacement is ready). A replacement not yet ready holds a turn of
//! its own, even once its worker is gone: no turn is given, and no worker
//! authorised, before it is ready. So a healthy worker is
//! never retired while its replacement cannot start (an `-init` that
//! fails, a database down), and the pool never drains below its size by
//! its own recycling. A turn ends when its worker has closed its last
//! connection, or `HOLD` after it was retired, the pool its size again: a
//! worker that leaves slowly (one connection held for hours) does not keep
//! the others waiting. No turn is given, and no worker authorised, while failures
//! back off or a reload is under way (a reload replaces them anyway).

use std::time::{Duration, Instant};

use super::Observed;

/// Workers of the target per turn: a pool of up to 15 recycles one worker
/// at a time, a pool of 64 eight.
const WORKERS_PER_TURN: usize = 8;

/// Turns a pool with `target` workers has.
pub fn bound(target: usize) -> usize {
    (target / WORKERS_PER_TURN).max(1)
}

/// What `-maxrss`, `-maxlifetime` and `-lifetimejitter` ask.
#[derive(Clone, Copy, Default)]
pub struct Policy {
    /// Bytes; 0: no limit.
    pub max_rss: u64,
    pub max_lifetime: Option<Duration>,
    /// `None`: a tenth of `max_lifetime`.
    pub lifetime_jitter: Option<Duration>,
}

/// Why a worker is due to leave, as the log and `pool info` name it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u32)]
pub enum Reason {
    Connections = 1,
    Memory = 2,
    Age = 3,
}

impl Reason {
    pub const ALL: [Reason; 3] = [Reason::Connections, Reason::Memory, Reason::Age];

    pub fn name(self) -> &'static str {
        match self {
            Reason::Connections => "maxconnections",
            Reason::Memory => "maxrss",
            Reason::Age => "maxlifetime",
        }
    }

    pub fn from_u32(value: u32) -> Option<Reason> {
        match value {
            1 => Some(Reason::Connections),
            2 => Some(Reason::Memory),
            3 => Some(Reason::Age),
            _ => None,
        }
    }

    pub fn index(self) -> usize {
        self as usize - 1
    }
}

/// When a worker forked at `forked` is due by age: `lifetime` plus
/// `jitter_millis` (drawn by the shell).
pub fn lifetime_deadline(forked: Instant, lifetime: Option<Duration>, jitter_millis: u64) -> Option<Instant> {
    Some(forked + lifetime? + Duration::from_millis(jitter_millis))
}

/// How long a turn is held at most once the pool is its size again.
pub const HOLD: Duration = Duration::from_secs(1);

/// A worker's turn to leave.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Turn {
    /// Held since then.
    Held(Instant),
    /// Held, and ended while the worker still leaves: not given again.
    Ended,
}

/// One worker as recycling sees it.
#[derive(Clone, Copy, Debug)]
pub struct Candidate {
    /// Its index in the shell's list.
    pub index: usize,
    pub forked: Instant,
    /// Of the generation the pool serves now.
    pub current: bool,
    pub state: Observed,
    /// Asked to leave already (retired, killed, asked for its stack).
    pub leaving: bool,
    pub due: Option<Reason>,
    pub turn: Option<Turn>,
    pub recycle_at: Option<Instant>,
    /// Connections served: the one nearest its limit is authorised first.
    pub served: u64,
    /// Connections it holds open now.
    pub open: u32,
    /// The supervisor authorised it to leave by itself once due (its
    /// slot's turn): only then is leaving, due, taking a turn; one that
    /// leaves unasked otherwise (a SIGTERM from outside) is no recycle.
    pub authorised: bool,
}

/// What recycling decides in one turn of the loop (indexes).
#[derive(Default, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Workers now due by age.
    pub due_by_age: Vec<usize>,
    /// Workers that left by themselves, due: they hold a turn from now.
    pub taken: Vec<usize>,
    /// Workers given a turn now: their replacement is started.
    pub turns: Vec<usize>,
    /// Turn holders whose replacement is ready: retired now.
    pub retire: Vec<usize>,
    /// Turns that end now.
    pub release: Vec<usize>,
    /// Workers that may leave by themselves once due (all others may not).
    pub authorised: Vec<usize>,
}

/// Decides who is due, who gets a turn, who leaves, and who may leave by
/// itself. `ready_without` counts the current generation's ready workers
/// that hold no turn; `can_start`: replacements can start now (no
/// failure backs off, the pool runs, no reload is under way).
pub fn plan(workers: &[Candidate], target: usize, ready_without: usize, can_start: bool, now: Instant) -> Plan {
    let mut plan = Plan::default();
    let serving = |c: &&Candidate| !c.leaving && c.state.ready() && c.current && c.turn.is_none();
    for c in workers.iter().filter(|c| !c.leaving && c.state.ready() && c.current) {
        if c.due.is_none() && c.recycle_at.is_some_and(|at| now >= at) {
            plan.due_by_age.push(c.index);
        }
    }
    let due = |c: &Candidate| c.due.is_some() || plan.due_by_age.contains(&c.index);
    let mut held = 0;
    for c in workers {
        let left = !c.leaving && c.state == Observed::Stopping && c.due.is_some() && c.authorised;
        let since = match c.turn {
            Some(Turn::Held(since)) => since,
            None if left => {
                plan.taken.push(c.index);
                now
            }
            Some(Turn::Ended) | None => continue,
        };
        let gone = c.leaving || c.state == Observed::Stopping;
        if gone && c.open == 0 && c.state == Observed::Stopping {
            // It serves nothing any more: it is only exiting.
            plan.release.push(c.index);
            continue;
        }
        if ready_without >= target {
            // Its replacement serves: it leaves now, and its turn ends
            // when it is gone, or after `HOLD`.
            if !gone {
                plan.retire.push(c.index);
            } else if now.saturating_duration_since(since) >= HOLD {
                plan.release.push(c.index);
                continue;
            }
        }
        held += 1;
    }
    // A replacement not yet ready holds a turn too (its worker may be
    // gone already: one that left by itself at its limit): no other
    // worker leaves before it has shown that it can start.
    held = held.max(target.saturating_sub(ready_without));
    if !can_start {
        return plan;
    }
    // Workers that may leave before their replacement is ready (retired
    // at once past `-maxconnections`, or authorised to leave by
    // themselves): never the last ready one, so a replacement that cannot
    // start (an `-init` that fails) leaves the pool serving.
    //
    // A worker authorised on an earlier turn may leave by itself at any
    // moment, before the supervisor sees it go: it is kept out of the
    // count first. (Two workers at their limit at once, one authorised:
    // the other was retired at once too, and with an `-init` that fails
    // the pool served nothing.) It may keep its authorisation below.
    let authorised_before = workers.iter().filter(serving).filter(|c| c.authorised).count();
    let reserved = authorised_before.min(ready_without.saturating_sub(1));
    let mut early = ready_without.saturating_sub(1) - reserved;
    let mut waiting: Vec<&Candidate> = workers.iter().filter(serving).filter(|c| due(c)).collect();
    waiting.sort_by_key(|c| c.forked);
    for c in waiting {
        if held >= bound(target) {
            break;
        }
        plan.turns.push(c.index);
        // Past `-maxconnections` it has served more than it was asked
        // to already: it leaves now, its replacement forked at once (the
        // pool is healthy); one due by memory or age serves until its
        // replacement is ready.
        if c.due == Some(Reason::Connections) && early > 0 {
            plan.retire.push(c.index);
            early -= 1;
        }
        held += 1;
    }
    let mut others: Vec<&Candidate> =
        workers.iter().filter(serving).filter(|c| !due(c) && !plan.turns.contains(&c.index)).collect();
    others.sort_by_key(|c| (std::cmp::Reverse(c.served), c.forked));
    let free = bound(target).saturating_sub(held).min(early + reserved);
    plan.authorised = others.iter().take(free).map(|c| c.index).collect();
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready(index: usize, forked: Instant, due: Option<Reason>, authorised: bool) -> Candidate {
        Candidate {
            index,
            forked,
            current: true,
            state: Observed::Idle,
            leaving: false,
            due,
            turn: None,
            recycle_at: None,
            served: 3,
            open: 0,
            authorised,
        }
    }

    /// Two workers at their limit at once, one of them authorised to
    /// leave by itself on an earlier turn: the other is not retired before
    /// its replacement is ready, since the authorised one may be gone
    /// already (before: both left, and with an `-init` that fails the
    /// pool served nothing).
    #[test]
    fn an_authorised_worker_is_not_counted_on_to_stay() {
        let now = Instant::now();
        let workers = [ready(0, now, Some(Reason::Connections), false), ready(1, now, Some(Reason::Connections), true)];
        let plan = plan(&workers, 2, 2, true, now);
        assert!(plan.retire.is_empty(), "{plan:?}");
        // One at a time, and it keeps its authorisation or its turn.
        assert_eq!(plan.turns.len() + plan.authorised.len(), 1, "{plan:?}");
    }

    /// Without an earlier authorisation, one of two at their limit leaves
    /// at once (the pool is healthy), as before.
    #[test]
    fn one_of_two_at_their_limit_leaves_at_once() {
        let now = Instant::now();
        let workers =
            [ready(0, now, Some(Reason::Connections), false), ready(1, now, Some(Reason::Connections), false)];
        let plan = plan(&workers, 2, 2, true, now);
        assert_eq!(plan.retire, vec![0]);
    }

    /// A steady pool keeps one worker authorised from turn to turn.
    #[test]
    fn an_authorisation_is_kept_from_turn_to_turn() {
        let now = Instant::now();
        let first = plan(&[ready(0, now, None, false), ready(1, now, None, false)], 2, 2, true, now);
        assert_eq!(first.authorised.len(), 1);
        let chosen = first.authorised[0];
        let workers = [ready(0, now, None, chosen == 0), ready(1, now, None, chosen == 1)];
        let second = plan(&workers, 2, 2, true, now);
        assert_eq!(second.authorised, vec![chosen]);
    }
}
