//! What a hung worker was doing: on a busy timeout the supervisor logs the
//! peer and how long the worker has been busy, asks the worker for its
//! Tcl command stack, logs it, and only then kills the worker.
//!
//! The question is a signal (`REPORT_SIGNAL`, ignored by default, so one
//! that arrives before a worker watches it, or comes from a terminal,
//! does no harm) and a flag in memory shared with the worker. The
//! worker's control thread reads the signal from its pipe and marks a Tcl
//! async handler; Tcl runs it between two commands of the code that runs
//! (a loop that never ends included) or in the event loop, and it writes
//! the stack, `info frame` by `info frame` in the form of `errorInfo`,
//! into the shared memory. A worker blocked in a system call (`after
//! 60000`, a blocking read) runs no command: `GRACE` after its control
//! thread took the question, the log says the stack could not be read.
//! Either way the worker is then killed, as it was before this report
//! existed. `pool info` keeps the last report.
//!
//! This file is the question and its answer (the shared cells, the
//! worker's side), below the pool's data; the supervisor's side, which
//! asks, logs and kills, is `hang_watch`.

use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicI64, AtomicPtr, AtomicU32, AtomicU8, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

use nix::sys::signal::Signal;

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
    /// 0, `ASKED` (by the supervisor), `TAKEN` (by the worker's control
    /// thread) or `ANSWERED` (by its Tcl thread).
    pub(super) state: AtomicU32,
    /// 1: answered from the event loop, no command of the worker running
    /// (it waits for its clients); 0: from inside a running command.
    pub(super) idle: AtomicU32,
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

/// In a worker, on its Tcl thread: answers the supervisor's questions
/// from now on.
pub fn arm(interp: Interp, cell: &'static Cell) {
    CELL.store(std::ptr::from_ref(cell).cast_mut(), Ordering::SeqCst);
    INTERP.store(interp.as_ptr(), Ordering::SeqCst);
    // The `info frame` of a command run now names its own frame: the ones
    // below it are the fork's.
    let depth = interp.eval_global(&Obj::new_string("info frame")).map(|level| level.to_string_lossy());
    BASE.store(depth.ok().and_then(|level| level.parse::<i64>().ok()).map_or(0, |level| level - 1), Ordering::SeqCst);
    let _ = HANDLER.get_or_init(|| tcl::create_async(on_async, std::ptr::null_mut()));
}

fn cell() -> Option<&'static Cell> {
    // SAFETY: set by `arm` from a `'static` reference.
    unsafe { CELL.load(Ordering::SeqCst).as_ref() }
}

/// In a worker's control thread: `REPORT_SIGNAL` came; if the supervisor
/// asked, the Tcl thread answers at its next command.
pub fn signalled() {
    let taken = |cell: &Cell| cell.state.compare_exchange(ASKED, TAKEN, Ordering::SeqCst, Ordering::SeqCst).is_ok();
    if cell().is_some_and(taken) {
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
        cell.idle.store(u32::from(running.is_null()), Ordering::SeqCst);
        cell.state.store(ANSWERED, Ordering::SeqCst);
        signals::notify_supervisor();
    });
    code
}

/// A pool's reports, on the supervisor's side.
pub struct InPool {
    /// One cell per scoreboard slot, made only when the pool has
    /// `-timeout` and handles signals.
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
    /// Questions asked so far.
    pub(super) tries: u8,
    pub(super) at: Instant,
    /// When the supervisor first saw the question taken: the grace runs
    /// from then.
    pub(super) taken: Option<Instant>,
    pub(super) peer: Obj,
    pub(super) busy: f64,
}
