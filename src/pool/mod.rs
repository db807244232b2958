//! The pool: `::socketserver::pool`, a supervisor that forks, watches and
//! replaces worker processes, so that a script writes only the handler.
//!
//! `model` holds the pool's decisions with no I/O (back-off, recycling
//! turns, sizing, what an exit counts as, busy time), tested by a
//! simulation. `state` is the pool's data (`Supervisor`, `Pool`, `Child`,
//! log entries) as plain fields: the observers (`report`, the log and
//! `pool info`; `metrics`, Prometheus; `notify`, systemd) and the policy
//! rooms (`sizing`, `recycling`, `init_timeout`, `hang_report`) read and
//! change it there, never through `lifecycle` or `supervisor`. `lifecycle`
//! starts, reaps, retires and kills workers; `supervisor` runs the tick
//! and decides what should run; `generation` starts the next generation
//! (`pool upgrade`); `command` parses the Tcl command. Below them, leaf
//! rooms that know nothing of a pool: `scoreboard` (the memory workers
//! share), `shared_memory`, `signals` (signals as events of Tcl's loop),
//! `wake`, `pidfile`, `stderr_log` (the default log, never blocking),
//! `privileges` (what a worker gives up), `supervisor_thread` (which
//! thread runs the pools), `after_fork` (what each process keeps after a
//! fork). `worker` is what a forked worker runs; `hooks` is `pool signal`;
//! `signal_watch` notices a pool's signal taken over by the script.
//!
//! Floors, bottom first: a room names through `super::` only rooms on a
//! lower floor (`scripts/check-pool-layers`, run by `make lint`, reads
//! this list). The edges marked `up` still point up and are the ones left
//! to turn: no other may be added.
//!
//! 1. model, wake, shared_memory, pidfile, stderr_log, privileges, scoreboard, supervisor_thread
//! 2. signals
//! 3. after_fork
//! 4. config
//! 5. state
//! 6. signal_watch
//! 7. report, notify
//! 8. metrics, sizing, init_timeout, hang_report, recycling
//! 9. worker
//! 10. hooks
//! 11. lifecycle
//! 12. generation
//! 13. supervisor
//! 14. command
//!
//! - up: config -> metrics (the bound `-metrics` socket)
//! - up: state -> metrics (a pool's endpoint)
//! - up: state -> hang_report (the cells a hung worker answers in)
//! - up: state -> recycling (a pool's recycled counts)
//! - up: metrics -> supervisor (a scrape finds its pool)
//! - up: worker -> hooks (the signals a worker runs hooks for)
//! - up: hooks -> supervisor (`pool signal` holds the pools' signals)
//! - up: generation -> supervisor (an upgrade's outcome reaches the pools)

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
mod state;
mod stderr_log;
mod supervisor;
mod supervisor_thread;
mod wake;
mod worker;

pub use after_fork::watch_forks;
pub use command::dispatch;
pub use generation::remember_starting_directory;
pub use supervisor::{all_ready, interp_deleted};
