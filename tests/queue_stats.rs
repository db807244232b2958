//! The queue's figures: depth, bound, histogram buckets, and the sharing
//! of all of them with a forked process.

use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult};
use socketserver::queue_stats::{Overload, QueueStats, BUCKET_BOUNDS};

#[test]
fn waits_fall_in_the_bucket_of_their_upper_bound() {
    let stats = QueueStats::new();
    // On a bound, just above it, and beyond the last one (+Inf).
    for wait_ns in [1_000_000, 1_000_001, 250_000_000, 10_000_000_001] {
        stats.record_wait(wait_ns);
    }
    let snapshot = stats.snapshot();
    let cumulative = |le: &str| {
        let index = BUCKET_BOUNDS.iter().position(|(name, _)| *name == le).expect("a bound");
        snapshot.buckets[index]
    };
    assert_eq!(cumulative("0.001"), 1);
    assert_eq!(cumulative("0.0025"), 2);
    assert_eq!(cumulative("0.25"), 3);
    assert_eq!(cumulative("10"), 3);
    assert_eq!(*snapshot.buckets.last().unwrap(), 4, "+Inf counts every wait");
    assert_eq!(snapshot.waits, 4);
    assert!((snapshot.wait_sum_seconds - 10.252000002).abs() < 1e-6);
}

#[test]
fn depth_is_what_was_queued_and_not_taken_and_the_bound_applies_to_it() {
    let stats = QueueStats::new();
    assert!(!stats.full(), "no bound: never full");
    stats.set_bound(2, Overload::Close);
    stats.count_queued();
    assert!(!stats.full());
    stats.count_queued();
    assert!(stats.full());
    assert_eq!(stats.bound(), (2, Overload::Close));
    stats.count_taken();
    assert_eq!(stats.depth(), 1);
    assert!(!stats.full());
    stats.set_bound(0, Overload::Pause);
    assert_eq!(stats.bound(), (0, Overload::None), "no bound, no policy");
}

#[test]
fn a_forked_process_takes_and_the_parent_sees_it() {
    let stats = QueueStats::new();
    stats.count_queued();
    stats.count_queued();
    stats.enter_pause();
    match unsafe { fork() }.expect("fork") {
        ForkResult::Child => {
            stats.count_taken();
            stats.count_abandoned();
            stats.record_wait(3_000_000);
            unsafe { libc::_exit(0) };
        }
        ForkResult::Parent { child } => {
            assert_eq!(waitpid(child, None).unwrap(), WaitStatus::Exited(child, 0));
            let snapshot = stats.snapshot();
            assert_eq!((snapshot.depth, snapshot.abandoned, snapshot.waits), (1, 1, 1));
            assert!(snapshot.paused_now);
            // The worker rang the paused thread: the waker is readable.
            let room = stats.room_fd().expect("a waker");
            let mut fds = [nix::poll::PollFd::new(room, nix::poll::PollFlags::POLLIN)];
            assert_eq!(nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO).unwrap(), 1);
            stats.leave_pause();
            let snapshot = stats.snapshot();
            assert!(!snapshot.paused_now);
            assert_eq!(snapshot.pauses, 1);
        }
    }
}

#[test]
fn paused_seconds_never_go_back_while_threads_pause_and_resume() {
    let stats = std::sync::Arc::new(QueueStats::new());
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (stats, done) = (std::sync::Arc::clone(&stats), std::sync::Arc::clone(&done));
            std::thread::spawn(move || {
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    stats.enter_pause();
                    std::hint::spin_loop();
                    stats.leave_pause();
                }
            })
        })
        .collect();
    let (mut last, mut drops) = (0.0f64, 0);
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(1500);
    while std::time::Instant::now() < deadline {
        let now = stats.snapshot().paused_seconds;
        if now < last {
            drops += 1;
        }
        last = now;
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    threads.into_iter().for_each(|t| t.join().unwrap());
    assert_eq!(drops, 0, "pausedtime went back {drops} times");
    assert!(stats.snapshot().paused_seconds >= last);
}
