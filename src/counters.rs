//! What `info` reports of a port's traffic in this process, counted by the
//! accepting threads and by the registrations without a lock.

use std::sync::atomic::AtomicU64;

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
}
