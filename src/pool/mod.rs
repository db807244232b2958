//! The pool: `::socketserver::pool`, a supervisor that forks, watches and
//! replaces worker processes, so that a script writes only the handler.
//!
//! `command` parses the Tcl command; `supervisor` runs in the accepting
//! process; `worker` is what a forked worker runs; `scoreboard` is the
//! memory they share; `signals` turns signals into events of Tcl's loop.

mod command;
mod scoreboard;
mod signals;
mod supervisor;
mod worker;

pub use command::dispatch;
pub use supervisor::{all_ready, interp_deleted};
