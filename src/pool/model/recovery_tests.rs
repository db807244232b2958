//! The model's recovery from what goes wrong beside recycling, reloads,
//! sizing and stops: each test reproduces a pool that froze, served the
//! wrong generation or said something untrue before its fix.

use std::time::{Duration, Instant};

use super::events::{Action, Event, ExitStatus, Note, SlotView, WorkerId};
use super::pool::{Model, Settings};
use super::sizing::{Load, Sizing};
use super::Observed;

fn model(min: usize, max: usize) -> Model {
    let settings = Settings { graceful: Duration::from_secs(10), init_timeout: None, timeout: None, concurrency: 1 };
    let mut sizing = Sizing::fixed(min);
    sizing.max = max;
    Model::new(settings, sizing, min)
}

fn forks(actions: &[Action]) -> Vec<(WorkerId, u32)> {
    actions
        .iter()
        .filter_map(|a| if let Action::Fork { worker, generation } = a { Some((*worker, *generation)) } else { None })
        .collect()
}

const IDLE: SlotView = SlotView { state: Observed::Idle, ..SlotView::STARTING };

fn killed() -> ExitStatus {
    ExitStatus { clean: false, signaled: true, text: "signal SIGKILL".into(), failure: String::new() }
}

fn init_failed() -> ExitStatus {
    ExitStatus { clean: false, signaled: false, text: "exit 1".into(), failure: "init: no database".into() }
}

fn at(start: Instant, ms: u64) -> Instant {
    start + Duration::from_millis(ms)
}

/// A worker due for recycling whose replacement is starting is killed
/// -9: one failure. The replacement, forked before it, becomes ready:
/// that ends the run, and recycling and sizing go on (before: the run
/// never ended, the other due worker was never recycled).
#[test]
fn a_replacement_forked_before_a_failure_ends_it_once_ready() {
    let start = Instant::now();
    let mut pool = model(2, 2);
    let first = forks(&pool.step(Event::Tick, start));
    assert_eq!(first.len(), 2);
    let due = at(start, 3000);
    for &(id, _) in &first {
        pool.step(Event::Forked { worker: id, recycle_at: Some(due) }, start);
        pool.step(Event::Slot { worker: id, slot: IDLE }, at(start, 1500));
    }
    pool.step(Event::Tick, at(start, 1500));
    // Both due: one turn, one replacement.
    let replacements = forks(&pool.step(Event::Tick, at(start, 3100)));
    assert_eq!(replacements.len(), 1, "one turn at a time");
    let replacement = replacements[0].0;
    pool.step(Event::Forked { worker: replacement, recycle_at: Some(at(start, 6100)) }, at(start, 3100));
    let holder = pool.workers.iter().find(|w| w.turn.is_some()).map(|w| w.id).expect("a turn holder");
    pool.step(Event::Exited { worker: holder, slot: IDLE, status: killed() }, at(start, 3200));
    assert_eq!(pool.failures.failures, 1);
    pool.step(Event::Slot { worker: replacement, slot: IDLE }, at(start, 4600));
    let mut next = forks(&pool.step(Event::Tick, at(start, 4600)));
    assert!(pool.failures.healthy(), "a replacement ready after the failure ends the run");
    // The other due worker gets its turn: its replacement is forked.
    for ms in (4700..6000).step_by(100) {
        next.extend(forks(&pool.step(Event::Tick, at(start, ms))));
    }
    assert_eq!(next.len(), 1, "recycling goes on: {next:?}");
}

/// A reload whose first new worker is ready and whose others fail is
/// abandoned: the old generation serves on and is restored to the
/// target, the abandoned one is forked no more and its ready worker
/// leaves (before: the abandoned generation served on, forked for good).
#[test]
fn an_abandoned_reload_restores_the_old_generation() {
    let start = Instant::now();
    let mut pool = model(2, 2);
    for (id, _) in forks(&pool.step(Event::Tick, start)) {
        pool.step(Event::Forked { worker: id, recycle_at: None }, start);
        pool.step(Event::Slot { worker: id, slot: IDLE }, start);
    }
    pool.step(Event::Tick, at(start, 100));
    pool.step(Event::Reload, at(start, 200));
    assert_eq!(pool.generation, 2);
    let mut ms = 200;
    let mut first_new = None;
    let mut failed_log = false;
    let mut forked_after = Vec::new();
    for _ in 0..400 {
        ms += 100;
        let now = at(start, ms);
        let out = pool.step(Event::Tick, now);
        failed_log |= out.iter().any(|a| matches!(a, Action::Log(Note::ReloadFailed { .. })));
        for (id, generation) in forks(&out) {
            pool.step(Event::Forked { worker: id, recycle_at: None }, now);
            if failed_log {
                forked_after.push(generation);
            }
            if generation == 2 && first_new.is_none() {
                first_new = Some(id);
                pool.step(Event::Slot { worker: id, slot: IDLE }, now);
            } else if generation == 2 {
                pool.step(Event::Exited { worker: id, slot: SlotView::STARTING, status: init_failed() }, now);
            } else {
                pool.step(Event::Slot { worker: id, slot: IDLE }, now);
            }
        }
        for id in pool.workers.iter().filter(|w| w.retired.is_some()).map(|w| w.id).collect::<Vec<_>>() {
            let slot = SlotView { state: Observed::Stopping, ..IDLE };
            let clean = ExitStatus { clean: true, signaled: false, text: "exit 0".into(), failure: String::new() };
            pool.step(Event::Exited { worker: id, slot, status: clean }, now);
        }
    }
    assert!(failed_log, "the reload is abandoned");
    assert_eq!(pool.generation, 1, "the old generation serves on");
    assert!(forked_after.iter().all(|&g| g == 1), "only the old generation is forked after: {forked_after:?}");
    assert_eq!(pool.ready_count(), 2, "restored to the target");
    assert!(pool.workers.iter().all(|w| w.generation == 1), "the abandoned generation left");
}

/// More than `-maxspare` idle, then one of them recycled: its
/// replacement starts, one fewer is idle a moment. The wait for a shrink
/// goes on (before: it restarted, and a pool that recycles every few
/// connections never shrank).
#[test]
fn a_replacement_starting_does_not_restart_the_idle_wait() {
    let start = Instant::now();
    let mut sizing = Sizing::fixed(2);
    sizing.max = 6;
    sizing.max_spare = 2;
    sizing.idle_timeout = Duration::from_secs(2);
    let mut target = 4;
    let idle = |idle, starting| Load { idle, busy: 1, starting, queued: 0 };
    assert_eq!(sizing.decide(start, &mut target, true, idle(3, 0)), None);
    assert_eq!(sizing.decide(at(start, 1000), &mut target, true, idle(2, 1)), None);
    let change = sizing.decide(at(start, 2100), &mut target, true, idle(3, 0));
    assert!(change.is_some_and(|c| !c.grow), "shrinks 2 s after the surplus began");
    assert_eq!(target, 3);
}

/// During a stop, a resize and SIGTTIN/SIGTTOU change nothing and log
/// nothing; a reload starts nothing (before: the target moved and
/// `resize` was logged though nothing would be forked).
#[test]
fn a_stopping_pool_keeps_its_range() {
    let start = Instant::now();
    let mut pool = model(3, 3);
    for (id, _) in forks(&pool.step(Event::Tick, start)) {
        pool.step(Event::Forked { worker: id, recycle_at: None }, start);
    }
    pool.step(Event::Stop { at_once: false }, start);
    assert!(pool.step(Event::Shift { up: true }, start).is_empty());
    assert!(pool.step(Event::Resize { min: 6, max: 6 }, start).is_empty());
    assert!(pool.step(Event::Reload, start).is_empty());
    assert_eq!((pool.target, pool.sizing.min, pool.sizing.max, pool.generation), (3, 3, 3, 1));
}
