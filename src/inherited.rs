//! Listening sockets the process did not open itself: passed by descriptor
//! number (`server -fd N`) or by systemd socket activation (`server
//! -systemd name`).
//!
//! systemd passes them from descriptor 3 on (`SD_LISTEN_FDS_START`), with
//! `LISTEN_PID` (which must be this process), `LISTEN_FDS` (how many) and
//! `LISTEN_FDNAMES` (their names, colon-separated). The variables are read
//! once and removed from the environment, so that children and programs
//! they exec do not take the sockets again; what was read is remembered, so
//! several `server -systemd` calls can each take their own sockets.
//!
//! A server started by `pool upgrade` (the next generation of a running
//! one) gets its listeners the same way, and `server PORT` or `pool create
//! ... PORT` adopts a passed socket that listens on PORT instead of binding
//! a new one: the same script serves the first generation and the next.
//! The next generation also gets a pipe (`SOCKETSERVER_READY_FD`) on which
//! it says "ready" once it serves, so that the old one stops then; until
//! then it takes no connection off the shared listeners.
//!
//! A descriptor is checked before it is adopted (an open socket, TCP, IPv4
//! or IPv6, listening); a check that fails is an error and leaves the
//! descriptor alone: nothing is closed that we do not own.

use std::net::SocketAddr;
use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::socket::{getsockname, getsockopt, sockopt, SockType, SockaddrStorage};

use crate::listener::{self, Listeners};

/// The first descriptor systemd passes.
const LISTEN_FDS_START: RawFd = 3;
/// The environment variables of socket activation.
pub const SYSTEMD_VARIABLES: [&str; 3] = ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"];
/// The variable naming the readiness pipe of an upgrade.
pub const READY_VARIABLE: &str = "SOCKETSERVER_READY_FD";

/// Why a descriptor cannot be adopted, or systemd passed none that fits.
#[derive(Debug)]
pub enum AdoptError {
    Os { fd: RawFd, errno: Errno },
    NotListening { fd: RawFd, what: &'static str },
    OtherPort { fd: RawFd, port: u16, wanted: u16 },
    Systemd(String),
}

impl std::fmt::Display for AdoptError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AdoptError::Os { fd, errno } => write!(f, "couldn't adopt descriptor {fd}: {}", errno.desc()),
            AdoptError::NotListening { fd, what } => {
                write!(f, "descriptor {fd} is not a listening TCP socket: {what}")
            }
            AdoptError::OtherPort { fd, port, wanted } => {
                write!(f, "descriptor {fd} listens on port {port}, not {wanted}")
            }
            AdoptError::Systemd(message) => write!(f, "{message}"),
        }
    }
}

/// One socket passed by systemd.
struct Passed {
    fd: RawFd,
    name: String,
    taken: bool,
}

/// What systemd passed, read once: `None` until first asked.
static PASSED: Mutex<Option<Result<Vec<Passed>, String>>> = Mutex::new(None);
/// The readiness pipe of an upgrade, while nothing was said on it. Only
/// this process reports on it: a child forked meanwhile (a worker) closes
/// its copy at the fork (`forget_ready_in_child`).
static READY: Mutex<Option<OwnedFd>> = Mutex::new(None);

thread_local! {
    /// `READY`, locked by the forking thread across a fork.
    static READY_HELD: std::cell::RefCell<Option<std::sync::MutexGuard<'static, Option<OwnedFd>>>> =
        const { std::cell::RefCell::new(None) };
}

/// Registers, once, the fork step that closes a child's copy of the
/// readiness pipe.
fn forget_ready_in_child() {
    static REGISTERED: std::sync::Once = std::sync::Once::new();
    REGISTERED.call_once(|| {
        crate::fork_safety::on_fork(
            || {
                let _ = READY_HELD
                    .try_with(|held| *held.borrow_mut() = Some(READY.lock().unwrap_or_else(|p| p.into_inner())));
            },
            || {
                let _ = READY_HELD.try_with(|held| held.borrow_mut().take());
            },
            || {
                let _ = READY_HELD.try_with(|held| {
                    if let Some(mut ready) = held.borrow_mut().take() {
                        // close(2) only: the pipe is the parent's to report on.
                        drop(ready.take());
                    }
                });
            },
        )
    });
}

/// Reads the socket-activation variables (once) and removes them from this
/// process's environment with `unset`, which the caller runs (the Tcl
/// `env` array must learn of it too).
fn read_environment(unset: &mut dyn FnMut(&str)) -> Result<Vec<Passed>, String> {
    let variable = |name: &str| std::env::var(name).ok();
    let (pid, count, names) = (variable("LISTEN_PID"), variable("LISTEN_FDS"), variable("LISTEN_FDNAMES"));
    let ready = variable(READY_VARIABLE);
    for name in SYSTEMD_VARIABLES.into_iter().chain([READY_VARIABLE]) {
        unset(name);
    }
    let for_me = pid.as_deref().and_then(|p| p.parse::<u32>().ok()) == Some(std::process::id());
    if let Some(fd) = ready.and_then(|fd| fd.parse::<RawFd>().ok()).filter(|&fd| for_me && fd > 2) {
        if fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).is_ok() {
            forget_ready_in_child();
            // SAFETY: the previous generation passed this pipe to us alone.
            *READY.lock().unwrap_or_else(|p| p.into_inner()) = Some(unsafe { OwnedFd::from_raw_fd(fd) });
            // The previous generation serves until we say ready: we take
            // no connection before then, so none is lost if we fail.
            crate::accept_loop::hold_accepting();
        }
    }
    let Some(count) = count else {
        return Err("no sockets were passed by systemd (LISTEN_FDS is not set)".into());
    };
    let me = std::process::id();
    match pid.as_deref().map(str::parse::<u32>) {
        Some(Ok(pid)) if pid == me => {}
        Some(_) => {
            return Err(format!(
                "the sockets systemd passed are for process {}, not this one ({me})",
                pid.unwrap_or_default()
            ))
        }
        None => return Err("LISTEN_PID is not set: the sockets are not meant for this process".into()),
    }
    let count: RawFd = count.parse().map_err(|_| format!("LISTEN_FDS is not a number: \"{count}\""))?;
    let names: Vec<String> = names.map(|n| n.split(':').map(String::from).collect()).unwrap_or_default();
    Ok((0..count.max(0))
        .map(|i| Passed {
            fd: LISTEN_FDS_START + i,
            name: names.get(i as usize).cloned().unwrap_or_else(|| "unknown".into()),
            taken: false,
        })
        .collect())
}

/// The descriptors systemd passed whose names match `pattern` (Tcl's
/// `string match`) and that no earlier call took.
pub fn systemd_descriptors(
    pattern: &str,
    matches: &dyn Fn(&str, &str) -> bool,
    unset: &mut dyn FnMut(&str),
) -> Result<Vec<RawFd>, AdoptError> {
    let mut passed = PASSED.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let passed = passed.get_or_insert_with(|| read_environment(unset));
    let sockets = passed.as_mut().map_err(|message| AdoptError::Systemd(message.clone()))?;
    let fds: Vec<RawFd> = sockets.iter().filter(|s| !s.taken && matches(pattern, &s.name)).map(|s| s.fd).collect();
    if fds.is_empty() {
        let names: Vec<&str> = sockets.iter().map(|s| s.name.as_str()).collect();
        return Err(AdoptError::Systemd(format!(
            "no socket named \"{pattern}\" among those systemd passed ({})",
            if names.is_empty() { "none".to_string() } else { names.join(", ") }
        )));
    }
    Ok(fds)
}

/// The passed sockets, not taken yet, that listen on `port` (none when no
/// socket was passed).
pub fn descriptors_for_port(port: u16, unset: &mut dyn FnMut(&str)) -> Vec<RawFd> {
    let mut passed = PASSED.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let passed = passed.get_or_insert_with(|| read_environment(unset));
    let Ok(sockets) = passed.as_ref() else { return Vec::new() };
    sockets.iter().filter(|s| !s.taken && check(s.fd).is_ok_and(|a| a.port() == port)).map(|s| s.fd).collect()
}

/// Says "ready" to the previous generation, once every socket it passed
/// has been adopted; `pools_ready` tells whether the pools made so far
/// have all their workers.
pub fn announce_ready_if_done(pools_ready: bool) {
    let all_taken = match PASSED.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
        Some(Ok(sockets)) => sockets.iter().all(|s| s.taken),
        _ => true,
    };
    if !all_taken || !pools_ready {
        return;
    }
    if let Some(pipe) = READY.lock().unwrap_or_else(|p| p.into_inner()).take() {
        // The pid file names us before the old generation stops.
        crate::pool::commit_deferred_pid_files();
        crate::accept_loop::release_accepting();
        let _ = nix::unistd::write(&pipe, b"ready");
    }
}

/// Whether this process is a next generation that has not said "ready".
pub fn ready_pending() -> bool {
    READY.lock().unwrap_or_else(|p| p.into_inner()).is_some()
}

/// Marks systemd's sockets as taken once they are adopted.
pub fn mark_taken(fds: &[RawFd]) {
    let mut passed = PASSED.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(Ok(sockets)) = passed.as_mut() {
        sockets.iter_mut().filter(|s| fds.contains(&s.fd)).for_each(|s| s.taken = true);
    }
}

/// Checks every descriptor, then takes ownership of all of them (or of
/// none): they must listen on one port, `wanted` unless it is 0.
pub fn adopt(fds: &[RawFd], wanted: u16) -> Result<Listeners, AdoptError> {
    let mut addresses = Vec::new();
    for &fd in fds {
        let address = check(fd)?;
        if wanted != 0 && address.port() != wanted {
            return Err(AdoptError::OtherPort { fd, port: address.port(), wanted });
        }
        if let Some(first) = addresses.first().map(|a: &SocketAddr| a.port()) {
            if first != address.port() {
                return Err(AdoptError::OtherPort { fd, port: address.port(), wanted: first });
            }
        }
        addresses.push(address);
    }
    let mut sockets = Vec::new();
    for &fd in fds {
        // Ours from now on, and not to be inherited by programs we exec
        // (systemd passes them without close-on-exec).
        let _ = fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
        // SAFETY: `check` found an open socket; the caller hands it to us.
        sockets.push(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    let port = addresses.first().map_or(0, |a| a.port());
    Ok(Listeners { sockets, port, addresses, backlog: 0 })
}

/// What a descriptor must be: an open TCP socket (IPv4 or IPv6) that listens.
fn check(fd: RawFd) -> Result<SocketAddr, AdoptError> {
    if fd < 0 {
        return Err(AdoptError::Os { fd, errno: Errno::EBADF });
    }
    fcntl(fd, FcntlArg::F_GETFD).map_err(|errno| AdoptError::Os { fd, errno })?;
    // SAFETY: the descriptor is open (F_GETFD succeeded); we only query it.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    let not = |what| AdoptError::NotListening { fd, what };
    match getsockopt(&borrowed, sockopt::SockType) {
        Ok(SockType::Stream) => {}
        Ok(_) => return Err(not("not a stream socket")),
        Err(Errno::ENOTSOCK) => return Err(not("not a socket")),
        Err(errno) => return Err(AdoptError::Os { fd, errno }),
    }
    let local: SockaddrStorage = getsockname(fd).map_err(|errno| AdoptError::Os { fd, errno })?;
    let address = listener::to_socket_addr(&local).ok_or_else(|| not("not an IPv4 or IPv6 socket"))?;
    match getsockopt(&borrowed, sockopt::AcceptConn) {
        Ok(true) => Ok(address),
        Ok(false) => Err(not("it does not listen")),
        Err(errno) => Err(AdoptError::Os { fd, errno }),
    }
}
