//! Workers past their busy timeout, on the supervisor's side: the log
//! says who and since when, the worker is asked for its stack (the
//! question and its answer are `hang_report`'s), the answer is logged and
//! the worker killed, or spared (`-concurrency` above 1).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::kill;

use crate::tcl::Obj;

use super::hang_report::{Asked, ANSWERED, ASKED, REPORT_SIGNAL, TAKEN};
use super::model::events::WorkerId;
use super::state::{LogEntry, Pool};

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
    /// and asks for the stack; the worker is killed once it has answered
    /// or `GRACE` is over. With `-concurrency 1`, from the question on the
    /// worker takes no more connections (one it took during the grace
    /// would be killed with it) and is replaced at once. Above 1, the
    /// timeout concerns the worker, not one connection: one that answers
    /// from its event loop (no command of it running: it waits for its
    /// clients and serves the others) is spared, and asked again after
    /// another `-timeout`; one stuck in a command is killed, its other
    /// connections with it. Returns whether it is spared once settled now.
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
        if let Some(cell) = self.hangs.cell(self.children[index].slot) {
            cell.len.store(0, Ordering::Relaxed);
            cell.idle.store(0, Ordering::Relaxed);
            cell.state.store(ASKED, Ordering::SeqCst);
            let _ = kill(pid, REPORT_SIGNAL);
        }
        self.children[index].hang = Some(Asked { tries: 1, at: Instant::now(), taken: None, peer, busy });
        self.answer_or_kill(index, entries)
    }

    /// Whether the question is settled: `Some(spared)`.
    fn answer_or_kill(&mut self, index: usize, entries: &mut Vec<LogEntry>) -> Option<bool> {
        let cell = self.hangs.cell(self.children[index].slot);
        let asked = self.children[index].hang.as_mut()?;
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
            return None;
        }
        let (stack, note) = match (cell, state) {
            (Some(cell), Some(ANSWERED)) if spared => (
                cell.read(),
                "spared: it answered from its event loop, serving its other connections (-concurrency above 1)".into(),
            ),
            (Some(cell), Some(ANSWERED)) => (cell.read(), String::new()),
            (Some(_), Some(TAKEN)) if asked.taken.is_some_and(|at| at.elapsed() < GRACE) => return None,
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
            (None, _) => {
                (String::new(), "the stack could not be read: the pool leaves signals alone (-signals 0)".into())
            }
        };
        let child = &self.children[index];
        let asked = child.hang.as_ref()?;
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
            // Timed again from now (the model's part): asked again after
            // another -timeout.
            self.children[index].hang = None;
        }
        // Killed, not spared: the model sends the SIGKILL.
        Some(spared)
    }
}
