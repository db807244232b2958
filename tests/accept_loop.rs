//! The accepting threads against the real kernel: every connection reaches
//! the queue whatever the number of threads, and stopping leaves alone a
//! listening socket that another process shares (systemd's copy, or the
//! next generation of the server).

use std::net::TcpStream;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::socket::MsgFlags;

use socketserver::accept_loop::AcceptLoop;
use socketserver::counters::Counters;
use socketserver::handoff::{self, Received};
use socketserver::listener;

#[test]
fn every_connection_reaches_the_queue_with_four_threads() {
    let listeners = listener::open(Some("127.0.0.1"), 0, 128).expect("listener");
    let address = listeners.addresses[0];
    let (accept_end, worker_end) = handoff::new_queue().expect("queue");
    let counters = Arc::new(Counters::default());
    let accept_loop = AcceptLoop::start(listeners.sockets, accept_end, Arc::clone(&counters), 4).expect("start");
    assert_eq!(accept_loop.threads(), 4);
    let clients: Vec<TcpStream> = (0..50).map(|_| TcpStream::connect(address).expect("connect")).collect();
    let mine: Vec<u16> = clients.iter().map(|c| c.local_addr().unwrap().port()).collect();
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(8);
    while seen.len() < clients.len() && Instant::now() < deadline {
        match handoff::receive_connection(worker_end.as_fd(), MsgFlags::MSG_DONTWAIT) {
            Ok(Received::Connection(conn)) => seen.push(conn.peer.expect("an IPv4 peer").port()),
            _ => std::thread::sleep(Duration::from_millis(5)),
        }
    }
    seen.sort_unstable();
    let mut expected = mine.clone();
    expected.sort_unstable();
    assert_eq!(seen, expected, "each connection exactly once, with its peer");
    assert_eq!(counters.accepted.load(std::sync::atomic::Ordering::Relaxed), 50);
    accept_loop.stop();
}

#[test]
fn stopping_leaves_a_shared_listener_listening() {
    let listeners = listener::open(Some("127.0.0.1"), 0, 128).expect("listener");
    let address = listeners.addresses[0];
    // Another holder of the same socket, as systemd keeps one.
    let other = nix::unistd::dup(listeners.sockets[0].as_raw_fd()).expect("dup");
    // SAFETY: dup just made this descriptor; nothing else owns it.
    let other = unsafe { OwnedFd::from_raw_fd(other) };
    let (accept_end, _worker_end) = handoff::new_queue().expect("queue");
    let accept_loop =
        AcceptLoop::start(listeners.sockets, accept_end, Arc::new(Counters::default()), 2).expect("start");
    let started = Instant::now();
    accept_loop.stop();
    // Woken by a signal, not by the fallback (after 5 s) of shutting the
    // listener down, which would end the other holder's listening too: the
    // connect below says so. The bound is only a watchdog.
    assert!(started.elapsed() < Duration::from_secs(30), "stopping wakes the blocked threads");
    // The socket still listens for its other holder: a client connects and
    // the other holder accepts it.
    let _client = TcpStream::connect(address).expect("still listening");
    let listener = std::net::TcpListener::from(other);
    listener.set_nonblocking(false).unwrap();
    let (_accepted, peer) = listener.accept().expect("the other holder accepts");
    assert_eq!(peer.ip(), address.ip());
}

#[test]
fn threads_woken_together_never_pass_the_queue_bound() {
    use socketserver::queue_stats::Overload;
    // Every address (IPv4 and IPv6), 8 threads each: 16 accepting threads.
    let listeners = listener::open(None, 0, 1024).expect("listener");
    let port = listeners.addresses[0].port();
    let (accept_end, worker_end) = handoff::new_queue().expect("queue");
    let counters = Arc::new(Counters::default());
    counters.queue.set_bound(2, Overload::Pause);
    let accept_loop = AcceptLoop::start(listeners.sockets, accept_end, Arc::clone(&counters), 8).expect("start");
    let _clients: Vec<TcpStream> =
        (0..400).map(|_| TcpStream::connect(("127.0.0.1", port)).expect("connect")).collect();
    let deadline = Instant::now() + Duration::from_secs(8);
    while counters.queue.depth() < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut most = counters.queue.depth();
    // Each take rings the paused threads: all of them look at once. The
    // queue is emptied each round, so that all find room.
    for _ in 0..40 {
        while let Ok(Received::Connection(conn)) =
            handoff::receive_connection(worker_end.as_fd(), MsgFlags::MSG_DONTWAIT)
        {
            counters.queue.count_taken();
            drop(conn);
        }
        std::thread::sleep(Duration::from_millis(30));
        most = most.max(counters.queue.depth());
    }
    accept_loop.stop();
    assert_eq!(most, 2, "the queue passed its bound of 2");
}
