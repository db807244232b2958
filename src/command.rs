//! `::socketserver::socket`: argument parsing and the four subcommands.

use std::os::fd::RawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::accept_loop::AcceptLoop;
use crate::counters::Counters;
use crate::handoff;
use crate::inherited;
use crate::listener::{self, OpenError};
use crate::port_table::{self, Port};
use crate::proxy_protocol;
use crate::registration::{Handler, InterpState, ScriptHandler};
use crate::tcl::{self, Interp, NameTable, Obj, TclError, TclResult, Tcl_Obj};

static SUBCOMMANDS: NameTable<6> = NameTable([
    c"client".as_ptr(),
    c"close".as_ptr(),
    c"info".as_ptr(),
    c"queue".as_ptr(),
    c"server".as_ptr(),
    std::ptr::null(),
]);
static SERVER_OPTIONS: NameTable<9> = NameTable([
    c"-backlog".as_ptr(),
    c"-fd".as_ptr(),
    c"-myaddr".as_ptr(),
    c"-proxy".as_ptr(),
    c"-proxyfrom".as_ptr(),
    c"-proxytimeout".as_ptr(),
    c"-systemd".as_ptr(),
    c"-threads".as_ptr(),
    std::ptr::null(),
]);
static CLIENT_OPTIONS: NameTable<2> = NameTable([c"-port".as_ptr(), std::ptr::null()]);

const SERVER_USAGE: &str = "?-option value ...? ?port?";
static PROXY_MODES: NameTable<4> = NameTable([c"any".as_ptr(), c"v1".as_ptr(), c"v2".as_ptr(), std::ptr::null()]);
/// How long a worker waits for a PROXY protocol header by default.
const DEFAULT_PROXY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);
/// At most this many accepting threads per listener.
pub(crate) const MAX_ACCEPT_THREADS: i32 = 64;
const CLIENT_USAGE: &str = "?-port port? handler";

/// Runs one call of `::socketserver::socket`.
pub fn dispatch(state: &InterpState, interp: Interp, objv: &[*mut Tcl_Obj]) -> TclResult<Obj> {
    if objv.len() < 2 {
        return Err(interp.wrong_num_args(objv, 1, "option ?arg ...?"));
    }
    state.reset_if_forked();
    let word = |i: usize| {
        // SAFETY: Tcl passes objc live objects in objv.
        unsafe { Obj::from_raw(objv[i]) }
    };
    let args: Vec<Obj> = (2..objv.len()).map(word).collect();
    match SUBCOMMANDS.name(interp.get_index(&word(1), &SUBCOMMANDS, c"option")?) {
        "client" => client(state, interp, objv, &args),
        "close" => match args.as_slice() {
            [port] => close(state, parse_port(interp, port)?),
            _ => Err(interp.wrong_num_args(objv, 2, "port")),
        },
        "info" => match args.as_slice() {
            [] => Ok(Obj::new_list(
                &port_table::table().numbers().into_iter().map(|n| Obj::new_int(n.into())).collect::<Vec<_>>(),
            )),
            [port] => info(state, parse_port(interp, port)?),
            _ => Err(interp.wrong_num_args(objv, 2, "?port?")),
        },
        "queue" => match args.as_slice() {
            [channel] => crate::queue_time::query(interp, channel),
            _ => Err(interp.wrong_num_args(objv, 2, "channel")),
        },
        _ => server(state, interp, objv, &args),
    }
}

/// The options `server` and `pool create` share: where the listeners come
/// from and how they are served.
#[derive(Default)]
pub(crate) struct ServerOptions {
    pub myaddr: Option<String>,
    pub backlog: Option<i32>,
    pub threads: Option<usize>,
    /// Listening sockets to adopt instead of opening one (`-fd`).
    pub fds: Vec<RawFd>,
    /// Names (a `string match` pattern) of sockets systemd passed (`-systemd`).
    pub systemd: Option<String>,
    /// Every connection starts with a PROXY protocol header (`-proxy`).
    pub proxy: Option<proxy_protocol::Mode>,
    pub proxy_timeout: Option<std::time::Duration>,
    /// The networks PROXY headers are believed from (`-proxyfrom`).
    pub proxy_from: Option<Arc<crate::proxy_trust::TrustedProxies>>,
}

impl ServerOptions {
    /// Takes option `name` with `value`; false when it is not one of these.
    pub fn take(&mut self, interp: Interp, name: &str, value: &Obj) -> TclResult<bool> {
        match name {
            "-myaddr" => self.myaddr = Some(value.to_string_lossy()),
            "-backlog" => self.backlog = Some(positive(interp, value)?),
            "-threads" => self.threads = Some(parse_threads(interp, value)?),
            "-fd" => self.fds.push(non_negative(interp, value)?),
            "-systemd" => self.systemd = Some(value.to_string_lossy()),
            "-proxy" => {
                self.proxy =
                    Some(match PROXY_MODES.name(interp.get_index(value, &PROXY_MODES, c"PROXY protocol version")?) {
                        "v1" => proxy_protocol::Mode::V1,
                        "v2" => proxy_protocol::Mode::V2,
                        _ => proxy_protocol::Mode::Any,
                    })
            }
            "-proxytimeout" => {
                let seconds = value.get_double(interp)?;
                if !(seconds > 0.0 && seconds <= 3600.0) {
                    return Err(TclError::new(
                        format!("expected positive number of seconds but got \"{}\"", value.to_string_lossy()),
                        &["TCL", "VALUE", "NUMBER"],
                    ));
                }
                self.proxy_timeout = Some(std::time::Duration::from_secs_f64(seconds));
            }
            "-proxyfrom" => {
                let words: Vec<String> = value.list_elements(interp)?.iter().map(Obj::to_string_lossy).collect();
                let trusted = crate::proxy_trust::TrustedProxies::parse(&words)
                    .map_err(|message| TclError::new(message, &["TCL", "VALUE", "NETWORK"]))?;
                self.proxy_from = Some(Arc::new(trusted));
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// Whether the listeners are inherited rather than opened.
    pub fn inherits(&self) -> bool {
        !self.fds.is_empty() || self.systemd.is_some()
    }
}

/// `server ?-myaddr addr? ?-backlog n? ?-threads n? ?-fd fd? ?-systemd name? ?port?`
/// (the port may be left out when the listeners are inherited).
fn server(state: &InterpState, interp: Interp, objv: &[*mut Tcl_Obj], args: &[Obj]) -> TclResult<Obj> {
    let (options, port_word) = match args.len() % 2 {
        1 => (&args[..args.len() - 1], args.last()),
        _ => (args, None),
    };
    let mut server = ServerOptions::default();
    for pair in options.chunks(2) {
        // A word that is no option where one is expected (`server 8080
        // extra`): too many arguments, as Tcl's `socket` and 1.1.3 say.
        if !pair[0].to_string_lossy().starts_with('-') {
            return Err(interp.wrong_num_args(objv, 2, SERVER_USAGE));
        }
        let index = interp.get_index(&pair[0], &SERVER_OPTIONS, c"option")?;
        server.take(interp, SERVER_OPTIONS.name(index), &pair[1])?;
    }
    if port_word.is_none() && !server.inherits() {
        return Err(interp.wrong_num_args(objv, 2, SERVER_USAGE));
    }
    let number = match port_word {
        Some(word) => parse_port(interp, word)?,
        None => 0,
    };
    let port = open_port(interp, number, &server)?;
    state.note_opened(port);
    // A script may open its sockets before it makes its pools: a next
    // generation says "ready" once it waits for events, if the pools it
    // has made by then are ready (or later, when they are), not here.
    if inherited::ready_pending() {
        let _ = tcl::create_timer(0, announce_ready_when_waiting, std::ptr::null_mut());
    }
    Ok(Obj::new_int(port.into()))
}

unsafe extern "C" fn announce_ready_when_waiting(_: *mut std::ffi::c_void) {
    let _ = std::panic::catch_unwind(|| inherited::announce_ready_if_done(crate::pool::all_ready()));
}

/// An integer of at least `min`, with the core's wording when it is not
/// (`expected positive integer but got "0"`).
fn integer(interp: Interp, value: &Obj, min: i32, what: &str) -> TclResult<i32> {
    let n = value.get_int(interp)?;
    if n < min {
        return Err(TclError::new(
            format!("expected {what} integer but got \"{}\"", value.to_string_lossy()),
            &["TCL", "VALUE", "NUMBER"],
        ));
    }
    Ok(n)
}

pub(crate) fn positive(interp: Interp, value: &Obj) -> TclResult<i32> {
    integer(interp, value, 1, "positive")
}

pub(crate) fn non_negative(interp: Interp, value: &Obj) -> TclResult<i32> {
    integer(interp, value, 0, "non-negative")
}

/// `-threads`: accepting threads per listener, 1 to `MAX_ACCEPT_THREADS`.
pub(crate) fn parse_threads(interp: Interp, value: &Obj) -> TclResult<usize> {
    let threads = value.get_int(interp)?;
    if !(1..=MAX_ACCEPT_THREADS).contains(&threads) {
        return Err(TclError::new(
            format!("bad thread count \"{}\": must be 1 to {MAX_ACCEPT_THREADS}", value.to_string_lossy()),
            &["TCL", "VALUE", "NUMBER"],
        ));
    }
    Ok(threads as usize)
}

/// Opens `number` (or finds it open already), or adopts the inherited
/// listeners, and starts accepting; returns the port number (`0` leaves it
/// to the system, or to the inherited sockets).
pub(crate) fn open_port(interp: Interp, number: u16, options: &ServerOptions) -> TclResult<u16> {
    if options.proxy_from.is_some() && options.proxy.is_none() {
        return Err(TclError::new(
            "-proxyfrom needs -proxy: it names who may send a PROXY protocol header",
            &["SOCKETSERVER", "PROXYFROM"],
        ));
    }
    if number != 0 && port_table::table().get(number).is_some() {
        if options.inherits() {
            return Err(TclError::new(
                format!("port {number} is open already in this process"),
                &["SOCKETSERVER", "PORT_OPEN", &number.to_string()],
            ));
        }
        return Ok(number);
    }
    // A previous generation (or systemd) may have passed a socket that
    // listens on this port already.
    let passed = if number != 0 && !options.inherits() {
        inherited::descriptors_for_port(number, &mut |name| unset_env(interp, name))
    } else {
        Vec::new()
    };
    let listeners = if options.inherits() {
        adopt_listeners(interp, number, options)?
    } else if !passed.is_empty() {
        let listeners = inherited::adopt(&passed, number).map_err(adopt_error)?;
        inherited::mark_taken(&passed);
        listeners
    } else {
        listener::open(options.myaddr.as_deref(), number, options.backlog.unwrap_or(libc::SOMAXCONN))
            .map_err(open_error)?
    };
    let (accept_end, worker_end) =
        handoff::new_queue().map_err(|e| TclError::posix("couldn't open socket", e as i32))?;
    let counters = Arc::new(Counters::default());
    let threads = options.threads.unwrap_or_else(crate::accept_loop::default_threads);
    let accept_loop = AcceptLoop::start(listeners.sockets, accept_end, Arc::clone(&counters), threads)
        .map_err(|e| TclError::posix("couldn't open socket", e.raw_os_error().unwrap_or(0)))?;
    let port = Port {
        number: listeners.port,
        worker_end: Arc::new(worker_end),
        addresses: listeners.addresses,
        backlog: listeners.backlog,
        counters,
        proxy: options.proxy.map(|mode| crate::proxy_header::Setting {
            mode,
            deadline: options.proxy_timeout.unwrap_or(DEFAULT_PROXY_TIMEOUT),
            trusted: options.proxy_from.clone(),
        }),
        accept_loop: Some(accept_loop),
    };
    let number = port.number;
    port_table::table().insert(port);
    Ok(number)
}

/// Removes an environment variable, from Tcl's `env` array and from the
/// environment of the programs this process execs.
fn unset_env(interp: Interp, name: &str) {
    let script = Obj::new_list(&[
        Obj::new_string("unset"),
        Obj::new_string("-nocomplain"),
        Obj::new_string(&format!("::env({name})")),
    ]);
    let _ = interp.eval_global(&script);
}

fn adopt_error(error: inherited::AdoptError) -> TclError {
    match error {
        // Worded as Tcl words a failed system call.
        inherited::AdoptError::Os { fd, errno } => {
            TclError::posix(&format!("couldn't adopt descriptor {fd}"), errno as i32)
        }
        other => TclError::new(other.to_string(), &["SOCKETSERVER", "ADOPT"]),
    }
}

/// The listeners of `-fd` and `-systemd`, checked and adopted.
fn adopt_listeners(interp: Interp, number: u16, options: &ServerOptions) -> TclResult<listener::Listeners> {
    if options.myaddr.is_some() {
        return Err(TclError::new(
            "-myaddr cannot be combined with -fd or -systemd: the sockets are bound already",
            &["SOCKETSERVER", "ADOPT"],
        ));
    }
    let mut fds = options.fds.clone();
    let mut from_systemd = Vec::new();
    if let Some(pattern) = &options.systemd {
        // The Tcl `env` array forgets the variables too, and so do the
        // programs this process execs.
        let mut unset = |name: &str| unset_env(interp, name);
        from_systemd = inherited::systemd_descriptors(pattern, &tcl::string_match, &mut unset).map_err(adopt_error)?;
        fds.extend(&from_systemd);
    }
    fds.sort_unstable();
    fds.dedup();
    let mut listeners = inherited::adopt(&fds, number).map_err(adopt_error)?;
    inherited::mark_taken(&from_systemd);
    if let Some(backlog) = options.backlog {
        for socket in &listeners.sockets {
            // listen() again on a listening socket sets its backlog.
            let _ = nix::sys::socket::listen(
                socket,
                nix::sys::socket::Backlog::new(backlog).unwrap_or(nix::sys::socket::Backlog::MAXCONN),
            );
        }
        listeners.backlog = backlog.min(libc::SOMAXCONN);
    }
    Ok(listeners)
}

fn open_error(error: OpenError) -> TclError {
    match error {
        OpenError::Os(errno) => TclError::posix("couldn't open socket", errno as i32),
        // Tcl reports a name that does not resolve as an unreachable host.
        OpenError::Resolve(reason) => {
            let (message, name) = tcl::posix_error_words(libc::EHOSTUNREACH);
            TclError::new(format!("couldn't open socket: {message} ({reason})"), &["POSIX", &name, &message])
        }
    }
}

/// `client ?-port port? handler`
fn client(state: &InterpState, interp: Interp, objv: &[*mut Tcl_Obj], args: &[Obj]) -> TclResult<Obj> {
    let (port, handler) = match args {
        [handler] => (None, handler),
        [option, port, handler] => {
            interp.get_index(option, &CLIENT_OPTIONS, c"option")?;
            // `-port 0` is the default port, as in 1.1.3.
            (Some(parse_port(interp, port)?).filter(|&number| number != 0), handler)
        }
        _ => return Err(interp.wrong_num_args(objv, 2, CLIENT_USAGE)),
    };
    let (number, queue, counters) = {
        let table = port_table::table();
        let number = match port.or_else(|| state.default_port(&table)) {
            Some(number) => number,
            None => {
                return Err(TclError::new(
                    "no port to wait on: call \"::socketserver::socket server\" first",
                    &["SOCKETSERVER", "NO_PORT"],
                ))
            }
        };
        let entry = table.get(number).ok_or_else(|| unknown_port(number))?;
        (number, Arc::clone(&entry.worker_end), Arc::clone(&entry.counters))
    };
    state.register(number, Handler::Script(ScriptHandler::new(interp, handler.clone())), queue, counters)?;
    Ok(Obj::new_string(""))
}

/// A command prefix's words, checked as Tcl checks a command: its first
/// word must name a command, found from the global namespace (a pool's
/// `-handler`; `client` checks nothing before a connection comes).
pub(crate) fn command_prefix(interp: Interp, prefix: &Obj) -> TclResult<Vec<Obj>> {
    let words = prefix.list_elements(interp)?;
    let command = words.first().map(Obj::to_string_lossy).unwrap_or_default();
    if words.is_empty() || !interp.command_exists_globally(&command) {
        return Err(TclError::new(
            format!("invalid command name \"{command}\""),
            &["TCL", "LOOKUP", "COMMAND", &command],
        ));
    }
    Ok(words)
}

/// `close port`
fn close(state: &InterpState, number: u16) -> TclResult<Obj> {
    let removed = {
        let mut table = port_table::table();
        let entry = table.get(number).ok_or_else(|| unknown_port(number))?;
        if entry.accept_loop.is_some() {
            table.remove(number)
        } else {
            None
        }
    };
    state.cancel(number, removed.is_some());
    // Stopping the accept loop joins its thread: do it outside the table lock.
    drop(removed);
    handoff::forget_closed_turns();
    Ok(Obj::new_string(""))
}

/// `info port`
fn info(state: &InterpState, number: u16) -> TclResult<Obj> {
    let table = port_table::table();
    let port = table.get(number).ok_or_else(|| unknown_port(number))?;
    let mut sockname = Vec::new();
    for address in &port.addresses {
        let host = listener::host_string(address.ip());
        sockname.push(Obj::new_string(&host));
        sockname.push(Obj::new_string(&host));
        sockname.push(Obj::new_int(address.port().into()));
    }
    let count = |n: &std::sync::atomic::AtomicU64| Obj::new_int(n.load(Ordering::Relaxed) as i64);
    let pairs = [
        ("port", Obj::new_int(number.into())),
        ("sockname", Obj::new_list(&sockname)),
        ("listening", Obj::new_int(port.accept_loop.is_some().into())),
        ("backlog", Obj::new_int(port.backlog.into())),
        ("threads", Obj::new_int(port.accept_loop.as_ref().map_or(0, |l| l.threads()) as i64)),
        ("accepted", count(&port.counters.accepted)),
        ("received", count(&port.counters.received)),
        ("queued", Obj::new_int(port.counters.queue.depth() as i64)),
        ("abandoned", Obj::new_int(port.counters.queue.snapshot().abandoned as i64)),
        ("proxy", Obj::new_string(port.proxy.as_ref().map_or("none", |p| p.mode.name()))),
        ("proxyerrors", count(&port.counters.proxy_errors)),
        ("proxyuntrusted", count(&port.counters.proxy_untrusted)),
        ("waiting", Obj::new_int(state.is_waiting(number).into())),
    ];
    let mut dict = Vec::new();
    for (key, value) in pairs {
        dict.push(Obj::new_string(key));
        dict.push(value);
    }
    Ok(Obj::new_list(&dict))
}

pub(crate) fn parse_port(interp: Interp, word: &Obj) -> TclResult<u16> {
    let value = word.get_int(interp)?;
    u16::try_from(value).map_err(|_| {
        TclError::new(
            format!("port \"{}\" is out of range: must be 0 to 65535", word.to_string_lossy()),
            &["TCL", "VALUE", "PORT"],
        )
    })
}

fn unknown_port(number: u16) -> TclError {
    TclError::new(
        format!("port {number} is not open in this process"),
        &["SOCKETSERVER", "UNKNOWN_PORT", &number.to_string()],
    )
}
