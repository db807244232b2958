//! A pool's workers through their lives: how each is started (`spawn`)
//! and collected (`reap`, each exit counted in the category the model
//! gives it: `model::exits`; failures backed off: `model::backoff`), how
//! a reload settles or is abandoned, and how workers are retired (reload,
//! resize). The supervisor decides when (`supervisor::reconcile`); this
//! says how.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{ForkResult, Pid};

use crate::tcl::Obj;

use super::after_fork::LeaveEnd;
use super::model::exits::{self, ExitFacts, Outcome};
use super::model::reload::Settled;
use super::model::timeouts::{overstays, BusyWatch};
use super::model::{Kill, Retired};
use super::scoreboard::{now_millis, State};
use super::signals;
use super::state::LogEntry;
use super::state::{Child, Pool};
use super::worker::{self, Assignment};

impl Pool {
    /// Collects the workers that have exited, and counts each exit in one
    /// category (`model::exits`): a failure is a worker of the current
    /// generation that ends unasked before it received a connection (its
    /// `-init` failed, it exited, it crashed, it was not ready in time) or
    /// by a signal nobody sent it on the pool's behalf; failures back off.
    /// A worker that exits after it received one, that was recycled,
    /// retired or killed past `-timeout`, did not fail: it is replaced at
    /// once (a retired one needs no replacement). A worker of an older
    /// generation that dies during a reload says nothing of the code being
    /// started: the new generation replaces it once ready, or its own
    /// generation if the reload is abandoned.
    pub(super) fn reap(&mut self, entries: &mut Vec<LogEntry>) {
        let mut index = 0;
        let now = Instant::now();
        while index < self.children.len() {
            let pid = self.children[index].pid;
            let status = match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => {
                    index += 1;
                    continue;
                }
                Ok(status) => status,
                // Reaped by someone else (a script's own `wait`, or the
                // kernel when SIGCHLD is ignored): gone all the same, with
                // a status nobody can know.
                Err(_) => WaitStatus::StillAlive,
            };
            let child = self.children.remove(index);
            let slot = self.scoreboard.slot(child.slot);
            let served = slot.served();
            let received = served + u64::from(slot.open()) > 0;
            let message = slot.failure();
            self.totals.proxy_errors += slot.proxy_errors();
            self.totals.proxy_untrusted += slot.proxy_untrusted();
            self.totals.served += served;
            self.totals.busy_millis += slot.busy_millis(now_millis());
            let (status_text, clean, signaled) = match status {
                WaitStatus::Exited(_, code) => (format!("exit {code}"), code == 0, false),
                WaitStatus::Signaled(_, signal, _) => (format!("signal {}", signal.as_str()), false, true),
                WaitStatus::StillAlive => ("unknown".to_string(), false, false),
                other => (format!("{other:?}"), false, false),
            };
            // Asked for its stack past `-timeout`: killed for it, even if
            // it left before the kill.
            let killed = child.killed.or(child.hang.as_ref().map(|_| Kill::Timeout));
            let outcome = exits::classify(ExitFacts {
                current: child.generation == self.generation,
                stopping: self.phase.stopping(),
                retired: child.retired,
                killed,
                clean,
                signaled,
                received,
                // Left by itself once due, authorised (its slot's turn) or
                // holding a turn: a due worker sent SIGTERM is no recycle.
                left_due: child.retired.is_none()
                    && slot.state() == State::Stopping
                    && super::recycling::due(slot).is_some()
                    && (child.turn.is_some() || slot.turn.load(std::sync::atomic::Ordering::SeqCst) != 0),
                ready: child.was_ready || matches!(slot.state(), State::Idle | State::Busy),
            });
            let cause = self.recycled_reason(child.slot, outcome == Outcome::Recycled);
            self.scoreboard.free(child.slot);
            let mut fields = vec![
                ("pid", Obj::new_int(pid.as_raw().into())),
                ("generation", Obj::new_int(child.generation.into())),
                ("status", Obj::new_string(&status_text)),
                ("served", Obj::new_int(served as i64)),
            ];
            if !message.is_empty() {
                fields.push(("error", Obj::new_string(&message)));
            }
            // Why it failed, as the log and an abandoned reload say it.
            let reason = if !message.is_empty() {
                message.clone()
            } else if killed == Some(Kill::InitTimeout) {
                let limit = self.config.init_timeout.unwrap_or_default().as_secs_f64();
                format!("not ready within -inittimeout ({limit} s)")
            } else {
                status_text.clone()
            };
            let mut backoff_entry = None;
            if outcome.respawned() {
                if child.retired.is_none() && child.leaving_since.is_some() {
                    // Seen leaving unasked before it exited
                    // (`hold_to_claims`): its replacement is forked already.
                    self.totals.respawned += 1;
                } else {
                    self.to_respawn += 1;
                }
            }
            match outcome {
                Outcome::Recycled => {
                    self.totals.recycled += 1;
                    fields.push(("recycled", Obj::new_int(1)));
                    // One forked since the last failure that served and was
                    // recycled (-maxconnections) has shown that the code works.
                    if self.failures.forked_since(child.forked) && child.generation == self.generation {
                        self.failures.end();
                    }
                }
                Outcome::Stopped { failed: true } => {
                    // One started to serve what was queued at the stop that
                    // fails is backed off, and the stop gives up on the
                    // queue after a few (`supervisor::reconcile`).
                    let _ = self.failures.count(reason, Some(child.forked), now);
                }
                // (One killed at `-inittimeout` was counted at its kill.)
                Outcome::Failed => backoff_entry = self.count_failed_start(reason, child.forked, now),
                // It served: the code works.
                Outcome::Lost => self.failures.end(),
                // Counted when it is gone, killed or left after the question.
                Outcome::TimedOut => self.totals.timed_out += 1,
                Outcome::Retired | Outcome::Stopped { .. } | Outcome::Superseded => {}
            }
            if let WaitStatus::Signaled(_, signal, _) = status {
                if let Some(limit) = self.config.privileges.limit_that_killed(signal, child.killed.is_some()) {
                    fields.push(("limit", Obj::new_string(limit)));
                }
            }
            if let Some(reason) = killed {
                fields.push(("killed", Obj::new_string(reason.name())));
            }
            if let Some(cause) = cause {
                fields.push(("cause", Obj::new_string(cause)));
            }
            entries.push(self.entry("exit", fields));
            entries.extend(backoff_entry);
        }
        // A worker of the current generation forked after the last failure
        // that is ready and outlives its youth ends the run: one still in
        // `-init` has not shown that the code works (an `-init` that fails
        // after a while would otherwise never back off further). Older
        // workers say nothing about the code that fails now (a reload's new
        // `-init`).
        if self.failures.failed_at().is_some() && self.children.iter().any(|c| self.proves_code_works(c, now)) {
            self.failures.end();
        }
    }

    fn proves_code_works(&self, child: &Child, now: Instant) -> bool {
        let slot = self.scoreboard.slot(child.slot);
        child.generation == self.generation
            && child.retired.is_none()
            && child.killed.is_none()
            && matches!(slot.state(), State::Idle | State::Busy)
            && self.failures.proven_by(child.forked, slot.served(), now)
    }

    /// A worker of the current generation forked after the last failure,
    /// still alive and not proven yet: the one try of a back-off.
    fn trying(&self) -> bool {
        self.children.iter().any(|c| {
            c.generation == self.generation
                && c.retired.is_none()
                && c.killed.is_none()
                && self.failures.forked_since(c.forked)
        })
    }

    /// Counts a failed start of a worker forked at `forked`; the back-off's
    /// log entry when it is one more failure in a row.
    pub(super) fn count_failed_start(&mut self, reason: String, forked: Instant, now: Instant) -> Option<LogEntry> {
        let delay = self.failures.count(reason, Some(forked), now)?;
        self.totals.backoffs += 1;
        Some(self.entry(
            "backoff",
            vec![
                ("failures", Obj::new_int(self.failures.failures.into())),
                ("delay", Obj::new_double(delay.as_secs_f64())),
            ],
        ))
    }

    /// Counts a failed start that forked no worker.
    pub(super) fn count_failure(&mut self, reason: String) {
        let _ = self.failures.count(reason, None, Instant::now());
    }

    /// How many of `wanted` workers may be forked now (`model::backoff`).
    pub(super) fn forks_allowed(&mut self, now: Instant, wanted: usize) -> usize {
        let trying = self.trying();
        self.failures.forks_allowed(now, wanted, trying)
    }

    /// A reload is done once its generation is ready, and abandoned after
    /// `RELOAD_FAILURES` failures in a row: the generation that served
    /// before serves on, and the next reload tries again.
    pub(super) fn settle_reload(&mut self, entries: &mut Vec<LogEntry>) {
        let ready = self.ready_count();
        let newest_ready = || {
            // The newest generation with a worker that serves, if a reload
            // during this one got that far; else the one before them.
            self.children
                .iter()
                .filter(|c| {
                    c.retired.is_none()
                        && c.killed.is_none()
                        && matches!(self.scoreboard.slot(c.slot).state(), State::Idle | State::Busy)
                })
                .map(|c| c.generation)
                .max()
        };
        match self.reload.settle(ready, self.target, &mut self.failures, newest_ready) {
            None => {}
            Some(Settled::Done) => {
                entries.push(self.entry("reloaded", vec![("generation", Obj::new_int(self.generation.into()))]));
            }
            Some(Settled::Abandoned { serve, failures, reason }) => {
                let abandoned = self.generation;
                self.generation = serve;
                entries.push(self.entry(
                    "reload-failed",
                    vec![
                        ("generation", Obj::new_int(abandoned.into())),
                        ("failures", Obj::new_int(failures.into())),
                        ("reason", Obj::new_string(&reason)),
                    ],
                ));
                self.to_respawn = 0;
            }
        }
    }

    /// Whether a worker will still take connections from the queue.
    pub(super) fn takes_connections(&self, child: &Child) -> bool {
        child.retired.is_none()
            && child.killed.is_none()
            && !child.asked_to_leave()
            && matches!(self.scoreboard.slot(child.slot).state(), State::Starting | State::Idle | State::Busy)
    }

    /// Whether a connection waits in the queue (peeked, not taken).
    pub(super) fn queue_pending(&self) -> bool {
        let mut byte = [0u8; 1];
        let flags = nix::sys::socket::MsgFlags::MSG_PEEK | nix::sys::socket::MsgFlags::MSG_DONTWAIT;
        matches!(nix::sys::socket::recv(self.queue.as_raw_fd(), &mut byte, flags), Ok(1..))
    }

    /// Workers of the current generation that count toward the target:
    /// not asked to leave, not leaving by themselves, not killed, not
    /// asked for their stack past `-timeout`, not being replaced
    /// (recycling: a turn holder serves until its replacement is ready).
    pub(super) fn serving(&self) -> impl Iterator<Item = &Child> {
        self.children.iter().filter(move |c| {
            c.generation == self.generation
                && c.retired.is_none()
                && c.killed.is_none()
                && !c.asked_to_leave()
                && c.turn.is_none()
                && c.leaving_since.is_none()
                && self.scoreboard.slot(c.slot).state() != State::Stopping
        })
    }

    /// Workers of the current generation that are registered or serving.
    pub(super) fn ready_count(&self) -> usize {
        self.serving().filter(|c| matches!(self.scoreboard.slot(c.slot).state(), State::Idle | State::Busy)).count()
    }

    pub(super) fn missing(&self) -> usize {
        self.target.saturating_sub(self.serving().count())
    }

    /// Asks workers to leave: the current generation's beyond the target,
    /// the starting ones of a generation given up (a reload replaced by
    /// another, or abandoned), and old generations' serving ones only as
    /// workers of the current generation become ready, never for one that
    /// is still starting. Idle ones first.
    pub(super) fn retire_surplus(&mut self, entries: &mut Vec<LogEntry>) {
        let serving = self.serving().count();
        if serving > self.target {
            let mut excess = serving - self.target;
            let generation = self.generation;
            // Of the serving ones: one seen leaving unasked is no surplus.
            let counted = |c: &Child| {
                c.generation == generation && c.turn.is_none() && !c.asked_to_leave() && c.leaving_since.is_none()
            };
            excess -= self.retire(excess, Retired::Resize, counted, entries);
            debug_assert_eq!(excess, 0);
        }
        let generation = self.generation;
        // The generation that served before a running reload serves on
        // until the new one is ready, its starting workers included.
        let fallback = self.reload.fallback(generation);
        let scoreboard = &self.scoreboard;
        let given_up: Vec<Pid> = self
            .children
            .iter()
            .filter(|c| {
                c.generation != generation
                    && c.generation != fallback
                    && scoreboard.slot(c.slot).state() == State::Starting
            })
            .map(|c| c.pid)
            .collect();
        if !given_up.is_empty() {
            // `retire` skips those retired or killed already.
            self.retire(given_up.len(), Retired::Reload, |c| given_up.contains(&c.pid), entries);
        }
        let ready = self.ready_count();
        let old: usize = self
            .children
            .iter()
            .filter(|c| c.generation != generation && c.retired.is_none() && c.killed.is_none())
            .count();
        let allowed_old = self.target.saturating_sub(ready);
        if old > allowed_old {
            self.retire(old - allowed_old, Retired::Reload, |c| c.generation != generation, entries);
        }
    }

    /// Retires up to `count` workers matching `which`, idle before starting
    /// before busy; returns how many.
    pub(super) fn retire(
        &mut self,
        count: usize,
        reason: Retired,
        which: impl Fn(&Child) -> bool,
        entries: &mut Vec<LogEntry>,
    ) -> usize {
        let mut candidates: Vec<usize> = (0..self.children.len())
            .filter(|&i| {
                let c = &self.children[i];
                c.retired.is_none() && c.killed.is_none() && which(c)
            })
            .collect();
        let rank = |state: State| match state {
            State::Idle => 0,
            State::Starting => 1,
            State::Stopping => 2,
            _ => 3,
        };
        candidates.sort_by_key(|&i| rank(self.scoreboard.slot(self.children[i].slot).state()));
        let mut done = 0;
        for i in candidates.into_iter().take(count) {
            let child = &mut self.children[i];
            child.retired = Some(reason);
            child.leaving_since.get_or_insert_with(Instant::now);
            // The flag is read when the worker would register again; end of
            // file on its leave pipe wakes it if it is idle. Either way it
            // leaves once its channels are closed.
            self.scoreboard.slot(child.slot).request_leave();
            child.leave = None;
            done += 1;
            let fields = vec![
                ("pid", Obj::new_int(child.pid.as_raw().into())),
                ("generation", Obj::new_int(child.generation.into())),
                ("reason", Obj::new_string(reason.name())),
            ];
            entries.push(self.entry("retire", fields));
        }
        done
    }

    /// A worker's slot is its claim: one that says it leaves though the
    /// supervisor did not ask (a SIGTERM from outside, or a lie) leaves
    /// the pool for good, and is replaced; one asked to leave, or that
    /// said it leaves, that is still there `-graceful` seconds later and
    /// claims no connection is killed. Either counts against that worker
    /// only (`model::timeouts::overstays`).
    pub(super) fn hold_to_claims(&mut self, now: Instant, entries: &mut Vec<LogEntry>) {
        let grace = self.config.graceful;
        for index in 0..self.children.len() {
            if matches!(self.scoreboard.slot(self.children[index].slot).state(), State::Idle | State::Busy) {
                self.children[index].was_ready = true;
            }
            let child = &self.children[index];
            let slot = self.scoreboard.slot(child.slot);
            if child.killed.is_some() {
                continue;
            }
            if child.leaving_since.is_none() && slot.state() == State::Stopping {
                self.children[index].leaving_since = Some(now);
                continue;
            }
            let Some(since) = child.leaving_since else { continue };
            if !overstays(since, now, grace, slot.open() > 0) {
                continue;
            }
            let pid = child.pid;
            let _ = kill(pid, Signal::SIGKILL);
            self.children[index].killed = Some(Kill::Graceful);
            entries.push(self.entry(
                "kill",
                vec![
                    ("pid", Obj::new_int(pid.as_raw().into())),
                    ("reason", Obj::new_string("did not leave within its graceful period")),
                ],
            ));
        }
    }

    /// Forks one worker of the current generation.
    pub(super) fn spawn(&mut self, log: &mut Vec<LogEntry>) {
        // What a worker must not keep of the supervisor's (the leave pipes,
        // the signal pipe and its handler, the tick) it lets go at the fork
        // itself (`after_fork`).
        let pool = self;
        let Some(slot) = pool.scoreboard.assign(pool.generation) else {
            let entry = pool.entry("error", vec![("message", Obj::new_string("no free scoreboard slot"))]);
            log.push(entry);
            return;
        };
        let (leave_read, leave_write) = match LeaveEnd::pipe() {
            Ok(ends) => ends,
            Err(errno) => {
                pool.scoreboard.free(slot);
                // Out of descriptors is a failed start, backed off as one.
                pool.count_failure(format!("pipe: {}", errno.desc()));
                let entry = pool.entry("error", vec![("message", Obj::new_string(&format!("pipe: {}", errno.desc())))]);
                log.push(entry);
                return;
            }
        };
        let limit = (pool.config.max_connections > 0)
            .then(|| pool.config.max_connections + super::recycling::random_below(pool.config.jitter + 1));
        let recycling =
            pool.recycling.for_worker(pool.scoreboard.leak_slot(slot), pool.config.recycling.max_rss, limit);
        let hang_report = pool.hangs.for_worker(slot);
        // SAFETY: the child runs only `worker::run`, which never returns into
        // the caller's frames.
        match signals::fork_worker(|| unsafe { crate::process::fork_flushed(pool.interp) }) {
            Ok(ForkResult::Child) => worker::run(Assignment {
                port: pool.port,
                interp: pool.interp,
                state: pool.state,
                handler: pool.config.handler.clone(),
                init: pool.config.init.clone(),
                concurrency: pool.config.concurrency,
                recycling,
                hang_report,
                slot: pool.scoreboard.leak_slot(slot),
                leave: leave_read,
                signals: pool.config.signals,
                close: Vec::new(),
                tick: None,
                queue: Arc::clone(&pool.queue),
                counters: Arc::clone(&pool.counters),
                privileges: pool.config.privileges.clone(),
                graceful: pool.config.graceful,
            }),
            Ok(ForkResult::Parent { child }) => {
                drop(leave_read);
                pool.scoreboard.slot(slot).set_pid(child.as_raw());
                pool.children.push(Child {
                    pid: child,
                    slot,
                    generation: pool.generation,
                    forked: Instant::now(),
                    leave: Some(leave_write),
                    retired: None,
                    killed: None,
                    turn: None,
                    busy: BusyWatch::default(),
                    leaving_since: None,
                    recycle_at: super::recycling::lifetime_deadline(&pool.config.recycling, Instant::now()),
                    hang: None,
                    hooks: super::hooks::mask(super::hooks::worker_signals()),
                    was_ready: false,
                });
                pool.totals.started += 1;
                let mut fields = vec![
                    ("pid", Obj::new_int(child.as_raw().into())),
                    ("generation", Obj::new_int(pool.generation.into())),
                ];
                if pool.to_respawn > 0 {
                    pool.to_respawn -= 1;
                    pool.totals.respawned += 1;
                    fields.push(("respawn", Obj::new_int(1)));
                }
                let entry = pool.entry("start", fields);
                log.push(entry);
            }
            Err(errno) => {
                pool.scoreboard.free(slot);
                pool.count_failure(format!("fork: {}", errno.desc()));
                let entry = pool.entry("error", vec![("message", Obj::new_string(&format!("fork: {}", errno.desc())))]);
                log.push(entry);
            }
        }
    }
}

/// Reaps `children` of a supervisor whose thread has ended, from a thread
/// of its own that ends with the last of them: exactly these pids, so no
/// child of the script is taken from it. One still running at its
/// deadline (the pool's `-graceful` period) is killed, as the pool would
/// have done.
pub(super) fn reap_in_background(mut children: Vec<(Pid, Option<Instant>)>) {
    if children.is_empty() {
        return;
    }
    let reaper = move || {
        let mut pause = Duration::from_millis(10);
        loop {
            let now = Instant::now();
            children.retain(|&(pid, deadline)| {
                if deadline.is_some_and(|deadline| now >= deadline) {
                    let _ = kill(pid, Signal::SIGKILL);
                }
                // Reaped, or no longer ours to reap (a script's own `wait`).
                matches!(waitpid(pid, Some(WaitPidFlag::WNOHANG)), Ok(WaitStatus::StillAlive))
            });
            if children.is_empty() {
                return;
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    };
    // Spawning while thread-locals are destroyed: a failure or a panic
    // leaves the children to init once this process exits, and must not
    // abort it.
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        std::thread::Builder::new().name("socketserver-rip".into()).stack_size(crate::THREAD_STACK_SIZE).spawn(reaper)
    }));
}
