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

use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicI64, AtomicPtr, AtomicU32, AtomicU8, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::{kill, Signal};

use crate::tcl::{self, AsyncHandler, Interp, Obj, Tcl_Interp};

use super::model::Kill;
use super::shared_memory::{SharedArray, Zeroed};
use super::signals;
use super::state::LogEntry;
use super::state::{Child, Pool};

/// The signal that asks a worker for its stack.
pub const REPORT_SIGNAL: Signal = Signal::SIGWINCH;
/// How long a worker has to answer before the log says it cannot.
/// How long a worker's Tcl thread has to answer once its control thread
/// has taken the question...
const GRACE: Duration = Duration::from_millis(500);
/// ...and how long its control thread has to take it, on a machine so
/// loaded that it has not run yet.
const TAKE_LIMIT: Duration = Duration::from_secs(3);
/// Questions asked of a worker of a pool with `-concurrency` above 1
/// before one answered from inside a command each time is taken as
/// stuck: an event-driven worker may happen to answer from inside the
/// handler it runs at that moment, but not every time.
const TRIES: u8 = 3;
/// Room for one stack text.
const REPORT_BYTES: usize = 4000;
/// Room for one command of the stack.
const COMMAND_CHARS: usize = 200;

const ASKED: u32 = 1;
const ANSWERED: u32 = 2;
/// Taken by the control thread, the async handler marked.
const TAKEN: u32 = 3;

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
    state: AtomicU32,
    /// 1: answered from the event loop, no command of the worker running
    /// (it waits for its clients); 0: from inside a running command.
    idle: AtomicU32,
    len: AtomicU32,
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

    fn read(&self) -> String {
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
    fn cell(&self, slot: usize) -> Option<&Cell> {
        self.cells.as_ref().map(|cells| cells.get(slot))
    }

    /// The cell a worker on `slot` answers in, if the pool asks.
    pub fn for_worker(&self, slot: usize) -> Option<&'static Cell> {
        self.cells.as_ref().map(|cells| cells.leak(slot))
    }
}

/// Where a busy timeout stands for one worker.
pub(super) struct Asked {
    /// It was asked to take no more connections (`-concurrency 1`).
    leaving: bool,
    /// Questions asked so far.
    tries: u8,
    at: Instant,
    /// When the supervisor first saw the question taken: the grace runs
    /// from then.
    taken: Option<Instant>,
    peer: Obj,
    busy: f64,
}

impl Child {
    /// Asked for its stack and to take no more connections: replaced now.
    pub(super) fn asked_to_leave(&self) -> bool {
        self.hang.as_ref().is_some_and(|asked| asked.leaving)
    }
}

impl Pool {
    /// Workers busy on one connection for longer than `-timeout`: the log
    /// says who and since when, asks for the stack, and the worker is
    /// killed once it has answered or `GRACE` is over. With `-concurrency
    /// 1`, from the question on the worker takes no more connections (one
    /// it took during the grace would be killed with it) and is replaced at
    /// once. Above 1, the timeout concerns the worker, not one connection:
    /// one that answers from its event loop (no command of it running: it
    /// waits for its clients and serves the others) is spared, and asked
    /// again after another `-timeout`; one stuck in a command is killed,
    /// its other connections with it. How long
    /// it has been busy is measured on the supervisor's clock, from when
    /// it first saw the busy period (`model::timeouts`): the start the
    /// worker writes in its slot is a claim.
    pub(super) fn kill_stuck(&mut self, entries: &mut Vec<LogEntry>) {
        let Some(timeout) = self.config.timeout else { return };
        let now = Instant::now();
        for index in 0..self.children.len() {
            let child = &self.children[index];
            if child.killed.is_some() {
                continue;
            }
            if child.hang.is_some() {
                self.answer_or_kill(index, entries);
                continue;
            }
            let slot = self.scoreboard.slot(child.slot);
            let claimed = slot.busy_since();
            let Some(busy_for) = self.children[index].busy.observe(claimed, now) else { continue };
            if busy_for <= timeout {
                continue;
            }
            let child = &self.children[index];
            let peer_text = slot.peer();
            let (host, port) = peer_text.rsplit_once(' ').unwrap_or((&peer_text, ""));
            let peer = Obj::new_list(&[Obj::new_string(host), Obj::new_string(port)]);
            let busy = busy_for.as_secs_f64();
            let leaving = self.config.concurrency <= 1;
            if leaving {
                slot.request_leave();
            }
            let pid = child.pid;
            entries.push(self.entry(
                "timeout",
                vec![
                    ("pid", Obj::new_int(pid.as_raw().into())),
                    ("peer", peer.clone()),
                    ("busy", Obj::new_double(busy)),
                ],
            ));
            if let Some(cell) = self.hangs.cell(self.children[index].slot) {
                cell.len.store(0, Ordering::Relaxed);
                cell.idle.store(0, Ordering::Relaxed);
                cell.state.store(ASKED, Ordering::SeqCst);
                let _ = kill(pid, REPORT_SIGNAL);
            }
            self.children[index].hang = Some(Asked { leaving, tries: 1, at: Instant::now(), taken: None, peer, busy });
            self.answer_or_kill(index, entries);
        }
    }

    fn answer_or_kill(&mut self, index: usize, entries: &mut Vec<LogEntry>) {
        let cell = self.hangs.cell(self.children[index].slot);
        let Some(asked) = &mut self.children[index].hang else { return };
        let state = cell.map(|cell| cell.state.load(Ordering::SeqCst));
        if state == Some(TAKEN) && asked.taken.is_none() {
            asked.taken = Some(Instant::now());
        }
        // Above -concurrency 1, a worker that answered from its event loop
        // is waiting for its clients, not stuck.
        let several = self.config.concurrency > 1;
        let idle = cell.is_some_and(|cell| cell.idle.load(Ordering::SeqCst) == 1);
        let spared = several && state == Some(ANSWERED) && idle;
        if several && state == Some(ANSWERED) && !idle && asked.tries < TRIES {
            // Answered from inside a command: perhaps the handler it ran at
            // that moment; asked again.
            asked.tries += 1;
            asked.at = Instant::now();
            asked.taken = None;
            let pid = self.children[index].pid;
            if let Some(cell) = cell {
                cell.len.store(0, Ordering::Relaxed);
                cell.state.store(ASKED, Ordering::SeqCst);
                let _ = kill(pid, REPORT_SIGNAL);
            }
            return;
        }
        let (stack, note) = match (cell, state) {
            (Some(cell), Some(ANSWERED)) if spared => (
                cell.read(),
                "spared: it answered from its event loop, serving its other connections (-concurrency above 1)".into(),
            ),
            (Some(cell), Some(ANSWERED)) => (cell.read(), String::new()),
            (Some(_), Some(TAKEN)) if asked.taken.is_some_and(|at| at.elapsed() < GRACE) => return,
            (Some(_), Some(TAKEN)) => (
                String::new(),
                format!(
                    "the stack could not be read: the worker ran no Tcl command for {} s (blocked in a system call?)",
                    GRACE.as_secs_f64()
                ),
            ),
            (Some(_), _) if asked.at.elapsed() < TAKE_LIMIT => return,
            (Some(_), _) => (
                String::new(),
                format!(
                    "the stack could not be read: the worker did not take the question in {} s",
                    TAKE_LIMIT.as_secs()
                ),
            ),
            (None, _) => {
                (String::new(), "the stack could not be read: the pool leaves signals alone (-signals 0)".into())
            }
        };
        let child = &self.children[index];
        let Some(asked) = &child.hang else { return };
        let pid = child.pid;
        let fields = vec![
            ("pid", Obj::new_int(pid.as_raw().into())),
            ("peer", asked.peer.clone()),
            ("busy", Obj::new_double(asked.busy)),
            ("stack", Obj::new_string(&stack)),
            ("note", Obj::new_string(&note)),
        ];
        let at = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let mut report = fields.clone();
        report.push(("time", Obj::new_int(at as i64)));
        self.hangs.last = Some(Obj::new_dict(report));
        entries.push(self.entry("hang", fields));
        if spared {
            // Timed again from now: asked again after another -timeout.
            self.children[index].hang = None;
            self.children[index].busy = Default::default();
            return;
        }
        let _ = kill(pid, Signal::SIGKILL);
        self.children[index].killed = Some(Kill::Timeout);
    }
}
