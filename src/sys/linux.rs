//! Linux's facts.

use std::os::fd::{BorrowedFd, OwnedFd};

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

/// A file in memory of `bytes` zero bytes, as two close-on-exec
/// descriptors: read-write, and read-only (opened again through
/// /proc/self/fd, so that a mapping made from it can never be made
/// writable: `shared_pages`).
pub fn shared_memory_file(bytes: usize) -> nix::Result<(OwnedFd, OwnedFd)> {
    use nix::fcntl::{open, OFlag};
    use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
    use std::os::fd::{AsRawFd, FromRawFd};
    let read_write = memfd_create(c"socketserver", MemFdCreateFlag::MFD_CLOEXEC)?;
    nix::unistd::ftruncate(&read_write, bytes as libc::off_t)?;
    let path = format!("/proc/self/fd/{}", read_write.as_raw_fd());
    let read_only = open(path.as_str(), OFlag::O_RDONLY | OFlag::O_CLOEXEC, nix::sys::stat::Mode::empty())?;
    // SAFETY: open just returned it; nothing else owns it.
    Ok((read_write, unsafe { OwnedFd::from_raw_fd(read_only) }))
}

/// Descriptors watched together through one descriptor that is readable
/// while any of them is (epoll), so that the supervisor's event loop has
/// one file handler for every worker's wake channel.
pub struct ReadySet(nix::sys::epoll::Epoll);

impl ReadySet {
    pub fn new() -> nix::Result<ReadySet> {
        nix::sys::epoll::Epoll::new(nix::sys::epoll::EpollCreateFlags::EPOLL_CLOEXEC).map(ReadySet)
    }

    /// Watches `fd` for reading (or its peer's close).
    pub fn add(&self, fd: BorrowedFd<'_>) -> nix::Result<()> {
        use nix::sys::epoll::{EpollEvent, EpollFlags};
        use std::os::fd::AsRawFd;
        self.0.add(fd, EpollEvent::new(EpollFlags::EPOLLIN, fd.as_raw_fd() as u64))
    }

    pub fn remove(&self, fd: BorrowedFd<'_>) {
        let _ = self.0.delete(fd);
    }

    /// The descriptors ready now, without waiting.
    pub fn ready(&self) -> Vec<std::os::fd::RawFd> {
        use nix::sys::epoll::{EpollEvent, EpollTimeout};
        let mut events = [EpollEvent::empty(); 64];
        let count = self.0.wait(&mut events, EpollTimeout::ZERO).unwrap_or(0);
        events[..count].iter().map(|e| e.data() as std::os::fd::RawFd).collect()
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.0 .0.as_fd()
    }
}

/// Bytes sent on the socket `fd` that its peer has not received yet
/// (SIOCOUTQ: for a Unix socket, the messages still queued to the peer).
pub fn unsent_bytes(fd: BorrowedFd<'_>) -> Option<usize> {
    use std::os::fd::AsRawFd;
    let mut bytes: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (SIOCOUTQ) writes one int into `bytes`.
    let done = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &mut bytes) };
    (done == 0).then_some(bytes.max(0) as usize)
}

/// The payload bytes of the messages waiting in the receive queue of the
/// Unix socket `fd` (SIOCINQ: for SEQPACKET, their sum), which no sender
/// can make up.
pub fn unread_payload_bytes(fd: BorrowedFd<'_>) -> Option<usize> {
    use std::os::fd::AsRawFd;
    let mut bytes: libc::c_int = 0;
    // SAFETY: FIONREAD (SIOCINQ) writes one int into `bytes`.
    let done = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut bytes) };
    (done == 0).then_some(bytes.max(0) as usize)
}
