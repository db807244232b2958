//! The pools' data, below every room that reads or changes it: the
//! supervisor's (`Supervisor`, one per thread that runs pools), each
//! pool's workers (`Child`), totals, phase and reload, and the log entries
//! made, as plain fields. The observers (`report`, `notify`,
//! `metrics_exposition`) and the policies' shell rooms read it from here,
//! never from `lifecycle` or `supervisor`, which act on it.

use std::cell::RefCell;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Instant;

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use crate::counters::Counters;
use crate::registration::InterpState;
use crate::tcl::{Interp, Obj};

use super::after_fork::LeaveEnd;
use super::config::Config;
use super::model::backoff::FailureRun;
pub(super) use super::model::reload::Reload;
pub(super) use super::model::stop::Phase;
use super::model::timeouts::BusyWatch;
use super::model::{Kill, Retired};
use super::scoreboard::Scoreboard;
use super::supervisor_thread::release_supervisor_thread;

pub(super) struct Child {
    pub(super) pid: Pid,
    pub(super) slot: usize,
    pub(super) generation: u32,
    pub(super) forked: Instant,
    /// Our end of its leave pipe; closing it asks the worker to leave.
    pub(super) leave: Option<LeaveEnd>,
    pub(super) retired: Option<Retired>,
    /// Set once we have sent it SIGKILL, with the reason.
    pub(super) killed: Option<Kill>,
    /// Its turn to be recycled (`model::recycling`).
    pub(super) turn: Option<super::model::recycling::Turn>,
    /// Its busy period on the supervisor's clock (`model::timeouts`).
    pub(super) busy: BusyWatch,
    /// Since when it leaves: retired, or seen leaving unasked.
    pub(super) leaving_since: Option<Instant>,
    /// When it is due by age (`-maxlifetime`).
    pub(super) recycle_at: Option<Instant>,
    /// Past its busy timeout, asked for its stack (`hang_report`).
    pub(super) hang: Option<super::hang_report::Asked>,
    /// The signals it was started with hooks for (`hooks::mask`).
    pub(super) hooks: u64,
    /// Seen registered or serving once (its `-init` done, a descriptor
    /// to register with): a clean exit then is no failed start.
    pub(super) was_ready: bool,
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
    pub(super) generation: u32,
    /// The highest generation number given so far: an abandoned reload's
    /// number is not given again.
    pub(super) newest_generation: u32,
    pub(super) target: usize,
    pub(super) children: Vec<Child>,
    pub(super) totals: Totals,
    /// Failed starts in a row and their back-off (`model::backoff`).
    pub(super) failures: FailureRun,
    pub(super) reload: Reload,
    /// The port's queue, kept while the pool lives: the port leaves the
    /// port table when the pool stops, and workers started then serve
    /// what is still queued.
    pub(super) queue: Arc<OwnedFd>,
    pub(super) counters: Arc<Counters>,
    /// Workers lost unasked, still to be replaced (counted as respawns).
    pub(super) to_respawn: u64,
    pub(super) phase: Phase,
    /// Whether every worker of the first generation has been ready once.
    pub(super) ready_once: bool,
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
    /// A signal asked for the stop: exit once every pool is gone.
    pub(super) exit_when_stopped: bool,
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
    /// A log entry of this pool, for its `-log` command or stderr.
    pub(super) fn entry(&self, event: &str, fields: Vec<(&'static str, Obj)>) -> LogEntry {
        let mut all = vec![("event", Obj::new_string(event)), ("port", Obj::new_int(self.port.into()))];
        all.extend(fields);
        LogEntry { log: self.config.log.clone(), interp: self.interp, port: self.port, fields: all }
    }
}
