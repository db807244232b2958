//! The supervisor: runs in the accepting process and keeps each pool's
//! workers alive. What should run, and when, is each pool's model's
//! (`model::pool`); `lifecycle` is the shell that tells the model what it
//! observed and performs what it answers; `generation` handles the next
//! generation of the process, and `report` what the pool logs and `pool
//! info` shows.
//!
//! Everything it does happens on the Tcl thread that made the pools, from
//! three kinds of event: a pool command, a byte in the signal pipe (a
//! signal, or a worker asking for attention) and a periodic tick. A
//! command or a signal becomes an event of the model (reload, resize, a
//! shift of the range, a stop); each ends in `reconcile`, one turn of the
//! model: reap the dead, replace them (with back-off when they fail),
//! retire old generations as new workers become ready, time out workers
//! stuck past `-timeout` or `-inittimeout`, and finish a stop.

use std::ffi::c_void;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use crate::port_table;
use crate::registration::InterpState;
use crate::tcl::{self, Interp, Obj, TclError, TclResult};

use super::after_fork::{self, EventSources};
use super::config::inherited_size;
pub use super::config::Config;
use super::generation::{default_command, DEFAULT_UPGRADE_TIMEOUT};
use super::hang_report::InPool as HangsInPool;
use super::hooks;
use super::lifecycle::Told;
use super::model::events::Event;
use super::model::pool::{Model, Settings};
use super::recycling::InPool as RecyclingInPool;
use super::scoreboard::Scoreboard;
use super::signals;
use super::state::{Pool, Supervisor, Totals, ACTED_ON, SUPERVISOR};
use super::supervisor_access::with_supervisor;
use super::supervisor_thread::{claim_supervisor_thread, not_here, release_supervisor_thread};
use super::worker;

/// How often the supervisor looks at its workers without being woken.
const TICK_MS: u32 = 100;
/// Workers a pool may have; its scoreboard has room for twice as many
/// (a full generation beside another).
pub use super::model::sizing::MAX_WORKERS;

fn unknown_pool(port: u16) -> TclError {
    TclError::new(format!("no pool serves port {port}"), &["SOCKETSERVER", "POOL", "UNKNOWN", &port.to_string()])
}

/// Starts a pool on `port`, which is already open in this process.
pub fn create(interp: Interp, state: *const InterpState, port: u16, mut config: Config) -> TclResult<()> {
    if worker::is_worker() {
        return Err(not_here());
    }
    super::notify::take_environment(interp);
    with_supervisor(|sup| {
        sup.adopt_if_forked();
        if sup.pools.iter().any(|p| p.port == port) {
            return Err(TclError::new(
                format!("a pool already serves port {port}"),
                &["SOCKETSERVER", "POOL", "EXISTS", &port.to_string()],
            ));
        }
        let (queue, counters) = port_table::table()
            .get(port)
            .map(|p| (Arc::clone(&p.worker_end), Arc::clone(&p.counters)))
            .ok_or_else(|| unknown_pool(port))?;
        claim_supervisor_thread()?;
        let reports_wanted = config.timeout.is_some();
        let started = Scoreboard::new(MAX_WORKERS * 2)
            .and_then(|scoreboard| Ok((scoreboard, RecyclingInPool::new()?)))
            .and_then(|(scoreboard, recycling)| {
                Ok((scoreboard, recycling, HangsInPool::new(reports_wanted, MAX_WORKERS * 2)?))
            })
            .map_err(|e| TclError::posix("couldn't create the scoreboard", e as i32))
            .and_then(|shared| sup.start_watching(config.signals).map(|()| shared));
        let (scoreboard, recycling, hangs) = match started {
            Ok(shared) => shared,
            Err(error) => {
                // A pool that could not start leaves nothing taken behind.
                sup.after_pool_gone();
                return Err(error);
            }
        };
        // A next generation's ranged pool starts at the size the one it
        // replaces has now, not at its minimum (an upgrade under load lost
        // half its capacity for 2 s).
        let target = if config.sizing.ranged() { config.sizing.initial(inherited_size(port)) } else { config.workers };
        let config_metrics = config.metrics.take();
        if !sup.had.contains(&port) {
            sup.had.push(port);
        }
        let settings = Settings {
            graceful: config.graceful,
            init_timeout: config.init_timeout,
            timeout: config.timeout,
            concurrency: config.concurrency,
        };
        let model = Model::new(settings, config.sizing.clone(), target);
        sup.pools.push(Pool {
            port,
            interp,
            state,
            config,
            scoreboard,
            model,
            children: Vec::new(),
            totals: Totals::default(),
            queue,
            counters,
            metrics: config_metrics.map(|bound| super::metrics_exposition::serve(port, bound)),
            recycling,
            hangs,
        });
        let index = sup.pools.len() - 1;
        sup.reconcile(index);
        Ok(())
    })
}

/// The pools' ports, or `port` alone after checking it has one.
pub fn ports(port: Option<u16>) -> TclResult<Vec<u16>> {
    if worker::is_worker() {
        return Err(not_here());
    }
    with_supervisor(|sup| {
        sup.adopt_if_forked();
        let all: Vec<u16> = sup.pools.iter().map(|p| p.port).collect();
        match port {
            None => Ok(all),
            Some(port) if all.contains(&port) => Ok(vec![port]),
            Some(port) => Err(unknown_pool(port)),
        }
    })
}

/// The ports `pool wait` waits for: those of every pool, or `port`'s,
/// none if its pool is gone already (stopped, its workers reaped); a port
/// that never had a pool is an error.
pub fn ports_to_wait(port: Option<u16>) -> TclResult<Vec<u16>> {
    let all = ports(None)?;
    match port {
        None => Ok(all),
        Some(port) if all.contains(&port) => Ok(vec![port]),
        Some(port) if with_supervisor(|sup| sup.had.contains(&port)) => Ok(Vec::new()),
        Some(port) => Err(unknown_pool(port)),
    }
}

/// Refuses a change of a stopping pool's workers (`pool resize`, `pool
/// reload` of its port): nothing is forked for it any more.
pub fn refuse_if_stopping(port: u16) -> TclResult<()> {
    let stopping = with_supervisor(|sup| sup.index(port).is_some_and(|i| sup.pools[i].model.phase.stopping()));
    if stopping {
        return Err(TclError::new(
            format!("the pool on port {port} is stopping"),
            &["SOCKETSERVER", "POOL", "STOPPING", &port.to_string()],
        ));
    }
    Ok(())
}

/// A rolling reload: a new generation, then the old one leaves.
pub fn reload(port: u16) {
    with_supervisor(|sup| sup.reload(port));
}

pub fn resize(port: u16, min: usize, max: usize) {
    with_supervisor(|sup| sup.resize(port, min, max));
}

/// Holds what the pools and the hooks need now, if there is a pool.
pub(super) fn hold_signals_now() {
    with_supervisor(|sup| {
        if !sup.pools.is_empty() {
            let _ = sup.hold_signals(false);
        }
    });
}

/// A graceful stop: the port closes now, workers leave when done.
pub fn stop(port: u16) {
    with_supervisor(|sup| sup.stop(port));
}

/// Serves events until none of `ports` has a pool any more.
pub fn wait(ports: &[u16]) {
    with_supervisor(|sup| sup.waiting += 1);
    while with_supervisor(|sup| sup.pools.iter().any(|p| ports.contains(&p.port))) {
        tcl::do_one_event();
    }
    with_supervisor(|sup| sup.waiting -= 1);
}

/// Whether every pool of this process has had all its workers ready once
/// (true when there is none).
pub fn all_ready() -> bool {
    SUPERVISOR.with(|s| s.try_borrow().map(|s| s.pools.iter().all(|p| p.model.ready_once)).unwrap_or(false))
}

/// Starts the next generation of this process with its listeners; this
/// one stops gracefully once the new one says it serves. Returns its pid.
pub fn upgrade(command: Vec<String>, timeout: Duration) -> TclResult<i32> {
    if worker::is_worker() {
        return Err(not_here());
    }
    with_supervisor(|sup| sup.upgrade(command, timeout))
}

pub fn info(port: u16) -> TclResult<Obj> {
    with_supervisor(|sup| {
        let pool = sup.pools.iter().find(|p| p.port == port).ok_or_else(|| unknown_pool(port))?;
        Ok(pool.info())
    })
}

/// The interpreter that made pools is being deleted: stop them, and stop
/// calling into it.
pub fn interp_deleted(interp: Interp) {
    let _ = SUPERVISOR.try_with(|s| {
        let Ok(mut sup) = s.try_borrow_mut() else { return };
        if sup.pid != nix::unistd::getpid() {
            return;
        }
        let ports: Vec<u16> =
            sup.pools.iter().filter(|p| p.interp.as_ptr() == interp.as_ptr()).map(|p| p.port).collect();
        for port in ports {
            sup.stop(port);
            // The pool outlives its interpreter until its last worker is
            // gone, and must not call into it again: no log command, no
            // `-init`, and no signal (SIGUSR2 would ask it for the
            // executable to upgrade to).
            if let Some(pool) = sup.pools.iter_mut().find(|p| p.port == port) {
                pool.config.log = Some(Vec::new());
                pool.config.init = None;
                pool.config.signals = false;
            }
        }
        hooks::interp_deleted(interp);
        // What no pool acts on any more is given back now, not when the
        // pool is gone.
        let _ = sup.hold_signals(false);
        sup.log.clear();
    });
}

impl Drop for Supervisor {
    /// The thread ends (a Thread-package thread released) while its pools
    /// stop: Tcl has finalized its notifier already, and the process's
    /// signals and pipe must not outlive the thread's pools (the pipe's
    /// numbers would be reused by files the signal handler then writes to).
    /// Dropping the pools closes their leave pipes: the workers leave, and
    /// a reaper thread collects them (`reap_in_background`).
    fn drop(&mut self) {
        if self.pid != nix::unistd::getpid() {
            self.pools.drain(..).for_each(keep_parents_pool);
            return;
        }
        if !crate::registration::exiting() {
            let now = Instant::now();
            let mut children: Vec<(Pid, Option<Instant>)> = Vec::new();
            for pool in &self.pools {
                let deadline = pool.model.phase.deadline(now, pool.config.graceful);
                children.extend(pool.children.iter().map(|c| (c.pid, Some(deadline))));
            }
            // A next generation may be the server now: reaped, never killed.
            children.extend(self.next_generations.iter().map(|&pid| (pid, None)));
            super::lifecycle::reap_in_background(children);
        }
        // Tcl's notifier of this thread is gone: no file handler to remove.
        self.pools.iter_mut().filter_map(|p| p.metrics.as_mut()).for_each(|m| m.forget_handlers());
        self.pools.clear();
        if release_supervisor_thread() {
            signals::release_all();
        }
    }
}

/// The parent's pools, in a forked child: never dropped (that would close
/// the parent's leave pipes and free its Tcl objects), and kept reachable
/// from a static, so that a leak checker does not count them in every
/// child. (Kept in thread-local storage, they were lost when the child's
/// exit tore that storage down: 1,030 definite-loss reports in a run of
/// `make memcheck`.) The addresses of leaked boxes: a `Pool` is not `Send`.
static PARENTS_POOLS: Mutex<Vec<usize>> = Mutex::new(Vec::new());

fn keep_parents_pool(pool: Pool) {
    let kept = Box::into_raw(Box::new(pool)) as usize;
    // Only the thread that ran the pools touches it, and in a child only.
    if let Ok(mut parents) = PARENTS_POOLS.try_lock() {
        parents.push(kept);
    }
}

impl Supervisor {
    /// In a process forked by other means (TclX `fork`) the pools are the
    /// parent's: forget them without touching their workers. Their signals,
    /// pipe, handler, timer and leave pipes were let go at the fork
    /// (`after_fork`).
    fn adopt_if_forked(&mut self) {
        let pid = nix::unistd::getpid();
        if self.pid == pid {
            return;
        }
        self.pid = pid;
        self.pools.drain(..).for_each(keep_parents_pool);
        self.exit_when_stopped = false;
        self.stop_signalled = false;
        self.upgrading = None;
        self.had.clear();
    }

    fn start_watching(&mut self, handle_signals: bool) -> TclResult<()> {
        let posix = |e: nix::Error| TclError::posix("couldn't handle signals", e as i32);
        let mut sources = after_fork::event_sources();
        if sources.pipe.is_none() {
            let pipe = signals::pipe_read_end().map_err(posix)?;
            tcl::create_file_handler(pipe, on_pipe, std::ptr::null_mut());
            sources.pipe = Some(pipe);
            after_fork::set_event_sources(sources);
        }
        if sources.wake.is_none() {
            let wake = super::wake::set_fd().map_err(posix)?;
            tcl::create_file_handler(wake, on_pipe, std::ptr::null_mut());
            sources.wake = Some(wake);
            after_fork::set_event_sources(sources);
        }
        self.hold_signals(handle_signals).map_err(posix)?;
        if sources.tick.is_none() {
            sources.tick = Some(tcl::create_timer(TICK_MS, on_tick, std::ptr::null_mut()));
            after_fork::set_event_sources(sources);
        }
        Ok(())
    }

    /// Holds the signals the pools act on, and those only: SIGCHLD while
    /// the process has a pool, the others while at least one live pool
    /// handles signals (`-signals 1`, its interpreter not deleted), or the
    /// pool being created (`new_pool_acts`) will. Any other signal does
    /// what it did before the pools.
    fn hold_signals(&self, new_pool_acts: bool) -> nix::Result<()> {
        let mut wanted = vec![Signal::SIGCHLD];
        if new_pool_acts || self.pools.iter().any(|p| p.config.signals) {
            wanted.extend(ACTED_ON);
        }
        wanted.extend(hooks::signals());
        signals::hold_exactly(&wanted)
    }

    fn index(&self, port: u16) -> Option<usize> {
        self.pools.iter().position(|p| p.port == port)
    }

    /// Tells pool `index`'s model an event of its own (a command, a
    /// signal) and performs what it answers.
    fn tell(&mut self, index: usize, event: Event) {
        let mut entries = Vec::new();
        let mut told = Told::default();
        self.pools[index].tell(event, Instant::now(), &mut entries, &mut told);
        self.log.append(&mut entries);
    }

    fn reload(&mut self, port: u16) {
        let Some(index) = self.index(port) else { return };
        self.tell(index, Event::Reload);
        self.reconcile(index);
    }

    fn resize(&mut self, port: u16, min: usize, max: usize) {
        let Some(index) = self.index(port) else { return };
        self.tell(index, Event::Resize { min, max });
        self.reconcile(index);
    }

    pub(super) fn stop(&mut self, port: u16) {
        let Some(index) = self.index(port) else { return };
        if self.pools[index].model.phase.stopping() {
            return;
        }
        self.tell(index, Event::Stop { at_once: false });
        // Closing the port stops accepting and frees the port at once;
        // connections already queued stay deliverable, and each worker
        // leaves when the queue is drained and its channels are closed.
        let removed = {
            let mut table = port_table::table();
            table.remove(port)
        };
        drop(removed);
        self.reconcile(index);
    }

    /// Acts on the signals read from the pipe.
    fn on_signals(&mut self, received: &[Signal]) {
        let ports: Vec<u16> = self.pools.iter().filter(|p| p.config.signals).map(|p| p.port).collect();
        for signal in received {
            match signal {
                // Read from the pipe just after the last pool that acted on
                // it went: nobody's any more, nothing is held over.
                Signal::SIGTERM | Signal::SIGINT if ports.is_empty() => {}
                Signal::SIGTERM | Signal::SIGINT => {
                    let again = self.stop_signalled;
                    self.stop_signalled = true;
                    self.exit_when_stopped = true;
                    self.cancel_upgrade();
                    for &port in &ports {
                        self.stop(port);
                        if again {
                            // A second stop signal: do not wait for busy workers.
                            if let Some(index) = self.index(port) {
                                self.tell(index, Event::Stop { at_once: true });
                            }
                        }
                    }
                }
                Signal::SIGHUP => ports.iter().for_each(|&port| self.reload(port)),
                Signal::SIGUSR2 if !ports.is_empty() => {
                    let index = self.index(ports[0]).unwrap_or(0);
                    let command = default_command(self.pools[index].interp);
                    if let Err(TclError::Message { message, .. }) = self.upgrade(command, DEFAULT_UPGRADE_TIMEOUT) {
                        let entry =
                            self.pools[index].entry("upgrade-failed", vec![("message", Obj::new_string(&message))]);
                        self.log.push(entry);
                    }
                }
                Signal::SIGTTIN | Signal::SIGTTOU => {
                    for &port in &ports {
                        if let Some(index) = self.index(port) {
                            self.tell(index, Event::Shift { up: *signal == Signal::SIGTTIN });
                            self.reconcile(index);
                        }
                    }
                }
                _ => {}
            }
        }
    }

    fn reconcile_all(&mut self) {
        self.reap_next_generations();
        for index in (0..self.pools.len()).rev() {
            self.reconcile(index);
        }
    }

    /// Brings pool `index` to what it should be (one turn of its model,
    /// `lifecycle`); may remove it when stopped.
    fn reconcile(&mut self, index: usize) {
        let mut entries = Vec::new();
        let told = self.pools[index].turn(Instant::now(), &mut entries);
        self.log.append(&mut entries);
        if told.ready {
            // A new generation of the accepting process serves now.
            let all = self.pools.iter().all(|p| p.model.ready_once);
            crate::inherited::announce_ready_if_done(all);
        }
        if told.gone {
            self.pools.remove(index);
            self.after_pool_gone();
        }
    }

    /// With the last pool go the process's signals and pipe, and this
    /// thread's hold on running pools.
    fn after_pool_gone(&mut self) {
        if !self.pools.is_empty() {
            // The one gone may have been the last to act on signals.
            let _ = self.hold_signals(false);
            return;
        }
        let EventSources { pipe, wake, tick } = after_fork::event_sources();
        after_fork::set_event_sources(EventSources::NONE);
        for fd in pipe.into_iter().chain(wake) {
            tcl::delete_file_handler(fd);
        }
        if let Some(tick) = tick {
            tcl::delete_timer(tick);
        }
        signals::release_all();
        let _ = release_supervisor_thread();
        if self.exit_when_stopped && self.waiting == 0 {
            self.exit_requested = true;
        }
        // Consumed: a `pool wait` returned instead, and pools the script
        // makes after it start afresh (one TERM is graceful again, and
        // their end by `pool stop` does not exit the process).
        self.exit_when_stopped = false;
        self.stop_signalled = false;
    }
}

/// The signal pipe is readable: signals arrived, or a worker asks for
/// attention.
unsafe extern "C" fn on_pipe(_: *mut c_void, _mask: std::ffi::c_int) {
    let _ = std::panic::catch_unwind(|| {
        let hooked = with_supervisor(|sup| {
            // Only the supervisor thread of the supervisor has this handler.
            let Some(pipe) = after_fork::event_sources().pipe else { return Vec::new() };
            super::wake::drain();
            let (received, _notified) = signals::drain(pipe);
            sup.on_signals(&received);
            let hooked = hooks::forward(sup, &received);
            sup.reconcile_all();
            hooked
        });
        hooks::run(&hooked);
    });
}

unsafe extern "C" fn on_tick(_: *mut c_void) {
    let _ = std::panic::catch_unwind(|| {
        with_supervisor(|sup| {
            if sup.pid != nix::unistd::getpid() {
                return;
            }
            // The next tick first: nothing below can stop the ticking.
            let mut sources = after_fork::event_sources();
            sources.tick = Some(tcl::create_timer(TICK_MS, on_tick, std::ptr::null_mut()));
            after_fork::set_event_sources(sources);
            sup.pools.iter_mut().for_each(Pool::metrics_tick);
            super::signal_watch::check(sup);
            sup.reconcile_all();
        })
    });
}
