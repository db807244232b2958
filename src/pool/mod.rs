//! The pool: `::socketserver::pool`, a supervisor that forks, watches and
//! replaces worker processes, so that a script writes only the handler.
//!
//! `model` holds the pool's decisions with no I/O: `Model::step` takes
//! an event (a fork done, a slot read, an exit, a hang answer, a command,
//! a tick) with the time and returns actions (fork, retire, kill, ask
//! for a stack, mark due, authorise, count, log); a simulation drives it.
//! `lifecycle` is the shell around it: each turn it tells the model what
//! it observed (exits, slots, the queue, answers) and the tick, and
//! performs the actions (`spawn` forks, the leave pipe, SIGKILL, the
//! slot's marks, counters, log entries); `supervisor` runs the turns from
//! the loop's events (commands, signals, the tick) and turns commands and
//! signals into the model's events. `state` is the pool's data (`Supervisor`,
//! `Pool` with its `Model`, `Child`: a process, its slot, its leave pipe,
//! log entries) as plain fields: the observers (`report`, the log and
//! `pool info`; `metrics`, Prometheus; `notify`, systemd) read it there,
//! never through `lifecycle` or `supervisor`; what a worker shares of
//! recycling and of a hang report (`recycling`, `hang_report`) lies below
//! the data; `hang_watch` asks a hung worker for its stack and says when
//! the question is settled. `generation` starts the next generation
//! (`pool upgrade`); `command` parses the Tcl command. Below them, leaf
//! rooms that know nothing of a pool: `scoreboard` (the memory workers
//! share), `shared_memory`, `signals` (signals as events of Tcl's loop),
//! `wake`, `pidfile`, `stderr_log` (the default log, never blocking),
//! `privileges` (what a worker gives up), `supervisor_thread` (which
//! thread runs the pools), `after_fork` (what each process keeps after a
//! fork). `worker` is what a forked worker runs; `hooks` is `pool signal`;
//! `signal_watch` notices a pool's signal taken over by the script;
//! `sizing` parses `-workers`.
//!
//! Floors, bottom first: a room names through `super::` only rooms on a
//! lower floor, so dependencies point one way and there is no circle
//! (`scripts/check-pool-layers`, run by `make lint`, reads this list; a
//! room missing from it fails the check). An edge that must point up for
//! a while is written `//! - up: a -> b`, with why: there is none.
//! The check reads paths, not method calls: `Pool` and `Supervisor` are
//! still given methods by several rooms; one is called from below:
//! `generation` calls `supervisor`'s `stop` (a stop closes the port and
//! runs a turn) once the next generation serves.
//!
//! 1. model, wake, shared_memory, pidfile, stderr_log, privileges, scoreboard, supervisor_thread, metrics
//! 2. signals
//! 3. after_fork, hang_report, recycling
//! 4. config
//! 5. state
//! 6. signal_watch
//! 7. report, notify
//! 8. supervisor_access
//! 9. metrics_exposition, sizing, hang_watch, hooks, generation
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
mod lifecycle;
mod metrics;
mod metrics_exposition;
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
mod supervisor_access;
mod supervisor_thread;
mod wake;
mod worker;

pub use after_fork::watch_forks;
pub use command::dispatch;
pub use generation::remember_starting_directory;
pub use pidfile::commit_deferred as commit_deferred_pid_files;
pub use supervisor::{all_ready, interp_deleted};
