//! `::socketserver::socket`: argument parsing and the four subcommands.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::accept_loop::AcceptLoop;
use crate::handoff;
use crate::listener::{self, OpenError};
use crate::counters::Counters;
use crate::port_table::{self, Port};
use crate::registration::{Handler, InterpState};
use crate::tcl::{self, Interp, NameTable, Obj, TclError, TclResult, Tcl_Obj};

static SUBCOMMANDS: NameTable<5> =
    NameTable([c"client".as_ptr(), c"close".as_ptr(), c"info".as_ptr(), c"server".as_ptr(), std::ptr::null()]);
static SERVER_OPTIONS: NameTable<4> =
    NameTable([c"-backlog".as_ptr(), c"-myaddr".as_ptr(), c"-threads".as_ptr(), std::ptr::null()]);
static CLIENT_OPTIONS: NameTable<2> = NameTable([c"-port".as_ptr(), std::ptr::null()]);

const SERVER_USAGE: &str = "?-myaddr addr? ?-backlog n? ?-threads n? port";
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
        _ => server(interp, objv, &args),
    }
}

/// `server ?-myaddr addr? ?-backlog n? port`
fn server(interp: Interp, objv: &[*mut Tcl_Obj], args: &[Obj]) -> TclResult<Obj> {
    let Some((port_word, options)) = args.split_last() else {
        return Err(interp.wrong_num_args(objv, 2, SERVER_USAGE));
    };
    let mut myaddr: Option<String> = None;
    let mut backlog = libc::SOMAXCONN;
    let mut threads = None;
    let mut rest = options;
    while let [option, tail @ ..] = rest {
        let index = interp.get_index(option, &SERVER_OPTIONS, c"option")?;
        let [value, tail @ ..] = tail else {
            return Err(interp.wrong_num_args(objv, 2, SERVER_USAGE));
        };
        match SERVER_OPTIONS.name(index) {
            "-myaddr" => myaddr = Some(value.to_string_lossy()),
            "-threads" => threads = Some(parse_threads(interp, value)?),
            _ => backlog = parse_backlog(interp, value)?,
        }
        rest = tail;
    }
    let number = parse_port(interp, port_word)?;
    Ok(Obj::new_int(open_port(myaddr.as_deref(), number, backlog, threads)?.into()))
}

/// `-backlog`: a positive integer.
pub(crate) fn parse_backlog(interp: Interp, value: &Obj) -> TclResult<i32> {
    let backlog = value.get_int(interp)?;
    if backlog < 1 {
        return Err(TclError::new(
            format!("expected positive integer but got \"{}\"", value.to_string_lossy()),
            &["TCL", "VALUE", "NUMBER"],
        ));
    }
    Ok(backlog)
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

/// Opens `number` (or finds it open already) and starts accepting on it
/// with `threads` threads per listener (default: from the CPUs); returns
/// the port number, which `0` leaves to the system.
pub(crate) fn open_port(myaddr: Option<&str>, number: u16, backlog: i32, threads: Option<usize>) -> TclResult<u16> {
    if number != 0 && port_table::table().get(number).is_some() {
        return Ok(number);
    }
    let listeners = listener::open(myaddr, number, backlog).map_err(open_error)?;
    let (accept_end, worker_end) =
        handoff::new_queue().map_err(|e| TclError::posix("couldn't open socket", e as i32))?;
    let counters = Arc::new(Counters::default());
    let port = Port {
        number: listeners.port,
        worker_end: Arc::new(worker_end),
        addresses: listeners.addresses,
        backlog: listeners.backlog,
        counters: Arc::clone(&counters),
        accept_loop: Some(
            AcceptLoop::start(
                listeners.sockets,
                accept_end,
                counters,
                threads.unwrap_or_else(crate::accept_loop::default_threads),
            )
                .map_err(|e| TclError::posix("couldn't open socket", e.raw_os_error().unwrap_or(0)))?,
        ),
    };
    let number = port.number;
    port_table::table().insert(port);
    Ok(number)
}

fn open_error(error: OpenError) -> TclError {
    match error {
        OpenError::Os(errno) => TclError::posix("couldn't open socket", errno as i32),
        // Tcl reports a name that does not resolve as an unreachable host.
        OpenError::Resolve(reason) => {
            let (message, name) = tcl::posix_error_words(libc::EHOSTUNREACH);
            TclError::new(
                format!("couldn't open socket: {message} ({reason})"),
                &["POSIX", &name, &message],
            )
        }
    }
}

/// `client ?-port port? handler`
fn client(state: &InterpState, interp: Interp, objv: &[*mut Tcl_Obj], args: &[Obj]) -> TclResult<Obj> {
    let (port, handler) = match args {
        [handler] => (None, handler),
        [option, port, handler] => {
            interp.get_index(option, &CLIENT_OPTIONS, c"option")?;
            (Some(parse_port(interp, port)?), handler)
        }
        _ => return Err(interp.wrong_num_args(objv, 2, CLIENT_USAGE)),
    };
    let words = handler.list_elements(interp)?;
    let command = words.first().map(Obj::to_string_lossy).unwrap_or_default();
    if words.is_empty() || !interp.command_exists_globally(&command) {
        return Err(TclError::new(
            format!("invalid command name \"{command}\""),
            &["TCL", "LOOKUP", "COMMAND", &command],
        ));
    }
    let (number, queue, counters) = {
        let table = port_table::table();
        let number = match port.or_else(|| table.default_port()) {
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
    state.register(number, Handler::Script(words), queue, counters)?;
    Ok(Obj::new_string(""))
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
