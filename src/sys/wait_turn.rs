//! Waiting where the kernel has no exclusive wakeup (kqueue and poll wake
//! every waiter of a socket): the waiting itself is serialised, as
//! Apache's accept mutex does it. Per queue there is one waiting turn; a
//! thread waits on the queue only while it holds the turn, so one thread in
//! all the workers is woken per message. The holder gives the turn up as
//! soon as it has taken a message, before it hands the connection over,
//! and the next in line takes it.
//!
//! The turn is two locks. Within a process (whose threads record locks do
//! not tell apart), a mutex and condition variable: one thread of a process
//! is in line at a time. Between processes, POSIX record locks
//! (`fcntl(F_SETLKW)`) on an unlinked file made with the queue before the
//! workers were forked, used as a ticket lock, so that the turn goes round
//! in arrival order (FIFO among idle workers) and each release wakes
//! exactly one process:
//!
//! - byte 0 is the entry: held for a moment while a newcomer draws the next
//!   ticket (a counter kept in the file) and locks the byte of its ticket;
//! - a newcomer with ticket `t` then waits for the byte of ticket `t - 1`,
//!   which only its predecessor holds and only one process waits for; it
//!   holds the turn once that byte is released, and releases its own byte
//!   when it gives the turn up.
//!
//! The kernel releases a process's record locks when it dies, so a worker
//! killed while it holds the turn, or while it waits in line, does not
//! stall the others (a waiter that dies lets its successor in early: for a
//! moment two hold the turn, which costs a wakeup, never a connection), and
//! a forked child never inherits them. A worker with nothing pending does
//! not ask for the turn.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

/// Wakes a thread that waits on its descriptor (a pipe's read end).
pub struct Waker {
    read_end: OwnedFd,
    write_end: OwnedFd,
}

impl Waker {
    /// Call under `fork_safety::hold_off_forks` when `CLOEXEC_IS_ATOMIC`
    /// is false.
    pub fn new() -> std::io::Result<Waker> {
        let (read_end, write_end) = super::pipe_cloexec(true)?;
        Ok(Waker { read_end, write_end })
    }

    pub fn wake(&self) {
        // A full pipe already holds a wakeup.
        let _ = nix::unistd::write(&self.write_end, &[1]);
    }

    /// Consumes the wakeups so far.
    pub fn drain(&self) {
        let mut bytes = [0u8; 64];
        while let Ok(n) = nix::unistd::read(self.read_end.as_raw_fd(), &mut bytes) {
            if n < bytes.len() {
                break;
            }
        }
    }

    /// The descriptor to poll for readability.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.read_end.as_fd()
    }

    /// Its descriptor numbers, for a forked child to close its copies.
    pub fn raw_fds(&self) -> Vec<RawFd> {
        vec![self.read_end.as_raw_fd(), self.write_end.as_raw_fd()]
    }
}

/// A queue's waiting turn (see the module's comment).
pub struct Turn {
    /// The unlinked file whose record lock is the turn between processes.
    file: OwnedFd,
    /// Within the process: whether one of its threads holds the turn.
    gate: Mutex<bool>,
    gate_free: Condvar,
    /// The ticket of the thread of this process that holds the turn or
    /// waits in line (only the gate's holder uses it).
    ticket: Mutex<Option<u64>>,
}

/// The byte of the file that is the entry to the line. Locks need no data
/// under them: the file holds only the ticket counter, its first 8 bytes
/// (so that a worker's file-size limit, `-rlimit fsize`, never meets it).
const ENTRY_BYTE: i64 = 0;
/// `l_type` values (c_int constants on Linux, c_short on the BSDs).
#[allow(clippy::unnecessary_cast)]
const WRITE_LOCK: libc::c_short = libc::F_WRLCK as libc::c_short;
#[allow(clippy::unnecessary_cast)]
const UNLOCK: libc::c_short = libc::F_UNLCK as libc::c_short;

/// Tickets wrap far beyond any line length.
const TICKETS: u64 = 1 << 40;
const COUNTER_AT: i64 = 0;

/// A ticket's byte. Every other byte, from 2: the kernel merges adjacent
/// locks of one process into one, and a successor's lock that changed
/// shape would wake the process waiting for it.
fn ticket_byte(ticket: u64) -> i64 {
    2 + 2 * (ticket % TICKETS) as i64
}

/// How often a thread waiting for the gate looks whether it still wants it.
/// (A thread that stops wanting it is told at once, by `recheck`: this is
/// a safety net, long enough that idle threads do not keep waking.)
const GATE_RECHECK: Duration = Duration::from_secs(2);
/// The longest pause before asking again for a lock the kernel refused
/// with EDEADLK.
const DEADLOCK_RETRY_MAX: Duration = Duration::from_millis(50);

impl Turn {
    /// Whether queues need a waiting turn on this platform.
    pub const NEEDED: bool = true;

    /// A new turn, to be made with its queue before any worker is forked.
    /// Call under `fork_safety::hold_off_forks` when `CLOEXEC_IS_ATOMIC` is
    /// false.
    pub fn new() -> std::io::Result<Turn> {
        // TMPDIR first; a TMPDIR that is missing or not writable must not
        // keep a port from opening.
        let mut last_error = std::io::Error::from(std::io::ErrorKind::NotFound);
        for dir in [std::env::temp_dir(), "/tmp".into(), "/var/tmp".into()] {
            match Self::unlinked_file(dir) {
                Ok(file) => {
                    return Ok(Turn {
                        file,
                        gate: Mutex::new(false),
                        gate_free: Condvar::new(),
                        ticket: Mutex::new(None),
                    })
                }
                Err(error) => last_error = error,
            }
        }
        Err(last_error)
    }

    /// A new file in `dir`, close-on-exec, already unlinked.
    fn unlinked_file(mut template: std::path::PathBuf) -> std::io::Result<OwnedFd> {
        template.push("socketserver-turn-XXXXXX");
        let mut path = std::ffi::CString::new(template.into_os_string().into_encoded_bytes())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?
            .into_bytes_with_nul();
        // SAFETY: `path` is a writable, NUL-terminated template.
        let fd = unsafe { libc::mkstemp(path.as_mut_ptr().cast()) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: mkstemp returned a new descriptor that nothing else owns.
        let file = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: `path` is NUL-terminated; the name is ours (mkstemp made it).
        unsafe { libc::unlink(path.as_ptr().cast()) };
        super::set_cloexec(file.as_fd())?;
        Ok(file)
    }

    pub fn raw_fd(&self) -> Option<RawFd> {
        Some(self.file.as_raw_fd())
    }

    /// In a forked child: a thread of the parent may have held the gate;
    /// that thread does not exist here. (The record lock is never inherited.)
    pub fn renew_after_fork(&self) {
        if let Ok(mut held) = self.gate.try_lock() {
            *held = false;
        }
        if let Ok(mut ticket) = self.ticket.try_lock() {
            *ticket = None;
        }
    }

    fn gate(&self) -> MutexGuard<'_, bool> {
        self.gate.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Waits for the turn while `wanted()`; false when no longer wanted
    /// (or the wait was interrupted and it should be asked again).
    fn acquire(&self, wanted: &dyn Fn() -> bool) -> bool {
        {
            let mut held = self.gate();
            while *held {
                if !wanted() {
                    return false;
                }
                held = self
                    .gate_free
                    .wait_timeout(held, GATE_RECHECK)
                    .map(|(g, _)| g)
                    .unwrap_or_else(|p| p.into_inner().0);
            }
            *held = true;
        }
        let ticket = match self.join_line(wanted) {
            Ok(ticket) => ticket,
            Err(()) => {
                self.open_gate();
                return false;
            }
        };
        *self.ticket.lock().unwrap_or_else(|p| p.into_inner()) = ticket;
        let Some(ticket) = ticket else { return true };
        if ticket == 0 {
            return true;
        }
        let predecessor = ticket_byte(ticket - 1);
        let mut pause = Duration::from_millis(1);
        loop {
            match self.lock_byte(predecessor, WRITE_LOCK, libc::F_SETLKW) {
                Ok(()) => {
                    // Its release was the signal; the byte itself is not needed.
                    let _ = self.lock_byte(predecessor, UNLOCK, libc::F_SETLK);
                    return true;
                }
                Err(Errno::EINTR) if wanted() => {}
                // Leaving the line: the successor goes in early (see the
                // module's comment).
                Err(Errno::EINTR) => {
                    self.release();
                    return false;
                }
                // The kernel's deadlock detector counts all the threads of a
                // process as one owner: a worker in line on two ports can
                // look like a cycle with another such worker, though each
                // holder lets go as soon as its own queue has a connection.
                // Ask again after a pause, still in line.
                Err(Errno::EDEADLK) if wanted() => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(DEADLOCK_RETRY_MAX);
                }
                Err(Errno::EDEADLK) => {
                    self.release();
                    return false;
                }
                // ENOLCK: go on unserialised.
                Err(_) => return true,
            }
        }
    }

    /// Under the entry lock, draws the next ticket and locks its byte.
    /// `Ok(None)` when record locks do not work here (the wait then goes on
    /// unserialised); `Err` when interrupted and no longer wanted.
    fn join_line(&self, wanted: &dyn Fn() -> bool) -> Result<Option<u64>, ()> {
        loop {
            match self.lock_byte(ENTRY_BYTE, WRITE_LOCK, libc::F_SETLKW) {
                Ok(()) => break,
                Err(Errno::EINTR) if wanted() => {}
                // See `acquire`: the entry is held only for a moment.
                Err(Errno::EDEADLK) if wanted() => std::thread::sleep(Duration::from_millis(1)),
                Err(Errno::EINTR) => return Err(()),
                Err(_) => return Ok(None),
            }
        }
        let ticket = self.next_ticket();
        let locked = ticket.and_then(|t| self.lock_byte(ticket_byte(t), WRITE_LOCK, libc::F_SETLK).ok().map(|_| t));
        let _ = self.lock_byte(ENTRY_BYTE, UNLOCK, libc::F_SETLK);
        Ok(locked)
    }

    /// Reads and advances the counter in the file (under the entry lock).
    fn next_ticket(&self) -> Option<u64> {
        let mut bytes = [0u8; 8];
        let read = nix::sys::uio::pread(self.file.as_fd(), &mut bytes, COUNTER_AT).ok()?;
        let ticket = if read == 8 { u64::from_ne_bytes(bytes) } else { 0 };
        let written = nix::sys::uio::pwrite(self.file.as_fd(), &(ticket + 1).to_ne_bytes(), COUNTER_AT).ok()?;
        (written == 8).then_some(ticket)
    }

    fn release(&self) {
        if let Some(ticket) = self.ticket.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = self.lock_byte(ticket_byte(ticket), UNLOCK, libc::F_SETLK);
        }
        self.open_gate();
    }

    fn open_gate(&self) {
        *self.gate() = false;
        self.gate_free.notify_one();
    }

    /// Wakes the threads of this process that wait for the gate, so that
    /// one that no longer wants the turn stops waiting.
    fn recheck(&self) {
        self.gate_free.notify_all();
    }

    fn lock_byte(&self, byte: i64, kind: libc::c_short, command: libc::c_int) -> Result<(), Errno> {
        // SAFETY: all-zero is a valid flock; the fields set below ask for
        // one byte.
        let mut lock: libc::flock = unsafe { std::mem::zeroed() };
        lock.l_type = kind;
        lock.l_whence = libc::SEEK_SET as libc::c_short;
        lock.l_start = byte as libc::off_t;
        lock.l_len = 1;
        // SAFETY: fcntl with a flock that lives across the call.
        Errno::result(unsafe { libc::fcntl(self.file.as_raw_fd(), command, &mut lock) }).map(drop)
    }
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

/// One waiting thread's means of waiting on a queue.
pub struct QueueWaiter {
    waker: Waker,
    turn: Option<Arc<Turn>>,
    /// Whether the waiting thread holds the turn (only it changes this).
    holding: AtomicBool,
}

/// How many times (a millisecond apart) `interrupt` signals the waiting
/// thread before it gives up on it.
const SIGNAL_ROUNDS: u32 = 500;

impl QueueWaiter {
    /// Call under `fork_safety::hold_off_forks` when `CLOEXEC_IS_ATOMIC`
    /// is false. Without a turn, the wait is not serialised.
    pub fn new(turn: Option<Arc<Turn>>) -> std::io::Result<QueueWaiter> {
        super::install_interrupt_handler();
        Ok(QueueWaiter { waker: Waker::new()?, turn, holding: AtomicBool::new(false) })
    }

    /// Joins the line for the turn: the waiting thread goes for it.
    pub fn join(&self, _queue: BorrowedFd<'_>) -> Result<(), Errno> {
        self.waker.wake();
        Ok(())
    }

    /// Leaves the line; the thread gives the turn up if it holds it. No
    /// wakeup is ever spent on a waiter that leaves: the next holder of the
    /// turn polls the queue, which is still readable (false).
    pub fn leave(&self, _queue: BorrowedFd<'_>) -> bool {
        self.waker.wake();
        if let Some(turn) = &self.turn {
            turn.recheck();
        }
        false
    }

    /// The waiting thread took a message (or the close): the next in line
    /// may wait now.
    pub fn taken(&self, _queue: BorrowedFd<'_>) {
        self.release();
    }

    /// Blocks until the queue has something while this thread holds the
    /// turn, or `wake`. `armed` says whether the thread should wait on the
    /// queue at all.
    pub fn wait(&self, queue: BorrowedFd<'_>, armed: &dyn Fn() -> bool) -> Woke {
        if !armed() {
            self.release();
            return self.poll(None);
        }
        if !self.holding.load(Ordering::Relaxed) {
            if let Some(turn) = &self.turn {
                if !turn.acquire(armed) {
                    return Woke::Wakeup;
                }
            }
            self.holding.store(true, Ordering::Relaxed);
        }
        self.poll(Some(queue))
    }

    fn poll(&self, queue: Option<BorrowedFd<'_>>) -> Woke {
        let mut fds = vec![PollFd::new(self.waker.fd(), PollFlags::POLLIN)];
        if let Some(queue) = queue {
            fds.push(PollFd::new(queue, PollFlags::POLLIN));
        }
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(_) => return Woke::Failed,
        }
        let ready = |fd: &PollFd<'_>| fd.revents().is_some_and(|r| !r.is_empty());
        if ready(&fds[0]) {
            self.waker.drain();
            return Woke::Wakeup;
        }
        if fds.get(1).is_some_and(ready) {
            return Woke::Queue;
        }
        Woke::Wakeup
    }

    /// Ends the current or next `wait` (from any thread), except a wait for
    /// the turn between processes: see `interrupt`.
    pub fn wake(&self) {
        self.waker.wake();
        if let Some(turn) = &self.turn {
            turn.recheck();
        }
    }

    /// Gives up the turn, if the waiting thread holds it.
    pub fn release(&self) {
        if self.holding.swap(false, Ordering::Relaxed) {
            if let Some(turn) = &self.turn {
                turn.release();
            }
        }
    }

    /// Before joining the waiting thread, after `wake`: a thread blocked in
    /// the record lock's wait is reached only by a signal. Signals it until
    /// it has returned; false if it never does (the caller then leaves it).
    pub fn interrupt(&self, thread: &JoinHandle<()>) -> bool {
        for _ in 0..SIGNAL_ROUNDS {
            if thread.is_finished() {
                return true;
            }
            // SAFETY: the thread has not been joined, so its pthread_t is valid.
            unsafe { libc::pthread_kill(thread.as_pthread_t(), super::INTERRUPT_SIGNAL) };
            std::thread::sleep(Duration::from_millis(1));
        }
        thread.is_finished()
    }

    /// Its descriptor numbers, for a forked child to close its copies.
    pub fn raw_fds(&self) -> Vec<RawFd> {
        self.waker.raw_fds()
    }
}
