//! The scoreboard: what each worker of a pool is doing, readable by the
//! supervisor without a message per connection.
//!
//! As in Apache's prefork MPM, it is shared memory made before the first
//! fork, so the supervisor and every worker see the same memory. Each
//! worker owns one slot and updates it with relaxed atomic stores (a few
//! nanoseconds per connection); the supervisor assigns slots and reads
//! them. Unlike Apache's, each slot has pages of its own, and a worker can
//! write only its own (`shared_pages::keep_writable_only`): what a slot
//! says is its worker's claim about itself, never about another.
//! Nothing in it is needed for correctness of the hand-off: it is for
//! `pool info`, the busy timeout and the rolling reload.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, AtomicU8, Ordering::Relaxed};

use crate::shared_pages::{SharedPages, Writers};

/// What a worker is doing, as `pool info` names it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u32)]
pub enum State {
    /// The slot is free.
    Free = 0,
    /// Forked, running `-init`, not yet registered.
    Starting = 1,
    /// Registered, no channel open.
    Idle = 2,
    /// At least one channel open.
    Busy = 3,
    /// Leaving: takes no more connections, exits when its channels close.
    Stopping = 4,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Free => "free",
            State::Starting => "starting",
            State::Idle => "idle",
            State::Busy => "busy",
            State::Stopping => "stopping",
        }
    }

    fn from_u32(value: u32) -> State {
        match value {
            1 => State::Starting,
            2 => State::Idle,
            3 => State::Busy,
            4 => State::Stopping,
            _ => State::Free,
        }
    }
}

/// Room for the longest peer text, "IPv6 address port".
const PEER_BYTES: usize = 56;
/// Room for why a worker gave up (an `-init` error), for the supervisor's log.
pub const FAILURE_BYTES: usize = 240;

/// One worker's slot. Written by that worker (and by the supervisor when it
/// assigns or frees the slot); `pid` identifies whose it is.
#[repr(C, align(64))]
pub struct Slot {
    pid: AtomicI32,
    state: AtomicU32,
    generation: AtomicU32,
    /// Channels the worker holds open now.
    open: AtomicU32,
    /// Set by the supervisor: register no more, leave when done.
    leave_requested: AtomicU32,
    /// Set by the worker once it is ready (its `-init` done), never
    /// cleared: its state may say `stopping` before the supervisor looked,
    /// and a ready worker that leaves did not fail to start.
    ready_once: AtomicU32,
    /// Connections whose channels the worker has closed.
    served: AtomicU64,
    /// Connections closed for a bad PROXY protocol header.
    proxy_errors: AtomicU64,
    /// Connections closed because their peer is not in `-proxyfrom`.
    proxy_untrusted: AtomicU64,
    /// Monotonic milliseconds since its oldest open channel was received;
    /// 0 while it holds none.
    busy_since: AtomicU64,
    /// Milliseconds of busy periods before the current one (`-metrics`'
    /// busy seconds): what `busy_since` held each time it moved on.
    busy_before: AtomicU64,
    /// The peer of that oldest channel, for the timeout's log entry.
    peer_len: AtomicU8,
    peer: [AtomicU8; PEER_BYTES],
    /// Why the worker is about to exit without serving, written once by it
    /// and read by the supervisor when it reaps the worker: a worker's own
    /// messages go to the pool's log, not to a stderr that may be closed.
    failure_len: AtomicU8,
    failure: [AtomicU8; FAILURE_BYTES],
    /// Recycling (`recycling`): why the worker is due to leave (0: it is
    /// not), whether it holds one of the pool's turns to leave, and its
    /// resident memory when it last looked (bytes; 0: not measured).
    pub(super) due: AtomicU32,
    pub(super) turn: AtomicU32,
    pub(super) rss: AtomicU64,
}

impl Slot {
    pub fn state(&self) -> State {
        State::from_u32(self.state.load(Relaxed))
    }
    pub fn set_state(&self, state: State) {
        if matches!(state, State::Idle | State::Busy) {
            self.ready_once.store(1, Relaxed);
        }
        self.state.store(state as u32, Relaxed);
    }
    /// Whether the worker has been ready (idle or busy) since its fork.
    pub fn was_ready(&self) -> bool {
        self.ready_once.load(Relaxed) != 0
    }
    pub fn open(&self) -> u32 {
        self.open.load(Relaxed)
    }
    pub fn served(&self) -> u64 {
        self.served.load(Relaxed)
    }
    pub fn busy_since(&self) -> u64 {
        self.busy_since.load(Relaxed)
    }

    /// Records the channels now open and the oldest one's start and peer.
    pub fn set_open(&self, open: u32, oldest: Option<(u64, &str)>) {
        self.open.store(open, Relaxed);
        match oldest {
            Some((since, peer)) => {
                let bytes = &peer.as_bytes()[..peer.len().min(PEER_BYTES)];
                for (cell, byte) in self.peer.iter().zip(bytes) {
                    cell.store(*byte, Relaxed);
                }
                self.peer_len.store(bytes.len() as u8, Relaxed);
                // The oldest channel closed, another is open: the worker
                // was busy all along.
                let (since, before) = (since.max(1), self.busy_since.load(Relaxed));
                if before != 0 && since > before {
                    self.busy_before.fetch_add(since - before, Relaxed);
                }
                self.busy_since.store(since, Relaxed);
            }
            None => {
                let before = self.busy_since.swap(0, Relaxed);
                if before != 0 {
                    self.busy_before.fetch_add(now_millis().saturating_sub(before), Relaxed);
                }
            }
        }
    }

    /// Milliseconds this worker has held at least one channel, up to `now`.
    pub fn busy_millis(&self, now: u64) -> u64 {
        let since = self.busy_since.load(Relaxed);
        self.busy_before.load(Relaxed) + if since == 0 { 0 } else { now.saturating_sub(since) }
    }

    pub fn request_leave(&self) {
        self.leave_requested.store(1, Relaxed);
    }

    pub fn leave_requested(&self) -> bool {
        self.leave_requested.load(Relaxed) != 0
    }

    /// Counts a connection closed before its handler (`proxy_header`'s why).
    pub fn count_proxy_rejected(&self, why: &str) {
        let counter = if why == crate::proxy_trust::UNTRUSTED { &self.proxy_untrusted } else { &self.proxy_errors };
        counter.fetch_add(1, Relaxed);
    }

    pub fn proxy_untrusted(&self) -> u64 {
        self.proxy_untrusted.load(Relaxed)
    }

    pub fn proxy_errors(&self) -> u64 {
        self.proxy_errors.load(Relaxed)
    }

    pub fn count_served(&self) {
        self.served.fetch_add(1, Relaxed);
    }

    /// Records why the worker gives up (cut at a character boundary).
    pub fn set_failure(&self, message: &str) {
        let mut len = message.len().min(FAILURE_BYTES);
        while !message.is_char_boundary(len) {
            len -= 1;
        }
        for (cell, byte) in self.failure.iter().zip(&message.as_bytes()[..len]) {
            cell.store(*byte, Relaxed);
        }
        self.failure_len.store(len as u8, Relaxed);
    }

    /// What the worker recorded with `set_failure`, empty if nothing.
    pub fn failure(&self) -> String {
        let len = usize::from(self.failure_len.load(Relaxed)).min(FAILURE_BYTES);
        let bytes: Vec<u8> = self.failure[..len].iter().map(|b| b.load(Relaxed)).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The peer of the oldest open channel ("host port").
    pub fn peer(&self) -> String {
        let len = usize::from(self.peer_len.load(Relaxed)).min(PEER_BYTES);
        let bytes: Vec<u8> = self.peer[..len].iter().map(|b| b.load(Relaxed)).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Gives the slot to a worker about to be forked.
    fn assign(&self, generation: u32) {
        self.pid.store(0, Relaxed);
        self.generation.store(generation, Relaxed);
        self.open.store(0, Relaxed);
        self.leave_requested.store(0, Relaxed);
        self.ready_once.store(0, Relaxed);
        self.served.store(0, Relaxed);
        self.proxy_errors.store(0, Relaxed);
        self.proxy_untrusted.store(0, Relaxed);
        self.busy_since.store(0, Relaxed);
        self.busy_before.store(0, Relaxed);
        self.failure_len.store(0, Relaxed);
        self.peer_len.store(0, Relaxed);
        self.due.store(0, Relaxed);
        self.turn.store(0, Relaxed);
        self.rss.store(0, Relaxed);
        self.set_state(State::Starting);
    }

    pub fn set_pid(&self, pid: i32) {
        self.pid.store(pid, Relaxed);
    }

    fn free(&self) {
        self.pid.store(0, Relaxed);
        self.set_state(State::Free);
    }
}

/// A pool's scoreboard: `capacity` slots, each on pages of its own.
pub struct Scoreboard {
    pages: SharedPages,
    /// Which slots are given to a worker, in the supervisor's own memory:
    /// a worker that writes "free" into its slot must not get a second
    /// worker put into it (which could then write there too).
    in_use: Vec<AtomicBool>,
}

impl Scoreboard {
    pub fn new(capacity: usize) -> nix::Result<Scoreboard> {
        // All zeroes is a valid Slot (atomics), in state Free.
        let pages = SharedPages::new(capacity, std::mem::size_of::<Slot>(), Writers::OneWorker)?;
        let in_use = (0..pages.items()).map(|_| AtomicBool::new(false)).collect();
        Ok(Scoreboard { pages, in_use })
    }

    pub fn slot(&self, index: usize) -> &Slot {
        assert!(index < self.pages.items(), "scoreboard slot out of range");
        // SAFETY: an item of the mapping, as large as a Slot and aligned
        // to a page; the mapping lives as long as self.
        unsafe { self.pages.item(index).cast::<Slot>().as_ref() }
    }

    /// Takes a free slot for a new worker of `generation`, on fresh pages:
    /// a process its previous worker left behind (a grandchild in a
    /// session of its own) may still map the old ones read-write. Where
    /// the system refuses fresh pages, the slot keeps its own.
    pub fn assign(&self, generation: u32) -> Option<usize> {
        let index = self.in_use.iter().position(|used| !used.swap(true, Relaxed))?;
        let _ = self.pages.renew(index);
        self.slot(index).assign(generation);
        Some(index)
    }

    /// Gives a slot back once its worker is gone (or was never forked).
    pub fn free(&self, index: usize) {
        self.slot(index).free();
        self.in_use[index].store(false, Relaxed);
    }

    /// The slot as a `'static` reference, for a forked worker, which keeps
    /// the mapping until it exits.
    pub fn leak_slot(&self, index: usize) -> &'static Slot {
        // SAFETY: the caller is a worker that never unmaps the scoreboard.
        unsafe { self.pages.item(index).cast::<Slot>().as_ref() }
    }
}

/// Monotonic milliseconds, the same clock in every process of the machine.
pub fn now_millis() -> u64 {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1000 + t.tv_nsec() as u64 / 1_000_000)
        .unwrap_or(0);
    now.max(1)
}
