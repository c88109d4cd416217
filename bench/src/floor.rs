//! `bench floor`: what the kernel alone charges for a push on this machine, the floor the
//! server's CPU per message is measured against (issue 16, part 3).
//!
//! One thread, pinned to one core, writes `--size`-byte messages round-robin to `--sockets`
//! loopback TCP connections; another thread, pinned to the other core, reads them all (one
//! epoll reactor: a current-thread tokio runtime). No parsing, no allocation, no queue: a
//! `write(2)` per message. The writer's own CPU time (from `/proc/thread-self/schedstat`)
//! divided by the messages is the floor of one frame written to one connection; a push over
//! HTTP also reads a request and writes a response, about two more such system calls.

use std::io::Write as _;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rustix::thread::{sched_setaffinity, CpuSet};
use serde::Serialize;
use tokio::io::AsyncReadExt as _;

use crate::sys;

/// Arguments of `bench floor`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Loopback connections written to round-robin (each costs two open files).
    #[arg(long, default_value_t = 9_000)]
    sockets: u32,
    /// Messages written in all.
    #[arg(long, default_value_t = 2_000_000)]
    messages: u64,
    /// Bytes per message (a small WebSocket text frame is about 80).
    #[arg(long, default_value_t = 80)]
    size: usize,
    /// The writer's core; the reader takes the next one.
    #[arg(long, default_value_t = 0)]
    core: usize,
    /// Print the result as JSON instead of a line.
    #[arg(long)]
    json: bool,
}

/// What one run measured.
#[derive(Debug, Serialize)]
pub struct Floor {
    pub sockets: u32,
    pub messages: u64,
    pub size: usize,
    /// Writer CPU per message, microseconds.
    pub writer_cpu_us: f64,
    /// Reader CPU per message, microseconds.
    pub reader_cpu_us: f64,
    /// Messages per second of the writer's CPU: the ceiling of one core writing frames.
    pub per_core_per_s: f64,
    /// Wall time from the first write to the last byte read, seconds.
    pub wall_s: f64,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.sockets > 0 && args.size > 0,
        "--sockets and --size must be positive"
    );
    sys::check_files(u64::from(args.sockets) * 2 + 64, "bench floor's sockets")?;
    let floor = measure(&args)?;
    if args.json {
        println!("{}", serde_json::to_string(&floor)?);
    } else {
        println!(
            "floor: {} writes of {} B over {} loopback sockets: writer {:.2} µs CPU per write \
             ({:.0} writes/s per core), reader {:.2} µs, {:.2} s wall",
            floor.messages,
            floor.size,
            floor.sockets,
            floor.writer_cpu_us,
            floor.per_core_per_s,
            floor.reader_cpu_us,
            floor.wall_s
        );
    }
    Ok(())
}

fn measure(args: &Args) -> anyhow::Result<Floor> {
    let listener = TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let mut writers = Vec::with_capacity(args.sockets as usize);
    let mut readers = Vec::with_capacity(args.sockets as usize);
    for _ in 0..args.sockets {
        let client = TcpStream::connect(addr).context("connect to the local listener")?;
        let (server, _) = listener.accept()?;
        server.set_nodelay(true)?;
        client.set_nonblocking(true)?;
        writers.push(server);
        readers.push(client);
    }
    let expected = args.messages * args.size as u64;
    let received = Arc::new(AtomicU64::new(0));
    let reader_core = args.core + 1;
    let (reader_cpu_tx, reader_cpu_rx) = std::sync::mpsc::channel();
    let reader = {
        let received = received.clone();
        std::thread::spawn(move || -> anyhow::Result<()> {
            pin(reader_core)?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let start = thread_cpu_ns()?;
            rt.block_on(async {
                for s in readers {
                    let s = tokio::net::TcpStream::from_std(s)?;
                    tokio::spawn(read_all(s, received.clone()));
                }
                while received.load(Ordering::Relaxed) < expected {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                anyhow::Ok(())
            })?;
            reader_cpu_tx.send(thread_cpu_ns()? - start)?;
            Ok(())
        })
    };
    let message = vec![b'x'; args.size];
    let core = args.core;
    let messages = args.messages;
    let writer = std::thread::spawn(move || -> anyhow::Result<(u64, Instant, Vec<TcpStream>)> {
        pin(core)?;
        let started = Instant::now();
        let start = thread_cpu_ns()?;
        let n = writers.len() as u64;
        for i in 0..messages {
            writers[(i % n) as usize].write_all(&message)?;
        }
        let cpu = thread_cpu_ns()? - start;
        // Handed back: the sockets stay open until the reader has everything.
        Ok((cpu, started, writers))
    });
    let (writer_cpu, started, _writers) = writer
        .join()
        .map_err(|_| anyhow::anyhow!("writer panicked"))??;
    reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))??;
    let wall = started.elapsed();
    let reader_cpu = reader_cpu_rx.recv()?;
    let per = |ns: u64| ns as f64 / 1_000.0 / args.messages as f64;
    Ok(Floor {
        sockets: args.sockets,
        messages: args.messages,
        size: args.size,
        writer_cpu_us: sys::round2(per(writer_cpu)),
        reader_cpu_us: sys::round2(per(reader_cpu)),
        per_core_per_s: (args.messages as f64 / (writer_cpu as f64 / 1e9)).round(),
        wall_s: sys::round2(wall.as_secs_f64()),
    })
}

async fn read_all(mut s: tokio::net::TcpStream, received: Arc<AtomicU64>) {
    let mut buf = [0u8; 16 * 1024];
    while let Ok(n) = s.read(&mut buf).await {
        if n == 0 {
            return;
        }
        received.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Pins the calling thread to `core`.
fn pin(core: usize) -> anyhow::Result<()> {
    let mut set = CpuSet::new();
    set.set(core);
    sched_setaffinity(None, &set).with_context(|| format!("pin to core {core}"))
}

/// This thread's time on a CPU so far, in nanoseconds (the first field of its schedstat).
fn thread_cpu_ns() -> anyhow::Result<u64> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat")
        .context("reading /proc/thread-self/schedstat")?;
    text.split_whitespace()
        .next()
        .and_then(|f| f.parse().ok())
        .context("schedstat's first field")
}
