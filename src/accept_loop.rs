//! The accepting threads of one port.
//!
//! They make system calls only and never touch an interpreter. Each
//! accepting thread blocks in `accept4` on one listener (where the
//! platform has no `accept4`, in `poll`, then `accept` and `fcntl` under
//! the fork guard: `sys::CLOEXEC_IS_ATOMIC`) and sends what it
//! gets into the hand-off queue: per connection `accept4`, `sendmsg` and
//! the `close` of our copy, as few as a blocking accept loop can make (no
//! `poll`, no `EAGAIN` round trip), and no formatting: the peer's address
//! travels in binary and the worker formats it. Several threads may accept
//! on the same listener (`server -threads N`); the kernel wakes one per
//! connection, and all feed the one queue, so FIFO order among idle workers
//! is the queue's and does not depend on which thread accepted.
//!
//! A separate thread re-queues connections that workers send back (a
//! registration cancelled while its connection was on the way): a rare
//! path, kept off the accepting threads.
//!
//! A queue bounded by `-maxqueue` (`queue_stats`) makes the threads, at
//! the bound, either pause before `accept4` (asleep on the queue's `room`
//! waker, which a worker rings when it takes a connection: no polling
//! loop) or accept and close at once, counted as rejected.
//!
//! A full queue blocks a sender (the kernel's backlog then holds new
//! connections); running out of descriptors makes a thread back off
//! instead of spinning. Stopping interrupts the threads blocked in
//! `accept4` with a signal (SIGURG, whose handler does nothing and does
//! not restart system calls): never with `shutdown()`, which would stop
//! the socket itself from listening, also for the other processes that
//! hold it (systemd, which keeps a copy to activate us again, or the next
//! generation of this server).

use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{setsockopt, sockopt, MsgFlags};
use nix::sys::time::TimeVal;

use crate::counters::Counters;
use crate::fork_safety;
use crate::handoff::{self, Connection, Received};
use crate::listener;
use crate::queue_stats::Overload;
use crate::sys::{self, Waker};

/// How long to pause when accept or send fails for lack of resources.
const BACKOFF: Duration = Duration::from_millis(50);
/// How long stopping signals the threads (a millisecond apart) before it
/// falls back to shutting the listeners down. Long enough for a thread
/// that a loaded machine has not run yet: a listener shared with another
/// holder (systemd, the next generation of an upgrade) stops listening
/// for that holder too once shut down.
const SIGNAL_FOR: Duration = Duration::from_secs(5);
/// Messages handed back and dropped in a row before the re-queueing thread
/// pauses (`BACKOFF`) before the next.
const DROPPED_BEFORE_PAUSE: u32 = 64;
/// How many times one connection may be handed back: a worker told to
/// leave while a connection was on its way hands that one back once; a
/// second time is a rarer coincidence still. More is a worker handing back
/// copies of one connection to fill the queue.
const GIVE_BACKS_PER_CONNECTION: u8 = 2;
/// Connections whose give-backs are remembered (the oldest forgotten first).
const GIVE_BACKS_REMEMBERED: usize = 4096;
/// How long a send into a full queue blocks before the sender looks
/// whether the port is being closed.
const SEND_TIMEOUT: Duration = Duration::from_millis(200);

/// Set while this process must not take connections off its listeners: a
/// next generation started by `pool upgrade` shares them with the running
/// one, and a connection it took before it can serve it would go down with
/// it if it failed. The threads wait (polling, a few times a second, for
/// the short while of a start) until it is cleared.
static HELD: AtomicBool = AtomicBool::new(false);
/// How often a held accepting thread looks again.
const HELD_POLL_MS: u16 = 20;
/// How long a paused thread sleeps before it looks at the queue again
/// without being rung (a ring drained by another paused thread, or no
/// waker at all: then more often).
const PAUSE_POLL_MS: u16 = 1000;
const PAUSE_POLL_NO_WAKER_MS: u16 = 10;

/// Holds every accepting thread of this process back until
/// `release_accepting`.
pub fn hold_accepting() {
    HELD.store(true, Ordering::SeqCst);
}

/// Whether the accepting threads are held (`hold_accepting`).
pub fn accepting_held() -> bool {
    HELD.load(Ordering::SeqCst)
}

/// Lets the accepting threads take connections.
pub fn release_accepting() {
    HELD.store(false, Ordering::SeqCst);
}

/// The accepting threads to start per listener when `server` is not told:
/// one thread takes well over 100k connections a second, so more are
/// worth it only on machines with many cores.
pub fn default_threads() -> usize {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    (cores / 8).clamp(1, 4)
}

/// What the threads of one port share.
struct Shared {
    listeners: Vec<OwnedFd>,
    accept_end: OwnedFd,
    counters: Arc<Counters>,
    stopping: AtomicBool,
    /// Wakes the re-queueing thread (and the accepting threads that poll).
    stop: Waker,
}

/// Running accept threads; stopping them closes the listeners and the
/// accept end.
pub struct AcceptLoop {
    shared: Arc<Shared>,
    /// The accepting threads (interrupted to stop) and the re-queueing one.
    threads: Vec<JoinHandle<()>>,
    /// Per thread of `threads`: set when it has returned.
    finished: Vec<Arc<AtomicBool>>,
    /// Descriptor numbers the threads own, so a forked child (which has
    /// copies of them but no threads) can close its copies.
    owned_fds: Vec<RawFd>,
    /// Per accepting thread, the connection it holds between taking it and
    /// handing it off (-1: none). A child forked meanwhile closes its copy,
    /// or the client would never see the connection close.
    in_hand: Vec<Arc<AtomicI32>>,
}

impl AcceptLoop {
    /// Starts `threads_per_listener` accepting threads on each listener,
    /// and the re-queueing thread.
    pub fn start(
        listeners: Vec<OwnedFd>,
        accept_end: OwnedFd,
        counters: Arc<Counters>,
        threads_per_listener: usize,
    ) -> std::io::Result<AcceptLoop> {
        // Blocking listeners: a thread sleeps in accept4 until a client
        // comes, and shutdown() wakes it. Without accept4, a thread polls
        // and then must not block in accept (under the fork guard).
        for listener in &listeners {
            if sys::CLOEXEC_IS_ATOMIC {
                sys::set_blocking(listener.as_fd())?;
            } else {
                sys::set_nonblocking(listener.as_fd())?;
            }
        }
        // A blocking accept end, with a send timeout so that a sender held
        // by a full queue still notices a stop.
        sys::set_blocking(accept_end.as_fd())?;
        setsockopt(
            &accept_end,
            sockopt::SendTimeout,
            &TimeVal::from(libc::timeval { tv_sec: 0, tv_usec: SEND_TIMEOUT.as_micros() as libc::suseconds_t }),
        )?;
        let stop = {
            let _no_fork = (!sys::CLOEXEC_IS_ATOMIC).then(fork_safety::hold_off_forks);
            Waker::new()?
        };
        let mut owned_fds: Vec<RawFd> = listeners.iter().map(|l| l.as_raw_fd()).collect();
        owned_fds.push(accept_end.as_raw_fd());
        owned_fds.extend(stop.raw_fds());
        let shared = Arc::new(Shared { listeners, accept_end, counters, stopping: AtomicBool::new(false), stop });
        sys::install_interrupt_handler();
        let mut accept_loop =
            AcceptLoop { shared, threads: Vec::new(), finished: Vec::new(), owned_fds, in_hand: Vec::new() };
        // On an error below, dropping `accept_loop` stops what started.
        let requeue_shared = Arc::clone(&accept_loop.shared);
        accept_loop.spawn("socketserver-back", move || requeue_returned(&requeue_shared))?;
        for index in 0..accept_loop.shared.listeners.len() {
            for _ in 0..threads_per_listener.max(1) {
                let in_hand = Arc::new(AtomicI32::new(-1));
                let accepter =
                    Accepter { shared: Arc::clone(&accept_loop.shared), index, in_hand: Arc::clone(&in_hand) };
                accept_loop.in_hand.push(in_hand);
                accept_loop.spawn("socketserver-acc", move || accepter.run())?;
            }
        }
        Ok(accept_loop)
    }

    fn spawn(&mut self, name: &str, body: impl FnOnce() + Send + 'static) -> std::io::Result<()> {
        let finished = Arc::new(AtomicBool::new(false));
        let done = Arc::clone(&finished);
        let thread =
            std::thread::Builder::new().name(name.into()).stack_size(crate::THREAD_STACK_SIZE).spawn(move || {
                body();
                done.store(true, Ordering::SeqCst);
            })?;
        self.threads.push(thread);
        self.finished.push(finished);
        Ok(())
    }

    /// The listening sockets' descriptor numbers.
    pub fn listener_fds(&self) -> Vec<RawFd> {
        self.shared.listeners.iter().map(|l| l.as_raw_fd()).collect()
    }

    /// How many threads accept (on all listeners together).
    pub fn threads(&self) -> usize {
        self.in_hand.len()
    }

    /// Stops accepting and waits for the threads; the listeners close (so
    /// the port can be bound again at once), and so does the accept end.
    pub fn stop(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        if self.threads.is_empty() {
            return;
        }
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.shared.stop.wake();
        // A thread that checked `stopping` just before it entered accept4
        // misses a first signal: send again until every thread has returned.
        let fallback_at = std::time::Instant::now() + SIGNAL_FOR;
        let mut shut_down = false;
        while !self.finished.iter().all(|f| f.load(Ordering::SeqCst)) {
            if !shut_down && std::time::Instant::now() >= fallback_at {
                shut_down = true;
                // A handler of the script's for SIGURG restarts accept4:
                // then only shutdown() wakes the threads, shared socket or not.
                for listener in &self.shared.listeners {
                    let _ = nix::sys::socket::shutdown(listener.as_raw_fd(), nix::sys::socket::Shutdown::Read);
                }
            }
            for (thread, finished) in self.threads.iter().zip(&self.finished) {
                if !finished.load(Ordering::SeqCst) {
                    // SAFETY: the thread has not returned, so its pthread_t
                    // is valid (it is joined only below).
                    unsafe { libc::pthread_kill(thread.as_pthread_t(), sys::INTERRUPT_SIGNAL) };
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }

    /// In a forked child: the threads do not exist here, only copies of
    /// their descriptors. Close those copies and forget the rest (never
    /// shut a listener down: the socket is the parent's too).
    pub fn abandon_after_fork(mut self) {
        for in_hand in &self.in_hand {
            let fd = in_hand.load(Ordering::Relaxed);
            if fd >= 0 {
                self.owned_fds.push(fd);
            }
        }
        for fd in self.owned_fds.drain(..) {
            // The owners live in the (absent) threads' memory too; close by
            // number and never drop them.
            let _ = nix::unistd::close(fd);
        }
        std::mem::forget(std::mem::take(&mut self.threads));
        self.finished.clear();
        std::mem::forget(self);
    }
}

impl Drop for AcceptLoop {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

impl Shared {
    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    /// Waits while accepting is held; false when stopping.
    fn wait_until_released(&self) -> bool {
        while HELD.load(Ordering::SeqCst) && !self.stopping() {
            let mut fds = [PollFd::new(self.stop.fd(), PollFlags::POLLIN)];
            let _ = poll(&mut fds, PollTimeout::from(HELD_POLL_MS));
        }
        !self.stopping()
    }

    /// Waits until `listener` has a client (or the port is being closed:
    /// `EINTR`).
    fn wait_for_client(&self, listener: &OwnedFd) -> Result<(), Errno> {
        let mut fds =
            [PollFd::new(listener.as_fd(), PollFlags::POLLIN), PollFd::new(self.stop.fd(), PollFlags::POLLIN)];
        poll(&mut fds, PollTimeout::NONE)?;
        if self.stopping() {
            return Err(Errno::EINTR);
        }
        Ok(())
    }

    /// Sleeps for the back-off interval, in slices short enough to notice a
    /// stop; false when stopping.
    fn pause(&self) -> bool {
        let mut fds = [PollFd::new(self.stop.fd(), PollFlags::POLLIN)];
        let millis = u16::try_from(BACKOFF.as_millis()).unwrap_or(u16::MAX);
        let _ = poll(&mut fds, PollTimeout::from(millis));
        !self.stopping()
    }

    /// At the queue's bound with `-overload pause`: waits until a worker
    /// takes a connection from the queue; false when stopping.
    fn wait_for_room(&self) -> bool {
        let queue = &self.counters.queue;
        let pausing = || self.at_bound() && queue.bound().1 == Overload::Pause && !self.stopping();
        if !pausing() {
            return !self.stopping();
        }
        // Marked paused before looking again: a worker that takes one after
        // our look rings the waker.
        queue.enter_pause();
        while pausing() {
            let mut fds = vec![PollFd::new(self.stop.fd(), PollFlags::POLLIN)];
            let timeout = match queue.room_fd() {
                Some(room) => {
                    fds.push(PollFd::new(room, PollFlags::POLLIN));
                    PAUSE_POLL_MS
                }
                None => PAUSE_POLL_NO_WAKER_MS,
            };
            let _ = poll(&mut fds, PollTimeout::from(timeout));
            queue.drain_room();
        }
        queue.leave_pause();
        !self.stopping()
    }

    /// Whether the queue is at its bound, the workers' count of what they
    /// took checked against the kernel's count of what is still unread (a
    /// worker that lies about its takes cannot keep the port paused).
    fn at_bound(&self) -> bool {
        let queue = &self.counters.queue;
        if !queue.full() {
            return false;
        }
        queue.resync_if_empty(sys::unsent_bytes(self.accept_end.as_fd()));
        queue.full()
    }

    /// Queues one connection (counted there) within the bound: at the
    /// bound, closes it (`-overload close`, counted) or waits for room
    /// (`pause`). The check and the count are one step (`reserve`), so
    /// that threads woken together never pass the bound. A stop while it
    /// waits still queues it: what was accepted is served (the workers
    /// drain the queue).
    fn queue_within_bound(&self, conn: &Connection) {
        let queue = &self.counters.queue;
        loop {
            if queue.reserve() {
                break;
            }
            if !self.at_bound() {
                continue;
            }
            if queue.bound().1 == Overload::Close {
                queue.count_rejected();
                return;
            }
            if !self.wait_for_room() {
                queue.count_queued();
                break;
            }
        }
        if !self.send_uncounted(conn) {
            queue.unqueued();
        }
    }

    /// Sends one connection into the queue (counted there), waiting while
    /// it is full, whatever the bound; false when the port was closed
    /// first (the connection is dropped).
    fn send(&self, conn: &Connection) -> bool {
        self.counters.queue.count_queued();
        let sent = self.send_uncounted(conn);
        if !sent {
            self.counters.queue.unqueued();
        }
        sent
    }

    fn send_uncounted(&self, conn: &Connection) -> bool {
        loop {
            match handoff::send_connection(self.accept_end.as_fd(), conn, MsgFlags::empty()) {
                Ok(()) => return true,
                // The send timeout (the queue stayed full), or the stop's
                // signal.
                Err(Errno::EAGAIN | Errno::EINTR) => {
                    if self.stopping() {
                        return false;
                    }
                }
                // ETOOMANYREFS (too many descriptors in flight) or ENOBUFS:
                // wait for workers to drain the queue.
                Err(Errno::ETOOMANYREFS | Errno::ENOBUFS | Errno::ENOMEM) => {
                    if !self.pause() {
                        return false;
                    }
                }
                // No worker end is left anywhere: nobody can take it.
                Err(_) => return false,
            }
        }
    }
}

/// One accepting thread: blocks in accept4 on one listener.
struct Accepter {
    shared: Arc<Shared>,
    index: usize,
    in_hand: Arc<AtomicI32>,
}

impl Accepter {
    fn run(&self) {
        let listener = &self.shared.listeners[self.index];
        if !self.shared.wait_until_released() {
            return;
        }
        loop {
            if !self.shared.wait_for_room() {
                return;
            }
            match self.take(listener) {
                Ok(conn) => {
                    self.shared.counters.accepted.fetch_add(1, Ordering::Relaxed);
                    // Other threads may have filled the queue while this one
                    // waited in accept4: it holds the connection until there
                    // is room, so that the queue never passes its bound.
                    self.shared.queue_within_bound(&conn);
                    self.release(conn);
                }
                _ if self.shared.stopping() => return,
                // The peer gave up before we took it: nothing to hand off.
                Err(Errno::ECONNABORTED | Errno::EINTR | Errno::EPROTO | Errno::EAGAIN) => {}
                // Out of descriptors or memory: wait, the connection stays
                // in the kernel's backlog until we can take it.
                Err(_) => {
                    if !self.shared.pause() {
                        return;
                    }
                }
            }
        }
    }

    /// Takes the next connection off `listener` and records it in `in_hand`.
    fn take(&self, listener: &OwnedFd) -> Result<Connection, Errno> {
        if sys::CLOEXEC_IS_ATOMIC {
            // Not under `hold_off_forks`: a fork must not wait for a client.
            // A child forked between the accept and `hold` has a copy that
            // nothing here records; a pool's worker closes such copies by
            // their address (`listener::close_copied_connections`).
            return accept_connection(listener).inspect(|conn| self.hold(conn));
        }
        // The descriptor is made close-on-exec after accept returns, so the
        // accept is under the fork guard; a fork must not wait for a client,
        // so the thread waits for one first and then accepts without
        // blocking (EAGAIN if another thread or process was quicker).
        self.shared.wait_for_client(listener)?;
        let _no_fork = fork_safety::hold_off_forks();
        let conn = accept_connection(listener)?;
        self.in_hand.store(conn.socket.as_raw_fd(), Ordering::Relaxed);
        Ok(conn)
    }

    /// Records the connection the thread now holds (see `in_hand`).
    fn hold(&self, conn: &Connection) {
        let _no_fork = fork_safety::hold_off_forks();
        self.in_hand.store(conn.socket.as_raw_fd(), Ordering::Relaxed);
    }

    /// Closes our copy of a connection that the queue holds now (or that
    /// nobody can take), with no fork between the close and forgetting it.
    fn release(&self, conn: Connection) {
        let _no_fork = fork_safety::hold_off_forks();
        drop(conn);
        self.in_hand.store(-1, Ordering::Relaxed);
    }
}

/// The re-queueing thread: takes the connections workers send back and
/// queues them again, until the port is closed. What a worker sends is a
/// claim, checked before anything is queued: only a TCP connection whose
/// own end is one of this port's listeners' addresses (which nothing but
/// an accept on them can give) goes back into the queue, with the peer
/// read from the socket itself, never from the message. Anything else (a
/// socket of another kind, a malformed or empty message) is closed and
/// dropped, and the thread carries on; it ends with the port, or when
/// every worker end is closed (the socket's hang-up, not an empty
/// message, says so).
fn requeue_returned(shared: &Shared) {
    let mut fds =
        [PollFd::new(shared.accept_end.as_fd(), PollFlags::POLLIN), PollFd::new(shared.stop.fd(), PollFlags::POLLIN)];
    // Messages in a row that were dropped: past a few, the thread takes a
    // breath between them, so that a worker sending nothing but garbage
    // costs a little CPU, never a spinning thread.
    let mut dropped = 0u32;
    let mut given_back = GiveBacks::default();
    loop {
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(_) => {
                if !shared.pause() {
                    return;
                }
            }
        }
        if shared.stopping() {
            return;
        }
        if dropped > DROPPED_BEFORE_PAUSE {
            dropped = 0;
            if !shared.pause() {
                return;
            }
        }
        let events = fds[0].revents().unwrap_or(PollFlags::empty());
        if !events.intersects(PollFlags::POLLIN | PollFlags::POLLHUP) {
            continue;
        }
        // While it is being handed back, a returned connection is not in
        // any thread's `in_hand`: a fork at that instant is rare enough,
        // and the copy closes when that child exits.
        match handoff::receive_connection(shared.accept_end.as_fd(), MsgFlags::MSG_DONTWAIT) {
            Ok(Received::Connection(conn)) => match returned_connection(shared, conn).filter(|c| given_back.allow(c)) {
                Some(conn) => {
                    dropped = 0;
                    shared.send(&conn);
                }
                None => dropped += 1,
            },
            Ok(Received::Empty) => {}
            // Every worker end is closed: nothing more can come back. An
            // empty message without the hang-up is dropped.
            Ok(Received::Closed) if events.contains(PollFlags::POLLHUP) || !events.contains(PollFlags::POLLIN) => {
                return
            }
            Ok(Received::Closed) => dropped += 1,
            // A malformed message: its descriptors are closed already.
            Err(handoff::ReceiveError::Malformed) => dropped += 1,
            Err(_) => {
                if !shared.pause() {
                    return;
                }
            }
        }
    }
}

/// How often each connection was handed back, by the socket's identity
/// (device and inode: every descriptor of one connection, copies sent
/// several times included, names the same). The re-queueing thread's own.
#[derive(Default)]
struct GiveBacks {
    counts: std::collections::HashMap<(u64, u64), u8>,
    order: std::collections::VecDeque<(u64, u64)>,
}

impl GiveBacks {
    /// Whether `conn` may be queued again (and counts it): a connection
    /// handed back more than `GIVE_BACKS_PER_CONNECTION` times is a
    /// worker's copies of one connection, each of which would take a place
    /// in the queue (past `-maxqueue`: the re-queue does not wait for the
    /// bound) and a worker's turn. A system that gives sockets no inode
    /// (0) is not limited.
    #[allow(clippy::unnecessary_cast)]
    fn allow(&mut self, conn: &Connection) -> bool {
        let Ok(st) = nix::sys::stat::fstat(conn.socket.as_raw_fd()) else { return false };
        if st.st_ino == 0 {
            return true;
        }
        let identity = (st.st_dev as u64, st.st_ino as u64);
        let count = self.counts.entry(identity).or_insert(0);
        if *count >= GIVE_BACKS_PER_CONNECTION {
            return false;
        }
        *count += 1;
        if *count == 1 {
            self.order.push_back(identity);
            if self.order.len() > GIVE_BACKS_REMEMBERED {
                if let Some(oldest) = self.order.pop_front() {
                    self.counts.remove(&oldest);
                }
            }
        }
        true
    }
}

/// A connection a worker handed back, if it is one this port accepted: a
/// TCP stream socket, connected, whose local address is a listener's own
/// (or, for a listener on every address, of its family and port). Its
/// peer is read from the socket; its accept time is not believed beyond
/// now.
fn returned_connection(shared: &Shared, conn: Connection) -> Option<Connection> {
    use nix::sys::socket::{getpeername, getsockname, getsockopt, SockType, SockaddrLike, SockaddrStorage};
    let fd = conn.socket.as_raw_fd();
    if getsockopt(&conn.socket, sockopt::SockType).ok()? != SockType::Stream {
        return None;
    }
    let local = getsockname::<SockaddrStorage>(fd).ok()?;
    let local_address = listener::to_socket_addr(&local)?;
    let ours = shared.listeners.iter().any(|l| {
        let Ok(bound) = getsockname::<SockaddrStorage>(l.as_raw_fd()) else { return false };
        let Some(bound_address) = listener::to_socket_addr(&bound) else { return false };
        bound.family() == local.family()
            && bound_address.port() == local_address.port()
            && (bound_address.ip().is_unspecified() || bound_address.ip() == local_address.ip())
    });
    if !ours {
        return None;
    }
    let peer = listener::to_socket_addr(&getpeername::<SockaddrStorage>(fd).ok()?)?;
    let now = crate::queue_stats::monotonic_ns();
    Some(Connection { peer: Some(peer), accepted_at: conn.accepted_at.min(now), ..conn })
}

/// A connection off `listener`, close-on-exec, the peer's address kept in
/// binary.
fn accept_connection(listener: &OwnedFd) -> Result<Connection, Errno> {
    let (socket, address) = sys::accept_cloexec(listener.as_fd())?;
    let peer = address.as_ref().and_then(listener::to_socket_addr);
    Ok(Connection::accepted_now(socket, peer))
}
