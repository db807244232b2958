//! The shell around the pool's model (`model::pool`): what it observes
//! (each worker's exit, its slot, the queue, the answers to hang
//! questions) it tells the model as events, and it performs what the
//! model answers: forks (`spawn`), retirements through the leave pipe,
//! SIGKILLs, the marks in a worker's slot, counters and log entries. The
//! model decides what and when; this says how. The supervisor runs one
//! turn of it per event of its loop (`supervisor::reconcile`).

use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{ForkResult, Pid};

use crate::tcl::Obj;

use super::after_fork::LeaveEnd;
use super::model::events::{Action, Counter, Event, ExitStatus, Note, SlotView, WorkerId};
use super::model::Observed;
use super::recycling::{due, mark_due, observed};
use super::scoreboard::{now_millis, Slot};
use super::signals;
use super::state::LogEntry;
use super::state::{Child, Pool};
use super::worker::{self, Assignment};

/// What a turn asks of the supervisor beyond the pool.
#[derive(Default)]
pub(super) struct Told {
    /// Every worker of the pool's first generation has been ready once.
    pub(super) ready: bool,
    /// The pool is stopped and empty: remove it.
    pub(super) gone: bool,
}

/// What a worker's slot says, for the model.
fn view(slot: &Slot) -> SlotView {
    SlotView {
        state: observed(slot.state()).unwrap_or(Observed::Stopping),
        was_ready: slot.was_ready(),
        served: slot.served(),
        open: slot.open(),
        due: due(slot),
        busy_since: slot.busy_since(),
    }
}

impl Pool {
    /// One turn of the loop: what was observed since the last, then the
    /// tick; every action performed.
    pub(super) fn turn(&mut self, now: Instant, entries: &mut Vec<LogEntry>) -> Told {
        let mut told = Told::default();
        self.reap(now, entries, &mut told);
        for (worker, spared) in self.settle_hangs(entries) {
            self.tell(Event::HangSettled { worker, spared }, now, entries, &mut told);
        }
        let slots: Vec<(WorkerId, SlotView)> =
            self.children.iter().map(|c| (c.worker, view(self.scoreboard.slot(c.slot)))).collect();
        for (worker, slot) in slots {
            self.tell(Event::Slot { worker, slot }, now, entries, &mut told);
        }
        let queue = if self.model.phase.stopping() {
            Event::Queue { queued: 0, pending: self.queue_pending() }
        } else {
            // Accepted and not yet taken by a worker (`pool info`'s
            // `queued`), no more than the kernel says the queue holds.
            let unread = crate::sys::unread_payload_bytes(self.queue.as_fd());
            let queued = usize::try_from(self.counters.queue.depth_at_most(unread)).unwrap_or(usize::MAX);
            Event::Queue { queued, pending: false }
        };
        self.tell(queue, now, entries, &mut told);
        self.tell(Event::Tick, now, entries, &mut told);
        told
    }

    /// Tells the model one event and performs what it answers.
    pub(super) fn tell(&mut self, event: Event, now: Instant, entries: &mut Vec<LogEntry>, told: &mut Told) {
        for action in self.model.step(event, now) {
            self.perform(action, now, entries, told);
        }
    }

    fn pid_of(&self, worker: WorkerId) -> Obj {
        let pid = self.child_index(worker).map_or(0, |i| self.children[i].pid.as_raw());
        Obj::new_int(pid.into())
    }

    fn perform(&mut self, action: Action, now: Instant, entries: &mut Vec<LogEntry>, told: &mut Told) {
        let index = |worker| self.child_index(worker);
        match action {
            Action::Fork { worker, generation } => self.spawn(worker, generation, now, entries, told),
            Action::Retire { worker, .. } => {
                let Some(i) = index(worker) else { return };
                // The flag is read when the worker would register again;
                // end of file on its leave pipe wakes it if it is idle.
                // Either way it leaves once its channels are closed.
                self.scoreboard.slot(self.children[i].slot).request_leave();
                self.children[i].leave = None;
            }
            Action::Kill { worker, .. } => {
                if let Some(i) = index(worker) {
                    let _ = kill(self.children[i].pid, Signal::SIGKILL);
                }
            }
            Action::AskStack { worker, leaving, busy } => {
                let Some(i) = index(worker) else { return };
                if let Some(spared) = self.ask_stack(i, leaving, busy, entries) {
                    self.tell(Event::HangSettled { worker, spared }, now, entries, told);
                }
            }
            Action::MarkDue { worker, reason } => {
                if let Some(i) = index(worker) {
                    mark_due(self.scoreboard.slot(self.children[i].slot), reason);
                }
            }
            Action::Authorise { worker, may_leave } => {
                if let Some(i) = index(worker) {
                    self.scoreboard.slot(self.children[i].slot).turn.store(u32::from(may_leave), Ordering::SeqCst);
                }
            }
            Action::Count(counter) => self.count(counter),
            Action::Log(note) => {
                if let Some(entry) = self.note_entry(note) {
                    entries.push(entry);
                }
            }
            Action::Ready => told.ready = true,
            Action::Gone => told.gone = true,
        }
    }

    fn count(&mut self, counter: Counter) {
        let totals = &mut self.totals;
        match counter {
            Counter::Started => totals.started += 1,
            Counter::Respawned => totals.respawned += 1,
            Counter::Recycled(reason) => {
                totals.recycled += 1;
                self.recycling.recycled[reason.index()] += 1;
            }
            Counter::TimedOut => totals.timed_out += 1,
            Counter::InitTimedOut => totals.init_timed_out += 1,
            Counter::Backoff => totals.backoffs += 1,
        }
    }

    /// A log entry for a note of the model (an exit's is `reap`'s, which
    /// knows the status).
    fn note_entry(&self, note: Note) -> Option<LogEntry> {
        let int = |n: i64| Obj::new_int(n);
        let (event, fields) = match note {
            Note::Start { worker, generation, respawn } => {
                let mut fields = vec![("pid", self.pid_of(worker)), ("generation", int(generation.into()))];
                if respawn {
                    fields.push(("respawn", int(1)));
                }
                ("start", fields)
            }
            Note::Exit { .. } => return None,
            Note::Backoff { failures, delay } => {
                ("backoff", vec![("failures", int(failures.into())), ("delay", Obj::new_double(delay.as_secs_f64()))])
            }
            Note::Retire { worker, generation, reason } => (
                "retire",
                vec![
                    ("pid", self.pid_of(worker)),
                    ("generation", int(generation.into())),
                    ("reason", Obj::new_string(reason.name())),
                ],
            ),
            Note::GracefulOver { worker } => {
                ("kill", vec![("pid", self.pid_of(worker)), ("reason", Obj::new_string("graceful period over"))])
            }
            Note::Overstayed { worker } => (
                "kill",
                vec![
                    ("pid", self.pid_of(worker)),
                    ("reason", Obj::new_string("did not leave within its graceful period")),
                ],
            ),
            Note::InitTimeout { worker, generation, after } => (
                "inittimeout",
                vec![
                    ("pid", self.pid_of(worker)),
                    ("generation", int(generation.into())),
                    ("after", Obj::new_double(after.as_secs_f64())),
                ],
            ),
            Note::Sized { target, change } => {
                let mut fields = vec![("workers", int(target as i64)), ("reason", Obj::new_string(&change.reason))];
                if let Some(since) = change.after {
                    fields.push(("after", Obj::new_double((since.as_secs_f64() * 1000.0).round() / 1000.0)));
                }
                (if change.grow { "grow" } else { "shrink" }, fields)
            }
            Note::Resized { target, .. } => {
                let sizing = &self.model.sizing;
                let fields = if sizing.ranged() {
                    vec![("workers", Obj::new_string(&sizing.range_text())), ("target", int(target as i64))]
                } else {
                    vec![("workers", int(target as i64))]
                };
                ("resize", fields)
            }
            Note::Reload { generation } => ("reload", vec![("generation", int(generation.into()))]),
            Note::Reloaded { generation } => ("reloaded", vec![("generation", int(generation.into()))]),
            Note::ReloadFailed { generation, failures, reason } => (
                "reload-failed",
                vec![
                    ("generation", int(generation.into())),
                    ("failures", int(failures.into())),
                    ("reason", Obj::new_string(&reason)),
                ],
            ),
            Note::Stop { workers } => ("stop", vec![("workers", int(workers as i64))]),
            Note::Stopped => ("stopped", vec![]),
        };
        Some(self.entry(event, fields))
    }

    /// Collects the workers that have exited and tells the model, which
    /// counts each exit in one category (`model::exits`); the exit's log
    /// entry says what `waitpid` and the slot said.
    fn reap(&mut self, now: Instant, entries: &mut Vec<LogEntry>, told: &mut Told) {
        let mut index = 0;
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
            let seen = view(slot);
            let message = slot.failure();
            self.totals.proxy_errors += slot.proxy_errors();
            self.totals.proxy_untrusted += slot.proxy_untrusted();
            self.totals.served += seen.served;
            self.totals.busy_millis += slot.busy_millis(now_millis());
            self.scoreboard.free(child.slot);
            let (text, clean, signaled) = match status {
                WaitStatus::Exited(_, code) => (format!("exit {code}"), code == 0, false),
                WaitStatus::Signaled(_, signal, _) => (format!("signal {}", signal.as_str()), false, true),
                WaitStatus::StillAlive => ("unknown".to_string(), false, false),
                other => (format!("{other:?}"), false, false),
            };
            let mut fields = vec![
                ("pid", Obj::new_int(pid.as_raw().into())),
                ("generation", Obj::new_int(0)),
                ("status", Obj::new_string(&text)),
                ("served", Obj::new_int(seen.served as i64)),
            ];
            if !message.is_empty() {
                fields.push(("error", Obj::new_string(&message)));
            }
            let status_seen = ExitStatus { clean, signaled, text, failure: message };
            for action in self.model.step(Event::Exited { worker: child.worker, slot: seen, status: status_seen }, now)
            {
                let Action::Log(Note::Exit { generation, outcome, killed, sigkilled, cause, .. }) = action else {
                    self.perform(action, now, entries, told);
                    continue;
                };
                fields[1].1 = Obj::new_int(generation.into());
                if outcome == super::model::exits::Outcome::Recycled {
                    fields.push(("recycled", Obj::new_int(1)));
                }
                if let WaitStatus::Signaled(_, signal, _) = status {
                    if let Some(limit) = self.config.privileges.limit_that_killed(signal, sigkilled) {
                        fields.push(("limit", Obj::new_string(limit)));
                    }
                }
                if let Some(reason) = killed {
                    fields.push(("killed", Obj::new_string(reason.name())));
                }
                if let Some(cause) = cause {
                    fields.push(("cause", Obj::new_string(cause.name())));
                }
                entries.push(self.entry("exit", std::mem::take(&mut fields)));
            }
        }
    }

    /// Whether a connection waits in the queue (peeked, not taken).
    fn queue_pending(&self) -> bool {
        let mut byte = [0u8; 1];
        let flags = nix::sys::socket::MsgFlags::MSG_PEEK | nix::sys::socket::MsgFlags::MSG_DONTWAIT;
        matches!(nix::sys::socket::recv(self.queue.as_raw_fd(), &mut byte, flags), Ok(1..))
    }

    /// Forks the worker the model named, of `generation`, and tells the
    /// model whether it was done.
    fn spawn(&mut self, worker: WorkerId, generation: u32, now: Instant, log: &mut Vec<LogEntry>, told: &mut Told) {
        // What a worker must not keep of the supervisor's (the leave pipes,
        // the signal pipe and its handler, the tick) it lets go at the fork
        // itself (`after_fork`).
        let pool = self;
        let Some(slot) = pool.scoreboard.assign(generation) else {
            let entry = pool.entry("error", vec![("message", Obj::new_string("no free scoreboard slot"))]);
            log.push(entry);
            pool.tell(Event::ForkFailed { worker, failure: None }, now, log, told);
            return;
        };
        let (leave_read, leave_write) = match LeaveEnd::pipe() {
            Ok(ends) => ends,
            Err(errno) => {
                pool.scoreboard.free(slot);
                // Out of descriptors is a failed start, backed off as one.
                let failure = format!("pipe: {}", errno.desc());
                log.push(pool.entry("error", vec![("message", Obj::new_string(&failure))]));
                pool.tell(Event::ForkFailed { worker, failure: Some(failure) }, now, log, told);
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
                    worker,
                    leave: Some(leave_write),
                    hang: None,
                    hooks: super::hooks::mask(super::hooks::worker_signals()),
                });
                let recycle_at = super::recycling::lifetime_deadline(&pool.config.recycling, now);
                pool.tell(Event::Forked { worker, recycle_at }, now, log, told);
            }
            Err(errno) => {
                pool.scoreboard.free(slot);
                let failure = format!("fork: {}", errno.desc());
                log.push(pool.entry("error", vec![("message", Obj::new_string(&failure))]));
                pool.tell(Event::ForkFailed { worker, failure: Some(failure) }, now, log, told);
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
