//! What a hung worker was doing: on a busy timeout the supervisor logs the
//! peer and how long the worker has been busy, asks the worker for its
//! Tcl command stack, logs it, and only then kills the worker.
//!
//! The question is a signal (`REPORT_SIGNAL`, ignored by default, so one
//! that arrives before a worker watches it, or comes from a terminal,
//! does no harm) and a flag in memory shared with the worker. The
//! worker's control thread reads the signal from its pipe, holds the
//! worker's receiver (from then on the worker takes no connection: one
//! taken during the grace would be killed with it) and marks a Tcl async
//! handler; Tcl runs it between two commands of the code that runs
//! (a loop that never ends included) or in the event loop, and it writes
//! the stack, `info frame` by `info frame` in the form of `errorInfo`,
//! into the shared memory. A worker blocked in a system call (`after
//! 60000`, a blocking read) runs no command: `GRACE` after its control
//! thread took the question, the log says the stack could not be read.
//! Either way the worker is then killed, as it was before this report
//! existed. `pool info` keeps the last report.
//!
//! Above `-concurrency 1` a worker is spared when it waits in its own
//! event loop with no handler running, which the supervisor reads in the
//! same memory (`Cell::own_loop`, see `mark_own_loop`); it then writes
//! `SPARED` and signals again, and the control thread lets the receiver
//! go.
//!
//! This file is the question and its answer (the shared cells, the
//! worker's side), below the pool's data; the supervisor's side, which
//! asks, logs and kills, is `hang_watch`.

use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicPtr, AtomicU32, AtomicU8, Ordering};
use std::sync::{Mutex, MutexGuard, Once, OnceLock};
use std::time::Instant;

use nix::sys::signal::Signal;

use crate::receiver::Gate;
use crate::tcl::{self, AsyncHandler, Interp, Obj, Tcl_Interp};

use super::shared_memory::{SharedArray, Zeroed};
use super::signals;

/// The signal that asks a worker for its stack.
pub const REPORT_SIGNAL: Signal = Signal::SIGWINCH;
/// Room for one stack text.
const REPORT_BYTES: usize = 4000;
/// Room for one command of the stack.
const COMMAND_CHARS: usize = 200;

pub(super) const ASKED: u32 = 1;
pub(super) const ANSWERED: u32 = 2;
/// Taken by the control thread, the async handler marked.
pub(super) const TAKEN: u32 = 3;
/// The supervisor spared the worker: it takes connections again.
pub(super) const SPARED: u32 = 4;
/// No question (`-signals 0`), but the worker takes no connection until
/// the supervisor spares or kills it.
pub(super) const HELD: u32 = 5;

/// The stack of the code the async handler interrupted, innermost first,
/// as `errorInfo` words it: the procedure it was in (Tcl keeps no frame
/// for the command a loop was running), the commands that called it
/// (`info frame`, down to BASE, the frames of the fork), and the call of
/// the outermost procedure with its arguments (`info level 1`, the handler).
/// It runs in the hung worker's own frame: every command is fully
/// qualified, and the lambda runs in the global namespace, so a script
/// that defines its own `apply`, `set` or `info` in its namespace neither
/// loses the stack nor has its command run.
const STACK_SCRIPT: &str = r#"::apply {{} {
    ::set shorten {{text} {
        ::expr {[::string length $text] > COMMAND_CHARS ? "[::string range $text 0 COMMAND_CHARS-1]..." : $text}
    }}
    ::set top [::expr {[::info frame] - 1}]
    ::set here [::info frame $top]
    ::if {[::dict exists $here proc]} {
        ::set lines [::list "    while in procedure \"[::string trimleft [::dict get $here proc] :]\""]
    } else {
        ::set lines [::list "    while at global level"]
    }
    ::for {::set level [::expr {$top - 1}]} {$level > BASE} {::incr level -1} {
        ::set frame [::info frame $level]
        ::if {![::dict exists $frame cmd]} ::continue
        ::lappend lines "    invoked from within" "\"[::apply $shorten [::dict get $frame cmd]]\""
        ::set line [::expr {[::dict exists $frame line] ? [::dict get $frame line] : "?"}]
        ::if {[::dict exists $frame proc]} {
            ::set where "(procedure \"[::string trimleft [::dict get $frame proc] :]\" line $line"
            ::if {[::dict exists $frame file]} {::append where " of [::file tail [::dict get $frame file]]"}
            ::lappend lines "    $where)"
        } elseif {[::dict exists $frame lambda]} {
            ::lappend lines "    (\"apply\" lambda line $line)"
        } elseif {[::dict exists $frame file]} {
            ::lappend lines "    (file \"[::file tail [::dict get $frame file]]\" line $line)"
        }
    }
    ::if {[::info level] > 1} {
        ::lappend lines "    invoked from within" "\"[::apply $shorten [::info level 1]]\""
    }
    ::join $lines \n
} ::}"#;

/// The frames a worker starts with (those of the fork, in the supervisor's
/// script), left out of its reports.
static BASE: AtomicI64 = AtomicI64::new(0);

/// One worker's report, in memory shared with the supervisor.
#[repr(C)]
pub struct Cell {
    /// 0, `ASKED` or `HELD` (by the supervisor), `TAKEN` (by the worker's
    /// control thread), `ANSWERED` (by its Tcl thread) or `SPARED` (by the
    /// supervisor).
    pub(super) state: AtomicU32,
    /// 1: the answer came from an event loop (Tcl ran the async handler
    /// between two events, not inside a command); 0: from inside a command.
    pub(super) from_loop: AtomicU32,
    /// The worker's own event loop, as its Tcl thread passes through it
    /// (`-concurrency` above 1): odd while it waits there for an event,
    /// with no handler on its stack; one more at each wait and each end of
    /// a wait (`mark_own_loop`).
    pub(super) own_loop: AtomicU32,
    pub(super) len: AtomicU32,
    text: [AtomicU8; REPORT_BYTES],
}

// SAFETY: atomics only; all zero is "nothing asked, nothing written".
unsafe impl Zeroed for Cell {}

impl Cell {
    fn write(&self, text: &str) {
        let mut len = text.len().min(REPORT_BYTES);
        while !text.is_char_boundary(len) {
            len -= 1;
        }
        for (cell, byte) in self.text.iter().zip(&text.as_bytes()[..len]) {
            cell.store(*byte, Ordering::Relaxed);
        }
        self.len.store(len as u32, Ordering::Relaxed);
    }

    /// Whether the worker waited in its own event loop, with no handler on
    /// its stack, at the question (when `own_loop` read `at_question`) or
    /// at any moment since.
    pub(super) fn in_own_loop_since(&self, at_question: u32) -> bool {
        let now = self.own_loop.load(Ordering::SeqCst);
        now != at_question || now & 1 == 1
    }

    pub(super) fn read(&self) -> String {
        let len = (self.len.load(Ordering::Relaxed) as usize).min(REPORT_BYTES);
        let bytes: Vec<u8> = self.text[..len].iter().map(|b| b.load(Ordering::Relaxed)).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

// The worker's side: one cell, one async handler, one interpreter.
static CELL: AtomicPtr<Cell> = AtomicPtr::new(std::ptr::null_mut());
static INTERP: AtomicPtr<Tcl_Interp> = AtomicPtr::new(std::ptr::null_mut());
static HANDLER: OnceLock<AsyncHandler> = OnceLock::new();

/// Whether the control thread looks at the cell once a second, signal or
/// not: above `-concurrency 1` with `-signals 0`, the supervisor's word
/// that a held worker is spared comes with no signal (and the receiver
/// holds itself, which does not wake the control thread).
static LOOK_WITHOUT_SIGNAL: AtomicBool = AtomicBool::new(false);

/// In a worker, on its Tcl thread: answers the supervisor's questions
/// from now on; with `watch_own_loop` (`-concurrency` above 1), also keeps
/// `Cell::own_loop`. `signals`: whether the pool handles signals (and so
/// asks with one).
pub fn arm(interp: Interp, cell: &'static Cell, watch_own_loop: bool, signals: bool) {
    LOOK_WITHOUT_SIGNAL.store(watch_own_loop && !signals, Ordering::SeqCst);
    // Fresh pages hold zeroes (`SharedArray::leak`); where the system kept
    // the old ones, the last worker's question must not hold this one's
    // receiver (`question_pending`). Nothing is asked before it serves.
    cell.state.store(0, Ordering::SeqCst);
    CELL.store(std::ptr::from_ref(cell).cast_mut(), Ordering::SeqCst);
    INTERP.store(interp.as_ptr(), Ordering::SeqCst);
    // The `info frame` of a command run now names its own frame: the ones
    // below it are the fork's.
    let depth = interp.eval_global(&Obj::new_string("info frame")).map(|level| level.to_string_lossy());
    BASE.store(depth.ok().and_then(|level| level.parse::<i64>().ok()).map_or(0, |level| level - 1), Ordering::SeqCst);
    let _ = HANDLER.get_or_init(|| tcl::create_async(on_async, std::ptr::null_mut()));
    static WATCH_FORKS: Once = Once::new();
    WATCH_FORKS.call_once(|| crate::fork_safety::on_fork(|| {}, || {}, in_child));
    if watch_own_loop {
        tcl::create_event_source(own_loop_setup, own_loop_check);
    }
}

/// In any child forked in a worker (by a handler, TclX's `fork`): it is
/// not the worker, and neither answers for it nor says that it waits in
/// its loop (its copy of the event source would).
fn in_child() {
    CELL.store(std::ptr::null_mut(), Ordering::SeqCst);
}

fn cell() -> Option<&'static Cell> {
    // SAFETY: set by `arm` from a `'static` reference.
    unsafe { CELL.load(Ordering::SeqCst).as_ref() }
}

// Whether a worker of a pool with `-concurrency` above 1 is stuck, or
// waits for clients that say nothing, is not asked of the worker: it is
// read by the supervisor in `Cell::own_loop`, which the worker's Tcl
// thread keeps as it goes through its event loop, and which nobody needs
// to run to be read. A worker that waits in its own loop is seen waiting
// the moment the question is asked, however late the machine would run
// its threads; one that is serving is seen when it gets back. The waits
// are bracketed by an event source (Tcl calls its setup procedure before
// each wait of an event loop of the thread and its check procedure after
// it); the worker's own loop is told from loops nested in a handler
// (`vwait`, `update`) by the flags its `Tcl_DoOneEvent` passes
// (`tcl::OWN_LOOP_EVENTS`). Two stores per wait, no system call.

unsafe extern "C" fn own_loop_setup(_: *mut c_void, flags: c_int) {
    mark_own_loop(flags == tcl::OWN_LOOP_EVENTS);
}

unsafe extern "C" fn own_loop_check(_: *mut c_void, _: c_int) {
    mark_own_loop(false);
}

/// Makes `own_loop` odd (waiting in the worker's own loop) or even. Only
/// this thread writes it.
fn mark_own_loop(waiting: bool) {
    if let Some(cell) = cell() {
        let turns = cell.own_loop.load(Ordering::Relaxed);
        if (turns & 1 == 1) != waiting {
            cell.own_loop.store(turns.wrapping_add(1), Ordering::SeqCst);
        }
    }
}

/// The worker's receiver (`receiver::Gate`) and whether the control
/// thread holds it: a worker asked for its stack takes no connection
/// until the supervisor spares it (killed, it would lose it).
static RECEIVER: Mutex<(Option<Gate>, bool)> = Mutex::new((None, false));

fn receiver() -> MutexGuard<'static, (Option<Gate>, bool)> {
    RECEIVER.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// In a worker, on its Tcl thread: the receiver that the control thread
/// holds while a question is pending.
pub fn watch_receiver(gate: Gate) {
    crate::receiver::hold_when(question_pending);
    let mut receiver = receiver();
    if receiver.1 {
        gate.hold();
    }
    receiver.0 = Some(gate);
}

/// Whether the control thread should look at the cell once a second
/// (calling `signalled`): always with `LOOK_WITHOUT_SIGNAL`, and while it
/// holds the worker's receiver, since a signal whose byte a full pipe
/// dropped must not leave the worker taking nothing for good.
pub fn looks_every_second() -> bool {
    LOOK_WITHOUT_SIGNAL.load(Ordering::SeqCst) || receiver().1
}

/// Whether the supervisor has a question pending for this worker: its
/// receiver takes no connection then (`receiver::hold_when`), from the
/// moment the supervisor wrote it, before any thread of the worker runs.
fn question_pending() -> bool {
    cell().is_some_and(|cell| matches!(cell.state.load(Ordering::SeqCst), ASKED | TAKEN | ANSWERED | HELD))
}

fn hold_receiver(hold: bool) {
    let mut receiver = receiver();
    receiver.1 = hold;
    match &receiver.0 {
        Some(gate) if hold => gate.hold(),
        Some(gate) => gate.release(),
        None => {}
    }
}

/// In a worker's control thread: `REPORT_SIGNAL` came (or, while the
/// receiver is held, a second passed). While a question is
/// pending the receiver is held (from this moment on, not from when the
/// Tcl thread, which may be stuck, gets to it), and a new question is
/// taken: the Tcl thread answers at its next command. Any other state (the
/// supervisor spared the worker, then signalled) lets the receiver go. The
/// state is read when the signal is handled, so signals that merged, or
/// one from a terminal, change nothing.
pub fn signalled() {
    let Some(cell) = cell() else { return };
    if !matches!(cell.state.load(Ordering::SeqCst), ASKED | TAKEN | ANSWERED | HELD) {
        hold_receiver(false);
        return;
    }
    hold_receiver(true);
    if cell.state.compare_exchange(ASKED, TAKEN, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
        if let Some(handler) = HANDLER.get() {
            handler.mark();
        }
    }
}

unsafe extern "C" fn on_async(_: *mut c_void, running: *mut Tcl_Interp, code: c_int) -> c_int {
    let _ = std::panic::catch_unwind(|| {
        let Some(cell) = cell().filter(|cell| matches!(cell.state.load(Ordering::SeqCst), ASKED | TAKEN)) else {
            return;
        };
        let interp = if running.is_null() { INTERP.load(Ordering::SeqCst) } else { running };
        if interp.is_null() {
            return;
        }
        // SAFETY: the interpreter Tcl is running on this thread, or the
        // worker's own, which lives as long as the process.
        let interp = unsafe { Interp::from_raw(interp) };
        let script = STACK_SCRIPT
            .replace("BASE", &BASE.load(Ordering::SeqCst).to_string())
            .replace("COMMAND_CHARS", &COMMAND_CHARS.to_string());
        let text = match interp.eval_in_place(&Obj::new_string(&script)) {
            Ok(stack) => stack.to_string_lossy(),
            Err(message) => format!("(the stack could not be read: {message})"),
        };
        cell.write(&text);
        cell.from_loop.store(u32::from(running.is_null()), Ordering::SeqCst);
        // Not over a decision the supervisor made meanwhile (`SPARED`).
        let answered = |taken| cell.state.compare_exchange(taken, ANSWERED, Ordering::SeqCst, Ordering::SeqCst);
        if answered(TAKEN).or_else(|_| answered(ASKED)).is_ok() {
            signals::notify_supervisor();
        }
    });
    code
}

/// A pool's reports, on the supervisor's side.
pub struct InPool {
    /// One cell per scoreboard slot, made only when the pool has
    /// `-timeout` (with `-signals 0` only `own_loop` is used).
    cells: Option<SharedArray<Cell>>,
    /// The last report, for `pool info` (`lasthang`).
    pub(super) last: Option<Obj>,
}

impl InPool {
    pub fn new(wanted: bool, slots: usize) -> nix::Result<InPool> {
        Ok(InPool { cells: if wanted { Some(SharedArray::per_worker(slots)?) } else { None }, last: None })
    }

    /// The cell of the worker on `slot`, as the supervisor reads it.
    pub(super) fn cell(&self, slot: usize) -> Option<&Cell> {
        self.cells.as_ref().map(|cells| cells.get(slot))
    }

    /// The cell a worker on `slot` answers in, if the pool asks.
    pub fn for_worker(&self, slot: usize) -> Option<&'static Cell> {
        self.cells.as_ref().map(|cells| cells.leak(slot))
    }
}

/// Where a busy timeout's question stands for one worker (whether it was
/// asked to take no more connections is the model's: `model::pool::Hang`).
pub(super) struct Asked {
    /// `Cell::own_loop` when the question was asked.
    pub(super) own_loop: u32,
    pub(super) at: Instant,
    /// When the supervisor first saw the question taken: the grace runs
    /// from then.
    pub(super) taken: Option<Instant>,
    pub(super) peer: Obj,
    pub(super) busy: f64,
}
