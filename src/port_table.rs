//! The process's table of ports.
//!
//! The table belongs to the process, not to an interpreter: any interpreter
//! or thread can register for a port another one opened, and a forked child
//! inherits the table. A child is recognised by its pid: right after the
//! fork (`fork_safety`), or on its first use of the table, it closes its
//! copies of the listeners and of the queue's accept end (so that the port
//! is freed when the accepting process exits, and workers see the queue
//! close) and starts its own counters.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, MutexGuard, Once};

use nix::unistd::{getpid, Pid};

use crate::accept_loop::AcceptLoop;
use crate::counters::Counters;
use crate::fork_safety;

pub struct Port {
    pub number: u16,
    /// The queue's receiving end, shared by every worker of the port.
    pub worker_end: Arc<OwnedFd>,
    pub addresses: Vec<SocketAddr>,
    pub backlog: i32,
    pub counters: Arc<Counters>,
    /// A PROXY protocol header starts every connection (`server -proxy`).
    pub proxy: Option<crate::proxy_header::Setting>,
    /// The accept loop, in the accepting process only.
    pub accept_loop: Option<AcceptLoop>,
}

pub struct PortTable {
    pid: Pid,
    /// In the order `server` opened them; the first is the default port.
    ports: Vec<Port>,
}

static TABLE: Mutex<PortTable> = Mutex::new(PortTable { pid: Pid::from_raw(0), ports: Vec::new() });

/// Locks the table as it is.
pub(crate) fn lock() -> MutexGuard<'static, PortTable> {
    TABLE.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

thread_local! {
    /// The table, locked by the forking thread from before a fork to after it.
    static HELD_ACROSS_FORK: RefCell<Option<MutexGuard<'static, PortTable>>> = const { RefCell::new(None) };
}

/// Locks the table across every fork of the process; the child adopts it
/// at once.
pub fn watch_forks() {
    static REGISTERED: Once = Once::new();
    REGISTERED.call_once(|| fork_safety::on_fork(hold_for_fork, release_after_fork, adopt_after_fork));
}

fn hold_for_fork() {
    let table = lock();
    let _ = HELD_ACROSS_FORK.try_with(|held| *held.borrow_mut() = Some(table));
}

fn release_after_fork() {
    let _ = HELD_ACROSS_FORK.try_with(|held| held.borrow_mut().take());
}

fn adopt_after_fork() {
    let _ = HELD_ACROSS_FORK.try_with(|held| {
        if let Some(mut table) = held.borrow_mut().take() {
            table.adopt_if_forked();
        }
    });
}

/// Locks the table, first adopting it if this is a forked child.
pub fn table() -> MutexGuard<'static, PortTable> {
    let mut table = lock();
    table.adopt_if_forked();
    table
}

impl PortTable {
    /// In a forked child (on its first use, or at the fork itself): close
    /// the copies of what the accepting threads own, and count afresh.
    pub fn adopt_if_forked(&mut self) {
        let pid = getpid();
        if self.pid == pid {
            return;
        }
        self.pid = pid;
        for port in &mut self.ports {
            if let Some(accept_loop) = port.accept_loop.take() {
                accept_loop.abandon_after_fork();
            }
            port.counters = Arc::new(port.counters.fresh());
        }
    }

    pub fn get(&self, number: u16) -> Option<&Port> {
        self.ports.iter().find(|p| p.number == number)
    }

    pub fn default_port(&self) -> Option<u16> {
        self.ports.first().map(|p| p.number)
    }

    /// Every address a port of this process listens on (or did, in the
    /// process that forked this one).
    pub fn listening_addresses(&self) -> Vec<SocketAddr> {
        self.ports.iter().flat_map(|p| p.addresses.iter().copied()).collect()
    }

    /// The listening sockets this process accepts on, all ports together.
    pub fn listener_fds(&self) -> Vec<std::os::fd::RawFd> {
        self.ports.iter().filter_map(|p| p.accept_loop.as_ref()).flat_map(|l| l.listener_fds()).collect()
    }

    pub fn numbers(&self) -> Vec<u16> {
        self.ports.iter().map(|p| p.number).collect()
    }

    pub fn insert(&mut self, port: Port) {
        self.ports.push(port);
    }

    pub fn remove(&mut self, number: u16) -> Option<Port> {
        let index = self.ports.iter().position(|p| p.number == number)?;
        Some(self.ports.remove(index))
    }
}
