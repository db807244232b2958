//! Waiting on Linux: each waiting thread has its own epoll instance, in
//! which the queue is added with `EPOLLEXCLUSIVE` only while it waits. The
//! kernel wakes one such waiter per message, the one that joined first.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::sync::Arc;
use std::thread::JoinHandle;

use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};

/// Wakes a thread that waits on its descriptor (an eventfd).
pub struct Waker(EventFd);

impl Waker {
    pub fn new() -> std::io::Result<Waker> {
        Ok(Waker(EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?))
    }

    pub fn wake(&self) {
        let _ = self.0.write(1);
    }

    /// Consumes the wakeups so far.
    pub fn drain(&self) {
        let _ = self.0.read();
    }

    /// The descriptor to poll for readability.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }

    /// Its descriptor numbers, for a forked child to close its copies.
    pub fn raw_fds(&self) -> Vec<RawFd> {
        vec![self.0.as_fd().as_raw_fd()]
    }
}

/// Nothing to serialise here: the kernel's exclusive wakeup does it.
pub struct Turn(());

impl Turn {
    /// Whether queues need a waiting turn on this platform.
    pub const NEEDED: bool = false;

    pub fn new() -> std::io::Result<Turn> {
        Ok(Turn(()))
    }

    pub fn raw_fd(&self) -> Option<RawFd> {
        None
    }

    /// In a forked child.
    pub fn renew_after_fork(&self) {}
}

/// What ended a wait.
#[derive(Debug, PartialEq, Eq)]
pub enum Woke {
    /// The queue has something (a message, or its close).
    Queue,
    /// `wake` was called (or a signal came): look at the state again.
    Wakeup,
    /// The wait itself failed: the waiting thread should end.
    Failed,
}

const QUEUE_TOKEN: u64 = 1;
const WAKE_TOKEN: u64 = 2;

/// One waiting thread's means of waiting on a queue.
pub struct QueueWaiter {
    epoll: Epoll,
    waker: Waker,
}

impl QueueWaiter {
    pub fn new(_turn: Option<Arc<Turn>>) -> std::io::Result<QueueWaiter> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        let waker = Waker::new()?;
        epoll.add(waker.fd(), EpollEvent::new(EpollFlags::EPOLLIN, WAKE_TOKEN))?;
        Ok(QueueWaiter { epoll, waker })
    }

    /// Joins the queue's wait queue (at its end: FIFO).
    pub fn join(&self, queue: BorrowedFd<'_>) -> Result<(), Errno> {
        let flags = EpollFlags::EPOLLIN | EpollFlags::EPOLLEXCLUSIVE;
        self.epoll.add(queue, EpollEvent::new(flags, QUEUE_TOKEN))
    }

    /// Leaves the wait queue. True: a wakeup meant for this waiter may have
    /// been spent on it, and the caller must pass it on.
    pub fn leave(&self, queue: BorrowedFd<'_>) -> bool {
        let _ = self.epoll.delete(queue);
        true
    }

    /// Leaves the wait queue after taking a message (or the close).
    pub fn taken(&self, queue: BorrowedFd<'_>) {
        let _ = self.epoll.delete(queue);
    }

    /// Blocks until the queue has something for this waiter, or `wake`.
    pub fn wait(&self, _queue: BorrowedFd<'_>, _armed: &dyn Fn() -> bool) -> Woke {
        let mut events = [EpollEvent::empty(); 2];
        let count = match self.epoll.wait(&mut events, EpollTimeout::NONE) {
            Ok(count) => count,
            Err(Errno::EINTR) => return Woke::Wakeup,
            Err(_) => return Woke::Failed,
        };
        let mut woke = Woke::Wakeup;
        for event in &events[..count] {
            if event.data() == WAKE_TOKEN {
                self.waker.drain();
            } else {
                woke = Woke::Queue;
            }
        }
        woke
    }

    /// Ends the current or next `wait` (from any thread).
    pub fn wake(&self) {
        self.waker.wake();
    }

    /// Gives up whatever the waiting thread holds, before it ends.
    pub fn release(&self) {}

    /// Before joining the waiting thread, after `wake`: true, the thread
    /// returns (`wake` reaches it wherever it waits).
    pub fn interrupt(&self, _thread: &JoinHandle<()>) -> bool {
        true
    }

    /// Its descriptor numbers, for a forked child to close its copies.
    pub fn raw_fds(&self) -> Vec<RawFd> {
        let mut fds = self.waker.raw_fds();
        fds.push(self.epoll.0.as_raw_fd());
        fds
    }
}
