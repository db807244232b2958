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
//! Written with a datagram socket per message, sent with `MSG_DONTWAIT`
//! semantics (a non-blocking socket): a full or absent receiver never
//! delays the supervisor. The `sd-notify` crate was not taken: it reads
//! the environment at every call (ours is gone by then, on purpose) and
//! has no abstract-namespace addresses (`@name`), which systemd uses.

use std::cell::RefCell;
use std::ffi::OsString;
use std::time::{Duration, Instant};

use nix::sys::socket::{sendto, AddressFamily, MsgFlags, SockType};
use nix::unistd::{getpid, Pid};

use crate::tcl::{Interp, Obj};

use super::lifecycle::{Phase, Reload};
use super::scoreboard::State;
use super::supervisor::Supervisor;

const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";
const WATCHDOG_USEC: &str = "WATCHDOG_USEC";
const WATCHDOG_PID: &str = "WATCHDOG_PID";
/// `STATUS=` is sent again at most this often while the counts change.
const STATUS_EVERY: Duration = Duration::from_secs(1);

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
    let Some(socket) = std::env::var_os(NOTIFY_SOCKET).filter(|s| !s.is_empty()) else { return };
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
        let pools = &sup.pools;
        n.had_pools |= !pools.is_empty();
        let now = Instant::now();
        if n.watchdog.is_some_and(|half| now.duration_since(n.last_ping) >= half) {
            n.last_ping = now;
            n.send("WATCHDOG=1\n");
        }
        let stopping = n.had_pools && pools.iter().all(|p| matches!(p.phase, Phase::Stopping { .. }));
        let ready = !pools.is_empty() && pools.iter().all(|p| p.ready_once);
        let reloading = pools.iter().any(|p| matches!(p.reload, Reload::Running { .. }));
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
/// This one says so, and nothing more.
pub(super) fn handed_over(pid: Pid) {
    let _ = NOTIFIER.try_with(|n| {
        let Ok(mut n) = n.try_borrow_mut() else { return };
        let Some(n) = n.as_mut().filter(|n| n.pid == getpid()) else { return };
        // READY=1 with it: under NotifyAccess=main systemd drops what the
        // new process said before it became the main one (its own READY=1
        // often arrives first).
        n.send(&format!("MAINPID={pid}\nREADY=1\nSTATUS=handed over to pid {pid}\n"));
        n.handed_over = true;
    });
}

impl Notifier {
    /// Whether the message went out (not when the receiver is gone or
    /// full: the service goes on).
    fn send(&self, message: &str) -> bool {
        let Ok(address) = crate::sys::notify_address(&self.socket) else { return false };
        let Ok(socket) = crate::sys::socket_cloexec_nonblock(AddressFamily::Unix, SockType::Datagram) else {
            return false;
        };
        sendto(std::os::fd::AsRawFd::as_raw_fd(&socket), message.as_bytes(), &address, MsgFlags::empty()).is_ok()
    }
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
