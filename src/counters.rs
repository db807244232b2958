//! What `info` reports of a port's traffic in this process, counted by the
//! accepting threads and by the registrations without a lock.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use crate::queue_stats::QueueStats;

#[derive(Default)]
pub struct Counters {
    /// Connections the accepting threads took from the listeners.
    pub accepted: AtomicU64,
    /// Connections handed to a handler.
    pub received: AtomicU64,
    /// Connections closed for a bad, late or missing PROXY protocol header.
    pub proxy_errors: AtomicU64,
    /// Connections closed because their peer is not in `-proxyfrom`.
    pub proxy_untrusted: AtomicU64,
    /// The queue's figures, shared with every process forked after the
    /// port opened (a forked child's fresh counters keep them).
    pub queue: Arc<QueueStats>,
}

impl Counters {
    /// Fresh counts of this process, the same queue figures.
    pub fn fresh(&self) -> Counters {
        Counters {
            accepted: AtomicU64::new(0),
            received: AtomicU64::new(0),
            proxy_errors: AtomicU64::new(0),
            proxy_untrusted: AtomicU64::new(0),
            queue: Arc::clone(&self.queue),
        }
    }
}
