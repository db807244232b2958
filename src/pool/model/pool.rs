//! `Model`: one pool's decision state, and `step`, which takes one event
//! (with the time) and returns what to do. What the model knows of a
//! worker is what the shell observed of it (`SlotView`) and what the
//! model itself decided (retired, killed, its turn); the order of the
//! decisions in one turn of the loop is `turn`'s.

use std::time::{Duration, Instant};

use super::backoff::FailureRun;
use super::events::{Action, Counter, Event, ExitStatus, Note, SlotView, WorkerId};
use super::exits::{self, ExitFacts, Outcome};
use super::recycling::{Reason, Turn};
use super::reload::Reload;
use super::sizing::Sizing;
use super::stop::Phase;
use super::timeouts::BusyWatch;
use super::{Kill, Observed, Retired};

/// What the model needs of the pool's options.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// `-graceful`.
    pub graceful: Duration,
    /// `-inittimeout`.
    pub init_timeout: Option<Duration>,
    /// `-timeout`.
    pub timeout: Option<Duration>,
    /// `-concurrency`.
    pub concurrency: usize,
}

/// A worker past `-timeout`, asked for its stack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hang {
    /// It takes no more connections (`-concurrency 1`): replaced now.
    pub leaving: bool,
}

/// One worker, as the model knows it.
#[derive(Clone, Debug)]
pub struct Worker {
    pub id: WorkerId,
    pub generation: u32,
    pub forked: Instant,
    /// Its slot, as last observed.
    pub slot: SlotView,
    pub retired: Option<Retired>,
    /// Sent SIGKILL, with the reason.
    pub killed: Option<Kill>,
    /// Its turn to be recycled.
    pub turn: Option<Turn>,
    /// Authorised to leave by itself once due (as told to its slot).
    pub authorised: bool,
    /// When it is due by age.
    pub recycle_at: Option<Instant>,
    /// Its busy period on the supervisor's clock.
    pub busy: BusyWatch,
    /// Since when it leaves: retired, or seen leaving unasked.
    pub leaving_since: Option<Instant>,
    pub hang: Option<Hang>,
    /// Seen registered or serving once: a clean exit then is no failed start.
    pub was_ready: bool,
    /// When it was first seen registered or serving: one ready after the
    /// last failure ends the run, whenever it was forked (a replacement
    /// forked before a failure is the only one left to end it).
    pub ready_at: Option<Instant>,
}

impl Worker {
    /// Asked for its stack and to take no more connections.
    pub fn asked_to_leave(&self) -> bool {
        self.hang.is_some_and(|hang| hang.leaving)
    }

    /// Whether it will still take connections from the queue.
    pub fn takes_connections(&self) -> bool {
        self.retired.is_none()
            && self.killed.is_none()
            && !self.asked_to_leave()
            && matches!(self.slot.state, Observed::Starting | Observed::Idle | Observed::Busy)
    }
}

/// One pool's decisions.
pub struct Model {
    pub settings: Settings,
    pub sizing: Sizing,
    pub workers: Vec<Worker>,
    /// The generation the pool serves (starts, during a reload).
    pub generation: u32,
    /// The highest generation number given so far: an abandoned reload's
    /// number is not given again.
    pub newest_generation: u32,
    pub target: usize,
    pub failures: FailureRun,
    pub reload: Reload,
    pub phase: Phase,
    /// Workers lost unasked, still to be replaced (counted as respawns).
    pub to_respawn: u64,
    /// Every worker of the first generation has been ready once.
    pub ready_once: bool,
    /// Accepted, not yet taken by a worker, as last observed.
    pub queued: usize,
    /// A connection waits in the queue, as last observed.
    pub queue_pending: bool,
    next_worker: WorkerId,
}

impl Model {
    /// A pool of `target` workers (within `sizing`'s range), none forked yet.
    pub fn new(settings: Settings, sizing: Sizing, target: usize) -> Model {
        Model {
            settings,
            sizing,
            workers: Vec::new(),
            generation: 1,
            newest_generation: 1,
            target,
            failures: FailureRun::default(),
            reload: Reload::None,
            phase: Phase::Running,
            to_respawn: 0,
            ready_once: false,
            queued: 0,
            queue_pending: false,
            next_worker: 1,
        }
    }

    /// Takes one event at `now`; returns what the shell is to do, in order.
    pub fn step(&mut self, event: Event, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        match event {
            Event::Forked { worker, recycle_at } => self.forked(worker, recycle_at, &mut out),
            Event::ForkFailed { worker, failure } => {
                self.workers.retain(|w| w.id != worker);
                if let Some(failure) = failure {
                    let _ = self.failures.count(failure, None, now);
                }
            }
            Event::Slot { worker, slot } => {
                if let Some(w) = self.worker_mut(worker) {
                    w.slot = slot;
                    if slot.state.ready() {
                        w.ready_at.get_or_insert(now);
                    }
                }
            }
            Event::Exited { worker, slot, status } => self.exited(worker, slot, status, now, &mut out),
            Event::Queue { queued, pending } => {
                self.queued = queued;
                self.queue_pending = pending;
            }
            Event::HangSettled { worker, spared } => self.hang_settled(worker, spared, &mut out),
            Event::Reload => self.start_reload(&mut out),
            Event::Resize { min, max } => self.resize(min, max, &mut out),
            Event::Shift { up } => {
                let (min, max) = self.sizing.shifted(up);
                self.resize(min, max, &mut out);
            }
            Event::Stop { at_once } => {
                if self.phase.stop(now, self.settings.graceful, at_once) {
                    // What failed before the stop does not count against
                    // the workers started to serve what is queued.
                    self.failures.end();
                    out.push(Action::Log(Note::Stop { workers: self.workers.len() }));
                }
            }
            Event::Tick => self.turn(now, &mut out),
        }
        out
    }

    pub fn worker(&self, id: WorkerId) -> Option<&Worker> {
        self.workers.iter().find(|w| w.id == id)
    }

    fn worker_mut(&mut self, id: WorkerId) -> Option<&mut Worker> {
        self.workers.iter_mut().find(|w| w.id == id)
    }

    /// Workers of the current generation that count toward the target:
    /// not asked to leave, not leaving by themselves, not killed, not
    /// asked for their stack past `-timeout`, not being replaced
    /// (recycling: a turn holder serves until its replacement is ready).
    pub fn serving(&self) -> impl Iterator<Item = &Worker> {
        self.workers.iter().filter(move |w| {
            w.generation == self.generation
                && w.retired.is_none()
                && w.killed.is_none()
                && !w.asked_to_leave()
                && w.turn.is_none()
                && w.leaving_since.is_none()
                && w.slot.state != Observed::Stopping
        })
    }

    /// Workers of the current generation that are registered or serving.
    pub fn ready_count(&self) -> usize {
        self.serving().filter(|w| w.slot.state.ready()).count()
    }

    /// Decides a fork of the current generation: the worker is known
    /// from now on, starting; the shell answers whether the fork was done.
    pub(super) fn fork(&mut self, now: Instant, out: &mut Vec<Action>) {
        let id = self.next_worker;
        self.next_worker += 1;
        self.workers.push(Worker {
            id,
            generation: self.generation,
            forked: now,
            slot: SlotView::STARTING,
            retired: None,
            killed: None,
            turn: None,
            authorised: false,
            recycle_at: None,
            busy: BusyWatch::default(),
            leaving_since: None,
            hang: None,
            was_ready: false,
            ready_at: None,
        });
        out.push(Action::Fork { worker: id, generation: self.generation });
    }

    fn forked(&mut self, worker: WorkerId, recycle_at: Option<Instant>, out: &mut Vec<Action>) {
        let Some(w) = self.worker_mut(worker) else { return };
        w.recycle_at = recycle_at;
        let generation = w.generation;
        out.push(Action::Count(Counter::Started));
        let respawn = self.to_respawn > 0;
        if respawn {
            self.to_respawn -= 1;
            out.push(Action::Count(Counter::Respawned));
        }
        out.push(Action::Log(Note::Start { worker, generation, respawn }));
    }

    /// Counts a worker's exit in the category `model::exits` gives it: a
    /// failure is a worker of the current generation that ends unasked
    /// before it received a connection (its `-init` failed, it exited, it
    /// crashed, it was not ready in time) or by a signal nobody sent it on
    /// the pool's behalf; failures back off. A worker that exits after it
    /// received one, that was recycled, retired or killed past `-timeout`,
    /// did not fail: it is replaced at once (a retired one needs no
    /// replacement). A worker of an older generation that dies during a
    /// reload says nothing of the code being started.
    fn exited(&mut self, worker: WorkerId, slot: SlotView, status: ExitStatus, now: Instant, out: &mut Vec<Action>) {
        let Some(index) = self.workers.iter().position(|w| w.id == worker) else { return };
        let w = self.workers.remove(index);
        // Asked for its stack past `-timeout`: killed for it, even if it
        // left before the kill.
        let killed = w.killed.or(w.hang.map(|_| Kill::Timeout));
        let outcome = exits::classify(ExitFacts {
            current: w.generation == self.generation,
            stopping: self.phase.stopping(),
            retired: w.retired,
            killed,
            clean: status.clean,
            signaled: status.signaled,
            received: slot.served + u64::from(slot.open) > 0,
            // Left by itself once due, authorised or holding a turn: a
            // due worker sent SIGTERM is no recycle.
            left_due: w.retired.is_none()
                && slot.state == Observed::Stopping
                && slot.due.is_some()
                && (w.turn.is_some() || w.authorised),
            ready: w.was_ready || slot.was_ready || slot.state.ready(),
            young: now.saturating_duration_since(w.forked) < super::backoff::YOUNG,
        });
        // Why it failed, as the log and an abandoned reload say it.
        let reason = if !status.failure.is_empty() {
            status.failure
        } else if killed == Some(Kill::InitTimeout) {
            init_timeout_reason(self.settings.init_timeout.unwrap_or_default())
        } else {
            status.text
        };
        if outcome.respawned() {
            if w.retired.is_none() && w.leaving_since.is_some() {
                // Seen leaving unasked before it exited: its replacement
                // is forked already.
                out.push(Action::Count(Counter::Respawned));
            } else {
                self.to_respawn += 1;
            }
        }
        let mut cause = None;
        let mut backoff = None;
        match outcome {
            Outcome::Recycled => {
                // Every recycled worker is due: a cause is counted for each.
                let reason = slot.due.unwrap_or(Reason::Connections);
                cause = Some(reason);
                out.push(Action::Count(Counter::Recycled(reason)));
                // One forked since the last failure that served and was
                // recycled has shown that the code works.
                if self.failures.forked_since(w.forked) && w.generation == self.generation {
                    self.failures.end();
                }
            }
            Outcome::Stopped { failed: true } => {
                // One started to serve what was queued at the stop that
                // fails is backed off, and the stop gives up on the queue
                // after a few (`stop`).
                let _ = self.failures.count(reason, Some(w.forked), now);
            }
            // (One killed at `-inittimeout` was counted at its kill.)
            Outcome::Failed => backoff = self.count_failed_start(reason, w.forked, now),
            // It served, or was ready a while: the code works, if it was
            // started after the last failure (one started before says
            // nothing of the code that fails now).
            Outcome::Lost => {
                if self.failures.proven_by(w.forked, w.ready_at, slot.served, now) {
                    self.failures.end();
                }
            }
            // Counted when it is gone, killed or left after the question.
            Outcome::TimedOut => out.push(Action::Count(Counter::TimedOut)),
            Outcome::Retired | Outcome::Stopped { .. } | Outcome::Superseded => {}
        }
        out.push(Action::Log(Note::Exit {
            worker,
            generation: w.generation,
            outcome,
            killed,
            sigkilled: w.killed.is_some(),
            cause,
        }));
        if let Some(backoff) = backoff {
            out.push(Action::Count(Counter::Backoff));
            out.push(Action::Log(backoff));
        }
    }

    /// Counts a failed start of a worker forked at `forked`; the back-off's
    /// log entry when it is one more failure in a row.
    pub(super) fn count_failed_start(&mut self, reason: String, forked: Instant, now: Instant) -> Option<Note> {
        let delay = self.failures.count(reason, Some(forked), now)?;
        Some(Note::Backoff { failures: self.failures.failures, delay })
    }

    fn hang_settled(&mut self, worker: WorkerId, spared: bool, out: &mut Vec<Action>) {
        let Some(w) = self.worker_mut(worker) else { return };
        if w.hang.is_none() || w.killed.is_some() {
            return;
        }
        if spared {
            // Timed again from now: asked again after another -timeout.
            w.hang = None;
            w.busy = BusyWatch::default();
            return;
        }
        w.killed = Some(Kill::Timeout);
        out.push(Action::Kill { worker, reason: Kill::Timeout });
    }

    fn start_reload(&mut self, out: &mut Vec<Action>) {
        if self.phase.stopping() {
            return;
        }
        self.reload.start(self.generation);
        self.newest_generation += 1;
        self.generation = self.newest_generation;
        // Whatever failed before, the new generation gets its own tries.
        self.failures.end();
        out.push(Action::Log(Note::Reload { generation: self.generation }));
    }

    /// A stopping pool keeps its range: nothing is forked for it any more
    /// (`pool resize` is refused, SIGTTIN and SIGTTOU change nothing).
    fn resize(&mut self, min: usize, max: usize, out: &mut Vec<Action>) {
        if self.phase.stopping() {
            return;
        }
        self.target = self.sizing.set_range(min, max, self.target);
        out.push(Action::Log(Note::Resized { min, max, target: self.target }));
    }
}

/// Why a worker killed at `-inittimeout` failed, as the log says it.
pub fn init_timeout_reason(limit: Duration) -> String {
    format!("not ready within -inittimeout ({} s)", limit.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(min: usize, max: usize) -> Model {
        let settings =
            Settings { graceful: Duration::from_secs(10), init_timeout: None, timeout: None, concurrency: 1 };
        let mut sizing = Sizing::fixed(min);
        sizing.max = max;
        Model::new(settings, sizing, min)
    }

    fn forks(actions: &[Action]) -> Vec<WorkerId> {
        actions.iter().filter_map(|a| if let Action::Fork { worker, .. } = a { Some(*worker) } else { None }).collect()
    }

    /// A fork refused (out of descriptors) is a failed start: the worker
    /// is forgotten, and the next try waits for the back-off, one at a time.
    #[test]
    fn a_fork_refused_is_backed_off() {
        let start = Instant::now();
        let mut pool = model(2, 2);
        let first = forks(&pool.step(Event::Tick, start));
        assert_eq!(first.len(), 2);
        pool.step(Event::ForkFailed { worker: first[0], failure: Some("fork: out of memory".into()) }, start);
        let answer = pool.step(Event::Forked { worker: first[1], recycle_at: None }, start);
        assert!(answer.contains(&Action::Count(Counter::Started)));
        assert_eq!(pool.workers.len(), 1);
        assert_eq!(pool.failures.failures, 1);
        assert!(forks(&pool.step(Event::Tick, start + Duration::from_millis(50))).is_empty());
        // The one forked before the failure is no try of the back-off:
        // one more is tried once the back-off is over.
        assert_eq!(forks(&pool.step(Event::Tick, start + Duration::from_millis(150))).len(), 1);
    }

    /// SIGTTIN and SIGTTOU move both bounds of the range by one, the target
    /// into it.
    #[test]
    fn a_shift_moves_the_range() {
        let start = Instant::now();
        let mut pool = model(2, 4);
        let out = pool.step(Event::Shift { up: true }, start);
        assert_eq!((pool.sizing.min, pool.sizing.max, pool.target), (3, 5, 3));
        assert_eq!(out, vec![Action::Log(Note::Resized { min: 3, max: 5, target: 3 })]);
        pool.step(Event::Shift { up: false }, start);
        pool.step(Event::Shift { up: false }, start);
        assert_eq!((pool.sizing.min, pool.sizing.max, pool.target), (1, 3, 3));
    }

    /// A worker spared after the question (`-concurrency` above 1) is
    /// timed again from now; one not spared is killed, once.
    #[test]
    fn a_hang_settles_as_spared_or_killed() {
        let start = Instant::now();
        let mut pool = model(1, 1);
        pool.settings.timeout = Some(Duration::from_secs(1));
        pool.settings.concurrency = 4;
        let id = forks(&pool.step(Event::Tick, start))[0];
        pool.step(Event::Forked { worker: id, recycle_at: None }, start);
        let busy = SlotView { state: Observed::Busy, open: 1, busy_since: 7, ..SlotView::STARTING };
        pool.step(Event::Slot { worker: id, slot: busy }, start);
        pool.step(Event::Tick, start);
        let later = start + Duration::from_millis(1100);
        let out = pool.step(Event::Tick, later);
        assert!(matches!(out[..], [Action::AskStack { leaving: false, .. }]), "{out:?}");
        assert!(pool.step(Event::HangSettled { worker: id, spared: true }, later).is_empty());
        assert!(pool.worker(id).is_some_and(|w| w.hang.is_none()));
        pool.step(Event::Tick, later);
        let out = pool.step(Event::Tick, later + Duration::from_millis(1100));
        assert!(matches!(out[..], [Action::AskStack { .. }]), "{out:?}");
        let out = pool.step(Event::HangSettled { worker: id, spared: false }, later);
        assert_eq!(out, vec![Action::Kill { worker: id, reason: Kill::Timeout }]);
        assert!(pool.step(Event::HangSettled { worker: id, spared: false }, later).is_empty());
    }
}
