//! What a pool tells: the events of its log (handed to `-log`, or one
//! line each on stderr) and `pool info`.

use std::sync::atomic::Ordering::Relaxed;

use crate::queue_stats::{Snapshot, BUCKET_BOUNDS};
use crate::tcl::{Interp, Obj};

use super::model::recycling::{self, Turn};
use super::recycling::{due, Reason};
use super::scoreboard::{now_millis, Slot, State};
use super::state::{Child, LogEntry, Pool, Reload};

impl Pool {
    pub(super) fn info(&self) -> Obj {
        let now = now_millis();
        let mut workers = Vec::new();
        for child in &self.children {
            let slot = self.scoreboard.slot(child.slot);
            let state = self.worker_state(child);
            let generation = self.worker_of(child).map_or(0, |w| w.generation);
            let since = slot.busy_since();
            let busy = if since == 0 { 0.0 } else { now.saturating_sub(since) as f64 / 1000.0 };
            workers.push(Obj::new_int(child.pid.as_raw().into()));
            let mut fields = vec![
                ("state", Obj::new_string(state.name())),
                ("generation", Obj::new_int(generation.into())),
                ("served", Obj::new_int(slot.served() as i64)),
                ("open", Obj::new_int(slot.open().into())),
                ("busy", Obj::new_double(busy)),
            ];
            fields.extend(worker_recycling_info(slot));
            workers.push(Obj::new_dict(fields));
        }
        let queue = self.counters.queue.snapshot();
        let phase = if self.model.phase.stopping() { "stopping" } else { "running" };
        let mut fields = vec![
            ("port", Obj::new_int(self.port.into())),
            ("state", Obj::new_string(phase)),
            ("generation", Obj::new_int(self.model.generation.into())),
            ("target", Obj::new_int(self.model.target as i64)),
            ("concurrency", Obj::new_int(self.config.concurrency as i64)),
            ("workers", Obj::new_list(&workers)),
            ("started", Obj::new_int(self.totals.started as i64)),
            ("respawned", Obj::new_int(self.totals.respawned as i64)),
            ("recycled", Obj::new_int(self.totals.recycled as i64)),
            ("timedout", Obj::new_int(self.totals.timed_out as i64)),
            ("backoffs", Obj::new_int(self.totals.backoffs as i64)),
            ("accepted", Obj::new_int(self.counters.accepted.load(Relaxed) as i64)),
            ("served", Obj::new_int(self.served_total() as i64)),
            ("busytime", Obj::new_double(self.busy_millis_total(now) as f64 / 1000.0)),
            ("reloads", Obj::new_int(self.reloads().into())),
            ("metrics", Obj::new_string(&self.metrics.as_ref().map(|m| m.address()).unwrap_or_default())),
            (
                "reload",
                Obj::new_string(match self.model.reload {
                    Reload::None => "none",
                    Reload::Running { .. } => "running",
                    Reload::Done => "done",
                    Reload::Failed { .. } => "failed",
                }),
            ),
            (
                "reloaderror",
                Obj::new_string(match &self.model.reload {
                    Reload::Failed { reason } => reason,
                    _ => "",
                }),
            ),
            ("queued", Obj::new_int(queue.depth as i64)),
            ("maxqueue", Obj::new_int(queue.max_queue as i64)),
            ("overload", Obj::new_string(queue.overload.name())),
            ("rejected", Obj::new_int(queue.rejected as i64)),
            ("abandoned", Obj::new_int(queue.abandoned as i64)),
            ("paused", Obj::new_int(queue.paused_now.into())),
            ("pausedtime", Obj::new_double(queue.paused_seconds)),
            ("pauses", Obj::new_int(queue.pauses as i64)),
            ("queuewait", queue_wait(&queue)),
            ("proxyerrors", Obj::new_int(self.proxy_errors_total().try_into().unwrap_or(i64::MAX))),
            ("proxyuntrusted", Obj::new_int(self.proxy_untrusted_total().try_into().unwrap_or(i64::MAX))),
            ("inittimedout", Obj::new_int(self.totals.init_timed_out as i64)),
            ("lasthang", self.hangs.last.clone().unwrap_or_else(|| Obj::new_string(""))),
            ("loglost", Obj::new_int(super::stderr_log::lost() as i64)),
            ("signalsreplaced", super::signal_watch::replaced_names()),
        ];
        fields.extend(self.recycling_info());
        fields.extend(self.sizing_info());
        Obj::new_dict(fields)
    }
}

/// The queue-wait histogram as `pool info` shows it: cumulative counts by
/// upper bound in seconds (Prometheus `le` buckets), their count and sum.
fn queue_wait(queue: &Snapshot) -> Obj {
    let bounds = BUCKET_BOUNDS.iter().map(|(name, _)| *name).chain(["+Inf"]);
    let buckets = bounds.zip(&queue.buckets).map(|(le, n)| (le, Obj::new_int(*n as i64))).collect();
    Obj::new_dict(vec![
        ("buckets", Obj::new_dict(buckets)),
        ("count", Obj::new_int(queue.waits as i64)),
        ("sum", Obj::new_double(queue.wait_sum_seconds)),
    ])
}

impl Pool {
    /// A worker's state as the pool sees it: one told to leave is
    /// stopping, though it may not know yet.
    pub(super) fn worker_state(&self, child: &Child) -> State {
        let state = self.scoreboard.slot(child.slot).state();
        let stopping = self.model.phase.stopping();
        let retired = self.worker_of(child).is_some_and(|w| w.retired.is_some());
        if (stopping || retired) && state != State::Starting {
            State::Stopping
        } else {
            state
        }
    }

    /// Connections served by every worker the pool has had.
    pub(super) fn served_total(&self) -> u64 {
        self.totals.served + self.children.iter().map(|c| self.scoreboard.slot(c.slot).served()).sum::<u64>()
    }

    /// Milliseconds that workers have held at least one channel, all of them together.
    pub(super) fn busy_millis_total(&self, now: u64) -> u64 {
        self.totals.busy_millis
            + self.children.iter().map(|c| self.scoreboard.slot(c.slot).busy_millis(now)).sum::<u64>()
    }

    /// Connections closed for a bad, late or missing PROXY header.
    pub(super) fn proxy_errors_total(&self) -> u64 {
        self.totals.proxy_errors
            + self.children.iter().map(|c| self.scoreboard.slot(c.slot).proxy_errors()).sum::<u64>()
    }

    /// Connections closed because their peer is not in `-proxyfrom`.
    pub(super) fn proxy_untrusted_total(&self) -> u64 {
        self.totals.proxy_untrusted
            + self.children.iter().map(|c| self.scoreboard.slot(c.slot).proxy_untrusted()).sum::<u64>()
    }

    /// `pool info`'s `recycledby` and `leaving` (turns held, and their bound).
    fn recycling_info(&self) -> Vec<(&'static str, Obj)> {
        let by =
            Reason::ALL.iter().map(|r| (r.name(), Obj::new_int(self.recycling.recycled[r.index()] as i64))).collect();
        let held = self.model.workers.iter().filter(|w| matches!(w.turn, Some(Turn::Held(_)))).count();
        vec![
            ("recycledby", Obj::new_dict(by)),
            ("leaving", Obj::new_int(held as i64)),
            ("leavingbound", Obj::new_int(recycling::bound(self.model.target) as i64)),
            ("maxrss", wide(self.config.recycling.max_rss)),
        ]
    }

    /// The figures of `pool info` that say how the pool is sized.
    fn sizing_info(&self) -> Vec<(&'static str, Obj)> {
        let sizing = &self.model.sizing;
        let serving: Vec<_> = self.model.serving().map(|w| w.id).collect();
        let idle = self
            .children
            .iter()
            .filter(|c| serving.contains(&c.worker) && self.scoreboard.slot(c.slot).state() == State::Idle)
            .count();
        vec![
            ("minworkers", Obj::new_int(sizing.min as i64)),
            ("maxworkers", Obj::new_int(sizing.max as i64)),
            ("minspare", Obj::new_int(sizing.min_spare as i64)),
            ("maxspare", Obj::new_int(sizing.max_spare as i64)),
            ("idletimeout", Obj::new_double(sizing.idle_timeout.as_secs_f64())),
            ("idle", Obj::new_int(idle as i64)),
            ("grown", Obj::new_int(sizing.grown as i64)),
            ("shrunk", Obj::new_int(sizing.shrunk as i64)),
            ("sizing", Obj::new_string(&sizing.reason)),
        ]
    }

    /// Reloads started (each gives a new generation number).
    pub(super) fn reloads(&self) -> u32 {
        self.model.newest_generation - 1
    }
}

/// A worker's `rss` and `due` in `pool info`.
fn worker_recycling_info(slot: &Slot) -> Vec<(&'static str, Obj)> {
    vec![("rss", wide(slot.rss.load(Relaxed))), ("due", Obj::new_string(due(slot).map_or("", Reason::name)))]
}

/// An unsigned figure as Tcl shows it: above the largest wide integer, as
/// its digits (`-maxrss 18446744073709551615` showed -1).
fn wide(value: u64) -> Obj {
    i64::try_from(value).map_or_else(|_| Obj::new_string(&value.to_string()), Obj::new_int)
}

pub(super) fn flush_entries(entries: Vec<LogEntry>) {
    for entry in entries {
        if entry.log.is_none() {
            // One line: "socketserver pool 8080: exit pid 4242 status {exit 0}".
            let mut fields = entry.fields.iter();
            let event = fields.next().map(|(_, v)| v.to_string_lossy()).unwrap_or_default();
            let rest = Obj::new_dict(fields.skip(1).map(|(k, v)| (*k, v.clone())).collect());
            // A closed or full stderr loses the line (counted); it never
            // stops the pool.
            super::stderr_log::write_line(&format!(
                "socketserver pool {}: {event} {}",
                entry.port,
                rest.to_string_lossy()
            ));
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

/// Why a worker's `-init` failed, as its exit entry says it: the message,
/// then where it was raised, from `::errorInfo`: the innermost frame and
/// the innermost file (`database down (procedure "connect" line 3, file
/// "/srv/app/init.tcl" line 12)`). The message is shortened if need be,
/// so that the place fits in the scoreboard's `limit` bytes.
pub(super) fn init_failure(interp: Interp, message: &str, limit: usize) -> String {
    let info =
        interp.eval_global(&Obj::new_string("::set ::errorInfo")).map(|i| i.to_string_lossy()).unwrap_or_default();
    let frames: Vec<&str> = info
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with('(') && l.ends_with(')') && l.contains(" line "))
        .map(|l| &l[1..l.len() - 1])
        .collect();
    let mut place: Vec<&str> = frames.first().copied().into_iter().collect();
    if let Some(file) = frames.iter().find(|f| f.starts_with("file ")) {
        if !place.contains(file) {
            place.push(file);
        }
    }
    let place = if place.is_empty() { String::new() } else { format!(" ({})", place.join(", ")) };
    let head = "-init failed: ";
    let mut room = limit.saturating_sub(head.len() + place.len()).min(message.len());
    while !message.is_char_boundary(room) {
        room -= 1;
    }
    format!("{head}{}{place}", &message[..room])
}
