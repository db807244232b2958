//! What a pool is made with (`pool create`'s options, checked), and the
//! size a pool of a next generation starts at.

use std::time::Duration;

use crate::tcl::Obj;

pub struct Config {
    pub workers: usize,
    pub concurrency: usize,
    pub handler: Vec<Obj>,
    pub init: Option<Obj>,
    pub max_connections: u64,
    pub jitter: u64,
    pub timeout: Option<Duration>,
    pub graceful: Duration,
    /// `None`: one line on stderr per event; an empty prefix: no log.
    pub log: Option<Vec<Obj>>,
    pub signals: bool,
    /// What each worker gives up after the fork (`-user`, `-group`, `-rlimit`).
    pub privileges: super::privileges::Privileges,
    /// `-metrics`: the endpoint's socket, bound, served once the pool runs.
    pub metrics: Option<super::metrics::Bound>,
    /// `-maxrss`, `-maxlifetime`, `-lifetimejitter` (`recycling`).
    pub recycling: super::model::recycling::Policy,
    /// `-inittimeout` (`model::timeouts`).
    pub init_timeout: Option<Duration>,
    /// `-workers min-max` and the spare targets, as given: the pool's model
    /// starts with a copy and moves its own.
    pub sizing: super::model::sizing::Sizing,
}

/// The variable that tells a next generation the size of each pool
/// (`port=workers`, separated by spaces) when the upgrade started it.
pub(super) const POOL_SIZES: &str = "SOCKETSERVER_POOL_SIZES";

/// The size the previous generation's pool on `port` had, in a next
/// generation that has not said ready yet.
pub(super) fn inherited_size(port: u16) -> Option<usize> {
    if !crate::inherited::ready_pending() {
        return None;
    }
    let sizes = std::env::var(POOL_SIZES).ok()?;
    let entry = sizes.split_whitespace().filter_map(|e| e.split_once('=')).find(|(p, _)| p.parse() == Ok(port));
    entry.and_then(|(_, workers)| workers.parse().ok())
}
