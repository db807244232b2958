//! sd_notify: tells systemd (or whatever set `NOTIFY_SOCKET`) where the
//! pools stand, as `Type=notify` services do: `READY=1` once every pool
//! serves, `RELOADING=1` and `READY=1` around a rolling reload, `STOPPING=1`
//! on a stop, `STATUS=` with the workers' counts, `MAINPID=` when an
//! upgrade hands the service to the next generation, and `WATCHDOG=1` at
//! half of `WATCHDOG_USEC` from the supervisor's event loop (a supervisor
//! stuck in a script is not pinging, which is what the watchdog is for).
//!
//! The variables are read at the first `pool create` and removed from the
//! environment (and Tcl's `env`), so that no worker, and no program a
//! worker runs, notifies in the service's name; a next generation gets
//! them back from the upgrade (`environment_for_next_generation`). Only the
//! process that read them sends, so a forked child that keeps a copy of
//! this state is silent.
//!
//! The hand-over of an upgrade is ordered and owed: the old generation
//! sends `MAINPID=` (with `READY=1`) again at each look until the receiver
//! takes it, and before it exits (for up to `HANDOVER_AT_EXIT`); the new
//! one says nothing at all until the old one tells it, through a pipe of
//! their own (`SOCKETSERVER_HANDOVER_FD`), that the hand-over went out (or
//! closes it by exiting). Under `NotifyAccess=main` systemd drops what a
//! process that is not the main one says, so the new generation's
//! `READY=1` or pings must come after `MAINPID=`, never before; and a lost
//! `MAINPID=` would leave systemd believing the service died with the old
//! process.
//!
//! Written with a datagram socket per message, sent with `MSG_DONTWAIT`
//! semantics (a non-blocking socket): a full or absent receiver never
//! delays the supervisor. The `sd-notify` crate was not taken: it reads
//! the environment at every call (ours is gone by then, on purpose) and
//! has no abstract-namespace addresses (`@name`), which systemd uses.

use std::cell::RefCell;
use std::ffi::OsString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{sendto, AddressFamily, MsgFlags, SockType};
use nix::unistd::{getpid, Pid};

use crate::upgrade::HANDOVER_VARIABLE;

use crate::tcl::{Interp, Obj};

use super::scoreboard::State;
use super::state::Supervisor;

const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";
const WATCHDOG_USEC: &str = "WATCHDOG_USEC";
const WATCHDOG_PID: &str = "WATCHDOG_PID";
/// `STATUS=` is sent again at most this often while the counts change.
const STATUS_EVERY: Duration = Duration::from_secs(1);
/// How long an exiting old generation keeps offering `MAINPID=` to a
/// receiver that is full.
const HANDOVER_AT_EXIT: Duration = Duration::from_secs(10);
/// How long a next generation stays silent at most, waiting for the old
/// one's word (a variable set by hand, naming a pipe nobody writes, must
/// not silence a service for good).
const HANDOVER_WAIT: Duration = Duration::from_secs(60);

/// The hand-over pipe's ends in this process (-1: none), closed in every
/// child of a fork: a worker has nothing to say about the hand-over.
static HANDOVER_READ: AtomicI32 = AtomicI32::new(-1);
static HANDOVER_WRITE: AtomicI32 = AtomicI32::new(-1);

struct Notifier {
    /// The process that read the variables: the only one that sends.
    pid: Pid,
    socket: OsString,
    /// Half of `WATCHDOG_USEC`, when systemd asks for pings.
    watchdog: Option<Duration>,
    watchdog_usec: Option<u64>,
    last_ping: Instant,
    had_pools: bool,
    ready: bool,
    reloading: bool,
    /// A reload was seen; RELOADING=1 (then READY=1) is owed until sent.
    reload_seen: bool,
    stopping: bool,
    handed_over: bool,
    /// An upgrade's `MAINPID=`, sent at each look until the receiver took it.
    owed: Option<Pid>,
    /// A next generation: silent until the old one says it handed over,
    /// or until then.
    waiting_for_handover: Option<Instant>,
    status: String,
    status_at: Instant,
}

thread_local! {
    static NOTIFIER: RefCell<Option<Notifier>> = const { RefCell::new(None) };
}

/// Reads `NOTIFY_SOCKET` and the watchdog's variables, once per process,
/// and removes them from its environment. Runs before the first worker
/// is forked.
pub(super) fn take_environment(interp: Interp) {
    static READ: std::sync::Mutex<Option<Pid>> = std::sync::Mutex::new(None);
    let mut read = READ.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if *read == Some(getpid()) {
        return;
    }
    *read = Some(getpid());
    let handover = take_handover_pipe(interp);
    let Some(socket) = std::env::var_os(NOTIFY_SOCKET).filter(|s| !s.is_empty()) else {
        close_handover(&HANDOVER_READ);
        return;
    };
    let watchdog_usec = std::env::var(WATCHDOG_USEC).ok().and_then(|v| v.parse::<u64>().ok()).filter(|&u| u > 0);
    let for_us =
        std::env::var(WATCHDOG_PID).ok().and_then(|v| v.parse::<i32>().ok()).is_none_or(|pid| pid == getpid().as_raw());
    let watchdog_usec = watchdog_usec.filter(|_| for_us);
    for name in [NOTIFY_SOCKET, WATCHDOG_USEC, WATCHDOG_PID] {
        let script = Obj::new_list(&[
            Obj::new_string("unset"),
            Obj::new_string("-nocomplain"),
            Obj::new_string(&format!("::env({name})")),
        ]);
        // Tcl's `unset` of `env` removes it from the process's environment.
        let _ = interp.eval_global(&script);
    }
    let now = Instant::now();
    let notifier = Notifier {
        pid: getpid(),
        socket,
        watchdog: watchdog_usec.map(|usec| Duration::from_micros(usec) / 2),
        watchdog_usec,
        last_ping: now,
        had_pools: false,
        ready: false,
        reloading: false,
        reload_seen: false,
        stopping: false,
        handed_over: false,
        owed: None,
        waiting_for_handover: handover.then(|| now + HANDOVER_WAIT),
        status: String::new(),
        status_at: now,
    };
    NOTIFIER.with(|n| *n.borrow_mut() = Some(notifier));
}

/// What a next generation started by an upgrade needs in its environment
/// to notify in its turn: the socket, and the watchdog's interval (for
/// whichever process is the main one; no `WATCHDOG_PID`).
pub fn environment_for_next_generation() -> Vec<(String, String)> {
    NOTIFIER.with(|n| {
        let Some(n) = n.borrow().as_ref().filter(|n| n.pid == getpid()).map(|n| (n.socket.clone(), n.watchdog_usec))
        else {
            return Vec::new();
        };
        let mut variables = vec![(NOTIFY_SOCKET.to_string(), n.0.to_string_lossy().into_owned())];
        if let Some(usec) = n.1 {
            variables.push((WATCHDOG_USEC.to_string(), usec.to_string()));
        }
        variables
    })
}

/// Compares where the pools stand with what was said last, and says what
/// changed. Called after every event of the supervisor (at least each tick).
pub(super) fn observe(sup: &Supervisor) {
    let _ = NOTIFIER.try_with(|n| {
        let Ok(mut n) = n.try_borrow_mut() else { return };
        let Some(n) = n.as_mut() else { return };
        if n.pid != getpid() || n.handed_over {
            return;
        }
        if n.waiting_for_handover.is_some_and(|until| Instant::now() < until) && !handover_done() {
            // The previous generation is the service's main process until
            // systemd has our pid from it: nothing we say would count.
            return;
        }
        n.waiting_for_handover = None;
        close_handover(&HANDOVER_READ);
        let pools = &sup.pools;
        n.had_pools |= !pools.is_empty();
        let now = Instant::now();
        if n.owed.is_some() {
            // Still the main process until MAINPID= is taken: it pings.
            if !n.offer_handover() && n.watchdog.is_some_and(|half| now.duration_since(n.last_ping) >= half) {
                n.last_ping = now;
                n.send("WATCHDOG=1\n");
            }
            return;
        }
        if n.watchdog.is_some_and(|half| now.duration_since(n.last_ping) >= half) {
            n.last_ping = now;
            n.send("WATCHDOG=1\n");
        }
        let stopping = n.had_pools && pools.iter().all(|p| p.model.phase.stopping());
        let ready = !pools.is_empty() && pools.iter().all(|p| p.model.ready_once);
        let reloading = pools.iter().any(|p| p.model.reload.running());
        // A state is said once it was sent: one lost to a full receiver
        // (watchdog pings fill a slow one) is sent again at the next look.
        if stopping {
            if !n.stopping && n.send(&format!("STOPPING=1\nSTATUS={}\n", status(sup))) {
                n.stopping = true;
            }
            return;
        }
        if n.stopping {
            // The pools were stopped and new ones made: say READY again.
            n.stopping = false;
            n.ready = false;
        }
        if !n.ready {
            if ready {
                let text = status(sup);
                if n.send(&format!("READY=1\nSTATUS={text}\n")) {
                    n.ready = true;
                    n.status = text;
                    n.status_at = now;
                }
            }
            return;
        }
        n.reload_seen |= reloading;
        if n.reload_seen && !n.reloading {
            // Owed even if the reload is over by now: systemd waits for
            // RELOADING=1 then READY=1.
            if n.send(&format!("RELOADING=1\nMONOTONIC_USEC={}\nSTATUS=reloading\n", monotonic_usec())) {
                n.reloading = true;
            }
        } else if !reloading && n.reloading {
            let text = status(sup);
            if n.send(&format!("READY=1\nSTATUS={text}\n")) {
                n.reloading = false;
                n.reload_seen = false;
                n.status = text;
                n.status_at = now;
            }
        } else if now.duration_since(n.status_at) >= STATUS_EVERY {
            n.status_at = now;
            let text = status(sup);
            if text != n.status {
                n.send(&format!("STATUS={text}\n"));
                n.status = text;
            }
        }
    });
}

/// The next generation serves: it is the service's main process now.
/// This one says so (now, at each look until the receiver takes it, and
/// before it exits), and nothing more.
pub(super) fn handed_over(pid: Pid) {
    let _ = NOTIFIER.try_with(|n| {
        let Ok(mut n) = n.try_borrow_mut() else { return };
        let Some(n) = n.as_mut().filter(|n| n.pid == getpid()) else { return };
        n.owed = Some(pid);
        if !n.offer_handover() {
            crate::tcl::create_exit_handler(hand_over_before_exit);
        }
    });
}

/// The pipe on which the next generation started now learns that the
/// hand-over went out: its read end, to pass on (this process keeps the
/// write end, and closes the read end once the child has it). None when
/// nothing notifies.
pub(super) fn handover_pipe() -> Option<OwnedFd> {
    let ours = NOTIFIER.try_with(|n| n.borrow().as_ref().is_some_and(|n| n.pid == getpid())).unwrap_or(false);
    if !ours {
        return None;
    }
    let (read_end, write_end) = {
        let _no_fork = (!crate::sys::CLOEXEC_IS_ATOMIC).then(crate::fork_safety::hold_off_forks);
        crate::sys::pipe_cloexec(false).ok()?
    };
    watch_forks();
    // A previous upgrade's (it failed) is closed with its number.
    close_handover(&HANDOVER_WRITE);
    HANDOVER_WRITE.store(std::os::fd::IntoRawFd::into_raw_fd(write_end), Ordering::SeqCst);
    Some(read_end)
}

/// Whether this process is a next generation whose previous one has not
/// said yet that it handed the service over (it may not start another).
pub(super) fn awaiting_handover() -> bool {
    NOTIFIER
        .try_with(|n| {
            n.try_borrow().ok().is_some_and(|n| n.as_ref().is_some_and(|n| n.pid == getpid() && n.awaiting_handover()))
        })
        .unwrap_or(false)
}

impl Notifier {
    fn awaiting_handover(&self) -> bool {
        self.waiting_for_handover.is_some_and(|until| Instant::now() < until) && !handover_done()
    }

    /// Whether the message went out (not when the receiver is gone or
    /// full: the service goes on).
    fn send(&self, message: &str) -> bool {
        self.try_send(message).is_ok()
    }

    fn try_send(&self, message: &str) -> nix::Result<()> {
        let address = crate::sys::notify_address(&self.socket)?;
        let socket = crate::sys::socket_cloexec_nonblock(AddressFamily::Unix, SockType::Datagram)?;
        sendto(socket.as_raw_fd(), message.as_bytes(), &address, MsgFlags::empty()).map(|_| ())
    }

    /// Sends the owed `MAINPID=`; whether nothing is owed any more. Given
    /// up only when nobody receives (no socket there), not when full.
    fn offer_handover(&mut self) -> bool {
        let Some(pid) = self.owed else { return true };
        if self.awaiting_handover() {
            // Not the main process ourselves yet: systemd would drop our
            // MAINPID= (NotifyAccess=main), or take it before ours.
            return false;
        }
        // READY=1 with it: the new generation's own READY=1 comes later.
        let sent = self.try_send(&format!("MAINPID={pid}\nREADY=1\nSTATUS=handed over to pid {pid}\n"));
        if matches!(sent, Err(Errno::EAGAIN | Errno::ENOBUFS | Errno::EINTR)) {
            return false;
        }
        self.owed = None;
        self.handed_over = true;
        // The next generation may speak now.
        let fd = HANDOVER_WRITE.swap(-1, Ordering::SeqCst);
        if fd >= 0 {
            // SAFETY: ours since `handover_pipe`, taken out of the static once.
            let pipe = unsafe { OwnedFd::from_raw_fd(fd) };
            let _ = nix::unistd::write(&pipe, b"x");
        }
        true
    }
}

/// Tcl's exit, in an old generation that still owes the hand-over: offers
/// it until taken, for up to `HANDOVER_AT_EXIT` (the pools are gone; only
/// the exit waits).
unsafe extern "C" fn hand_over_before_exit(_: *mut std::ffi::c_void) {
    let _ = std::panic::catch_unwind(|| {
        let deadline = Instant::now() + HANDOVER_AT_EXIT;
        let _ = NOTIFIER.try_with(|n| {
            let Ok(mut n) = n.try_borrow_mut() else { return };
            let Some(n) = n.as_mut().filter(|n| n.pid == getpid()) else { return };
            while !n.offer_handover() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        });
    });
}

/// In a next generation: takes the hand-over pipe's read end passed by
/// the previous one, if any (close-on-exec and non-blocking from now on).
fn take_handover_pipe(interp: Interp) -> bool {
    let fd = std::env::var(HANDOVER_VARIABLE).ok().and_then(|v| v.parse::<RawFd>().ok());
    let script = Obj::new_list(&[
        Obj::new_string("unset"),
        Obj::new_string("-nocomplain"),
        Obj::new_string(&format!("::env({HANDOVER_VARIABLE})")),
    ]);
    let _ = interp.eval_global(&script);
    let Some(fd) = fd.filter(|&fd| fd > 2 && is_pipe(fd)) else { return false };
    let flags = nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK);
    if nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC)).is_err()
        || nix::fcntl::fcntl(fd, flags).is_err()
    {
        return false;
    }
    watch_forks();
    HANDOVER_READ.store(fd, Ordering::SeqCst);
    true
}

fn is_pipe(fd: RawFd) -> bool {
    nix::sys::stat::fstat(fd).is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFIFO)
}

/// Whether the previous generation said it handed over, or is gone.
fn handover_done() -> bool {
    let fd = HANDOVER_READ.load(Ordering::SeqCst);
    if fd < 0 {
        return true;
    }
    let mut byte = [0u8; 1];
    match nix::unistd::read(fd, &mut byte) {
        Err(Errno::EAGAIN | Errno::EINTR) => false,
        // A byte, the end of file, or an error: done waiting.
        _ => {
            close_handover(&HANDOVER_READ);
            true
        }
    }
}

fn close_handover(end: &AtomicI32) {
    let fd = end.swap(-1, Ordering::SeqCst);
    if fd >= 0 {
        let _ = nix::unistd::close(fd);
    }
}

/// Closes the hand-over pipe's ends in every child of a fork.
fn watch_forks() {
    static REGISTERED: std::sync::Once = std::sync::Once::new();
    REGISTERED.call_once(|| {
        crate::fork_safety::on_fork(
            || {},
            || {},
            || {
                close_handover(&HANDOVER_READ);
                close_handover(&HANDOVER_WRITE);
            },
        )
    });
}

/// "8080: 4 workers (3 idle, 1 busy, 0 starting, 0 stopping), 120 served",
/// one part per pool.
fn status(sup: &Supervisor) -> String {
    let parts: Vec<String> = sup
        .pools
        .iter()
        .map(|pool| {
            let mut counts = [0usize; 4];
            for child in &pool.children {
                match pool.worker_state(child) {
                    State::Idle => counts[0] += 1,
                    State::Busy => counts[1] += 1,
                    State::Starting => counts[2] += 1,
                    State::Stopping => counts[3] += 1,
                    State::Free => {}
                }
            }
            format!(
                "{}: {} workers ({} idle, {} busy, {} starting, {} stopping), {} served",
                pool.port,
                pool.children.len(),
                counts[0],
                counts[1],
                counts[2],
                counts[3],
                pool.served_total()
            )
        })
        .collect();
    if parts.is_empty() {
        "no pool".into()
    } else {
        parts.join("; ")
    }
}

fn monotonic_usec() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1000)
        .unwrap_or(0)
}
