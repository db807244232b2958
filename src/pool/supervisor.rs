//! The supervisor: runs in the accepting process and keeps each pool's
//! workers alive.
//!
//! Everything it does happens on the Tcl thread that made the pools, from
//! three kinds of event: a pool command, a byte in the signal pipe (a
//! signal, or a worker asking for attention) and a periodic tick. Each
//! event ends in `reconcile`, which compares what is with what should be
//! and acts: reap the dead, replace them (with back-off when they die
//! young), retire old generations as new workers become ready, kill workers
//! stuck past `-timeout`, and finish a stop.

use std::cell::RefCell;
use std::ffi::c_void;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{ForkResult, Pid};

use crate::counters::Counters;
use crate::port_table;
use crate::registration::InterpState;
use crate::tcl::{self, Interp, Obj, TclError, TclResult};

use super::after_fork::{self, EventSources, LeaveEnd};
use super::scoreboard::{now_millis, Scoreboard, State};
use super::signals;
use super::worker::{self, Assignment};

/// How often the supervisor looks at its workers without being woken.
const TICK_MS: u32 = 100;
/// A worker that lives this long after the last failure ends a run of
/// failures.
const YOUNG: Duration = Duration::from_secs(1);
/// Failures in a row after which a reload is abandoned.
const RELOAD_FAILURES: u32 = 5;
/// Back-off after the first failure, doubled for each further one...
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
/// ...up to this.
const BACKOFF_CAP: Duration = Duration::from_secs(30);
/// Scoreboard slots per pool: room for a full generation beside another.
pub const MAX_WORKERS: usize = 512;
/// The signals a pool with `-signals 1` acts on.
const ACTED_ON: [Signal; 6] =
    [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP, Signal::SIGTTIN, Signal::SIGTTOU, Signal::SIGUSR2];

pub struct Config {
    pub workers: usize,
    pub concurrency: usize,
    pub handler: Vec<Obj>,
    pub init: Option<Obj>,
    pub max_connections: u64,
    pub jitter: u64,
    pub timeout: Option<Duration>,
    pub graceful: Duration,
    /// `None`: one line on stderr per event; an empty prefix: no log.
    pub log: Option<Vec<Obj>>,
    pub signals: bool,
}

/// Why the supervisor asked a worker to go.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Retired {
    Reload,
    Resize,
}

struct Child {
    pid: Pid,
    slot: usize,
    generation: u32,
    forked: Instant,
    /// Our end of its leave pipe; closing it asks the worker to leave.
    leave: Option<LeaveEnd>,
    retired: Option<Retired>,
    /// Set once we have sent it SIGKILL, with the reason.
    killed: Option<&'static str>,
}

#[derive(Default)]
struct Totals {
    started: u64,
    respawned: u64,
    recycled: u64,
    timed_out: u64,
    backoffs: u64,
    /// PROXY protocol rejections of workers that have exited.
    proxy_errors: u64,
}

enum Phase {
    Running,
    Stopping { deadline: Instant },
}

/// Where the last reload stands, for `pool info`.
enum Reload {
    None,
    /// Its workers are starting; `previous` is the generation serving
    /// before it, which serves on if it is abandoned.
    Running { previous: u32 },
    Done,
    Failed { reason: String },
}

pub struct Pool {
    port: u16,
    interp: Interp,
    state: *const InterpState,
    config: Config,
    scoreboard: Scoreboard,
    generation: u32,
    /// The highest generation number given so far: an abandoned reload's
    /// number is not given again.
    newest_generation: u32,
    target: usize,
    children: Vec<Child>,
    totals: Totals,
    /// Failures in a row (see `reap`); while non-zero, one worker at a time
    /// is tried.
    failures: u32,
    retry_at: Option<Instant>,
    /// When the last failure was: a worker forked after it that lives past
    /// `YOUNG` ends the run.
    failed_at: Option<Instant>,
    /// Why the last worker failed, as the log says it.
    last_failure: String,
    reload: Reload,
    /// The port's queue, kept while the pool lives: the port leaves the
    /// port table when the pool stops, and workers started then serve
    /// what is still queued.
    queue: Arc<OwnedFd>,
    counters: Arc<Counters>,
    /// Workers lost unasked, still to be replaced (counted as respawns).
    to_respawn: u64,
    phase: Phase,
    /// Whether every worker of the first generation has been ready once.
    ready_once: bool,
}

/// A log entry waiting to be handed to the pool's `-log` command, which
/// runs after the supervisor's state is released (it may call back in).
struct LogEntry {
    log: Option<Vec<Obj>>,
    interp: Interp,
    port: u16,
    fields: Vec<(&'static str, Obj)>,
}

/// The pools of a process, on the one thread that runs them. Its signal
/// dispositions and pipe belong to the process (`signals`), its file
/// handler and timer to this thread (`after_fork::EventSources`); what a
/// forked child keeps of it is stated in `after_fork`.
struct Supervisor {
    /// The process the pools belong to; a forked child has none.
    pid: Pid,
    pools: Vec<Pool>,
    /// A signal asked for the stop: exit once every pool is gone.
    exit_when_stopped: bool,
    /// Nesting depth of `pool wait`.
    waiting: u32,
    /// Exit the process once the supervisor's state is released.
    exit_requested: bool,
    /// The pid of a new generation that has not said "ready" yet.
    upgrading: Option<Pid>,
    /// Next generations started and not reaped yet.
    next_generations: Vec<Pid>,
    /// Every port this process has had a pool on: `pool wait` on one whose
    /// pool is gone has nothing left to wait for.
    had: Vec<u16>,
    log: Vec<LogEntry>,
}

thread_local! {
    static SUPERVISOR: RefCell<Supervisor> = const { RefCell::new(Supervisor {
        pid: Pid::from_raw(0),
        pools: Vec::new(),
        exit_when_stopped: false,
        waiting: 0,
        exit_requested: false,
        upgrading: None,
        next_generations: Vec::new(),
        had: Vec::new(),
        log: Vec::new(),
    }) };
}

/// The thread that runs the pools of this process, while it has any: a
/// pool made in another thread would share the process's signals and
/// pipe with it, and the signals act on one thread's pools only.
static SUPERVISOR_THREAD: Mutex<Option<(Pid, std::thread::ThreadId)>> = Mutex::new(None);

/// Whether this thread may run pools: no other thread of this process does.
fn claim_supervisor_thread() -> TclResult<()> {
    let mut owner = SUPERVISOR_THREAD.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let here = (nix::unistd::getpid(), std::thread::current().id());
    match *owner {
        Some((pid, thread)) if pid == here.0 && thread != here.1 => Err(TclError::new(
            "pools of this process are run by another thread",
            &["SOCKETSERVER", "POOL", "THREAD"],
        )),
        _ => {
            *owner = Some(here);
            Ok(())
        }
    }
}

/// Lets another thread run pools; returns whether this one did.
fn release_supervisor_thread() -> bool {
    let mut owner = SUPERVISOR_THREAD.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let ours = *owner == Some((nix::unistd::getpid(), std::thread::current().id()));
    if ours {
        *owner = None;
    }
    ours
}

/// Runs `f` on the supervisor's state, then hands out the log entries it
/// made. The state is never borrowed while Tcl code of the user runs, so
/// `f` cannot be re-entered.
fn with_supervisor<R>(f: impl FnOnce(&mut Supervisor) -> R) -> R {
    let result = SUPERVISOR.with(|s| f(&mut s.borrow_mut()));
    flush_log();
    if SUPERVISOR.with(|s| s.try_borrow().is_ok_and(|s| s.exit_requested)) {
        tcl::exit(0);
    }
    result
}

pub(super) fn not_here() -> TclError {
    TclError::new(
        "pools are run by the process that created them, not by its workers",
        &["SOCKETSERVER", "POOL", "WORKER"],
    )
}

fn unknown_pool(port: u16) -> TclError {
    TclError::new(format!("no pool serves port {port}"), &["SOCKETSERVER", "POOL", "UNKNOWN", &port.to_string()])
}

/// Starts a pool on `port`, which is already open in this process.
pub fn create(interp: Interp, state: *const InterpState, port: u16, config: Config) -> TclResult<()> {
    if worker::is_worker() {
        return Err(not_here());
    }
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
        let started = Scoreboard::new(MAX_WORKERS * 2)
            .map_err(|e| TclError::posix("couldn't create the scoreboard", e as i32))
            .and_then(|scoreboard| sup.start_watching(config.signals).map(|()| scoreboard));
        let scoreboard = match started {
            Ok(scoreboard) => scoreboard,
            Err(error) => {
                // A pool that could not start leaves nothing taken behind.
                sup.after_pool_gone();
                return Err(error);
            }
        };
        let target = config.workers;
        if !sup.had.contains(&port) {
            sup.had.push(port);
        }
        sup.pools.push(Pool {
            port,
            interp,
            state,
            config,
            scoreboard,
            generation: 1,
            newest_generation: 1,
            target,
            children: Vec::new(),
            totals: Totals::default(),
            failures: 0,
            retry_at: None,
            failed_at: None,
            last_failure: String::new(),
            reload: Reload::None,
            queue,
            counters,
            to_respawn: 0,
            phase: Phase::Running,
            ready_once: false,
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

/// A rolling reload: a new generation, then the old one leaves.
pub fn reload(port: u16) {
    with_supervisor(|sup| sup.reload(port));
}

pub fn resize(port: u16, workers: usize) {
    with_supervisor(|sup| sup.resize(port, workers));
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
    SUPERVISOR.with(|s| s.try_borrow().map(|s| s.pools.iter().all(|p| p.ready_once)).unwrap_or(false))
}

/// Starts the next generation of this process with its listeners; this
/// one stops gracefully once the new one says it serves. Returns its pid.
pub fn upgrade(command: Vec<String>) -> TclResult<i32> {
    if worker::is_worker() {
        return Err(not_here());
    }
    with_supervisor(|sup| sup.upgrade(command))
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
            self.pools.drain(..).for_each(std::mem::forget);
            return;
        }
        if !crate::registration::exiting() {
            let now = Instant::now();
            let mut children: Vec<(Pid, Option<Instant>)> = Vec::new();
            for pool in &self.pools {
                let deadline = match pool.phase {
                    Phase::Stopping { deadline } => deadline,
                    Phase::Running => now + pool.config.graceful,
                };
                children.extend(pool.children.iter().map(|c| (c.pid, Some(deadline))));
            }
            // A next generation may be the server now: reaped, never killed.
            children.extend(self.next_generations.iter().map(|&pid| (pid, None)));
            reap_in_background(children);
        }
        self.pools.clear();
        if release_supervisor_thread() {
            signals::release_all();
        }
    }
}

/// Reaps `children` of a supervisor whose thread has ended, from a thread
/// of its own that ends with the last of them: exactly these pids, so no
/// child of the script is taken from it. One still running at its
/// deadline (the pool's `-graceful` period) is killed, as the pool would
/// have done.
fn reap_in_background(mut children: Vec<(Pid, Option<Instant>)>) {
    if children.is_empty() {
        return;
    }
    let reaper = move || {
        let mut pause = Duration::from_millis(10);
        loop {
            let now = Instant::now();
            children.retain(|&(pid, deadline)| {
                if deadline.is_some_and(|deadline| now >= deadline) {
                    let _ = kill(pid, Signal::SIGKILL);
                }
                // Reaped, or no longer ours to reap (a script's own `wait`).
                matches!(waitpid(pid, Some(WaitPidFlag::WNOHANG)), Ok(WaitStatus::StillAlive))
            });
            if children.is_empty() {
                return;
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    };
    // Spawning while thread-locals are destroyed: a failure or a panic
    // leaves the children to init once this process exits, and must not
    // abort it.
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        std::thread::Builder::new().name("socketserver-rip".into()).stack_size(crate::THREAD_STACK_SIZE).spawn(reaper)
    }));
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
        for pool in self.pools.drain(..) {
            std::mem::forget(pool);
        }
        self.exit_when_stopped = false;
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
        signals::hold_exactly(&wanted)
    }

    fn index(&self, port: u16) -> Option<usize> {
        self.pools.iter().position(|p| p.port == port)
    }

    fn reload(&mut self, port: u16) {
        let Some(index) = self.index(port) else { return };
        let pool = &mut self.pools[index];
        if !matches!(pool.phase, Phase::Running) {
            return;
        }
        // A reload during a reload keeps the generation that served before
        // both, to fall back on.
        let previous = match pool.reload {
            Reload::Running { previous } => previous,
            _ => pool.generation,
        };
        pool.reload = Reload::Running { previous };
        pool.newest_generation += 1;
        pool.generation = pool.newest_generation;
        // Whatever failed before, the new generation gets its own tries.
        pool.failures = 0;
        pool.retry_at = None;
        let entry = pool.entry("reload", vec![("generation", Obj::new_int(pool.generation.into()))]);
        self.log.push(entry);
        self.reconcile(index);
    }

    fn resize(&mut self, port: u16, workers: usize) {
        let Some(index) = self.index(port) else { return };
        let pool = &mut self.pools[index];
        pool.target = workers;
        let entry = pool.entry("resize", vec![("workers", Obj::new_int(workers as i64))]);
        self.log.push(entry);
        self.reconcile(index);
    }

    fn stop(&mut self, port: u16) {
        let Some(index) = self.index(port) else { return };
        let pool = &mut self.pools[index];
        if matches!(pool.phase, Phase::Stopping { .. }) {
            return;
        }
        pool.phase = Phase::Stopping { deadline: Instant::now() + pool.config.graceful };
        // Closing the port stops accepting and frees the port at once;
        // connections already queued stay deliverable, and each worker
        // leaves when the queue is drained and its channels are closed.
        let removed = {
            let mut table = port_table::table();
            table.remove(port)
        };
        drop(removed);
        let entry = pool.entry("stop", vec![("workers", Obj::new_int(pool.children.len() as i64))]);
        self.log.push(entry);
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
                    let again = self.exit_when_stopped;
                    self.exit_when_stopped = true;
                    for &port in &ports {
                        if again {
                            // A second stop signal: do not wait for busy workers.
                            if let Some(index) = self.index(port) {
                                self.pools[index].phase = Phase::Stopping { deadline: Instant::now() };
                            }
                        }
                        self.stop(port);
                    }
                }
                Signal::SIGHUP => ports.iter().for_each(|&port| self.reload(port)),
                Signal::SIGUSR2 if !ports.is_empty() => {
                    let index = self.index(ports[0]).unwrap_or(0);
                    let command = default_command(self.pools[index].interp);
                    if let Err(TclError::Message { message, .. }) = self.upgrade(command) {
                        let entry = self.pools[index].entry("upgrade-failed", vec![("message", Obj::new_string(&message))]);
                        self.log.push(entry);
                    }
                }
                Signal::SIGTTIN | Signal::SIGTTOU => {
                    for &port in &ports {
                        if let Some(index) = self.index(port) {
                            let target = self.pools[index].target;
                            let target = if *signal == Signal::SIGTTIN {
                                (target + 1).min(MAX_WORKERS)
                            } else {
                                target.saturating_sub(1).max(1)
                            };
                            self.resize(port, target);
                        }
                    }
                }
                _ => {}
            }
        }
    }

    fn upgrade(&mut self, command: Vec<String>) -> TclResult<i32> {
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
    fn reap_next_generations(&mut self) {
        self.next_generations.retain(|&pid| matches!(waitpid(pid, Some(WaitPidFlag::WNOHANG)), Ok(WaitStatus::StillAlive)));
    }

    fn reconcile_all(&mut self) {
        self.reap_next_generations();
        for index in (0..self.pools.len()).rev() {
            self.reconcile(index);
        }
    }

    /// Brings pool `index` to what it should be; may remove it when stopped.
    fn reconcile(&mut self, index: usize) {
        let mut entries = Vec::new();
        let pool = &mut self.pools[index];
        pool.reap(&mut entries);
        pool.settle_reload(&mut entries);
        let now = Instant::now();
        pool.kill_stuck(&mut entries);
        match pool.phase {
            Phase::Running => {
                pool.retire_surplus(&mut entries);
                let wanted = pool.missing();
                let fork_now = pool.forks_allowed(now, wanted);
                self.log.append(&mut entries);
                for _ in 0..fork_now {
                    self.spawn(index);
                }
                let pool = &mut self.pools[index];
                if !pool.ready_once && pool.ready_count() >= pool.target {
                    pool.ready_once = true;
                    // A new generation of the accepting process serves now.
                    let all = self.pools.iter().all(|p| p.ready_once);
                    crate::inherited::announce_ready_if_done(all);
                }
            }
            Phase::Stopping { deadline } => {
                if now >= deadline {
                    for i in 0..pool.children.len() {
                        if pool.children[i].killed.is_some() {
                            continue;
                        }
                        let pid = pool.children[i].pid;
                        let _ = kill(pid, Signal::SIGKILL);
                        pool.children[i].killed = Some("graceful");
                        entries.push(pool.entry("kill", vec![
                            ("pid", Obj::new_int(pid.as_raw().into())),
                            ("reason", Obj::new_string("graceful period over")),
                        ]));
                    }
                }
                // Every accepted connection is served: when the workers
                // that will still take one are gone (recycled, or dead)
                // and some are queued, one more worker serves them.
                let queued = now < deadline && pool.queue_pending();
                let fork_now = if queued && !pool.children.iter().any(|c| pool.takes_connections(c)) {
                    pool.forks_allowed(now, 1)
                } else {
                    0
                };
                let gone = pool.children.is_empty() && !queued;
                if gone {
                    entries.push(pool.entry("stopped", vec![]));
                }
                self.log.append(&mut entries);
                for _ in 0..fork_now {
                    self.spawn(index);
                }
                if gone {
                    self.pools.remove(index);
                    self.after_pool_gone();
                }
            }
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
        let EventSources { pipe, tick } = after_fork::event_sources();
        after_fork::set_event_sources(EventSources { pipe: None, tick: None });
        if let Some(pipe) = pipe {
            tcl::delete_file_handler(pipe);
        }
        if let Some(tick) = tick {
            tcl::delete_timer(tick);
        }
        signals::release_all();
        let _ = release_supervisor_thread();
        if self.exit_when_stopped && self.waiting == 0 {
            self.exit_requested = true;
        }
    }

    /// Forks one worker of the current generation for pool `index`.
    fn spawn(&mut self, index: usize) {
        // What a worker must not keep of the supervisor's (the leave pipes,
        // the signal pipe and its handler, the tick) it lets go at the fork
        // itself (`after_fork`).
        let pool = &mut self.pools[index];
        let Some(slot) = pool.scoreboard.assign(pool.generation) else {
            let entry = pool.entry("error", vec![("message", Obj::new_string("no free scoreboard slot"))]);
            self.log.push(entry);
            return;
        };
        let (leave_read, leave_write) = match LeaveEnd::pipe() {
            Ok(ends) => ends,
            Err(errno) => {
                pool.scoreboard.slot(slot).free();
                // Out of descriptors is a failed start, backed off as one.
                pool.count_failure(format!("pipe: {}", errno.desc()));
                let entry = pool.entry("error", vec![("message", Obj::new_string(&format!("pipe: {}", errno.desc())))]);
                self.log.push(entry);
                return;
            }
        };
        let limit = (pool.config.max_connections > 0)
            .then(|| pool.config.max_connections + random_below(pool.config.jitter + 1));
        // SAFETY: the child runs only `worker::run`, which never returns into
        // the caller's frames.
        match signals::fork_worker(|| unsafe { crate::process::fork_flushed(pool.interp) }) {
            Ok(ForkResult::Child) => worker::run(Assignment {
                port: pool.port,
                interp: pool.interp,
                state: pool.state,
                handler: pool.config.handler.clone(),
                init: pool.config.init.clone(),
                concurrency: pool.config.concurrency,
                limit,
                slot: pool.scoreboard.leak_slot(slot),
                leave: leave_read,
                signals: pool.config.signals,
                close: Vec::new(),
                tick: None,
                queue: Arc::clone(&pool.queue),
                counters: Arc::clone(&pool.counters),
            }),
            Ok(ForkResult::Parent { child }) => {
                drop(leave_read);
                pool.scoreboard.slot(slot).set_pid(child.as_raw());
                pool.children.push(Child {
                    pid: child,
                    slot,
                    generation: pool.generation,
                    forked: Instant::now(),
                    leave: Some(leave_write),
                    retired: None,
                    killed: None,
                });
                pool.totals.started += 1;
                let mut fields = vec![
                    ("pid", Obj::new_int(child.as_raw().into())),
                    ("generation", Obj::new_int(pool.generation.into())),
                ];
                if pool.to_respawn > 0 {
                    pool.to_respawn -= 1;
                    pool.totals.respawned += 1;
                    fields.push(("respawn", Obj::new_int(1)));
                }
                let entry = pool.entry("start", fields);
                self.log.push(entry);
            }
            Err(errno) => {
                pool.scoreboard.slot(slot).free();
                pool.count_failure(format!("fork: {}", errno.desc()));
                let entry = pool.entry("error", vec![("message", Obj::new_string(&format!("fork: {}", errno.desc())))]);
                self.log.push(entry);
            }
        }
    }
}

impl Pool {
    fn entry(&self, event: &str, fields: Vec<(&'static str, Obj)>) -> LogEntry {
        let mut all = vec![("event", Obj::new_string(event)), ("port", Obj::new_int(self.port.into()))];
        all.extend(fields);
        LogEntry { log: self.config.log.clone(), interp: self.interp, port: self.port, fields: all }
    }

    /// Collects the workers that have exited, and counts the failures
    /// among them. A failure is a worker that ends unasked before it
    /// received a connection (its `-init` failed, it exited, it crashed) or
    /// by a signal nobody sent it on the pool's behalf. A worker that
    /// exits after it received one (a handler that calls `exit`), that
    /// recycles, or that the supervisor retired or killed, did not fail:
    /// it is replaced at once.
    fn reap(&mut self, entries: &mut Vec<LogEntry>) {
        let mut index = 0;
        while index < self.children.len() {
            let pid = self.children[index].pid;
            let status = match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => {
                    index += 1;
                    continue;
                }
                Ok(status) => status,
                // Reaped by someone else (a script's own `wait`): gone all the same.
                Err(_) => WaitStatus::Exited(pid, 255),
            };
            let child = self.children.remove(index);
            let slot = self.scoreboard.slot(child.slot);
            let left_by_itself = slot.state() == State::Stopping && child.retired.is_none();
            let served = slot.served();
            let received = served + u64::from(slot.open()) > 0;
            let message = slot.failure();
            self.totals.proxy_errors += slot.proxy_errors();
            slot.free();
            let (status_text, clean, signaled) = match status {
                WaitStatus::Exited(_, code) => (format!("exit {code}"), code == 0, false),
                WaitStatus::Signaled(_, signal, _) => (format!("signal {}", signal.as_str()), false, true),
                other => (format!("{other:?}"), false, false),
            };
            let mut fields = vec![
                ("pid", Obj::new_int(pid.as_raw().into())),
                ("generation", Obj::new_int(child.generation.into())),
                ("status", Obj::new_string(&status_text)),
                ("served", Obj::new_int(served as i64)),
            ];
            if !message.is_empty() {
                fields.push(("error", Obj::new_string(&message)));
            }
            let stopping = matches!(self.phase, Phase::Stopping { .. });
            let mut backoff_entry = None;
            if child.retired.is_some() || stopping {
                // Asked to leave: nothing to replace.
            } else if left_by_itself && clean {
                self.totals.recycled += 1;
                fields.push(("recycled", Obj::new_int(1)));
            } else {
                self.to_respawn += 1;
                let failed = child.killed.is_none() && (signaled || !received);
                if failed {
                    let reason = if message.is_empty() { status_text.clone() } else { message.clone() };
                    let delay = self.count_failure(reason);
                    self.totals.backoffs += 1;
                    backoff_entry = Some(self.entry("backoff", vec![
                        ("failures", Obj::new_int(self.failures.into())),
                        ("delay", Obj::new_double(delay.as_secs_f64())),
                    ]));
                } else if received && child.generation == self.generation {
                    // It served: the code works.
                    self.end_failures();
                }
            }
            if let Some(reason) = child.killed {
                fields.push(("killed", Obj::new_string(reason)));
            }
            entries.push(self.entry("exit", fields));
            entries.extend(backoff_entry);
        }
        // A worker of the current generation forked after the last failure
        // that outlives its youth ends the run. Older workers say nothing
        // about the code that fails now (a reload's new `-init`).
        if let Some(failed_at) = self.failed_at {
            let generation = self.generation;
            if self.children.iter().any(|c| {
                c.generation == generation && c.retired.is_none() && c.forked > failed_at && c.forked.elapsed() >= YOUNG
            }) {
                self.end_failures();
            }
        }
    }

    /// Counts a failed start; returns the back-off before the next try.
    fn count_failure(&mut self, reason: String) -> Duration {
        self.failures += 1;
        let now = Instant::now();
        self.failed_at = Some(now);
        self.last_failure = reason;
        let delay = backoff(self.failures);
        self.retry_at = Some(now + delay);
        delay
    }

    fn end_failures(&mut self) {
        self.failures = 0;
        self.retry_at = None;
        self.failed_at = None;
    }

    /// How many of `wanted` workers may be forked now: all of them, or,
    /// while failures back off, one when its turn has come.
    fn forks_allowed(&mut self, now: Instant, wanted: usize) -> usize {
        if self.failures == 0 {
            wanted
        } else if self.retry_at.is_none_or(|at| now >= at) {
            // Backing off: one worker tries, the others wait for it.
            self.retry_at = Some(now + backoff(self.failures));
            wanted.min(1)
        } else {
            0
        }
    }

    /// A reload is done once its generation is ready, and abandoned after
    /// `RELOAD_FAILURES` failures in a row: the generation that served
    /// before serves on, and the next reload tries again.
    fn settle_reload(&mut self, entries: &mut Vec<LogEntry>) {
        let Reload::Running { previous } = self.reload else { return };
        if self.ready_count() >= self.target {
            self.reload = Reload::Done;
            return;
        }
        if self.failures < RELOAD_FAILURES {
            return;
        }
        let abandoned = self.generation;
        // The newest generation with a worker that serves, if a reload
        // during this one got that far; else the one before them.
        let ready = |c: &Child| {
            c.retired.is_none()
                && c.killed.is_none()
                && matches!(self.scoreboard.slot(c.slot).state(), State::Idle | State::Busy)
        };
        self.generation =
            self.children.iter().filter(|c| ready(c)).map(|c| c.generation).max().unwrap_or(previous);
        let reason = std::mem::take(&mut self.last_failure);
        entries.push(self.entry("reload-failed", vec![
            ("generation", Obj::new_int(abandoned.into())),
            ("failures", Obj::new_int(self.failures.into())),
            ("reason", Obj::new_string(&reason)),
        ]));
        self.reload = Reload::Failed { reason };
        self.end_failures();
        self.to_respawn = 0;
    }

    /// Whether a worker will still take connections from the queue.
    fn takes_connections(&self, child: &Child) -> bool {
        child.retired.is_none()
            && child.killed.is_none()
            && matches!(self.scoreboard.slot(child.slot).state(), State::Starting | State::Idle | State::Busy)
    }

    /// Whether a connection waits in the queue (peeked, not taken).
    fn queue_pending(&self) -> bool {
        let mut byte = [0u8; 1];
        let flags = nix::sys::socket::MsgFlags::MSG_PEEK | nix::sys::socket::MsgFlags::MSG_DONTWAIT;
        matches!(nix::sys::socket::recv(self.queue.as_raw_fd(), &mut byte, flags), Ok(1..))
    }

    /// Kills workers busy on one connection for longer than `-timeout`.
    fn kill_stuck(&mut self, entries: &mut Vec<LogEntry>) {
        let Some(timeout) = self.config.timeout else { return };
        let now = now_millis();
        let limit = timeout.as_millis() as u64;
        for index in 0..self.children.len() {
            let child = &self.children[index];
            let slot = self.scoreboard.slot(child.slot);
            let since = slot.busy_since();
            if child.killed.is_some() || since == 0 || now.saturating_sub(since) <= limit {
                continue;
            }
            let peer = slot.peer();
            let _ = kill(child.pid, Signal::SIGKILL);
            self.children[index].killed = Some("timeout");
            self.totals.timed_out += 1;
            let (host, port) = peer.rsplit_once(' ').unwrap_or((&peer, ""));
            let entry = self.entry("timeout", vec![
                ("pid", Obj::new_int(self.children[index].pid.as_raw().into())),
                ("peer", Obj::new_list(&[Obj::new_string(host), Obj::new_string(port)])),
                ("busy", Obj::new_double(now.saturating_sub(since) as f64 / 1000.0)),
            ]);
            entries.push(entry);
        }
    }

    /// Workers of the current generation that count toward the target:
    /// not asked to leave, not leaving by themselves, not killed.
    fn serving(&self) -> impl Iterator<Item = &Child> {
        self.children.iter().filter(move |c| {
            c.generation == self.generation
                && c.retired.is_none()
                && c.killed.is_none()
                && self.scoreboard.slot(c.slot).state() != State::Stopping
        })
    }

    /// Workers of the current generation that are registered or serving.
    fn ready_count(&self) -> usize {
        self.serving().filter(|c| matches!(self.scoreboard.slot(c.slot).state(), State::Idle | State::Busy)).count()
    }

    fn missing(&self) -> usize {
        self.target.saturating_sub(self.serving().count())
    }

    /// Asks workers to leave: the current generation's beyond the target,
    /// and old generations' as new workers become ready. Idle ones first.
    fn retire_surplus(&mut self, entries: &mut Vec<LogEntry>) {
        let serving = self.serving().count();
        if serving > self.target {
            let mut excess = serving - self.target;
            let generation = self.generation;
            excess -= self.retire(excess, Retired::Resize, |c| c.generation == generation, entries);
            debug_assert_eq!(excess, 0);
        }
        let ready = self.ready_count();
        let generation = self.generation;
        let old: usize = self
            .children
            .iter()
            .filter(|c| c.generation != generation && c.retired.is_none() && c.killed.is_none())
            .count();
        let allowed_old = self.target.saturating_sub(ready);
        if old > allowed_old {
            self.retire(old - allowed_old, Retired::Reload, |c| c.generation != generation, entries);
        }
    }

    /// Retires up to `count` workers matching `which`, idle before starting
    /// before busy; returns how many.
    fn retire(
        &mut self,
        count: usize,
        reason: Retired,
        which: impl Fn(&Child) -> bool,
        entries: &mut Vec<LogEntry>,
    ) -> usize {
        let mut candidates: Vec<usize> = (0..self.children.len())
            .filter(|&i| {
                let c = &self.children[i];
                c.retired.is_none() && c.killed.is_none() && which(c)
            })
            .collect();
        let rank = |state: State| match state {
            State::Idle => 0,
            State::Starting => 1,
            State::Stopping => 2,
            _ => 3,
        };
        candidates.sort_by_key(|&i| rank(self.scoreboard.slot(self.children[i].slot).state()));
        let mut done = 0;
        for i in candidates.into_iter().take(count) {
            let child = &mut self.children[i];
            child.retired = Some(reason);
            // The flag is read when the worker would register again; end of
            // file on its leave pipe wakes it if it is idle. Either way it
            // leaves once its channels are closed.
            self.scoreboard.slot(child.slot).request_leave();
            child.leave = None;
            done += 1;
            let fields = vec![
                ("pid", Obj::new_int(child.pid.as_raw().into())),
                ("generation", Obj::new_int(child.generation.into())),
                ("reason", Obj::new_string(if reason == Retired::Reload { "reload" } else { "resize" })),
            ];
            entries.push(self.entry("retire", fields));
        }
        done
    }

    fn info(&self) -> Obj {
        let now = now_millis();
        let mut workers = Vec::new();
        let stopping = matches!(self.phase, Phase::Stopping { .. });
        for child in &self.children {
            let slot = self.scoreboard.slot(child.slot);
            // A worker told to leave is stopping, though it may not know yet.
            let state = if (stopping || child.retired.is_some()) && slot.state() != State::Starting {
                State::Stopping
            } else {
                slot.state()
            };
            let since = slot.busy_since();
            let busy = if since == 0 { 0.0 } else { now.saturating_sub(since) as f64 / 1000.0 };
            workers.push(Obj::new_int(child.pid.as_raw().into()));
            workers.push(Obj::new_dict(vec![
                ("state", Obj::new_string(state.name())),
                ("generation", Obj::new_int(child.generation.into())),
                ("served", Obj::new_int(slot.served() as i64)),
                ("open", Obj::new_int(slot.open().into())),
                ("busy", Obj::new_double(busy)),
            ]));
        }
        let phase = match self.phase {
            Phase::Running => "running",
            Phase::Stopping { .. } => "stopping",
        };
        Obj::new_dict(vec![
            ("port", Obj::new_int(self.port.into())),
            ("state", Obj::new_string(phase)),
            ("generation", Obj::new_int(self.generation.into())),
            ("target", Obj::new_int(self.target as i64)),
            ("concurrency", Obj::new_int(self.config.concurrency as i64)),
            ("workers", Obj::new_list(&workers)),
            ("started", Obj::new_int(self.totals.started as i64)),
            ("respawned", Obj::new_int(self.totals.respawned as i64)),
            ("recycled", Obj::new_int(self.totals.recycled as i64)),
            ("timedout", Obj::new_int(self.totals.timed_out as i64)),
            ("backoffs", Obj::new_int(self.totals.backoffs as i64)),
            ("reload", Obj::new_string(match self.reload {
                Reload::None => "none",
                Reload::Running { .. } => "running",
                Reload::Done => "done",
                Reload::Failed { .. } => "failed",
            })),
            ("reloaderror", Obj::new_string(match &self.reload {
                Reload::Failed { reason } => reason,
                _ => "",
            })),
            ("proxyerrors", Obj::new_int(
                (self.totals.proxy_errors
                    + self.children.iter().map(|c| self.scoreboard.slot(c.slot).proxy_errors()).sum::<u64>())
                    as i64,
            )),
        ])
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

/// The back-off before the next try after `failures` young deaths in a row.
fn backoff(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    (BACKOFF_FIRST * 2u32.pow(doublings)).min(BACKOFF_CAP)
}

/// A random number in `0..bound`, for the recycling jitter.
fn random_below(bound: u64) -> u64 {
    let mut bytes = [0u8; 8];
    // SAFETY: getrandom fills at most `bytes.len()` bytes of our buffer.
    let filled = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if filled != 8 || bound == 0 {
        return 0;
    }
    u64::from_ne_bytes(bytes) % bound
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

/// Hands the collected log entries to their pools' `-log` commands.
fn flush_log() {
    let entries = SUPERVISOR.with(|s| s.try_borrow_mut().map(|mut s| std::mem::take(&mut s.log)).unwrap_or_default());
    flush_entries(entries);
}

fn flush_entries(entries: Vec<LogEntry>) {
    for entry in entries {
        if entry.log.is_none() {
            // One line: "socketserver pool 8080: exit pid 4242 status {exit 0}".
            let mut fields = entry.fields.iter();
            let event = fields.next().map(|(_, v)| v.to_string_lossy()).unwrap_or_default();
            let rest = Obj::new_dict(fields.skip(1).map(|(k, v)| (*k, v.clone())).collect());
            // A closed or full stderr loses the line; it never stops the pool.
            let _ = writeln!(std::io::stderr(), "socketserver pool {}: {event} {}", entry.port, rest.to_string_lossy());
            continue;
        }
        let dict = Obj::new_dict(entry.fields);
        match entry.log {
            None => {}
            Some(prefix) if prefix.is_empty() => {}
            Some(mut words) => {
                words.push(dict);
                let _ = entry.interp.eval_global_in_background(&words);
            }
        }
    }
}

/// The signal pipe is readable: signals arrived, or a worker asks for
/// attention.
unsafe extern "C" fn on_pipe(_: *mut c_void, _mask: std::ffi::c_int) {
    let _ = std::panic::catch_unwind(|| {
        with_supervisor(|sup| {
            // Only the supervisor thread of the supervisor has this handler.
            let Some(pipe) = after_fork::event_sources().pipe else { return };
            let (received, _notified) = signals::drain(pipe);
            sup.on_signals(&received);
            sup.reconcile_all();
        })
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
            sup.reconcile_all();
        })
    });
}
