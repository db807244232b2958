//! Workers past their busy timeout, on the supervisor's side: the log
//! says who and since when, the worker is asked for its stack (the
//! question and its answer are `hang_report`'s), the answer is logged and
//! the worker killed, or spared (`-concurrency` above 1).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::kill;

use crate::tcl::Obj;

use super::hang_report::{Asked, ANSWERED, ASKED, HELD, REPORT_SIGNAL, SPARED, TAKEN};
use super::model::events::WorkerId;
use super::state::{LogEntry, Pool};

/// How long a worker's Tcl thread has to answer once its control thread
/// has taken the question (above `-concurrency 1`, to get back to its own
/// event loop)...
const GRACE: Duration = Duration::from_millis(500);
/// ...and how long its control thread has to take it, on a machine so
/// loaded that it has not run yet.
const TAKE_LIMIT: Duration = Duration::from_secs(3);

const SPARED_NOTE: &str = "spared: it waits in its event loop with no handler running, \
    serving its other connections (-concurrency above 1)";
const NESTED_NOTE: &str = "killed: a handler waits in an event loop of its own (vwait, update) \
    and did not return to the worker's loop: stuck, as at -concurrency 1";

impl Pool {
    /// Workers asked for their stack: those whose question is settled now,
    /// and whether each is spared (else the model has it killed).
    pub(super) fn settle_hangs(&mut self, entries: &mut Vec<LogEntry>) -> Vec<(WorkerId, bool)> {
        let mut settled = Vec::new();
        for index in 0..self.children.len() {
            let child = &self.children[index];
            // Killed already (its answer came, or it is killed for
            // another reason): settled.
            if child.hang.is_none() || self.worker_of(child).is_none_or(|w| w.killed.is_some()) {
                continue;
            }
            if let Some(spared) = self.answer_or_kill(index, entries) {
                settled.push((self.children[index].worker, spared));
            }
        }
        settled
    }

    /// A worker busy on one connection for longer than `-timeout` (the
    /// model's decision: `model::turn`): the log says who and since when,
    /// asks for the stack, and the worker is killed (by the model) once it
    /// has answered or `GRACE` is over. From the question on the worker
    /// takes no more connections (its receiver reads the question in the
    /// shared cell: one taken during the grace would be killed with it);
    /// with `-concurrency 1` it is also asked to leave and replaced at
    /// once. Above 1, the timeout concerns the worker, not one connection:
    /// a worker that waits in its own event loop with no handler running,
    /// at the question or at any moment of the grace, waits for clients
    /// that say nothing and serves the others: it is spared (it takes
    /// connections again), and asked again after another `-timeout`. One
    /// that does not (stuck in a command, or in a `vwait` of a handler) is
    /// killed, its other connections with it. Whether it waits is read in
    /// memory it shares with the supervisor (`hang_report`), not asked:
    /// no thread of a worker has to run, on a loaded machine, for it to
    /// be spared. Returns whether it is spared once settled now.
    pub(super) fn ask_stack(
        &mut self,
        index: usize,
        leaving: bool,
        busy_for: Duration,
        entries: &mut Vec<LogEntry>,
    ) -> Option<bool> {
        let child = &self.children[index];
        let slot = self.scoreboard.slot(child.slot);
        let peer_text = slot.peer();
        let (host, port) = peer_text.rsplit_once(' ').unwrap_or((&peer_text, ""));
        let peer = Obj::new_list(&[Obj::new_string(host), Obj::new_string(port)]);
        let busy = busy_for.as_secs_f64();
        if leaving {
            slot.request_leave();
        }
        let pid = child.pid;
        entries.push(self.entry(
            "timeout",
            vec![("pid", Obj::new_int(pid.as_raw().into())), ("peer", peer.clone()), ("busy", Obj::new_double(busy))],
        ));
        let mut own_loop = 0;
        if let Some(cell) = self.hangs.cell(self.children[index].slot) {
            own_loop = cell.own_loop.load(Ordering::SeqCst);
            // A worker that waits in its own loop right now is spared
            // below without a question. With -signals 0 nothing is
            // asked (the script may trap SIGWINCH), but whether it
            // waits in its loop is read all the same.
            let waiting = !leaving && own_loop & 1 == 1;
            if !waiting {
                cell.len.store(0, Ordering::Relaxed);
                cell.from_loop.store(0, Ordering::Relaxed);
                // The worker's receiver holds itself from this store on.
                if self.config.signals {
                    cell.state.store(ASKED, Ordering::SeqCst);
                    let _ = kill(pid, REPORT_SIGNAL);
                } else {
                    cell.state.store(HELD, Ordering::SeqCst);
                }
            }
        }
        self.children[index].hang = Some(Asked { own_loop, at: Instant::now(), taken: None, peer, busy });
        self.answer_or_kill(index, entries)
    }

    /// Whether the question is settled: `Some(spared)`.
    fn answer_or_kill(&mut self, index: usize, entries: &mut Vec<LogEntry>) -> Option<bool> {
        let cell = self.hangs.cell(self.children[index].slot);
        let several = self.config.concurrency > 1;
        let asked = self.children[index].hang.as_mut()?;
        let state = cell.map(|cell| cell.state.load(Ordering::SeqCst));
        if matches!(state, Some(TAKEN | ANSWERED)) && asked.taken.is_none() {
            asked.taken = Some(Instant::now());
        }
        let spared = several && cell.is_some_and(|cell| cell.in_own_loop_since(asked.own_loop));
        let in_grace = asked.taken.is_some_and(|at| at.elapsed() < GRACE);
        let (stack, note) = match (cell, state) {
            (Some(cell), state) if spared => {
                (if state == Some(ANSWERED) { cell.read() } else { String::new() }, SPARED_NOTE.into())
            }
            (_, _) if !self.config.signals && several && asked.at.elapsed() < GRACE => return None,
            (_, _) if !self.config.signals => {
                (String::new(), "the stack could not be read: the pool leaves signals alone (-signals 0)".into())
            }
            (Some(cell), Some(ANSWERED)) if !several => (cell.read(), String::new()),
            // Above -concurrency 1 the worker has the whole grace to get
            // back to its loop: an answer from inside a command may be
            // from the handler it ran at that moment.
            (Some(_), Some(ANSWERED | TAKEN)) if in_grace => return None,
            (Some(cell), Some(ANSWERED)) if cell.from_loop.load(Ordering::SeqCst) == 1 => {
                (cell.read(), NESTED_NOTE.into())
            }
            (Some(cell), Some(ANSWERED)) => (cell.read(), String::new()),
            (Some(_), Some(TAKEN)) => (
                String::new(),
                format!(
                    "the stack could not be read: the worker ran no Tcl command for {} s (blocked in a system call?)",
                    GRACE.as_secs_f64()
                ),
            ),
            (Some(_), _) if asked.at.elapsed() < TAKE_LIMIT => return None,
            (Some(_), _) => (
                String::new(),
                format!(
                    "the stack could not be read: the worker did not take the question in {} s",
                    TAKE_LIMIT.as_secs()
                ),
            ),
            // Every pool with -timeout has its cells (`HangsInPool::new`).
            (None, _) => (String::new(), String::new()),
        };
        let child = &self.children[index];
        let asked = child.hang.as_ref()?;
        let (pid, slot) = (child.pid, child.slot);
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
            // It takes connections again (its control thread reads the
            // state when the signal comes), and is timed again from now:
            // asked again after another -timeout.
            if let Some(cell) = self.hangs.cell(slot) {
                if matches!(state, Some(ASKED | TAKEN | ANSWERED | HELD)) {
                    cell.state.store(SPARED, Ordering::SeqCst);
                    // With -signals 0 its control thread finds the word in
                    // its once-a-second look.
                    if self.config.signals {
                        let _ = kill(pid, REPORT_SIGNAL);
                    }
                }
            }
            // Timed again from now (the model's part): asked again after
            // another -timeout.
            self.children[index].hang = None;
        }
        // Killed, not spared: the model sends the SIGKILL.
        Some(spared)
    }
}
