//! macOS's facts (x86_64 and arm64).

use std::os::fd::BorrowedFd;

use std::os::fd::AsRawFd;

use nix::errno::Errno;
use nix::sys::socket::{MsgFlags, SockType};

pub use super::NotifierAfterFork;

/// macOS has no SEQPACKET for Unix sockets. A datagram socketpair keeps
/// message boundaries and gives each message to one receiver, but does not
/// report to the other end that the accepting process closed its end
/// (README, "Platforms").
pub const QUEUE_SOCKET_TYPE: SockType = SockType::Datagram;

/// No MSG_NOSIGNAL: `prepare_queue_end` sets SO_NOSIGPIPE instead.
pub const SEND_FLAGS: MsgFlags = MsgFlags::empty();

/// A send to a closed peer gives EPIPE, no SIGPIPE.
pub fn prepare_queue_end(end: BorrowedFd<'_>) -> nix::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: setsockopt reads one c_int that lives across the call.
    let rc = unsafe {
        libc::setsockopt(
            end.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NOSIGPIPE,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    Errno::result(rc).map(drop)
}

/// No POLLRDHUP: a peer that closed shows as POLLHUP only once both
/// directions are shut, so a half-closed PROXY sender is seen by its
/// timeout instead.
pub const PEER_CLOSED_EVENTS: libc::c_short = 0;

/// Tcl's notifier on macOS (CoreFoundation) renews itself after fork.
pub const NOTIFIER_AFTER_FORK: NotifierAfterFork = NotifierAfterFork::Nothing;

pub use super::bsd::{fill_random, notify_address, shared_memory_file, unread_payload_bytes, unsent_bytes, ReadySet};

/// The calling process's resident memory in bytes (`pti_resident_size`
/// of `proc_pidinfo(PROC_PIDTASKINFO)`); `None` if it cannot be read.
pub fn resident_bytes() -> Option<u64> {
    // SAFETY: all-zero is a valid proc_taskinfo (integers only).
    let mut info: libc::proc_taskinfo = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::proc_taskinfo>() as libc::c_int;
    // SAFETY: proc_pidinfo writes at most `size` bytes into `info` and
    // returns how many it wrote.
    let written = unsafe {
        libc::proc_pidinfo(
            std::process::id() as libc::c_int,
            libc::PROC_PIDTASKINFO,
            0,
            (&mut info as *mut libc::proc_taskinfo).cast(),
            size,
        )
    };
    (written == size).then_some(info.pti_resident_size)
}
