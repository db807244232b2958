//! The bare hand-off benchmark: no Tcl anywhere. Client threads connect to
//! 127.0.0.1, wait for the server to close and close; the server side is
//! one of:
//!
//! - `socketserver T`: the extension's accept loop with T accepting threads
//!   per listener, handing each connection over the SEQPACKET queue to R
//!   receiving threads, which close it;
//! - `1.1.3-style`: what socketservertcl 1.1.3's accepting thread does, in
//!   Rust: one thread, blocking `accept`, the peer formatted as text,
//!   `sendmsg` with that text, `close`; the same R receivers;
//! - `native`: R threads blocking in `accept()` on the listener and closing
//!   what they get: the machine's limit, no hand-off at all.
//!
//! For each: connections per second, and the CPU time of the accepting side
//! per connection (the accepting threads' own time from
//! /proc/self/task/*/schedstat, in nanoseconds). Configurations are
//! interleaved and repeated; figures are medians.
//!
//! Usage: cargo bench --bench handoff -- [--connections N] [--reps N]
//!        [--clients N] [--receivers N] [--threads 1,2,4]

use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread::JoinHandle;
use std::time::Instant;

use nix::sys::socket::MsgFlags;

use socketserver::accept_loop::AcceptLoop;
use socketserver::counters::Counters;
use socketserver::handoff::{self, Received};
use socketserver::listener;

struct Options {
    connections: u64,
    reps: usize,
    clients: usize,
    receivers: usize,
    threads: Vec<usize>,
}

fn options() -> Options {
    let mut o = Options { connections: 40_000, reps: 5, clients: 4, receivers: 4, threads: vec![1, 2, 4] };
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    for pair in args.chunks(2) {
        let value = pair.get(1).map(String::as_str).unwrap_or("");
        match pair[0].as_str() {
            "--connections" => o.connections = value.parse().expect("--connections N"),
            "--reps" => o.reps = value.parse().expect("--reps N"),
            "--clients" => o.clients = value.parse().expect("--clients N"),
            "--receivers" => o.receivers = value.parse().expect("--receivers N"),
            "--threads" => o.threads = value.split(',').map(|t| t.parse().expect("--threads 1,2,4")).collect(),
            other => panic!("unknown option {other}"),
        }
    }
    o
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Server {
    Socketserver(usize),
    Old113,
    Native,
}

impl Server {
    fn label(self) -> String {
        match self {
            Server::Socketserver(t) => format!("socketserver, {t} accepting thread{}", if t == 1 { "" } else { "s" }),
            Server::Old113 => "1.1.3-style accept loop".into(),
            Server::Native => "native accept() in R threads".into(),
        }
    }
}

/// CPU nanoseconds so far of this process's threads whose name starts with
/// one of `prefixes`.
fn thread_cpu_ns(prefixes: &[&str]) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir("/proc/self/task").expect("/proc/self/task").flatten() {
        let path = entry.path();
        let name = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        if prefixes.iter().any(|p| name.starts_with(p)) {
            let stat = std::fs::read_to_string(path.join("schedstat")).unwrap_or_default();
            total += stat.split_whitespace().next().and_then(|n| n.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    total
}

/// CPU nanoseconds so far of the calling thread.
fn own_cpu_ns() -> u64 {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
    stat.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(0)
}

/// Clients: each connects, waits for end of file and closes, until the
/// shared count reaches `total`.
fn run_clients(address: SocketAddr, clients: usize, total: u64) -> f64 {
    let next = Arc::new(AtomicU64::new(0));
    let start = Arc::new(Barrier::new(clients + 1));
    let handles: Vec<JoinHandle<()>> = (0..clients)
        .map(|_| {
            let next = Arc::clone(&next);
            let start = Arc::clone(&start);
            std::thread::Builder::new()
                .name("bench-client".into())
                .spawn(move || {
                    start.wait();
                    let mut buffer = [0u8; 16];
                    while next.fetch_add(1, Ordering::Relaxed) < total {
                        let mut stream = TcpStream::connect(address).expect("connect");
                        // The server closes first: no TIME_WAIT piles up here.
                        while stream.read(&mut buffer).map(|n| n > 0).unwrap_or(false) {}
                    }
                })
                .expect("client thread")
        })
        .collect();
    start.wait();
    let began = Instant::now();
    for handle in handles {
        handle.join().expect("client");
    }
    began.elapsed().as_secs_f64()
}

/// R threads taking connections from the queue and closing them.
fn spawn_receivers(worker_end: Arc<OwnedFd>, receivers: usize) -> Vec<JoinHandle<()>> {
    (0..receivers)
        .map(|_| {
            let worker_end = Arc::clone(&worker_end);
            std::thread::Builder::new()
                .name("bench-receiver".into())
                .spawn(move || loop {
                    match handoff::receive_connection(worker_end.as_fd(), MsgFlags::empty()) {
                        Ok(Received::Connection(conn)) => drop(conn),
                        Ok(Received::Closed) => return,
                        _ => {}
                    }
                })
                .expect("receiver thread")
        })
        .collect()
}

struct Measure {
    per_second: f64,
    cpu_ns_per_connection: f64,
}

impl Measure {
    fn new(connections: u64, seconds: f64, cpu_ns: u64) -> Measure {
        Measure { per_second: connections as f64 / seconds, cpu_ns_per_connection: cpu_ns as f64 / connections as f64 }
    }
}

fn measure(server: Server, o: &Options) -> Measure {
    match server {
        Server::Socketserver(threads) => {
            let listeners = listener::open(Some("127.0.0.1"), 0, 4096).expect("listener");
            let address = listeners.addresses[0];
            let (accept_end, worker_end) = handoff::new_queue().expect("queue");
            let counters = Arc::new(Counters::default());
            let worker_end = Arc::new(worker_end);
            let receivers = spawn_receivers(Arc::clone(&worker_end), o.receivers);
            let accept_loop = AcceptLoop::start(listeners.sockets, accept_end, counters, threads).expect("accept loop");
            let prefixes = ["socketserver-ac", "socketserver-ba"];
            let cpu_before = thread_cpu_ns(&prefixes);
            let seconds = run_clients(address, o.clients, o.connections);
            let cpu = thread_cpu_ns(&prefixes) - cpu_before;
            // Stopping closes the accept end: the receivers see the queue close.
            accept_loop.stop();
            drop(worker_end);
            receivers.into_iter().for_each(|r| r.join().expect("receiver"));
            Measure::new(o.connections, seconds, cpu)
        }
        Server::Old113 => {
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
            let address = listener.local_addr().expect("address");
            let (accept_end, worker_end) = handoff::new_queue().expect("queue");
            let worker_end = Arc::new(worker_end);
            let receivers = spawn_receivers(Arc::clone(&worker_end), o.receivers);
            let total = o.connections;
            // The thread reports its own CPU time: it is gone from /proc once
            // it has accepted its share.
            let accepter = std::thread::Builder::new()
                .name("old113-accept".into())
                .spawn(move || {
                    for _ in 0..total {
                        let (stream, peer) = listener.accept().expect("accept");
                        send_as_113(&accept_end, OwnedFd::from(stream), peer);
                    }
                    drop(accept_end);
                    own_cpu_ns()
                })
                .expect("accept thread");
            let seconds = run_clients(address, o.clients, o.connections);
            let cpu = accepter.join().expect("accepter");
            drop(worker_end);
            receivers.into_iter().for_each(|r| r.join().expect("receiver"));
            Measure::new(o.connections, seconds, cpu)
        }
        Server::Native => {
            let listener = Arc::new(TcpListener::bind("127.0.0.1:0").expect("bind"));
            let address = listener.local_addr().expect("address");
            let taken = Arc::new(AtomicU64::new(0));
            let total = o.connections;
            let accepters: Vec<JoinHandle<u64>> = (0..o.receivers)
                .map(|_| {
                    let listener = Arc::clone(&listener);
                    let taken = Arc::clone(&taken);
                    std::thread::Builder::new()
                        .name("native-accept".into())
                        .spawn(move || {
                            while taken.fetch_add(1, Ordering::Relaxed) < total {
                                drop(listener.accept().expect("accept"));
                            }
                            own_cpu_ns()
                        })
                        .expect("accept thread")
                })
                .collect();
            let seconds = run_clients(address, o.clients, o.connections);
            // Wake the threads still waiting for one more connection.
            for _ in 0..o.receivers {
                let _ = TcpStream::connect(address);
            }
            let cpu: u64 = accepters.into_iter().map(|a| a.join().expect("accepter")).sum();
            Measure::new(o.connections, seconds, cpu)
        }
    }
}

/// 1.1.3's hand-off: the peer as text ("host port") in the payload.
fn send_as_113(accept_end: &OwnedFd, socket: OwnedFd, peer: SocketAddr) {
    use nix::sys::socket::{sendmsg, ControlMessage};
    let text = format!("{} {}", peer.ip(), peer.port());
    let fds = [socket.as_raw_fd()];
    let _ = sendmsg::<()>(
        accept_end.as_raw_fd(),
        &[std::io::IoSlice::new(text.as_bytes())],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::MSG_NOSIGNAL,
        None,
    );
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

fn main() {
    let o = options();
    let mut servers: Vec<Server> = o.threads.iter().map(|&t| Server::Socketserver(t)).collect();
    servers.push(Server::Old113);
    servers.push(Server::Native);
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    println!(
        "bare hand-off benchmark: {cores} cores; {} connections per measurement, {} client threads, \
         {} receiving threads; {} repetitions, interleaved",
        o.connections, o.clients, o.receivers, o.reps
    );
    let mut results: Vec<(Vec<f64>, Vec<f64>)> = vec![(Vec::new(), Vec::new()); servers.len()];
    for rep in 0..o.reps {
        // A different order each repetition, so that no server always runs
        // right after the same one.
        let mut order: Vec<usize> = (0..servers.len()).collect();
        order.rotate_left(rep % servers.len());
        for index in order {
            let m = measure(servers[index], &o);
            results[index].0.push(m.per_second);
            results[index].1.push(m.cpu_ns_per_connection);
            eprint!(".");
        }
    }
    eprintln!();
    let old = servers.iter().position(|s| *s == Server::Old113).expect("1.1.3 measured");
    let native = servers.iter().position(|s| *s == Server::Native).expect("native measured");
    let old_cpu = median(results[old].1.clone());
    let native_rate = median(results[native].0.clone());
    println!("{:<34} {:>11} {:>13} {:>12} {:>10}", "server", "conn/s", "accept-cpu-us", "cpu-vs-113", "vs-native");
    for (index, server) in servers.iter().enumerate() {
        let rate = median(results[index].0.clone());
        let cpu = median(results[index].1.clone());
        println!(
            "{:<34} {:>11.0} {:>13.2} {:>11.2}x {:>9.2}x",
            server.label(),
            rate,
            cpu / 1000.0,
            cpu / old_cpu,
            rate / native_rate
        );
    }
    println!(
        "(accept-cpu-us: CPU time of the accepting threads per connection; for native, of the R threads \
         that accept and close)"
    );
}
