//! One turn of the supervisor's loop (`Event::Tick`), in the order the
//! decisions are taken: end a failure run a worker has disproved, settle
//! a reload, time out the busy and the slow to start, hold workers to
//! what their slots claim; then, running, size the pool, retire the
//! surplus, recycle, and fork what is missing, a few per turn; stopping,
//! end the graceful period, serve what is queued, and go once empty.

use std::time::Instant;

use super::events::{Action, Counter, Note};
use super::pool::{init_timeout_reason, Hang, Model, Worker};
use super::recycling::{self, Candidate, Turn};
use super::reload::Settled;
use super::sizing::Load;
use super::stop::{queue_to_serve, Phase};
use super::timeouts::{init_overdue, overstays};
use super::{forks_this_turn, Kill, Observed, Retired};

impl Model {
    pub(super) fn turn(&mut self, now: Instant, out: &mut Vec<Action>) {
        self.end_disproved_failures(now);
        self.settle_reload(out);
        self.ask_the_stuck(now, out);
        self.kill_slow_starters(now, out);
        self.hold_to_claims(now, out);
        match self.phase {
            Phase::Running => {
                self.size_to_load(now, out);
                self.retire_surplus(now, out);
                // Replacements for recycling start only while they can:
                // no failure backs off, no reload is under way.
                let can_start = self.failures.healthy() && !self.reload.running();
                self.recycle(now, can_start, out);
                let missing = self.target.saturating_sub(self.serving().count());
                // A few per turn of the loop: the rest at the next turn.
                let trying = self.trying();
                let forks = self.failures.forks_allowed(now, forks_this_turn(missing), trying);
                for _ in 0..forks {
                    self.fork(now, out);
                }
                if !self.ready_once && self.ready_count() >= self.target {
                    self.ready_once = true;
                    out.push(Action::Ready);
                }
            }
            Phase::Stopping { deadline } => self.stop_turn(now, deadline, out),
        }
    }

    /// A worker of the current generation forked (or become ready) after
    /// the last failure that is ready and outlives its youth ends the run: one still in
    /// `-init` has not shown that the code works (an `-init` that fails
    /// after a while would otherwise never back off further). Older
    /// workers say nothing about the code that fails now (a reload's new
    /// `-init`).
    fn end_disproved_failures(&mut self, now: Instant) {
        let proves = |w: &Worker| {
            w.generation == self.generation
                && w.retired.is_none()
                && w.killed.is_none()
                && w.slot.state.ready()
                && self.failures.proven_by(w.forked, w.ready_at, w.slot.served, now)
        };
        if self.failures.failed_at().is_some() && self.workers.iter().any(proves) {
            self.failures.end();
        }
    }

    /// A worker of the current generation forked after the last failure,
    /// still alive and not proven yet: the one try of a back-off.
    fn trying(&self) -> bool {
        self.workers.iter().any(|w| {
            w.generation == self.generation
                && w.retired.is_none()
                && w.killed.is_none()
                && self.failures.forked_since(w.forked)
        })
    }

    fn settle_reload(&mut self, out: &mut Vec<Action>) {
        let ready = self.ready_count();
        match self.reload.settle(ready, self.target, &mut self.failures) {
            None => {}
            Some(Settled::Done) => out.push(Action::Log(Note::Reloaded { generation: self.generation })),
            Some(Settled::Abandoned { serve, failures, reason }) => {
                let abandoned = self.generation;
                self.generation = serve;
                self.to_respawn = 0;
                out.push(Action::Log(Note::ReloadFailed { generation: abandoned, failures, reason }));
            }
        }
    }

    /// Workers busy on one connection for longer than `-timeout` are asked
    /// for their stack (the shell's `hang_watch` asks, and says whether
    /// to kill). With `-concurrency 1`, from the question on the worker
    /// takes no more connections and is replaced at once. How long it
    /// has been busy is measured on the supervisor's clock
    /// (`timeouts::BusyWatch`): the start the worker claims is a claim.
    fn ask_the_stuck(&mut self, now: Instant, out: &mut Vec<Action>) {
        let Some(timeout) = self.settings.timeout else { return };
        let leaving = self.settings.concurrency <= 1;
        for w in self.workers.iter_mut().filter(|w| w.killed.is_none() && w.hang.is_none()) {
            let Some(busy) = w.busy.observe(w.slot.busy_since, now) else { continue };
            if busy <= timeout {
                continue;
            }
            w.hang = Some(Hang { leaving });
            out.push(Action::AskStack { worker: w.id, leaving, busy });
        }
    }

    /// `-inittimeout`: a worker not ready in time is killed, and counted
    /// as a failed start at the kill, before its replacement is forked
    /// (counted at the reap, the replacement was forked before the failure
    /// was known and not backed off).
    fn kill_slow_starters(&mut self, now: Instant, out: &mut Vec<Action>) {
        let Some(limit) = self.settings.init_timeout else { return };
        for index in 0..self.workers.len() {
            let w = &mut self.workers[index];
            if w.killed.is_some()
                || w.retired.is_some()
                || w.slot.state != Observed::Starting
                || !init_overdue(w.forked, now, limit)
            {
                continue;
            }
            w.killed = Some(Kill::InitTimeout);
            let (worker, generation, forked) = (w.id, w.generation, w.forked);
            out.push(Action::Kill { worker, reason: Kill::InitTimeout });
            out.push(Action::Count(Counter::InitTimedOut));
            out.push(Action::Log(Note::InitTimeout { worker, generation, after: limit }));
            if let Some(backoff) = self.count_failed_start(init_timeout_reason(limit), forked, now) {
                out.push(Action::Count(Counter::Backoff));
                out.push(Action::Log(backoff));
            }
        }
    }

    /// A worker's slot is its claim: one that says it leaves though the
    /// supervisor did not ask (a SIGTERM from outside, or a lie) leaves the
    /// pool for good, and is replaced; one asked to leave, or that said it
    /// leaves, that is still there `-graceful` later and claims no
    /// connection is killed. Either counts against that worker only.
    fn hold_to_claims(&mut self, now: Instant, out: &mut Vec<Action>) {
        let grace = self.settings.graceful;
        for w in &mut self.workers {
            if w.slot.state.ready() {
                w.was_ready = true;
            }
            if w.killed.is_some() {
                continue;
            }
            if w.leaving_since.is_none() && w.slot.state == Observed::Stopping {
                w.leaving_since = Some(now);
                continue;
            }
            let Some(since) = w.leaving_since else { continue };
            if overstays(since, now, grace, w.slot.open > 0) {
                w.killed = Some(Kill::Graceful);
                out.push(Action::Kill { worker: w.id, reason: Kill::Graceful });
                out.push(Action::Log(Note::Overstayed { worker: w.id }));
            }
        }
    }

    /// Moves the target one worker toward the load, when it is time to.
    fn size_to_load(&mut self, now: Instant, out: &mut Vec<Action>) {
        let settled = !self.reload.running() && self.failures.healthy() && self.serving().count() == self.target;
        let mut load = Load::default();
        if settled {
            for w in self.serving() {
                match w.slot.state {
                    Observed::Idle => load.idle += 1,
                    Observed::Starting => load.starting += 1,
                    _ => load.busy += 1,
                }
            }
            load.queued = self.queued;
        }
        if let Some(change) = self.sizing.decide(now, &mut self.target, settled, load) {
            out.push(Action::Log(Note::Sized { target: self.target, change }));
        }
    }

    /// Asks workers to leave: the current generation's beyond the target,
    /// the starting ones of a generation given up (a reload replaced by
    /// another, or abandoned), and old generations' serving ones only as
    /// workers of the current generation become ready, never for one that
    /// is still starting. Idle ones first.
    fn retire_surplus(&mut self, now: Instant, out: &mut Vec<Action>) {
        let generation = self.generation;
        let serving = self.serving().count();
        if serving > self.target {
            // Of the serving ones: one seen leaving unasked is no surplus.
            let counted = |w: &Worker| {
                w.generation == generation && w.turn.is_none() && !w.asked_to_leave() && w.leaving_since.is_none()
            };
            self.retire(now, serving - self.target, Retired::Resize, counted, out);
        }
        // The generation that served before a running reload serves on
        // until the new one is ready, its starting workers included.
        let fallback = self.reload.fallback(generation);
        let given_up =
            |w: &Worker| w.generation != generation && w.generation != fallback && w.slot.state == Observed::Starting;
        self.retire(now, usize::MAX, Retired::Reload, given_up, out);
        let ready = self.ready_count();
        let old = self
            .workers
            .iter()
            .filter(|w| w.generation != generation && w.retired.is_none() && w.killed.is_none())
            .count();
        let allowed_old = self.target.saturating_sub(ready);
        if old > allowed_old {
            self.retire(now, old - allowed_old, Retired::Reload, |w| w.generation != generation, out);
        }
    }

    /// Retires up to `count` workers matching `which`, idle before starting
    /// before busy.
    fn retire(
        &mut self,
        now: Instant,
        count: usize,
        reason: Retired,
        which: impl Fn(&Worker) -> bool,
        out: &mut Vec<Action>,
    ) {
        let mut candidates: Vec<usize> = (0..self.workers.len())
            .filter(|&i| {
                let w = &self.workers[i];
                w.retired.is_none() && w.killed.is_none() && which(w)
            })
            .collect();
        let rank = |state: Observed| match state {
            Observed::Idle => 0,
            Observed::Starting => 1,
            Observed::Stopping => 2,
            Observed::Busy => 3,
        };
        candidates.sort_by_key(|&i| rank(self.workers[i].slot.state));
        for i in candidates.into_iter().take(count) {
            let w = &mut self.workers[i];
            w.retired = Some(reason);
            w.leaving_since.get_or_insert(now);
            out.push(Action::Retire { worker: w.id, reason });
            out.push(Action::Log(Note::Retire { worker: w.id, generation: w.generation, reason }));
        }
    }

    /// Marks workers past their lifetime due, gives turns to those that
    /// wait for one (their replacements start), and retires those whose
    /// replacement is ready (`recycling::plan`).
    fn recycle(&mut self, now: Instant, can_start: bool, out: &mut Vec<Action>) {
        let candidates: Vec<Candidate> = self
            .workers
            .iter()
            .enumerate()
            .map(|(index, w)| Candidate {
                index,
                forked: w.forked,
                current: w.generation == self.generation,
                state: w.slot.state,
                leaving: w.retired.is_some() || w.killed.is_some() || w.asked_to_leave(),
                due: w.slot.due,
                turn: w.turn,
                recycle_at: w.recycle_at,
                served: w.slot.served,
                open: w.slot.open,
                authorised: w.authorised,
            })
            .collect();
        let ready_without = self.ready_count();
        let plan = recycling::plan(&candidates, self.target, ready_without, can_start, now);
        for &index in &plan.due_by_age {
            let w = &mut self.workers[index];
            w.slot.due.get_or_insert(recycling::Reason::Age);
            out.push(Action::MarkDue { worker: w.id, reason: recycling::Reason::Age });
        }
        for &index in plan.taken.iter().chain(&plan.turns) {
            self.workers[index].turn = Some(Turn::Held(now));
        }
        for &index in &plan.release {
            self.workers[index].turn = Some(Turn::Ended);
        }
        for (index, w) in self.workers.iter_mut().enumerate() {
            let may_leave = plan.authorised.contains(&index);
            if w.authorised != may_leave {
                w.authorised = may_leave;
                out.push(Action::Authorise { worker: w.id, may_leave });
            }
        }
        // A turn's `HOLD` counts from its worker's retirement, when the
        // pool is its size again: one that waited longer than `HOLD` for
        // its replacement would otherwise end its turn the moment it is
        // retired, and the next worker would leave while it still serves.
        for &index in &plan.retire {
            self.workers[index].turn = Some(Turn::Held(now));
        }
        let leaving: Vec<_> = plan.retire.iter().map(|&index| self.workers[index].id).collect();
        for id in leaving {
            self.retire(now, 1, Retired::Recycle, |w| w.id == id, out);
        }
    }

    /// A stop's turn: once the graceful period is over, the workers still
    /// there are killed; what is queued is served by one more worker when
    /// none will take it; the pool is gone once empty.
    fn stop_turn(&mut self, now: Instant, deadline: Instant, out: &mut Vec<Action>) {
        if self.phase.graceful_over(now) {
            for w in self.workers.iter_mut().filter(|w| w.killed.is_none()) {
                w.killed = Some(Kill::Graceful);
                out.push(Action::Kill { worker: w.id, reason: Kill::Graceful });
                out.push(Action::Log(Note::GracefulOver { worker: w.id }));
            }
        }
        let queued = queue_to_serve(now, deadline, self.failures.failures, || self.queue_pending);
        let forks = if queued && !self.workers.iter().any(Worker::takes_connections) {
            let trying = self.trying();
            self.failures.forks_allowed(now, 1, trying)
        } else {
            0
        };
        if self.workers.is_empty() && !queued {
            out.push(Action::Log(Note::Stopped));
            out.push(Action::Gone);
            return;
        }
        for _ in 0..forks {
            self.fork(now, out);
        }
    }
}
