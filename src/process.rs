//! `::socketserver::fork` and `::socketserver::wait`: what a script needs
//! to run its own fork loop (the 1.1.3 way) where TclX is not available,
//! as under Tcl 9. Their results are TclX's, so such a script reads the
//! same either way; the pool (`::socketserver::pool`) needs neither.

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork as fork_process, ForkResult, Pid};

use crate::registration::InterpState;
use crate::tcl::{Interp, NameTable, Obj, TclError, TclResult, Tcl_Obj};

static WAIT_OPTIONS: NameTable<2> = NameTable([c"-nohang".as_ptr(), std::ptr::null()]);

/// Forks, after flushing every channel of `interp` (stdout and stderr
/// included): output still buffered at the fork would be written by both
/// processes. (Through the C API: no variable or command of the script
/// is used, whatever it redefined.) Every fork of the library whose child goes on in Tcl goes
/// through here (an upgrade's child execs at once).
///
/// # Safety
/// As for `nix::unistd::fork`: what the child runs must be sound in a copy
/// of this process with only the calling thread. Our own locks are made
/// safe by `fork_safety`, which also gives the child its own notifier
/// where Tcl's would be shared.
pub unsafe fn fork_flushed(interp: Interp) -> nix::Result<ForkResult> {
    interp.flush_all_channels();
    // SAFETY: the caller's promise.
    unsafe { fork_process() }
}

/// `fork`: the child's pid in the parent, 0 in the child.
pub fn fork(_state: &InterpState, interp: Interp, objv: &[*mut Tcl_Obj]) -> TclResult<Obj> {
    if objv.len() != 1 {
        return Err(interp.wrong_num_args(objv, 1, ""));
    }
    // SAFETY: the child goes on in the same interpreter, as after TclX's
    // fork.
    match unsafe { fork_flushed(interp) } {
        Ok(ForkResult::Child) => Ok(Obj::new_int(0)),
        Ok(ForkResult::Parent { child }) => Ok(Obj::new_int(child.as_raw().into())),
        Err(errno) => Err(TclError::posix("can't fork", errno as i32)),
    }
}

/// `wait ?-nohang? pid`: `pid EXIT code` or `pid SIG name` once the child
/// has ended (and is reaped); with `-nohang`, an empty result while it runs.
pub fn wait(_state: &InterpState, interp: Interp, objv: &[*mut Tcl_Obj]) -> TclResult<Obj> {
    // SAFETY: Tcl passes objc live objects in objv.
    let words: Vec<Obj> = objv.iter().map(|&w| unsafe { Obj::from_raw(w) }).collect();
    let (nohang, pid_word) = match words.len() {
        2 => (false, &words[1]),
        3 => {
            interp.get_index(&words[1], &WAIT_OPTIONS, c"option")?;
            (true, &words[2])
        }
        _ => return Err(interp.wrong_num_args(objv, 1, "?-nohang? pid")),
    };
    // pid_t's range: Tcl 8.6 would wrap a value up to 2^32 in magnitude
    // into it (-4294967295 is 1).
    let pid = pid_word.get_wide(interp)?;
    let Some(pid) = i32::try_from(pid).ok().filter(|&pid| pid > 0) else {
        return Err(TclError::new(
            format!("expected a process id but got \"{}\"", pid_word.to_string_lossy()),
            &["TCL", "VALUE", "PID"],
        ));
    };
    let flags = nohang.then_some(WaitPidFlag::WNOHANG);
    let status = loop {
        match waitpid(Pid::from_raw(pid), flags) {
            Err(Errno::EINTR) => continue,
            other => break other,
        }
    };
    let ended = |how: &str, what: Obj| Ok(Obj::new_list(&[Obj::new_int(pid.into()), Obj::new_string(how), what]));
    match status {
        Ok(WaitStatus::Exited(_, code)) => ended("EXIT", Obj::new_int(code.into())),
        Ok(WaitStatus::Signaled(_, signal, _)) => ended("SIG", Obj::new_string(signal.as_str())),
        Ok(_) => Ok(Obj::new_string("")),
        Err(errno) => Err(TclError::posix(&format!("can't wait for process {pid}"), errno as i32)),
    }
}
