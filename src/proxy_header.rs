//! Reading a connection's PROXY protocol header, in the worker that
//! received the connection (never in the accepting threads, which a slow
//! client must not hold up), on the worker's Tcl thread.
//!
//! The header is peeked, parsed (`proxy_protocol`), and then exactly its
//! length is read: not one byte of what the client sent after it is lost,
//! even when it came in the same segment. A load balancer sends the header
//! with the connection, so it is nearly always there at once, and costs no
//! wakeup; otherwise a Tcl file handler waits for the rest, under a
//! deadline. A malformed, oversized, truncated or late header closes the
//! connection before any handler sees it, is counted (`proxyerrors`), and
//! the registration waits for the next connection as if nothing happened.
//!
//! A read that waits (a `PendingRead`) has an owner, the interpreter's
//! state that received the connection, and lives on its owner's thread, in
//! its process. It ends at the first of: the header read, a failure, the
//! deadline, its owner going (`cancel_owned_by`), its thread ending (Tcl's
//! thread exit handlers, which also run when the process exits). However
//! it ends, its file handler and timer are removed first; when its owner
//! or thread went first, the connection, of which nothing was consumed
//! yet, goes to `Next::cancelled` and never to a handler. The Tcl
//! callbacks carry the read's key, not a pointer: a read that has ended is
//! not found, and nothing is left to point at freed memory.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{c_int, c_void};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::time::Duration;

use nix::unistd::{getpid, Pid};

use crate::handoff::Connection;
use crate::proxy_protocol::{self, Mode, Parsed, V2_MAX};
use crate::tcl;

/// How long `read` waits for a header in place before it waits in the
/// event loop.
const QUICK_WAIT_MS: libc::c_int = 10;

/// A port's PROXY protocol setting.
#[derive(Clone, Debug)]
pub struct Setting {
    pub mode: Mode,
    pub deadline: Duration,
    /// The networks headers are believed from (`-proxyfrom`); `None`: all.
    pub trusted: Option<std::sync::Arc<crate::proxy_trust::TrustedProxies>>,
}

/// What becomes of a connection once its header is read, or failed.
pub trait Next {
    /// The header named `conn.peer`'s client (already set): hand it over.
    /// A handler's call is returned, for the Tcl callback to run outside
    /// `catch_unwind` (see `tcl::ScriptCall`).
    fn accepted(self: Box<Self>, conn: Connection) -> Option<tcl::ScriptCall>;
    /// The connection was closed: wait for another.
    fn rejected(self: Box<Self>, why: &str);
    /// The read's owner or thread went before the header was whole: `conn`
    /// is as it was received (nothing of it read), for another process or
    /// thread to serve. Called while the owner is going: it must not use it.
    fn cancelled(self: Box<Self>, conn: Connection);
}

/// Who owns a pending read: the address of an interpreter's state, as a
/// key only (never dereferenced here).
pub type Owner = usize;

/// Reads the header of `conn`, then calls `next`. Should the read have to
/// wait, `owner` owns it (see the module's documentation). Returns the
/// handler's call when the header was there at once.
pub fn read(conn: Connection, setting: Setting, owner: Owner, next: Box<dyn Next>) -> Option<tcl::ScriptCall> {
    if !crate::proxy_trust::admits(setting.trusted.as_deref(), conn.peer) {
        return fail(conn, next, crate::proxy_trust::UNTRUSTED);
    }
    let mut outcome = attempt(&conn, setting.mode);
    if matches!(outcome, Attempt::Wait) {
        // A proxy writes the header right after connecting, often an
        // instant after the connection is accepted: a short wait here is
        // cheaper than a Tcl file handler, which would bring Tcl's notifier
        // thread into the worker's loop.
        let mut poll = libc::pollfd {
            fd: conn.socket.as_raw_fd(),
            events: libc::POLLIN | crate::sys::PEER_CLOSED_EVENTS,
            revents: 0,
        };
        // SAFETY: one pollfd, a bounded wait.
        unsafe { libc::poll(&mut poll, 1, QUICK_WAIT_MS) };
        outcome = attempt(&conn, setting.mode);
    }
    match outcome {
        Attempt::Done(source) => finish_ok(conn, source, next),
        Attempt::Failed(why) => fail(conn, next, why),
        Attempt::Wait => {
            wait(conn, setting, owner, next);
            None
        }
    }
}

struct PendingRead {
    conn: Connection,
    setting: Setting,
    next: Box<dyn Next>,
    /// `None` once it has fired.
    timer: Option<tcl::Timer>,
    owner: Owner,
    /// The process that started the read: a forked child has a copy of it
    /// (and of its Tcl handlers), not the read.
    pid: Pid,
}

/// This thread's pending reads, by key.
#[derive(Default)]
struct PendingReads {
    last_key: usize,
    reads: HashMap<usize, PendingRead>,
    /// Whether `on_thread_exit` is registered for this thread.
    watching_exit: bool,
}

thread_local! {
    static PENDING: RefCell<PendingReads> = RefCell::new(PendingReads::default());
}

fn wait(conn: Connection, setting: Setting, owner: Owner, next: Box<dyn Next>) {
    let key = PENDING.with(|pending| {
        let mut pending = pending.borrow_mut();
        if !pending.watching_exit {
            tcl::create_thread_exit_handler(on_thread_exit);
            pending.watching_exit = true;
        }
        pending.last_key = pending.last_key.wrapping_add(1);
        pending.last_key
    });
    let millis = u32::try_from(setting.deadline.as_millis()).unwrap_or(u32::MAX);
    let timer = tcl::create_unwinding_timer(millis, on_deadline, key as *mut c_void);
    tcl::create_unwinding_file_handler(conn.socket.as_raw_fd(), on_readable, key as *mut c_void);
    let read = PendingRead { conn, setting, next, timer: Some(timer), owner, pid: getpid() };
    PENDING.with(|pending| pending.borrow_mut().reads.insert(key, read));
}

/// Ends the pending reads that `which` selects, removing their handlers
/// and timers, and returns them.
fn end(which: impl Fn(usize, &PendingRead) -> bool) -> Vec<PendingRead> {
    let ended: Vec<PendingRead> = PENDING
        .try_with(|pending| {
            let mut pending = pending.borrow_mut();
            let keys: Vec<usize> = pending.reads.iter().filter(|(k, r)| which(**k, r)).map(|(k, _)| *k).collect();
            keys.iter().filter_map(|key| pending.reads.remove(key)).collect()
        })
        .unwrap_or_default();
    for read in &ended {
        tcl::delete_file_handler(read.conn.socket.as_raw_fd());
        if let Some(timer) = read.timer {
            tcl::delete_timer(timer);
        }
    }
    ended
}

/// Cancels the pending reads of `owner` (which is going): each connection
/// goes to its `Next::cancelled`.
pub fn cancel_owned_by(owner: Owner) {
    cancel(end(|_, read| read.owner == owner));
}

fn cancel(reads: Vec<PendingRead>) {
    let here = getpid();
    for read in reads {
        if read.pid != here {
            // The parent's read: our copy of the descriptor closes.
            continue;
        }
        // Whoever reads the header next starts from its first byte.
        set_receive_low_water(read.conn.socket.as_raw_fd(), 1);
        read.next.cancelled(read.conn);
    }
}

/// Tcl's thread exit handler (process exit included): the thread's
/// notifier, which holds the reads' handlers, is about to go.
unsafe extern "C" fn on_thread_exit(_: *mut c_void) {
    let _ = std::panic::catch_unwind(|| cancel(end(|_, _| true)));
}

enum Attempt {
    Done(Option<std::net::SocketAddr>),
    Failed(&'static str),
    Wait,
}

/// Peeks, and consumes the header when it is all there.
fn attempt(conn: &Connection, mode: Mode) -> Attempt {
    let fd = conn.socket.as_raw_fd();
    let mut buffer = vec![0u8; V2_MAX];
    // SAFETY: recv writes at most `buffer.len()` bytes into our buffer.
    let peeked =
        unsafe { libc::recv(fd, buffer.as_mut_ptr().cast(), buffer.len(), libc::MSG_PEEK | libc::MSG_DONTWAIT) };
    if peeked < 0 {
        let errno = nix::errno::Errno::last();
        return if errno == nix::errno::Errno::EAGAIN { Attempt::Wait } else { Attempt::Failed("receive error") };
    }
    let peeked = peeked as usize;
    match proxy_protocol::parse(&buffer[..peeked], mode) {
        Ok(Parsed::Header { length, source }) => {
            // Exactly the header: what follows stays for the handler.
            // SAFETY: as above; `length` <= `peeked` bytes are queued.
            let read = unsafe { libc::recv(fd, buffer.as_mut_ptr().cast(), length, libc::MSG_DONTWAIT) };
            // Back to the default for the handler.
            set_receive_low_water(fd, 1);
            if read == length as isize {
                Attempt::Done(source)
            } else {
                Attempt::Failed("receive error")
            }
        }
        // The client closed (or shut down sending) before the header was
        // whole: it can never be.
        Ok(Parsed::Incomplete) if peer_done_sending(fd) => Attempt::Failed("truncated header"),
        Ok(Parsed::Incomplete) if peeked >= V2_MAX => Attempt::Failed("oversized header"),
        Ok(Parsed::Incomplete) => {
            // Readable again only once more bytes than these are there:
            // waiting for them must not spin on the bytes already peeked.
            set_receive_low_water(fd, peeked + 1);
            Attempt::Wait
        }
        Err(error) => Attempt::Failed(error.text()),
    }
}

/// SO_RCVLOWAT: poll reports the socket readable once `bytes` are queued
/// (or at end of file). nix has no wrapper for it.
fn set_receive_low_water(fd: std::os::fd::RawFd, bytes: usize) {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: setsockopt reads one c_int from `value`.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}

/// Whether the peer has closed its sending side (POLLRDHUP where the
/// platform has it): what is queued is all that will come.
fn peer_done_sending(fd: std::os::fd::RawFd) -> bool {
    let closed = crate::sys::PEER_CLOSED_EVENTS;
    let mut poll = libc::pollfd { fd, events: closed, revents: 0 };
    // SAFETY: one pollfd, no waiting.
    let ready = unsafe { libc::poll(&mut poll, 1, 0) };
    ready > 0 && poll.revents & (closed | libc::POLLHUP | libc::POLLERR) != 0
}

fn finish_ok(
    mut conn: Connection,
    source: Option<std::net::SocketAddr>,
    next: Box<dyn Next>,
) -> Option<tcl::ScriptCall> {
    if let Some(source) = source {
        conn.peer = Some(source);
    }
    next.accepted(conn)
}

fn fail(conn: Connection, next: Box<dyn Next>, why: &'static str) -> Option<tcl::ScriptCall> {
    drop(conn);
    next.rejected(why);
    None
}

/// The pending read `key` is done (or was copied into a forked child):
/// ends it and passes its connection on; returns the handler's call.
fn finish(key: usize, outcome: Attempt) -> Option<tcl::ScriptCall> {
    let read = end(|k, _| k == key).pop()?;
    if read.pid != getpid() {
        return None;
    }
    match outcome {
        Attempt::Done(source) => finish_ok(read.conn, source, read.next),
        Attempt::Failed(why) => fail(read.conn, read.next, why),
        Attempt::Wait => unreachable!("a read that waits is not finished"),
    }
}

/// The file handler of a pending read: "C-unwind", and its Rust code apart
/// from the handler's script, which may end the thread (`tcl::ScriptCall`).
unsafe extern "C-unwind" fn on_readable(data: *mut c_void, _mask: c_int) {
    let key = data as usize;
    let call = tcl::rust_part(|| {
        let outcome = PENDING.with(|pending| {
            let pending = pending.borrow();
            let read = pending.reads.get(&key)?;
            if read.pid != getpid() {
                // The parent's read, copied by fork: `finish` drops it
                // without peeking at the parent's header.
                return Some(Attempt::Failed("forked"));
            }
            Some(attempt(&read.conn, read.setting.mode))
        });
        match outcome {
            None | Some(Attempt::Wait) => None,
            Some(outcome) => finish(key, outcome),
        }
    });
    run(call.flatten());
}

/// The timer of a pending read, as `on_readable`.
unsafe extern "C-unwind" fn on_deadline(data: *mut c_void) {
    let key = data as usize;
    let call = tcl::rust_part(|| {
        // The timer is spent: `end` must not delete it again.
        PENDING.with(|pending| {
            if let Some(read) = pending.borrow_mut().reads.get_mut(&key) {
                read.timer = None;
            }
        });
        finish(key, Attempt::Failed("no header before the deadline"))
    });
    run(call.flatten());
}

/// Runs the handler's call that a header read came to, from a Tcl callback
/// (inlined there: a frame that holds nothing to drop).
#[inline(always)]
fn run(call: Option<tcl::ScriptCall>) {
    if let Some(call) = call {
        // SAFETY: on the interpreter's thread (header reads run there), right
        // after it was made, from a "C-unwind" callback outside catch_unwind.
        unsafe { call.run() };
    }
}

/// Counts a rejected connection in `counters`, an untrusted peer apart.
pub fn count(counters: &crate::counters::Counters, why: &str) {
    let counter = if why == crate::proxy_trust::UNTRUSTED { &counters.proxy_untrusted } else { &counters.proxy_errors };
    counter.fetch_add(1, Ordering::Relaxed);
}
