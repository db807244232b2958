//! The hand-off queue between the accepting process and its workers.
//!
//! Each port has one `SOCK_SEQPACKET` socketpair (`SOCK_DGRAM` on macOS,
//! which has no SEQPACKET for Unix sockets: `sys::QUEUE_SOCKET_TYPE`). The accepting thread sends
//! on one end (the *accept end*); every worker receives from the other (the
//! *worker end*), which it inherited through `fork`. One message is one
//! connection: its payload is the peer's address as `accept()` reported it
//! (in binary: the worker, not the accepting thread, formats it as text)
//! and the moment it was accepted (`CLOCK_MONOTONIC`, the same clock in
//! every process, so the worker knows how long it waited), and its
//! control message carries exactly one descriptor (`SCM_RIGHTS`).
//! SEQPACKET keeps message boundaries, so a connection is never split or
//! merged with another, and the kernel gives each message to one receiver.
//!
//! A worker that took a connection it can no longer use (its registration
//! was cancelled while the connection was in flight) sends it back through
//! the worker end; the accepting thread queues it again.

use std::cell::RefCell;
use std::io::IoSliceMut;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard, Once};

use nix::errno::Errno;
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};

use crate::fork_safety;
use crate::sys::{self, Turn};

/// Room for the longest payload (27 bytes) and more, so that a longer,
/// foreign message is seen as truncated.
const MAX_PAYLOAD: usize = 32;

/// The two ends of a port's queue (accept end, worker end), both
/// close-on-exec. Where the platform needs one (`sys::Turn`), the queue's
/// waiting turn is made with it, for the workers forked later to share.
pub fn new_queue() -> nix::Result<(OwnedFd, OwnedFd)> {
    let _no_fork = (!sys::CLOEXEC_IS_ATOMIC || Turn::NEEDED).then(fork_safety::hold_off_forks);
    let (accept_end, worker_end) = sys::socketpair_cloexec(sys::QUEUE_SOCKET_TYPE)?;
    sys::prepare_queue_end(accept_end.as_fd())?;
    sys::prepare_queue_end(worker_end.as_fd())?;
    if Turn::NEEDED {
        let turn = Turn::new().map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
        record_turn(worker_end.as_raw_fd(), turn);
    }
    Ok((accept_end, worker_end))
}

/// The waiting turns of the queues this process knows, by the worker
/// end's descriptor number (the same in every process forked after the
/// queue was made). Descriptors travel between this process's rooms as
/// bare `OwnedFd`s, so the turn is looked up rather than carried.
static TURNS: Mutex<TurnTable> = Mutex::new(Vec::new());

/// Each queue's waiting turn, by the number of its worker end and the
/// identity of the socket that number named (see `socket_identity`).
type TurnTable = Vec<(RawFd, (u64, u64), Arc<Turn>)>;

/// The device and inode of the file a descriptor names: tells a queue's
/// worker end from a later file that reuses its number. (dev_t is i32 on
/// macOS, u64 on Linux and FreeBSD: hence the casts.)
#[allow(clippy::unnecessary_cast)]
fn socket_identity(fd: RawFd) -> Option<(u64, u64)> {
    nix::sys::stat::fstat(fd).ok().map(|st| (st.st_dev as u64, st.st_ino as u64))
}

fn turns() -> MutexGuard<'static, TurnTable> {
    TURNS.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

thread_local! {
    /// The table, locked by the forking thread from before a fork to after it.
    static TURNS_HELD: RefCell<Option<MutexGuard<'static, TurnTable>>> = const { RefCell::new(None) };
}

fn record_turn(worker_end: RawFd, turn: Turn) {
    static WATCHING: Once = Once::new();
    WATCHING.call_once(|| {
        fork_safety::on_fork(
            || {
                let _ = TURNS_HELD.try_with(|held| *held.borrow_mut() = Some(turns()));
            },
            || {
                let _ = TURNS_HELD.try_with(|held| held.borrow_mut().take());
            },
            || {
                let _ = TURNS_HELD.try_with(|held| {
                    if let Some(table) = held.borrow_mut().take() {
                        table.iter().for_each(|(_, _, turn)| turn.renew_after_fork());
                    }
                });
            },
        )
    });
    let mut table = turns();
    // A number reused by a new queue replaces the closed queue's turn.
    table.retain(|(fd, identity, _)| *fd != worker_end && socket_identity(*fd) == Some(*identity));
    if let Some(identity) = socket_identity(worker_end) {
        table.push((worker_end, identity, Arc::new(turn)));
    }
}

/// Lets the turns of queues closed since go, their files with them (a
/// queue is closed when its worker end is: a turn stays while anything in
/// the process still waits on the queue). Called when a port is closed, so
/// that ports opened and closed leave nothing behind.
pub fn forget_closed_turns() {
    if Turn::NEEDED {
        turns().retain(|(fd, identity, _)| socket_identity(*fd) == Some(*identity));
    }
}

/// The waiting turn of the queue whose worker end is `queue`, if the
/// platform needs one.
pub fn turn_of(queue: &OwnedFd) -> Option<Arc<Turn>> {
    if !Turn::NEEDED {
        return None;
    }
    let fd = queue.as_raw_fd();
    turns().iter().find(|(number, _, _)| *number == fd).map(|(_, _, turn)| Arc::clone(turn))
}

/// A connection in transit: the socket and its peer's address.
#[derive(Debug)]
pub struct Connection {
    pub socket: OwnedFd,
    /// `None` when `accept()` gave no IPv4 or IPv6 address.
    pub peer: Option<SocketAddr>,
    /// When the accepting thread took it (monotonic nanoseconds; 0: unknown).
    pub accepted_at: u64,
    /// When a worker took it off the queue (monotonic nanoseconds; 0: not yet).
    pub taken_at: u64,
}

impl Connection {
    /// A connection just accepted: stamped now.
    pub fn accepted_now(socket: OwnedFd, peer: Option<SocketAddr>) -> Connection {
        Connection { socket, peer, accepted_at: crate::queue_stats::monotonic_ns(), taken_at: 0 }
    }

    /// How long it waited in the queue, in nanoseconds (0 if unknown).
    pub fn queue_wait_ns(&self) -> u64 {
        if self.accepted_at == 0 || self.taken_at == 0 {
            return 0;
        }
        self.taken_at.saturating_sub(self.accepted_at)
    }

    /// The peer's address and port, as Tcl's `socket -server` reports them
    /// (an IPv4 peer on an IPv6 socket as `127.0.0.1`).
    pub fn peer_host_and_port(&self) -> (String, String) {
        match self.peer {
            Some(address) => (crate::listener::host_string(address.ip()), address.port().to_string()),
            None => ("0.0.0.0".to_string(), "0".to_string()),
        }
    }

    /// The peer as "host port".
    pub fn peer_text(&self) -> String {
        let (host, port) = self.peer_host_and_port();
        format!("{host} {port}")
    }
}

/// The payload of a message: a family byte (4, 6, or 0 for none), the port
/// (big-endian) and the address's bytes, then the accept time (8 bytes,
/// native order: sender and receiver are the same program on one
/// machine). At most 27 bytes.
struct PeerBytes {
    bytes: [u8; 27],
    len: usize,
}

const STAMP: usize = 8;
/// The shortest payload of a message (no address: the family byte and the
/// stamp): the queue's unread bytes over this bound its count.
pub const MIN_PAYLOAD: usize = 1 + STAMP;

impl PeerBytes {
    fn encode(peer: Option<SocketAddr>, accepted_at: u64) -> PeerBytes {
        let mut bytes = [0u8; 27];
        let len = match peer {
            None => 1,
            Some(SocketAddr::V4(v4)) => {
                bytes[0] = 4;
                bytes[1..3].copy_from_slice(&v4.port().to_be_bytes());
                bytes[3..7].copy_from_slice(&v4.ip().octets());
                7
            }
            Some(SocketAddr::V6(v6)) => {
                bytes[0] = 6;
                bytes[1..3].copy_from_slice(&v6.port().to_be_bytes());
                bytes[3..19].copy_from_slice(&v6.ip().octets());
                19
            }
        };
        bytes[len..len + STAMP].copy_from_slice(&accepted_at.to_ne_bytes());
        PeerBytes { bytes, len: len + STAMP }
    }

    /// The peer and the accept time; `Err` for a payload no sender of ours
    /// makes.
    fn decode(payload: &[u8]) -> Result<(Option<SocketAddr>, u64), ReceiveError> {
        let Some(split) = payload.len().checked_sub(STAMP) else { return Err(ReceiveError::Malformed) };
        let (payload, stamp) = payload.split_at(split);
        let accepted_at = u64::from_ne_bytes(stamp.try_into().expect("8 bytes"));
        Ok((Self::decode_peer(payload)?, accepted_at))
    }

    fn decode_peer(payload: &[u8]) -> Result<Option<SocketAddr>, ReceiveError> {
        let port = |p: &[u8]| u16::from_be_bytes([p[1], p[2]]);
        match payload {
            [0] => Ok(None),
            [4, ..] if payload.len() == 7 => {
                let ip: [u8; 4] = payload[3..7].try_into().expect("4 bytes");
                Ok(Some(SocketAddr::new(Ipv4Addr::from(ip).into(), port(payload))))
            }
            [6, ..] if payload.len() == 19 => {
                let ip: [u8; 16] = payload[3..19].try_into().expect("16 bytes");
                Ok(Some(SocketAddr::new(Ipv6Addr::from(ip).into(), port(payload))))
            }
            _ => Err(ReceiveError::Malformed),
        }
    }
}

/// Sends one connection as one message. The caller keeps `conn` and closes
/// it after a successful send (the receiver then holds the only copy).
///
/// This is the accepting threads' hot path: `libc::sendmsg` with the
/// control message on the stack, because nix's `sendmsg` allocates its
/// control buffer on the heap at every call.
pub fn send_connection(queue: BorrowedFd<'_>, conn: &Connection, flags: MsgFlags) -> nix::Result<()> {
    let peer = PeerBytes::encode(conn.peer, conn.accepted_at);
    let payload = &peer.bytes[..peer.len];
    let fd: RawFd = conn.socket.as_raw_fd();
    // Room for one cmsghdr and one descriptor, aligned as cmsghdr wants.
    let mut control = [0u64; 4];
    let fd_len = std::mem::size_of::<RawFd>() as u32;
    let mut iov = libc::iovec { iov_base: payload.as_ptr() as *mut libc::c_void, iov_len: payload.len() };
    // SAFETY: msghdr is plain data; every pointer set below outlives the
    // call, and CMSG_SPACE(one descriptor) fits in `control` (32 bytes).
    let sent = unsafe {
        let space = libc::CMSG_SPACE(fd_len) as usize;
        debug_assert!(space <= std::mem::size_of_val(&control));
        let mut header: libc::msghdr = std::mem::zeroed();
        header.msg_iov = &mut iov;
        header.msg_iovlen = 1;
        header.msg_control = control.as_mut_ptr().cast();
        // socklen_t on macOS, size_t on Linux.
        header.msg_controllen = space as _;
        let cmsg = libc::CMSG_FIRSTHDR(&header);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(fd_len) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
        libc::sendmsg(queue.as_raw_fd(), &header, (flags | sys::SEND_FLAGS).bits())
    };
    let sent = Errno::result(sent)?;
    // SEQPACKET sends whole messages or nothing.
    debug_assert_eq!(sent as usize, payload.len());
    Ok(())
}

/// How long a worker handing a connection back waits for room in the
/// queue's direction back (`send_back`). Room comes in bursts (the
/// re-queueing thread drops 64 garbage messages, then pauses 50 ms), and a
/// worker flooding the way back competes for each: on a loaded machine one
/// second gave a flooder every burst about once in 25 tries, five do not.
pub const GIVE_BACK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Sends a connection back from a worker, as `send_connection`; where the
/// way back is full, waits for room for up to `wait` (a few polls) rather
/// than failing at once. Every worker sends back through the one worker
/// end, so its buffer is shared: a worker that fills it with garbage (the
/// re-queueing thread drops garbage at a bounded rate) would otherwise make
/// every other worker's give-back fail, and the client's connection close.
pub fn send_back(queue: BorrowedFd<'_>, conn: &Connection, wait: std::time::Duration) -> nix::Result<()> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let deadline = std::time::Instant::now() + wait;
    loop {
        match send_connection(queue, conn, MsgFlags::MSG_DONTWAIT) {
            Err(Errno::EAGAIN | Errno::ENOBUFS | Errno::EINTR) => {}
            done => return done,
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(Errno::EAGAIN);
        }
        // At most 5 ms at a time: a wake-up for room may go to another
        // sender (the kernel reports room only once the buffer is three
        // quarters empty), and some systems do not report room for
        // datagrams; trying often is what wins room freed in a burst.
        let timeout = PollTimeout::try_from(left.min(std::time::Duration::from_millis(5))).unwrap_or(PollTimeout::ZERO);
        let _ = poll(&mut [PollFd::new(queue, PollFlags::POLLOUT)], timeout);
    }
}

/// What one receive gave.
#[derive(Debug)]
pub enum Received {
    Connection(Connection),
    /// Nothing queued (only with `MSG_DONTWAIT`).
    Empty,
    /// Every accept end is closed and the queue is drained.
    Closed,
}

/// Why a receive failed.
#[derive(Debug)]
pub enum ReceiveError {
    /// The descriptor did not fit (`MSG_CTRUNC`): the process is out of
    /// descriptors, and the kernel closed the connection.
    DescriptorLost,
    /// A message arrived without exactly one descriptor, or truncated.
    Malformed,
    Os(Errno),
}

impl std::fmt::Display for ReceiveError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReceiveError::DescriptorLost => {
                write!(f, "a connection was lost: no free descriptor to receive it (too many open files)")
            }
            ReceiveError::Malformed => write!(f, "a malformed message arrived on the hand-off queue"),
            ReceiveError::Os(errno) => write!(f, "{}", errno.desc().to_lowercase()),
        }
    }
}

/// Receives one connection; the descriptor arrives close-on-exec (where
/// `MSG_CMSG_CLOEXEC` is missing, it is made so under the fork guard
/// before the receive returns, so no fork can copy it without it).
pub fn receive_connection(queue: BorrowedFd<'_>, flags: MsgFlags) -> Result<Received, ReceiveError> {
    let _no_fork = (!sys::CLOEXEC_IS_ATOMIC).then(fork_safety::hold_off_forks);
    let mut payload = [0u8; MAX_PAYLOAD];
    let mut cmsg_space = nix::cmsg_space!([RawFd; 1]);
    let mut iov = [IoSliceMut::new(&mut payload)];
    let message = match recvmsg::<()>(queue.as_raw_fd(), &mut iov, Some(&mut cmsg_space), flags | sys::RECEIVE_FLAGS) {
        Ok(message) => message,
        Err(Errno::EAGAIN) => return Ok(Received::Empty),
        // A datagram queue (macOS) reports its peer's close this way.
        Err(Errno::ECONNRESET) => return Ok(Received::Closed),
        Err(errno) => return Err(ReceiveError::Os(errno)),
    };

    // Take ownership of every descriptor first, so that no error path below
    // can leak one.
    let mut descriptors: Vec<OwnedFd> = Vec::new();
    if let Ok(cmsgs) = message.cmsgs() {
        for cmsg in cmsgs {
            if let ControlMessageOwned::ScmRights(fds) = cmsg {
                // SAFETY: the kernel just installed these descriptors in
                // this process for us; nothing else owns them.
                descriptors.extend(fds.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
            }
        }
    }
    if !sys::CLOEXEC_IS_ATOMIC {
        for descriptor in &descriptors {
            let _ = sys::set_cloexec(descriptor.as_fd());
        }
    }
    let truncated_control = message.flags.contains(MsgFlags::MSG_CTRUNC);
    let truncated_payload = message.flags.contains(MsgFlags::MSG_TRUNC);
    let length = message.bytes;

    if length == 0 && descriptors.is_empty() && !truncated_control {
        return Ok(Received::Closed);
    }
    if truncated_control {
        return Err(ReceiveError::DescriptorLost);
    }
    if truncated_payload || descriptors.len() != 1 {
        return Err(ReceiveError::Malformed);
    }
    let socket = descriptors.pop().expect("checked: exactly one descriptor");
    // A malformed payload drops the socket here: closed, not leaked.
    let (peer, accepted_at) = PeerBytes::decode(&payload[..length])?;
    Ok(Received::Connection(Connection { socket, peer, accepted_at, taken_at: 0 }))
}
