//! The pool's decisions, with no I/O: what to fork, retire and kill, and
//! how each worker's exit counts, as functions of what the supervisor has
//! observed and of the time, given as an argument.
//!
//! `Model` (`pool`) is one pool's decision state (its workers as
//! observed, generation, target, back-off, turns, reload and stop
//! progress); `Model::step` takes one `Event` (a fork done, a slot read,
//! an exit, a tick, a command) with the time and returns `Action`s (fork,
//! retire, kill, ask for a stack, count, log), all plain data
//! (`events`). `turn` is the order of the decisions in one turn of the
//! loop; each decision is a room's policy. Nothing here imports anything
//! above it (no Tcl, no nix, no supervisor), so a simulation
//! (`simulation`, in the tests) drives the model through thousands of
//! seeded sequences of events on a simulated clock.
//!
//! The supervisor (`supervisor`, `lifecycle`) is the shell: it observes
//! (waits for exits, reads each worker's scoreboard slot, reads the
//! clock) and performs what is decided (fork, retire through the leave
//! pipe, SIGKILL, log entries, counters).
//!
//! Rooms: `backoff` (failed starts in a row and the back-off between
//! tries), `recycling` (who is due and who gets a turn to be replaced),
//! `sizing` (the target between `-workers min-max`), `exits` (what a
//! worker's exit counts as, in exactly one category), `timeouts` (busy
//! time on the supervisor's own clock), `reload` (a reload's progress:
//! done, or abandoned), `stop` (a stop's progress: the graceful period,
//! the queue served).

pub mod backoff;
pub mod events;
pub mod exits;
pub mod pool;
pub mod recycling;
pub mod reload;
pub mod sizing;
pub mod stop;
pub mod timeouts;
mod turn;

#[cfg(test)]
mod recovery_tests;
#[cfg(test)]
mod simulation;

/// What a worker is doing, as the supervisor last observed it (its slot).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Observed {
    /// Forked, running `-init`, not yet registered.
    Starting,
    /// Registered, no channel open.
    Idle,
    /// At least one channel open.
    Busy,
    /// Leaving: takes no more connections, exits when its channels close.
    Stopping,
}

impl Observed {
    /// Registered or serving: its `-init` is done.
    pub fn ready(self) -> bool {
        matches!(self, Observed::Idle | Observed::Busy)
    }
}

/// Why the supervisor asked a worker to go.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Retired {
    Reload,
    Resize,
    /// Its turn to leave for recycling came, its replacement ready.
    Recycle,
}

impl Retired {
    pub fn name(self) -> &'static str {
        match self {
            Retired::Reload => "reload",
            Retired::Resize => "resize",
            Retired::Recycle => "recycle",
        }
    }
}

/// Why the supervisor killed a worker.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kill {
    /// Busy on one connection past `-timeout` (after its stack was asked).
    Timeout,
    /// Not ready within `-inittimeout`: a failed start.
    InitTimeout,
    /// Still there when the stop's `-graceful` period ended.
    Graceful,
}

impl Kill {
    pub fn name(self) -> &'static str {
        match self {
            Kill::Timeout => "timeout",
            Kill::InitTimeout => "inittimeout",
            Kill::Graceful => "graceful",
        }
    }
}

/// Forks in one turn of the supervisor's loop, at most: a reload of 128
/// workers of a process holding 1 GB forked all of them in one turn and
/// stalled the loop for 3 s (the watchdog, metrics and signals waited).
/// The loop turns at least every tick (100 ms) and whenever a worker says
/// it is ready, so a generation of 128 is forked within about 3 s.
pub const FORKS_PER_TURN: usize = 4;

/// How many of `wanted` forks to do in this turn of the loop.
pub fn forks_this_turn(wanted: usize) -> usize {
    wanted.min(FORKS_PER_TURN)
}
