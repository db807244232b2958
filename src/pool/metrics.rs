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
//! The sockets belong to the supervisor alone: every child of a fork
//! closes its copies at once (`watch_forks`), so a worker never holds the
//! metrics port, and they are close-on-exec.

use std::cell::Cell;
use std::ffi::c_void;
use std::fmt::Write as _;
use std::io::{ErrorKind, Read, Write};
use std::mem::ManuallyDrop;
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Mutex, MutexGuard, Once};
use std::time::{Duration, Instant};

use nix::unistd::{getpid, Pid};

use crate::tcl::{self, TclError, TclResult};

use super::lifecycle::{Phase, Pool, Reload};
use super::scoreboard::{now_millis, State};
use super::supervisor::with_supervisor;

/// The most a scraper may send before its request ends.
const MAX_REQUEST: usize = 8192;
/// How long a scraper has, from its connect to the last byte of the answer
/// (Prometheus's default scrape timeout is 10 s, its requests take
/// milliseconds).
const DEADLINE: Duration = Duration::from_secs(5);
/// Scrapers served at once; more are closed at once.
const MAX_CLIENTS: usize = 16;

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
struct Owned<T: AsRawFd> {
    inner: ManuallyDrop<T>,
    pid: Pid,
    handled: bool,
}

impl<T: AsRawFd> Owned<T> {
    fn new(inner: T) -> Owned<T> {
        let mut open = open_fds();
        open.push(inner.as_raw_fd());
        Owned { inner: ManuallyDrop::new(inner), pid: getpid(), handled: false }
    }

    /// Calls `on_readable` on this thread when the socket is readable.
    fn watch(&mut self, key: usize) {
        HANDLERS_HERE.with(|here| here.set(true));
        tcl::create_file_handler(self.inner.as_raw_fd(), on_readable, key as *mut c_void);
        self.handled = true;
    }

    /// Stops calling `on_readable` for the socket.
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
    listener: Option<Owned<TcpListener>>,
    address: SocketAddr,
    port: u16,
    clients: Vec<Client>,
    /// The busy seconds reported last: a worker between two updates of its
    /// slot may look a millisecond less busy, and a counter never goes back.
    busy_reported: Cell<u64>,
}

impl Endpoint {
    /// Serves `bound` for the pool on `port`, from this thread's event loop.
    pub fn serve(port: u16, mut bound: Bound) -> Endpoint {
        bound.listener.watch(key(port, bound.listener.inner.as_raw_fd()));
        Endpoint {
            listener: Some(bound.listener),
            address: bound.address,
            port,
            clients: Vec::new(),
            busy_reported: Cell::new(0),
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
                listener.watch(key(self.port, listener.inner.as_raw_fd()));
                self.listener = Some(listener);
                Ok(())
            }
            Err(TclError::Message { message, .. }) => Err(message),
            Err(TclError::AlreadySet) => Err("couldn't open metrics socket".into()),
        }
    }

    fn accept(&mut self) {
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
            stream.watch(key(self.port, stream.inner.as_raw_fd()));
            self.clients.push(Client {
                stream,
                request: Vec::new(),
                answer: None,
                deadline: Instant::now() + DEADLINE,
            });
        }
    }

    /// Reads what client `fd` sent; its request line once complete.
    fn read(&mut self, fd: RawFd) -> Option<Result<String, &'static [u8]>> {
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
    fn answer(&mut self, fd: RawFd, answer: Vec<u8>) {
        if let Some(client) = self.clients.iter_mut().find(|c| c.stream.inner.as_raw_fd() == fd) {
            client.answer = Some((answer, 0));
        }
        self.write_pending();
    }

    /// Writes what the socket takes now; closes clients that are done or
    /// past their deadline.
    fn write_pending(&mut self) {
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
fn key(port: u16, fd: RawFd) -> usize {
    (usize::from(port) << 32) | fd as u32 as usize
}

unsafe extern "C" fn on_readable(data: *mut c_void, _mask: std::ffi::c_int) {
    let (port, fd) = ((data as usize >> 32) as u16, (data as usize & 0xffff_ffff) as RawFd);
    let _ = std::panic::catch_unwind(|| {
        with_supervisor(|sup| {
            if let Some(pool) = sup.pools.iter_mut().find(|p| p.port == port) {
                pool.on_metrics_socket(fd);
            }
        })
    });
}

impl Pool {
    fn on_metrics_socket(&mut self, fd: RawFd) {
        let Some(endpoint) = self.metrics.as_mut() else { return };
        if endpoint.listener.as_ref().is_some_and(|l| l.inner.as_raw_fd() == fd) {
            endpoint.accept();
            return;
        }
        let answer = match endpoint.read(fd) {
            None => return,
            Some(Err(status)) => response(status, &[], b""),
            Some(Ok(line)) => {
                let mut words = line.split(' ');
                let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
                let path = target.split('?').next().unwrap_or("");
                match (method, path) {
                    ("GET" | "HEAD", "/metrics") => {
                        let text = self.exposition();
                        let body = if method == "HEAD" { Vec::new() } else { text.clone().into_bytes() };
                        let length = format!("Content-Length: {}", text.len());
                        response(b"200 OK", &["Content-Type: text/plain; version=0.0.4; charset=utf-8", &length], &body)
                    }
                    (_, "/metrics") => response(b"405 Method Not Allowed", &["Allow: GET, HEAD"], b""),
                    _ => response(b"404 Not Found", &[], b""),
                }
            }
        };
        if let Some(endpoint) = self.metrics.as_mut() {
            endpoint.answer(fd, answer);
        }
    }

    /// Writes what scrapers wait for and closes those past their deadline
    /// (the supervisor's tick).
    pub(super) fn metrics_tick(&mut self) {
        if let Some(endpoint) = self.metrics.as_mut() {
            endpoint.write_pending();
        }
    }

    /// The pool's figures in the Prometheus text format (version 0.0.4).
    pub(super) fn exposition(&self) -> String {
        let mut out = Exposition { text: String::new(), port: self.port };
        let mut states = [0u64; 4];
        let mut open = 0u64;
        for child in &self.children {
            let index = match self.worker_state(child) {
                State::Idle => 0,
                State::Busy => 1,
                State::Starting => 2,
                State::Stopping => 3,
                State::Free => continue,
            };
            states[index] += 1;
            open += u64::from(self.scoreboard.slot(child.slot).open());
        }
        out.family("workers", "gauge", "Workers of the pool by state.");
        for (state, count) in ["idle", "busy", "starting", "stopping"].iter().zip(states) {
            out.sample("workers", Some(("state", state)), count as f64);
        }
        out.gauge("workers_target", "Workers the pool keeps running.", self.target as f64);
        out.gauge("open_connections", "Connections the workers hold open now.", open as f64);
        let busy = self.busy_millis_total(now_millis()).max(self.metrics.as_ref().map_or(0, |m| m.busy_reported.get()));
        if let Some(endpoint) = &self.metrics {
            endpoint.busy_reported.set(busy);
        }
        let counters: [(&str, &str, f64); 11] = [
            ("accepted_total", "Connections accepted on the pool's port.", self.counters.accepted.load(Relaxed) as f64),
            ("served_total", "Connections whose channel a worker has closed.", self.served_total() as f64),
            ("busy_seconds_total", "Seconds workers held at least one connection, summed.", busy as f64 / 1000.0),
            ("started_total", "Workers started.", self.totals.started as f64),
            ("respawns_total", "Workers lost unasked and replaced.", self.totals.respawned as f64),
            ("recycles_total", "Workers recycled, by any cause: -maxconnections, -maxrss or -maxlifetime (by cause: recycledby in pool info).", self.totals.recycled as f64),
            ("timeouts_total", "Workers killed for being busy past -timeout.", self.totals.timed_out as f64),
            ("backoffs_total", "Waits before starting a worker again after failures.", self.totals.backoffs as f64),
            ("proxy_errors_total", "Connections closed for a bad, late or missing PROXY header.", {
                self.proxy_errors_total() as f64
            }),
            ("proxy_untrusted_total", "Connections closed because their peer is not in -proxyfrom.", {
                self.proxy_untrusted_total() as f64
            }),
            ("log_lost_total", "Lines of the default log (stderr) dropped because stderr did not take them.", {
                super::stderr_log::lost() as f64
            }),
        ];
        for (name, help, value) in counters {
            out.family(name, "counter", help);
            out.sample(name, None, value);
        }
        let queue = self.counters.queue.snapshot();
        out.gauge("queue_depth", "Connections accepted and not yet taken by a worker.", queue.depth as f64);
        out.gauge("queue_max", "The bound of the queue (-maxqueue; 0: none).", queue.max_queue as f64);
        out.gauge(
            "queue_paused",
            "1 while accepting is paused at -maxqueue.",
            if queue.paused_now { 1.0 } else { 0.0 },
        );
        let queue_counters: [(&str, &str, f64); 4] = [
            ("rejected_total", "Connections closed at once at -maxqueue (-overload close).", queue.rejected as f64),
            (
                "abandoned_total",
                "Connections whose client left while queued, closed before any handler.",
                queue.abandoned as f64,
            ),
            ("pauses_total", "Times accepting paused at -maxqueue.", queue.pauses as f64),
            ("paused_seconds_total", "Seconds accepting was paused at -maxqueue.", queue.paused_seconds),
        ];
        for (name, help, value) in queue_counters {
            out.family(name, "counter", help);
            out.sample(name, None, value);
        }
        out.family("queue_wait_seconds", "histogram", "How long connections waited between accept and a worker.");
        let bounds = crate::queue_stats::BUCKET_BOUNDS.iter().map(|(le, _)| *le).chain(["+Inf"]);
        for (le, count) in bounds.zip(&queue.buckets) {
            out.sample("queue_wait_seconds_bucket", Some(("le", le)), *count as f64);
        }
        out.sample("queue_wait_seconds_sum", None, queue.wait_sum_seconds);
        out.sample("queue_wait_seconds_count", None, queue.waits as f64);
        out.family("reloads_total", "counter", "Rolling reloads started.");
        out.sample("reloads_total", None, self.reloads().into());
        out.gauge("generation", "The generation of workers the pool serves with.", self.generation.into());
        out.gauge(
            "reload_failed",
            "1 when the last reload was abandoned (the previous generation serves on).",
            if matches!(self.reload, Reload::Failed { .. }) { 1.0 } else { 0.0 },
        );
        out.gauge(
            "stopping",
            "1 while the pool stops.",
            if matches!(self.phase, Phase::Stopping { .. }) { 1.0 } else { 0.0 },
        );
        out.text
    }
}

/// A hand-written writer of the text exposition format: `# HELP`, `# TYPE`,
/// then samples, every name prefixed `socketserver_` and labelled with the
/// pool's port.
struct Exposition {
    text: String,
    port: u16,
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        // In the 0.0.4 text format a counter's family is its full name,
        // `_total` included (OpenMetrics would drop it).
        let _ = writeln!(self.text, "# HELP socketserver_{name} {help}");
        let _ = writeln!(self.text, "# TYPE socketserver_{name} {kind}");
    }

    fn sample(&mut self, name: &str, label: Option<(&str, &str)>, value: f64) {
        let _ = write!(self.text, "socketserver_{name}{{port=\"{}\"", self.port);
        if let Some((key, value)) = label {
            let _ = write!(self.text, ",{key}=\"{value}\"");
        }
        let _ = writeln!(self.text, "}} {value}");
    }

    fn gauge(&mut self, name: &str, help: &str, value: f64) {
        self.family(name, "gauge", help);
        self.sample(name, None, value);
    }
}

fn response(status: &[u8], headers: &[&str], body: &[u8]) -> Vec<u8> {
    let mut out = b"HTTP/1.1 ".to_vec();
    out.extend_from_slice(status);
    out.extend_from_slice(b"\r\nConnection: close\r\n");
    for header in headers {
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !headers.iter().any(|h| h.starts_with("Content-Length")) {
        let _ = write!(out, "Content-Length: {}\r\n", body.len());
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}
