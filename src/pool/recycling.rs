//! Recycling, the shell's side: a worker is due, and replaced, after
//! `-maxconnections` connections, once its resident memory passes
//! `-maxrss`, or once it has lived `-maxlifetime` (plus a random part of
//! `-lifetimejitter`). Who gets a turn and when a worker leaves is the
//! model's decision (`model::recycling`); this file observes and acts.
//!
//! Who looks: a worker measures its own memory after each connection it
//! closes (one read of `/proc/self/statm`, a few microseconds, at the
//! moment memory has just grown, and with no cost to the supervisor that
//! grows with the pool), marks itself due in its slot and wakes the
//! supervisor; the supervisor, which knows when it forked each worker,
//! watches lifetimes on its tick. Turns are counted by the supervisor
//! alone, in its own memory; what it writes in a worker's slot (`turn`:
//! you may leave by yourself once due) and what the worker writes
//! (`due`) are about that worker only: a lie makes that worker leave
//! sooner, nothing else.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use crate::tcl::Obj;

use super::lifecycle::{Child, Pool, Retired};
use super::model::recycling::{self as policy, Candidate, Turn};
pub use super::model::recycling::{Policy, Reason};
use super::model::Observed;
use super::report::LogEntry;
use super::scoreboard::{Slot, State};

fn mark_due(slot: &Slot, reason: Reason) -> bool {
    // The first reason stays.
    slot.due.compare_exchange(0, reason as u32, Ordering::SeqCst, Ordering::SeqCst).is_ok()
}

/// Why a worker is due, as its slot says.
pub(super) fn due(slot: &Slot) -> Option<Reason> {
    Reason::from_u32(slot.due.load(Ordering::SeqCst))
}

/// What a worker knows of recycling.
pub struct InWorker {
    pub slot: &'static Slot,
    /// Bytes; 0: no limit.
    pub max_rss: u64,
    /// Connections before leaving (`-maxconnections`, with its jitter).
    pub limit: Option<u64>,
    /// Whether it told the supervisor it is due.
    told: AtomicBool,
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

    /// Whether the worker should leave now by itself: it is due, and the
    /// supervisor authorised it (the worker's caller then wakes the
    /// supervisor, which starts the replacement). One due and not
    /// authorised wakes the supervisor once, and serves on: the supervisor
    /// starts its replacement and retires it when that one is ready.
    pub fn leave_now(&self) -> bool {
        if due(self.slot).is_none() {
            return false;
        }
        if self.slot.turn.load(Ordering::SeqCst) != 0 {
            return true;
        }
        if !self.told.swap(true, Ordering::Relaxed) {
            super::signals::notify_supervisor();
        }
        false
    }

    /// The worker's last channel is closed: nothing to give back.
    pub fn done(&self) {}
}

/// A pool's recycling, on the supervisor's side.
#[derive(Default)]
pub struct InPool {
    /// Workers recycled, by reason (`Reason::index`).
    pub(super) recycled: [u64; 3],
}

impl InPool {
    pub fn new() -> nix::Result<InPool> {
        Ok(InPool::default())
    }

    pub fn for_worker(&self, slot: &'static Slot, max_rss: u64, limit: Option<u64>) -> InWorker {
        InWorker { slot, max_rss, limit, told: AtomicBool::new(false) }
    }
}

/// When a worker forked at `forked` is due by age, if `-maxlifetime` is set.
pub(super) fn lifetime_deadline(policy: &Policy, forked: Instant) -> Option<Instant> {
    let lifetime = policy.max_lifetime?;
    let jitter = policy.lifetime_jitter.unwrap_or(lifetime / 10);
    let extra = super::lifecycle::random_below(jitter.as_millis() as u64 + 1);
    policy::lifetime_deadline(forked, Some(lifetime), extra)
}

/// A slot's state as the model names it (`None`: free).
pub(super) fn observed(state: State) -> Option<Observed> {
    match state {
        State::Free => None,
        State::Starting => Some(Observed::Starting),
        State::Idle => Some(Observed::Idle),
        State::Busy => Some(Observed::Busy),
        State::Stopping => Some(Observed::Stopping),
    }
}

impl Pool {
    /// Marks workers past their lifetime due, gives turns to those that
    /// wait for one (their replacements start), and retires those whose
    /// replacement is ready (`model::recycling`).
    pub(super) fn recycle(&mut self, now: Instant, can_start: bool, entries: &mut Vec<LogEntry>) {
        let candidates: Vec<Candidate> = self
            .children
            .iter()
            .enumerate()
            .map(|(index, c)| {
                let slot = self.scoreboard.slot(c.slot);
                Candidate {
                    index,
                    forked: c.forked,
                    current: c.generation == self.generation,
                    state: observed(slot.state()).unwrap_or(Observed::Stopping),
                    leaving: c.retired.is_some() || c.killed.is_some() || c.asked_to_leave(),
                    due: due(slot),
                    turn: c.turn,
                    recycle_at: c.recycle_at,
                    served: slot.served(),
                    open: slot.open(),
                    authorised: slot.turn.load(Ordering::SeqCst) != 0,
                }
            })
            .collect();
        let ready_without = self.ready_count();
        let plan = policy::plan(&candidates, self.target, ready_without, can_start, now);
        for &index in &plan.due_by_age {
            mark_due(self.scoreboard.slot(self.children[index].slot), Reason::Age);
        }
        for &index in plan.taken.iter().chain(&plan.turns) {
            self.children[index].turn = Some(Turn::Held(now));
        }
        for &index in &plan.release {
            self.children[index].turn = Some(Turn::Ended);
        }
        for (index, child) in self.children.iter().enumerate() {
            let authorised = plan.authorised.contains(&index);
            self.scoreboard.slot(child.slot).turn.store(u32::from(authorised), Ordering::SeqCst);
        }
        let leaving: Vec<_> = plan.retire.iter().map(|&index| self.children[index].pid).collect();
        for pid in leaving {
            self.retire(1, Retired::Recycle, |c: &Child| c.pid == pid, entries);
        }
    }

    /// A worker is reaped: if it was recycled, why (for its exit entry and
    /// `pool info`).
    pub(super) fn recycled_reason(&mut self, slot: usize, recycled: bool) -> Option<&'static str> {
        if !recycled {
            return None;
        }
        // Every recycled worker is due: a cause is counted for each.
        let reason = due(self.scoreboard.slot(slot)).unwrap_or(Reason::Connections);
        self.recycling.recycled[reason.index()] += 1;
        Some(reason.name())
    }

    /// Turns held now.
    fn leaving(&self) -> usize {
        self.children.iter().filter(|c| matches!(c.turn, Some(Turn::Held(_)))).count()
    }

    /// `pool info`'s `recycledby` and `leaving`, and a worker's `rss` and `due`.
    pub(super) fn recycling_info(&self) -> Vec<(&'static str, Obj)> {
        let by =
            Reason::ALL.iter().map(|r| (r.name(), Obj::new_int(self.recycling.recycled[r.index()] as i64))).collect();
        vec![
            ("recycledby", Obj::new_dict(by)),
            ("leaving", Obj::new_int(self.leaving() as i64)),
            ("leavingbound", Obj::new_int(policy::bound(self.target) as i64)),
            ("maxrss", wide(self.config.recycling.max_rss)),
        ]
    }

    pub(super) fn worker_recycling_info(&self, slot: usize) -> Vec<(&'static str, Obj)> {
        let slot = self.scoreboard.slot(slot);
        vec![
            ("rss", wide(slot.rss.load(Ordering::Relaxed))),
            ("due", Obj::new_string(due(slot).map_or("", Reason::name))),
        ]
    }
}

/// An unsigned figure as Tcl shows it: above the largest wide integer, as
/// its digits (`-maxrss 18446744073709551615` showed -1).
fn wide(value: u64) -> Obj {
    i64::try_from(value).map_or_else(|_| Obj::new_string(&value.to_string()), Obj::new_int)
}
