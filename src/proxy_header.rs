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

use std::ffi::{c_int, c_void};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::handoff::Connection;
use crate::proxy_protocol::{self, Mode, Parsed, V2_MAX};
use crate::tcl;

/// How long `read` waits for a header in place before it waits in the
/// event loop.
const QUICK_WAIT_MS: libc::c_int = 10;

/// A port's PROXY protocol setting.
#[derive(Clone, Copy, Debug)]
pub struct Setting {
    pub mode: Mode,
    pub deadline: Duration,
}

/// What becomes of a connection once its header is read, or failed.
pub trait Next {
    /// The header named `conn.peer`'s client (already set): hand it over.
    fn accepted(self: Box<Self>, conn: Connection);
    /// The connection was closed: wait for another.
    fn rejected(self: Box<Self>, why: &str);
}

/// Reads the header of `conn`, then calls `next`.
pub fn read(conn: Connection, setting: Setting, next: Box<dyn Next>) {
    let mut outcome = attempt(&conn, setting.mode);
    if matches!(outcome, Attempt::Wait) {
        // A proxy writes the header right after connecting, often an
        // instant after the connection is accepted: a short wait here is
        // cheaper than a Tcl file handler, which would bring Tcl's notifier
        // thread into the worker's loop.
        let mut poll = libc::pollfd { fd: conn.socket.as_raw_fd(), events: libc::POLLIN | libc::POLLRDHUP, revents: 0 };
        // SAFETY: one pollfd, a bounded wait.
        unsafe { libc::poll(&mut poll, 1, QUICK_WAIT_MS) };
        outcome = attempt(&conn, setting.mode);
    }
    match outcome {
        Attempt::Done(source) => finish_ok(conn, source, next),
        Attempt::Failed(why) => fail(conn, next, why),
        Attempt::Wait => {
            let fd = conn.socket.as_raw_fd();
            let pending = Box::into_raw(Box::new(Pending { conn, setting, next, timer: None }));
            let millis = u32::try_from(setting.deadline.as_millis()).unwrap_or(u32::MAX);
            // SAFETY: `pending` stays valid until `take` frees it, which
            // removes the handler and the timer first.
            unsafe { (*pending).timer = Some(tcl::create_timer(millis, on_deadline, pending.cast())) };
            tcl::create_file_handler(fd, on_readable, pending.cast());
        }
    }
}

struct Pending {
    conn: Connection,
    setting: Setting,
    next: Box<dyn Next>,
    timer: Option<tcl::Timer>,
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
    let peeked = unsafe {
        libc::recv(fd, buffer.as_mut_ptr().cast(), buffer.len(), libc::MSG_PEEK | libc::MSG_DONTWAIT)
    };
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

/// Whether the peer has closed its sending side (POLLRDHUP): what is
/// queued is all that will come.
fn peer_done_sending(fd: std::os::fd::RawFd) -> bool {
    let mut poll = libc::pollfd { fd, events: libc::POLLRDHUP, revents: 0 };
    // SAFETY: one pollfd, no waiting.
    let ready = unsafe { libc::poll(&mut poll, 1, 0) };
    ready > 0 && poll.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

fn finish_ok(mut conn: Connection, source: Option<std::net::SocketAddr>, next: Box<dyn Next>) {
    if let Some(source) = source {
        conn.peer = Some(source);
    }
    next.accepted(conn);
}

fn fail(conn: Connection, next: Box<dyn Next>, why: &'static str) {
    drop(conn);
    next.rejected(why);
}

/// Takes back the pending read, removing its handler and timer.
///
/// # Safety
/// `data` comes from `read` and is taken once.
unsafe fn take(data: *mut c_void) -> Box<Pending> {
    // SAFETY: see the contract.
    let pending = unsafe { Box::from_raw(data.cast::<Pending>()) };
    tcl::delete_file_handler(pending.conn.socket.as_raw_fd());
    if let Some(timer) = pending.timer {
        tcl::delete_timer(timer);
    }
    pending
}

unsafe extern "C" fn on_readable(data: *mut c_void, _mask: c_int) {
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // SAFETY: `data` is a live Pending (its handler is still set).
        let mode = unsafe { (*data.cast::<Pending>()).setting.mode };
        // SAFETY: as above.
        let outcome = attempt(unsafe { &(*data.cast::<Pending>()).conn }, mode);
        if matches!(outcome, Attempt::Wait) {
            return;
        }
        // SAFETY: taken once, here or in on_deadline (which cannot run
        // after the timer is deleted).
        let pending = unsafe { take(data) };
        match outcome {
            Attempt::Done(source) => finish_ok(pending.conn, source, pending.next),
            Attempt::Failed(why) => fail(pending.conn, pending.next, why),
            Attempt::Wait => unreachable!("handled above"),
        }
    }));
}

unsafe extern "C" fn on_deadline(data: *mut c_void) {
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // SAFETY: the timer fired, so the read is still pending; the timer
        // is spent, so `take` must not delete it.
        let mut pending = unsafe { Box::from_raw(data.cast::<Pending>()) };
        pending.timer = None;
        let pending = unsafe { take(Box::into_raw(pending).cast()) };
        fail(pending.conn, pending.next, "no header before the deadline");
    }));
}

/// Counts a rejected connection in `counters`.
pub fn count(counters: &crate::counters::Counters) {
    counters.proxy_errors.fetch_add(1, Ordering::Relaxed);
}
