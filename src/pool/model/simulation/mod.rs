//! The pool's policies driven through seeded random sequences of events
//! on a simulated clock, with simulated workers that hang, die, fail or
//! time out in `-init`, hold a connection for hours, grow in memory;
//! invariants checked after every step (as FoundationDB's simulation and
//! TigerBeetle's VOPR do, at the scale of one pool).
//!
//! `SimPool` is the simulated world around the pool's `Model`: at each
//! turn it tells the model what it sees, as the shell does (exits, hang
//! answers, slots, the queue, a tick), and performs on its simulated
//! processes the actions the model answers (fork, retire, kill, ask for
//! the stack, mark due, authorise, count, log). The order of the
//! decisions is the model's own (`Model::step`), not restated here. A failing
//! sequence is shrunk by proptest to its shortest form, printed, and kept
//! under `proptest-regressions/` to be replayed first on the next run;
//! `PROPTEST_CASES` sets how many sequences run (`make sim`: many more).

use std::time::Duration;

use proptest::prelude::*;

use super::recycling::Turn;
use super::Observed;

mod pool;

use pool::SimPool;

/// The supervisor's tick.
pub(super) const TICK: Duration = Duration::from_millis(100);
pub(super) const INIT_TIMEOUT: Duration = Duration::from_secs(3);
pub(super) const GRACEFUL: Duration = Duration::from_secs(10);
/// How long `-init` takes when it works.
pub(super) const INIT_TIME: Duration = Duration::from_millis(300);

/// What the code a worker runs does in `-init`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Init {
    Works,
    /// Exits non-zero (a database down).
    Fails,
    /// Never returns (`-inittimeout` kills it).
    Hangs,
}

/// One thing that happens to the pool or its workers.
#[derive(Clone, Debug)]
pub(super) enum Event {
    /// Time passes, in ticks.
    Wait(u8),
    /// A client connects and holds its connection this long (ms; some
    /// for hours).
    Connect(u32),
    /// A worker (by position) is killed from outside (kill -9).
    KillNine(u8),
    /// A worker (by position) is sent SIGTERM from outside.
    Term(u8),
    /// A worker's handler calls `exit` (by position).
    HandlerExits(u8),
    /// A worker's memory passes `-maxrss`.
    GrowsInMemory(u8),
    /// A worker's handler hangs on its connection.
    Hangs(u8),
    /// From now on, `-init` of new workers does this.
    InitBecomes(Init),
    Reload,
    Resize(u8, u8),
    /// A worker forks a child inside its handler: not a worker, not ours.
    ForksInHandler,
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        6 => (1u8..20).prop_map(Event::Wait),
        6 => prop_oneof![0u32..400, 0u32..20_000, Just(u32::MAX)].prop_map(Event::Connect),
        1 => any::<u8>().prop_map(Event::KillNine),
        1 => any::<u8>().prop_map(Event::HandlerExits),
        1 => any::<u8>().prop_map(Event::Term),
        1 => any::<u8>().prop_map(Event::GrowsInMemory),
        1 => any::<u8>().prop_map(Event::Hangs),
        1 => prop_oneof![Just(Init::Works), Just(Init::Fails), Just(Init::Hangs)].prop_map(Event::InitBecomes),
        1 => Just(Event::Reload),
        1 => (any::<u8>(), any::<u8>()).prop_map(|(a, b)| Event::Resize(a, b)),
        1 => Just(Event::ForksInHandler),
    ]
}

/// Sequences per run: `PROPTEST_CASES`, or enough to find the classes of
/// defects above within a few seconds.
fn cases() -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(5000)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), max_shrink_iters: 2000, ..ProptestConfig::default() })]

    #[test]
    fn pool_keeps_its_invariants(
        min in 1usize..5,
        spread in 0usize..4,
        max_connections in prop::option::of(1u64..6),
        lifetime in prop::option::of(1u64..8),
        timeout in prop::option::of(1u64..10),
        events in prop::collection::vec(event(), 1..250),
    ) {
        let (lifetime, timeout) = (lifetime.map(Duration::from_secs), timeout.map(Duration::from_secs));
        let mut pool = SimPool::new(min, min + spread, max_connections, lifetime, timeout);
        pool.step();
        for event in &events {
            pool.apply(event);
        }
        pool.stop();
    }
}

/// Defect 2 of issue 26, as a fixed sequence: `-workers 3 -maxlifetime 2`,
/// `-init` starts failing; no worker is retired for recycling, the pool
/// keeps its 3 ready workers.
#[test]
fn recycling_waits_while_replacements_cannot_start() {
    let mut pool = SimPool::new(3, 3, None, Some(Duration::from_secs(2)), None);
    pool.step();
    pool.apply(&Event::Wait(10));
    assert_eq!(pool.model.ready_count(), 3);
    pool.apply(&Event::InitBecomes(Init::Fails));
    for _ in 0..10 {
        pool.apply(&Event::Wait(10));
        let ready = pool.ready_in_world();
        assert_eq!(ready, 3, "ready workers while -init fails");
    }
    pool.apply(&Event::InitBecomes(Init::Works));
    pool.apply(&Event::Wait(100));
    assert!(pool.figures.recycled >= 3, "recycling resumed: {:?}", pool.figures);
    pool.stop();
}

/// Defect 3: one connection held for hours does not keep the only turn:
/// every worker due is recycled.
#[test]
fn a_long_connection_holds_no_turn() {
    let mut pool = SimPool::new(2, 2, None, Some(Duration::from_secs(1)), None);
    pool.step();
    pool.apply(&Event::Wait(10));
    pool.apply(&Event::Connect(u32::MAX));
    pool.apply(&Event::Wait(100));
    assert!(pool.figures.recycled >= 5, "recycled: {:?}", pool.figures);
}

/// `-workers 2 -maxconnections 3` and `-workers 1 -maxconnections 3`,
/// then `-init` fails: a worker that left by itself at its limit holds
/// its turn until its replacement is ready, so the other is not retired
/// meanwhile; the only worker is never authorised to leave before its
/// replacement is ready. The pool keeps a ready worker throughout.
#[test]
fn maxconnections_keeps_a_ready_worker_while_init_fails() {
    for workers in [1, 2] {
        let mut pool = SimPool::new(workers, workers, Some(3), None, None);
        pool.step();
        pool.apply(&Event::Wait(10));
        pool.apply(&Event::InitBecomes(Init::Fails));
        for _ in 0..20 {
            pool.apply(&Event::Connect(10));
            pool.apply(&Event::Wait(2));
            let ready = pool.ready_in_world();
            assert!(ready >= 1, "-workers {workers}: no ready worker while -init fails");
        }
        pool.apply(&Event::InitBecomes(Init::Works));
        pool.apply(&Event::Wait(100));
        pool.stop();
    }
}

/// `-workers 1`, `-init` hangs under `-inittimeout`: every kill is a
/// failure in a row, backed off (the replacement was forked at the kill,
/// before the exit was counted, and every second failure went unbacked).
#[test]
fn a_hanging_init_backs_off_on_every_failure() {
    let mut pool = SimPool::new(1, 1, None, None, None);
    pool.apply(&Event::InitBecomes(Init::Hangs));
    pool.step();
    pool.apply(&Event::Wait(200));
    assert!(pool.figures.init_timed_out >= 3, "{:?}", pool.figures);
    assert_eq!(pool.figures.backoffs, pool.figures.init_timed_out, "{:?}", pool.figures);
    pool.stop();
}

/// A worker due by age that holds no turn (its replacements' `-init`
/// fails) is sent SIGTERM from outside: it is not counted as recycled.
#[test]
fn a_due_worker_sent_sigterm_is_no_recycle() {
    let mut pool = SimPool::new(2, 2, None, Some(Duration::from_secs(1)), None);
    pool.step();
    pool.apply(&Event::Wait(5));
    pool.apply(&Event::InitBecomes(Init::Fails));
    pool.apply(&Event::Wait(20));
    assert_eq!(pool.figures.recycled, 0, "{:?}", pool.figures);
    pool.apply(&Event::Term(0));
    pool.apply(&Event::Term(1));
    pool.apply(&Event::Wait(5));
    assert_eq!(pool.figures.recycled, 0, "{:?}", pool.figures);
    pool.stop();
}

/// `-workers 2 -maxlifetime 3`: a worker due by age whose replacement is
/// starting is killed -9, one failure. The replacement, forked before
/// it, ends the run once ready, and recycling goes on (before: the run
/// never ended; recycling and sizing stopped for good).
#[test]
fn a_turn_holder_killed_while_its_replacement_starts() {
    let mut pool = SimPool::new(2, 2, None, Some(Duration::from_secs(3)), None);
    pool.step();
    let mut killed = false;
    for _ in 0..100 {
        pool.apply(&Event::Wait(1));
        let m = &pool.model;
        let holder = m.workers.iter().find(|w| matches!(w.turn, Some(Turn::Held(_)))).map(|w| w.id);
        let starting = m.workers.iter().any(|w| w.slot.state == Observed::Starting);
        if let (Some(n), true) = (holder.and_then(|id| pool.live_position(id)), starting) {
            pool.apply(&Event::KillNine(n));
            killed = true;
            break;
        }
    }
    assert!(killed, "no turn holder with its replacement starting");
    assert!(!pool.model.failures.healthy(), "the kill is a failure");
    // Past the bound of the invariant "a run of failures ends".
    pool.apply(&Event::Wait(250));
    pool.apply(&Event::Wait(250));
    assert!(pool.model.failures.healthy(), "the run of failures never ended");
    assert!(pool.figures.recycled >= 2, "recycling stopped: {:?}", pool.figures);
    pool.stop();
}
