//! The platform layer: every system call that differs between Linux,
//! FreeBSD and macOS lives below this module, and nothing above it knows
//! which platform it runs on (as `mio`'s and `nix`'s `sys` modules do).
//!
//! Three choices are made here, each in its own files:
//!
//! - the operating system's facts (`linux.rs`, `freebsd.rs`, `macos.rs`):
//!   the queue's socket type, how a send is kept from raising SIGPIPE,
//!   random bytes, how a forked child gets an event notifier of its own;
//! - how descriptors are made close-on-exec: atomically where the system
//!   has `accept4`, `pipe2`, `dup3`, `SOCK_CLOEXEC` and `MSG_CMSG_CLOEXEC`
//!   (`fds_atomic.rs`: Linux, FreeBSD), or by `fcntl` right after the call
//!   that made them, which the caller brackets with the fork guard
//!   (`fds_fallback.rs`: macOS);
//! - how an idle worker waits for a connection without waking the others
//!   (`wait_epoll.rs`: Linux's `EPOLLEXCLUSIVE`; `wait_turn.rs`: everywhere
//!   else, a waiting turn that one process holds at a time).
//!
//! The cargo feature `portable` gives Linux the path of the other systems
//! (the waiting turn and the `fcntl` fallbacks), so that their logic runs
//! in this project's tests (`make test-portable`).

#[cfg(target_os = "linux")]
mod linux;
#[cfg(target_os = "linux")]
pub use linux::*;

#[cfg(any(target_os = "freebsd", target_os = "macos"))]
mod bsd;
#[cfg(target_os = "freebsd")]
mod freebsd;
#[cfg(target_os = "freebsd")]
pub use freebsd::*;

#[cfg(target_os = "macos")]
mod macos;
#[cfg(target_os = "macos")]
pub use macos::*;

#[cfg(any(target_os = "freebsd", all(target_os = "linux", not(feature = "portable"))))]
mod fds_atomic;
#[cfg(any(target_os = "freebsd", all(target_os = "linux", not(feature = "portable"))))]
pub use fds_atomic::*;

#[cfg(any(target_os = "macos", all(target_os = "linux", feature = "portable")))]
mod fds_fallback;
#[cfg(any(target_os = "macos", all(target_os = "linux", feature = "portable")))]
pub use fds_fallback::*;

#[cfg(all(target_os = "linux", not(feature = "portable")))]
mod wait_epoll;
#[cfg(all(target_os = "linux", not(feature = "portable")))]
pub use wait_epoll::*;

#[cfg(any(not(target_os = "linux"), feature = "portable"))]
mod wait_turn;
#[cfg(any(not(target_os = "linux"), feature = "portable"))]
pub use wait_turn::*;

#[cfg(target_os = "linux")]
mod epoll_notifier;
#[cfg(target_os = "linux")]
pub use epoll_notifier::{renew as renew_notifiers, snapshot as snapshot_notifiers, Notifier as NotifierCopy};

/// What `snapshot_notifiers` keeps: nothing where Tcl's notifier is not
/// epoll (`NOTIFIER_AFTER_FORK` never asks for one there).
#[cfg(not(target_os = "linux"))]
pub struct NotifierCopy;

#[cfg(not(target_os = "linux"))]
pub fn snapshot_notifiers() -> Vec<NotifierCopy> {
    Vec::new()
}

#[cfg(not(target_os = "linux"))]
pub fn renew_notifiers(_notifiers: &[NotifierCopy]) {}

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Once;

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal};

/// How an event notifier that Tcl made before a fork is given to the child.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum NotifierAfterFork {
    /// Linux: Tcl 9's epoll instances and eventfds are shared with the
    /// parent; the child replaces them under the same numbers
    /// (`notifier_fork`).
    RenewEpoll,
    /// FreeBSD: Tcl 9's kqueue is not inherited at all, and its trigger
    /// pipe is shared; the forking thread's notifier is finalised and
    /// initialised again in the child.
    ReinitTclNotifier,
    /// macOS: Tcl's CoreFoundation notifier renews itself in the child
    /// (`pthread_atfork` in tclMacOSXNotify.c).
    Nothing,
}

/// The calling thread's errno, e.g. to save it in a signal handler.
pub fn errno() -> i32 {
    Errno::last_raw()
}

/// Sets the calling thread's errno.
pub fn set_errno(value: i32) {
    Errno::set_raw(value)
}

/// Sets close-on-exec on `fd`.
pub fn set_cloexec(fd: BorrowedFd<'_>) -> nix::Result<()> {
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map(drop)
}

/// Clears `O_NONBLOCK` on `fd`, if set.
pub fn set_blocking(fd: BorrowedFd<'_>) -> nix::Result<()> {
    let flags = OFlag::from_bits_truncate(fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL)?);
    if flags.contains(OFlag::O_NONBLOCK) {
        fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags - OFlag::O_NONBLOCK))?;
    }
    Ok(())
}

/// Sets `O_NONBLOCK` on `fd`.
pub fn set_nonblocking(fd: BorrowedFd<'_>) -> nix::Result<()> {
    let flags = OFlag::from_bits_truncate(fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL)?);
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).map(drop)
}

/// A handler for SIGURG that does nothing and does not restart system
/// calls, so that `pthread_kill(thread, SIGURG)` makes a blocking call of
/// that thread (accept, a lock wait) return `EINTR`. Installed once, and
/// only where the script has no handler of its own for SIGURG: its default
/// action is to ignore it, as this handler does.
pub fn install_interrupt_handler() {
    static INSTALLED: Once = Once::new();
    INSTALLED.call_once(|| {
        extern "C" fn interrupt(_: libc::c_int) {}
        // SAFETY: only queries the current action.
        let current = unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            libc::sigaction(libc::SIGURG, std::ptr::null(), &mut old);
            old.sa_sigaction
        };
        if current == libc::SIG_DFL || current == libc::SIG_IGN {
            let action = SigAction::new(SigHandler::Handler(interrupt), SaFlags::empty(), SigSet::empty());
            // SAFETY: the handler does nothing at all.
            let _ = unsafe { nix::sys::signal::sigaction(Signal::SIGURG, &action) };
        }
    });
}

/// The signal that `install_interrupt_handler` catches.
pub const INTERRUPT_SIGNAL: libc::c_int = libc::SIGURG;

/// The size of a memory page, asked once.
pub fn page_size() -> u64 {
    static PAGE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *PAGE.get_or_init(|| {
        nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE).ok().flatten().map_or(4096, |size| size as u64)
    })
}
