//! Opening the listening sockets of a port, the way Tcl's `socket -server`
//! does: without an address, one socket for every IPv4 address and one for
//! every IPv6 address (`IPV6_V6ONLY`); with one, a socket for each address
//! it resolves to. All are non-blocking, close-on-exec and `SO_REUSEADDR`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::sys::socket::{
    bind, getpeername, getsockname, listen, setsockopt, sockopt, AddressFamily, Backlog, SockType, SockaddrStorage,
};

use crate::fork_safety;
use crate::sys;

/// The sockets listening for one port.
pub struct Listeners {
    pub sockets: Vec<OwnedFd>,
    pub port: u16,
    /// The address of each socket, in the order of `sockets`.
    pub addresses: Vec<SocketAddr>,
    /// The backlog in force: `listen()` caps it at SOMAXCONN.
    pub backlog: i32,
}

#[derive(Debug)]
pub enum OpenError {
    /// A system call failed, e.g. `EADDRINUSE`.
    Os(Errno),
    /// `-myaddr` did not resolve.
    Resolve(String),
}

/// How many times to retry when port 0's choice on IPv4 is taken on IPv6.
const EPHEMERAL_RETRIES: usize = 16;

pub fn open(myaddr: Option<&str>, port: u16, backlog: i32) -> Result<Listeners, OpenError> {
    let backlog = backlog.clamp(1, libc::SOMAXCONN);
    let (addresses, all_interfaces) = match myaddr {
        None => (vec![IpAddr::V4(Ipv4Addr::UNSPECIFIED), IpAddr::V6(Ipv6Addr::UNSPECIFIED)], true),
        Some(host) => (resolve(host)?, false),
    };
    let mut attempts = 0;
    loop {
        match open_all(&addresses, all_interfaces, port, backlog) {
            Err(OpenError::Os(Errno::EADDRINUSE)) if port == 0 && attempts < EPHEMERAL_RETRIES => {
                attempts += 1;
            }
            other => return other,
        }
    }
}

fn resolve(host: &str) -> Result<Vec<IpAddr>, OpenError> {
    let resolved = (host, 0u16).to_socket_addrs().map_err(|e| {
        let text = e.to_string();
        let reason = text.strip_prefix("failed to lookup address information: ").unwrap_or(&text).to_string();
        OpenError::Resolve(reason)
    })?;
    let mut addresses: Vec<IpAddr> = Vec::new();
    for address in resolved {
        if !addresses.contains(&address.ip()) {
            addresses.push(address.ip());
        }
    }
    if addresses.is_empty() {
        return Err(OpenError::Resolve("no address found".into()));
    }
    Ok(addresses)
}

fn open_all(
    addresses: &[IpAddr],
    all_interfaces: bool,
    requested_port: u16,
    backlog: i32,
) -> Result<Listeners, OpenError> {
    let mut listeners = Listeners { sockets: Vec::new(), port: requested_port, addresses: Vec::new(), backlog };
    let mut first_error = None;
    for ip in addresses {
        // Later sockets take the port the first one got, as Tcl does for port 0.
        let port = if listeners.sockets.is_empty() { requested_port } else { listeners.port };
        match open_one(SocketAddr::new(*ip, port), backlog) {
            Ok((socket, bound)) => {
                listeners.port = bound.port();
                listeners.sockets.push(socket);
                listeners.addresses.push(bound);
            }
            // A machine without IPv6 still serves IPv4 when no address was named.
            Err(Errno::EAFNOSUPPORT | Errno::EADDRNOTAVAIL) if all_interfaces && ip.is_ipv6() => {}
            Err(errno) => {
                if all_interfaces || !listeners.sockets.is_empty() {
                    return Err(OpenError::Os(errno));
                }
                first_error.get_or_insert(errno);
            }
        }
    }
    if listeners.sockets.is_empty() {
        return Err(OpenError::Os(first_error.unwrap_or(Errno::EADDRNOTAVAIL)));
    }
    Ok(listeners)
}

fn open_one(address: SocketAddr, backlog: i32) -> Result<(OwnedFd, SocketAddr), Errno> {
    let family = match address {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let socket = {
        let _no_fork = (!sys::CLOEXEC_IS_ATOMIC).then(fork_safety::hold_off_forks);
        sys::socket_cloexec_nonblock(family, SockType::Stream)?
    };
    setsockopt(&socket, sockopt::ReuseAddr, &true)?;
    if address.is_ipv6() {
        setsockopt(&socket, sockopt::Ipv6V6Only, &true)?;
    }
    bind(socket.as_raw_fd(), &SockaddrStorage::from(address))?;
    listen(&socket, Backlog::new(backlog).unwrap_or(Backlog::MAXCONN))?;
    let bound = local_address(&socket)?;
    Ok((socket, bound))
}

fn local_address(socket: &OwnedFd) -> Result<SocketAddr, Errno> {
    let storage: SockaddrStorage = getsockname(socket.as_raw_fd())?;
    to_socket_addr(&storage).ok_or(Errno::EAFNOSUPPORT)
}

pub fn to_socket_addr(storage: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = storage.as_sockaddr_in() {
        Some(SocketAddr::new(IpAddr::V4(v4.ip()), v4.port()))
    } else {
        storage.as_sockaddr_in6().map(|v6| SocketAddr::new(IpAddr::V6(v6.ip()), v6.port()))
    }
}

/// An address as Tcl prints it: IPv4-mapped IPv6 addresses in IPv4 form.
pub fn host_string(ip: IpAddr) -> String {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => v6.to_string(),
        },
        IpAddr::V4(v4) => v4.to_string(),
    }
}

/// Closes this process's copies of connections accepted on `listening`
/// addresses: TCP sockets, connected, whose local address is one of them.
/// For a process that serves no connection yet (a pool's new worker); the
/// listeners themselves are closed already, so a socket with that local
/// address is an accepted connection.
pub fn close_copied_connections(listening: &[SocketAddr]) {
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else { return };
    let fds: Vec<RawFd> =
        entries.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).filter(|&fd| fd > 2).collect();
    for fd in fds {
        let Ok(local) = getsockname::<SockaddrStorage>(fd) else { continue };
        let Some(local) = to_socket_addr(&local) else { continue };
        let accepted_here = listening.iter().any(|l| {
            l.port() == local.port()
                && (l.ip().is_unspecified() || l.ip() == local.ip() || Some(l.ip()) == mapped(local.ip()))
        });
        if accepted_here && getpeername::<SockaddrStorage>(fd).is_ok() {
            let _ = nix::unistd::close(fd);
        }
    }
}

/// The IPv4 address inside an IPv4-mapped IPv6 one.
fn mapped(ip: IpAddr) -> Option<IpAddr> {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4),
        IpAddr::V4(_) => None,
    }
}
