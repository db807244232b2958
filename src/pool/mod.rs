//! The pool: `::socketserver::pool`, a supervisor that forks, watches and
//! replaces worker processes, so that a script writes only the handler.
//!
//! `command` parses the Tcl command; `supervisor` runs in the accepting
//! process and decides what should run, `lifecycle` starts, reaps, retires
//! and kills workers, `generation` starts the next generation of the
//! process (`pool upgrade`), `report` is the log and `pool info`; `worker`
//! is what a forked worker runs, `privileges` what it gives up first (its
//! user, group and resource limits); `scoreboard` is the
//! memory they share; `signals` turns signals into events of Tcl's loop;
//! `after_fork` says what each process keeps of the supervisor's after a
//! fork, and makes every fork of the process enforce it. `metrics` serves
//! the pool's figures to Prometheus, `notify` tells systemd where it stands.
//! `stderr_log` writes the default log without ever blocking the
//! supervisor, `pidfile` is `-pidfile`, and `signal_watch` notices a pool's
//! signal taken over by the script.
//! `recycling` (memory, age, connections; one worker leaving at a time),
//! `init_timeout` and `hang_report` (what a worker past its busy timeout
//! was doing) are rooms of `lifecycle`; `config` is what a pool is made
//! with. `model` holds the pool's decisions with no I/O (back-off,
//! recycling turns, sizing, what an exit counts as, busy time), tested by
//! a simulation; it imports nothing above it, and the rooms above are the
//! shell that observes, asks it, and acts.

mod after_fork;
mod command;
mod config;
mod generation;
mod hang_report;
mod hooks;
mod init_timeout;
mod lifecycle;
mod metrics;
mod model;
mod notify;
mod pidfile;
mod privileges;
mod recycling;
mod report;
mod scoreboard;
mod shared_memory;
mod signal_watch;
mod signals;
mod sizing;
mod stderr_log;
mod supervisor;
mod wake;
mod worker;

pub use after_fork::watch_forks;
pub use command::dispatch;
pub use generation::remember_starting_directory;
pub use pidfile::commit_deferred as commit_deferred_pid_files;
pub use supervisor::{all_ready, interp_deleted};
