//! The hand-off queue against the real kernel: descriptors cross a fork,
//! messages keep their boundaries, every descriptor is close-on-exec, and
//! a descriptor that cannot be received is reported, not ignored.

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use nix::sys::socket::MsgFlags;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult};

use socketserver::handoff::{new_queue, receive_connection, send_connection, Connection, ReceiveError, Received};

fn is_cloexec(fd: &impl AsRawFd) -> bool {
    let flags = fcntl(fd.as_raw_fd(), FcntlArg::F_GETFD).expect("F_GETFD");
    FdFlag::from_bits_truncate(flags).contains(FdFlag::FD_CLOEXEC)
}

/// A connected stream pair standing in for an accepted TCP socket.
fn stream_pair() -> (OwnedFd, UnixStream) {
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    (OwnedFd::from(ours), theirs)
}

fn receive(queue: &OwnedFd) -> Connection {
    match receive_connection(queue.as_fd(), MsgFlags::MSG_DONTWAIT) {
        Ok(Received::Connection(conn)) => conn,
        other => panic!("expected a connection, got {other:?}"),
    }
}

#[test]
fn both_ends_of_the_queue_are_close_on_exec() {
    let (accept_end, worker_end) = new_queue().unwrap();
    assert!(is_cloexec(&accept_end));
    assert!(is_cloexec(&worker_end));
}

#[test]
fn a_connection_crosses_a_fork_with_its_peer_address() {
    let (accept_end, worker_end) = new_queue().unwrap();
    let (socket, mut far_end) = stream_pair();
    match unsafe { fork() }.expect("fork") {
        ForkResult::Child => {
            // The child is the accepting side: send, then leave at once.
            let conn =
                Connection { socket, peer: Some("192.0.2.7:4242".parse().unwrap()), accepted_at: 7, taken_at: 0 };
            let ok = send_connection(accept_end.as_fd(), &conn, MsgFlags::empty()).is_ok();
            unsafe { libc::_exit(if ok { 0 } else { 1 }) };
        }
        ForkResult::Parent { child } => {
            drop(socket);
            assert_eq!(waitpid(child, None).unwrap(), WaitStatus::Exited(child, 0));
            let conn = match receive_connection(worker_end.as_fd(), MsgFlags::empty()) {
                Ok(Received::Connection(conn)) => conn,
                other => panic!("expected a connection, got {other:?}"),
            };
            assert_eq!(conn.peer_host_and_port(), ("192.0.2.7".into(), "4242".into()));
            assert_eq!(conn.accepted_at, 7, "the accept time crosses with the connection");
            assert!(is_cloexec(&conn.socket), "received descriptors must be close-on-exec");
            // The received descriptor is the same socket: bytes go through.
            let mut received = std::fs::File::from(conn.socket);
            received.write_all(b"ping").unwrap();
            let mut buffer = [0u8; 4];
            far_end.read_exact(&mut buffer).unwrap();
            assert_eq!(&buffer, b"ping");
        }
    }
}

#[test]
fn one_message_carries_one_connection() {
    let (accept_end, worker_end) = new_queue().unwrap();
    let mut far_ends = Vec::new();
    for i in 0..3 {
        let (socket, far_end) = stream_pair();
        far_ends.push(far_end);
        let conn =
            Connection { socket, peer: Some(format!("127.0.0.1:{i}").parse().unwrap()), accepted_at: 7, taken_at: 0 };
        send_connection(accept_end.as_fd(), &conn, MsgFlags::empty()).unwrap();
    }
    for (i, far_end) in far_ends.iter_mut().enumerate() {
        let conn = receive(&worker_end);
        assert_eq!(conn.peer_text(), format!("127.0.0.1 {i}"));
        let mut stream = std::fs::File::from(conn.socket);
        stream.write_all(&[i as u8]).unwrap();
        let mut byte = [0u8; 1];
        far_end.read_exact(&mut byte).unwrap();
        assert_eq!(byte[0], i as u8, "connection {i} arrived in order");
    }
    assert!(matches!(receive_connection(worker_end.as_fd(), MsgFlags::MSG_DONTWAIT), Ok(Received::Empty)));
}

#[test]
fn queued_connections_outlive_the_accept_end() {
    let (accept_end, worker_end) = new_queue().unwrap();
    let (socket, _far_end) = stream_pair();
    send_connection(
        accept_end.as_fd(),
        &Connection { socket, peer: Some("[::1]:1".parse().unwrap()), accepted_at: 7, taken_at: 0 },
        MsgFlags::empty(),
    )
    .unwrap();
    drop(accept_end);
    assert_eq!(receive(&worker_end).peer_text(), "::1 1");
    assert!(matches!(receive_connection(worker_end.as_fd(), MsgFlags::MSG_DONTWAIT), Ok(Received::Closed)));
}

#[test]
fn a_message_without_a_descriptor_is_malformed() {
    let (accept_end, worker_end) = new_queue().unwrap();
    let mut raw = UnixStream::from(accept_end);
    raw.write_all(b"127.0.0.1 1").unwrap();
    assert!(matches!(receive_connection(worker_end.as_fd(), MsgFlags::MSG_DONTWAIT), Err(ReceiveError::Malformed)));
}

#[test]
fn a_descriptor_that_does_not_fit_is_reported() {
    let (accept_end, worker_end) = new_queue().unwrap();
    let (socket, _far_end) = stream_pair();
    send_connection(
        accept_end.as_fd(),
        &Connection { socket, peer: Some("127.0.0.1:9".parse().unwrap()), accepted_at: 7, taken_at: 0 },
        MsgFlags::empty(),
    )
    .unwrap();
    match unsafe { fork() }.expect("fork") {
        ForkResult::Child => {
            // No descriptor number is free: the kernel must truncate the
            // control message (MSG_CTRUNC), and we must say so.
            let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
            let highest = worker_end.as_raw_fd().max(accept_end.as_raw_fd()) as u64;
            let mut fillers = Vec::new();
            setrlimit(Resource::RLIMIT_NOFILE, highest + 1, hard).unwrap();
            while let Ok(fd) = nix::unistd::dup(worker_end.as_raw_fd()) {
                fillers.push(fd);
            }
            let outcome = receive_connection(worker_end.as_fd(), MsgFlags::MSG_DONTWAIT);
            let code = if matches!(outcome, Err(ReceiveError::DescriptorLost)) { 0 } else { 1 };
            unsafe { libc::_exit(code) };
        }
        ForkResult::Parent { child } => {
            assert_eq!(waitpid(child, None).unwrap(), WaitStatus::Exited(child, 0));
        }
    }
}

#[test]
fn an_ipv4_peer_on_an_ipv6_socket_is_reported_as_ipv4() {
    let (accept_end, worker_end) = new_queue().unwrap();
    let (socket, _far_end) = stream_pair();
    let mapped =
        Connection { socket, peer: Some("[::ffff:127.0.0.1]:80".parse().unwrap()), accepted_at: 7, taken_at: 0 };
    send_connection(accept_end.as_fd(), &mapped, MsgFlags::empty()).unwrap();
    assert_eq!(receive(&worker_end).peer_host_and_port(), ("127.0.0.1".into(), "80".into()));
}

#[test]
fn a_descriptor_with_a_foreign_payload_is_malformed_and_closed() {
    use nix::sys::socket::{sendmsg, ControlMessage};
    let (accept_end, worker_end) = new_queue().unwrap();
    let (socket, mut far_end) = stream_pair();
    let fds = [socket.as_raw_fd()];
    // A family byte no sender of ours writes.
    sendmsg::<()>(
        accept_end.as_raw_fd(),
        &[std::io::IoSlice::new(&[9, 0, 80])],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .unwrap();
    drop(socket);
    assert!(matches!(receive_connection(worker_end.as_fd(), MsgFlags::MSG_DONTWAIT), Err(ReceiveError::Malformed)));
    // The received copy was closed: the far end reads end of file.
    let mut buffer = [0u8; 1];
    assert_eq!(far_end.read(&mut buffer).unwrap(), 0);
}
