//! Gateway → Kafka → staging throughput and the gateway's answer latency: each client posts
//! batches of NDJSON events to `POST /v1/events/bench` over one kept-alive connection. Not a
//! test; figures go to docs/BENCHMARKS.md.
//!
//! `cargo run --release -p gabo --example gateway_bench -- [seconds] [clients] [batch]`
//!
//! By default the gateway and the writer run in this process against librdkafka's mock
//! cluster (or `KAFKA_BROKERS`). With `GABO_GATEWAY=host:port` it loads a running
//! `gabo serve` instead (the type `bench` applied), and with `GABO_STAGING=dir` also waits for
//! that server's writer to stage what was accepted (`data-tools/gabo/bench/gateway.sh`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use gabo::gateway::{Gateway, GatewaySettings};
use gabo::staging::Staging;
use gabo::store::Store;
use gabo::writer::{Writer, WriterSettings};
use http_body_util::{BodyExt, Full};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("numbers: seconds clients batch"))
        .collect();
    let secs = *args.first().unwrap_or(&20);
    let clients = *args.get(1).unwrap_or(&16) as usize;
    let batch = *args.get(2).unwrap_or(&100) as usize;

    // An external `gabo serve`, or everything in this process.
    let external = std::env::var("GABO_GATEWAY").ok();
    let tmp = tempfile::tempdir()?;
    let mut staging_root = tmp.path().join("staging");
    let mut _in_process = None;
    let addr: std::net::SocketAddr = match external {
        Some(a) => {
            if let Ok(d) = std::env::var("GABO_STAGING") {
                staging_root = d.into();
            }
            a.parse()?
        }
        None => {
            let (addr, parts) = in_process(&tmp).await?;
            _in_process = Some(parts);
            addr
        }
    };

    let hist = Arc::new(Mutex::new(hdrhistogram::Histogram::<u64>::new(3)?));
    let sent = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let seq = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let end = started + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (hist, sent, seq, failed) = (hist.clone(), sent.clone(), seq.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (mut tx, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                    .await
                    .unwrap();
            tokio::spawn(conn);
            while Instant::now() < end {
                let first = seq.fetch_add(batch as u64, Ordering::Relaxed);
                let body: Vec<String> = (first..first + batch as u64)
                    .map(|i| format!(r#"{{"id":"e{i}","user":"u{}","n":{i}}}"#, i % 1000))
                    .collect();
                let req = hyper::Request::post("/v1/events/bench")
                    .header("host", "bench")
                    .header("content-type", "application/x-ndjson")
                    .body(Full::new(Bytes::from(body.join("\n"))))
                    .unwrap();
                let t = Instant::now();
                let resp = tx.send_request(req).await.unwrap();
                let ok = resp.status() == 200;
                let _ = resp.into_body().collect().await;
                hist.lock()
                    .unwrap()
                    .record(t.elapsed().as_micros() as u64)
                    .unwrap();
                if ok {
                    sent.fetch_add(batch as u64, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let gw_secs = started.elapsed().as_secs_f64();
    let accepted = sent.load(Ordering::Relaxed);
    // Wait until the writer has staged everything accepted.
    let staged_dir = staging_root.join("bench");
    let count = || -> u64 {
        let mut n = 0;
        for d in walk(&staged_dir) {
            if d.extension().is_some_and(|x| x == "ndjson") {
                n += std::fs::read(&d)
                    .map(|b| b.iter().filter(|c| **c == b'\n').count() as u64)
                    .unwrap_or(0);
            }
        }
        n
    };
    while count() < accepted && started.elapsed() < Duration::from_secs(secs * 4 + 30) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let total_secs = started.elapsed().as_secs_f64();
    let h = hist.lock().unwrap();
    println!(
        "clients {clients}, batch {batch}: {accepted} events accepted in {gw_secs:.1} s = {:.0} events/s at the gateway \
         ({} requests, {} not answered 200); \
         all staged after {total_secs:.1} s = {:.0} events/s end to end; answer p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        accepted as f64 / gw_secs,
        h.len(),
        failed.load(Ordering::Relaxed),
        count() as f64 / total_secs,
        h.value_at_quantile(0.5) as f64 / 1000.0,
        h.value_at_quantile(0.99) as f64 / 1000.0,
        h.max() as f64 / 1000.0,
    );
    Ok(())
}

/// What runs in this process when no `GABO_GATEWAY` is given; dropped at the end.
struct InProcess {
    _gateway: Gateway,
    _writer: Writer,
    _mock: Option<MockCluster<'static, DefaultProducerContext>>,
}

/// Starts the mock cluster (unless `KAFKA_BROKERS`), a gateway and a writer for `bench`.
async fn in_process(tmp: &tempfile::TempDir) -> anyhow::Result<(std::net::SocketAddr, InProcess)> {
    let types = gabo::types::parse(
        "bench",
        "types:\n  - name: bench\n    owner: bench\n    retention: 1d\n    partitions: 4\n    schema: {type: object, required: [user], properties: {user: {type: string}}}\n",
    )?;
    let mock: Option<MockCluster<'static, DefaultProducerContext>>;
    let brokers = match std::env::var("KAFKA_BROKERS") {
        Ok(b) => {
            mock = None;
            b
        }
        Err(_) => {
            let m = MockCluster::new(1)?;
            m.create_topic(&types[0].topic(), 4, 1)?;
            let b = m.bootstrap_servers();
            mock = Some(m);
            b
        }
    };
    let store = Store::open(tmp.path().join("out").to_str().unwrap())?;
    let staging = Staging::open(tmp.path().join("staging"))?;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let gw = Gateway::start(l, &types, store.clone(), GatewaySettings::new(&brokers))?;
    let w = Writer::start(
        types[0].clone(),
        staging,
        store,
        WriterSettings::new(&brokers),
    )?;
    Ok((
        gw.addr(),
        InProcess {
            _gateway: gw,
            _writer: w,
            _mock: mock,
        },
    ))
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}
