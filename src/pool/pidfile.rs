//! `pool create -pidfile path`: the supervisor's pid, for `kill -HUP
//! $(cat path)`, logrotate's `postrotate` and init scripts.
//!
//! Written atomically (a file beside it, then `rename`), so a reader sees
//! the old pid or the new one, never a part. The next generation of an
//! upgrade writes its own pid over it when it makes its pool; the old one
//! then leaves it alone. It is removed when the process that wrote it
//! exits (Tcl's `exit`, which a pool stopped by a signal ends in), and only
//! if it still names that process. A child (a worker) never removes it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, Once};

use nix::unistd::{getpid, Pid};

use crate::tcl::{self, TclError, TclResult};

/// The files this process wrote, with the pid written in them.
static WRITTEN: Mutex<Vec<(PathBuf, Pid)>> = Mutex::new(Vec::new());

fn written() -> std::sync::MutexGuard<'static, Vec<(PathBuf, Pid)>> {
    WRITTEN.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Writes this process's pid into `path`, atomically.
pub fn write(path: &str) -> TclResult<()> {
    let error = |e: std::io::Error| {
        TclError::posix(&format!("couldn't write pid file \"{path}\""), e.raw_os_error().unwrap_or(libc::EIO))
    };
    let target = Path::new(path);
    let name = target.file_name().ok_or_else(|| error(std::io::Error::from_raw_os_error(libc::EISDIR)))?;
    let pid = getpid();
    let mut temporary = name.to_os_string();
    temporary.push(format!(".{pid}.tmp"));
    let temporary = target.with_file_name(temporary);
    let result = std::fs::File::create(&temporary)
        .and_then(|mut file| file.write_all(format!("{pid}\n").as_bytes()).and_then(|()| file.sync_all()))
        .and_then(|()| std::fs::rename(&temporary, target));
    if let Err(e) = result {
        let _ = std::fs::remove_file(&temporary);
        return Err(error(e));
    }
    static AT_EXIT: Once = Once::new();
    AT_EXIT.call_once(|| tcl::create_exit_handler(remove_at_exit));
    let mut written = written();
    written.retain(|(p, _)| p != target);
    written.push((target.to_path_buf(), pid));
    Ok(())
}

/// Removes `path` if it names this process (a pool create that failed
/// after writing it).
pub fn remove(path: &str) {
    let mut written = written();
    written.retain(|(p, pid)| {
        if p != Path::new(path) {
            return true;
        }
        remove_if_ours(p, *pid);
        false
    });
}

fn remove_if_ours(path: &Path, pid: Pid) {
    if pid != getpid() {
        return;
    }
    let names_us = std::fs::read_to_string(path).is_ok_and(|text| text.trim() == pid.to_string());
    if names_us {
        let _ = std::fs::remove_file(path);
    }
}

unsafe extern "C" fn remove_at_exit(_: *mut std::ffi::c_void) {
    let _ = std::panic::catch_unwind(|| {
        for (path, pid) in written().iter() {
            remove_if_ours(path, *pid);
        }
    });
}
