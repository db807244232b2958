//! The simulated world around one `Model`: simulated worker processes
//! and a simulated clock. Each turn, the world moves on (connections end,
//! `-init` finishes or fails, workers leave), then is told to the model as
//! the shell tells it (exits, hang answers, slots, the queue, a tick), and
//! the model's actions are performed on the simulated processes. The
//! invariants are checked after every turn, on the model's state and on
//! the world's.

use std::time::{Duration, Instant};

use super::super::backoff;
use super::super::events::{Action, Counter, Event as ModelEvent, ExitStatus, Note, SlotView, WorkerId};
use super::super::exits::Outcome;
use super::super::pool::{Model, Settings, Worker};
use super::super::recycling::{self, Reason, Turn};
use super::super::sizing::Sizing;
use super::super::{Observed, Retired, FORKS_PER_TURN};
use super::{Event, Init, GRACEFUL, INIT_TIME, INIT_TIMEOUT, TICK};

/// A simulated worker process.
pub(super) struct SimWorker {
    id: WorkerId,
    forked: Instant,
    init: Init,
    /// What its slot says.
    pub(super) state: Observed,
    /// Its slot has said idle or busy once.
    was_ready: bool,
    /// SIGTERM from outside that lands the moment its `-init` is done:
    /// ready and gone again before the supervisor looks.
    term_after_init: bool,
    /// Asked to leave (its leave pipe closed).
    pub(super) leave_asked: bool,
    /// SIGKILL received.
    sigkilled: bool,
    /// May leave by itself once due (written by the supervisor).
    authorised: bool,
    due: Option<Reason>,
    /// When each open connection ends (`None`: it hangs).
    open: Vec<Option<Instant>>,
    /// The start of the oldest open connection, as the worker claims it.
    busy_claim: u64,
    served: u64,
    received: u64,
    /// Exited, with (clean, signaled): a zombie until reaped.
    exited: Option<(bool, bool)>,
    /// Asked for its stack: takes no more connections.
    hang_asked: bool,
}

impl SimWorker {
    pub(super) fn alive(&self) -> bool {
        self.exited.is_none()
    }

    /// Its slot as the shell reads it: connections it received and did
    /// not close count as open, even after its death.
    fn slot(&self) -> SlotView {
        SlotView {
            state: self.state,
            was_ready: self.was_ready,
            served: self.served,
            open: (self.received - self.served) as u32,
            due: self.due,
            busy_since: if self.state == Observed::Busy { self.busy_claim } else { 0 },
        }
    }
}

/// The pool's figures, as the shell counts them from the model's actions.
#[derive(Default, Clone, Debug, PartialEq)]
pub(super) struct Figures {
    started: u64,
    pub(super) recycled: u64,
    recycled_by: [u64; 3],
    respawned: u64,
    timed_out: u64,
    pub(super) init_timed_out: u64,
    pub(super) backoffs: u64,
    /// Exits by category: recycled, retired, stopped, timed out, failed,
    /// lost, superseded.
    exits: [u64; 7],
}

pub(super) struct SimPool {
    now: Instant,
    pub(super) model: Model,
    pub(super) workers: Vec<SimWorker>,
    pub(super) figures: Figures,
    /// Since when no failure backs off and `-init` works (for the turn
    /// bound: replacements could start all that time).
    healthy_since: Instant,
    /// Since when `-init` works (a run of failures must end after).
    init_works_since: Instant,
    max_connections: Option<u64>,
    max_lifetime: Option<Duration>,
    init: Init,
    queued: usize,
    accepted: u64,
    answered: u64,
    /// The stop's graceful period ends then: what is still queued is closed.
    stop_deadline: Option<Instant>,
    gone: bool,
    /// Workers asked for their stack in the last turn: answered in this one.
    asked: Vec<WorkerId>,
    /// Forks in this turn of the loop.
    forks_this_turn: usize,
    /// Workers retired for recycling in this turn, with why they were due.
    recycled_now: Vec<Option<Reason>>,
    /// Reloads said done in this turn (their generation).
    reloaded_now: Vec<u32>,
    /// The current generation's ready workers and the target, as observed
    /// just before the tick.
    ready_before_tick: (usize, usize),
}

/// The simulated process of a worker, while it runs.
fn live_worker(workers: &mut [SimWorker], id: WorkerId) -> Option<&mut SimWorker> {
    workers.iter_mut().find(|w| w.id == id && w.alive())
}

fn exit_index(outcome: Outcome) -> usize {
    match outcome {
        Outcome::Recycled => 0,
        Outcome::Retired => 1,
        Outcome::Stopped { .. } => 2,
        Outcome::TimedOut => 3,
        Outcome::Failed => 4,
        Outcome::Lost => 5,
        Outcome::Superseded => 6,
    }
}

impl SimPool {
    pub(super) fn new(
        min: usize,
        max: usize,
        max_connections: Option<u64>,
        max_lifetime: Option<Duration>,
        timeout: Option<Duration>,
    ) -> SimPool {
        let now = Instant::now();
        let mut sizing = Sizing::fixed(min);
        sizing.max = max;
        sizing.idle_timeout = Duration::from_secs(2);
        let settings = Settings { graceful: GRACEFUL, init_timeout: Some(INIT_TIMEOUT), timeout, concurrency: 1 };
        SimPool {
            now,
            model: Model::new(settings, sizing, min),
            workers: Vec::new(),
            figures: Figures::default(),
            healthy_since: now,
            init_works_since: now,
            max_connections,
            max_lifetime,
            init: Init::Works,
            queued: 0,
            accepted: 0,
            answered: 0,
            stop_deadline: None,
            gone: false,
            asked: Vec::new(),
            forks_this_turn: 0,
            recycled_now: Vec::new(),
            reloaded_now: Vec::new(),
            ready_before_tick: (0, 0),
        }
    }

    /// Workers alive, not asked to leave, ready.
    pub(super) fn ready_in_world(&self) -> usize {
        self.workers.iter().filter(|w| w.alive() && !w.leave_asked && w.state.ready()).count()
    }

    /// What the workers do on their own as time passes.
    fn world(&mut self) {
        let now = self.now;
        for w in self.workers.iter_mut().filter(|w| w.alive()) {
            if w.state == Observed::Starting && !w.sigkilled {
                match w.init {
                    Init::Works if now >= w.forked + INIT_TIME => {
                        w.state = if w.term_after_init { Observed::Stopping } else { Observed::Idle };
                        w.was_ready = true;
                    }
                    Init::Fails if now >= w.forked + INIT_TIME => w.exited = Some((false, false)),
                    _ => {}
                }
            }
            let before = w.open.len();
            w.open.retain(|end| end.is_none_or(|end| now < end));
            let closed = (before - w.open.len()) as u64;
            w.served += closed;
            self.answered += closed;
            if w.open.is_empty() && w.state == Observed::Busy {
                w.state = Observed::Idle;
                w.busy_claim = 0;
            }
            // Due and authorised: it leaves by itself, after exactly its
            // connections.
            if w.due.is_some() && w.authorised && w.state.ready() {
                w.state = Observed::Stopping;
            }
            if w.sigkilled {
                // SIGKILL: its connections are dropped, and counted so.
                self.answered += w.open.len() as u64;
                w.open.clear();
                w.exited = Some((false, true));
            }
        }
        // Queued connections go to idle workers that still take them.
        while self.queued > 0 {
            let Some(w) = self.workers.iter_mut().find(|w| w.alive() && Self::takes(w)) else { break };
            self.queued -= 1;
            Self::hand(w, Some(now + Duration::from_millis(50)), self.max_connections, now);
        }
        let stopping = self.stop_deadline.is_some();
        for w in self.workers.iter_mut().filter(|w| w.alive()) {
            let leave = w.leave_asked || w.hang_asked || stopping || w.state == Observed::Stopping;
            if leave && w.open.is_empty() && w.state != Observed::Starting {
                w.state = Observed::Stopping;
                w.exited = Some((true, false));
            }
        }
    }

    /// Whether a worker takes a connection now: idle, not asked to leave.
    fn takes(w: &SimWorker) -> bool {
        w.state == Observed::Idle && !w.leave_asked && !w.hang_asked && !w.sigkilled
    }

    fn hand(w: &mut SimWorker, end: Option<Instant>, max_connections: Option<u64>, now: Instant) {
        if w.open.is_empty() {
            w.busy_claim = now.elapsed().as_millis() as u64 + w.id * 7 + 1;
        }
        w.open.push(end);
        w.state = Observed::Busy;
        w.was_ready = true;
        w.received += 1;
        if max_connections.is_some_and(|limit| w.received >= limit) && w.due.is_none() {
            w.due = Some(Reason::Connections);
        }
    }

    /// The position among live workers (as events pick them) of `id`.
    pub(super) fn live_position(&self, id: WorkerId) -> Option<u8> {
        let mut live = self.workers.iter().filter(|w| w.alive());
        live.position(|w| w.id == id).and_then(|n| u8::try_from(n).ok())
    }

    pub(super) fn apply(&mut self, event: &Event) {
        let now = self.now;
        let live: Vec<usize> = (0..self.workers.len()).filter(|&i| self.workers[i].alive()).collect();
        let pick = |n: u8| (!live.is_empty()).then(|| live[n as usize % live.len()]);
        match *event {
            Event::Wait(ticks) => {
                for _ in 0..ticks.max(1) {
                    self.now += TICK;
                    self.step();
                }
                return;
            }
            Event::Connect(ms) if self.stop_deadline.is_none() => {
                self.accepted += 1;
                // u32::MAX: a client that holds its connection for hours.
                let held =
                    if ms == u32::MAX { Duration::from_secs(4 * 3600) } else { Duration::from_millis(ms.into()) };
                let max = self.max_connections;
                match self.workers.iter_mut().find(|w| w.alive() && Self::takes(w)) {
                    Some(w) => Self::hand(w, Some(now + held), max, now),
                    None => self.queued += 1,
                }
            }
            Event::Connect(_) => {}
            Event::KillNine(n) => {
                if let Some(i) = pick(n) {
                    let w = &mut self.workers[i];
                    self.answered += w.open.len() as u64;
                    w.open.clear();
                    w.exited = Some((false, true));
                }
            }
            Event::Term(n) => {
                // SIGTERM from outside: it leaves once its connections
                // are closed, unasked.
                if let Some(i) = pick(n) {
                    let w = &mut self.workers[i];
                    if w.state.ready() {
                        w.state = Observed::Stopping;
                    } else if w.state == Observed::Starting {
                        w.term_after_init = true;
                    }
                }
            }
            Event::HandlerExits(n) => {
                if let Some(i) = pick(n).filter(|&i| self.workers[i].state == Observed::Busy) {
                    let w = &mut self.workers[i];
                    self.answered += w.open.len() as u64;
                    w.open.clear();
                    w.exited = Some((true, false));
                }
            }
            Event::GrowsInMemory(n) => {
                if let Some(i) = pick(n).filter(|&i| self.workers[i].state.ready()) {
                    self.workers[i].due.get_or_insert(Reason::Memory);
                }
            }
            Event::Hangs(n) => {
                if let Some(i) = pick(n).filter(|&i| self.workers[i].state == Observed::Busy) {
                    self.workers[i].open[0] = None;
                }
            }
            Event::InitBecomes(init) => self.init = init,
            Event::Reload => self.tell(ModelEvent::Reload),
            Event::Resize(a, b) => {
                let (min, max) = (usize::from(a % 6) + 1, usize::from(a % 6) + 1 + usize::from(b % 4));
                self.tell(ModelEvent::Resize { min, max });
            }
            // The child is not a worker: nothing the supervisor sees
            // changes (it is not in its list, takes no slot).
            Event::ForksInHandler => {}
        }
        self.step();
    }

    /// Tells the model one event and performs what it answers.
    fn tell(&mut self, event: ModelEvent) {
        let actions = self.model.step(event, self.now);
        for action in actions {
            self.perform(action);
        }
    }

    fn perform(&mut self, action: Action) {
        match action {
            Action::Fork { worker, .. } => {
                self.workers.push(SimWorker {
                    id: worker,
                    forked: self.now,
                    init: self.init,
                    state: Observed::Starting,
                    was_ready: false,
                    term_after_init: false,
                    leave_asked: false,
                    sigkilled: false,
                    authorised: false,
                    due: None,
                    open: Vec::new(),
                    busy_claim: 0,
                    served: 0,
                    received: 0,
                    exited: None,
                    hang_asked: false,
                });
                self.forks_this_turn += 1;
                let jitter = worker % 7 * 10;
                let recycle_at = recycling::lifetime_deadline(self.now, self.max_lifetime, jitter);
                self.tell(ModelEvent::Forked { worker, recycle_at });
            }
            Action::Retire { worker, reason } => {
                if reason == Retired::Recycle {
                    self.recycled_now.push(self.model.worker(worker).and_then(|w| w.slot.due));
                }
                if let Some(w) = live_worker(&mut self.workers, worker) {
                    w.leave_asked = true;
                }
            }
            Action::Kill { worker, .. } => {
                if let Some(w) = live_worker(&mut self.workers, worker) {
                    w.sigkilled = true;
                }
            }
            Action::AskStack { worker, leaving, .. } => {
                if let Some(w) = live_worker(&mut self.workers, worker) {
                    w.hang_asked = leaving;
                }
                self.asked.push(worker);
            }
            Action::MarkDue { worker, reason } => {
                if let Some(w) = live_worker(&mut self.workers, worker) {
                    w.due.get_or_insert(reason);
                }
            }
            Action::Authorise { worker, may_leave } => {
                if let Some(w) = live_worker(&mut self.workers, worker) {
                    w.authorised = may_leave;
                }
            }
            Action::Count(counter) => {
                let f = &mut self.figures;
                match counter {
                    Counter::Started => f.started += 1,
                    Counter::Respawned => f.respawned += 1,
                    Counter::Recycled(reason) => {
                        f.recycled += 1;
                        f.recycled_by[reason.index()] += 1;
                    }
                    Counter::TimedOut => f.timed_out += 1,
                    Counter::InitTimedOut => f.init_timed_out += 1,
                    Counter::Backoff => f.backoffs += 1,
                }
            }
            Action::Log(Note::Exit { outcome, .. }) => self.figures.exits[exit_index(outcome)] += 1,
            Action::Log(Note::Reloaded { generation }) => self.reloaded_now.push(generation),
            Action::Log(_) | Action::Ready => {}
            Action::Gone => self.gone = true,
        }
    }

    /// One turn of the supervisor's loop: the world moves, the shell tells
    /// the model what it sees (exits, answers, slots, the queue) and the
    /// tick, and performs the actions.
    pub(super) fn step(&mut self) {
        self.world();
        let before = self.figures.clone();
        self.recycled_now.clear();
        self.reloaded_now.clear();
        let mut index = 0;
        while index < self.workers.len() {
            let Some((clean, signaled)) = self.workers[index].exited else {
                index += 1;
                continue;
            };
            let w = self.workers.remove(index);
            let text = if signaled { "signal SIGKILL".to_string() } else { format!("exit {}", u8::from(!clean)) };
            let status = ExitStatus { clean, signaled, text, failure: String::new() };
            let failed_before = self.figures.exits[4];
            // Of the generation served, and nobody asked it to go.
            let m = &self.model;
            let unasked = m.workers.iter().any(|mw| {
                mw.id == w.id && mw.generation == m.generation && mw.retired.is_none() && mw.killed.is_none()
            }) && !m.phase.stopping()
                && !w.leave_asked
                && !w.hang_asked
                && w.due.is_none();
            self.tell(ModelEvent::Exited { worker: w.id, slot: w.slot(), status });
            // A worker that was ready a while did not fail to start, even
            // if the supervisor never saw it ready; one that left young,
            // unasked, having received nothing, did: it is backed off (an
            // application that exits as soon as it is ready must not have
            // the pool fork in a tight loop).
            let failed = self.figures.exits[4] > failed_before;
            let young = self.now.saturating_duration_since(w.forked) < backoff::YOUNG;
            if w.was_ready && !signaled && !young {
                assert!(!failed, "worker {} was ready a while, counted as a failed start", w.id);
            }
            if w.was_ready && clean && young && w.received == 0 && unasked {
                assert!(failed, "worker {} left young having served nothing, not backed off", w.id);
            }
        }
        // A worker asked for its stack answers within the next turn, and
        // is killed (`-concurrency 1`).
        for worker in std::mem::take(&mut self.asked) {
            self.tell(ModelEvent::HangSettled { worker, spared: false });
        }
        let slots: Vec<(WorkerId, SlotView)> = self.workers.iter().map(|w| (w.id, w.slot())).collect();
        for (worker, slot) in slots {
            self.tell(ModelEvent::Slot { worker, slot });
        }
        self.tell(ModelEvent::Queue { queued: self.queued, pending: self.queued > 0 });
        self.forks_this_turn = 0;
        self.ready_before_tick = (self.model.ready_count(), self.model.target);
        self.tell(ModelEvent::Tick);
        if self.stop_deadline.is_some_and(|deadline| self.now >= deadline) {
            // The graceful period is over: what is still queued is closed
            // with the port's queue, and counted.
            self.answered += self.queued as u64;
            self.queued = 0;
        }
        if !self.model.failures.healthy() || self.init != Init::Works {
            self.healthy_since = self.now;
        }
        if self.init != Init::Works {
            self.init_works_since = self.now;
        }
        self.check(&before);
    }

    /// Ready workers of the current generation that serve, turn holders
    /// not yet retired included.
    fn ready_serving(&self) -> usize {
        let m = &self.model;
        let serves = |w: &&Worker| {
            w.generation == m.generation
                && w.retired.is_none()
                && w.killed.is_none()
                && !w.asked_to_leave()
                && w.leaving_since.is_none()
                && w.slot.state.ready()
        };
        m.workers.iter().filter(serves).count()
    }

    /// The invariants, after every step.
    fn check(&self, before: &Figures) {
        let f = &self.figures;
        let m = &self.model;
        // At most K forks per turn of the loop.
        assert!(self.forks_this_turn <= FORKS_PER_TURN, "{} forks in one turn", self.forks_this_turn);
        // Counters never go back.
        let pairs = [
            (before.started, f.started),
            (before.recycled, f.recycled),
            (before.respawned, f.respawned),
            (before.timed_out, f.timed_out),
            (before.init_timed_out, f.init_timed_out),
            (before.backoffs, f.backoffs),
        ];
        assert!(pairs.iter().all(|(a, b)| a <= b), "a counter went back: {before:?} -> {f:?}");
        // Recycled is the sum of recycledby, and the recycled exits.
        assert_eq!(f.recycled, f.recycled_by.iter().sum::<u64>(), "recycled != sum of recycledby");
        assert_eq!(f.recycled, f.exits[0]);
        assert_eq!(f.timed_out, f.exits[3], "timedout != the exits after a timeout");
        // Each exit in exactly one category: what started is alive or
        // counted once among the exits; the model and the world agree on
        // who is alive.
        let alive = self.workers.len() as u64;
        assert_eq!(f.started, alive + f.exits.iter().sum::<u64>(), "exits do not add up: {f:?}");
        assert_eq!(m.workers.len(), self.workers.len(), "the model and the world disagree on the workers");
        // A healthy worker is retired for recycling only once the pool is
        // its size without it: never drained by its own recycling. Past
        // `-maxconnections` it may leave first, only while replacements
        // can start.
        let early = self.recycled_now.iter().filter(|due| **due == Some(Reason::Connections)).count();
        let full = self.ready_serving() + early >= m.target;
        let can_start = m.failures.healthy() && !m.reload.running();
        for due in &self.recycled_now {
            if *due == Some(Reason::Connections) {
                assert!(full || can_start, "retired for -maxconnections while replacements cannot start");
            } else {
                assert!(full, "recycled with {} ready of {}", self.ready_serving(), m.target);
            }
        }
        // A reload is said done only once its generation serves: as many
        // of its workers ready as the target, when the turn began (the same
        // turn may then retire some, recycling or shrinking).
        let (ready, target) = self.ready_before_tick;
        for generation in &self.reloaded_now {
            assert!(ready >= target, "reload of generation {generation} done with {ready} ready of {target}");
        }
        // Turns: within the bound; none given while replacements cannot
        // start; none held long while the pool could start workers.
        let holders: Vec<&Worker> = m.workers.iter().filter(|w| matches!(w.turn, Some(Turn::Held(_)))).collect();
        assert!(holders.len() <= recycling::bound(m.sizing.max), "{} turns held", holders.len());
        let limit = INIT_TIMEOUT + INIT_TIME + recycling::HOLD + TICK * 3;
        let others_due = m.serving().any(|w| w.slot.due.is_some() && w.slot.state.ready());
        for w in holders.iter().filter(|_| others_due) {
            let Some(Turn::Held(since)) = w.turn else { continue };
            let since = since.max(self.healthy_since);
            let waited = self.now.saturating_duration_since(since);
            let blocked = m.reload.running() || m.phase.stopping() || !m.failures.healthy();
            assert!(
                blocked || waited <= limit,
                "worker {} held its turn {:?} while the pool was healthy",
                w.id,
                waited
            );
        }
        // Retired for recycling while still serving: no more at once than
        // the pool's turns, but for one that has served on for `HOLD`
        // since it was retired (a slow leaver keeps nobody waiting).
        let draining = m
            .workers
            .iter()
            .filter(|w| w.retired == Some(Retired::Recycle) && w.slot.open > 0 && w.slot.state != Observed::Starting)
            .filter(|w| {
                w.leaving_since.is_some_and(|since| self.now.saturating_duration_since(since) < recycling::HOLD)
            })
            .count();
        assert!(draining <= recycling::bound(m.sizing.max), "{draining} retired for recycling serve at once");
        // A run of failures ends once `-init` works: the next try is at
        // most a back-off away, and is ready and past its youth soon after
        // (a run nothing could end stopped recycling and sizing for good).
        let bound = backoff::CAP + INIT_TIMEOUT + INIT_TIME + backoff::YOUNG + TICK * 3;
        if let Some(at) = m.failures.failed_at().filter(|&at| at >= self.init_works_since) {
            let stuck = !m.phase.stopping() && self.now.saturating_duration_since(at) > bound;
            assert!(!stuck, "a run of {} failures never ended", m.failures.failures);
        }
        // The serving count stays within the range (turn holders and
        // workers leaving are not counted; their replacements are).
        let serving = m.serving().count();
        assert!(serving <= m.target, "{serving} serving above the target {}", m.target);
        assert!(m.target >= m.sizing.min && m.target <= m.sizing.max);
        // Every connection accepted is being served, queued, or answered.
        let open: u64 = self.workers.iter().map(|w| w.open.len() as u64).sum();
        assert_eq!(self.accepted, self.answered + open + self.queued as u64, "a connection was lost");
    }

    /// Stops the pool and runs until it is gone; every fork is reaped and
    /// everything accepted is served (its `-init` works again).
    pub(super) fn stop(&mut self) {
        self.init = Init::Works;
        self.stop_deadline = Some(self.now + GRACEFUL);
        self.tell(ModelEvent::Stop { at_once: false });
        for _ in 0..400 {
            self.now += TICK;
            self.step();
            if self.gone {
                break;
            }
        }
        assert!(self.gone, "the pool is not gone after the stop");
        assert!(self.workers.is_empty(), "{} workers not reaped after the stop", self.workers.len());
        assert!(self.model.workers.is_empty(), "the model still knows workers after the stop");
        assert_eq!(self.queued, 0, "queued connections left after the stop");
    }
}
