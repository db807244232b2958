//! The next generation of the accepting process (`pool upgrade`,
//! SIGUSR2): started with the listeners, watched until it says it serves
//! (this one then stops gracefully) or fails (this one serves on), and
//! reaped either way.

use std::os::fd::AsRawFd;

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::port_table;
use crate::tcl::{self, Interp, Obj, TclError, TclResult};

use super::supervisor::{with_supervisor, Supervisor};

impl Supervisor {
    pub(super) fn upgrade(&mut self, command: Vec<String>) -> TclResult<i32> {
        if self.upgrading.is_some() {
            return Err(TclError::new("an upgrade is already under way", &["SOCKETSERVER", "UPGRADE", "BUSY"]));
        }
        let listeners = port_table::table().listener_fds();
        let (pid, ready) = crate::upgrade::spawn_next_generation(&command, &listeners)
            .map_err(|errno| TclError::posix("couldn't start the new generation", errno as i32))?;
        let thread = tcl::current_thread();
        let watcher = std::thread::Builder::new()
            .name("socketserver-upg".into())
            .stack_size(crate::THREAD_STACK_SIZE)
            .spawn(move || {
                // "ready", or end of file when the new program failed (its
                // workers may hold the pipe open long after it said ready).
                let mut said = [0u8; 5];
                let mut got = 0;
                while got < said.len() {
                    match nix::unistd::read(ready.as_raw_fd(), &mut said[got..]) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => got += n,
                    }
                }
                let outcome = UpgradeOutcome { pid, ready: said.starts_with(b"ready") };
                tcl::queue_event(thread, on_upgrade_outcome, outcome);
            });
        if let Err(error) = watcher {
            let _ = kill(pid, Signal::SIGKILL);
            return Err(TclError::posix("couldn't watch the new generation", error.raw_os_error().unwrap_or(0)));
        }
        self.upgrading = Some(pid);
        self.next_generations.push(pid);
        let command_text = Obj::new_list(&command.iter().map(|a| Obj::new_string(a)).collect::<Vec<_>>());
        for index in 0..self.pools.len() {
            let entry = self.pools[index].entry("upgrade", vec![
                ("pid", Obj::new_int(pid.as_raw().into())),
                ("command", command_text.clone()),
            ]);
            self.log.push(entry);
        }
        Ok(pid.as_raw())
    }

    /// The new generation serves (stop this one), or failed (keep serving).
    fn upgrade_outcome(&mut self, outcome: UpgradeOutcome) {
        self.upgrading = None;
        let ports: Vec<u16> = self.pools.iter().map(|p| p.port).collect();
        for index in 0..self.pools.len() {
            let event = if outcome.ready { "upgraded" } else { "upgrade-failed" };
            let entry = self.pools[index].entry(event, vec![("pid", Obj::new_int(outcome.pid.as_raw().into()))]);
            self.log.push(entry);
        }
        if outcome.ready {
            self.exit_when_stopped = true;
            for port in ports {
                self.stop(port);
            }
        }
        // A failed one may close the pipe before it exits: it is reaped
        // with the next SIGCHLD or tick, as every child of ours.
        self.reap_next_generations();
    }

    /// Collects the next generations that have exited.
    pub(super) fn reap_next_generations(&mut self) {
        self.next_generations.retain(|&pid| matches!(waitpid(pid, Some(WaitPidFlag::WNOHANG)), Ok(WaitStatus::StillAlive)));
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
