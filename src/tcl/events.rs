//! The event side of Tcl: thread event queues, file handlers, timers,
//! async handlers, exit handlers and the notifier.

use std::ffi::{c_int, c_void};
use std::ptr;

use tcl_sys::Tcl_TimerToken;

use super::{Tcl_Event, Tcl_Interp, Tcl_ThreadId, TCL_READABLE};

/// In a forked child: the calling thread's notifier finalised and made
/// again (`notifier_fork`, FreeBSD's kqueue notifier).
pub fn renew_notifier() {
    // SAFETY: the stubs table was filled in by `init_stubs` before any fork
    // step was registered; both calls act on the calling thread's notifier.
    unsafe {
        let notifier = stub!(tcl_InitNotifier);
        stub!(tcl_FinalizeNotifier)(std::ptr::null_mut());
        notifier();
    }
}

/// The Tcl thread that calls this.
pub fn current_thread() -> ThreadId {
    // SAFETY: a plain query, valid on any thread.
    ThreadId(unsafe { stub!(tcl_GetCurrentThread)() })
}

/// A Tcl thread id that may be handed to other threads: the only things done
/// with it are `Tcl_ThreadQueueEvent` and `Tcl_ThreadAlert`, which Tcl
/// allows from any thread.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ThreadId(Tcl_ThreadId);
// SAFETY: the id is an opaque token; see the type's documentation.
unsafe impl Send for ThreadId {}

/// Event procedure type used with `queue_event`.
pub type EventProc = unsafe extern "C" fn(*mut Tcl_Event, c_int) -> c_int;

/// Queues an event carrying `payload` on `thread`'s event queue and wakes
/// that thread. Tcl later calls `proc_` on that thread with a pointer to an
/// `Event<T>`, and frees the event memory after `proc_` returns 1.
pub fn queue_event<T>(thread: ThreadId, proc_: EventProc, payload: T) {
    // SAFETY: Tcl_Alloc returns memory for a whole Event<T>; we initialise
    // every field before handing it over. Queueing and alerting are
    // documented as safe from any thread.
    unsafe {
        let event = stub!(tcl_Alloc)(std::mem::size_of::<Event<T>>() as _).cast::<Event<T>>();
        ptr::write(
            event,
            Event {
                header: Tcl_Event { proc_: Some(proc_), nextPtr: ptr::null_mut() },
                payload: std::mem::ManuallyDrop::new(payload),
            },
        );
        stub!(tcl_ThreadQueueEvent)(thread.0, event.cast(), tcl_sys::Tcl_QueuePosition_TCL_QUEUE_TAIL as _);
        stub!(tcl_ThreadAlert)(thread.0);
    }
}

/// An event procedure that runs a script, which may end the thread (see
/// `script_call`): "C-unwind", so that the forced unwind may pass it.
pub type UnwindingEventProc = unsafe extern "C-unwind" fn(*mut Tcl_Event, c_int) -> c_int;

/// `queue_event` for an event procedure that runs a script.
pub fn queue_unwinding_event<T>(thread: ThreadId, proc_: UnwindingEventProc, payload: T) {
    // SAFETY: the same calling convention; the type Tcl's table declares
    // ("C") only says less about unwinding, and Rust never calls it.
    queue_event(thread, unsafe { std::mem::transmute::<UnwindingEventProc, EventProc>(proc_) }, payload)
}

/// An event as queued by `queue_event`: Tcl's header, then our payload.
#[repr(C)]
pub struct Event<T> {
    header: Tcl_Event,
    payload: std::mem::ManuallyDrop<T>,
}

impl<T> Event<T> {
    /// Moves the payload out of a queued event. Tcl frees the memory itself.
    ///
    /// # Safety
    /// `event` must come from `queue_event::<T>` and be taken at most once.
    pub unsafe fn take_payload(event: *mut Tcl_Event) -> T {
        // SAFETY: per the contract, the event is an Event<T> whose payload
        // has not been taken.
        unsafe { std::mem::ManuallyDrop::take(&mut (*event.cast::<Event<T>>()).payload) }
    }

    /// Whether a queued event was made by `queue_event` with `proc_`.
    ///
    /// # Safety
    /// `event` must point to a live Tcl event.
    pub unsafe fn is_ours(event: *mut Tcl_Event, proc_: UnwindingEventProc) -> bool {
        // SAFETY: every Tcl event starts with a Tcl_Event header.
        unsafe { (*event).proc_.map(|p| p as usize) == Some(proc_ as usize) }
    }

    /// # Safety
    /// `event` must come from `queue_event::<T>` and its payload not be taken.
    pub unsafe fn payload<'a>(event: *mut Tcl_Event) -> &'a T {
        // SAFETY: see the contract.
        unsafe { &(*event.cast::<Event<T>>()).payload }
    }
}

/// Asks Tcl to call `handler` when the process exits (`Tcl_CreateExitHandler`).
pub fn create_exit_handler(handler: unsafe extern "C" fn(*mut c_void)) {
    // SAFETY: registering a plain function with no client data.
    unsafe { stub!(tcl_CreateExitHandler)(Some(handler), ptr::null_mut()) }
}

/// Asks Tcl to call `handler` when the current thread ends, and when the
/// process exits on it (`Tcl_CreateThreadExitHandler`).
pub fn create_thread_exit_handler(handler: unsafe extern "C" fn(*mut c_void)) {
    // SAFETY: registering a plain function with no client data.
    unsafe { stub!(tcl_CreateThreadExitHandler)(Some(handler), ptr::null_mut()) }
}

/// Asks Tcl to call `handler(data)` when the current thread ends
/// (`Tcl_CreateThreadExitHandler`); `delete_thread_exit_handler` undoes it.
pub fn create_thread_exit_handler_with(handler: unsafe extern "C" fn(*mut c_void), data: *mut c_void) {
    // SAFETY: Tcl keeps `data` as an opaque word; the caller keeps it valid
    // until the handler runs or is deleted.
    unsafe { stub!(tcl_CreateThreadExitHandler)(Some(handler), data) }
}

/// Removes a handler that `create_thread_exit_handler_with` registered on
/// this thread with the same `data`.
pub fn delete_thread_exit_handler(handler: unsafe extern "C" fn(*mut c_void), data: *mut c_void) {
    // SAFETY: removing an absent handler is a no-op in Tcl.
    unsafe { stub!(tcl_DeleteThreadExitHandler)(Some(handler), data) }
}

/// Removes from the current thread's queue every event for which `filter`
/// returns true (Tcl frees their memory; `filter` must take their payloads).
pub fn delete_events(filter: unsafe extern "C" fn(*mut Tcl_Event, *mut c_void) -> c_int, data: *mut c_void) {
    // SAFETY: Tcl walks only the current thread's queue, calling `filter`.
    unsafe { stub!(tcl_DeleteEvents)(Some(filter), data) }
}

/// Calls `proc_(data)` on this thread whenever `fd` is readable
/// (`Tcl_CreateFileHandler`); replaces a handler already set for `fd`.
pub fn create_file_handler(fd: c_int, proc_: unsafe extern "C" fn(*mut c_void, c_int), data: *mut c_void) {
    // SAFETY: Tcl only polls the descriptor and passes `data` back.
    unsafe { stub!(tcl_CreateFileHandler)(fd, TCL_READABLE, Some(proc_), data) }
}

type FileProc = unsafe extern "C" fn(*mut c_void, c_int);
type UnwindingFileProc = unsafe extern "C-unwind" fn(*mut c_void, c_int);
type TimerProc = unsafe extern "C" fn(*mut c_void);
type UnwindingTimerProc = unsafe extern "C-unwind" fn(*mut c_void);

/// `create_file_handler` for a procedure that runs a script, which may end
/// the thread (see `script_call`).
pub fn create_unwinding_file_handler(
    fd: c_int,
    proc_: unsafe extern "C-unwind" fn(*mut c_void, c_int),
    data: *mut c_void,
) {
    // SAFETY: as in `queue_unwinding_event`.
    create_file_handler(fd, unsafe { std::mem::transmute::<UnwindingFileProc, FileProc>(proc_) }, data)
}

/// Removes the file handler of `fd` (`Tcl_DeleteFileHandler`).
pub fn delete_file_handler(fd: c_int) {
    // SAFETY: deleting an absent handler is a no-op in Tcl.
    unsafe { stub!(tcl_DeleteFileHandler)(fd) }
}

/// A one-shot timer made by `create_timer`.
#[derive(Clone, Copy)]
pub struct Timer(Tcl_TimerToken);

/// Calls `proc_(data)` on this thread after `millis` milliseconds.
pub fn create_timer(millis: u32, proc_: unsafe extern "C" fn(*mut c_void), data: *mut c_void) -> Timer {
    let millis = c_int::try_from(millis).unwrap_or(c_int::MAX);
    // SAFETY: Tcl keeps `data` as an opaque word and calls `proc_` once.
    Timer(unsafe { stub!(tcl_CreateTimerHandler)(millis, Some(proc_), data) })
}

/// `create_timer` for a procedure that runs a script, which may end the
/// thread (see `script_call`).
pub fn create_unwinding_timer(
    millis: u32,
    proc_: unsafe extern "C-unwind" fn(*mut c_void),
    data: *mut c_void,
) -> Timer {
    // SAFETY: as in `queue_unwinding_event`.
    create_timer(millis, unsafe { std::mem::transmute::<UnwindingTimerProc, TimerProc>(proc_) }, data)
}

/// Cancels a timer that has not fired yet.
pub fn delete_timer(timer: Timer) {
    // SAFETY: deleting a timer that already fired is a no-op in Tcl.
    unsafe { stub!(tcl_DeleteTimerHandler)(timer.0) }
}

/// Waits for and processes one event of any kind (`Tcl_DoOneEvent(0)`).
pub fn do_one_event() {
    // SAFETY: runs this thread's event loop.
    unsafe { stub!(tcl_DoOneEvent)(0) };
}

/// The flags of `do_one_event_of_own_loop`: every kind of event, as
/// `Tcl_DoOneEvent(0)`, with one bit that names no kind cleared. Tcl hands
/// `Tcl_DoOneEvent`'s flags unchanged to every event source's setup and
/// check procedures (Notifier.3), and a loop nested in what this one
/// dispatches (`vwait`, `update`, an extension's own) passes 0, which Tcl
/// makes `TCL_ALL_EVENTS` (every bit but `TCL_DONT_WAIT`), or a few kinds:
/// never this value.
pub const OWN_LOOP_EVENTS: c_int = tcl_sys::TCL_ALL_EVENTS as c_int & !(1 << 30);

/// `do_one_event` for a thread's outermost loop, whose waits an event
/// source can then tell from those of loops nested in it
/// (`OWN_LOOP_EVENTS`).
pub fn do_one_event_of_own_loop() {
    // SAFETY: runs this thread's event loop.
    unsafe { stub!(tcl_DoOneEvent)(OWN_LOOP_EVENTS) };
}

/// The setup or check procedure of an event source: client data and the
/// flags of the `Tcl_DoOneEvent` that calls it.
pub type EventSourceProc = unsafe extern "C" fn(*mut c_void, c_int);

/// Adds an event source to the calling thread's notifier, for as long as
/// the thread lives: Tcl calls `setup` before each wait of the thread's
/// event loops and `check` after it.
pub fn create_event_source(setup: EventSourceProc, check: EventSourceProc) {
    // SAFETY: plain function pointers with no client data to outlive.
    unsafe { stub!(tcl_CreateEventSource)(Some(setup), Some(check), ptr::null_mut()) }
}

/// Ends the process as Tcl's `exit` does: exit handlers run, channels are
/// flushed and closed.
#[allow(unreachable_code)] // Tcl 9 declares Tcl_Exit as not returning; 8.6 does not.
pub fn exit(status: i32) -> ! {
    // SAFETY: Tcl_Exit never returns.
    unsafe { stub!(tcl_Exit)(status) };
    unreachable!("Tcl_Exit returned")
}

/// A Tcl async handler (`Tcl_AsyncCreate`): marked from any thread, its
/// procedure runs on the thread that made it, between two commands of
/// whatever Tcl code runs there, or in its event loop.
#[derive(Clone, Copy)]
pub struct AsyncHandler(tcl_sys::Tcl_AsyncHandler);

// SAFETY: Tcl_AsyncMark is documented as callable from any thread (and
// from a signal handler); the handler is only marked, never freed.
unsafe impl Send for AsyncHandler {}
// SAFETY: as for Send: marking is the only use from other threads.
unsafe impl Sync for AsyncHandler {}

/// The procedure of an async handler: client data, the interpreter that
/// was running (null when called from the event loop), and the code that
/// it must return unchanged.
pub type AsyncProc = unsafe extern "C" fn(*mut c_void, *mut Tcl_Interp, c_int) -> c_int;

/// Makes an async handler for the calling thread.
pub fn create_async(proc_: AsyncProc, data: *mut c_void) -> AsyncHandler {
    // SAFETY: Tcl keeps the procedure and its data until deleted, which we
    // never do (the handler lives as long as the worker process).
    AsyncHandler(unsafe { stub!(tcl_AsyncCreate)(Some(proc_), data) })
}

impl AsyncHandler {
    /// Asks for the handler to run on its thread at the next chance.
    pub fn mark(self) {
        // SAFETY: a handler made by `create_async` and never deleted.
        unsafe { stub!(tcl_AsyncMark)(self.0) }
    }
}
