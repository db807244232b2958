//! A received channel's queue time, for its handler to ask
//! (`::socketserver::socket queue channel`, as Puma's X-Queue-Start): when
//! the connection was accepted and how long it waited for a worker.
//!
//! Each channel made from a received connection is remembered here, by its
//! Tcl channel (the bottom of a stack: `tls::import` keeps it), until it is
//! closed (a close handler forgets it).

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Mutex, MutexGuard};

use crate::handoff::Connection;
use crate::queue_stats::{monotonic_ns, realtime_ns};
use crate::tcl::{Channel, Interp, Obj, TclError, TclResult};

#[derive(Clone, Copy)]
struct Stamps {
    accepted_at: u64,
    wait_ns: u64,
}

static CHANNELS: Mutex<Option<HashMap<usize, Stamps>>> = Mutex::new(None);

fn channels() -> MutexGuard<'static, Option<HashMap<usize, Stamps>>> {
    CHANNELS.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What `remember` keeps of a connection, taken before its socket goes
/// to the channel.
pub fn stamps_of(conn: &Connection) -> (u64, u64) {
    (conn.accepted_at, conn.queue_wait_ns())
}

/// Remembers a connection's stamps (`stamps_of`) for `channel`, just made
/// from it.
pub fn remember(channel: Channel, (accepted_at, wait_ns): (u64, u64)) {
    if accepted_at == 0 {
        return;
    }
    let key = channel.key();
    channels().get_or_insert_with(HashMap::new).insert(key, Stamps { accepted_at, wait_ns });
    channel.on_close(forget, key as *mut c_void);
}

unsafe extern "C" fn forget(key: *mut c_void) {
    let _ = std::panic::catch_unwind(|| {
        if let Some(table) = channels().as_mut() {
            table.remove(&(key as usize));
        }
    });
}

/// `socket queue channel`: a dict, `accepted` (microseconds since the
/// epoch, as `clock microseconds` counts) and `wait` (seconds).
pub fn query(interp: Interp, name: &Obj) -> TclResult<Obj> {
    let channel = interp.bottom_channel(&name.to_string_lossy())?;
    let stamps = channels().as_ref().and_then(|t| t.get(&channel.key()).copied()).ok_or_else(|| {
        TclError::new(
            format!("channel \"{}\" was not received from a socketserver port", name.to_string_lossy()),
            &["SOCKETSERVER", "NOT_RECEIVED", &name.to_string_lossy()],
        )
    })?;
    let age = monotonic_ns().saturating_sub(stamps.accepted_at);
    let accepted_us = realtime_ns().saturating_sub(age) / 1000;
    Ok(Obj::new_dict(vec![
        ("accepted", Obj::new_int(accepted_us as i64)),
        ("wait", Obj::new_double(stamps.wait_ns as f64 / 1e9)),
    ]))
}
