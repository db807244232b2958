//! Forking while other threads run.
//!
//! `fork` copies only the calling thread. A lock that another thread holds
//! at that moment stays held forever in the child, so the child would hang
//! the first time it takes it. The process-wide locks of this library (the
//! port table, and the exit flag that receivers read while queueing events)
//! are therefore taken before every `fork` in the process, whoever calls it
//! (our pool, TclX's `fork`, C code), and released on both sides after it:
//! `pthread_atfork`. No other thread can then be inside them at the fork.
//!
//! Descriptors are the other hazard: a child gets a copy of every one,
//! including a connection the accepting thread holds at that moment, and a
//! copy left open keeps the client's connection open after its worker has
//! closed it. The accepting thread publishes the connection it holds, under
//! `hold_off_forks`, and the child closes its copies of everything the port
//! table owns (listeners, accept ends, connections in hand) at once. A fork
//! must never wait for a client, so the accept itself is not under the
//! guard: a connection accepted an instant before the fork and not yet
//! published is found by a pool's new worker among its descriptors, by its
//! local address, and closed (`close_copied_connections`).

use std::cell::RefCell;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::RawFd;
use std::sync::{MutexGuard, Once, RwLock, RwLockReadGuard, RwLockWriteGuard};

use nix::sys::socket::{getpeername, getsockname, SockaddrStorage};

use crate::listener;
use crate::notifier_fork::{self, Notifier};
use crate::port_table::{self, PortTable};
use crate::registration;
use crate::tcl;

/// Taken for reading around short stretches that must not be split by a
/// fork; for writing by `before_fork`.
static FORK_GUARD: RwLock<()> = RwLock::new(());

/// Keeps any `fork` in the process waiting until the guard is dropped.
pub fn hold_off_forks() -> RwLockReadGuard<'static, ()> {
    FORK_GUARD.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The locks held across a `fork`, on the forking thread.
struct Held {
    _forks: RwLockWriteGuard<'static, ()>,
    _exiting: RwLockWriteGuard<'static, bool>,
    table: MutexGuard<'static, PortTable>,
    /// Tcl's notifiers as the fork finds them, where the child must be
    /// given its own (`notifier_fork`); empty elsewhere.
    notifiers: Vec<Notifier>,
}

thread_local! {
    static HELD: RefCell<Option<Held>> = const { RefCell::new(None) };
}

/// Installs the fork handlers once per process.
pub fn install() {
    static INSTALLED: Once = Once::new();
    INSTALLED.call_once(|| {
        // SAFETY: the handlers are plain functions that live as long as the
        // process (Tcl never unloads a library that is in use).
        unsafe { libc::pthread_atfork(Some(before_fork), Some(in_parent), Some(in_child)) };
    });
}

extern "C" fn before_fork() {
    // Always in the same order: forks, the exit flag, the table.
    let held = Held {
        _forks: FORK_GUARD.write().unwrap_or_else(|poisoned| poisoned.into_inner()),
        _exiting: registration::lock_exit_flag(),
        table: port_table::lock(),
        notifiers: if tcl::NOTIFIER_SHARED_ACROSS_FORK { notifier_fork::snapshot() } else { Vec::new() },
    };
    let _ = HELD.try_with(|slot| *slot.borrow_mut() = Some(held));
}

/// Releases what `before_fork` took.
extern "C" fn in_parent() {
    let _ = HELD.try_with(|slot| slot.borrow_mut().take());
}

/// As `in_parent`, after closing the child's copies of what the port table
/// owns; where Tcl's notifier would be shared (Tcl 9), the child then
/// gets one of its own.
extern "C" fn in_child() {
    let _ = HELD.try_with(|slot| {
        if let Some(mut held) = slot.borrow_mut().take() {
            held.table.adopt_if_forked();
            notifier_fork::renew(&held.notifiers);
        }
    });
}

/// Closes this process's copies of connections accepted on `listening`
/// addresses: TCP sockets, connected, whose local address is one of them.
/// For a process that serves no connection yet (a pool's new worker); the
/// listeners themselves are closed already, so a socket with that local
/// address is an accepted connection.
pub fn close_copied_connections(listening: &[SocketAddr]) {
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else { return };
    let fds: Vec<RawFd> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd > 2)
        .collect();
    for fd in fds {
        let Ok(local) = getsockname::<SockaddrStorage>(fd) else { continue };
        let Some(local) = listener::to_socket_addr(&local) else { continue };
        let accepted_here = listening.iter().any(|l| {
            l.port() == local.port()
                && (l.ip().is_unspecified() || l.ip() == local.ip() || Some(l.ip()) == mapped(local.ip()))
        });
        if accepted_here && getpeername::<SockaddrStorage>(fd).is_ok() {
            let _ = nix::unistd::close(fd);
        }
    }
}

/// The IPv4 address inside an IPv4-mapped IPv6 one.
fn mapped(ip: IpAddr) -> Option<IpAddr> {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4),
        IpAddr::V4(_) => None,
    }
}
