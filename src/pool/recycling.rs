//! Recycling, what a worker and the supervisor share of it: a worker is
//! due, and replaced, after `-maxconnections` connections, once its resident memory passes
//! `-maxrss`, or once it has lived `-maxlifetime` (plus a random part of
//! `-lifetimejitter`). Who gets a turn and when a worker leaves is the
//! model's decision (`model::recycling`); `lifecycle` acts on it.
//! This file is what a worker marks in its slot (`due`) and the pool's
//! recycled counts, below the pool's data (`state`).
//!
//! Who looks: a worker measures its own memory after each connection it
//! closes (one read of `/proc/self/statm`, a few microseconds, at the
//! moment memory has just grown, and with no cost to the supervisor that
//! grows with the pool), marks itself due in its slot and wakes the
//! supervisor; the supervisor, which knows when it forked each worker,
//! watches lifetimes on its tick. Turns are counted by the supervisor
//! alone, in its own memory; what it writes in a worker's slot (`turn`:
//! you may leave by yourself once due) and what the worker writes
//! (`due`) are about that worker only: a lie makes that worker leave
//! sooner, nothing else.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use super::model::recycling as policy;
pub use super::model::recycling::{Policy, Reason};
use super::model::Observed;
use super::scoreboard::{Slot, State};

pub(super) fn mark_due(slot: &Slot, reason: Reason) -> bool {
    // The first reason stays.
    slot.due.compare_exchange(0, reason as u32, Ordering::SeqCst, Ordering::SeqCst).is_ok()
}

/// Why a worker is due, as its slot says.
pub(super) fn due(slot: &Slot) -> Option<Reason> {
    Reason::from_u32(slot.due.load(Ordering::SeqCst))
}

/// What a worker knows of recycling.
pub struct InWorker {
    pub slot: &'static Slot,
    /// Bytes; 0: no limit.
    pub max_rss: u64,
    /// Connections before leaving (`-maxconnections`, with its jitter).
    pub limit: Option<u64>,
    /// Whether it told the supervisor it is due.
    told: AtomicBool,
}

impl InWorker {
    /// After a connection was received: due once it was the last allowed.
    pub fn received(&self, received: u64) {
        if self.limit.is_some_and(|limit| received >= limit) {
            mark_due(self.slot, Reason::Connections);
        }
    }

    /// After a channel was closed: due once memory has passed `-maxrss`.
    pub fn closed(&self) {
        if self.max_rss == 0 {
            return;
        }
        if let Some(rss) = crate::sys::resident_bytes() {
            self.slot.rss.store(rss, Ordering::Relaxed);
            if rss > self.max_rss {
                mark_due(self.slot, Reason::Memory);
            }
        }
    }

    /// Whether the worker should leave now by itself: it is due, and the
    /// supervisor authorised it (the worker's caller then wakes the
    /// supervisor, which starts the replacement). One due and not
    /// authorised wakes the supervisor once, and serves on: the supervisor
    /// starts its replacement and retires it when that one is ready.
    pub fn leave_now(&self) -> bool {
        if due(self.slot).is_none() {
            return false;
        }
        if self.slot.turn.load(Ordering::SeqCst) != 0 {
            return true;
        }
        if !self.told.swap(true, Ordering::Relaxed) {
            super::signals::notify_supervisor();
        }
        false
    }

    /// The worker's last channel is closed: nothing to give back.
    pub fn done(&self) {}
}

/// A pool's recycling, on the supervisor's side.
#[derive(Default)]
pub struct InPool {
    /// Workers recycled, by reason (`Reason::index`).
    pub(super) recycled: [u64; 3],
}

impl InPool {
    pub fn new() -> nix::Result<InPool> {
        Ok(InPool::default())
    }

    pub fn for_worker(&self, slot: &'static Slot, max_rss: u64, limit: Option<u64>) -> InWorker {
        InWorker { slot, max_rss, limit, told: AtomicBool::new(false) }
    }
}

/// When a worker forked at `forked` is due by age, if `-maxlifetime` is set.
pub(super) fn lifetime_deadline(policy: &Policy, forked: Instant) -> Option<Instant> {
    let lifetime = policy.max_lifetime?;
    let jitter = policy.lifetime_jitter.unwrap_or(lifetime / 10);
    let extra = random_below(jitter.as_millis() as u64 + 1);
    policy::lifetime_deadline(forked, Some(lifetime), extra)
}

/// A random number in `0..bound`, for the recycling jitter.
pub(super) fn random_below(bound: u64) -> u64 {
    let mut bytes = [0u8; 8];
    if !crate::sys::fill_random(&mut bytes) || bound == 0 {
        return 0;
    }
    u64::from_ne_bytes(bytes) % bound
}

/// A slot's state as the model names it (`None`: free).
pub(super) fn observed(state: State) -> Option<Observed> {
    match state {
        State::Free => None,
        State::Starting => Some(Observed::Starting),
        State::Idle => Some(Observed::Idle),
        State::Busy => Some(Observed::Busy),
        State::Stopping => Some(Observed::Stopping),
    }
}
