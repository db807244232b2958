//! The default log (`-log` not given): one line per event on stderr,
//! written by a thread of its own, so that the supervisor never waits on
//! stderr. A pipe nobody reads (a service manager that stalls, a
//! `tclsh app.tcl 2>&1 | slow`) fills, the writer thread blocks in its
//! `write`, the queue between them fills, and further lines are dropped
//! and counted (`pool info`'s `loglost`, `socketserver_log_lost_total`):
//! the supervisor goes on reaping, forking and answering signals.
//!
//! Each line starts with the time in ISO 8601, UTC, to the millisecond
//! (`2026-12-07T13:05:01.123Z`), as operators' tools expect.
//!
//! The queue belongs to the process that made it: a child forked from the
//! supervisor has no writer thread, and a copy of the queue whose lock the
//! parent's writer may have held at the fork; such a child that logs (a
//! pool made after TclX's `fork`) forgets the copy and makes its own.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::unistd::{getpid, Pid};

use crate::tcl::{self, Interp, Obj};

/// Lines waiting for the writer; more are dropped.
const QUEUE_LINES: usize = 1024;
/// How long an exiting process waits for its queued lines to be written.
const DRAIN_AT_EXIT: Duration = Duration::from_secs(1);

/// Lines dropped because stderr did not take them, in this process.
static LOST: AtomicU64 = AtomicU64::new(0);

struct Writer {
    pid: Pid,
    queue: SyncSender<String>,
    /// Lines queued and not written yet.
    pending: Arc<AtomicUsize>,
}

thread_local! {
    static WRITER: RefCell<Option<Writer>> = const { RefCell::new(None) };
}

/// Lines of the default log lost so far (stderr full or failing, or its
/// writer thread could not start).
pub fn lost() -> u64 {
    LOST.load(Relaxed)
}

/// Queues `line` (without its newline) for stderr; never waits. One event
/// is one line: a control character in it (a newline in an `-init` error,
/// or in the failure text or peer a worker wrote in its slot, which would
/// otherwise start a line of the worker's making, timestamp and all) is
/// written as an escape (`\n`, `\x1b`).
pub fn write_line(line: &str) {
    let text = format!("{} {}\n", timestamp(SystemTime::now()), one_line(line));
    let queued = WRITER.try_with(|writer| {
        let mut writer = writer.borrow_mut();
        if writer.as_ref().is_some_and(|w| w.pid != getpid()) {
            // A forked child's copy: its lock is not ours to touch.
            std::mem::forget(writer.take());
        }
        if writer.is_none() {
            *writer = start();
        }
        let Some(writer) = writer.as_ref() else { return false };
        writer.pending.fetch_add(1, Relaxed);
        match writer.queue.try_send(text) {
            Ok(()) => true,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                writer.pending.fetch_sub(1, Relaxed);
                false
            }
        }
    });
    if !matches!(queued, Ok(true)) {
        LOST.fetch_add(1, Relaxed);
    }
}

/// In a worker: its background errors (a handler that failed, where the
/// script defines no `bgerror`) go to the default log's queue rather than
/// through Tcl's default report, a blocking write to stderr. On a stderr
/// nobody reads, that write never returns: the worker, registered again
/// already and shown idle, would take connections it never serves. Left
/// alone where the script set a handler of its own (`interp bgerror`),
/// and a `bgerror` command, when there is one, is called as Tcl calls it.
pub(super) fn report_background_errors(interp: Interp) {
    let handler = interp.eval_global(&Obj::new_string("interp bgerror {}")).map(|h| h.to_string_lossy());
    if handler.as_deref() != Ok(TCL_DEFAULT_HANDLER) {
        return;
    }
    interp.create_command(BACKGROUND_ERROR_COMMAND, Some(on_background_error), std::ptr::null_mut());
    let mut set = "interp bgerror {} ".to_string();
    set.push_str(BACKGROUND_ERROR_COMMAND.to_str().unwrap_or_default());
    let _ = interp.eval_global(&Obj::new_string(&set));
}

const TCL_DEFAULT_HANDLER: &str = "::tcl::Bgerror";
const BACKGROUND_ERROR_COMMAND: &std::ffi::CStr = c"::socketserver::WorkerBackgroundError";

/// `interp bgerror` handler of a worker: `message options`.
unsafe extern "C" fn on_background_error(
    _: *mut std::ffi::c_void,
    interp: *mut tcl::Tcl_Interp,
    objc: std::ffi::c_int,
    objv: *const *mut tcl::Tcl_Obj,
) -> std::ffi::c_int {
    let result = std::panic::catch_unwind(|| {
        // SAFETY: Tcl calls a command with its live interpreter and objc
        // live words in objv.
        let (interp, words) = unsafe {
            let words = std::slice::from_raw_parts(objv, usize::try_from(objc).unwrap_or(0));
            (Interp::from_raw(interp), words.iter().map(|&w| Obj::from_raw(w)).collect::<Vec<_>>())
        };
        let [_, message, options] = words.as_slice() else { return tcl::TCL_OK };
        let has_bgerror = interp
            .eval_global(&Obj::new_string("llength [info commands ::bgerror]"))
            .is_ok_and(|n| n.to_string_lossy() != "0");
        if has_bgerror {
            // Tcl's own report, which calls `bgerror`.
            let words = [Obj::new_string(TCL_DEFAULT_HANDLER), message.clone(), options.clone()];
            let _ = interp.eval_global(&Obj::new_list(&words));
            return tcl::TCL_OK;
        }
        let get = [Obj::new_string("dict"), Obj::new_string("get"), options.clone(), Obj::new_string("-errorinfo")];
        let text = interp.eval_global(&Obj::new_list(&get)).map(|info| info.to_string_lossy());
        let text = text.unwrap_or_else(|_| message.to_string_lossy());
        write_line(&format!("socketserver worker {}: {text}", getpid()));
        tcl::TCL_OK
    });
    result.unwrap_or(tcl::TCL_OK)
}

/// The writer thread of this process, and the exit handler that gives it
/// time to finish.
/// `line` with its control characters escaped as Tcl writes them.
fn one_line(line: &str) -> std::borrow::Cow<'_, str> {
    if !line.chars().any(char::is_control) {
        return line.into();
    }
    let mut out = String::with_capacity(line.len() + 8);
    for c in line.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\x{:02x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.into()
}

fn start() -> Option<Writer> {
    let (queue, lines) = sync_channel::<String>(QUEUE_LINES);
    let pending = Arc::new(AtomicUsize::new(0));
    let written = Arc::clone(&pending);
    std::thread::Builder::new()
        .name("socketserver-log".into())
        .stack_size(crate::THREAD_STACK_SIZE)
        .spawn(move || {
            for line in lines {
                // Straight to descriptor 2, not through Rust's `Stderr`:
                // its lock, held here while a full pipe blocks us, would
                // be held for good in every child forked meanwhile. A
                // stderr that refuses it (closed, a full disk, a reader
                // gone) loses the line, counted as one the queue dropped.
                let mut rest = line.as_bytes();
                while !rest.is_empty() {
                    match nix::unistd::write(std::io::stderr(), rest) {
                        Ok(n) => rest = &rest[n..],
                        Err(nix::errno::Errno::EINTR) => {}
                        Err(_) => {
                            LOST.fetch_add(1, Relaxed);
                            break;
                        }
                    }
                }
                written.fetch_sub(1, Relaxed);
            }
        })
        .ok()?;
    crate::tcl::create_exit_handler(drain_at_exit);
    Some(Writer { pid: getpid(), queue, pending })
}

/// Tcl's exit: the last lines (`stopped`) are written before the process
/// ends, unless stderr has not taken them within `DRAIN_AT_EXIT`.
unsafe extern "C" fn drain_at_exit(_: *mut std::ffi::c_void) {
    let _ = std::panic::catch_unwind(|| {
        let pending = WRITER.try_with(|writer| {
            writer
                .try_borrow()
                .ok()
                .and_then(|w| w.as_ref().filter(|w| w.pid == getpid()).map(|w| Arc::clone(&w.pending)))
        });
        let Ok(Some(pending)) = pending else { return };
        let deadline = Instant::now() + DRAIN_AT_EXIT;
        while pending.load(Relaxed) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    });
}

/// `2026-12-07T13:05:01.123Z`.
pub fn timestamp(at: SystemTime) -> String {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let seconds = since.as_secs();
    let (days, of_day) = (seconds / 86_400, seconds % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        of_day / 3600,
        of_day / 60 % 60,
        of_day % 60,
        since.subsec_millis()
    )
}

/// The proleptic Gregorian date of a day counted from 1970-01-01 (Howard
/// Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_iso_8601_utc_with_milliseconds() {
        let at = |ms: u64| timestamp(UNIX_EPOCH + Duration::from_millis(ms));
        assert_eq!(at(0), "1970-01-01T00:00:00.000Z");
        // 2000-02-29 (a leap day of a century leap year) 23:59:59.999.
        assert_eq!(at(951_868_799_999), "2000-02-29T23:59:59.999Z");
        assert_eq!(at(1_796_649_901_123), "2026-12-07T13:25:01.123Z");
    }
}
