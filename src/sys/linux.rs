//! Linux's facts.

use std::os::fd::BorrowedFd;

use nix::sys::socket::{MsgFlags, SockType};

pub use super::NotifierAfterFork;

/// SEQPACKET keeps message boundaries and reports the peer's close.
pub const QUEUE_SOCKET_TYPE: SockType = SockType::SeqPacket;

/// Flags for every send on a queue: a closed peer gives EPIPE, no SIGPIPE.
pub const SEND_FLAGS: MsgFlags = MsgFlags::MSG_NOSIGNAL;

/// Nothing to set on a queue's end (`SEND_FLAGS` keeps SIGPIPE away).
pub fn prepare_queue_end(_end: BorrowedFd<'_>) -> nix::Result<()> {
    Ok(())
}

/// The poll events that say the peer has finished sending, beyond POLLHUP.
pub const PEER_CLOSED_EVENTS: libc::c_short = libc::POLLRDHUP;

/// Tcl 9's notifier here is epoll (`notifier_fork`).
pub const NOTIFIER_AFTER_FORK: NotifierAfterFork = NotifierAfterFork::RenewEpoll;

/// Fills `bytes` from the kernel's random source; false if it could not.
pub fn fill_random(bytes: &mut [u8]) -> bool {
    // SAFETY: getrandom writes at most `bytes.len()` bytes into `bytes`.
    let filled = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    filled == bytes.len() as isize
}

/// The address a `NOTIFY_SOCKET` value names: a path, or `@name` in the
/// abstract namespace.
pub fn notify_address(value: &std::ffi::OsStr) -> nix::Result<nix::sys::socket::UnixAddr> {
    use std::os::unix::ffi::OsStrExt;
    match value.as_bytes() {
        [b'@', name @ ..] => nix::sys::socket::UnixAddr::new_abstract(name),
        path => nix::sys::socket::UnixAddr::new(path),
    }
}

/// The calling process's resident memory in bytes (`/proc/self/statm`,
/// second field, in pages); `None` if it cannot be read. The file stays
/// open, and is read again from its start (one pread, where opening it
/// each time costs eight times as much); a process forked since opens
/// its own.
pub fn resident_bytes() -> Option<u64> {
    use std::os::unix::fs::FileExt;
    static STATM: std::sync::Mutex<Option<(u32, std::fs::File)>> = std::sync::Mutex::new(None);
    let mut statm = STATM.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let pid = std::process::id();
    if statm.as_ref().is_none_or(|(opened_by, _)| *opened_by != pid) {
        // Close-on-exec, as std opens every file.
        *statm = Some((pid, std::fs::File::open("/proc/self/statm").ok()?));
    }
    let (_, file) = statm.as_ref()?;
    let mut text = [0u8; 128];
    let len = file.read_at(&mut text, 0).ok()?;
    let pages: u64 = std::str::from_utf8(&text[..len]).ok()?.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * super::page_size())
}
