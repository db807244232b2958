//! Opening listeners against the real kernel.

use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use socketserver::listener::{host_string, open, OpenError};

#[test]
fn port_zero_listens_on_ipv4_and_ipv6_with_one_port() {
    let listeners = open(None, 0, 16).expect("open");
    assert!(listeners.port > 0);
    assert!(listeners.addresses.iter().all(|a| a.port() == listeners.port));
    assert!(listeners.addresses[0].is_ipv4());
    for socket in &listeners.sockets {
        let flags = FdFlag::from_bits_truncate(fcntl(socket.as_raw_fd(), FcntlArg::F_GETFD).unwrap());
        assert!(flags.contains(FdFlag::FD_CLOEXEC));
    }
    TcpStream::connect(("127.0.0.1", listeners.port)).expect("connect over IPv4");
}

#[test]
fn a_port_in_use_is_reported_as_eaddrinuse() {
    let other = TcpListener::bind("0.0.0.0:0").unwrap();
    let port = other.local_addr().unwrap().port();
    match open(None, port, 16) {
        Err(OpenError::Os(errno)) => assert_eq!(errno, nix::errno::Errno::EADDRINUSE),
        Err(other) => panic!("unexpected error {other:?}"),
        Ok(_) => panic!("bound a port that is in use"),
    }
}

#[test]
fn ipv4_mapped_addresses_print_as_ipv4() {
    assert_eq!(host_string("::ffff:127.0.0.1".parse().unwrap()), "127.0.0.1");
    assert_eq!(host_string("::1".parse().unwrap()), "::1");
}
