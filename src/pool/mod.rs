//! The pool: `::socketserver::pool`, a supervisor that forks, watches and
//! replaces worker processes, so that a script writes only the handler.
//!
//! `model` holds the pool's decisions with no I/O (back-off, recycling
//! turns, sizing, what an exit counts as, busy time), tested by a
//! simulation. `state` is the pool's data (`Supervisor`, `Pool`, `Child`,
//! log entries) as plain fields: the observers (`report`, the log and
//! `pool info`; `metrics`, Prometheus; `notify`, systemd) and the policy
//! rooms (`sizing`, `recycling_turns`, `init_timeout`, `hang_watch`) read
//! and change it there, never through `lifecycle` or `supervisor`; what
//! a worker shares of recycling and of a hang report (`recycling`,
//! `hang_report`) lies below the data. `lifecycle`
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
//! lower floor, so dependencies point one way and there is no circle
//! (`scripts/check-pool-layers`, run by `make lint`, reads this list; a
//! room missing from it fails the check). An edge that must point up for
//! a while is written `//! - up: a -> b`, with why: there is none.
//! The check reads paths, not method calls: `Pool` and `Supervisor` are
//! still given methods by several rooms, and a few are called from below
//! (`recycling_turns` and `sizing` call `lifecycle`'s `retire`,
//! `ready_count` and `serving`; `report` calls the policies' `*_info`;
//! `generation` calls `supervisor`'s `stop` and `pool_sizes`): turning
//! those into arguments and returned decisions is what is left.
//!
//! 1. model, wake, shared_memory, pidfile, stderr_log, privileges, scoreboard, supervisor_thread, metrics
//! 2. signals
//! 3. after_fork, hang_report, recycling
//! 4. config
//! 5. state
//! 6. signal_watch
//! 7. report, notify
//! 8. supervisor_access
//! 9. metrics_exposition, sizing, init_timeout, hang_watch, recycling_turns, hooks, generation
//! 10. worker
//! 11. lifecycle
//! 12. supervisor
//! 13. command

mod after_fork;
mod command;
mod config;
mod generation;
mod hang_report;
mod hang_watch;
mod hooks;
mod init_timeout;
mod lifecycle;
mod metrics;
mod metrics_exposition;
mod model;
mod notify;
mod pidfile;
mod privileges;
mod recycling;
mod recycling_turns;
mod report;
mod scoreboard;
mod shared_memory;
mod signal_watch;
mod signals;
mod sizing;
mod state;
mod stderr_log;
mod supervisor;
mod supervisor_access;
mod supervisor_thread;
mod wake;
mod worker;

pub use after_fork::watch_forks;
pub use command::dispatch;
pub use generation::remember_starting_directory;
pub use pidfile::commit_deferred as commit_deferred_pid_files;
pub use supervisor::{all_ready, interp_deleted};
