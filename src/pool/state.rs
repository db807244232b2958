//! The pools' data, below every room that reads or changes it: the
//! supervisor's (`Supervisor`, one per thread that runs pools), each
//! pool's workers (`Child`), totals, phase and reload, and the log entries
//! made, as plain fields. The observers (`report`, `notify`,
//! `metrics_exposition`) and the policies' shell rooms read it from here,
//! never from `lifecycle` or `supervisor`, which act on it.

use std::cell::RefCell;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use crate::counters::Counters;
use crate::registration::InterpState;
use crate::tcl::{Interp, Obj};

use super::after_fork::LeaveEnd;
use super::config::Config;
use super::model::events::WorkerId;
use super::model::pool::{Model, Worker};
pub(super) use super::model::reload::Reload;
use super::scoreboard::Scoreboard;
use super::supervisor_thread::release_supervisor_thread;

/// A worker process, as the shell holds it; what the pool decided about
/// it is the model's (`Pool::worker_of`).
pub(super) struct Child {
    pub(super) pid: Pid,
    pub(super) slot: usize,
    /// The model's name for it.
    pub(super) worker: WorkerId,
    /// Our end of its leave pipe; closing it asks the worker to leave.
    pub(super) leave: Option<LeaveEnd>,
    /// Past its busy timeout, asked for its stack (`hang_report`): the
    /// question under way.
    pub(super) hang: Option<super::hang_report::Asked>,
    /// The signals it was started with hooks for (`hooks::mask`).
    pub(super) hooks: u64,
}

#[derive(Default)]
pub(super) struct Totals {
    pub(super) started: u64,
    pub(super) respawned: u64,
    pub(super) recycled: u64,
    pub(super) timed_out: u64,
    /// Killed for not being ready within `-inittimeout`.
    pub(super) init_timed_out: u64,
    pub(super) backoffs: u64,
    /// PROXY protocol rejections of workers that have exited.
    pub(super) proxy_errors: u64,
    pub(super) proxy_untrusted: u64,
    /// Connections served and milliseconds busy of workers that have exited.
    pub(super) served: u64,
    pub(super) busy_millis: u64,
}

pub struct Pool {
    pub(super) port: u16,
    pub(super) interp: Interp,
    pub(super) state: *const InterpState,
    pub(super) config: Config,
    pub(super) scoreboard: Scoreboard,
    /// The pool's decisions: its workers as observed, generation, target,
    /// back-off, turns, reload and stop (`model::pool`).
    pub(super) model: Model,
    pub(super) children: Vec<Child>,
    pub(super) totals: Totals,
    /// The port's queue, kept while the pool lives: the port leaves the
    /// port table when the pool stops, and workers started then serve
    /// what is still queued.
    pub(super) queue: Arc<OwnedFd>,
    pub(super) counters: Arc<Counters>,
    /// The `-metrics` endpoint, served while the pool lives.
    pub(super) metrics: Option<super::metrics::Endpoint>,
    pub(super) recycling: super::recycling::InPool,
    pub(super) hangs: super::hang_report::InPool,
}

/// The pools of a process, on the one thread that runs them. Its signal
/// dispositions and pipe belong to the process (`signals`), its file
/// handler and timer to this thread (`after_fork::EventSources`); what a
/// forked child keeps of it is stated in `after_fork`.
pub(super) struct Supervisor {
    /// The process the pools belong to; a forked child has none.
    pub(super) pid: Pid,
    pub(super) pools: Vec<Pool>,
    /// A signal asked for the stop, or the service was handed to a next
    /// generation: exit once every pool is gone.
    pub(super) exit_when_stopped: bool,
    /// A stop signal (TERM, INT) came since the pools were last all gone:
    /// a second one stops without waiting for busy workers. Apart from
    /// `exit_when_stopped`, which a hand-over sets too: the first TERM to
    /// a generation draining after an upgrade is still graceful.
    pub(super) stop_signalled: bool,
    /// Nesting depth of `pool wait`.
    pub(super) waiting: u32,
    /// Exit the process once the supervisor's state is released.
    pub(super) exit_requested: bool,
    /// The pid of a new generation that has not said "ready" yet.
    pub(super) upgrading: Option<Pid>,
    /// Next generations started and not reaped yet.
    pub(super) next_generations: Vec<Pid>,
    /// Every port this process has had a pool on: `pool wait` on one whose
    /// pool is gone has nothing left to wait for.
    pub(super) had: Vec<u16>,
    pub(super) log: Vec<LogEntry>,
}

thread_local! {
    pub(super) static SUPERVISOR: RefCell<Supervisor> = const { RefCell::new(Supervisor {
        pid: Pid::from_raw(0),
        pools: Vec::new(),
        exit_when_stopped: false,
        stop_signalled: false,
        waiting: 0,
        exit_requested: false,
        upgrading: None,
        next_generations: Vec::new(),
        had: Vec::new(),
        log: Vec::new(),
    }) };
}

/// A log entry waiting to be handed to the pool's `-log` command, which
/// runs after the supervisor's state is released (it may call back in).
pub struct LogEntry {
    pub(super) log: Option<Vec<Obj>>,
    pub(super) interp: Interp,
    pub(super) port: u16,
    pub(super) fields: Vec<(&'static str, Obj)>,
}

/// The signals a pool with `-signals 1` acts on.
pub(super) const ACTED_ON: [Signal; 6] =
    [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP, Signal::SIGTTIN, Signal::SIGTTOU, Signal::SIGUSR2];

/// Lets another thread run pools if this one has none (its last signal
/// hook was removed).
pub(super) fn release_supervisor_thread_if_idle() {
    if SUPERVISOR.with(|s| s.try_borrow().is_ok_and(|s| s.pools.is_empty())) {
        release_supervisor_thread();
    }
}

impl Pool {
    /// What the model knows of a worker.
    pub(super) fn worker_of(&self, child: &Child) -> Option<&Worker> {
        self.model.worker(child.worker)
    }

    /// The child the model names `worker`, by its position.
    pub(super) fn child_index(&self, worker: WorkerId) -> Option<usize> {
        self.children.iter().position(|c| c.worker == worker)
    }

    /// A log entry of this pool, for its `-log` command or stderr.
    pub(super) fn entry(&self, event: &str, fields: Vec<(&'static str, Obj)>) -> LogEntry {
        let mut all = vec![("event", Obj::new_string(event)), ("port", Obj::new_int(self.port.into()))];
        all.extend(fields);
        LogEntry { log: self.config.log.clone(), interp: self.interp, port: self.port, fields: all }
    }
}
