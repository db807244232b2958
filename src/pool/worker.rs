//! A pool's worker: the forked process that serves connections.
//!
//! The supervisor forks, and the child never returns into the script that
//! was running: `run` sets the process up as a worker, runs `-init`, and
//! serves events until it is time to leave, then exits. The user's handler
//! is called as `socket -server` calls its command; the worker registers
//! again by itself when a channel it was given is closed (a Tcl close
//! handler), keeping up to `concurrency` channels open at once.
//!
//! It leaves when its leave pipe reaches end of file (the supervisor closed
//! its end: reload, resize, or the supervisor died), when the queue closes
//! (the pool stopped), or when it is due to be recycled and its turn
//! has come (`recycling`: `-maxconnections`, `-maxrss`, `-maxlifetime`);
//! in each case only once the channels it holds are closed.

use std::cell::RefCell;
use std::ffi::c_void;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicI32, AtomicU8, Ordering};
use std::sync::Arc;

use crate::counters::Counters;
use crate::handoff::Connection;
use crate::port_table;
use crate::registration::{self, Handler, InterpState, NativeHandler};
use crate::tcl::{self, Interp, Obj};

use super::scoreboard::{now_millis, Slot, State};
use super::{hang_report, recycling, signals};

/// Scripts run in each interpreter of the worker's thread (lambdas, so
/// that no global variable of the script is touched).
const CHANNEL_NAMES: &str = "chan names";
const SUPERVISOR_FILE_EVENTS: &str = "apply {{} {
    foreach chan [chan names] {
        catch {chan event $chan readable {}}
        catch {chan event $chan writable {}}
    }
}}";
const SUPERVISOR_TIMERS: &str = "apply {{} {foreach id [after info] {after cancel $id}}}";

/// Every interpreter of the tree `interp` belongs to, root first.
fn interpreter_tree(interp: Interp) -> Vec<Interp> {
    let mut root = interp;
    while let Some(parent) = root.parent() {
        root = parent;
    }
    let mut tree = vec![root];
    let mut next = 0;
    while next < tree.len() {
        let children = tree[next].children();
        tree.extend(children);
        next += 1;
    }
    tree
}

/// What a worker takes over from the process it was forked from, stated
/// once and enforced here: every interpreter of the forking thread (the
/// pool's interpreter, the one it is a child of, and so on up to the
/// root, and every descendant of that root) keeps its
/// procs, variables and channels, but none of the supervisor's event
/// sources. Its TCP sockets, and channels stacked on them, are closed (a
/// server socket would accept here too; a connection must have one owner,
/// or its peer never sees it close); its other channels lose their
/// `fileevent` scripts (stdin read by a console is the supervisor's); its
/// `after` timers are cancelled. Other threads do not exist in a forked
/// process: their interpreters never run there.
fn leave_events_to_supervisor(interp: Interp) {
    for member in interpreter_tree(interp) {
        leave_sockets_to_supervisor(member);
        let _ = member.eval_global(&Obj::new_string(SUPERVISOR_FILE_EVENTS));
        let _ = member.eval_global(&Obj::new_string(SUPERVISOR_TIMERS));
    }
}

/// Closes this interpreter's copies of the supervisor's socket channels.
/// Tcl 9 shuts a socket's reading side down as it closes it, which would
/// end the supervisor's own connection or stop its listener (the socket is
/// shared, not copied): each descriptor is first replaced, under its
/// number, by a new socket that is connected to nothing, and that is what
/// Tcl shuts and closes. Tcl's file handler for the descriptor is removed
/// before, while the number still names the socket it was made for (the
/// notifier would fail to find the stand-in). A channel shared with
/// another interpreter is closed once each has let it go.
fn leave_sockets_to_supervisor(interp: Interp) {
    let Ok(names) = interp.eval_global(&Obj::new_string(CHANNEL_NAMES)) else { return };
    let Ok(names) = names.list_elements(interp) else { return };
    for name in names {
        let name = name.to_string_lossy();
        if matches!(name.as_str(), "stdin" | "stdout" | "stderr") || !interp.is_tcp_channel(&name) {
            continue;
        }
        if let Some(fd) = interp.channel_fd(&name) {
            tcl::delete_file_handler(fd);
            // A worker is single-threaded here: no fork can come between
            // the calls where close-on-exec is not atomic.
            if let Ok(stand_in) =
                crate::sys::socket_cloexec(nix::sys::socket::AddressFamily::Inet, nix::sys::socket::SockType::Stream)
            {
                let _ = crate::sys::dup_cloexec_onto(std::os::fd::AsFd::as_fd(&stand_in), fd);
            }
        }
        let close = Obj::new_list(&[Obj::new_string("close"), Obj::new_string(&name)]);
        let _ = interp.eval_global(&Obj::new_list(&[Obj::new_string("catch"), close]));
    }
}

/// What the supervisor hands to a worker it forks.
pub struct Assignment {
    pub port: u16,
    pub interp: Interp,
    pub state: *const InterpState,
    pub handler: Vec<Obj>,
    pub init: Option<Obj>,
    pub concurrency: usize,
    /// When to leave for recycling (`-maxconnections`, `-maxrss`).
    pub recycling: recycling::InWorker,
    /// Where to answer the supervisor's question after a busy timeout.
    pub hang_report: Option<&'static hang_report::Cell>,
    pub slot: &'static Slot,
    pub leave: OwnedFd,
    /// Whether the pool handles signals (the worker then handles its own).
    pub signals: bool,
    /// Descriptors of the supervisor's that this process must not keep.
    pub close: Vec<RawFd>,
    pub tick: Option<tcl::Timer>,
    /// The port's queue and counters, kept by the pool: a worker started
    /// while the pool stops serves what is queued after the port closed.
    pub queue: Arc<OwnedFd>,
    pub counters: Arc<Counters>,
    /// What the worker gives up before anything else (`privileges`).
    pub privileges: super::privileges::Privileges,
    /// The pool's `-graceful`: how long a worker whose supervisor died may
    /// take to leave before it ends itself.
    pub graceful: std::time::Duration,
}

/// The exit status of a worker that could not start (`-init` failed).
pub const EXIT_FAILED: i32 = 1;
/// The exit status of a worker whose Rust code panicked.
pub const EXIT_INTERNAL: i32 = 70;

struct OpenChannel {
    id: u64,
    since: u64,
    peer: String,
}

struct Worker {
    /// The worker process. A child forked inside it (by a handler) has a
    /// copy of this state but is an ordinary process, not the worker: it
    /// neither registers, nor serves, nor writes to the scoreboard.
    pid: nix::unistd::Pid,
    port: u16,
    interp: Interp,
    state: *const InterpState,
    handler: Vec<Obj>,
    concurrency: usize,
    recycling: recycling::InWorker,
    slot: &'static Slot,
    /// Open for as long as the process lives: the control thread polls it.
    _leave: OwnedFd,
    queue: Arc<OwnedFd>,
    counters: Arc<Counters>,
    received: u64,
    next_id: u64,
    open: Vec<OpenChannel>,
    leaving: bool,
    done: bool,
}

thread_local! {
    static WORKER: RefCell<Option<Worker>> = const { RefCell::new(None) };
}

/// The worker's pid, set from its first instruction on: `-init` runs
/// before the worker's state exists, and a `pool` command in it must get
/// the worker's error, not reach the supervisor's state, which the fork
/// copied in the middle of a borrow. (A child forked inside the worker has
/// another pid: it is not the worker.)
static WORKER_PID: AtomicI32 = AtomicI32::new(0);

/// Where the worker is, as its control thread sees it: a reason to leave
/// that comes while `-init` runs ends the process at once (it holds no
/// connection yet, and Tcl's loop may not run again before `-init`
/// returns, which may be never: a supervisor that died, or a reload
/// abandoned, must not leave it behind); once it serves, the reason is an
/// event of its loop, and it leaves when its channels are closed.
static PHASE: AtomicU8 = AtomicU8::new(IN_INIT);
const IN_INIT: u8 = 0;
const SERVING: u8 = 1;
const LEFT_IN_INIT: u8 = 2;

const NATIVE: NativeHandler =
    NativeHandler { connection: on_connection, queue_closed: on_queue_closed, proxy_rejected: on_proxy_rejected };

/// Whether this process is a pool's worker (not a child forked in one).
pub fn is_worker() -> bool {
    WORKER_PID.load(Ordering::Relaxed) == nix::unistd::getpid().as_raw()
}

/// Runs in the child right after `fork`; never returns. Whatever happens
/// in it ends in this process's exit, never in the frames of the script
/// the supervisor was running: a panic is caught here and ends the worker
/// with `EXIT_INTERNAL`.
pub fn run(assignment: Assignment) -> ! {
    WORKER_PID.store(nix::unistd::getpid().as_raw(), Ordering::Relaxed);
    let slot = assignment.slot;
    let panic = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| serve(assignment)));
    let message = panic.err().map(|payload| {
        payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_default()
    });
    let _ = std::panic::catch_unwind(|| slot.set_failure(&format!("internal error: {}", message.unwrap_or_default())));
    // SAFETY: _exit ends the process without running anything more of a
    // program whose state a panic may have left half-changed.
    unsafe { libc::_exit(EXIT_INTERNAL) }
}

/// Leaves the operator's session before anything of the script's runs: a
/// worker has no controlling terminal (it cannot type into it with
/// TIOCSTI, nor get the terminal's signals), and a terminal on its standard
/// input becomes /dev/null. Ctrl-C reaches the supervisor only, which
/// stops its workers gracefully itself. A process without a controlling
/// terminal (under systemd, in a container, a daemon) has no session to
/// leave, and its workers stay in it: on Linux a session is also a
/// scheduler autogroup, and a group per worker would leave the accepting
/// threads one share in N+1 of a saturated machine.
fn leave_terminal(slot: &Slot) {
    use nix::fcntl::{open, OFlag};
    let terminal = open("/dev/tty", OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC, nix::sys::stat::Mode::empty());
    let has_terminal = match terminal {
        Ok(fd) => {
            let _ = nix::unistd::close(fd);
            true
        }
        // No controlling terminal. Any other error: leave, to be sure.
        Err(errno) => errno != nix::errno::Errno::ENXIO,
    };
    if has_terminal {
        if let Err(errno) = nix::unistd::setsid() {
            give_up(slot, &format!("couldn't leave the session: {}", errno.desc()));
        }
    }
    if nix::unistd::isatty(0).unwrap_or(false) {
        let null = nix::fcntl::open("/dev/null", nix::fcntl::OFlag::O_RDWR, nix::sys::stat::Mode::empty());
        match null {
            Ok(null) if null != 0 => {
                let _ = nix::unistd::dup2(null, 0);
                let _ = nix::unistd::close(null);
            }
            Ok(_) => {}
            Err(errno) => give_up(slot, &format!("couldn't open /dev/null: {}", errno.desc())),
        }
    }
}

/// Ends a worker that cannot serve: the reason goes to the supervisor's log
/// (through the scoreboard), never straight to stderr.
fn give_up(slot: &Slot, message: &str) -> ! {
    slot.set_failure(message);
    tcl::exit(EXIT_FAILED);
}

fn serve(assignment: Assignment) -> ! {
    let Assignment {
        port,
        interp,
        state,
        handler,
        init,
        concurrency,
        recycling,
        hang_report,
        slot,
        leave,
        signals,
        close,
        tick,
        queue,
        counters,
        privileges,
        graceful,
    } = assignment;
    // First of all: from here on this process can write only its own slot
    // and hang-report cell of the memory it shares with the supervisor.
    let own = [std::ptr::from_ref(slot) as usize, hang_report.map_or(0, |cell| std::ptr::from_ref(cell) as usize)];
    if crate::shared_pages::keep_writable_only(&own).is_err() {
        // SAFETY: _exit ends the process at once; its slot may be
        // read-only already, so the reason cannot be written: the exit
        // status says it.
        unsafe { libc::_exit(EXIT_FAILED) }
    }
    leave_terminal(slot);
    super::wake::set_own_end(leave.as_raw_fd());
    signals::reset_in_worker();
    let hooked = super::hooks::worker_signals();
    let signal_pipe = if signals || !hooked.is_empty() {
        watch_signals(signals, &hooked, signals && hang_report.is_some())
    } else {
        None
    };
    if let Some(tick) = tick {
        tcl::delete_timer(tick);
    }
    for fd in close {
        let _ = nix::unistd::close(fd);
    }
    slot.set_pid(nix::unistd::getpid().as_raw());
    // Before anything of the user's runs: a worker that cannot drop never serves.
    privileges.apply().unwrap_or_else(|reason| give_up(slot, &reason));
    // Adopt the port table now: this closes our copies of every listener and
    // accept end, so a stopped port is free at once and its queue can close.
    let listening = port_table::table().listening_addresses();
    // SAFETY: the pool keeps the interpreter's state alive while it lives,
    // and this process is a copy of it.
    unsafe { &*state }.reset_if_forked();
    leave_events_to_supervisor(interp);
    // After Tcl closed its socket channels: what is left on our ports is a
    // copy of a connection the accepting threads were handling.
    crate::listener::close_copied_connections(&listening);
    PHASE.store(IN_INIT, Ordering::SeqCst);
    // Before the control thread, which reads what it sets.
    if let Some(cell) = hang_report {
        hang_report::arm(interp, cell, concurrency > 1, signals);
    }
    if let Err(error) = spawn_control(leave.as_raw_fd(), signal_pipe, super::hooks::mask(hooked), slot, graceful) {
        give_up(slot, &format!("couldn't start: {error}"));
    }
    // Before `-init`, which may set a handler of its own.
    super::stderr_log::report_background_errors(interp);
    if let Some(script) = init {
        if let Err(message) = interp.eval_global(&script) {
            give_up(slot, &super::report::init_failure(interp, &message, super::scoreboard::FAILURE_BYTES));
        }
    }
    if !is_worker() {
        // A child that `-init` forked and that returned from it: it is not
        // the worker the supervisor forked and tracks, and never serves.
        tcl::exit(0);
    }
    if PHASE.compare_exchange(IN_INIT, SERVING, Ordering::SeqCst, Ordering::SeqCst).is_err() {
        // The control thread is ending the process: asked to leave during
        // `-init`.
        loop {
            std::thread::park();
        }
    }
    WORKER.with(|w| {
        *w.borrow_mut() = Some(Worker {
            pid: nix::unistd::getpid(),
            port,
            interp,
            state,
            handler,
            concurrency,
            recycling,
            slot,
            _leave: leave,
            queue,
            counters,
            received: 0,
            next_id: 0,
            open: Vec::new(),
            leaving: false,
            done: false,
        })
    });
    // A handler that calls `exit` leaves through Tcl's exit handlers, not
    // through the loop below: the connections on their way to it go back
    // to the queue there.
    tcl::create_exit_handler(on_exit);
    with_worker(|w| w.register());
    if hang_report.is_some() {
        // SAFETY: see `Worker::interp_state`.
        if let Some(gate) = unsafe { &*state }.gate(port) {
            hang_report::watch_receiver(gate);
        }
    }
    signals::notify_supervisor();
    loop {
        // In a child forked by a handler this is never true: it serves its
        // events until it exits by itself, as after TclX's fork.
        if with_worker(|w| w.done) == Some(true) {
            // A connection taken just before we stopped waiting may still be
            // on its way: it goes back to the queue, not down with us.
            // SAFETY: see `Worker::interp_state`.
            unsafe { &*state }.give_back_all();
            tcl::exit(0);
        }
        // The worker's own loop, told from loops nested in its handlers
        // (`hang_report`).
        tcl::do_one_event_of_own_loop();
    }
}

/// Runs `f` on the worker's state, in the worker process only.
fn with_worker<R>(f: impl FnOnce(&mut Worker) -> R) -> Option<R> {
    let pid = nix::unistd::getpid();
    WORKER.with(|w| w.borrow_mut().as_mut().filter(|w| w.pid == pid).map(f))
}

impl Worker {
    fn interp_state(&self) -> &InterpState {
        // SAFETY: see `run`.
        unsafe { &*self.state }
    }

    fn registered(&self) -> bool {
        self.interp_state().is_waiting(self.port)
    }

    /// Waits for one more connection, if there is room and no reason to leave.
    fn register(&mut self) {
        // Asked to leave while busy, before the leave pipe's event came.
        if !self.leaving && self.slot.leave_requested() {
            self.leave();
            return;
        }
        if self.leaving || self.open.len() >= self.concurrency || self.registered() {
            self.publish();
            return;
        }
        let result = self.interp_state().register(
            self.port,
            Handler::Native(NATIVE),
            Arc::clone(&self.queue),
            Arc::clone(&self.counters),
        );
        if let Err(error) = result {
            self.interp.background_error(error);
            self.leave();
        }
        self.publish();
    }

    /// Stops taking connections; exits once the open channels are closed.
    fn leave(&mut self) {
        if !self.leaving {
            self.leaving = true;
            self.interp_state().cancel(self.port, false);
        }
        if self.open.is_empty() {
            self.done = true;
            self.recycling.done();
        }
        self.publish();
    }

    fn holds(&self, id: u64) -> bool {
        self.open.iter().any(|c| c.id == id)
    }

    /// Brings the scoreboard slot up to date.
    fn publish(&self) {
        let oldest = self.open.first().map(|c| (c.since, c.peer.as_str()));
        self.slot.set_open(self.open.len() as u32, oldest);
        let state = if self.leaving {
            State::Stopping
        } else if !self.open.is_empty() {
            State::Busy
        } else {
            State::Idle
        };
        self.slot.set_state(state);
    }
}

fn on_connection(interp: Interp, conn: Connection) {
    let prepared = with_worker(|w| {
        w.received += 1;
        w.next_id += 1;
        let id = w.next_id;
        let (host, peer_port) = conn.peer_host_and_port();
        let peer = format!("{host} {peer_port}");
        let stamps = crate::queue_time::stamps_of(&conn);
        let channel = interp.adopt_tcp_socket(conn.socket);
        crate::queue_time::remember(channel, stamps);
        channel.on_close(on_channel_closed, id as usize as *mut c_void);
        w.open.push(OpenChannel { id, since: now_millis(), peer });
        w.recycling.received(w.received);
        if w.recycling.leave_now() {
            // Recycled: the supervisor starts the replacement now.
            w.leave();
            signals::notify_supervisor();
        } else {
            w.register();
        }
        let name = Obj::new_string(&channel.name());
        let mut words = w.handler.clone();
        words.push(name.clone());
        words.push(Obj::new_string(&host));
        words.push(Obj::new_string(&peer_port));
        (words, id, name)
    });
    // Outside the borrow: the handler may close the channel at once.
    let Some((words, id, name)) = prepared else { return };
    if !interp.eval_global_in_background(&words) && with_worker(|w| w.holds(id)) == Some(true) {
        // The handler failed and left its channel open: nobody will close
        // it, and the worker would hold the slot for ever.
        let close = Obj::new_list(&[Obj::new_string("catch"), Obj::new_list(&[Obj::new_string("close"), name])]);
        let _ = interp.eval_global(&close);
    }
}

unsafe extern "C" fn on_channel_closed(data: *mut c_void) {
    // Channels closed while Tcl finalizes the exiting process need nothing.
    if registration::exiting() {
        return;
    }
    let id = data as usize as u64;
    let _ = std::panic::catch_unwind(|| {
        with_worker(|w| {
            let Some(index) = w.open.iter().position(|c| c.id == id) else { return };
            w.open.remove(index);
            w.slot.count_served();
            w.recycling.closed();
            if w.leaving {
                w.leave();
            } else if w.recycling.leave_now() {
                // Its turn to be recycled came.
                w.leave();
                signals::notify_supervisor();
            } else {
                w.register();
            }
        })
    });
}

/// A worker's own signals: SIGTERM means leave once the open channels are
/// closed. The pool's other signals reach a worker when they are sent to
/// the whole process group (Ctrl-C, a terminal that hangs up, `kill -HUP
/// -pgid`): they are the supervisor's to act on (a graceful stop, a
/// reload, a resize, an upgrade), and a worker caught by their default
/// action would die mid-reply (HUP, USR2) or stop (TTIN, TTOU). Signals
/// with hooks (`hooks`) are read from the same pipe; with `report`, also
/// `hang_report::REPORT_SIGNAL`, the supervisor's question after a busy
/// timeout. Returns the read end of the worker's signal pipe.
fn watch_signals(pools_own: bool, hooked: &[nix::sys::signal::Signal], report: bool) -> Option<RawFd> {
    use nix::sys::signal::Signal;
    let read_end = signals::pipe_read_end().ok()?;
    let own: &[Signal] = if pools_own {
        &[Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP, Signal::SIGTTIN, Signal::SIGTTOU, Signal::SIGUSR2]
    } else {
        &[]
    };
    for &signal in own.iter().chain(hooked) {
        let _ = signals::watch(signal);
    }
    if report {
        let _ = signals::watch(hang_report::REPORT_SIGNAL);
    }
    Some(read_end)
}

/// Starts the thread that waits for a reason to leave: end of file on the
/// leave pipe (retired, or the supervisor died), or SIGTERM. Started
/// before `-init`, which it ends by ending the process (see `PHASE`);
/// after, it queues a Tcl event. A thread, not a Tcl file handler: a file
/// handler would make Tcl's notifier thread take part in every wait of
/// the worker's loop, two more context switches per connection.
fn spawn_control(
    leave: RawFd,
    signal_pipe: Option<RawFd>,
    hooked: u64,
    slot: &'static Slot,
    graceful: std::time::Duration,
) -> std::io::Result<()> {
    let thread = tcl::current_thread();
    let supervisor = nix::unistd::getppid();
    std::thread::Builder::new().name("socketserver-ctl".into()).stack_size(crate::THREAD_STACK_SIZE).spawn(
        move || {
            wait_for_leave(leave, signal_pipe, thread, hooked);
            if PHASE.compare_exchange(IN_INIT, LEFT_IN_INIT, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
                // Leaves as it would after `-init`, with status 0 (the pool
                // still counts a worker that left before it was ready as a
                // failed start).
                slot.set_state(State::Stopping);
                // SAFETY: _exit ends every thread of the process at once; the
                // worker holds no connection yet, and `-init`, running on the
                // main thread, is user code that may never return.
                unsafe { libc::_exit(0) }
            }
            tcl::queue_event(thread, on_leave, ());
            // A worker that leaves ends this thread with it. One still here
            // after the pool's graceful period whose supervisor died has
            // nobody left to kill it (a handler in an endless loop never
            // runs the event above): it ends itself. (Its parent is read
            // only then: the leave pipe closes while the dying supervisor
            // is still its parent.)
            std::thread::sleep(graceful);
            if nix::unistd::getppid() != supervisor {
                // SAFETY: _exit ends the process at once; its connections
                // close with it, as they would under the supervisor's kill.
                unsafe { libc::_exit(EXIT_FAILED) }
            }
        },
    )?;
    Ok(())
}

fn wait_for_leave(leave: RawFd, signal_pipe: Option<RawFd>, thread: tcl::ThreadId, hooked: u64) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::BorrowedFd;
    // SAFETY: both descriptors stay open until the process exits: the leave
    // pipe is owned by the worker's state, the signal pipe by `signals`.
    let leave = unsafe { BorrowedFd::borrow_raw(leave) };
    let signal_pipe = signal_pipe.map(|fd| unsafe { BorrowedFd::borrow_raw(fd) });
    loop {
        let mut fds = vec![PollFd::new(leave, PollFlags::POLLIN)];
        if let Some(fd) = signal_pipe {
            fds.push(PollFd::new(fd, PollFlags::POLLIN));
        }
        // The supervisor's word that the worker is spared is also looked
        // for once a second (`hang_report::looks_every_second`).
        let timeout = if hang_report::looks_every_second() { PollTimeout::from(1000u16) } else { PollTimeout::NONE };
        match poll(&mut fds, timeout) {
            Ok(0) => {
                hang_report::signalled();
                continue;
            }
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return,
        }
        if fds[0].any().unwrap_or(true) {
            return;
        }
        if let Some(fd) = signal_pipe {
            let (received, _) = signals::drain(fd.as_raw_fd());
            if received.contains(&hang_report::REPORT_SIGNAL) {
                hang_report::signalled();
            }
            if super::hooks::in_worker(thread, &received, hooked) {
                return;
            }
        }
    }
}

fn on_proxy_rejected(why: &str) {
    with_worker(|w| w.slot.count_proxy_rejected(why));
}

fn on_queue_closed(_port: u16) {
    with_worker(|w| w.leave());
}

unsafe extern "C" fn on_exit(_: *mut c_void) {
    if !is_worker() {
        return;
    }
    let _ = std::panic::catch_unwind(|| {
        let state = WORKER.try_with(|w| w.try_borrow().ok().and_then(|w| w.as_ref().map(|w| w.state)));
        if let Ok(Some(state)) = state {
            // SAFETY: see `Worker::interp_state`; exit handlers run before
            // Tcl deletes the interpreter.
            unsafe { &*state }.give_back_all();
        }
    });
}

unsafe extern "C" fn on_leave(event: *mut tcl::Tcl_Event, _flags: std::ffi::c_int) -> std::ffi::c_int {
    // SAFETY: queued by `spawn_control` with a `()` payload, taken once.
    unsafe { tcl::Event::<()>::take_payload(event) };
    let _ = std::panic::catch_unwind(|| with_worker(|w| w.leave()));
    1
}
