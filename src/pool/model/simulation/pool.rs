//! The simulated pool: simulated workers, and what the shell
//! (`lifecycle`, `supervisor`) does around the model's policies, in the
//! same order, with the invariants checked after every step.

use std::time::{Duration, Instant};

use super::super::backoff::{FailureRun, RELOAD_FAILURES};
use super::super::exits::{classify, ExitFacts, Outcome};
use super::super::recycling::{self, Candidate, Reason, Turn};
use super::super::sizing::{Load, Sizing};
use super::super::timeouts::{init_overdue, BusyWatch};
use super::super::{forks_this_turn, Kill, Observed, Retired, FORKS_PER_TURN};
use super::{Event, Init, GRACEFUL, INIT_TIME, INIT_TIMEOUT, TICK};

pub(super) struct SimWorker {
    id: u64,
    generation: u32,
    forked: Instant,
    init: Init,
    pub(super) state: Observed,
    pub(super) retired: Option<Retired>,
    killed: Option<Kill>,
    turn: Option<Turn>,
    /// May leave by itself once due (written by the supervisor).
    authorised: bool,
    due: Option<Reason>,
    recycle_at: Option<Instant>,
    /// When each open connection ends (`None`: it hangs).
    open: Vec<Option<Instant>>,
    /// The start of the oldest open connection, as the worker claims it.
    busy_claim: u64,
    busy: BusyWatch,
    served: u64,
    received: u64,
    /// Exited, with (clean, signaled): a zombie until reaped.
    exited: Option<(bool, bool)>,
    hang_asked: bool,
}

impl SimWorker {
    pub(super) fn alive(&self) -> bool {
        self.exited.is_none()
    }
}

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
    pub(super) workers: Vec<SimWorker>,
    next_id: u64,
    target: usize,
    generation: u32,
    newest: u32,
    reload: Option<u32>,
    failures: FailureRun,
    /// Since when no failure backs off and `-init` works (for the turn
    /// bound: replacements could start all that time).
    healthy_since: Instant,
    sizing: Sizing,
    to_respawn: u64,
    pub(super) figures: Figures,
    max_connections: Option<u64>,
    max_lifetime: Option<Duration>,
    /// `-timeout`.
    timeout: Option<Duration>,
    init: Init,
    queued: usize,
    accepted: u64,
    answered: u64,
    /// Queued connections closed when the graceful period ended.
    dropped: u64,
    stopping: Option<Instant>,
    /// Forks in the last turn of the loop.
    forks_last_turn: usize,
    /// Workers retired for recycling in the last turn, and the workers
    /// ready without turns just before.
    recycle_checks: Vec<(usize, usize)>,
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
        SimPool {
            now,
            workers: Vec::new(),
            next_id: 1,
            target: min,
            generation: 1,
            newest: 1,
            reload: None,
            failures: FailureRun::default(),
            healthy_since: now,
            sizing,
            to_respawn: 0,
            figures: Figures::default(),
            max_connections,
            max_lifetime,
            timeout,
            init: Init::Works,
            queued: 0,
            accepted: 0,
            answered: 0,
            dropped: 0,
            stopping: None,
            forks_last_turn: 0,
            recycle_checks: Vec::new(),
        }
    }

    /// What the workers do on their own as time passes.
    fn world(&mut self) {
        let now = self.now;
        for w in self.workers.iter_mut().filter(|w| w.alive()) {
            if w.state == Observed::Starting && w.killed.is_none() {
                match w.init {
                    Init::Works if now >= w.forked + INIT_TIME => w.state = Observed::Idle,
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
            if w.killed.is_some() {
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
        let stopping = self.stopping.is_some();
        for w in self.workers.iter_mut().filter(|w| w.alive()) {
            let leave = w.retired.is_some() || w.hang_asked || stopping || w.state == Observed::Stopping;
            if leave && w.open.is_empty() && w.state != Observed::Starting {
                w.state = Observed::Stopping;
                w.exited = Some((true, false));
            }
        }
    }

    /// Whether a worker takes a connection now: idle, not asked to leave.
    fn takes(w: &SimWorker) -> bool {
        w.state == Observed::Idle && w.retired.is_none() && !w.hang_asked && w.killed.is_none()
    }

    fn hand(w: &mut SimWorker, end: Option<Instant>, max_connections: Option<u64>, now: Instant) {
        if w.open.is_empty() {
            w.busy_claim = now.elapsed().as_millis() as u64 + w.id * 7 + 1;
        }
        w.open.push(end);
        w.state = Observed::Busy;
        w.received += 1;
        if max_connections.is_some_and(|limit| w.received >= limit) && w.due.is_none() {
            w.due = Some(Reason::Connections);
        }
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
            Event::Connect(ms) if self.stopping.is_none() => {
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
            Event::Reload if self.stopping.is_none() => {
                self.reload = Some(self.reload.unwrap_or(self.generation));
                self.newest += 1;
                self.generation = self.newest;
                self.failures.end();
            }
            Event::Reload => {}
            Event::Resize(a, b) => {
                let (min, max) = (usize::from(a % 6) + 1, usize::from(a % 6) + 1 + usize::from(b % 4));
                self.target = self.sizing.set_range(min, max, self.target);
            }
            // The child is not a worker: nothing the supervisor sees
            // changes (it is not in its list, takes no slot).
            Event::ForksInHandler => {}
        }
        self.step();
    }

    /// One turn of the supervisor's loop, as `supervisor::reconcile`.
    pub(super) fn step(&mut self) {
        self.world();
        let before = self.figures.clone();
        self.reap();
        self.settle_reload();
        self.kill_stuck();
        self.recycle_checks.clear();
        self.forks_last_turn = 0;
        if let Some(deadline) = self.stopping {
            if self.now >= deadline {
                self.workers.iter_mut().filter(|w| w.alive() && w.killed.is_none()).for_each(|w| {
                    w.killed = Some(Kill::Graceful);
                });
                // The graceful period is over: what is still queued is
                // closed with the port's queue, and counted.
                self.dropped += self.queued as u64;
                self.answered += self.queued as u64;
                self.queued = 0;
            }
            let takes = self.workers.iter().any(|w| {
                w.alive()
                    && w.retired.is_none()
                    && w.killed.is_none()
                    && !w.hang_asked
                    && matches!(w.state, Observed::Starting | Observed::Idle | Observed::Busy)
            });
            if self.queued > 0 && !takes && self.failures.failures < RELOAD_FAILURES && self.now < deadline {
                let trying = self.trying();
                let n = self.failures.forks_allowed(self.now, 1, trying);
                self.fork(n);
            }
        } else {
            self.size();
            self.retire_surplus();
            let can_start = self.failures.healthy() && self.reload.is_none();
            self.recycle(can_start);
            let missing = self.target.saturating_sub(self.serving().count());
            let trying = self.trying();
            let n = self.failures.forks_allowed(self.now, forks_this_turn(missing), trying);
            self.fork(n);
        }
        if !self.failures.healthy() || self.init != Init::Works {
            self.healthy_since = self.now;
        }
        self.check(&before);
    }

    fn serving(&self) -> impl Iterator<Item = &SimWorker> {
        self.workers.iter().filter(move |w| {
            w.alive()
                && w.generation == self.generation
                && w.retired.is_none()
                && w.killed.is_none()
                && !w.hang_asked
                && w.turn.is_none()
                && w.state != Observed::Stopping
        })
    }

    pub(super) fn ready_count(&self) -> usize {
        self.serving().filter(|w| w.state.ready()).count()
    }

    fn trying(&self) -> bool {
        self.workers.iter().any(|w| {
            w.alive()
                && w.generation == self.generation
                && w.retired.is_none()
                && w.killed.is_none()
                && self.failures.forked_since(w.forked)
        })
    }

    fn fork(&mut self, n: usize) {
        for _ in 0..n {
            let id = self.next_id;
            self.next_id += 1;
            let jitter = id % 7 * 10;
            self.workers.push(SimWorker {
                id,
                generation: self.generation,
                forked: self.now,
                init: self.init,
                state: Observed::Starting,
                retired: None,
                killed: None,
                turn: None,
                authorised: false,
                due: None,
                recycle_at: recycling::lifetime_deadline(self.now, self.max_lifetime, jitter),
                open: Vec::new(),
                busy_claim: 0,
                busy: BusyWatch::default(),
                served: 0,
                received: 0,
                exited: None,
                hang_asked: false,
            });
            self.figures.started += 1;
            if self.to_respawn > 0 {
                self.to_respawn -= 1;
                self.figures.respawned += 1;
            }
        }
        self.forks_last_turn += n;
    }

    fn reap(&mut self) {
        let now = self.now;
        let mut index = 0;
        while index < self.workers.len() {
            let Some((clean, signaled)) = self.workers[index].exited else {
                index += 1;
                continue;
            };
            let w = self.workers.remove(index);
            let killed = w.killed.or(w.hang_asked.then_some(Kill::Timeout));
            let outcome = classify(ExitFacts {
                current: w.generation == self.generation,
                stopping: self.stopping.is_some(),
                retired: w.retired,
                killed,
                clean,
                signaled,
                received: w.received > 0,
                left_due: w.retired.is_none()
                    && w.state == Observed::Stopping
                    && w.due.is_some()
                    && (w.authorised || w.turn.is_some()),
                ready: w.state != Observed::Starting,
            });
            self.figures.exits[exit_index(outcome)] += 1;
            if outcome.respawned() {
                self.to_respawn += 1;
            }
            match outcome {
                Outcome::Recycled => {
                    self.figures.recycled += 1;
                    self.figures.recycled_by[w.due.unwrap_or(Reason::Connections).index()] += 1;
                    if self.failures.forked_since(w.forked) && w.generation == self.generation {
                        self.failures.end();
                    }
                }
                Outcome::Stopped { failed: true } => {
                    let _ = self.failures.count("stop".into(), Some(w.forked), now);
                }
                Outcome::Failed => {
                    let counted = self.failures.count("failed".into(), Some(w.forked), now);
                    self.figures.backoffs += u64::from(counted.is_some());
                }
                Outcome::Lost => self.failures.end(),
                Outcome::TimedOut => self.figures.timed_out += 1,
                _ => {}
            }
        }
        let generation = self.generation;
        let proven = self.workers.iter().any(|w| {
            w.alive()
                && w.generation == generation
                && w.retired.is_none()
                && w.killed.is_none()
                && w.state.ready()
                && self.failures.proven_by(w.forked, w.served, now)
        });
        if self.failures.failed_at().is_some() && proven {
            self.failures.end();
        }
    }

    fn settle_reload(&mut self) {
        let Some(previous) = self.reload else { return };
        if self.ready_count() >= self.target {
            self.reload = None;
            return;
        }
        if self.failures.failures < RELOAD_FAILURES {
            return;
        }
        self.generation = self
            .workers
            .iter()
            .filter(|w| w.alive() && w.retired.is_none() && w.killed.is_none() && w.state.ready())
            .map(|w| w.generation)
            .max()
            .unwrap_or(previous);
        self.reload = None;
        self.failures.end();
        self.to_respawn = 0;
    }

    fn kill_stuck(&mut self) {
        let now = self.now;
        for w in self.workers.iter_mut().filter(|w| w.alive() && w.killed.is_none()) {
            if w.hang_asked {
                w.killed = Some(Kill::Timeout);
                continue;
            }
            if w.state == Observed::Starting && w.retired.is_none() && init_overdue(w.forked, now, INIT_TIMEOUT) {
                w.killed = Some(Kill::InitTimeout);
                self.figures.init_timed_out += 1;
                // A failed start, counted at the kill (as the shell does).
                let counted = self.failures.count("inittimeout".into(), Some(w.forked), now);
                self.figures.backoffs += u64::from(counted.is_some());
                continue;
            }
            let claim = if w.state == Observed::Busy { w.busy_claim } else { 0 };
            let Some(timeout) = self.timeout else { continue };
            if w.busy.observe(claim, now).is_some_and(|busy| busy > timeout) {
                w.hang_asked = true;
            }
        }
    }

    fn size(&mut self) {
        let settled = self.reload.is_none() && self.failures.healthy() && self.serving().count() == self.target;
        let mut load = Load { queued: self.queued, ..Load::default() };
        for w in self.serving() {
            match w.state {
                Observed::Idle => load.idle += 1,
                Observed::Starting => load.starting += 1,
                _ => load.busy += 1,
            }
        }
        let mut target = self.target;
        self.sizing.decide(self.now, &mut target, settled, load);
        self.target = target;
    }

    fn retire(&mut self, count: usize, reason: Retired, which: impl Fn(&SimWorker) -> bool) {
        let mut candidates: Vec<usize> = (0..self.workers.len())
            .filter(|&i| {
                let w = &self.workers[i];
                w.alive() && w.retired.is_none() && w.killed.is_none() && which(w)
            })
            .collect();
        let rank = |state: Observed| match state {
            Observed::Idle => 0,
            Observed::Starting => 1,
            Observed::Stopping => 2,
            Observed::Busy => 3,
        };
        candidates.sort_by_key(|&i| rank(self.workers[i].state));
        for i in candidates.into_iter().take(count) {
            self.workers[i].retired = Some(reason);
        }
    }

    fn retire_surplus(&mut self) {
        let generation = self.generation;
        let serving = self.serving().count();
        if serving > self.target {
            // Of the serving ones: one leaving unasked is no surplus.
            self.retire(serving - self.target, Retired::Resize, |w| {
                w.generation == generation && w.turn.is_none() && !w.hang_asked && w.state != Observed::Stopping
            });
        }
        let fallback = self.reload.unwrap_or(generation);
        self.retire(usize::MAX, Retired::Reload, |w| {
            w.generation != generation && w.generation != fallback && w.state == Observed::Starting
        });
        let ready = self.ready_count();
        let old = self
            .workers
            .iter()
            .filter(|w| w.alive() && w.generation != generation && w.retired.is_none() && w.killed.is_none())
            .count();
        let allowed_old = self.target.saturating_sub(ready);
        if old > allowed_old {
            self.retire(old - allowed_old, Retired::Reload, |w| w.generation != generation);
        }
    }

    fn recycle(&mut self, can_start: bool) {
        let candidates: Vec<Candidate> = self
            .workers
            .iter()
            .enumerate()
            .filter(|(_, w)| w.alive())
            .map(|(index, w)| Candidate {
                index,
                forked: w.forked,
                current: w.generation == self.generation,
                state: w.state,
                leaving: w.retired.is_some() || w.killed.is_some() || w.hang_asked,
                due: w.due,
                turn: w.turn,
                recycle_at: w.recycle_at,
                served: w.received,
                open: w.open.len() as u32,
                authorised: w.authorised,
            })
            .collect();
        let ready_without = self.ready_count();
        let plan = recycling::plan(&candidates, self.target, ready_without, can_start, self.now);
        for &i in &plan.due_by_age {
            self.workers[i].due.get_or_insert(Reason::Age);
        }
        for &i in plan.taken.iter().chain(&plan.turns) {
            self.workers[i].turn = Some(Turn::Held(self.now));
        }
        for &i in &plan.release {
            self.workers[i].turn = Some(Turn::Ended);
        }
        for (i, w) in self.workers.iter_mut().enumerate() {
            w.authorised = plan.authorised.contains(&i);
        }
        for &i in &plan.retire {
            // Past -maxconnections: retired at once, only while healthy
            // (or, like the others, once its replacement is ready).
            if self.workers[i].due == Some(Reason::Connections) && ready_without < self.target {
                assert!(can_start, "retired for -maxconnections while replacements cannot start");
            } else {
                self.recycle_checks.push((ready_without, self.target));
            }
            self.workers[i].retired = Some(Retired::Recycle);
        }
    }

    /// The invariants, after every step.
    fn check(&self, before: &Figures) {
        let f = &self.figures;
        // At most K forks per turn of the loop.
        assert!(self.forks_last_turn <= FORKS_PER_TURN, "{} forks in one turn", self.forks_last_turn);
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
        // counted once among the exits.
        let alive = self.workers.len() as u64;
        assert_eq!(f.started, alive + f.exits.iter().sum::<u64>(), "exits do not add up: {f:?}");
        // A healthy worker is retired for recycling only once the pool is
        // its size without it: never drained by its own recycling.
        for &(ready_without, target) in &self.recycle_checks {
            assert!(ready_without >= target, "recycled with {ready_without} ready of {target}");
        }
        // Turns: within the bound; none given while replacements cannot
        // start; none held long while the pool could start workers.
        let held = |w: &&SimWorker| w.alive() && matches!(w.turn, Some(Turn::Held(_)));
        let holders: Vec<&SimWorker> = self.workers.iter().filter(held).collect();
        assert!(holders.len() <= recycling::bound(self.sizing.max), "{} turns held", holders.len());
        let limit = INIT_TIMEOUT + INIT_TIME + recycling::HOLD + TICK * 3;
        let others_due = self.serving().any(|w| w.due.is_some() && w.state.ready());
        for w in holders.iter().filter(|_| others_due) {
            let Some(Turn::Held(since)) = w.turn else { continue };
            let since = since.max(self.healthy_since);
            let waited = self.now.saturating_duration_since(since);
            let blocked = self.reload.is_some() || self.stopping.is_some() || !self.failures.healthy();
            assert!(
                blocked || waited <= limit,
                "worker {} held its turn {:?} while the pool was healthy",
                w.id,
                waited
            );
        }
        // The serving count stays within the range (turn holders and
        // workers leaving are not counted; their replacements are).
        let serving = self.serving().count();
        assert!(serving <= self.target, "{serving} serving above the target {}", self.target);
        assert!(self.target >= self.sizing.min && self.target <= self.sizing.max);
        // Every connection accepted is being served, queued, or answered.
        let open: u64 = self.workers.iter().map(|w| w.open.len() as u64).sum();
        assert_eq!(self.accepted, self.answered + open + self.queued as u64, "a connection was lost");
    }

    /// Stops the pool and runs until it is gone; every fork is reaped and
    /// everything accepted is served (its `-init` works again).
    pub(super) fn stop(&mut self) {
        self.init = Init::Works;
        self.stopping = Some(self.now + GRACEFUL);
        self.failures.end();
        for _ in 0..400 {
            self.now += TICK;
            self.step();
            if self.workers.is_empty() && self.queued == 0 {
                break;
            }
        }
        assert!(self.workers.is_empty(), "{} workers not reaped after the stop", self.workers.len());
        assert_eq!(self.queued, 0, "queued connections left after the stop");
    }
}
