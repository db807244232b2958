//! Registrations: an interpreter's wish to receive the next connection of a
//! port, and the delivery of that connection to its handler.
//!
//! Each interpreter that loads the extension has one `InterpState`, kept as
//! Tcl assoc data and freed when the interpreter is deleted. It holds one
//! `Registration` per port the interpreter has asked for. The registration's
//! `Receiver` thread takes a connection from the queue and queues a Tcl
//! event on the interpreter's thread; the event calls the handler there.

use std::cell::{Cell, RefCell};
use std::ffi::{c_int, c_void};
use std::os::fd::OwnedFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once, RwLock};

use nix::unistd::{getpid, Pid};

use crate::counters::Counters;
use crate::port_table;
use crate::proxy_header;
use crate::receiver::{self, Outcome, Receiver};
use crate::tcl::{self, Event, Interp, Obj, TclError, TclResult, Tcl_Event, ThreadId};

/// What a registration does with the connection it receives.
pub enum Handler {
    /// A Tcl script, evaluated at global level with the channel, the
    /// peer's address and the peer's port appended (the `client` command).
    Script(ScriptHandler),
    /// Rust code on the interpreter's thread (a pool's worker).
    Native(NativeHandler),
}

/// The handler of `client`, kept as it was given: nothing in it is looked
/// up before a connection comes (as with Tcl's `socket -server`, `after`
/// and `fileevent`), so it may name a command defined later, one that
/// `unknown` loads, or be a script of several commands.
pub struct ScriptHandler {
    script: Obj,
    /// The words, when the handler is one command with exactly these words
    /// (`h`, `[list obj method]`): then it is called as a list of words,
    /// not parsed again for every connection.
    words: Option<Vec<Obj>>,
    /// The namespace `client` was called from, when not the global one:
    /// the handler is evaluated there (found again by name when a
    /// connection comes; the global namespace when it is gone by then).
    namespace: Option<String>,
}

impl ScriptHandler {
    /// The handler `script`, registered from `interp`'s current namespace.
    pub fn new(interp: Interp, script: Obj) -> ScriptHandler {
        let words = script.as_command_words();
        let namespace = Some(interp.current_namespace()).filter(|n| n != "::");
        ScriptHandler { script, words, namespace }
    }

    /// Prepares the call of the handler with `tail` (channel, address,
    /// port) appended, at global level in the namespace `client` was called
    /// from, as `namespace eval` there would (see `tcl::ScriptCall`): its
    /// commands are looked up there, then globally, and that namespace's
    /// `namespace unknown` handler (or `::unknown`, which finds auto_index
    /// entries of that namespace) runs for a name found nowhere. A failure
    /// is a background error. `then` runs after it.
    fn prepare(self, interp: Interp, tail: [Obj; 3], then: impl FnOnce(tcl::Evaluated) + 'static) -> tcl::ScriptCall {
        let script = match self.words {
            // A pure list: evaluated as one command with exactly these
            // words, not parsed again.
            Some(mut words) => {
                words.extend(tail);
                Obj::new_list(&words)
            }
            None => self.script.concat_words(&Obj::new_list(&tail)),
        };
        tcl::ScriptCall::new(interp, script, self.namespace.as_deref(), then)
    }
}

/// The callbacks of a `Handler::Native`.
#[derive(Clone, Copy)]
pub struct NativeHandler {
    pub connection: fn(Interp, crate::handoff::Connection),
    /// The queue closed and is drained: no connection will come again.
    pub queue_closed: fn(u16),
    /// A connection was closed for a bad PROXY protocol header, or an
    /// untrusted peer (`why`, as `proxy_header::Next::rejected` has it).
    pub proxy_rejected: fn(&str),
}

struct Registration {
    port: u16,
    /// The handler while a registration is pending.
    handler: Option<Handler>,
    /// The port's PROXY protocol setting: a header comes first.
    proxy: Option<proxy_header::Setting>,
    /// How many times the registration was cancelled (see `AfterHeader`).
    cancels: u64,
    counters: Arc<Counters>,
    receiver: Receiver,
    mailbox: Mailbox,
}

/// What an interpreter knows of its own registrations.
pub struct InterpState {
    interp: Interp,
    thread: ThreadId,
    /// The process this state was made in; a forked child resets it.
    pid: Cell<Pid>,
    registrations: RefCell<Vec<Registration>>,
    /// The ports this interpreter opened with `server`, in order: `client`
    /// without `-port` waits on the first of them still open (each
    /// interpreter had its own table in 1.1.3).
    opened: RefCell<Vec<u16>>,
}

/// A pointer to an `InterpState` that a receiver thread carries to the
/// interpreter's own thread. It is only dereferenced there, by
/// `on_delivery` and `AfterHeader`, and the state outlives every event and
/// every header read pointing to it: the state owns them, and its end
/// (`give_back_all`) stops the receivers, then purges their events and
/// cancels its header reads.
#[derive(Clone, Copy, PartialEq, Eq)]
struct StatePtr(*const InterpState);
// SAFETY: see the type's documentation.
unsafe impl Send for StatePtr {}

/// Where a receiver's outcomes go: a Tcl event on the interpreter's thread.
#[derive(Clone)]
struct Mailbox {
    thread: ThreadId,
    state: StatePtr,
    port: u16,
    /// The process the registration was made in (see `on_delivery`).
    pid: Pid,
    queue: Arc<OwnedFd>,
}

impl Mailbox {
    fn post(&self, outcome: Outcome) {
        let exiting = EXITING.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        if *exiting {
            // Tcl is tearing down its threads' event queues: let another
            // process serve the connection.
            if let Outcome::Connection(conn) = outcome {
                receiver::give_back(&self.queue, conn);
            }
            return;
        }
        tcl::queue_unwinding_event(self.thread, on_delivery, Delivery { to: self.clone(), outcome });
    }
}

/// Set when the process exits. Receivers hold the read lock while they
/// queue an event, so once the exit handler has taken the write lock no
/// event is queued on a notifier that Tcl is finalizing.
static EXITING: RwLock<bool> = RwLock::new(false);

/// Takes the exit flag for writing: no receiver is then queueing an event.
fn lock_exit_flag() -> std::sync::RwLockWriteGuard<'static, bool> {
    EXITING.write().unwrap_or_else(|poisoned| poisoned.into_inner())
}

thread_local! {
    /// The exit flag, taken by the forking thread from before a fork to after it.
    static EXIT_FLAG_HELD: RefCell<Option<std::sync::RwLockWriteGuard<'static, bool>>> = const { RefCell::new(None) };
}

fn hold_exit_flag_for_fork() {
    let flag = lock_exit_flag();
    let _ = EXIT_FLAG_HELD.try_with(|held| *held.borrow_mut() = Some(flag));
}

fn release_exit_flag_after_fork() {
    let _ = EXIT_FLAG_HELD.try_with(|held| held.borrow_mut().take());
}

/// Whether the process is exiting (Tcl's exit handlers have run).
pub fn exiting() -> bool {
    *EXITING.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Registers the exit handler once per process, and holds the exit flag
/// across every fork (no receiver of another thread may be queueing an
/// event on a notifier that the child copies).
pub fn watch_for_exit() {
    static REGISTERED: Once = Once::new();
    REGISTERED.call_once(|| {
        tcl::create_exit_handler(on_exit);
        crate::fork_safety::on_fork(
            hold_exit_flag_for_fork,
            release_exit_flag_after_fork,
            release_exit_flag_after_fork,
        );
    });
}

unsafe extern "C" fn on_exit(_: *mut c_void) {
    *lock_exit_flag() = true;
}

/// The payload of the Tcl event a receiver queues.
struct Delivery {
    to: Mailbox,
    outcome: Outcome,
}

impl InterpState {
    pub fn new(interp: Interp) -> InterpState {
        InterpState {
            interp,
            thread: tcl::current_thread(),
            pid: Cell::new(getpid()),
            registrations: RefCell::new(Vec::new()),
            opened: RefCell::new(Vec::new()),
        }
    }

    /// Notes that this interpreter opened `port` (or asked for it with
    /// `server` while it was open already).
    pub fn note_opened(&self, port: u16) {
        let mut opened = self.opened.borrow_mut();
        if !opened.contains(&port) {
            opened.push(port);
        }
    }

    /// The port `client` waits on without `-port`: the first port this
    /// interpreter opened that is still open, else the process's first.
    pub fn default_port(&self, table: &port_table::PortTable) -> Option<u16> {
        let opened = self.opened.borrow();
        opened.iter().copied().find(|&port| table.get(port).is_some()).or_else(|| table.default_port())
    }

    /// In a forked child, the receiver threads stayed behind in the parent
    /// and any pending registration belonged to the parent: start afresh.
    pub fn reset_if_forked(&self) {
        if self.pid.get() == getpid() {
            return;
        }
        self.pid.set(getpid());
        for registration in self.registrations.borrow_mut().drain(..) {
            registration.receiver.abandon_after_fork();
        }
    }

    /// Makes `handler` the pending registration for `port`, replacing a
    /// pending one.
    pub fn register(&self, port: u16, handler: Handler, queue: Arc<OwnedFd>, counters: Arc<Counters>) -> TclResult<()> {
        // Registrations copied from the parent have no receiver here.
        self.reset_if_forked();
        let mut registrations = self.registrations.borrow_mut();
        // A port closed and opened again has a new queue: start over.
        registrations.retain(|r| r.port != port || Arc::ptr_eq(&r.mailbox.queue, &queue));
        let index = match registrations.iter().position(|r| r.port == port) {
            Some(index) => index,
            None => {
                let mailbox = Mailbox {
                    thread: self.thread,
                    state: StatePtr(self),
                    port,
                    pid: self.pid.get(),
                    queue: Arc::clone(&queue),
                };
                // A pool's workers drop connections whose client left while
                // queued; the low-level API hands every one to its handler.
                let drop_abandoned = matches!(handler, Handler::Native(_));
                let receiver = Receiver::spawn(Arc::clone(&queue), Arc::clone(&counters.queue), drop_abandoned, {
                    let mailbox = mailbox.clone();
                    move |outcome| mailbox.post(outcome)
                })
                .map_err(|e| TclError::posix("couldn't wait for a connection", e.raw_os_error().unwrap_or(0)))?;
                let proxy = port_table::table().get(port).and_then(|p| p.proxy.clone());
                registrations.push(Registration {
                    port,
                    handler: None,
                    proxy,
                    cancels: 0,
                    counters,
                    receiver,
                    mailbox,
                });
                registrations.len() - 1
            }
        };
        let registration = &mut registrations[index];
        // Replacing the handler of a pending registration changes nothing else.
        if registration.handler.replace(handler).is_some() {
            return Ok(());
        }
        match registration.receiver.arm() {
            Ok(None) => Ok(()),
            // Taken without waiting: deliver through the event queue all the
            // same, so the handler never runs inside this call.
            Ok(Some(outcome)) => {
                registration.mailbox.post(outcome);
                Ok(())
            }
            Err(errno) => {
                registration.handler = None;
                Err(TclError::posix("couldn't wait for a connection", errno as i32))
            }
        }
    }

    /// Cancels the pending registration for `port`; with `forget`, also
    /// stops its receiver (the port is gone).
    pub fn cancel(&self, port: u16, forget: bool) {
        let mut registrations = self.registrations.borrow_mut();
        for registration in registrations.iter_mut().filter(|r| r.port == port) {
            registration.receiver.disarm();
            registration.handler = None;
            registration.cancels += 1;
        }
        if forget {
            // Dropping a registration stops its receiver thread.
            registrations.retain(|r| r.port != port);
        }
    }

    /// When the interpreter goes or the process exits: stops every
    /// receiver, then gives back the connections that are still on their
    /// way to a handler (in this thread's event queue, or waiting for their
    /// PROXY header), so another interpreter or process serves them.
    pub fn give_back_all(&self) {
        self.registrations.borrow_mut().clear();
        let pointer: *const InterpState = self;
        tcl::delete_events(purge_delivery, pointer.cast_mut().cast());
        proxy_header::cancel_owned_by(self.header_reads_owner());
    }

    /// The owner of the PROXY header reads this state started.
    fn header_reads_owner(&self) -> proxy_header::Owner {
        let pointer: *const InterpState = self;
        pointer as usize
    }

    /// The gate of `port`'s receiver (`receiver::Gate`), once registered.
    pub fn gate(&self, port: u16) -> Option<receiver::Gate> {
        self.registrations.borrow().iter().find(|r| r.port == port).map(|r| r.receiver.gate())
    }

    pub fn is_waiting(&self, port: u16) -> bool {
        self.registrations.borrow().iter().any(|r| r.port == port && r.handler.is_some())
    }

    /// Gives `conn` to `handler`, as a channel of this interpreter: a
    /// script handler's call is returned, for the caller to run outside
    /// `catch_unwind` (see `tcl::ScriptCall`).
    fn hand_over(
        &self,
        interp: Interp,
        handler: Handler,
        conn: crate::handoff::Connection,
        counters: &Counters,
    ) -> Option<tcl::ScriptCall> {
        counters.received.fetch_add(1, Ordering::Relaxed);
        match handler {
            Handler::Script(handler) => {
                let (host, peer_port) = conn.peer_host_and_port();
                let stamps = crate::queue_time::stamps_of(&conn);
                let channel = interp.adopt_tcp_socket(conn.socket);
                crate::queue_time::remember(channel, stamps);
                let closed = Arc::new(AtomicBool::new(false));
                channel.on_close(mark_closed, Arc::into_raw(Arc::clone(&closed)).cast_mut().cast());
                let name = channel.name();
                let tail = [Obj::new_string(&name), Obj::new_string(&host), Obj::new_string(&peer_port)];
                Some(handler.prepare(interp, tail, move |evaluated| {
                    // A handler that fails (a command that does not exist
                    // by now included) leaves nobody to close its channel:
                    // close it, as Tcl's own `socket -server` does. Unless
                    // it was closed (its name may be another channel's by
                    // now) or moved, or the interpreter was deleted (it is
                    // preserved, not usable, and closes its channels when
                    // released).
                    if !evaluated.succeeded
                        && !evaluated.interp_deleted
                        && !closed.load(Ordering::Acquire)
                        && interp.holds_channel(&name, channel)
                    {
                        interp.unregister_channel(channel);
                    }
                }))
            }
            Handler::Native(native) => {
                (native.connection)(interp, conn);
                None
            }
        }
    }

    /// Runs on the interpreter's thread when a receiver delivers; returns
    /// the handler's call, for the caller to run (see `hand_over`).
    fn deliver(&self, port: u16, queue: &OwnedFd, outcome: Outcome) -> Option<tcl::ScriptCall> {
        let mut registrations = self.registrations.borrow_mut();
        let registration = registrations.iter_mut().find(|r| r.port == port);
        let interp = self.interp;
        match outcome {
            Outcome::Connection(conn) => {
                let Some(registration) = registration.filter(|r| r.handler.is_some()) else {
                    // Cancelled while the connection was on its way.
                    receiver::give_back(queue, conn);
                    return None;
                };
                if conn.accepted_at != 0 {
                    registration.counters.queue.record_wait(conn.queue_wait_ns());
                }
                let handler = registration.handler.take();
                let proxy = registration.proxy.clone();
                let after = AfterHeader {
                    state: StatePtr(self),
                    port,
                    cancels: registration.cancels,
                    handler: None,
                    queue: Arc::clone(&registration.mailbox.queue),
                    counters: Arc::clone(&registration.counters),
                };
                // The handler usually registers again: release the borrow first.
                drop(registrations);
                let handler = handler?;
                match proxy {
                    Some(setting) => proxy_header::read(
                        conn,
                        setting,
                        self.header_reads_owner(),
                        Box::new(AfterHeader { handler: Some(handler), ..after }),
                    ),
                    None => self.hand_over(interp, handler, conn, &after.counters),
                }
            }
            Outcome::QueueClosed => {
                let handler = registration.and_then(|r| r.handler.take());
                drop(registrations);
                if let Some(Handler::Native(native)) = handler {
                    (native.queue_closed)(port);
                } else if handler.is_some() {
                    interp.background_error(TclError::new(
                        format!(
                            "socketserver port {port} is closed: its accepting process \
                             stopped accepting or exited"
                        ),
                        &["SOCKETSERVER", "CLOSED", &port.to_string()],
                    ));
                }
                None
            }
            Outcome::Failed { error, ended } => {
                if ended {
                    if let Some(registration) = registration {
                        registration.handler = None;
                    }
                }
                drop(registrations);
                interp.background_error(TclError::new(
                    format!("socketserver port {port}: {error}"),
                    &["SOCKETSERVER", "RECEIVE", &port.to_string()],
                ));
                None
            }
        }
    }
}

/// What happens after a connection's PROXY protocol header: the handler
/// gets the connection, or the registration waits for the next one (unless
/// it was cancelled or replaced meanwhile).
struct AfterHeader {
    state: StatePtr,
    port: u16,
    cancels: u64,
    handler: Option<Handler>,
    queue: Arc<OwnedFd>,
    counters: Arc<Counters>,
}

impl proxy_header::Next for AfterHeader {
    fn accepted(mut self: Box<Self>, conn: crate::handoff::Connection) -> Option<tcl::ScriptCall> {
        // SAFETY: see `StatePtr`; header reads run on the interpreter's thread.
        let state = unsafe { &*self.state.0 };
        let handler = self.handler.take()?;
        state.hand_over(state.interp, handler, conn, &self.counters)
    }

    fn rejected(mut self: Box<Self>, why: &str) {
        proxy_header::count(&self.counters, why);
        // SAFETY: as above.
        let state = unsafe { &*self.state.0 };
        let Some(handler) = self.handler.take() else { return };
        if let Handler::Native(native) = &handler {
            (native.proxy_rejected)(why);
        }
        let unchanged = state
            .registrations
            .borrow()
            .iter()
            .any(|r| r.port == self.port && r.cancels == self.cancels && r.handler.is_none());
        if unchanged {
            if let Err(error) = state.register(self.port, handler, Arc::clone(&self.queue), Arc::clone(&self.counters))
            {
                state.interp.background_error(error);
            }
        }
    }

    fn cancelled(self: Box<Self>, conn: crate::handoff::Connection) {
        receiver::give_back(&self.queue, conn);
    }
}

/// A channel's close handler: `data` is an `Arc<AtomicBool>` of its own.
unsafe extern "C" fn mark_closed(data: *mut c_void) {
    // SAFETY: `hand_over` made `data` with `Arc::into_raw` for this handler,
    // which Tcl calls once, on whichever thread closes the channel.
    let closed = unsafe { Arc::from_raw(data.cast_const().cast::<AtomicBool>()) };
    closed.store(true, Ordering::Release);
}

/// The Tcl event procedure for a delivery: "C-unwind", and its Rust code
/// apart from the handler's script, which may end the thread (see
/// `tcl::ScriptCall`). The interpreter is preserved for the whole delivery:
/// a handler that deletes it leaves its memory and state valid until the
/// end (and its state is freed then, at the release).
unsafe extern "C-unwind" fn on_delivery(event: *mut Tcl_Event, flags: c_int) -> c_int {
    // Connections are file events: wait while Tcl processes other kinds only.
    if flags & tcl::TCL_FILE_EVENTS == 0 {
        return 0;
    }
    let prepared = tcl::rust_part(|| {
        // SAFETY: only `Mailbox::post` queues events with this procedure,
        // and Tcl calls it once per event.
        let delivery = unsafe { Event::<Delivery>::take_payload(event) };
        let to = &delivery.to;
        // An event copied into a forked child: the parent delivers it.
        if to.pid != getpid() {
            return None;
        }
        // SAFETY: see `StatePtr`.
        let state = unsafe { &*to.state.0 };
        let interp = state.interp;
        interp.preserve();
        Some((interp, state.deliver(to.port, &to.queue, delivery.outcome)))
    })
    .flatten();
    if let Some((interp, call)) = prepared {
        if let Some(call) = call {
            // SAFETY: on the interpreter's thread, right after it was made;
            // this frame holds nothing to drop.
            unsafe { call.run() };
        }
        // SAFETY: preserved above; this may delete the interpreter and free
        // its state, which nothing here uses again.
        unsafe { interp.release() };
    }
    1
}

/// Removes an interpreter's pending deliveries, giving their connections back.
unsafe extern "C" fn purge_delivery(event: *mut Tcl_Event, state: *mut c_void) -> c_int {
    // SAFETY: Tcl passes live events of this thread's queue.
    let ours = unsafe { Event::<Delivery>::is_ours(event, on_delivery) }
        && unsafe { Event::<Delivery>::payload(event) }.to.state.0 == state.cast_const().cast();
    if !ours {
        return 0;
    }
    // SAFETY: the event is one of ours and Tcl deletes it after we return 1.
    let delivery = unsafe { Event::<Delivery>::take_payload(event) };
    if let Outcome::Connection(conn) = delivery.outcome {
        if delivery.to.pid == getpid() {
            receiver::give_back(&delivery.to.queue, conn);
        }
    }
    1
}

/// Registers `state`'s thread exit handler (see `on_thread_exit`); the
/// interpreter's deletion removes it.
pub fn watch_thread_exit(state: *mut c_void) {
    tcl::create_thread_exit_handler_with(on_thread_exit, state);
}

/// Tcl's thread exit handler for an interpreter's state: its thread ends
/// without deleting the interpreter (a handler or script called
/// `thread::exit`). Nothing can be delivered here again: the receivers
/// stop and the connections on their way go back to the queue, as when the
/// interpreter is deleted (the state itself stays, with the interpreter).
/// Not when the process exits: the exit flag gives connections back then.
unsafe extern "C" fn on_thread_exit(state: *mut c_void) {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        if exiting() {
            return;
        }
        // SAFETY: registered by `watch_thread_exit` with the live state of
        // an interpreter of this thread; its deletion removes the handler.
        let state = unsafe { &*state.cast::<InterpState>() };
        state.reset_if_forked();
        state.give_back_all();
    }));
}

/// Tcl's assoc-data delete procedure: the interpreter is going away.
pub unsafe extern "C" fn on_interp_deleted(state: *mut c_void, _interp: *mut tcl::Tcl_Interp) {
    tcl::delete_thread_exit_handler(on_thread_exit, state);
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: `state` is the Box that `Socketserver_Init` leaked for this
        // interpreter; Tcl calls this procedure once.
        let state = unsafe { Box::from_raw(state.cast::<InterpState>()) };
        crate::pool::interp_deleted(state.interp);
        state.reset_if_forked();
        // Stops the receivers first, so that no event can be queued after the purge.
        state.give_back_all();
    }));
}
