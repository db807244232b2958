//! The pool's figures in the Prometheus text exposition format, as a
//! scrape of the `-metrics` endpoint (`metrics`) is answered: read from
//! the scoreboard and the pool's totals at the scrape.

use std::fmt::Write as _;
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering::Relaxed;

use super::metrics::{Bound, Endpoint};
use super::scoreboard::{now_millis, State};
use super::state::{Pool, Reload};
use super::supervisor_access::with_supervisor;

/// Serves `bound` for the pool on `port`: a scrape is answered here.
pub(super) fn serve(port: u16, bound: Bound) -> Endpoint {
    Endpoint::serve(port, bound, on_readable)
}

unsafe extern "C" fn on_readable(data: *mut std::ffi::c_void, _mask: std::ffi::c_int) {
    let (port, fd) = ((data as usize >> 32) as u16, (data as usize & 0xffff_ffff) as RawFd);
    let _ = std::panic::catch_unwind(|| {
        with_supervisor(|sup| {
            if let Some(pool) = sup.pools.iter_mut().find(|p| p.port == port) {
                pool.on_metrics_socket(fd);
            }
        })
    });
}

impl Pool {
    fn on_metrics_socket(&mut self, fd: RawFd) {
        let Some(endpoint) = self.metrics.as_mut() else { return };
        if endpoint.listener.as_ref().is_some_and(|l| l.inner.as_raw_fd() == fd) {
            endpoint.accept();
            return;
        }
        let answer = match endpoint.read(fd) {
            None => return,
            Some(Err(status)) => response(status, &[], b""),
            Some(Ok(line)) => {
                let mut words = line.split(' ');
                let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
                let path = target.split('?').next().unwrap_or("");
                match (method, path) {
                    ("GET" | "HEAD", "/metrics") => {
                        let text = self.exposition();
                        let body = if method == "HEAD" { Vec::new() } else { text.clone().into_bytes() };
                        let length = format!("Content-Length: {}", text.len());
                        response(b"200 OK", &["Content-Type: text/plain; version=0.0.4; charset=utf-8", &length], &body)
                    }
                    (_, "/metrics") => response(b"405 Method Not Allowed", &["Allow: GET, HEAD"], b""),
                    _ => response(b"404 Not Found", &[], b""),
                }
            }
        };
        if let Some(endpoint) = self.metrics.as_mut() {
            endpoint.answer(fd, answer);
        }
    }

    /// Writes what scrapers wait for and closes those past their deadline
    /// (the supervisor's tick).
    pub(super) fn metrics_tick(&mut self) {
        if let Some(endpoint) = self.metrics.as_mut() {
            endpoint.write_pending();
        }
    }

    /// The pool's figures in the Prometheus text format (version 0.0.4).
    pub(super) fn exposition(&self) -> String {
        let mut out = Exposition { text: String::new(), port: self.port };
        let mut states = [0u64; 4];
        let mut open = 0u64;
        for child in &self.children {
            let index = match self.worker_state(child) {
                State::Idle => 0,
                State::Busy => 1,
                State::Starting => 2,
                State::Stopping => 3,
                State::Free => continue,
            };
            states[index] += 1;
            open += u64::from(self.scoreboard.slot(child.slot).open());
        }
        out.family("workers", "gauge", "Workers of the pool by state.");
        for (state, count) in ["idle", "busy", "starting", "stopping"].iter().zip(states) {
            out.sample("workers", Some(("state", state)), count as f64);
        }
        out.gauge("workers_target", "Workers the pool keeps running.", self.model.target as f64);
        out.gauge("open_connections", "Connections the workers hold open now.", open as f64);
        let busy = self.busy_millis_total(now_millis()).max(self.metrics.as_ref().map_or(0, |m| m.busy_reported.get()));
        if let Some(endpoint) = &self.metrics {
            endpoint.busy_reported.set(busy);
        }
        let counters: [(&str, &str, f64); 11] = [
            ("accepted_total", "Connections accepted on the pool's port.", self.counters.accepted.load(Relaxed) as f64),
            ("served_total", "Connections whose channel a worker has closed.", self.served_total() as f64),
            ("busy_seconds_total", "Seconds workers held at least one connection, summed.", busy as f64 / 1000.0),
            ("started_total", "Workers started.", self.totals.started as f64),
            ("respawns_total", "Workers lost unasked and replaced.", self.totals.respawned as f64),
            ("recycles_total", "Workers recycled, by any cause: -maxconnections, -maxrss or -maxlifetime (by cause: recycledby in pool info).", self.totals.recycled as f64),
            ("timeouts_total", "Workers killed for being busy past -timeout.", self.totals.timed_out as f64),
            ("backoffs_total", "Waits before starting a worker again after failures.", self.totals.backoffs as f64),
            ("proxy_errors_total", "Connections closed for a bad, late or missing PROXY header.", {
                self.proxy_errors_total() as f64
            }),
            ("proxy_untrusted_total", "Connections closed because their peer is not in -proxyfrom.", {
                self.proxy_untrusted_total() as f64
            }),
            ("log_lost_total", "Lines of the default log (stderr) dropped because stderr did not take them.", {
                super::stderr_log::lost() as f64
            }),
        ];
        for (name, help, value) in counters {
            out.family(name, "counter", help);
            out.sample(name, None, value);
        }
        let queue = self.counters.queue.snapshot();
        out.gauge("queue_depth", "Connections accepted and not yet taken by a worker.", queue.depth as f64);
        out.gauge("queue_max", "The bound of the queue (-maxqueue; 0: none).", queue.max_queue as f64);
        out.gauge(
            "queue_paused",
            "1 while accepting is paused at -maxqueue.",
            if queue.paused_now { 1.0 } else { 0.0 },
        );
        let queue_counters: [(&str, &str, f64); 4] = [
            ("rejected_total", "Connections closed at once at -maxqueue (-overload close).", queue.rejected as f64),
            (
                "abandoned_total",
                "Connections whose client left while queued, closed before any handler.",
                queue.abandoned as f64,
            ),
            ("pauses_total", "Times accepting paused at -maxqueue.", queue.pauses as f64),
            ("paused_seconds_total", "Seconds accepting was paused at -maxqueue.", queue.paused_seconds),
        ];
        for (name, help, value) in queue_counters {
            out.family(name, "counter", help);
            out.sample(name, None, value);
        }
        out.family("queue_wait_seconds", "histogram", "How long connections waited between accept and a worker.");
        let bounds = crate::queue_stats::BUCKET_BOUNDS.iter().map(|(le, _)| *le).chain(["+Inf"]);
        for (le, count) in bounds.zip(&queue.buckets) {
            out.sample("queue_wait_seconds_bucket", Some(("le", le)), *count as f64);
        }
        out.sample("queue_wait_seconds_sum", None, queue.wait_sum_seconds);
        out.sample("queue_wait_seconds_count", None, queue.waits as f64);
        out.family("reloads_total", "counter", "Rolling reloads started.");
        out.sample("reloads_total", None, self.reloads().into());
        out.gauge("generation", "The pool's generation of workers: the one starting during a reload, else the one serving (back to the previous one when a reload is abandoned).", self.model.generation.into());
        out.gauge(
            "reload_failed",
            "1 when the last reload was abandoned (the previous generation serves on).",
            if matches!(self.model.reload, Reload::Failed { .. }) { 1.0 } else { 0.0 },
        );
        out.gauge("stopping", "1 while the pool stops.", if self.model.phase.stopping() { 1.0 } else { 0.0 });
        out.text
    }
}

/// A hand-written writer of the text exposition format: `# HELP`, `# TYPE`,
/// then samples, every name prefixed `socketserver_` and labelled with the
/// pool's port.
struct Exposition {
    text: String,
    port: u16,
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        // In the 0.0.4 text format a counter's family is its full name,
        // `_total` included (OpenMetrics would drop it).
        let _ = writeln!(self.text, "# HELP socketserver_{name} {help}");
        let _ = writeln!(self.text, "# TYPE socketserver_{name} {kind}");
    }

    fn sample(&mut self, name: &str, label: Option<(&str, &str)>, value: f64) {
        let _ = write!(self.text, "socketserver_{name}{{port=\"{}\"", self.port);
        if let Some((key, value)) = label {
            let _ = write!(self.text, ",{key}=\"{value}\"");
        }
        let _ = writeln!(self.text, "}} {value}");
    }

    fn gauge(&mut self, name: &str, help: &str, value: f64) {
        self.family(name, "gauge", help);
        self.sample(name, None, value);
    }
}

fn response(status: &[u8], headers: &[&str], body: &[u8]) -> Vec<u8> {
    let mut out = b"HTTP/1.1 ".to_vec();
    out.extend_from_slice(status);
    out.extend_from_slice(b"\r\nConnection: close\r\n");
    for header in headers {
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !headers.iter().any(|h| h.starts_with("Content-Length")) {
        let _ = write!(out, "Content-Length: {}\r\n", body.len());
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}
