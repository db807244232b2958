//! What a port's hand-off queue holds and how long connections wait in it,
//! readable by every process of the port without a message per connection.
//!
//! The figures live in memory shared with the processes forked later
//! (`shared_pages`), in two parts by who writes them: what the accepting
//! threads count (connections queued and rejected, whether a thread is
//! paused), which a pool's worker can only read; and what the processes
//! that take connections count (taken, abandoned, the queue waits), which
//! every worker writes. The queue's depth is the difference. The
//! accepting threads also bound the queue (`-maxqueue`): at the bound they
//! either pause (and sleep on the `room` waker, which a worker rings only
//! while some thread is paused, so a live connection costs no extra
//! system call) or close what they accept. The bound and the policy at it,
//! and the time paused, are this process's own memory: no worker can
//! change them. A worker can still lie about what it took; the depth it
//! makes up is checked against the kernel's count of what is unread
//! whenever a thread would pause or close for it (`resync_if_empty`).
//!
//! Queue waits go into a histogram with fixed buckets (Prometheus `le`
//! bounds, 1 ms to 10 s), a count and a sum: one relaxed add each.

use std::os::fd::{BorrowedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Mutex, MutexGuard};

use crate::fork_safety;
use crate::shared_pages::{SharedPages, Writers};
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

/// What the accepting threads count; all zeroes is the start. Read-only
/// in a pool's workers.
#[repr(C)]
struct Counts {
    /// Messages sent into the queue (re-queued ones included).
    queued: AtomicU64,
    /// Connections closed at the bound (`-overload close`).
    rejected: AtomicU64,
    /// Accepting threads paused now (workers ring `room` while non-zero).
    paused_threads: AtomicU32,
}

/// What the processes that take connections count; all zeroes is the
/// start. Every worker writes it.
#[repr(C)]
struct Takes {
    /// Messages taken off the queue by workers.
    taken: AtomicU64,
    /// Connections whose client left while queued, closed unserved.
    abandoned: AtomicU64,
    /// Queue waits: per bucket (not cumulative), how many, and their sum.
    buckets: [AtomicU64; BUCKETS],
    waits: AtomicU64,
    wait_sum_ns: AtomicU64,
}

/// Pauses of the accepting threads, in this process only: one lock, so
/// that a reader never sees a pause half counted.
#[derive(Default)]
struct Pauses {
    threads: u32,
    /// When the first of the threads paused now paused (monotonic ns).
    started: u64,
    /// Nanoseconds of pauses that are over.
    total_ns: u64,
    count: u64,
    /// The most ever reported: the figure never goes back.
    reported_ns: u64,
}

/// Where the figures live: shared pages, or, where the system refuses
/// them, this process's own memory (workers' takes are then not seen).
enum Backing {
    Shared { _counts: SharedPages, _takes: SharedPages },
    Private,
}

/// A port's queue figures (see the module's comment).
pub struct QueueStats {
    counts: NonNull<Counts>,
    takes: NonNull<Takes>,
    backing: Backing,
    /// The bound (0: none) and what happens at it (`Overload`).
    max_queue: AtomicU64,
    overload: AtomicU32,
    /// Added to the depth: set when the kernel says the queue is empty
    /// while the counts say otherwise (a worker that lied about its takes).
    adjust: AtomicI64,
    /// The most takes this process has believed: what the workers claim
    /// counts only where it is more than this and no more than was queued,
    /// so that no write of a worker's makes the depth grow (`takes_believed`).
    taken_seen: AtomicU64,
    pauses: Mutex<Pauses>,
    /// Rung by a worker that takes a connection while a thread is paused.
    room: Option<Waker>,
}

// SAFETY: `counts` and `takes` point to atomics only, valid for the
// value's life.
unsafe impl Send for QueueStats {}
// SAFETY: as above.
unsafe impl Sync for QueueStats {}

impl Default for QueueStats {
    fn default() -> Self {
        QueueStats::new()
    }
}

impl QueueStats {
    /// Shared figures; where the system refuses them, private ones.
    pub fn new() -> QueueStats {
        let shared = SharedPages::new(1, std::mem::size_of::<Counts>(), Writers::OneWorker).and_then(|counts| {
            SharedPages::new(1, std::mem::size_of::<Takes>(), Writers::AllWorkers).map(|takes| (counts, takes))
        });
        let (counts, takes, backing) = match shared {
            Ok((counts, takes)) => {
                (counts.item(0).cast(), takes.item(0).cast(), Backing::Shared { _counts: counts, _takes: takes })
            }
            // SAFETY: zeroed memory is a valid `Counts` and `Takes` (atomics).
            Err(_) => unsafe {
                (
                    NonNull::from(Box::leak(Box::new(std::mem::zeroed::<Counts>()))),
                    NonNull::from(Box::leak(Box::new(std::mem::zeroed::<Takes>()))),
                    Backing::Private,
                )
            },
        };
        let room = {
            let _no_fork = (!sys::CLOEXEC_IS_ATOMIC).then(fork_safety::hold_off_forks);
            Waker::new().ok()
        };
        QueueStats {
            counts,
            takes,
            backing,
            max_queue: AtomicU64::new(0),
            overload: AtomicU32::new(Overload::None as u32),
            adjust: AtomicI64::new(0),
            taken_seen: AtomicU64::new(0),
            pauses: Mutex::new(Pauses::default()),
            room,
        }
    }

    fn counts(&self) -> &Counts {
        // SAFETY: valid for as long as self (see `new`).
        unsafe { self.counts.as_ref() }
    }

    fn takes(&self) -> &Takes {
        // SAFETY: valid for as long as self (see `new`).
        unsafe { self.takes.as_ref() }
    }

    fn pauses(&self) -> MutexGuard<'_, Pauses> {
        self.pauses.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Sets the bound (0: none) and the policy at it.
    pub fn set_bound(&self, max_queue: u64, overload: Overload) {
        self.overload.store(if max_queue == 0 { Overload::None } else { overload } as u32, SeqCst);
        self.max_queue.store(max_queue, SeqCst);
        // A paused thread looks at the new bound.
        self.ring();
    }

    /// The bound (0: none) and the policy at it.
    pub fn bound(&self) -> (u64, Overload) {
        let overload = match self.overload.load(Relaxed) {
            1 => Overload::Pause,
            2 => Overload::Close,
            _ => Overload::None,
        };
        (self.max_queue.load(Relaxed), overload)
    }

    /// The takes to believe, of `queued` messages sent: the workers' count
    /// is their claim, written in memory each of them can write. Takes
    /// only grow and never pass what was queued, so a claim below the most
    /// believed so far or above `queued` is not believed: a worker that
    /// writes a smaller count cannot make the queue look full (and the port
    /// pause or close while it is below its bound). One that writes a
    /// larger count can still make it look shorter than it is, until the
    /// bound is met (`resync_if_empty` corrects the other way only).
    fn takes_believed(&self, queued: u64) -> u64 {
        let claimed = self.takes().taken.load(SeqCst).min(queued);
        self.taken_seen.fetch_max(claimed, SeqCst).max(claimed)
    }

    fn depth_of(&self, queued: u64) -> u64 {
        let taken = self.takes_believed(queued);
        let depth = queued as i128 - taken as i128 + i128::from(self.adjust.load(SeqCst));
        depth.clamp(0, i128::from(u64::MAX)) as u64
    }

    /// Connections in the queue now: queued and not yet taken.
    pub fn depth(&self) -> u64 {
        self.depth_of(self.counts().queued.load(SeqCst))
    }

    /// Whether the queue is at its bound (false without one).
    pub fn full(&self) -> bool {
        let max = self.max_queue.load(Relaxed);
        max != 0 && self.depth() >= max
    }

    /// Counts one connection about to be sent, if the queue is below its
    /// bound (always, without one): the check and the count are one step,
    /// so that threads that look at once never pass the bound together.
    /// `unqueued` if the send fails.
    pub fn reserve(&self) -> bool {
        let max = self.max_queue.load(Relaxed);
        let queued = &self.counts().queued;
        if max == 0 {
            queued.fetch_add(1, SeqCst);
            return true;
        }
        queued.fetch_update(SeqCst, SeqCst, |count| (self.depth_of(count) < max).then_some(count + 1)).is_ok()
    }

    /// Counts one connection about to be sent, whatever the bound.
    pub fn count_queued(&self) {
        self.counts().queued.fetch_add(1, SeqCst);
    }

    pub fn unqueued(&self) {
        self.counts().queued.fetch_sub(1, SeqCst);
    }

    /// The queue looks full, and `unread` (the kernel's count of bytes
    /// sent into the queue and not yet received, `None` where the system
    /// cannot say) is zero: the takes counted are short of the truth. The
    /// depth is set back to zero.
    pub fn resync_if_empty(&self, unread: Option<usize>) {
        if unread == Some(0) {
            let depth = self.depth();
            if depth > 0 {
                self.adjust.fetch_sub(depth as i64, SeqCst);
            }
        }
    }

    /// The depth, no more than the most messages `unread_bytes` can be:
    /// the kernel's count of payload bytes in the queue
    /// (`sys::unread_payload_bytes` of a worker end; `None` where the
    /// system cannot say). For decisions on the depth (sizing): a worker
    /// that wrote a smaller count of takes after the accepting process last
    /// read it makes `depth` grow by what it took since, never this. Read
    /// only, so that a count read a moment apart from the kernel's never
    /// moves the figures for good.
    pub fn depth_at_most(&self, unread_bytes: Option<usize>) -> u64 {
        let depth = self.depth();
        match unread_bytes {
            Some(bytes) => depth.min((bytes / crate::handoff::MIN_PAYLOAD) as u64),
            None => depth,
        }
    }

    /// A worker took a message: rings a paused accepting thread, if any.
    pub fn count_taken(&self) {
        self.takes().taken.fetch_add(1, SeqCst);
        if self.counts().paused_threads.load(SeqCst) != 0 {
            self.ring();
        }
    }

    pub fn count_rejected(&self) {
        self.counts().rejected.fetch_add(1, Relaxed);
    }

    pub fn count_abandoned(&self) {
        self.takes().abandoned.fetch_add(1, Relaxed);
    }

    /// Records one queue wait, in nanoseconds.
    pub fn record_wait(&self, wait_ns: u64) {
        let t = self.takes();
        let bucket = BUCKET_BOUNDS.iter().position(|(_, bound)| wait_ns <= *bound).unwrap_or(BUCKETS - 1);
        t.buckets[bucket].fetch_add(1, Relaxed);
        t.waits.fetch_add(1, Relaxed);
        t.wait_sum_ns.fetch_add(wait_ns, Relaxed);
    }

    fn ring(&self) {
        if let Some(room) = &self.room {
            room.wake();
        }
    }

    /// An accepting thread pauses: marks it, so that workers ring.
    pub fn enter_pause(&self) {
        let mut pauses = self.pauses();
        if pauses.threads == 0 {
            pauses.started = monotonic_ns();
            pauses.count += 1;
        }
        pauses.threads += 1;
        self.counts().paused_threads.store(pauses.threads, SeqCst);
    }

    /// An accepting thread resumes; the last one adds the time paused. One
    /// that leaves others paused rings for them: the worker's ring woke
    /// only one (the others would sleep out their poll, and `paused` would
    /// stay set with room in the queue).
    pub fn leave_pause(&self) {
        let mut pauses = self.pauses();
        pauses.threads = pauses.threads.saturating_sub(1);
        self.counts().paused_threads.store(pauses.threads, SeqCst);
        if pauses.threads == 0 {
            pauses.total_ns += monotonic_ns().saturating_sub(pauses.started);
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
        let (paused_now, paused_ns, pauses) = {
            let mut p = self.pauses();
            let now = if p.threads != 0 { monotonic_ns().saturating_sub(p.started) } else { 0 };
            p.reported_ns = p.reported_ns.max(p.total_ns + now);
            (p.threads != 0, p.reported_ns, p.count)
        };
        let (max_queue, overload) = self.bound();
        let t = self.takes();
        let mut cumulative = 0;
        let buckets = t
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
            rejected: self.counts().rejected.load(Relaxed),
            abandoned: t.abandoned.load(Relaxed),
            paused_now,
            paused_seconds: paused_ns as f64 / 1e9,
            pauses,
            buckets,
            waits: t.waits.load(Relaxed),
            wait_sum_seconds: t.wait_sum_ns.load(Relaxed) as f64 / 1e9,
        }
    }
}

impl Drop for QueueStats {
    fn drop(&mut self) {
        if let Backing::Private = self.backing {
            // SAFETY: leaked from Boxes by `new`.
            unsafe {
                drop(Box::from_raw(self.counts.as_ptr()));
                drop(Box::from_raw(self.takes.as_ptr()));
            }
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
