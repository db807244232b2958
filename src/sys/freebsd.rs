//! FreeBSD's facts (13 and later).

use std::os::fd::BorrowedFd;

use nix::sys::socket::{MsgFlags, SockType};

pub use super::NotifierAfterFork;

/// FreeBSD has SEQPACKET for Unix sockets, with the peer's close reported.
pub const QUEUE_SOCKET_TYPE: SockType = SockType::SeqPacket;

/// A closed peer gives EPIPE, no SIGPIPE.
pub const SEND_FLAGS: MsgFlags = MsgFlags::MSG_NOSIGNAL;

pub fn prepare_queue_end(_end: BorrowedFd<'_>) -> nix::Result<()> {
    Ok(())
}

/// The poll events that say the peer has finished sending, beyond POLLHUP.
pub const PEER_CLOSED_EVENTS: libc::c_short = libc::POLLRDHUP;

/// Tcl 9's notifier here is kqueue, which fork does not copy.
pub const NOTIFIER_AFTER_FORK: NotifierAfterFork = NotifierAfterFork::ReinitTclNotifier;

pub use super::bsd::{fill_random, notify_address, shared_memory_file, unread_payload_bytes, unsent_bytes, ReadySet};

/// The calling process's resident memory in bytes (`ki_rssize` of
/// `sysctl kern.proc.pid`, in pages); `None` if it cannot be read.
pub fn resident_bytes() -> Option<u64> {
    let mut mib = [libc::CTL_KERN, libc::KERN_PROC, libc::KERN_PROC_PID, std::process::id() as libc::c_int];
    // SAFETY: all-zero is a valid kinfo_proc (integers, arrays, pointers
    // that sysctl overwrites).
    let mut info: libc::kinfo_proc = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::kinfo_proc>();
    // SAFETY: sysctl writes at most `len` bytes into `info` and the
    // length it wrote into `len`.
    let rc = unsafe {
        libc::sysctl(
            mib.as_mut_ptr(),
            mib.len() as libc::c_uint,
            (&mut info as *mut libc::kinfo_proc).cast(),
            &mut len,
            std::ptr::null(),
            0,
        )
    };
    (rc == 0 && len >= std::mem::size_of::<libc::kinfo_proc>()).then(|| info.ki_rssize as u64 * super::page_size())
}
