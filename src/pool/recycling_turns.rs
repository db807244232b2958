//! Recycling, the supervisor's turns: who is due, who may leave now and
//! who is retired once its replacement is ready, as the model decides
//! (`model::recycling`), acted on here; and recycling's part of `pool
//! info`. What a worker marks in its slot is `recycling`.

use std::sync::atomic::Ordering;
use std::time::Instant;

use crate::tcl::Obj;

use super::model::recycling::{self as policy, Candidate, Turn};
use super::model::{Observed, Retired};
use super::recycling::{due, mark_due, observed, Reason};
use super::state::{Child, LogEntry, Pool};

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
