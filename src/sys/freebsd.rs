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

/// Fills `bytes` from the kernel's random source; false if it could not.
pub fn fill_random(bytes: &mut [u8]) -> bool {
    // getentropy takes at most 256 bytes at a time.
    bytes.chunks_mut(256).all(|chunk| {
        // SAFETY: getentropy writes exactly `chunk.len()` bytes into `chunk`.
        unsafe { libc::getentropy(chunk.as_mut_ptr().cast(), chunk.len()) == 0 }
    })
}

/// The address a `NOTIFY_SOCKET` value names: a path (no abstract
/// namespace here).
pub fn notify_address(value: &std::ffi::OsStr) -> nix::Result<nix::sys::socket::UnixAddr> {
    use std::os::unix::ffi::OsStrExt;
    match value.as_bytes() {
        [b'@', ..] => Err(nix::errno::Errno::EAFNOSUPPORT),
        path => nix::sys::socket::UnixAddr::new(path),
    }
}
