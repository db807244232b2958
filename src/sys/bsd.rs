//! What FreeBSD and macOS share outright (their files re-export it).

/// Fills `bytes` from the kernel's random source; false if it could not.
pub fn fill_random(bytes: &mut [u8]) -> bool {
    // getentropy takes at most 256 bytes at a time.
    bytes.chunks_mut(256).all(|chunk| {
        // SAFETY: getentropy writes exactly `chunk.len()` bytes into `chunk`.
        unsafe { libc::getentropy(chunk.as_mut_ptr().cast(), chunk.len()) == 0 }
    })
}

/// The address a `NOTIFY_SOCKET` value names: a path (no abstract
/// namespace on these systems).
pub fn notify_address(value: &std::ffi::OsStr) -> nix::Result<nix::sys::socket::UnixAddr> {
    use std::os::unix::ffi::OsStrExt;
    match value.as_bytes() {
        [b'@', ..] => Err(nix::errno::Errno::EAFNOSUPPORT),
        path => nix::sys::socket::UnixAddr::new(path),
    }
}

/// A file in memory of `bytes` zero bytes, as two close-on-exec
/// descriptors: read-write, and read-only (so that a mapping made from it
/// can never be made writable: `shared_pages`). A POSIX shared memory
/// object under a random name, opened twice and unlinked at once.
pub fn shared_memory_file(bytes: usize) -> nix::Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
    use nix::fcntl::OFlag;
    use nix::sys::mman::{shm_open, shm_unlink};
    use nix::sys::stat::Mode;
    let mut random = [0u8; 8];
    fill_random(&mut random);
    // macOS allows names of up to 31 bytes.
    let name = format!("/ss{:016x}", u64::from_ne_bytes(random));
    let read_write =
        shm_open(name.as_str(), OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_EXCL, Mode::S_IRUSR | Mode::S_IWUSR)?;
    let read_only = shm_open(name.as_str(), OFlag::O_RDONLY, Mode::empty());
    let _ = shm_unlink(name.as_str());
    let read_only = read_only?;
    nix::unistd::ftruncate(&read_write, bytes as libc::off_t)?;
    Ok((read_write, read_only))
}

/// Descriptors watched together through one descriptor that is readable
/// while any of them is (a kqueue), so that the supervisor's event loop has
/// one file handler for every worker's wake channel.
pub struct ReadySet(nix::sys::event::Kqueue);

impl ReadySet {
    pub fn new() -> nix::Result<ReadySet> {
        let queue = nix::sys::event::Kqueue::new()?;
        super::set_cloexec(std::os::fd::AsFd::as_fd(&queue))?;
        Ok(ReadySet(queue))
    }

    fn change(&self, fd: std::os::fd::BorrowedFd<'_>, flags: nix::sys::event::EventFlag) -> nix::Result<()> {
        use nix::sys::event::{EventFilter, FilterFlag, KEvent};
        use std::os::fd::AsRawFd;
        let event = KEvent::new(fd.as_raw_fd() as usize, EventFilter::EVFILT_READ, flags, FilterFlag::empty(), 0, 0);
        self.0.kevent(&[event], &mut [], None).map(drop)
    }

    /// Watches `fd` for reading (or its peer's close).
    pub fn add(&self, fd: std::os::fd::BorrowedFd<'_>) -> nix::Result<()> {
        self.change(fd, nix::sys::event::EventFlag::EV_ADD)
    }

    pub fn remove(&self, fd: std::os::fd::BorrowedFd<'_>) {
        let _ = self.change(fd, nix::sys::event::EventFlag::EV_DELETE);
    }

    /// The descriptors ready now, without waiting.
    pub fn ready(&self) -> Vec<std::os::fd::RawFd> {
        use nix::sys::event::{EventFilter, EventFlag, FilterFlag, KEvent};
        let mut events = [KEvent::new(0, EventFilter::EVFILT_READ, EventFlag::empty(), FilterFlag::empty(), 0, 0); 64];
        let zero = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        let count = self.0.kevent(&[], &mut events, Some(zero)).unwrap_or(0);
        events[..count].iter().map(|e| e.ident() as std::os::fd::RawFd).collect()
    }

    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.0)
    }
}

/// Bytes sent on the socket `fd` that its peer has not received yet: not
/// known here (a Unix socket's data moves to the receiver at once).
pub fn unsent_bytes(_fd: std::os::fd::BorrowedFd<'_>) -> Option<usize> {
    None
}

/// The payload bytes of the messages waiting in a Unix socket's receive
/// queue: not known here for datagrams (FIONREAD's count may differ).
pub fn unread_payload_bytes(_fd: std::os::fd::BorrowedFd<'_>) -> Option<usize> {
    None
}
