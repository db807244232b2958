//! Tcl 9's notifier on Linux, renewed in a forked child (`notifier_fork`
//! says why): its epoll instances and their wakeup eventfds, read from
//! `/proc/self/fdinfo` before the fork and replaced under the same numbers
//! after it.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};

use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::unistd::dup3;

/// One line of an epoll instance's fdinfo: a watched descriptor, the
/// events asked for and the caller's 64-bit datum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Registration {
    fd: RawFd,
    events: u32,
    data: u64,
}

/// An epoll instance of this process, what it watches, and which of those
/// are its wakeup eventfds.
pub struct Notifier {
    epoll_fd: RawFd,
    registrations: Vec<Registration>,
    wakeups: Vec<RawFd>,
}

/// The epoll instances that wake through an eventfd, as Tcl's do, with
/// their registrations: to be taken just before a fork.
pub fn snapshot() -> Vec<Notifier> {
    descriptors_of_kind("anon_inode:[eventpoll]")
        .into_iter()
        .filter_map(|epoll_fd| {
            let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{epoll_fd}")).ok()?;
            let registrations = parse_fdinfo(&info);
            let wakeups: Vec<RawFd> = registrations
                .iter()
                .map(|r| r.fd)
                .filter(|&fd| kind_of(fd).as_deref() == Some("anon_inode:[eventfd]"))
                .collect();
            (!wakeups.is_empty()).then_some(Notifier { epoll_fd, registrations, wakeups })
        })
        .collect()
}

/// In the child of a fork: its own epoll instances and eventfds, under the
/// same numbers, holding what `snapshot` saw before the fork.
pub fn renew(notifiers: &[Notifier]) {
    for notifier in notifiers {
        notifier.wakeups.iter().for_each(|&fd| renew_eventfd(fd));
        renew_epoll(notifier.epoll_fd, &notifier.registrations);
    }
}

/// The open descriptors whose `/proc/self/fd` link reads `kind`.
fn descriptors_of_kind(kind: &str) -> Vec<RawFd> {
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else { return Vec::new() };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&fd| kind_of(fd).as_deref() == Some(kind))
        .collect()
}

fn kind_of(fd: RawFd) -> Option<String> {
    let link = std::fs::read_link(format!("/proc/self/fd/{fd}")).ok()?;
    Some(link.to_string_lossy().into_owned())
}

/// The `tfd:` lines of an epoll descriptor's fdinfo, e.g.
/// `tfd:        5 events:       19 data:     55d0c0a1b2c3d4e5  pos:0 ...`
/// (events and data in hexadecimal).
fn parse_fdinfo(info: &str) -> Vec<Registration> {
    info.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let mut field = |name: &str| -> Option<&str> {
                (words.next()? == name).then_some(())?;
                words.next()
            };
            let fd = field("tfd:")?.parse().ok()?;
            let events = u32::from_str_radix(field("events:")?, 16).ok()?;
            let data = u64::from_str_radix(field("data:")?, 16).ok()?;
            Some(Registration { fd, events, data })
        })
        .collect()
}

/// Replaces the eventfd at `fd` by a new one with the same flags.
fn renew_eventfd(fd: RawFd) {
    let status = fcntl(fd, FcntlArg::F_GETFL).map(OFlag::from_bits_retain).unwrap_or(OFlag::empty());
    let mut flags = EfdFlags::EFD_CLOEXEC;
    if status.contains(OFlag::O_NONBLOCK) {
        flags |= EfdFlags::EFD_NONBLOCK;
    }
    if let Ok(fresh) = EventFd::from_flags(flags) {
        let _ = dup3(fresh.as_fd().as_raw_fd(), fd, descriptor_flags(fd));
    }
}

/// Replaces the epoll instance at `epoll_fd` by a new one holding
/// `registrations` (those whose descriptor is no longer open are dropped).
fn renew_epoll(epoll_fd: RawFd, registrations: &[Registration]) {
    let Ok(fresh) = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC) else { return };
    for r in registrations {
        // SAFETY: the number is only read by epoll_ctl for this call; a
        // descriptor closed since is refused there (EBADF) and dropped.
        let watched = unsafe { BorrowedFd::borrow_raw(r.fd) };
        let _ = fresh.add(watched, EpollEvent::new(EpollFlags::from_bits_retain(r.events as _), r.data));
    }
    let _ = dup3(fresh.0.as_raw_fd(), epoll_fd, descriptor_flags(epoll_fd));
}

/// `O_CLOEXEC` if `fd` is close-on-exec, for `dup3` to keep it so.
fn descriptor_flags(fd: RawFd) -> OFlag {
    match fcntl(fd, FcntlArg::F_GETFD) {
        Ok(flags) if FdFlag::from_bits_retain(flags).contains(FdFlag::FD_CLOEXEC) => OFlag::O_CLOEXEC,
        _ => OFlag::empty(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_registrations_of_an_fdinfo() {
        let info = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1057\n\
                    tfd:        4 events:       19 data:     55d0c0a1b2c3d4e5  pos:0 ino:1057 sdev:f\n\
                    tfd:       12 events: 8000001d data:                0  pos:0 ino:3 sdev:9\n";
        assert_eq!(
            parse_fdinfo(info),
            vec![
                Registration { fd: 4, events: 0x19, data: 0x55d0_c0a1_b2c3_d4e5 },
                Registration { fd: 12, events: 0x8000_001d, data: 0 },
            ]
        );
    }

    /// A forked child that renews its instances no longer shares them: a
    /// registration it removes stays in the parent's, and a wakeup it
    /// writes is not seen by the parent.
    #[test]
    fn a_renewed_child_shares_neither_instance_nor_wakeup() {
        // SAFETY: system calls on descriptors made here; the child only
        // makes system calls and leaves with _exit.
        unsafe {
            let epoll = libc::epoll_create1(libc::EPOLL_CLOEXEC);
            let wakeup = libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK);
            let mut pipe = [0; 2];
            assert_eq!(libc::pipe(pipe.as_mut_ptr()), 0);
            for (fd, data) in [(wakeup, 1u64), (pipe[0], 2u64)] {
                let mut event = libc::epoll_event { events: libc::EPOLLIN as u32, u64: data };
                assert_eq!(libc::epoll_ctl(epoll, libc::EPOLL_CTL_ADD, fd, &mut event), 0);
            }
            let notifiers = snapshot();
            let pid = libc::fork();
            if pid == 0 {
                renew(&notifiers);
                let mut ok = libc::epoll_ctl(epoll, libc::EPOLL_CTL_DEL, pipe[0], std::ptr::null_mut()) == 0;
                let one = 1u64;
                ok &= libc::write(wakeup, &one as *const u64 as *const _, 8) == 8;
                let mut events = [libc::epoll_event { events: 0, u64: 0 }; 4];
                // The child's own instance sees its own wakeup, datum kept.
                ok &= libc::epoll_wait(epoll, events.as_mut_ptr(), 4, 1000) == 1;
                ok &= { events[0].u64 } == 1;
                libc::_exit(if ok { 0 } else { 1 });
            }
            let mut status = 0;
            assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
            assert_eq!(libc::WEXITSTATUS(status), 0, "the child's checks failed");
            // The parent still watches the pipe, and saw no wakeup.
            let mut events = [libc::epoll_event { events: 0, u64: 0 }; 4];
            assert_eq!(libc::epoll_wait(epoll, events.as_mut_ptr(), 4, 0), 0);
            assert_eq!(libc::write(pipe[1], b"x".as_ptr() as *const _, 1), 1);
            assert_eq!(libc::epoll_wait(epoll, events.as_mut_ptr(), 4, 1000), 1);
            assert_eq!({ events[0].u64 }, 2);
            for fd in [epoll, wakeup, pipe[0], pipe[1]] {
                libc::close(fd);
            }
        }
    }
}
