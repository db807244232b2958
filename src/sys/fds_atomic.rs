//! Descriptors made close-on-exec by the call that makes them (Linux,
//! FreeBSD): no fork can come between.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::socket::{socket, socketpair, AddressFamily, MsgFlags, SockFlag, SockType, SockaddrStorage};

/// Whether the calls below make close-on-exec descriptors atomically. When
/// false, each must be called under `fork_safety::hold_off_forks`.
pub const CLOEXEC_IS_ATOMIC: bool = true;

/// Flags for `recvmsg`, so that received descriptors arrive close-on-exec.
pub const RECEIVE_FLAGS: MsgFlags = MsgFlags::MSG_CMSG_CLOEXEC;

/// A blocking, close-on-exec socket.
pub fn socket_cloexec(family: AddressFamily, kind: SockType) -> nix::Result<OwnedFd> {
    socket(family, kind, SockFlag::SOCK_CLOEXEC, None)
}

/// A non-blocking, close-on-exec socket.
pub fn socket_cloexec_nonblock(family: AddressFamily, kind: SockType) -> nix::Result<OwnedFd> {
    socket(family, kind, SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK, None)
}

/// A close-on-exec socketpair.
pub fn socketpair_cloexec(kind: SockType) -> nix::Result<(OwnedFd, OwnedFd)> {
    socketpair(AddressFamily::Unix, kind, None, SockFlag::SOCK_CLOEXEC)
}

/// A close-on-exec pipe (read end, write end), non-blocking if asked.
pub fn pipe_cloexec(nonblocking: bool) -> nix::Result<(OwnedFd, OwnedFd)> {
    let mut flags = OFlag::O_CLOEXEC;
    if nonblocking {
        flags |= OFlag::O_NONBLOCK;
    }
    nix::unistd::pipe2(flags)
}

/// Makes `target` a close-on-exec copy of `source`.
pub fn dup_cloexec_onto(source: BorrowedFd<'_>, target: RawFd) -> nix::Result<()> {
    nix::unistd::dup3(source.as_raw_fd(), target, OFlag::O_CLOEXEC).map(drop)
}

/// Takes one connection off `listener`, close-on-exec and blocking (as
/// the listener's own mode was when the call blocked), with its peer's
/// address.
pub fn accept_cloexec(listener: BorrowedFd<'_>) -> Result<(OwnedFd, Option<SockaddrStorage>), Errno> {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut length = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: storage and length describe a writable sockaddr_storage.
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            (&mut storage as *mut libc::sockaddr_storage).cast(),
            &mut length,
            libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(Errno::last());
    }
    // SAFETY: accept4 returned a new descriptor that nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: the kernel filled `length` bytes of a sockaddr_storage.
    let address = unsafe {
        nix::sys::socket::SockaddrLike::from_raw((&storage as *const libc::sockaddr_storage).cast(), Some(length))
    };
    Ok((socket, address))
}
