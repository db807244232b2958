//! `::socketserver::pool`: argument parsing and the subcommands.

use std::sync::Arc;
use std::time::Duration;

use crate::command::{command_prefix, non_negative, open_port, parse_port, positive, ServerOptions};
use crate::port_table;
use crate::queue_stats::Overload;
use crate::registration::InterpState;
use crate::tcl::{Interp, NameTable, Obj, TclError, TclResult, Tcl_Obj};

use super::generation;
use super::hooks;
use super::privileges::{self, Privileges, LIMIT_NAMES};
use super::sizing::{self, Sizing};
use super::supervisor::{self, Config};
use super::supervisor_thread::not_here;
use super::worker;

static SUBCOMMANDS: NameTable<9> = NameTable([
    c"create".as_ptr(),
    c"info".as_ptr(),
    c"reload".as_ptr(),
    c"resize".as_ptr(),
    c"signal".as_ptr(),
    c"stop".as_ptr(),
    c"upgrade".as_ptr(),
    c"wait".as_ptr(),
    std::ptr::null(),
]);
static CREATE_OPTIONS: NameTable<32> = NameTable([
    c"-backlog".as_ptr(),
    c"-concurrency".as_ptr(),
    c"-fd".as_ptr(),
    c"-graceful".as_ptr(),
    c"-group".as_ptr(),
    c"-idletimeout".as_ptr(),
    c"-init".as_ptr(),
    c"-inittimeout".as_ptr(),
    c"-jitter".as_ptr(),
    c"-lifetimejitter".as_ptr(),
    c"-log".as_ptr(),
    c"-maxconnections".as_ptr(),
    c"-maxlifetime".as_ptr(),
    c"-maxqueue".as_ptr(),
    c"-maxrss".as_ptr(),
    c"-maxspare".as_ptr(),
    c"-metrics".as_ptr(),
    c"-minspare".as_ptr(),
    c"-myaddr".as_ptr(),
    c"-overload".as_ptr(),
    c"-pidfile".as_ptr(),
    c"-proxy".as_ptr(),
    c"-proxyfrom".as_ptr(),
    c"-proxytimeout".as_ptr(),
    c"-rlimit".as_ptr(),
    c"-signals".as_ptr(),
    c"-systemd".as_ptr(),
    c"-threads".as_ptr(),
    c"-timeout".as_ptr(),
    c"-user".as_ptr(),
    c"-workers".as_ptr(),
    std::ptr::null(),
]);

static OVERLOAD_POLICIES: NameTable<3> = NameTable([c"close".as_ptr(), c"pause".as_ptr(), std::ptr::null()]);

/// The names of `privileges::LIMIT_NAMES`, in the same order.
static LIMITS: NameTable<7> = NameTable([
    c"as".as_ptr(),
    c"core".as_ptr(),
    c"cpu".as_ptr(),
    c"fsize".as_ptr(),
    c"nofile".as_ptr(),
    c"nproc".as_ptr(),
    std::ptr::null(),
]);

const CREATE_USAGE: &str = "?-option value ...? port handler";
const DEFAULT_WORKERS: usize = 4;
const DEFAULT_GRACEFUL: Duration = Duration::from_secs(30);

/// Runs one call of `::socketserver::pool`.
pub fn dispatch(state: &InterpState, interp: Interp, objv: &[*mut Tcl_Obj]) -> TclResult<Obj> {
    if objv.len() < 2 {
        return Err(interp.wrong_num_args(objv, 1, "subcommand ?arg ...?"));
    }
    let word = |i: usize| {
        // SAFETY: Tcl passes objc live objects in objv.
        unsafe { Obj::from_raw(objv[i]) }
    };
    let args: Vec<Obj> = (2..objv.len()).map(word).collect();
    let optional_port = |usage: &str| -> TclResult<Option<u16>> {
        match args.as_slice() {
            [] => Ok(None),
            [port] => Ok(Some(parse_port(interp, port)?)),
            _ => Err(interp.wrong_num_args(objv, 2, usage)),
        }
    };
    let empty = || Ok(Obj::new_string(""));
    match SUBCOMMANDS.name(interp.get_index(&word(1), &SUBCOMMANDS, c"subcommand")?) {
        "create" => create(state, interp, objv, &args),
        "info" => match optional_port("?port?")? {
            None => Ok(Obj::new_list(
                &supervisor::ports(None)?.into_iter().map(|p| Obj::new_int(p.into())).collect::<Vec<_>>(),
            )),
            Some(port) => {
                supervisor::ports(Some(port))?;
                supervisor::info(port)
            }
        },
        "reload" => {
            // A stopping pool named is an error; without a port, the pools
            // that stop are left alone.
            let port = optional_port("?port?")?;
            let ports = supervisor::ports(port)?;
            if let Some(port) = port {
                supervisor::refuse_if_stopping(port)?;
            }
            ports.into_iter().for_each(supervisor::reload);
            empty()
        }
        "resize" => {
            let [port, workers] = args.as_slice() else {
                return Err(interp.wrong_num_args(objv, 2, "port workers"));
            };
            let port = parse_port(interp, port)?;
            let (min, max) = sizing::parse_workers(interp, workers)?;
            supervisor::ports(Some(port))?;
            supervisor::refuse_if_stopping(port)?;
            supervisor::resize(port, min, max);
            empty()
        }
        "signal" => {
            if worker::is_worker() {
                return Err(not_here());
            }
            let (result, hooked) = hooks::command(interp, objv, &args)?;
            if hooked {
                supervisor::hold_signals_now();
            }
            Ok(result)
        }
        "stop" => {
            supervisor::ports(optional_port("?port?")?)?.into_iter().for_each(supervisor::stop);
            empty()
        }
        "upgrade" => {
            let (timeout, args) = match args.as_slice() {
                [option, value, rest @ ..] if option.to_string_lossy() == "-timeout" => (seconds(interp, value)?, rest),
                rest => (generation::DEFAULT_UPGRADE_TIMEOUT, rest),
            };
            let command = match args {
                [] => generation::default_command(interp),
                [command] => command.list_elements(interp)?.iter().map(Obj::to_string_lossy).collect(),
                _ => return Err(interp.wrong_num_args(objv, 2, "?-timeout seconds? ?command?")),
            };
            if command.is_empty() {
                return Err(TclError::new("the command is empty", &["SOCKETSERVER", "UPGRADE", "COMMAND"]));
            }
            if supervisor::ports(None)?.is_empty() {
                return Err(TclError::new("no pool to upgrade", &["SOCKETSERVER", "UPGRADE", "NO_POOL"]));
            }
            Ok(Obj::new_int(supervisor::upgrade(command, timeout)?.into()))
        }
        _ => {
            let ports = supervisor::ports_to_wait(optional_port("?port?")?)?;
            supervisor::wait(&ports);
            empty()
        }
    }
}

/// `create ?-option value ...? port handler`
fn create(state: &InterpState, interp: Interp, objv: &[*mut Tcl_Obj], args: &[Obj]) -> TclResult<Obj> {
    let [options @ .., port_word, handler] = args else {
        return Err(interp.wrong_num_args(objv, 2, CREATE_USAGE));
    };
    let mut config = Config {
        workers: DEFAULT_WORKERS,
        concurrency: 1,
        handler: Vec::new(),
        init: None,
        max_connections: 0,
        jitter: 0,
        timeout: None,
        graceful: DEFAULT_GRACEFUL,
        log: None,
        signals: true,
        privileges: Default::default(),
        metrics: None,
        recycling: Default::default(),
        init_timeout: None,
        sizing: Sizing::fixed(DEFAULT_WORKERS),
    };
    let (mut min_spare, mut max_spare) = (None, None);
    let (mut user, mut group, mut limits, mut metrics) = (None, None, Vec::new(), None);
    let mut server = ServerOptions::default();
    let (mut max_queue, mut overload) = (0, None);
    let mut pidfile = None;
    let mut rest = options;
    while let [option, tail @ ..] = rest {
        let index = interp.get_index(option, &CREATE_OPTIONS, c"option")?;
        let [value, tail @ ..] = tail else {
            return Err(TclError::new(
                format!("value for \"{}\" missing", option.to_string_lossy()),
                &["TCL", "VALUE", "MISSING"],
            ));
        };
        let name = CREATE_OPTIONS.name(index);
        if server.take(interp, name, value)? {
            rest = tail;
            continue;
        }
        match name {
            "-concurrency" => config.concurrency = positive(interp, value)? as usize,
            "-graceful" => config.graceful = seconds(interp, value)?,
            "-init" => config.init = Some(value.clone()),
            "-jitter" => config.jitter = non_negative(interp, value)? as u64,
            "-log" => config.log = Some(value.list_elements(interp)?),
            "-maxconnections" => config.max_connections = non_negative(interp, value)? as u64,
            "-maxqueue" => max_queue = non_negative(interp, value)? as u64,
            "-overload" => {
                overload =
                    Some(match OVERLOAD_POLICIES.name(interp.get_index(value, &OVERLOAD_POLICIES, c"policy")?) {
                        "close" => Overload::Close,
                        _ => Overload::Pause,
                    })
            }
            "-metrics" => metrics = Some(value.to_string_lossy()).filter(|m| !m.is_empty()),
            "-pidfile" => pidfile = Some(value.to_string_lossy()).filter(|p| !p.is_empty()),
            "-maxrss" => config.recycling.max_rss = size(value)?,
            "-maxlifetime" => config.recycling.max_lifetime = max_lifetime(interp, value)?,
            "-lifetimejitter" => config.recycling.lifetime_jitter = Some(seconds(interp, value)?),
            "-inittimeout" => config.init_timeout = optional_seconds(interp, value)?,
            "-signals" => config.signals = value.get_boolean(interp)?,
            "-user" => user = Some(value.to_string_lossy()),
            "-group" => group = Some(value.to_string_lossy()),
            "-rlimit" => limits.extend(rlimits(interp, value)?),
            "-timeout" => {
                let timeout = seconds(interp, value)?;
                config.timeout = (!timeout.is_zero()).then_some(timeout);
            }
            "-minspare" => min_spare = Some(non_negative(interp, value)? as usize),
            "-maxspare" => max_spare = Some(non_negative(interp, value)? as usize),
            "-idletimeout" => config.sizing.idle_timeout = seconds(interp, value)?,
            _ => {
                let (min, max) = sizing::parse_workers(interp, value)?;
                (config.workers, config.sizing.min, config.sizing.max) = (min, min, max);
            }
        }
        rest = tail;
    }
    config.sizing.set_spares(min_spare, max_spare)?;
    config.handler = command_prefix(interp, handler)?;
    if let Some(log) = &config.log {
        // An empty -log means no log; anything else must be a command.
        if !log.is_empty() {
            command_prefix(interp, &Obj::new_list(log))?;
        }
    }
    // Names are looked up here, before the port is opened and any worker forked.
    config.privileges = Privileges::new(user.as_deref(), group.as_deref(), &limits)
        .map_err(|(message, code)| TclError::new(message, &code.iter().map(String::as_str).collect::<Vec<_>>()))?;
    if overload.is_some() && max_queue == 0 {
        return Err(TclError::new(
            "-overload needs -maxqueue: it says what happens at the queue's bound",
            &["SOCKETSERVER", "OVERLOAD"],
        ));
    }
    let number = parse_port(interp, port_word)?;
    // Before the port is opened: a worker would keep it, unserved.
    if worker::is_worker() {
        return Err(not_here());
    }
    hooks::check_thread()?;
    if config.signals {
        hooks::check_pool_signals()?;
    }
    // Bound before the port opens: a taken address leaves nothing open.
    config.metrics = metrics.as_deref().map(super::metrics::bind).transpose()?;
    // Prepared beside its path before the port opens (a directory it
    // cannot be written in is an error that opens nothing), renamed over
    // the path only once the pool serves with its signal handlers: a
    // create that fails leaves a running service's file alone.
    let mut pidfile = match pidfile.as_deref() {
        Some(path) => Some(super::pidfile::prepare(super::pidfile::absolute(path)?)?),
        None => None,
    };
    let mut unwrite = || pidfile.take().into_iter().for_each(super::pidfile::abandon);
    // The bound holds from the moment the port accepts (a socket passed by
    // systemd may have a backlog already), not only once the workers are
    // forked: the new port's threads are held until it is set. A create
    // that fails puts the port's previous bound back.
    let hold = !crate::accept_loop::accepting_held();
    if hold {
        crate::accept_loop::hold_accepting();
    }
    let opened = open_port(interp, number, &server);
    let queue =
        opened.as_ref().ok().and_then(|&port| port_table::table().get(port).map(|open| Arc::clone(&open.counters)));
    let previous = queue.as_ref().map(|counters| counters.queue.bound());
    if let Some(counters) = &queue {
        counters.queue.set_bound(max_queue, overload.unwrap_or(Overload::Pause));
    }
    // A next generation that has not said ready stays held (opening the
    // port read that from the environment): it releases itself when ready.
    if hold && !crate::inherited::ready_pending() {
        crate::accept_loop::release_accepting();
    }
    let port = opened.inspect_err(|_| unwrite())?;
    if let Err(error) = supervisor::create(interp, state, port, config) {
        if let (Some(counters), Some((max_queue, overload))) = (&queue, previous) {
            counters.queue.set_bound(max_queue, overload);
        }
        unwrite();
        return Err(error);
    }
    if let Some(prepared) = pidfile.take() {
        if let Err(error) = super::pidfile::commit(prepared) {
            supervisor::stop(port);
            return Err(error);
        }
    }
    Ok(Obj::new_int(port.into()))
}

/// `-rlimit {name value ...}`: each value a non-negative integer or `unlimited`.
fn rlimits(interp: Interp, value: &Obj) -> TclResult<Vec<(&'static str, u64)>> {
    let words = value.list_elements(interp)?;
    if words.len() % 2 != 0 {
        return Err(TclError::new(
            format!("missing value for limit \"{}\"", words.last().map(Obj::to_string_lossy).unwrap_or_default()),
            &["TCL", "VALUE", "RLIMIT"],
        ));
    }
    let mut limits = Vec::new();
    for pair in words.chunks(2) {
        let name = LIMIT_NAMES[interp.get_index(&pair[0], &LIMITS, c"limit")?];
        let amount = if pair[1].to_string_lossy() == "unlimited" {
            privileges::UNLIMITED
        } else {
            let n = pair[1].get_wide(interp)?;
            u64::try_from(n).map_err(|_| {
                TclError::new(
                    format!("expected non-negative integer or \"unlimited\" but got \"{}\"", pair[1].to_string_lossy()),
                    &["TCL", "VALUE", "NUMBER"],
                )
            })?
        };
        limits.push((name, amount));
    }
    Ok(limits)
}

fn seconds(interp: Interp, value: &Obj) -> TclResult<Duration> {
    let s = value.get_double(interp)?;
    if !(0.0..=1e9).contains(&s) {
        return Err(TclError::new(
            format!("expected non-negative number of seconds but got \"{}\"", value.to_string_lossy()),
            &["TCL", "VALUE", "NUMBER"],
        ));
    }
    Ok(Duration::from_secs_f64(s))
}

/// Seconds, 0 meaning none.
fn optional_seconds(interp: Interp, value: &Obj) -> TclResult<Option<Duration>> {
    let seconds = seconds(interp, value)?;
    Ok((!seconds.is_zero()).then_some(seconds))
}

/// The shortest `-maxlifetime` (0 is none): a worker replaced more often
/// than once a second is a fork storm, not recycling.
const MIN_LIFETIME: Duration = Duration::from_secs(1);

fn max_lifetime(interp: Interp, value: &Obj) -> TclResult<Option<Duration>> {
    let lifetime = optional_seconds(interp, value)?;
    if lifetime.is_some_and(|l| l < MIN_LIFETIME) {
        return Err(TclError::new(
            format!("-maxlifetime must be 0 (none) or at least 1 second but got \"{}\"", value.to_string_lossy()),
            &["TCL", "VALUE", "NUMBER"],
        ));
    }
    Ok(lifetime)
}

/// A size in bytes: a non-negative integer, or one followed by K, M or G
/// (powers of 1024, either case, an optional B after them): `50M`, `1G`.
fn size(value: &Obj) -> TclResult<u64> {
    let text = value.to_string_lossy();
    let trimmed = text.trim();
    let body = trimmed.strip_suffix(['b', 'B']).filter(|b| b.ends_with(|c: char| c.is_ascii_alphabetic()));
    let body = body.unwrap_or(trimmed);
    let (digits, shift) = match body.char_indices().last() {
        Some((at, 'k' | 'K')) => (&body[..at], 10),
        Some((at, 'm' | 'M')) => (&body[..at], 20),
        Some((at, 'g' | 'G')) => (&body[..at], 30),
        _ => (body, 0),
    };
    digits
        .parse::<u64>()
        .ok()
        .filter(|_| digits.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|n| n.checked_mul(1u64 << shift))
        .ok_or_else(|| {
            TclError::new(
                format!("expected size in bytes (an integer, or with K, M or G) but got \"{text}\""),
                &["TCL", "VALUE", "NUMBER"],
            )
        })
}
