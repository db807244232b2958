//! The next generation of the accepting process (`pool upgrade`,
//! SIGUSR2): started with the listeners, watched until it says it serves
//! (this one then stops gracefully), fails or is not ready in time (it is
//! killed: this one serves on, and may upgrade again), and reaped either
//! way.

use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::port_table;
use crate::tcl::{self, Interp, Obj, TclError, TclResult};

use super::supervisor::{with_supervisor, Supervisor};

/// How long a next generation may take to say "ready" (`pool upgrade`
/// without `-timeout`, SIGUSR2).
pub const DEFAULT_UPGRADE_TIMEOUT: Duration = Duration::from_secs(60);

impl Supervisor {
    pub(super) fn upgrade(&mut self, command: Vec<String>, timeout: Duration) -> TclResult<i32> {
        if self.upgrading.is_some() {
            return Err(TclError::new("an upgrade is already under way", &["SOCKETSERVER", "UPGRADE", "BUSY"]));
        }
        let listeners = port_table::table().listener_fds();
        // The next generation binds the metrics addresses again.
        self.pools.iter_mut().filter_map(|p| p.metrics.as_mut()).for_each(|m| m.pause());
        let mut environment = super::notify::environment_for_next_generation();
        // A ranged pool of the next generation starts at this one's size.
        environment.push(self.pool_sizes());
        let spawned = crate::upgrade::spawn_next_generation(&command, &listeners, &environment);
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
            self.resume_metrics();
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
        let ports: Vec<u16> = self.pools.iter().map(|p| p.port).collect();
        for index in 0..self.pools.len() {
            let event = if outcome.ready { "upgraded" } else { "upgrade-failed" };
            let mut fields = vec![("pid", Obj::new_int(outcome.pid.as_raw().into()))];
            if outcome.timed_out {
                fields.push(("message", Obj::new_string("not ready in time")));
            }
            let entry = self.pools[index].entry(event, fields);
            self.log.push(entry);
        }
        if outcome.ready {
            super::notify::handed_over(outcome.pid);
            self.exit_when_stopped = true;
            for port in ports {
                self.stop(port);
            }
        } else {
            self.resume_metrics();
        }
        // A failed one may close the pipe before it exits: it is reaped
        // with the next SIGCHLD or tick, as every child of ours.
        self.reap_next_generations();
    }

    /// Serves the metrics endpoints again after a failed upgrade.
    fn resume_metrics(&mut self) {
        for index in 0..self.pools.len() {
            let Some(metrics) = self.pools[index].metrics.as_mut() else { continue };
            if !metrics.resume() {
                let address = Obj::new_string(&metrics.address());
                let entry = self.pools[index].entry("metrics-failed", vec![("address", address)]);
                self.log.push(entry);
            }
        }
    }

    /// Collects the next generations that have exited.
    pub(super) fn reap_next_generations(&mut self) {
        self.next_generations
            .retain(|&pid| matches!(waitpid(pid, Some(WaitPidFlag::WNOHANG)), Ok(WaitStatus::StillAlive)));
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
