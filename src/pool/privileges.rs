//! What a worker gives up right after the fork, before `-init` runs:
//! its resource limits are set (`-rlimit`), then its group and its user
//! (`-group`, `-user`), as Apache's `User`/`Group`, nginx's `user` and
//! gunicorn's `--user` do. The supervisor keeps its own identity: it binds,
//! accepts, forks and upgrades; the workers, which run the user's code on
//! untrusted input, do not run as root.
//!
//! The order is the one that cannot be got wrong: limits while still
//! allowed to raise them; supplementary groups cleared and every group id
//! (real, effective, saved, and on Linux the filesystem one) set while
//! still root; then every user id. Then it is checked: the ids read back
//! are the ones asked for, and a worker that is not root cannot become
//! root again (`setuid(0)` must fail). A worker where any step fails does
//! not serve: it exits, its reason goes to the pool's log, and the
//! supervisor counts it as a failed start.
//!
//! Names are looked up at `pool create`, in the supervisor, before any
//! fork: an unknown user is an error of `pool create`, and a worker never
//! reads the user database (it may no longer be able to).
//!
//! The few calls that differ between systems are the small functions at
//! the end of this file.

use nix::sys::resource::{getrlimit, setrlimit, Resource};
use nix::sys::signal::Signal;
use nix::unistd::{Gid, Group, Uid, User};

/// The value of a limit that is no limit (`unlimited`). (`rlim_t` is
/// unsigned on Linux and macOS, signed on FreeBSD: hence the casts.)
#[allow(clippy::unnecessary_cast)]
pub const UNLIMITED: u64 = nix::sys::resource::RLIM_INFINITY as u64;

/// The fewest descriptors a worker may be limited to: Tcl's notifier, the
/// pool's pipes and the queue need some before the first connection, and
/// a worker that cannot make them dies inside Tcl (an abort), not with a
/// reason in the log.
pub const NOFILE_FLOOR: u64 = 64;

/// The id that setuid and setgid read as "leave unchanged" ((uid_t)-1).
const UNCHANGED_ID: u32 = u32::MAX;

/// The limits `-rlimit` knows, by the names it takes.
pub const LIMIT_NAMES: [&str; 6] = ["as", "core", "cpu", "fsize", "nofile", "nproc"];

fn resource(name: &str) -> Option<Resource> {
    Some(match name {
        #[cfg(not(any(target_os = "freebsd", target_os = "netbsd", target_os = "openbsd")))]
        "as" => Resource::RLIMIT_AS,
        #[cfg(target_os = "freebsd")]
        "as" => Resource::RLIMIT_VMEM,
        "core" => Resource::RLIMIT_CORE,
        "cpu" => Resource::RLIMIT_CPU,
        "fsize" => Resource::RLIMIT_FSIZE,
        "nofile" => Resource::RLIMIT_NOFILE,
        #[cfg(any(
            target_os = "linux",
            target_os = "android",
            target_os = "freebsd",
            target_os = "netbsd",
            target_os = "openbsd"
        ))]
        "nproc" => Resource::RLIMIT_NPROC,
        _ => return None,
    })
}

/// One `-rlimit` entry.
#[derive(Clone, Debug)]
struct Limit {
    name: &'static str,
    value: u64,
}

/// What each worker of a pool gives up.
#[derive(Clone, Debug, Default)]
pub struct Privileges {
    /// The user to become, and how it was named (for messages).
    user: Option<(Uid, String)>,
    /// The group to become: `-group`, or the user's own group.
    group: Option<(Gid, String)>,
    limits: Vec<Limit>,
}

impl Privileges {
    /// Looks up `-user` and `-group` (a name or a number) and checks the
    /// limits, in the supervisor. Errors are messages for `pool create`,
    /// with the Tcl error code's words.
    pub fn new(
        user: Option<&str>,
        group: Option<&str>,
        limits: &[(&'static str, u64)],
    ) -> Result<Privileges, (String, Vec<String>)> {
        let lookup = |what: &str, word: &str| {
            (format!("unknown {what} \"{word}\""), words(&["TCL", "LOOKUP", &what.to_uppercase(), word]))
        };
        let unchanged = |what: &str, word: &str| {
            (
                format!("{what} id {word} is not a {what}: the system reads it as \"leave unchanged\""),
                words(&["TCL", "VALUE", &what.to_uppercase(), word]),
            )
        };
        for (what, word) in [("user", user), ("group", group)] {
            if let Some(word) = word.filter(|w| w.parse::<u32>() == Ok(UNCHANGED_ID)) {
                return Err(unchanged(what, word));
            }
        }
        let mut privileges = Privileges::default();
        let mut primary_group = None;
        if let Some(word) = user {
            let entry = match word.parse::<u32>() {
                Ok(uid) => User::from_uid(Uid::from_raw(uid)).ok().flatten(),
                Err(_) => User::from_name(word).ok().flatten(),
            };
            let uid = match (&entry, word.parse::<u32>()) {
                (Some(entry), _) => entry.uid,
                // A number the user database does not know is still a uid.
                (None, Ok(uid)) => Uid::from_raw(uid),
                (None, Err(_)) => return Err(lookup("user", word)),
            };
            primary_group = entry.map(|e| e.gid);
            privileges.user = Some((uid, word.to_string()));
        }
        privileges.group = match group {
            Some(word) => {
                let gid = match word.parse::<u32>() {
                    Ok(gid) => Gid::from_raw(gid),
                    Err(_) => match Group::from_name(word).ok().flatten() {
                        Some(entry) => entry.gid,
                        None => return Err(lookup("group", word)),
                    },
                };
                Some((gid, word.to_string()))
            }
            None => match (primary_group, user) {
                (Some(gid), _) => Some((gid, gid.to_string())),
                (None, Some(word)) => {
                    return Err((
                        format!("user \"{word}\" has no entry in the user database: name its group with -group"),
                        words(&["SOCKETSERVER", "USER", word]),
                    ))
                }
                (None, None) => None,
            },
        };
        // Only root can become someone else: say so now, not in every
        // worker's exit.
        if !Uid::effective().is_root() {
            let same_user =
                privileges.user.as_ref().is_none_or(|(uid, _)| *uid == Uid::current() && *uid == Uid::effective());
            let same_group =
                privileges.group.as_ref().is_none_or(|(gid, _)| *gid == Gid::current() && *gid == Gid::effective());
            if !(same_user && same_group) {
                return Err((
                    "cannot run workers as another user or group: the supervisor is not root".to_string(),
                    words(&["SOCKETSERVER", "USER", "NOT_ROOT"]),
                ));
            }
        }
        for &(name, value) in limits {
            let Some(resource) = resource(name) else {
                return Err((
                    format!("limit \"{name}\" is not known on this system"),
                    words(&["SOCKETSERVER", "RLIMIT", name]),
                ));
            };
            if name == "nofile" && value == UNLIMITED {
                return Err((
                    format!("limit \"nofile unlimited\" is not allowed: no system gives a process unlimited descriptors; give a number of at least {NOFILE_FLOOR}"),
                    words(&["SOCKETSERVER", "RLIMIT", name]),
                ));
            }
            if name == "nofile" && value < NOFILE_FLOOR {
                return Err((
                    format!("limit \"nofile {value}\" is too low: a worker needs at least {NOFILE_FLOOR} descriptors before its first connection"),
                    words(&["SOCKETSERVER", "RLIMIT", name]),
                ));
            }
            let (_, hard) = getrlimit(resource).unwrap_or((UNLIMITED as _, UNLIMITED as _));
            #[allow(clippy::unnecessary_cast)]
            let hard = hard as u64;
            if !Uid::effective().is_root() && value > hard {
                return Err((
                    format!("limit \"{name} {value}\" is above the hard limit {hard}: only root may raise it"),
                    words(&["SOCKETSERVER", "RLIMIT", name]),
                ));
            }
            privileges.limits.retain(|l| l.name != name);
            privileges.limits.push(Limit { name, value });
        }
        Ok(privileges)
    }

    /// In the worker, right after the fork: sets the limits, then the
    /// group, then the user, and checks the outcome. `Err` is the reason
    /// the worker cannot serve, for the pool's log.
    pub fn apply(&self) -> Result<(), String> {
        for limit in &self.limits {
            let Some(resource) = resource(limit.name) else {
                continue;
            };
            let soft = limit.value as nix::sys::resource::rlim_t;
            // Soft and hard alike, so that the user's code cannot raise it
            // again; for cpu the hard limit is one second more, so that a
            // worker is told SIGXCPU before the SIGKILL of the hard limit.
            let hard = if limit.name == "cpu" && limit.value != UNLIMITED { soft.saturating_add(1) } else { soft };
            setrlimit(resource, soft, hard)
                .map_err(|errno| format!("couldn't set limit {} {}: {}", limit.name, limit.value, errno.desc()))?;
        }
        let Some((gid, group)) = &self.group else {
            return Ok(());
        };
        let target_uid = self.user.as_ref().map(|(uid, _)| *uid);
        if already(target_uid, *gid) {
            return Ok(());
        }
        set_groups(*gid).map_err(|errno| format!("couldn't clear supplementary groups: {}", errno.desc()))?;
        set_all_gids(*gid).map_err(|errno| format!("couldn't become group {group}: {}", errno.desc()))?;
        if let Some((uid, user)) = &self.user {
            set_all_uids(*uid).map_err(|errno| format!("couldn't become user {user}: {}", errno.desc()))?;
        }
        self.check(target_uid, *gid)
    }

    /// What a worker must be after `apply`, read back from the system.
    fn check(&self, uid: Option<Uid>, gid: Gid) -> Result<(), String> {
        if !all_gids_are(gid) || !groups_at_most(gid) {
            return Err(format!("couldn't become group {gid}: the group ids did not all change"));
        }
        let Some(uid) = uid else { return Ok(()) };
        if !all_uids_are(uid) {
            return Err(format!("couldn't become user {uid}: the user ids did not all change"));
        }
        if !uid.is_root() {
            if nix::unistd::setuid(Uid::from_raw(0)).is_ok() {
                return Err(format!("user {uid} could become root again"));
            }
            forbid_new_privileges().map_err(|errno| format!("couldn't forbid new privileges: {}", errno.desc()))?;
        }
        Ok(())
    }

    /// The limit that ended a worker killed by `signal`, when it can be
    /// told (`killed_by_pool`: the supervisor sent a SIGKILL itself).
    pub fn limit_that_killed(&self, signal: Signal, killed_by_pool: bool) -> Option<&'static str> {
        let has = |name: &str| self.limits.iter().any(|l| l.name == name && l.value != UNLIMITED);
        match signal {
            Signal::SIGXCPU if has("cpu") => Some("cpu"),
            // The cpu hard limit, one second after a SIGXCPU that was caught.
            Signal::SIGKILL if has("cpu") && !killed_by_pool => Some("cpu"),
            Signal::SIGXFSZ if has("fsize") => Some("fsize"),
            _ => None,
        }
    }
}

fn words(words: &[&str]) -> Vec<String> {
    words.iter().map(|w| w.to_string()).collect()
}

/// Whether the worker already is `uid` and `gid` in every id, with no
/// other group: a supervisor that is not root may name itself.
fn already(uid: Option<Uid>, gid: Gid) -> bool {
    all_gids_are(gid) && groups_at_most(gid) && uid.is_none_or(all_uids_are)
}

/// Whether the supplementary groups are none, or `gid` alone.
fn groups_at_most(gid: Gid) -> bool {
    #[cfg(not(target_vendor = "apple"))]
    {
        nix::unistd::getgroups().is_ok_and(|groups| groups.iter().all(|g| *g == gid))
    }
    #[cfg(target_vendor = "apple")]
    {
        // macOS reports its group cache, not the process's list: the
        // setgroups call that cleared it is what is trusted.
        let _ = gid;
        true
    }
}

/// Leaves `gid` as the only supplementary group (BSDs keep the effective
/// group in the list; Linux shows it there too).
fn set_groups(gid: Gid) -> nix::Result<()> {
    #[cfg(not(target_vendor = "apple"))]
    {
        nix::unistd::setgroups(&[gid])
    }
    #[cfg(target_vendor = "apple")]
    {
        let groups = [gid.as_raw()];
        // SAFETY: setgroups reads one gid_t from `groups`.
        nix::errno::Errno::result(unsafe { libc::setgroups(1, groups.as_ptr()) }).map(drop)
    }
}

#[cfg(any(target_os = "linux", target_os = "android", target_os = "freebsd", target_os = "openbsd"))]
mod ids {
    use nix::unistd::{getresgid, getresuid, setresgid, setresuid, Gid, Uid};

    pub fn set_all_gids(gid: Gid) -> nix::Result<()> {
        setresgid(gid, gid, gid)
    }
    pub fn set_all_uids(uid: Uid) -> nix::Result<()> {
        setresuid(uid, uid, uid)
    }
    pub fn all_gids_are(gid: Gid) -> bool {
        getresgid().is_ok_and(|ids| ids.real == gid && ids.effective == gid && ids.saved == gid)
    }
    pub fn all_uids_are(uid: Uid) -> bool {
        getresuid().is_ok_and(|ids| ids.real == uid && ids.effective == uid && ids.saved == uid)
    }
}

#[cfg(not(any(target_os = "linux", target_os = "android", target_os = "freebsd", target_os = "openbsd")))]
mod ids {
    use nix::unistd::{Gid, Uid};

    // setgid and setuid of root set the real, effective and saved ids.
    pub fn set_all_gids(gid: Gid) -> nix::Result<()> {
        nix::unistd::setgid(gid)
    }
    pub fn set_all_uids(uid: Uid) -> nix::Result<()> {
        nix::unistd::setuid(uid)
    }
    pub fn all_gids_are(gid: Gid) -> bool {
        Gid::current() == gid && Gid::effective() == gid
    }
    pub fn all_uids_are(uid: Uid) -> bool {
        Uid::current() == uid && Uid::effective() == uid
    }
}

use ids::{all_gids_are, all_uids_are, set_all_gids, set_all_uids};

/// Execs of set-user-id programs give the worker nothing (Linux's
/// no_new_privs; elsewhere the dropped ids are the guard).
fn forbid_new_privileges() -> nix::Result<()> {
    #[cfg(target_os = "linux")]
    {
        nix::sys::prctl::set_no_new_privs()
    }
    #[cfg(not(target_os = "linux"))]
    {
        Ok(())
    }
}
