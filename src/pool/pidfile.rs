//! `pool create -pidfile path`: the supervisor's pid, for `kill -HUP
//! $(cat path)`, logrotate's `postrotate` and init scripts. At every
//! moment it names the supervisor that serves.
//!
//! A relative path is made absolute at `pool create` (a script that then
//! does `cd /` removes the file it wrote, not `/app.pid`). The pid goes
//! into a file beside it first (`prepare`: created with `O_EXCL` and
//! `O_NOFOLLOW`, mode 0644, so that a link planted in a directory others
//! can write never redirects the write), and that file is renamed over the
//! path (`commit`) only once everything that can fail has succeeded: the
//! port opened, the pool made, its signal handlers installed. A `pool
//! create` that fails leaves the file as it was (a second copy of a
//! service started by mistake does not take over the running one's).
//!
//! A next generation of an upgrade commits only when it says "ready"
//! (`commit_deferred`, just before): until then the old generation serves
//! and the file names it, so a TERM sent through the file during the
//! warm-up stops the service, and a next generation that fails never
//! touched it. An old generation whose upgrade failed writes its own pid
//! again if the file no longer names it.
//!
//! It is removed when the process that wrote it exits (Tcl's `exit`, which
//! a pool stopped by a signal ends in), and only if it still names that
//! process. A child (a worker) never removes it.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, Once};

use nix::unistd::{getpid, Pid};

use crate::tcl::{self, TclError, TclResult};

/// The files this process wrote, with the pid written in them.
static WRITTEN: Mutex<Vec<(PathBuf, Pid)>> = Mutex::new(Vec::new());
/// Files prepared by a next generation that has not said "ready".
static DEFERRED: Mutex<Vec<Prepared>> = Mutex::new(Vec::new());

fn lock<T>(mutex: &'static Mutex<T>) -> std::sync::MutexGuard<'static, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A pid file written beside its path, not renamed over it yet.
pub struct Prepared {
    target: PathBuf,
    temporary: PathBuf,
    pid: Pid,
}

fn error(path: &Path, e: &std::io::Error) -> TclError {
    TclError::posix(&format!("couldn't write pid file \"{}\"", path.display()), e.raw_os_error().unwrap_or(libc::EIO))
}

/// `path` made absolute against the current directory.
pub fn absolute(path: &str) -> TclResult<PathBuf> {
    std::path::absolute(path).map_err(|e| error(Path::new(path), &e))
}

/// `<path>.<pid>.tmp`.
fn temporary_for(target: &Path, pid: Pid) -> Option<PathBuf> {
    let mut name = target.file_name()?.to_os_string();
    name.push(format!(".{pid}.tmp"));
    Some(target.with_file_name(name))
}

/// Writes this process's pid beside `target` (absolute), to be committed.
pub fn prepare(target: PathBuf) -> TclResult<Prepared> {
    let pid = getpid();
    let Some(temporary) = temporary_for(&target, pid) else {
        return Err(error(&target, &std::io::Error::from_raw_os_error(libc::EISDIR)));
    };
    let create = || {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&temporary)
    };
    // One left by an earlier process of this pid (it crashed) is removed:
    // a link is removed itself, never what it points to.
    let file = create().or_else(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => std::fs::remove_file(&temporary).and_then(|()| create()),
        _ => Err(e),
    });
    let written = file.and_then(|mut file| {
        // 0644 whatever the umask: readers are other users' scripts.
        file.set_permissions(std::fs::Permissions::from_mode(0o644))?;
        file.write_all(format!("{pid}\n").as_bytes())?;
        file.sync_all()
    });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&temporary);
        return Err(error(&target, &e));
    }
    Ok(Prepared { target, temporary, pid })
}

/// Renames the prepared file over its path, or, in a next generation that
/// has not said "ready", keeps it for `commit_deferred`.
pub fn commit(prepared: Prepared) -> TclResult<()> {
    register_exit_handler();
    if crate::inherited::ready_pending() {
        lock(&DEFERRED).push(prepared);
        return Ok(());
    }
    install(prepared)
}

/// Removes a prepared file that will not be committed (the pool failed).
pub fn abandon(prepared: Prepared) {
    let _ = std::fs::remove_file(&prepared.temporary);
}

fn install(prepared: Prepared) -> TclResult<()> {
    if let Err(e) = std::fs::rename(&prepared.temporary, &prepared.target) {
        let _ = std::fs::remove_file(&prepared.temporary);
        return Err(error(&prepared.target, &e));
    }
    let mut written = lock(&WRITTEN);
    written.retain(|(p, _)| *p != prepared.target);
    written.push((prepared.target, prepared.pid));
    Ok(())
}

/// A next generation says "ready": its pid files name it from now on.
pub fn commit_deferred() {
    let deferred = std::mem::take(&mut *lock(&DEFERRED));
    for prepared in deferred.into_iter().filter(|p| p.pid == getpid()) {
        let _ = install(prepared);
    }
}

/// An upgrade failed: the files this process wrote name it again (and the
/// failed generation's temporary files are removed), so that `kill -HUP
/// $(cat path)` reaches the supervisor that serves.
pub fn restore_after_failed_upgrade(failed: Pid) {
    let written: Vec<(PathBuf, Pid)> = lock(&WRITTEN).clone();
    for (target, pid) in written.into_iter().filter(|(_, pid)| *pid == getpid()) {
        if let Some(left) = temporary_for(&target, failed) {
            let _ = std::fs::remove_file(left);
        }
        if !names(&target, pid) {
            if let Ok(prepared) = prepare(target) {
                let _ = install(prepared);
            }
        }
    }
}

fn names(path: &Path, pid: Pid) -> bool {
    std::fs::read_to_string(path).is_ok_and(|text| text.trim() == pid.to_string())
}

fn remove_if_ours(path: &Path, pid: Pid) {
    if pid == getpid() && names(path, pid) {
        let _ = std::fs::remove_file(path);
    }
}

fn register_exit_handler() {
    static AT_EXIT: Once = Once::new();
    AT_EXIT.call_once(|| tcl::create_exit_handler(remove_at_exit));
}

unsafe extern "C" fn remove_at_exit(_: *mut std::ffi::c_void) {
    let _ = std::panic::catch_unwind(|| {
        for (path, pid) in lock(&WRITTEN).iter() {
            remove_if_ours(path, *pid);
        }
        for prepared in lock(&DEFERRED).iter().filter(|p| p.pid == getpid()) {
            let _ = std::fs::remove_file(&prepared.temporary);
        }
    });
}
