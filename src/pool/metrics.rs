//! `pool create -metrics ?addr:?port`: the pool's figures in the
//! Prometheus text exposition format, `GET /metrics`, served by the
//! supervisor from its Tcl event loop. Every figure is read on the scrape,
//! from the scoreboard and the supervisor's totals: nothing is counted for
//! it, and the accepting threads never see a scraper.
//!
//! A scraper is a guest: it gets `MAX_REQUEST` bytes to say what it wants
//! and `DEADLINE` to take the answer, `MAX_CLIENTS` of them at once, and
//! every socket is non-blocking, so that a slow or silent one can delay
//! nothing else. Anything but `GET` (or `HEAD`) of `/metrics` is a 405 or a
//! 404. The text is written by hand (`Exposition`): a dozen families of
//! plain numbers need no registry.
//!
//! This file is the endpoint's sockets, below the pool's data;
//! `metrics_exposition` answers a scrape with the pool's figures.
//!
//! The sockets belong to the supervisor alone: every child of a fork
//! closes its copies at once (`watch_forks`), so a worker never holds the
//! metrics port, and they are close-on-exec.

use std::cell::Cell;
use std::ffi::c_void;
use std::io::{ErrorKind, Read, Write};
use std::mem::ManuallyDrop;
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Mutex, MutexGuard, Once};
use std::time::{Duration, Instant};

use nix::unistd::{getpid, Pid};

use crate::tcl::{self, TclError, TclResult};

/// The most a scraper may send before its request ends.
const MAX_REQUEST: usize = 8192;
/// How long a scraper has, from its connect to the last byte of the answer
/// (Prometheus's default scrape timeout is 10 s, its requests take
/// milliseconds).
const DEADLINE: Duration = Duration::from_secs(5);
/// Scrapers served at once; more are closed at once.
const MAX_CLIENTS: usize = 16;

/// What Tcl calls when a metrics socket is readable.
pub(super) type Handler = unsafe extern "C" fn(*mut c_void, std::ffi::c_int);

/// Every metrics socket of the process, closed in each child at a fork.
static OPEN: Mutex<Vec<RawFd>> = Mutex::new(Vec::new());

thread_local! {
    /// Whether this thread has file handlers on metrics sockets: a child
    /// forked from it removes them before closing the sockets.
    static HANDLERS_HERE: Cell<bool> = const { Cell::new(false) };
    static OPEN_HELD: std::cell::RefCell<Option<MutexGuard<'static, Vec<RawFd>>>> =
        const { std::cell::RefCell::new(None) };
}

fn open_fds() -> MutexGuard<'static, Vec<RawFd>> {
    OPEN.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A socket of the supervisor's: registered in `OPEN` while it lives,
/// closed by its drop only in the process that opened it (a forked child
/// closed its copy at the fork, and the number may be another file now).
pub(super) struct Owned<T: AsRawFd> {
    pub(super) inner: ManuallyDrop<T>,
    pid: Pid,
    handled: bool,
}

impl<T: AsRawFd> Owned<T> {
    fn new(inner: T) -> Owned<T> {
        let mut open = open_fds();
        open.push(inner.as_raw_fd());
        Owned { inner: ManuallyDrop::new(inner), pid: getpid(), handled: false }
    }

    /// Calls `handler` on this thread when the socket is readable.
    fn watch(&mut self, key: usize, handler: Handler) {
        HANDLERS_HERE.with(|here| here.set(true));
        tcl::create_file_handler(self.inner.as_raw_fd(), handler, key as *mut c_void);
        self.handled = true;
    }

    /// Stops calling its handler for the socket.
    fn unwatch(&mut self) {
        if self.handled {
            tcl::delete_file_handler(self.inner.as_raw_fd());
            self.handled = false;
        }
    }
}

impl<T: AsRawFd> Drop for Owned<T> {
    fn drop(&mut self) {
        if self.pid != getpid() {
            return;
        }
        let fd = self.inner.as_raw_fd();
        if self.handled {
            tcl::delete_file_handler(fd);
        }
        open_fds().retain(|&open| open != fd);
        // SAFETY: dropped once, here, in the process that owns it.
        unsafe { ManuallyDrop::drop(&mut self.inner) };
    }
}

/// Closes every metrics socket in the child of any fork of the process.
fn watch_forks() {
    static REGISTERED: Once = Once::new();
    REGISTERED.call_once(|| {
        crate::fork_safety::on_fork(
            || {
                let open = open_fds();
                let _ = OPEN_HELD.try_with(|held| *held.borrow_mut() = Some(open));
            },
            || {
                let _ = OPEN_HELD.try_with(|held| held.borrow_mut().take());
            },
            || {
                let here = HANDLERS_HERE.try_with(|here| here.replace(false)).unwrap_or(false);
                let _ = OPEN_HELD.try_with(|held| {
                    if let Some(mut open) = held.borrow_mut().take() {
                        for fd in open.drain(..) {
                            if here {
                                tcl::delete_file_handler(fd);
                            }
                            let _ = nix::unistd::close(fd);
                        }
                    }
                });
            },
        )
    });
}

/// A bound metrics socket, not served yet (`pool create` binds it before
/// the pool's port opens, so that a taken address leaves nothing behind).
pub struct Bound {
    listener: Owned<TcpListener>,
    address: SocketAddr,
}

/// The `-metrics` value: `port`, `addr:port` or `[ipv6]:port`; loopback
/// where no address is given (SPEC 12: operator endpoints stay local).
pub fn bind(spec: &str) -> TclResult<Bound> {
    let bad =
        || TclError::new(format!("expected port or address:port but got \"{spec}\""), &["TCL", "VALUE", "METRICS"]);
    let (host, port) = match spec.rsplit_once(':') {
        // An IPv6 address is in brackets, whole: `[::1]:9100`.
        Some((host, port)) if host.starts_with('[') || host.ends_with(']') => {
            match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
                Some(inner) if inner.contains(':') => (inner, port),
                _ => return Err(bad()),
            }
        }
        Some((host, _)) if host.contains(':') || host.contains('[') || host.contains(']') => return Err(bad()),
        Some((host, port)) => (host, port),
        None => ("127.0.0.1", spec),
    };
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host.is_empty() {
        return Err(bad());
    }
    let address = (host, port).to_socket_addrs().ok().and_then(|mut all| all.next()).ok_or_else(|| {
        TclError::new(format!("couldn't open metrics socket: unknown host \"{host}\""), &["TCL", "VALUE", "METRICS"])
    })?;
    watch_forks();
    let listener = {
        // The socket must be known to the fork step before any fork.
        let _no_fork = crate::fork_safety::hold_off_forks();
        TcpListener::bind(address).map(Owned::new)
    }
    .map_err(|e| TclError::posix("couldn't open metrics socket", e.raw_os_error().unwrap_or(0)))?;
    listener
        .inner
        .set_nonblocking(true)
        .map_err(|e| TclError::posix("couldn't open metrics socket", e.raw_os_error().unwrap_or(0)))?;
    let address = listener.inner.local_addr().unwrap_or(address);
    Ok(Bound { listener, address })
}

/// A scraper's connection.
struct Client {
    stream: Owned<TcpStream>,
    request: Vec<u8>,
    /// The answer, and how much of it is written.
    answer: Option<(Vec<u8>, usize)>,
    deadline: Instant,
}

/// The metrics endpoint of one pool.
pub struct Endpoint {
    pub(super) listener: Option<Owned<TcpListener>>,
    address: SocketAddr,
    port: u16,
    clients: Vec<Client>,
    /// The busy seconds reported last: a worker between two updates of its
    /// slot may look a millisecond less busy, and a counter never goes back.
    pub(super) busy_reported: Cell<u64>,
    /// Called when one of its sockets is readable (`metrics_exposition`:
    /// the pool's figures).
    handler: Handler,
}

impl Endpoint {
    /// Serves `bound` for the pool on `port`, from this thread's event loop:
    /// `handler` is called with `key(port, fd)` when a socket is readable.
    pub fn serve(port: u16, mut bound: Bound, handler: Handler) -> Endpoint {
        bound.listener.watch(key(port, bound.listener.inner.as_raw_fd()), handler);
        Endpoint {
            listener: Some(bound.listener),
            address: bound.address,
            port,
            clients: Vec::new(),
            busy_reported: Cell::new(0),
            handler,
        }
    }

    /// Where it listens, as `pool info` shows it ("127.0.0.1:9100").
    pub fn address(&self) -> String {
        self.address.to_string()
    }

    /// The thread's notifier is gone (the thread ends): its sockets are
    /// closed without removing their file handlers.
    pub fn forget_handlers(&mut self) {
        self.listener.iter_mut().for_each(|l| l.handled = false);
        self.clients.iter_mut().for_each(|c| c.stream.handled = false);
    }

    /// Stops listening while a next generation starts (it binds the same
    /// address); scrapers already connected are answered.
    pub fn pause(&mut self) {
        self.listener = None;
    }

    /// Whether it does not listen now (`pause`).
    pub fn paused(&self) -> bool {
        self.listener.is_none()
    }

    /// Listens again after a next generation failed; the error if the
    /// address is taken (the caller tries again later).
    pub fn resume(&mut self) -> Result<(), String> {
        if self.listener.is_some() {
            return Ok(());
        }
        match bind(&self.address.to_string()) {
            Ok(Bound { mut listener, .. }) => {
                listener.watch(key(self.port, listener.inner.as_raw_fd()), self.handler);
                self.listener = Some(listener);
                Ok(())
            }
            Err(TclError::Message { message, .. }) => Err(message),
            Err(TclError::AlreadySet) => Err("couldn't open metrics socket".into()),
        }
    }

    pub(super) fn accept(&mut self) {
        let Some(listener) = &self.listener else { return };
        loop {
            // Known to the fork step before any fork can copy it.
            let no_fork = crate::fork_safety::hold_off_forks();
            let stream = match listener.inner.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            if self.clients.len() >= MAX_CLIENTS {
                // The one that has waited longest makes room: a flood of
                // silent connections cannot lock Prometheus out.
                self.clients.remove(0);
            }
            let mut stream = Owned::new(stream);
            drop(no_fork);
            stream.watch(key(self.port, stream.inner.as_raw_fd()), self.handler);
            self.clients.push(Client {
                stream,
                request: Vec::new(),
                answer: None,
                deadline: Instant::now() + DEADLINE,
            });
        }
    }

    /// Reads what client `fd` sent; its request line once complete.
    pub(super) fn read(&mut self, fd: RawFd) -> Option<Result<String, &'static [u8]>> {
        let index = self.clients.iter().position(|c| c.stream.inner.as_raw_fd() == fd)?;
        let client = &mut self.clients[index];
        if client.answer.is_some() {
            // Whatever it sends after its request is not read. At its end
            // of file (a scraper that half-closed) the answer may still be
            // on its way: it is written on the ticks, and the socket, always
            // readable now, is no longer watched.
            let mut sink = [0u8; 512];
            if matches!((&*client.stream.inner).read(&mut sink), Ok(0)) {
                client.stream.unwatch();
            }
            return None;
        }
        let mut buffer = [0u8; 2048];
        let mut ended = false;
        loop {
            match (&*client.stream.inner).read(&mut buffer) {
                Ok(0) => {
                    // A complete request followed by the end of file
                    // (`nc -N`, `close $s write`) is answered all the same.
                    ended = true;
                    break;
                }
                Ok(n) => client.request.extend_from_slice(&buffer[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.clients.remove(index);
                    return None;
                }
            }
            if client.request.len() > MAX_REQUEST {
                break;
            }
        }
        let request = &client.request;
        let end = request.windows(4).any(|w| w == b"\r\n\r\n") || request.windows(2).any(|w| w == b"\n\n");
        if request.len() > MAX_REQUEST {
            Some(Err(b"431 Request Header Fields Too Large"))
        } else if end {
            let line = request.split(|&b| b == b'\n').next().unwrap_or_default();
            let line = String::from_utf8_lossy(line).trim_end().to_string();
            if ended {
                client.stream.unwatch();
            }
            Some(Ok(line))
        } else {
            if ended {
                self.clients.remove(index);
            }
            None
        }
    }

    /// Starts writing `answer` to client `fd`.
    pub(super) fn answer(&mut self, fd: RawFd, answer: Vec<u8>) {
        if let Some(client) = self.clients.iter_mut().find(|c| c.stream.inner.as_raw_fd() == fd) {
            client.answer = Some((answer, 0));
        }
        self.write_pending();
    }

    /// Writes what the socket takes now; closes clients that are done or
    /// past their deadline.
    pub(super) fn write_pending(&mut self) {
        let now = Instant::now();
        self.clients.retain_mut(|client| {
            if let Some((answer, written)) = &mut client.answer {
                while *written < answer.len() {
                    match (&*client.stream.inner).write(&answer[*written..]) {
                        Ok(n) => *written += n,
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(_) => return false,
                    }
                }
                if *written == answer.len() {
                    let _ = client.stream.inner.shutdown(std::net::Shutdown::Write);
                    return false;
                }
            }
            now < client.deadline
        });
    }
}

/// A file handler's word: the pool's port and the socket.
pub(super) fn key(port: u16, fd: RawFd) -> usize {
    (usize::from(port) << 32) | fd as u32 as usize
}
