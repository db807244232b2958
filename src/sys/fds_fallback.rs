//! Descriptors made close-on-exec by `fcntl` right after the call that
//! makes them (macOS, and Linux with the `portable` feature). Between the
//! two, a fork in another thread would copy the descriptor into a child
//! that may exec: every function here must be called under
//! `fork_safety::hold_off_forks`, which makes such a fork wait.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::sys::socket::{socket, socketpair, AddressFamily, MsgFlags, SockFlag, SockType, SockaddrStorage};

use super::{set_blocking, set_cloexec, set_nonblocking};

/// Whether the calls below make close-on-exec descriptors atomically. When
/// false, each must be called under `fork_safety::hold_off_forks`.
pub const CLOEXEC_IS_ATOMIC: bool = false;

/// No `MSG_CMSG_CLOEXEC`: the receiver sets close-on-exec on what arrives.
pub const RECEIVE_FLAGS: MsgFlags = MsgFlags::empty();

/// A blocking, close-on-exec socket.
pub fn socket_cloexec(family: AddressFamily, kind: SockType) -> nix::Result<OwnedFd> {
    let fd = socket(family, kind, SockFlag::empty(), None)?;
    set_cloexec(fd.as_fd())?;
    Ok(fd)
}

/// A non-blocking, close-on-exec socket.
pub fn socket_cloexec_nonblock(family: AddressFamily, kind: SockType) -> nix::Result<OwnedFd> {
    let fd = socket(family, kind, SockFlag::empty(), None)?;
    set_cloexec(fd.as_fd())?;
    set_nonblocking(fd.as_fd())?;
    Ok(fd)
}

/// A close-on-exec socketpair.
pub fn socketpair_cloexec(kind: SockType) -> nix::Result<(OwnedFd, OwnedFd)> {
    let (one, other) = socketpair(AddressFamily::Unix, kind, None, SockFlag::empty())?;
    set_cloexec(one.as_fd())?;
    set_cloexec(other.as_fd())?;
    Ok((one, other))
}

/// A close-on-exec pipe (read end, write end), non-blocking if asked.
pub fn pipe_cloexec(nonblocking: bool) -> nix::Result<(OwnedFd, OwnedFd)> {
    let (read_end, write_end) = nix::unistd::pipe()?;
    for end in [read_end.as_fd(), write_end.as_fd()] {
        set_cloexec(end)?;
        if nonblocking {
            set_nonblocking(end)?;
        }
    }
    Ok((read_end, write_end))
}

/// Makes `target` a close-on-exec copy of `source`.
pub fn dup_cloexec_onto(source: BorrowedFd<'_>, target: RawFd) -> nix::Result<()> {
    nix::unistd::dup2(source.as_raw_fd(), target)?;
    // SAFETY: dup2 just made `target` an open descriptor; borrowed for the call.
    set_cloexec(unsafe { BorrowedFd::borrow_raw(target) })
}

/// Takes one connection off a non-blocking `listener` (`EAGAIN` when none
/// is waiting), close-on-exec and blocking (BSD sockets inherit the
/// listener's `O_NONBLOCK`), with its peer's address.
pub fn accept_cloexec(listener: BorrowedFd<'_>) -> Result<(OwnedFd, Option<SockaddrStorage>), Errno> {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut length = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: storage and length describe a writable sockaddr_storage.
    let fd = unsafe {
        libc::accept(listener.as_raw_fd(), (&mut storage as *mut libc::sockaddr_storage).cast(), &mut length)
    };
    if fd < 0 {
        return Err(Errno::last());
    }
    // SAFETY: accept returned a new descriptor that nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    set_cloexec(socket.as_fd())?;
    set_blocking(socket.as_fd())?;
    // SAFETY: the kernel filled `length` bytes of a sockaddr_storage.
    let address = unsafe {
        nix::sys::socket::SockaddrLike::from_raw((&storage as *const libc::sockaddr_storage).cast(), Some(length))
    };
    Ok((socket, address))
}
