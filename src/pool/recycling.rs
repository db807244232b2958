//! Recycling: a worker leaves, and is replaced at once, after
//! `-maxconnections` connections, once its resident memory passes
//! `-maxrss`, or once it has lived `-maxlifetime` (plus a random part of
//! `-lifetimejitter`); never more than a few at a time.
//!
//! Who looks: a worker measures its own memory after each connection it
//! closes (one read of `/proc/self/statm`, a few microseconds, at the
//! moment memory has just grown, and with no cost to the supervisor that
//! grows with the pool); the supervisor, which knows when it forked each
//! worker, watches lifetimes on its tick.
//!
//! Staggering: leaving takes a turn, and a pool has `bound` turns (one per
//! `WORKERS_PER_TURN` workers of its target, at least one), counted in
//! memory shared with the workers. A worker that is due takes a turn
//! itself (a compare-and-swap) when it can, and leaves after its current
//! connections; one that finds none keeps serving and tries again after
//! each connection, and the supervisor gives a turn to those that wait as
//! turns come free (it retires them). A turn is held while the worker
//! still serves its last connections, and given back once they are closed
//! (by the worker, or by the supervisor when it reaps one that died
//! holding it).

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::tcl::Obj;

use super::lifecycle::{Child, Pool, Retired};
use super::report::LogEntry;
use super::scoreboard::{Slot, State};
use super::shared_memory::{SharedArray, Zeroed};

/// Workers of the target per turn to leave: a pool of up to 15 recycles
/// one worker at a time, a pool of 64 eight.
const WORKERS_PER_TURN: usize = 8;

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
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Reason {
    Connections = 1,
    Memory = 2,
    Age = 3,
}

impl Reason {
    pub fn name(self) -> &'static str {
        match self {
            Reason::Connections => "maxconnections",
            Reason::Memory => "maxrss",
            Reason::Age => "maxlifetime",
        }
    }

    fn from_u32(value: u32) -> Option<Reason> {
        match value {
            1 => Some(Reason::Connections),
            2 => Some(Reason::Memory),
            3 => Some(Reason::Age),
            _ => None,
        }
    }
}

/// A pool's turns to leave, shared with its workers.
#[repr(C)]
pub struct Turns {
    /// Turns held now.
    held: AtomicU32,
    /// Turns the pool has (set by the supervisor as its target changes).
    bound: AtomicU32,
}

// SAFETY: two atomics; zero held and a zero bound (set before any fork).
unsafe impl Zeroed for Turns {}

impl Turns {
    fn take(&self) -> bool {
        let bound = self.bound.load(Ordering::SeqCst).max(1);
        self.held.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |held| (held < bound).then_some(held + 1)).is_ok()
    }

    fn give(&self) {
        let _ = self.held.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |held| held.checked_sub(1));
    }
}

/// Gives `slot` a turn: taken from `turns` and marked in the slot, by
/// whichever of the worker and the supervisor gets there first; true if
/// the slot holds one now.
fn take_turn(slot: &Slot, turns: &Turns) -> bool {
    if slot.turn.load(Ordering::SeqCst) != 0 {
        return true;
    }
    if !turns.take() {
        return false;
    }
    if slot.turn.compare_exchange(0, 1, Ordering::SeqCst, Ordering::SeqCst).is_err() {
        // The other side gave it one meanwhile: ours goes back.
        turns.give();
    }
    true
}

/// Gives back the turn `slot` holds, if it holds one.
fn release_turn(slot: &Slot, turns: &Turns) {
    if slot.turn.swap(0, Ordering::SeqCst) != 0 {
        turns.give();
    }
}

fn mark_due(slot: &Slot, reason: Reason) {
    // The first reason stays.
    let _ = slot.due.compare_exchange(0, reason as u32, Ordering::SeqCst, Ordering::SeqCst);
}

fn due(slot: &Slot) -> Option<Reason> {
    Reason::from_u32(slot.due.load(Ordering::SeqCst))
}

/// What a worker knows of recycling.
pub struct InWorker {
    pub slot: &'static Slot,
    pub turns: &'static Turns,
    /// Bytes; 0: no limit.
    pub max_rss: u64,
    /// Connections before leaving (`-maxconnections`, with its jitter).
    pub limit: Option<u64>,
}

impl InWorker {
    /// After a connection was received: due once it was the last allowed.
    pub fn received(&self, received: u64) {
        if self.limit.is_some_and(|limit| received >= limit) {
            mark_due(self.slot, Reason::Connections);
        }
    }

    /// After a channel was closed: due once memory has passed `-maxrss`.
    pub fn closed(&self) {
        if self.max_rss == 0 {
            return;
        }
        if let Some(rss) = crate::sys::resident_bytes() {
            self.slot.rss.store(rss, Ordering::Relaxed);
            if rss > self.max_rss {
                mark_due(self.slot, Reason::Memory);
            }
        }
    }

    /// Whether the worker should leave now: it is due, and holds a turn.
    pub fn leave_now(&self) -> bool {
        due(self.slot).is_some() && take_turn(self.slot, self.turns)
    }

    /// The worker's last channel is closed: its turn is over.
    pub fn done(&self) {
        release_turn(self.slot, self.turns);
    }
}

/// A pool's recycling, on the supervisor's side.
pub struct InPool {
    turns: SharedArray<Turns>,
    /// Workers recycled, by reason (`Reason as usize - 1`).
    pub(super) recycled: [u64; 3],
}

impl InPool {
    pub fn new() -> nix::Result<InPool> {
        Ok(InPool { turns: SharedArray::new(1)?, recycled: [0; 3] })
    }

    fn turns(&self) -> &Turns {
        self.turns.get(0)
    }

    pub fn for_worker(&self, slot: &'static Slot, max_rss: u64, limit: Option<u64>) -> InWorker {
        InWorker { slot, turns: self.turns.leak(0), max_rss, limit }
    }

    /// Turns held now, for `pool info`.
    pub fn leaving(&self) -> u32 {
        self.turns().held.load(Ordering::SeqCst)
    }

    /// Turns the pool has, for `pool info`.
    pub fn bound(&self) -> u32 {
        self.turns().bound.load(Ordering::SeqCst).max(1)
    }
}

/// When a worker forked at `forked` is due by age, if `-maxlifetime` is set.
pub(super) fn lifetime_deadline(policy: &Policy, forked: Instant) -> Option<Instant> {
    let lifetime = policy.max_lifetime?;
    let jitter = policy.lifetime_jitter.unwrap_or(lifetime / 10);
    let extra = super::lifecycle::random_below(jitter.as_millis() as u64 + 1);
    Some(forked + lifetime + Duration::from_millis(extra))
}

impl Pool {
    /// Marks workers past their lifetime due, and gives turns to those
    /// that wait for one, oldest first: the supervisor retires them, they
    /// leave after their current connections, and are replaced at once.
    pub(super) fn recycle(&mut self, entries: &mut Vec<LogEntry>) {
        let bound = (self.target / WORKERS_PER_TURN).max(1) as u32;
        self.recycling.turns().bound.store(bound, Ordering::SeqCst);
        let now = Instant::now();
        let mut waiting: Vec<usize> = Vec::new();
        for (index, child) in self.children.iter().enumerate() {
            let slot = self.scoreboard.slot(child.slot);
            if child.retired.is_some() || child.killed.is_some() || !matches!(slot.state(), State::Idle | State::Busy) {
                continue;
            }
            if child.recycle_at.is_some_and(|at| now >= at) {
                mark_due(slot, Reason::Age);
            }
            if due(slot).is_some() && slot.turn.load(Ordering::SeqCst) == 0 {
                waiting.push(index);
            }
        }
        waiting.sort_by_key(|&index| self.children[index].forked);
        for index in waiting {
            let slot = self.scoreboard.slot(self.children[index].slot);
            if !take_turn(slot, self.recycling.turns()) {
                break;
            }
            let pid = self.children[index].pid;
            self.retire(1, Retired::Recycle, |c: &Child| c.pid == pid, entries);
        }
    }

    /// A worker is reaped: the turn it may still hold goes back, and, if
    /// it was recycled, why (for its exit entry and `pool info`).
    pub(super) fn recycled_reason(&mut self, slot: usize, recycled: bool) -> Option<&'static str> {
        let slot = self.scoreboard.slot(slot);
        release_turn(slot, self.recycling.turns());
        let reason = due(slot).filter(|_| recycled)?;
        self.recycling.recycled[reason as usize - 1] += 1;
        Some(reason.name())
    }

    /// `pool info`'s `recycledby` and `leaving`, and a worker's `rss` and `due`.
    pub(super) fn recycling_info(&self) -> Vec<(&'static str, Obj)> {
        let by = [Reason::Connections, Reason::Memory, Reason::Age]
            .iter()
            .map(|r| (r.name(), Obj::new_int(self.recycling.recycled[*r as usize - 1] as i64)))
            .collect();
        vec![
            ("recycledby", Obj::new_dict(by)),
            ("leaving", Obj::new_int(self.recycling.leaving().into())),
            ("leavingbound", Obj::new_int(self.recycling.bound().into())),
            ("maxrss", Obj::new_int(self.config.recycling.max_rss as i64)),
        ]
    }

    pub(super) fn worker_recycling_info(&self, slot: usize) -> Vec<(&'static str, Obj)> {
        let slot = self.scoreboard.slot(slot);
        vec![
            ("rss", Obj::new_int(slot.rss.load(Ordering::Relaxed) as i64)),
            ("due", Obj::new_string(due(slot).map_or("", Reason::name))),
        ]
    }
}
