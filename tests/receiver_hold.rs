//! A receiver held from another thread (`Gate`, and the process's
//! `hold_when` check, as a pool's worker holds its own while the
//! supervisor decides whether it is hung) takes no connection until it
//! is released, and takes connections again once it is. Against the real
//! kernel: a real hand-off queue, a real receiver thread.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use nix::sys::socket::MsgFlags;

use socketserver::handoff::{new_queue, send_connection, Connection};
use socketserver::queue_stats::QueueStats;
use socketserver::receiver::{self, Outcome, Receiver};

/// Long enough for a receiver that is not held to take a connection.
const NOTHING_FOR: Duration = Duration::from_millis(300);
/// The watchdog of every wait for something that must come.
const WATCHDOG: Duration = Duration::from_secs(8);

static HOLD: AtomicBool = AtomicBool::new(false);
/// `hold_when` is the process's: the tests run one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn hold_flag() -> bool {
    HOLD.load(Ordering::SeqCst)
}

/// A connection standing in for an accepted TCP socket (its far end is
/// returned, to be kept open).
fn connection() -> (Connection, UnixStream) {
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    (Connection { socket: OwnedFd::from(ours), peer: None, accepted_at: 0, taken_at: 0 }, theirs)
}

fn receiver_on(worker_end: OwnedFd) -> (Receiver, mpsc::Receiver<Outcome>) {
    let (sender, delivered) = mpsc::channel();
    let receiver = Receiver::spawn(Arc::new(worker_end), Arc::new(QueueStats::new()), false, move |outcome| {
        let _ = sender.send(outcome);
    })
    .expect("receiver");
    (receiver, delivered)
}

fn send(accept_end: &OwnedFd) -> UnixStream {
    let (conn, far_end) = connection();
    send_connection(accept_end.as_fd(), &conn, MsgFlags::empty()).expect("send");
    far_end
}

fn delivered_connection(delivered: &mpsc::Receiver<Outcome>) -> bool {
    matches!(delivered.recv_timeout(WATCHDOG), Ok(Outcome::Connection(_)))
}

#[test]
fn a_receiver_held_by_its_gate_takes_nothing_until_released() {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    HOLD.store(false, Ordering::SeqCst);
    let (accept_end, worker_end) = new_queue().unwrap();
    let (receiver, delivered) = receiver_on(worker_end);
    assert!(receiver.arm().unwrap().is_none());
    let gate = receiver.gate();
    gate.hold();
    let _first = send(&accept_end);
    assert!(delivered.recv_timeout(NOTHING_FOR).is_err(), "a held receiver took a connection");
    // Registered again while held: still nothing.
    assert!(receiver.arm().unwrap().is_none());
    assert!(delivered.recv_timeout(NOTHING_FOR).is_err(), "a held receiver took a connection");
    gate.release();
    assert!(delivered_connection(&delivered), "a released receiver took nothing");
    // Disarmed while held: the release does not arm it.
    gate.hold();
    receiver.disarm();
    gate.release();
    let _second = send(&accept_end);
    assert!(delivered.recv_timeout(NOTHING_FOR).is_err(), "a disarmed receiver took a connection");
    assert!(receiver.arm().unwrap().is_some(), "arming takes the waiting connection at once");
}

#[test]
fn a_receiver_held_by_the_process_check_takes_nothing_until_released() {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    receiver::hold_when(hold_flag);
    let (accept_end, worker_end) = new_queue().unwrap();
    let (receiver, delivered) = receiver_on(worker_end);
    assert!(receiver.arm().unwrap().is_none());
    HOLD.store(true, Ordering::SeqCst);
    // Not taken: on Linux its wakeup is passed on (the connection goes back
    // to the accepting side, for another worker); with a waiting turn it
    // stays in the queue for the next holder of the turn.
    let _first = send(&accept_end);
    let taken = delivered.recv_timeout(NOTHING_FOR).is_ok();
    HOLD.store(false, Ordering::SeqCst);
    assert!(!taken, "a held receiver took a connection");
    receiver.gate().release();
    let _second = send(&accept_end);
    assert!(delivered_connection(&delivered), "a released receiver took nothing");
}
