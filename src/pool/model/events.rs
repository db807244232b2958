//! What goes into the model (`Event`) and what comes out (`Action`), as
//! plain data: the shell turns what it observes into events and performs
//! the actions; the simulation does the same on simulated processes.

use std::time::{Duration, Instant};

use super::exits::Outcome;
use super::recycling::Reason;
use super::sizing::Change;
use super::{Kill, Observed, Retired};

/// A worker, as the model names it (not a pid: the model knows a worker
/// before it is forked, and the shell maps it to its process).
pub type WorkerId = u64;

/// What a worker's scoreboard slot says, as the shell read it. Claims of
/// the worker, believed only about that worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotView {
    pub state: Observed,
    /// It has been ready (idle or busy) since its fork, whatever `state`
    /// says now: it may have left before the supervisor looked.
    pub was_ready: bool,
    /// Connections served (closed).
    pub served: u64,
    /// Connections open now.
    pub open: u32,
    /// Why it is due to be recycled, if it is.
    pub due: Option<Reason>,
    /// The start of its oldest open connection, as it claims (0: none).
    pub busy_since: u64,
}

impl SlotView {
    pub const STARTING: SlotView =
        SlotView { state: Observed::Starting, was_ready: false, served: 0, open: 0, due: None, busy_since: 0 };
}

/// How a worker ended, as `waitpid` said, and what its slot said last.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExitStatus {
    /// Exit status 0.
    pub clean: bool,
    /// Ended by a signal.
    pub signaled: bool,
    /// "exit 1", "signal SIGKILL", as the log says it.
    pub text: String,
    /// The error its `-init` or handler left in its slot ("" if none).
    pub failure: String,
}

/// Something the model is told.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// The fork of `Action::Fork` was done; `recycle_at`: when the worker
    /// is due by age (`-maxlifetime` with its jitter, drawn by the shell).
    Forked { worker: WorkerId, recycle_at: Option<Instant> },
    /// The fork of `Action::Fork` could not be done; `failure`: a failed
    /// start, backed off (no descriptor, fork refused), or `None` (no
    /// scoreboard slot free: not the code's fault).
    ForkFailed { worker: WorkerId, failure: Option<String> },
    /// What a worker's slot says now (read at each turn of the loop).
    Slot { worker: WorkerId, slot: SlotView },
    /// A worker was reaped, with what its slot said last.
    Exited { worker: WorkerId, slot: SlotView, status: ExitStatus },
    /// Connections accepted and not yet taken by a worker; `pending`:
    /// one waits in the queue now.
    Queue { queued: usize, pending: bool },
    /// The question of `Action::AskStack` is settled: the worker is
    /// killed, or `spared` (it answered from its event loop, serving its
    /// other connections).
    HangSettled { worker: WorkerId, spared: bool },
    /// `pool reload`, SIGHUP.
    Reload,
    /// `pool resize`.
    Resize { min: usize, max: usize },
    /// SIGTTIN (`up`) or SIGTTOU: the range one worker up or down.
    Shift { up: bool },
    /// `pool stop`, SIGTERM, or the next generation of the process serves
    /// now (an upgrade's outcome); `at_once`: do not wait for busy workers.
    Stop { at_once: bool },
    /// The loop turns (its tick, a signal, a worker's word, a command):
    /// decide, with the slots and the queue as last observed.
    Tick,
}

/// Something the shell is asked to do.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Fork a worker of `generation`; answer `Forked` or `ForkFailed`.
    Fork { worker: WorkerId, generation: u32 },
    /// Ask it to leave (its slot's flag, its leave pipe closed).
    Retire { worker: WorkerId, reason: Retired },
    /// SIGKILL.
    Kill { worker: WorkerId, reason: Kill },
    /// Past `-timeout`: ask for its stack; `leaving`: it takes no more
    /// connections from now. Answer `HangSettled`.
    AskStack { worker: WorkerId, leaving: bool, busy: Duration },
    /// Mark it due in its slot (by age: the supervisor watches lifetimes).
    MarkDue { worker: WorkerId, reason: Reason },
    /// Whether it may leave by itself once due (its slot's turn).
    Authorise { worker: WorkerId, may_leave: bool },
    /// A counter of the pool goes up by one.
    Count(Counter),
    /// A log entry.
    Log(Note),
    /// Every worker of the pool's first generation has been ready once.
    Ready,
    /// The pool is stopped and every worker reaped: it is gone.
    Gone,
}

/// The pool's counters (`pool info`, metrics): each only goes up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    Started,
    Respawned,
    /// A recycled worker, by its cause: `recycled` is the sum of these.
    Recycled(Reason),
    TimedOut,
    InitTimedOut,
    Backoff,
}

/// A log entry's content; the shell adds what only it knows (pids,
/// statuses, the peer of a hung connection).
#[derive(Clone, Debug, PartialEq)]
pub enum Note {
    /// A fork done; `respawn`: it replaces a worker lost unasked.
    Start {
        worker: WorkerId,
        generation: u32,
        respawn: bool,
    },
    /// A worker reaped: its category, why it was killed (`killed`; a
    /// SIGKILL sent: `sigkilled`) and, when recycled, the cause.
    Exit {
        worker: WorkerId,
        generation: u32,
        outcome: Outcome,
        killed: Option<Kill>,
        sigkilled: bool,
        cause: Option<Reason>,
    },
    /// One more failure in a row, and the back-off before the next try.
    Backoff {
        failures: u32,
        delay: Duration,
    },
    Retire {
        worker: WorkerId,
        generation: u32,
        reason: Retired,
    },
    /// Killed at the end of a stop's graceful period.
    GracefulOver {
        worker: WorkerId,
    },
    /// Asked to leave (or said it leaves), and still there, holding no
    /// connection, `-graceful` later.
    Overstayed {
        worker: WorkerId,
    },
    /// Not ready within `-inittimeout` (`after`).
    InitTimeout {
        worker: WorkerId,
        generation: u32,
        after: Duration,
    },
    /// The target moved with the load.
    Sized {
        target: usize,
        change: Change,
    },
    /// The range changed (`pool resize`, SIGTTIN, SIGTTOU).
    Resized {
        min: usize,
        max: usize,
        target: usize,
    },
    Reload {
        generation: u32,
    },
    Reloaded {
        generation: u32,
    },
    ReloadFailed {
        generation: u32,
        failures: u32,
        reason: String,
    },
    Stop {
        workers: usize,
    },
    Stopped,
}
