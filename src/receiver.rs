//! Waiting for a connection without waking every idle worker.
//!
//! A Tcl file handler on the shared worker end would be `poll()`ed by every
//! worker, and the kernel wakes every poller for every message: the herd
//! that made socketservertcl 1.1.3 slower with more workers. Instead, each
//! registration has a `Receiver`: a thread that waits on the worker end
//! only while a registration is pending (armed), in a way that the kernel
//! wakes one armed receiver per message, the one that has waited longest
//! (FIFO): `sys::QueueWaiter` (Linux: `EPOLLEXCLUSIVE`; elsewhere a waiting
//! turn). The receiver takes one message, disarms, and hands the connection
//! to its interpreter's thread as a Tcl event. A worker with nothing
//! pending does not wait at all, so it can never take a connection it
//! would not serve.
//!
//! For a pool's workers (not for the low-level `client`, whose handlers
//! see every connection, as socketservertcl 1.1.3's did), right after
//! taking a connection the receiver looks whether its client
//! is still there (`MSG_PEEK`, without waiting: end of file means the
//! client closed, or half-closed, without sending a byte while it was
//! queued). Such a connection is closed, counted as abandoned, and the
//! receiver takes the next one, still armed: no handler runs and the
//! interpreter is not woken for it. A live connection costs that one
//! non-blocking system call and no wakeup; nothing of its data is read.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::MsgFlags;

use crate::fork_safety;
use crate::handoff::{self, Connection, ReceiveError, Received};
use crate::queue_stats::{monotonic_ns, QueueStats};
use crate::sys::{self, QueueWaiter, Woke};

/// What a receiver hands to its interpreter.
#[derive(Debug)]
pub enum Outcome {
    Connection(Connection),
    /// The queue is closed and drained: the accepting process closed the
    /// port or exited. The registration is over.
    QueueClosed,
    /// Something went wrong; `ended` means the registration is over (the
    /// queue is closed), otherwise it stays pending.
    Failed {
        error: ReceiveError,
        ended: bool,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Idle,
    Armed,
    /// Held by another thread (`Gate`): takes nothing until released;
    /// `wanted` is whether it is to be armed then.
    Held {
        wanted: bool,
    },
    Quit,
}

struct Shared {
    queue: Arc<OwnedFd>,
    stats: Arc<QueueStats>,
    /// Close connections whose client left while queued (see above).
    drop_abandoned: bool,
    waiter: QueueWaiter,
    mode: Mutex<Mode>,
}

impl Shared {
    fn mode(&self) -> MutexGuard<'_, Mode> {
        self.mode.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn armed(&self) -> bool {
        *self.mode() == Mode::Armed
    }

    /// Leaves the wait queue of an armed receiver (under its lock).
    fn leave_wait_queue(&self) {
        if self.waiter.leave(self.queue.as_fd()) {
            pass_on_wakeup(&self.queue, &self.stats);
        }
    }

    /// Takes the next connection without waiting, stamped and counted; a
    /// connection whose client has left is closed and the next one taken.
    fn take(&self) -> Result<Received, ReceiveError> {
        loop {
            let received = handoff::receive_connection(self.queue.as_fd(), MsgFlags::MSG_DONTWAIT)?;
            let Received::Connection(mut conn) = received else { return Ok(received) };
            self.stats.count_taken();
            if self.drop_abandoned && client_left(&conn) {
                self.stats.count_abandoned();
                continue;
            }
            conn.taken_at = monotonic_ns();
            return Ok(Received::Connection(conn));
        }
    }
}

/// Whether the client closed the connection (or its sending side) without
/// sending anything: end of file, or a reset, before any byte. Data waiting
/// (a request, a PROXY header, a TLS hello), or nothing yet, is a live client.
fn client_left(conn: &Connection) -> bool {
    let mut byte = [0u8; 1];
    let flags = MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT;
    matches!(
        nix::sys::socket::recv(std::os::fd::AsRawFd::as_raw_fd(&conn.socket), &mut byte, flags),
        Ok(0) | Err(Errno::ECONNRESET)
    )
}

pub struct Receiver {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Receiver {
    /// Starts the waiting thread (idle). `deliver` runs on that thread.
    pub fn spawn(
        queue: Arc<OwnedFd>,
        stats: Arc<QueueStats>,
        drop_abandoned: bool,
        deliver: impl Fn(Outcome) + Send + 'static,
    ) -> std::io::Result<Receiver> {
        let waiter = {
            let _no_fork = (!sys::CLOEXEC_IS_ATOMIC).then(fork_safety::hold_off_forks);
            QueueWaiter::new(handoff::turn_of(&queue))?
        };
        let shared = Arc::new(Shared { queue, stats, drop_abandoned, waiter, mode: Mutex::new(Mode::Idle) });
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("socketserver-recv".into())
            .stack_size(crate::THREAD_STACK_SIZE)
            .spawn(move || wait_loop(&thread_shared, deliver))?;
        Ok(Receiver { shared, thread: Some(thread) })
    }

    /// Joins the wait queue: the next connection may come to us. A
    /// connection already waiting is taken at once instead (returned), which
    /// spares a busy server two thread wakeups per connection; the caller
    /// then hands it over as if the receiver had delivered it.
    pub fn arm(&self) -> Result<Option<Outcome>, Errno> {
        let mut mode = self.shared.mode();
        if let Mode::Held { .. } = *mode {
            // Armed when the gate opens again.
            *mode = Mode::Held { wanted: true };
            return Ok(None);
        }
        if *mode != Mode::Idle {
            return Ok(None);
        }
        if hold_wanted() {
            *mode = Mode::Held { wanted: true };
            return Ok(None);
        }
        let taken = match self.shared.take() {
            Ok(Received::Connection(conn)) => return Ok(Some(Outcome::Connection(conn))),
            // The queue closed: arm anyway, the receiver reports it.
            Ok(Received::Empty | Received::Closed) => None,
            Err(ReceiveError::DescriptorLost) => {
                Some(Outcome::Failed { error: ReceiveError::DescriptorLost, ended: false })
            }
            Err(error) => return Ok(Some(Outcome::Failed { error, ended: true })),
        };
        self.shared.waiter.join(self.shared.queue.as_fd())?;
        *mode = Mode::Armed;
        Ok(taken)
    }

    /// Leaves the wait queue; after this returns no connection is taken.
    pub fn disarm(&self) {
        let mut mode = self.shared.mode();
        match *mode {
            Mode::Armed => {
                self.shared.leave_wait_queue();
                *mode = Mode::Idle;
            }
            Mode::Held { .. } => *mode = Mode::Held { wanted: false },
            Mode::Idle | Mode::Quit => {}
        }
    }

    /// A handle by which another thread can stop this receiver taking
    /// connections, and let it take them again.
    pub fn gate(&self) -> Gate {
        Gate(Arc::clone(&self.shared))
    }

    /// In a forked child: the thread does not exist here. Close our copies
    /// of its descriptors by number and forget the rest.
    pub fn abandon_after_fork(mut self) {
        for fd in self.shared.waiter.raw_fds() {
            let _ = nix::unistd::close(fd);
        }
        std::mem::forget(self.thread.take());
        std::mem::forget(self);
    }
}

/// Asked before every connection a receiver of this process takes: true
/// holds the receiver, as `Gate::hold` does, until another thread releases
/// it. Set once, by a pool's worker: a hold that the supervisor asked for
/// in memory it shares with the worker then takes effect at once, not
/// when the worker's control thread gets to run.
static HOLD_WHEN: OnceLock<fn() -> bool> = OnceLock::new();

/// Makes `check` the process's `HOLD_WHEN`.
pub fn hold_when(check: fn() -> bool) {
    let _ = HOLD_WHEN.set(check);
}

fn hold_wanted() -> bool {
    HOLD_WHEN.get().is_some_and(|check| check())
}

/// A receiver as another thread holds it (a pool's worker's control
/// thread, while the supervisor decides whether the worker is hung: a
/// connection taken then would be killed with it). Holding takes effect at
/// once, under the receiver's own lock: after `hold` returns no connection
/// is taken, whatever the interpreter's thread is doing (it may be stuck in
/// a handler, and is not waited for). A registration made or cancelled
/// meanwhile is remembered and applied at `release`.
#[derive(Clone)]
pub struct Gate(Arc<Shared>);

impl Gate {
    pub fn hold(&self) {
        let mut mode = self.0.mode();
        match *mode {
            Mode::Armed => {
                self.0.leave_wait_queue();
                *mode = Mode::Held { wanted: true };
            }
            Mode::Idle => *mode = Mode::Held { wanted: false },
            Mode::Held { .. } | Mode::Quit => {}
        }
    }

    /// Takes connections again if a registration is pending: joining the
    /// wait queue wakes the receiver's thread for a connection already
    /// waiting, as `arm` does. (Joining fails only when the kernel has no
    /// memory for the wait-queue entry; the registration then stays
    /// pending unarmed, and its interpreter takes no more connections.)
    pub fn release(&self) {
        let mut mode = self.0.mode();
        let Mode::Held { wanted } = *mode else { return };
        *mode = Mode::Idle;
        if wanted && self.0.waiter.join(self.0.queue.as_fd()).is_ok() {
            *mode = Mode::Armed;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.disarm();
        *self.shared.mode() = Mode::Quit;
        self.shared.waiter.wake();
        if let Some(thread) = self.thread.take() {
            if self.shared.waiter.interrupt(&thread) {
                let _ = thread.join();
            }
        }
    }
}

/// After leaving the wait queue, a wakeup meant for us may have been spent
/// on us without our taking the message. If a message is waiting, take it
/// and send it back to the accepting thread, whose re-send wakes the next
/// idle worker. (When the accept end is gone, the queue reports hang-up to
/// every waiter, so no wakeup can be lost and we leave it be.)
fn pass_on_wakeup(queue: &OwnedFd, stats: &QueueStats) {
    let mut fds = [PollFd::new(queue.as_fd(), PollFlags::POLLIN)];
    if poll(&mut fds, PollTimeout::ZERO).is_err() {
        return;
    }
    let revents = fds[0].revents().unwrap_or(PollFlags::empty());
    if !revents.contains(PollFlags::POLLIN) || revents.contains(PollFlags::POLLHUP) {
        return;
    }
    if let Ok(Received::Connection(conn)) = handoff::receive_connection(queue.as_fd(), MsgFlags::MSG_DONTWAIT) {
        stats.count_taken();
        give_back(queue, conn);
    }
}

/// Returns a connection to the accepting thread for another worker.
pub fn give_back(queue: &OwnedFd, conn: Connection) {
    // On failure the connection closes: the accepting process is gone, or
    // the way back stayed full (`handoff::send_back`).
    let _ = handoff::send_back(queue.as_fd(), &conn, handoff::GIVE_BACK_WAIT);
}

fn wait_loop(shared: &Shared, deliver: impl Fn(Outcome)) {
    let armed = || shared.armed();
    loop {
        match shared.waiter.wait(shared.queue.as_fd(), &armed) {
            Woke::Failed => break,
            Woke::Wakeup => {
                if *shared.mode() == Mode::Quit {
                    break;
                }
                continue;
            }
            Woke::Queue => {}
        }
        let outcome = {
            let mut mode = shared.mode();
            if *mode != Mode::Armed {
                continue;
            }
            if hold_wanted() {
                // Held before the thread that holds it got to it: the
                // wakeup goes on to another receiver.
                shared.leave_wait_queue();
                *mode = Mode::Held { wanted: true };
                continue;
            }
            match shared.take() {
                // Another worker was quicker (or the client left); keep waiting.
                Ok(Received::Empty) => continue,
                Ok(Received::Connection(conn)) => {
                    shared.waiter.taken(shared.queue.as_fd());
                    *mode = Mode::Idle;
                    Outcome::Connection(conn)
                }
                Ok(Received::Closed) => {
                    shared.waiter.taken(shared.queue.as_fd());
                    *mode = Mode::Idle;
                    Outcome::QueueClosed
                }
                Err(ReceiveError::DescriptorLost) => {
                    Outcome::Failed { error: ReceiveError::DescriptorLost, ended: false }
                }
                Err(error) => {
                    shared.waiter.taken(shared.queue.as_fd());
                    *mode = Mode::Idle;
                    Outcome::Failed { error, ended: true }
                }
            }
        };
        deliver(outcome);
    }
    shared.waiter.release();
}
