//! What a port's hand-off queue holds and how long connections wait in it,
//! readable by every process of the port without a message per connection.
//!
//! The figures live in a shared anonymous mapping made when the port opens,
//! before any worker is forked (as the pool's scoreboard is), so that the
//! accepting threads count what they queue, the workers count what they
//! take (and how long it waited), and the supervisor reads both. The queue's
//! depth is the difference. The accepting threads also read it to bound the
//! queue (`-maxqueue`): at the bound they either pause (and sleep on the
//! `room` waker, which a worker rings only while some thread is paused, so
//! a live connection costs no extra system call) or close what they accept.
//!
//! Queue waits go into a histogram with fixed buckets (Prometheus `le`
//! bounds, 1 ms to 10 s), a count and a sum: one relaxed add each.

use std::num::NonZeroUsize;
use std::os::fd::{BorrowedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};

use nix::sys::mman::{mmap_anonymous, munmap, MapFlags, ProtFlags};

use crate::fork_safety;
use crate::sys::{self, Waker};

/// The upper bounds of the histogram's buckets, in seconds, as `pool info`
/// and Prometheus name them; a last bucket (`+Inf`) takes the rest.
pub const BUCKET_BOUNDS: [(&str, u64); 13] = [
    ("0.001", 1_000_000),
    ("0.0025", 2_500_000),
    ("0.005", 5_000_000),
    ("0.01", 10_000_000),
    ("0.025", 25_000_000),
    ("0.05", 50_000_000),
    ("0.1", 100_000_000),
    ("0.25", 250_000_000),
    ("0.5", 500_000_000),
    ("1", 1_000_000_000),
    ("2.5", 2_500_000_000),
    ("5", 5_000_000_000),
    ("10", 10_000_000_000),
];
const BUCKETS: usize = BUCKET_BOUNDS.len() + 1;

/// What to do with a connection when the queue is at its bound.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u32)]
pub enum Overload {
    /// No bound.
    None = 0,
    /// Stop accepting until the queue drains below the bound.
    Pause = 1,
    /// Accept and close at once.
    Close = 2,
}

impl Overload {
    pub fn name(self) -> &'static str {
        match self {
            Overload::None => "none",
            Overload::Pause => "pause",
            Overload::Close => "close",
        }
    }
}

/// The figures in the shared mapping; all zeroes is the start.
#[repr(C)]
struct Figures {
    /// Messages sent into the queue (re-queued ones included).
    queued: AtomicU64,
    /// Messages taken off the queue by workers.
    taken: AtomicU64,
    /// Connections closed at the bound (`-overload close`).
    rejected: AtomicU64,
    /// Connections whose client left while queued, closed unserved.
    abandoned: AtomicU64,
    /// The bound (0: none) and what happens at it (`Overload`).
    max_queue: AtomicU64,
    overload: AtomicU32,
    /// Accepting threads paused now, and since when (monotonic ns) the
    /// first of them; nanoseconds paused in all, and how many pauses.
    paused_threads: AtomicU32,
    pause_started: AtomicU64,
    paused_ns: AtomicU64,
    pauses: AtomicU64,
    /// Queue waits: per bucket (not cumulative), how many, and their sum.
    buckets: [AtomicU64; BUCKETS],
    waits: AtomicU64,
    wait_sum_ns: AtomicU64,
}

/// A port's queue figures (see the module's comment).
pub struct QueueStats {
    figures: NonNull<Figures>,
    /// Whether `figures` is a shared mapping (else a private fallback).
    mapped: bool,
    /// Rung by a worker that takes a connection while a thread is paused.
    room: Option<Waker>,
}

// SAFETY: `figures` points to atomics only, valid for the value's life.
unsafe impl Send for QueueStats {}
// SAFETY: as above.
unsafe impl Sync for QueueStats {}

impl Default for QueueStats {
    fn default() -> Self {
        QueueStats::new()
    }
}

impl QueueStats {
    /// Shared figures; where the system refuses a mapping, private ones
    /// (the accepting process's own counts: workers' takes are not seen).
    pub fn new() -> QueueStats {
        let bytes = NonZeroUsize::new(std::mem::size_of::<Figures>()).expect("non-zero");
        // SAFETY: a fresh anonymous mapping, zero-filled by the kernel; all
        // zeroes is a valid `Figures` (atomics).
        let shared =
            unsafe { mmap_anonymous(None, bytes, ProtFlags::PROT_READ | ProtFlags::PROT_WRITE, MapFlags::MAP_SHARED) };
        let (figures, mapped) = match shared {
            Ok(memory) => (memory.cast::<Figures>(), true),
            // SAFETY: as above, zeroed memory is a valid `Figures`.
            Err(_) => (NonNull::from(Box::leak(Box::new(unsafe { std::mem::zeroed::<Figures>() }))), false),
        };
        let room = {
            let _no_fork = (!sys::CLOEXEC_IS_ATOMIC).then(fork_safety::hold_off_forks);
            Waker::new().ok()
        };
        QueueStats { figures, mapped, room }
    }

    fn figures(&self) -> &Figures {
        // SAFETY: valid for as long as self (see `new`).
        unsafe { self.figures.as_ref() }
    }

    /// Sets the bound (0: none) and the policy at it.
    pub fn set_bound(&self, max_queue: u64, overload: Overload) {
        let f = self.figures();
        f.overload.store(if max_queue == 0 { Overload::None } else { overload } as u32, SeqCst);
        f.max_queue.store(max_queue, SeqCst);
        // A paused thread looks at the new bound.
        self.ring();
    }

    /// The bound (0: none) and the policy at it.
    pub fn bound(&self) -> (u64, Overload) {
        let f = self.figures();
        let overload = match f.overload.load(Relaxed) {
            1 => Overload::Pause,
            2 => Overload::Close,
            _ => Overload::None,
        };
        (f.max_queue.load(Relaxed), overload)
    }

    /// Connections in the queue now: queued and not yet taken.
    pub fn depth(&self) -> u64 {
        let f = self.figures();
        let taken = f.taken.load(SeqCst);
        f.queued.load(SeqCst).saturating_sub(taken)
    }

    /// Whether the queue is at its bound (false without one).
    pub fn full(&self) -> bool {
        let max = self.figures().max_queue.load(Relaxed);
        max != 0 && self.depth() >= max
    }

    /// Before a send into the queue; `unqueued` if the send failed.
    pub fn count_queued(&self) {
        self.figures().queued.fetch_add(1, SeqCst);
    }

    pub fn unqueued(&self) {
        self.figures().queued.fetch_sub(1, SeqCst);
    }

    /// A worker took a message: rings a paused accepting thread, if any.
    pub fn count_taken(&self) {
        let f = self.figures();
        f.taken.fetch_add(1, SeqCst);
        if f.paused_threads.load(SeqCst) != 0 {
            self.ring();
        }
    }

    pub fn count_rejected(&self) {
        self.figures().rejected.fetch_add(1, Relaxed);
    }

    pub fn count_abandoned(&self) {
        self.figures().abandoned.fetch_add(1, Relaxed);
    }

    /// Records one queue wait, in nanoseconds.
    pub fn record_wait(&self, wait_ns: u64) {
        let f = self.figures();
        let bucket = BUCKET_BOUNDS.iter().position(|(_, bound)| wait_ns <= *bound).unwrap_or(BUCKETS - 1);
        f.buckets[bucket].fetch_add(1, Relaxed);
        f.waits.fetch_add(1, Relaxed);
        f.wait_sum_ns.fetch_add(wait_ns, Relaxed);
    }

    fn ring(&self) {
        if let Some(room) = &self.room {
            room.wake();
        }
    }

    /// An accepting thread pauses: marks it, so that workers ring.
    pub fn enter_pause(&self) {
        let f = self.figures();
        if f.paused_threads.fetch_add(1, SeqCst) == 0 {
            f.pause_started.store(monotonic_ns(), SeqCst);
            f.pauses.fetch_add(1, Relaxed);
        }
    }

    /// An accepting thread resumes; the last one adds the time paused. One
    /// that leaves others paused rings for them: the worker's ring woke
    /// only one (the others would sleep out their poll, and `paused` would
    /// stay set with room in the queue).
    pub fn leave_pause(&self) {
        let f = self.figures();
        let started = f.pause_started.load(SeqCst);
        if f.paused_threads.fetch_sub(1, SeqCst) == 1 {
            f.paused_ns.fetch_add(monotonic_ns().saturating_sub(started), Relaxed);
        } else {
            self.ring();
        }
    }

    /// The descriptor a paused thread polls (`None`: poll with a timeout).
    pub fn room_fd(&self) -> Option<BorrowedFd<'_>> {
        self.room.as_ref().map(Waker::fd)
    }

    /// Consumes the rings so far.
    pub fn drain_room(&self) {
        if let Some(room) = &self.room {
            room.drain();
        }
    }

    /// The waker's descriptor numbers.
    pub fn raw_fds(&self) -> Vec<RawFd> {
        self.room.as_ref().map(Waker::raw_fds).unwrap_or_default()
    }

    /// A snapshot for `pool info`.
    pub fn snapshot(&self) -> Snapshot {
        let f = self.figures();
        let paused_now = f.paused_threads.load(SeqCst) != 0;
        let mut paused_ns = f.paused_ns.load(Relaxed);
        if paused_now {
            paused_ns += monotonic_ns().saturating_sub(f.pause_started.load(SeqCst));
        }
        let (max_queue, overload) = self.bound();
        let mut cumulative = 0;
        let buckets = f
            .buckets
            .iter()
            .map(|b| {
                cumulative += b.load(Relaxed);
                cumulative
            })
            .collect();
        Snapshot {
            depth: self.depth(),
            max_queue,
            overload,
            rejected: f.rejected.load(Relaxed),
            abandoned: f.abandoned.load(Relaxed),
            paused_now,
            paused_seconds: paused_ns as f64 / 1e9,
            pauses: f.pauses.load(Relaxed),
            buckets,
            waits: f.waits.load(Relaxed),
            wait_sum_seconds: f.wait_sum_ns.load(Relaxed) as f64 / 1e9,
        }
    }
}

impl Drop for QueueStats {
    fn drop(&mut self) {
        if self.mapped {
            // SAFETY: mapped by `new` with this size; no reference outlives self.
            let _ = unsafe { munmap(self.figures.cast(), std::mem::size_of::<Figures>()) };
        } else {
            // SAFETY: leaked from a Box by `new`.
            drop(unsafe { Box::from_raw(self.figures.as_ptr()) });
        }
    }
}

/// The figures at one moment.
pub struct Snapshot {
    pub depth: u64,
    pub max_queue: u64,
    pub overload: Overload,
    pub rejected: u64,
    pub abandoned: u64,
    pub paused_now: bool,
    pub paused_seconds: f64,
    pub pauses: u64,
    /// Cumulative counts per bucket of `BUCKET_BOUNDS`, then `+Inf`.
    pub buckets: Vec<u64>,
    pub waits: u64,
    pub wait_sum_seconds: f64,
}

/// `CLOCK_MONOTONIC` in nanoseconds: one clock for every process of the
/// machine, so that a worker can compare the accepting thread's stamp.
pub fn monotonic_ns() -> u64 {
    clock_ns(nix::time::ClockId::CLOCK_MONOTONIC)
}

/// `CLOCK_REALTIME` in nanoseconds since the epoch.
pub fn realtime_ns() -> u64 {
    clock_ns(nix::time::ClockId::CLOCK_REALTIME)
}

fn clock_ns(clock: nix::time::ClockId) -> u64 {
    nix::time::clock_gettime(clock).map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64).unwrap_or(0)
}
