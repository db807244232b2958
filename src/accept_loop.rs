//! The accepting thread of one port.
//!
//! It does system calls only and never touches an interpreter: it accepts
//! on the port's listeners, sends each connection into the hand-off queue,
//! and re-queues connections that workers send back. A full queue blocks
//! it (the kernel's backlog then holds new connections); running out of
//! descriptors makes it back off instead of spinning.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::socket::{MsgFlags, SockaddrLike, SockaddrStorage};

use crate::fork_safety;
use crate::handoff::{self, Connection, Received};
use crate::port_table::Counters;
use crate::listener;

/// How long to pause when accept or send fails for lack of resources.
const BACKOFF: Duration = Duration::from_millis(50);

/// A running accept loop; stopping it closes the listeners and the accept end.
pub struct AcceptLoop {
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
    /// Descriptor numbers the thread owns, so a forked child (which has
    /// copies of them but no thread) can close its copies.
    owned_fds: Vec<RawFd>,
    /// The connection the thread holds between taking it and handing it
    /// off (-1: none). A child forked meanwhile closes its copy, or the
    /// client would never see the connection close.
    in_hand: Arc<AtomicI32>,
}

impl AcceptLoop {
    pub fn start(
        listeners: Vec<OwnedFd>,
        accept_end: OwnedFd,
        counters: Arc<Counters>,
    ) -> std::io::Result<AcceptLoop> {
        let stop = Arc::new(EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?);
        // The accept end is used by this thread only: non-blocking lets a
        // full queue be waited on together with the stop signal.
        nix::fcntl::fcntl(
            accept_end.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )?;
        let mut owned_fds: Vec<RawFd> = listeners.iter().map(|l| l.as_raw_fd()).collect();
        owned_fds.push(accept_end.as_raw_fd());
        owned_fds.push(stop.as_fd().as_raw_fd());
        let thread_stop = Arc::clone(&stop);
        let in_hand = Arc::new(AtomicI32::new(-1));
        let thread_in_hand = Arc::clone(&in_hand);
        let thread = std::thread::Builder::new()
            .name("socketserver-accept".into())
            .stack_size(crate::THREAD_STACK_SIZE)
            .spawn(move || {
                LoopState { listeners, accept_end, stop: thread_stop, counters, in_hand: thread_in_hand }.run();
            })?;
        Ok(AcceptLoop { stop, thread: Some(thread), owned_fds, in_hand })
    }

    /// Stops accepting and waits for the thread, which closes the listeners
    /// (so the port can be bound again at once) and the accept end.
    pub fn stop(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = self.stop.write(1);
            let _ = thread.join();
        }
    }

    /// In a forked child: the thread does not exist here, only copies of its
    /// descriptors. Close those copies and forget the rest.
    pub fn abandon_after_fork(mut self) {
        let in_hand = self.in_hand.load(Ordering::Relaxed);
        if in_hand >= 0 {
            self.owned_fds.push(in_hand);
        }
        for fd in self.owned_fds.drain(..) {
            // Another Arc holder of `stop` lives in the (absent) thread's
            // memory; close by number and never drop the owners.
            let _ = nix::unistd::close(fd);
        }
        std::mem::forget(self.thread.take());
        std::mem::forget(self);
    }
}

impl Drop for AcceptLoop {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

struct LoopState {
    listeners: Vec<OwnedFd>,
    accept_end: OwnedFd,
    stop: Arc<EventFd>,
    counters: Arc<Counters>,
    in_hand: Arc<AtomicI32>,
}

impl LoopState {
    fn run(&self) {
        // Listeners first, then the accept end (returned connections), then stop.
        let mut fds: Vec<PollFd> = self
            .listeners
            .iter()
            .map(|l| PollFd::new(l.as_fd(), PollFlags::POLLIN))
            .collect();
        fds.push(PollFd::new(self.accept_end.as_fd(), PollFlags::POLLIN));
        fds.push(PollFd::new(self.stop.as_fd(), PollFlags::POLLIN));
        let readable = |fd: &PollFd| fd.any().unwrap_or(false);
        loop {
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => {}
                Err(Errno::EINTR) => continue,
                Err(_) => {
                    std::thread::sleep(BACKOFF);
                    continue;
                }
            }
            let (stop, rest) = fds.split_last().expect("stop is polled");
            let (returns, listeners) = rest.split_last().expect("the accept end is polled");
            if readable(stop) {
                return;
            }
            for (index, _) in listeners.iter().enumerate().filter(|(_, fd)| readable(fd)) {
                if !self.accept_all(index) {
                    return;
                }
            }
            if readable(returns) && !self.requeue_returned() {
                return;
            }
        }
    }

    /// Accepts every pending connection on one listener; false when stopping.
    fn accept_all(&self, index: usize) -> bool {
        loop {
            let taken = {
                // No fork between taking the descriptor and publishing it.
                let _no_fork = fork_safety::hold_off_forks();
                accept_connection(&self.listeners[index]).inspect(|conn| self.hold(conn))
            };
            match taken {
                Ok(conn) => {
                    self.counters.accepted.fetch_add(1, Ordering::Relaxed);
                    if !self.enqueue(conn) {
                        return false;
                    }
                }
                Err(Errno::EAGAIN) => return true,
                // The peer gave up before we took it: nothing to hand off.
                Err(Errno::ECONNABORTED | Errno::EINTR | Errno::EPROTO) => continue,
                // Out of descriptors or memory: wait, the connection stays
                // in the kernel's backlog until we can take it.
                Err(_) => return self.pause(),
            }
        }
    }

    /// Records the connection the thread now holds (see `in_hand`).
    fn hold(&self, conn: &Connection) {
        self.in_hand.store(conn.socket.as_raw_fd(), Ordering::Relaxed);
    }

    /// Closes our copy of a connection that the queue holds now (or that
    /// nobody can take), with no fork between the close and forgetting it.
    fn release(&self, conn: Connection) {
        let _no_fork = fork_safety::hold_off_forks();
        drop(conn);
        self.in_hand.store(-1, Ordering::Relaxed);
    }

    /// Sends one connection into the queue, waiting while it is full;
    /// false when stopping.
    fn enqueue(&self, conn: Connection) -> bool {
        let sent = self.send_waiting(&conn);
        self.release(conn);
        sent
    }

    fn send_waiting(&self, conn: &Connection) -> bool {
        loop {
            match handoff::send_connection(self.accept_end.as_fd(), conn, MsgFlags::empty()) {
                Ok(()) => return true,
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => {
                    if !self.wait_writable() {
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
                Err(_) => return true,
            }
        }
    }

    /// Re-queues the connections workers sent back; false when stopping.
    fn requeue_returned(&self) -> bool {
        loop {
            let received = {
                let _no_fork = fork_safety::hold_off_forks();
                let received = handoff::receive_connection(self.accept_end.as_fd(), MsgFlags::MSG_DONTWAIT);
                if let Ok(Received::Connection(conn)) = &received {
                    self.hold(conn);
                }
                received
            };
            match received {
                Ok(Received::Connection(conn)) => {
                    if !self.enqueue(conn) {
                        return false;
                    }
                }
                Ok(Received::Empty | Received::Closed) => return true,
                Err(handoff::ReceiveError::DescriptorLost) => {
                    if !self.pause() {
                        return false;
                    }
                }
                Err(_) => return true,
            }
        }
    }

    fn wait_writable(&self) -> bool {
        let mut fds = [
            PollFd::new(self.accept_end.as_fd(), PollFlags::POLLOUT),
            PollFd::new(self.stop.as_fd(), PollFlags::POLLIN),
        ];
        let _ = poll(&mut fds, PollTimeout::from(1000u16));
        !fds[1].any().unwrap_or(false)
    }

    /// Sleeps for the back-off interval unless stop is asked; false when stopping.
    fn pause(&self) -> bool {
        let mut fds = [PollFd::new(self.stop.as_fd(), PollFlags::POLLIN)];
        let millis = u16::try_from(BACKOFF.as_millis()).unwrap_or(u16::MAX);
        let _ = poll(&mut fds, PollTimeout::from(millis));
        !fds[0].any().unwrap_or(false)
    }
}

/// `accept4` with close-on-exec, wrapping the descriptor before anything
/// else can fail, and recording the peer as Tcl would print it.
fn accept_connection(listener: &OwnedFd) -> Result<Connection, Errno> {
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut length = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: storage and length describe a writable sockaddr_storage.
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            (&mut storage as *mut libc::sockaddr_storage).cast(),
            &mut length,
            libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(Errno::last());
    }
    // SAFETY: accept4 returned a new descriptor that nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: the kernel filled `length` bytes of a sockaddr_storage.
    let address = unsafe {
        SockaddrStorage::from_raw((&storage as *const libc::sockaddr_storage).cast(), Some(length))
    };
    let peer = address
        .as_ref()
        .and_then(listener::to_socket_addr)
        .map(|a| format!("{} {}", listener::host_string(a.ip()), a.port()))
        .unwrap_or_else(|| "0.0.0.0 0".into());
    Ok(Connection { socket, peer })
}
