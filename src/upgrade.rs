//! Starting the next generation of the accepting process with its
//! listeners, for upgrades that refuse no connection (nginx's binary
//! upgrade, unicorn's USR2).
//!
//! The process forks; the child moves the listening sockets to descriptors
//! 3, 4, ... (close-on-exec cleared for them alone), and execs the new
//! program with the variables of systemd socket activation (`LISTEN_PID`,
//! `LISTEN_FDS`, `LISTEN_FDNAMES`), plus the write end of a pipe
//! (`SOCKETSERVER_READY_FD`) on which the new generation says "ready" once
//! it serves. Until then both generations accept on the same sockets, which
//! never close: no client is refused at any moment. The caller stops the
//! old generation on "ready", and keeps serving if the pipe closes without
//! it (the new program failed).
//!
//! Everything the child needs is prepared before the fork: between fork and
//! exec it makes only system calls (`getpid`, `chdir`, `dup2`, `execve`).

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::errno::Errno;
use nix::unistd::Pid;

use crate::inherited::READY_VARIABLE;

/// The variable naming, in the new generation, the read end of a pipe on
/// which the old one says that it handed the service over (sd_notify's
/// `MAINPID=`); see `pool::notify`.
pub const HANDOVER_VARIABLE: &str = "SOCKETSERVER_HANDOVER_FD";

/// Digits reserved for the child's pid in `LISTEN_PID=`.
const PID_DIGITS: usize = 10;

/// Forks and execs `command` (program, then arguments) with `listeners`
/// passed on. Returns the child's pid and the read end of its readiness
/// pipe.
/// `environment` is added to this process's (sd_notify's variables, which
/// the pool took out of it); `directory`, if given, is where it runs (the
/// one the process started in, for the default command: its script's
/// path may be relative to it). A child that cannot enter it exits with
/// status 125. `handover`, if given, is passed on after the readiness
/// pipe, named by `HANDOVER_VARIABLE`.
pub fn spawn_next_generation(
    command: &[String],
    listeners: &[RawFd],
    environment: &[(String, String)],
    directory: Option<&Path>,
    handover: Option<RawFd>,
) -> Result<(Pid, OwnedFd), Errno> {
    let to_c = |s: &str| CString::new(s).map_err(|_| Errno::EINVAL);
    let directory = directory.map(|d| CString::new(d.as_os_str().as_bytes()).map_err(|_| Errno::EINVAL)).transpose()?;
    let program = to_c(command.first().ok_or(Errno::EINVAL)?)?;
    let args: Vec<CString> = command.iter().map(|a| to_c(a)).collect::<Result<_, _>>()?;
    let count = listeners.len() as RawFd;
    let ready_fd = 3 + count;
    let extra = environment;
    let mut environment: Vec<CString> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .filter(|(k, _)| !matches!(k.as_str(), "LISTEN_PID" | "LISTEN_FDS" | "LISTEN_FDNAMES"))
        .filter(|(k, _)| k != READY_VARIABLE && k != HANDOVER_VARIABLE)
        .filter(|(k, _)| !extra.iter().any(|(name, _)| name == k))
        .chain(extra.iter().cloned())
        .map(|(k, v)| to_c(&format!("{k}={v}")))
        .collect::<Result<_, _>>()?;
    environment.push(to_c(&format!("LISTEN_FDS={count}"))?);
    environment.push(to_c(&format!("LISTEN_FDNAMES={}", vec!["socketserver"; listeners.len()].join(":")))?);
    environment.push(to_c(&format!("{READY_VARIABLE}={ready_fd}"))?);
    if handover.is_some() {
        environment.push(to_c(&format!("{HANDOVER_VARIABLE}={}", ready_fd + 1))?);
    }
    // The pid is written in by the child, over the zeros.
    let mut pid_variable = format!("LISTEN_PID={}", "0".repeat(PID_DIGITS)).into_bytes();
    pid_variable.push(0);
    let digits_at = pid_variable.len() - 1 - PID_DIGITS;

    let argv: Vec<*const libc::c_char> =
        args.iter().map(|a| a.as_ptr()).chain(std::iter::once(std::ptr::null())).collect();
    let mut envp: Vec<*const libc::c_char> = environment.iter().map(|e| e.as_ptr()).collect();
    envp.push(pid_variable.as_ptr().cast());
    envp.push(std::ptr::null());

    let (ready_read, ready_write) = {
        let _no_fork = (!crate::sys::CLOEXEC_IS_ATOMIC).then(crate::fork_safety::hold_off_forks);
        crate::sys::pipe_cloexec(false)?
    };
    // Copies above every number the child will use: the fork closes the
    // originals in the child (see `fork_safety`), and a target number may
    // be one of the originals. The lowest free numbers above the targets,
    // so that a low descriptor limit (systemd services often run with 1024
    // or less) is no obstacle.
    let mut scratch: Vec<OwnedFd> = Vec::new();
    for fd in listeners.iter().copied().chain([ready_write.as_raw_fd()]).chain(handover) {
        let copy = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(ready_fd + 2))?;
        // SAFETY: fcntl just made this descriptor.
        scratch.push(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(copy) });
    }
    let sources: Vec<RawFd> = scratch.iter().map(|fd| fd.as_raw_fd()).collect();
    let pid_digits = pid_variable.as_mut_ptr();

    // SAFETY: the child only makes async-signal-safe system calls on data
    // prepared above, then execs or exits.
    match unsafe { nix::unistd::fork() }? {
        nix::unistd::ForkResult::Child => unsafe {
            // The pid into LISTEN_PID, right-aligned over the zeros.
            let mut pid = libc::getpid() as u64;
            for i in (0..PID_DIGITS).rev() {
                *pid_digits.add(digits_at + i) = b'0' + (pid % 10) as u8;
                pid /= 10;
            }
            if let Some(directory) = &directory {
                if libc::chdir(directory.as_ptr()) < 0 {
                    libc::_exit(125);
                }
            }
            for (i, &fd) in sources.iter().enumerate() {
                // dup2 leaves the new descriptor without close-on-exec.
                if libc::dup2(fd, 3 + i as RawFd) < 0 {
                    libc::_exit(126);
                }
            }
            libc::execve(program.as_ptr(), argv.as_ptr(), envp.as_ptr());
            libc::_exit(127)
        },
        nix::unistd::ForkResult::Parent { child } => {
            drop(scratch);
            drop(ready_write);
            Ok((child, ready_read))
        }
    }
}
