//! The next generation of the accepting process (`pool upgrade`,
//! SIGUSR2): started with the listeners, watched until it says it serves
//! (this one then stops gracefully), fails or is not ready in time (it is
//! killed: this one serves on, and may upgrade again), and reaped either
//! way. A failed one is reported with its exit status once reaped, and the
//! metrics endpoints it took over are bound again only then (its sockets
//! are closed by its death, not by our kill), and again at each tick until
//! the address is free.

use std::cell::RefCell;
use std::os::fd::{AsFd, AsRawFd};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::port_table;
use crate::tcl::{self, Interp, Obj, TclError, TclResult};

use super::state::Supervisor;
use super::supervisor_access::with_supervisor;

/// How long a next generation may take to say "ready" (`pool upgrade`
/// without `-timeout`, SIGUSR2).
pub const DEFAULT_UPGRADE_TIMEOUT: Duration = Duration::from_secs(60);

/// What the upgrades of the supervisor's thread are waiting for, beside
/// the supervisor's own state (`upgrading`, `next_generations`).
#[derive(Default)]
struct Pending {
    /// Next generations that failed, with why, until reaped: their
    /// `upgrade-failed` entry waits for the exit status.
    failed: Vec<(Pid, Option<&'static str>)>,
    /// Statuses of next generations reaped before their outcome came.
    reaped: Vec<(Pid, String)>,
    /// The service is the next generation's: the metrics addresses are its.
    handed_over: bool,
    /// The next generation the service was handed to, while not reaped.
    handed_to: Option<Pid>,
    /// Pools whose metrics endpoint could not listen again (logged once).
    metrics_failed: Vec<u16>,
}

thread_local! {
    static PENDING: RefCell<Pending> = RefCell::new(Pending::default());
}

fn pending<R>(f: impl FnOnce(&mut Pending) -> R) -> R {
    PENDING.with(|p| f(&mut p.borrow_mut()))
}

/// The directory the process started in, as the default upgrade command
/// needs it (a script started as `tclsh app.tcl` that then did `cd /`).
static STARTING_DIRECTORY: OnceLock<Option<PathBuf>> = OnceLock::new();

/// Records the current directory as the starting one; the first call of
/// the process counts (the library's load). As the shell named it (`$PWD`)
/// when that names the same directory, as unicorn does: a deploy that
/// swaps a `current` symlink to the next release upgrades to it, where
/// `getcwd()` would name the old release's directory for good.
pub fn remember_starting_directory() {
    STARTING_DIRECTORY.get_or_init(|| {
        let resolved = std::env::current_dir().ok()?;
        let named = std::env::var_os("PWD").map(PathBuf::from).filter(|named| named.is_absolute());
        Some(named.filter(|named| same_directory(named, &resolved)).unwrap_or(resolved))
    });
}

fn same_directory(a: &std::path::Path, b: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.is_dir() && a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Why this process must not start a next generation now, if it must not.
fn upgrade_refused(handed_over: bool) -> Option<(String, &'static str)> {
    if crate::inherited::ready_pending() || super::notify::awaiting_handover() {
        // Started by an upgrade and not handed the service yet: a next
        // generation of ours would be ready before us, and the previous
        // one, never told we were ready, would serve on beside it.
        return Some((
            "can't upgrade a generation that has not been handed the service yet \
             (signal the one the pid file names)"
                .into(),
            "STARTING",
        ));
    }
    if handed_over {
        return Some(("can't upgrade: this generation handed the service over and is stopping".into(), "STOPPING"));
    }
    if nix::unistd::getpid().as_raw() == 1 {
        // The next generation is our child: when process 1 of a PID
        // namespace exits, the kernel kills everything in it.
        return Some((
            "can't upgrade as process 1: the new generation would end with this process \
             (run the server under a service manager that outlives it, such as systemd, or restart it)"
                .into(),
            "PID1",
        ));
    }
    init_that_exits_with_us().map(|name| {
        (
            format!(
                "can't upgrade under {name}: it exits when this process does, and the new generation \
                 would end with it (run the server under a service manager that outlives it, such as \
                 systemd, or restart the container instead)"
            ),
            "INIT",
        )
    })
}

/// Inits that exit when their child does (tini, also as `docker run
/// --init`'s docker-init, dumb-init, podman's catatonit), when one is our
/// parent. The old generation is their child: its exit ends them, and
/// the end of process 1 of a PID namespace kills the new generation with
/// it. As a subreaper (`tini -s`, not process 1) tini exits all the same,
/// and the container with it. Known by name: process 1 in general may be
/// a service manager that outlives its children (systemd), and a next
/// generation is itself an orphan whose parent is process 1.
fn init_that_exits_with_us() -> Option<String> {
    const EXIT_WITH_CHILD: [&str; 5] = ["tini", "tini-static", "docker-init", "dumb-init", "catatonit"];
    let parent = nix::unistd::getppid().as_raw();
    let name = std::fs::read_to_string(format!("/proc/{parent}/comm")).ok()?.trim().to_string();
    EXIT_WITH_CHILD.contains(&name.as_str()).then(|| format!("{name} (process {parent})"))
}

impl Supervisor {
    /// `POOL_SIZES` for a next generation: each pool's target now.
    fn pool_sizes(&self) -> (String, String) {
        let sizes: Vec<String> = self.pools.iter().map(|p| format!("{}={}", p.port, p.model.target)).collect();
        (super::config::POOL_SIZES.to_string(), sizes.join(" "))
    }

    pub(super) fn upgrade(&mut self, command: Vec<String>, timeout: Duration) -> TclResult<i32> {
        if self.upgrading.is_some() {
            return Err(TclError::new("an upgrade is already under way", &["SOCKETSERVER", "UPGRADE", "BUSY"]));
        }
        if let Some((message, code)) = upgrade_refused(pending(|p| p.handed_over)) {
            return Err(TclError::new(message, &["SOCKETSERVER", "UPGRADE", code]));
        }
        // A stop asked for (a stop signal, `pool stop`) wins: a next
        // generation would bring back the service the operator stopped.
        if self.exit_when_stopped || self.pools.iter().any(|p| p.model.phase.stopping()) {
            return Err(TclError::new(
                "can't upgrade: this generation is stopping",
                &["SOCKETSERVER", "UPGRADE", "STOPPING"],
            ));
        }
        let listeners = port_table::table().listener_fds();
        // The default command is this program as it was started, in the
        // directory it was started in; one given is run where we are now.
        let directory = match self.pools.first() {
            Some(pool) if command == default_command(pool.interp) => STARTING_DIRECTORY.get().cloned().flatten(),
            _ => None,
        };
        // The next generation binds the metrics addresses again.
        self.pools.iter_mut().filter_map(|p| p.metrics.as_mut()).for_each(|m| m.pause());
        let mut environment = super::notify::environment_for_next_generation();
        // A ranged pool of the next generation starts at this one's size.
        environment.push(self.pool_sizes());
        let handover = super::notify::handover_pipe();
        let spawned = crate::upgrade::spawn_next_generation(
            &command,
            &listeners,
            &environment,
            directory.as_deref(),
            handover.as_ref().map(AsRawFd::as_raw_fd),
        );
        // The child has its copy of the read end, or there is no child.
        drop(handover);
        let (pid, ready) = spawned.map_err(|errno| {
            self.resume_metrics();
            TclError::posix("couldn't start the new generation", errno as i32)
        })?;
        let thread = tcl::current_thread();
        let watcher = std::thread::Builder::new()
            .name("socketserver-upg".into())
            .stack_size(crate::THREAD_STACK_SIZE)
            .spawn(move || {
                // "ready", or end of file when the new program failed (its
                // workers may hold the pipe open long after it said ready),
                // or nothing in time.
                let deadline = Instant::now() + timeout;
                let mut said = [0u8; 5];
                let mut got = 0;
                let mut timed_out = false;
                while got < said.len() {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        timed_out = true;
                        break;
                    }
                    let wait = nix::poll::PollTimeout::try_from(left.as_millis().min(i32::MAX as u128) as i32)
                        .unwrap_or(nix::poll::PollTimeout::MAX);
                    let mut fds = [nix::poll::PollFd::new(ready.as_fd(), nix::poll::PollFlags::POLLIN)];
                    match nix::poll::poll(&mut fds, wait) {
                        Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
                        Ok(_) => {}
                        Err(_) => break,
                    }
                    match nix::unistd::read(ready.as_raw_fd(), &mut said[got..]) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => got += n,
                    }
                }
                let outcome = UpgradeOutcome { pid, ready: said.starts_with(b"ready"), timed_out };
                tcl::queue_event(thread, on_upgrade_outcome, outcome);
            });
        if let Err(error) = watcher {
            let _ = kill(pid, Signal::SIGKILL);
            // Reaped, and its metrics addresses taken back, as a failed one.
            self.next_generations.push(pid);
            pending(|p| p.failed.push((pid, Some("couldn't watch it"))));
            self.reap_next_generations();
            return Err(TclError::posix("couldn't watch the new generation", error.raw_os_error().unwrap_or(0)));
        }
        self.upgrading = Some(pid);
        self.next_generations.push(pid);
        let command_text = Obj::new_list(&command.iter().map(|a| Obj::new_string(a)).collect::<Vec<_>>());
        for index in 0..self.pools.len() {
            let entry = self.pools[index]
                .entry("upgrade", vec![("pid", Obj::new_int(pid.as_raw().into())), ("command", command_text.clone())]);
            self.log.push(entry);
        }
        Ok(pid.as_raw())
    }

    /// The new generation serves (stop this one), or failed (keep serving).
    fn upgrade_outcome(&mut self, outcome: UpgradeOutcome) {
        self.upgrading = None;
        if outcome.timed_out {
            // Never ready: it is stopped, and reaped as a failed one. Its
            // workers leave when it is gone (their leave pipes close).
            // Killed only while not reaped yet: the pid is still its own.
            self.reap_next_generations();
            if self.next_generations.contains(&outcome.pid) {
                let _ = kill(outcome.pid, Signal::SIGKILL);
            }
        }
        if outcome.ready {
            let ports: Vec<u16> = self.pools.iter().map(|p| p.port).collect();
            for index in 0..self.pools.len() {
                let entry =
                    self.pools[index].entry("upgraded", vec![("pid", Obj::new_int(outcome.pid.as_raw().into()))]);
                self.log.push(entry);
            }
            pending(|p| {
                p.handed_over = true;
                p.handed_to = Some(outcome.pid);
            });
            super::notify::handed_over(outcome.pid);
            self.exit_when_stopped = true;
            for port in ports {
                self.stop(port);
            }
            return;
        }
        let why = outcome.timed_out.then_some("not ready in time");
        let reaped = pending(|p| {
            let at = p.reaped.iter().position(|(pid, _)| *pid == outcome.pid);
            let reaped = at.map(|at| p.reaped.remove(at).1);
            if reaped.is_none() {
                p.failed.push((outcome.pid, why));
            }
            reaped
        });
        if let Some(status) = reaped {
            self.log_upgrade_failed(outcome.pid, &status, why);
        }
        // A failed one may close the pipe before it exits: it is reaped
        // with the next SIGCHLD or tick, as every child of ours; the
        // metrics endpoints listen again once it is.
        self.reap_next_generations();
    }

    fn log_upgrade_failed(&mut self, pid: Pid, status: &str, why: Option<&str>) {
        super::pidfile::restore_after_failed_upgrade(pid);
        for index in 0..self.pools.len() {
            let mut fields = vec![("pid", Obj::new_int(pid.as_raw().into())), ("status", Obj::new_string(status))];
            if let Some(why) = why {
                fields.push(("message", Obj::new_string(why)));
            }
            let entry = self.pools[index].entry("upgrade-failed", fields);
            self.log.push(entry);
        }
    }

    fn log_next_generation_exited(&mut self, pid: Pid, status: &str) {
        let message = "the generation the service was handed to exited; this one is stopping: nothing serves";
        for index in 0..self.pools.len() {
            let fields = vec![
                ("pid", Obj::new_int(pid.as_raw().into())),
                ("status", Obj::new_string(status)),
                ("message", Obj::new_string(message)),
            ];
            let entry = self.pools[index].entry("upgrade-lost", fields);
            self.log.push(entry);
        }
    }

    /// A stop of the service (TERM, INT) while a next generation warms up
    /// stops that one too: it would otherwise say ready to a generation
    /// that is stopping, and serve on after the stop. Killed, as one not
    /// ready in time: it took no connection yet, and a graceful stop would
    /// wait for its warm-up. It fails as any failed upgrade
    /// (`upgrade-failed`, with its status).
    pub(super) fn cancel_upgrade(&mut self) {
        if let Some(pid) = self.upgrading {
            if self.next_generations.contains(&pid) {
                let _ = kill(pid, Signal::SIGKILL);
            }
        }
    }

    /// Serves the metrics endpoints again after a failed upgrade, once no
    /// next generation can hold their addresses; tried at every look while
    /// the address is taken. The first failure is logged (`metrics-failed`),
    /// and the success after it (`metrics-resumed`).
    fn resume_metrics(&mut self) {
        let waiting = self.upgrading.is_some() || pending(|p| p.handed_over || !p.failed.is_empty());
        if waiting {
            return;
        }
        for index in 0..self.pools.len() {
            let pool = &mut self.pools[index];
            let Some(metrics) = pool.metrics.as_mut().filter(|m| m.paused()) else { continue };
            let address = Obj::new_string(&metrics.address());
            let result = metrics.resume();
            let port = pool.port;
            let logged = pending(|p| p.metrics_failed.contains(&port));
            let entry = match result {
                Ok(()) if logged => {
                    pending(|p| p.metrics_failed.retain(|&failed| failed != port));
                    Some(pool.entry("metrics-resumed", vec![("address", address)]))
                }
                Ok(()) => None,
                Err(message) if !logged => {
                    pending(|p| p.metrics_failed.push(port));
                    let message = Obj::new_string(&message);
                    Some(pool.entry("metrics-failed", vec![("address", address), ("message", message)]))
                }
                Err(_) => None,
            };
            self.log.extend(entry);
        }
    }

    /// Collects the next generations that have exited (reporting the
    /// failed ones with their status), and serves the metrics endpoints
    /// again when they are free. Called at every look of the supervisor.
    pub(super) fn reap_next_generations(&mut self) {
        let mut reaped = Vec::new();
        self.next_generations.retain(|&pid| match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => true,
            Ok(status) => {
                reaped.push((pid, status_text(status)));
                false
            }
            // Not ours to reap any more (a script's own `wait`).
            Err(_) => false,
        });
        for (pid, status) in reaped {
            if pending(|p| p.handed_to.take_if(|to| *to == pid).is_some()) {
                // It said ready, then died while this one was stopping:
                // nothing serves. This one's ports are closed already and
                // its workers are leaving: the operator must know now.
                self.log_next_generation_exited(pid, &status);
                continue;
            }
            let upgrading = self.upgrading == Some(pid);
            let failed = pending(|p| match p.failed.iter().position(|(failed, _)| *failed == pid) {
                Some(at) => Some(p.failed.remove(at).1),
                None => {
                    if upgrading {
                        // Its outcome is on its way: reported then.
                        p.reaped.push((pid, status.clone()));
                    }
                    None
                }
            });
            if let Some(why) = failed {
                self.log_upgrade_failed(pid, &status, why);
            }
        }
        self.resume_metrics();
    }
}
/// What `pool upgrade` runs by default: this program again, as it was
/// started: the executable Tcl names (`info nameofexecutable`: for a tclsh
/// run through a wrapper or a loader, the wrapper, not the loader the
/// kernel ran) and this process's arguments.
pub fn default_command(interp: Interp) -> Vec<String> {
    let program = interp
        .eval_global(&Obj::new_string("info nameofexecutable"))
        .map(|name| name.to_string_lossy())
        .ok()
        .filter(|name| !name.is_empty())
        .or_else(|| std::env::current_exe().ok().map(|exe| exe.to_string_lossy().into_owned()))
        .or_else(|| std::env::args().next());
    program.into_iter().chain(std::env::args().skip(1)).collect()
}

/// "exit 1", "signal SIGKILL": as a worker's status is logged.
fn status_text(status: WaitStatus) -> String {
    match status {
        WaitStatus::Exited(_, code) => format!("exit {code}"),
        WaitStatus::Signaled(_, signal, _) => format!("signal {}", signal.as_str()),
        other => format!("{other:?}"),
    }
}

/// What the thread watching a new generation's readiness pipe reports.
struct UpgradeOutcome {
    pid: Pid,
    ready: bool,
    timed_out: bool,
}

unsafe extern "C" fn on_upgrade_outcome(event: *mut tcl::Tcl_Event, _flags: std::ffi::c_int) -> std::ffi::c_int {
    // SAFETY: queued by `Supervisor::upgrade` with this payload, taken once.
    let outcome = unsafe { tcl::Event::<UpgradeOutcome>::take_payload(event) };
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        with_supervisor(|sup| {
            if sup.pid == nix::unistd::getpid() {
                sup.upgrade_outcome(outcome);
            }
        })
    }));
    1
}
