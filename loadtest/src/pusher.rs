//! Drives pushes at a fixed rate through the admin API, `POST /v1/push/{user}`, over
//! keep-alive HTTP/1.1 connections (32 by default, as a backend with a connection pool).
//!
//! Message `m` goes to user `m % users` at `start + m / rate`; its payload is
//! `{"s":m,"t":<that scheduled time, µs since the epoch>}`. Stamping the *scheduled* time,
//! not the moment the request left, keeps a slow pusher or server from hiding latency
//! (coordinated omission): if requests fall behind, the clients see it.
//!
//! With `--kafka-brokers`, messages go through push-lib and Kafka instead (one envelope per
//! message, key = user), and a message processor delivers them: the same payload and the same
//! end-to-end latency, measured across the whole pipeline. `--kafka-share` sends only that
//! fraction through Kafka, spread evenly over the messages, and the rest through the admin
//! API, so that one run exercises both paths.
//!
//! A user's pushes go to the node its client started on; if that node answers
//! `delivered: 0` or fails (the client moved after a drain), the other nodes are tried in
//! turn. A message no node delivered is counted as `not_connected` or `failed`, and the
//! report counts it as lost: the backend asked for it and nobody got it.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context as _};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::stats::{new_histogram, unix_micros};

/// Bound of one admin request; a push is a few hundred bytes and a local round trip.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// What to push.
#[derive(Debug, Clone)]
pub struct PushConfig {
    /// Admin ports of the nodes, in the order of the client targets.
    pub admin_targets: Vec<SocketAddr>,
    /// Bearer token for `/v1/*`, if the nodes require one.
    pub admin_token: Option<String>,
    /// Messages per second, over all connections.
    pub rate: f64,
    /// Keep-alive HTTP connections.
    pub conns: usize,
    /// Users with a client: `prefix0 .. prefix(users-1)`.
    pub users: u64,
    /// Extra users with no client (`prefix` + `ghost-N`): a self-check that losses show.
    pub ghost_users: u64,
    /// User ID prefix.
    pub prefix: String,
    /// How long to push.
    pub duration: Duration,
    /// Push through Kafka (push-lib) instead of the admin API (all messages, or the
    /// target's `share` of them).
    pub kafka: Option<KafkaTarget>,
}

/// Where push-lib produces in Kafka mode.
#[derive(Debug, Clone)]
pub struct KafkaTarget {
    /// Bootstrap servers.
    pub brokers: String,
    /// The topic the message processors consume.
    pub topic: String,
    /// Extra librdkafka producer properties.
    pub extra: Vec<(String, String)>,
    /// Fraction of the messages sent through Kafka, in (0, 1]; the others go through the
    /// admin API.
    pub share: f64,
}

impl KafkaTarget {
    /// Whether message `m` goes through Kafka: message `m` does when `floor((m + 1) × share)`
    /// passes `floor(m × share)`, so the Kafka messages are spread evenly (share 0.25: every
    /// fourth message) and their count over `n` messages is `floor(n × share)`.
    pub fn takes(&self, m: u64) -> bool {
        ((m + 1) as f64 * self.share).floor() > (m as f64 * self.share).floor()
    }
}

/// Counters of the pusher.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PushCounts {
    /// Messages the pusher tried to send.
    pub attempted: u64,
    /// Messages a node delivered to at least one connection.
    pub delivered: u64,
    /// Messages every node answered with `delivered: 0`.
    pub not_connected: u64,
    /// Messages that failed on every node (HTTP error, connection error, timeout).
    pub failed: u64,
    /// Messages that went to another node than the user's first one.
    pub rerouted: u64,
    /// Kafka mode: messages the broker acknowledged (delivery is then the processor's).
    pub queued: u64,
}

/// Live state of the pusher, shared with the progress display.
#[derive(Debug)]
pub struct PushStats {
    inner: Mutex<(PushCounts, Histogram<u64>)>,
}

impl Default for PushStats {
    fn default() -> Self {
        Self {
            inner: Mutex::new((PushCounts::default(), new_histogram())),
        }
    }
}

impl PushStats {
    /// Counters so far.
    pub fn counts(&self) -> PushCounts {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .clone()
    }

    /// Counters and the request-latency histogram (µs).
    pub fn snapshot(&self) -> (PushCounts, Histogram<u64>) {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn record(&self, f: impl FnOnce(&mut PushCounts), request_us: Option<u64>) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut g.0);
        if let Some(us) = request_us {
            g.1.saturating_record(us.max(1));
        }
    }
}

/// Pushes for `cfg.duration` at `cfg.rate`; returns when every request has an answer.
pub async fn run(cfg: PushConfig, stats: Arc<PushStats>) {
    if cfg.rate <= 0.0 || cfg.users + cfg.ghost_users == 0 {
        return;
    }
    let total = (cfg.rate * cfg.duration.as_secs_f64()).floor() as u64;
    let start = Instant::now();
    let start_unix = unix_micros();
    let kafka = match &cfg.kafka {
        None => None,
        Some(k) => {
            let mut kc = push_lib::KafkaConfig::new(k.brokers.clone(), k.topic.clone());
            kc.extra = k.extra.clone();
            match push_lib::PushClient::kafka(&kc) {
                Ok(c) => Some(Arc::new(c)),
                Err(e) => {
                    eprintln!("loadtest: cannot create the Kafka producer: {e}");
                    stats.record(
                        |c| {
                            c.attempted += total;
                            c.failed += total;
                        },
                        None,
                    );
                    return;
                }
            }
        }
    };
    let cfg = Arc::new(cfg);
    let conns = cfg.conns.max(1) as u64;
    let mut tasks = tokio::task::JoinSet::new();
    for lane in 0..conns.min(total) {
        let (cfg, stats, kafka) = (cfg.clone(), stats.clone(), kafka.clone());
        tasks.spawn(async move {
            let mut streams: Vec<Option<TcpStream>> =
                (0..cfg.admin_targets.len()).map(|_| None).collect();
            let mut m = lane;
            while m < total {
                let offset = Duration::from_secs_f64(m as f64 / cfg.rate);
                tokio::time::sleep_until(start + offset).await;
                let stamp = start_unix + offset.as_micros() as u64;
                match (&kafka, &cfg.kafka) {
                    (Some(client), Some(target)) if target.takes(m) => {
                        enqueue_one(&cfg, &stats, client, m, stamp).await;
                    }
                    _ => push_one(&cfg, &stats, &mut streams, m, stamp).await,
                }
                m += conns;
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    // Kafka mode: every message also needs the broker's answer.
    while stats.counts().attempted < total {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The user of message `m`, and the index of its client's first node.
fn user_of(cfg: &PushConfig, m: u64) -> (String, usize) {
    let all = cfg.users + cfg.ghost_users;
    let k = m % all;
    if k < cfg.users {
        let nodes = cfg.admin_targets.len().max(1) as u64;
        (format!("{}{k}", cfg.prefix), (k % nodes) as usize)
    } else {
        (format!("{}ghost-{}", cfg.prefix, k - cfg.users), 0)
    }
}

/// Kafka mode: hands message `m` to the producer; the broker's acknowledgement is awaited off
/// the lane, so a lane keeps its schedule while earlier messages are in flight.
async fn enqueue_one(
    cfg: &PushConfig,
    stats: &Arc<PushStats>,
    client: &push_lib::PushClient,
    m: u64,
    stamp: u64,
) {
    let (user, _) = user_of(cfg, m);
    let env = push_lib::Envelope::new(user, serde_json::json!({ "s": m, "t": stamp }));
    let sent = Instant::now();
    match client.enqueue(env).await {
        Ok(ack) => {
            let stats = stats.clone();
            tokio::spawn(async move {
                let ok = ack.await.is_ok();
                let us = sent.elapsed().as_micros() as u64;
                stats.record(
                    |c| {
                        c.attempted += 1;
                        if ok {
                            c.queued += 1;
                        } else {
                            c.failed += 1;
                        }
                    },
                    Some(us),
                );
            });
        }
        Err(_) => stats.record(
            |c| {
                c.attempted += 1;
                c.failed += 1;
            },
            None,
        ),
    }
}

async fn push_one(
    cfg: &PushConfig,
    stats: &PushStats,
    streams: &mut [Option<TcpStream>],
    m: u64,
    stamp: u64,
) {
    let (user, home) = user_of(cfg, m);
    let body = format!(r#"{{"s":{m},"t":{stamp}}}"#);
    let n = cfg.admin_targets.len();
    let (mut zero, mut first_us) = (false, None);
    for i in 0..n {
        let t = (home + i) % n;
        let sent = Instant::now();
        let answer = post(cfg, &mut streams[t], cfg.admin_targets[t], &user, &body).await;
        first_us.get_or_insert(sent.elapsed().as_micros() as u64);
        match answer {
            Ok(delivered) if delivered > 0 => {
                stats.record(
                    |c| {
                        c.attempted += 1;
                        c.delivered += 1;
                        c.rerouted += u64::from(i > 0);
                    },
                    first_us,
                );
                return;
            }
            Ok(_) => zero = true,
            Err(_) => streams[t] = None,
        }
    }
    stats.record(
        |c| {
            c.attempted += 1;
            if zero {
                c.not_connected += 1;
            } else {
                c.failed += 1;
            }
        },
        first_us,
    );
}

/// One `POST /v1/push/{user}` on a kept-alive connection (opened if needed); returns the
/// `delivered` count of the answer.
async fn post(
    cfg: &PushConfig,
    slot: &mut Option<TcpStream>,
    addr: SocketAddr,
    user: &str,
    body: &str,
) -> anyhow::Result<u64> {
    let auth = cfg
        .admin_token
        .as_ref()
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "POST /v1/push/{user} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         {auth}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let Response { status, body, .. } = exchange(slot, addr, request.as_bytes()).await?;
    if status != 200 {
        *slot = None;
        bail!("HTTP {status}: {}", String::from_utf8_lossy(&body));
    }
    let v: serde_json::Value = serde_json::from_slice(&body).context("answer is not JSON")?;
    Ok(v["delivered"].as_u64().unwrap_or(0))
}

/// Sends `request` on the kept-alive connection in `slot` (opened, with Nagle off, if there
/// is none) and reads the answer, within five seconds. The connection is dropped when
/// the server says `Connection: close` (Pushpin's publish API does, every time) or the
/// exchange fails, so the next call opens a new one.
pub async fn exchange(
    slot: &mut Option<TcpStream>,
    addr: SocketAddr,
    request: &[u8],
) -> anyhow::Result<Response> {
    let result = tokio::time::timeout(REQUEST_TIMEOUT, async {
        if slot.is_none() {
            let s = TcpStream::connect(addr)
                .await
                .with_context(|| format!("connect {addr}"))?;
            // Requests are small and answered one at a time: do not let Nagle hold them.
            s.set_nodelay(true)?;
            *slot = Some(s);
        }
        let stream = slot.as_mut().expect("just set");
        stream.write_all(request).await?;
        read_response(stream).await
    })
    .await
    .unwrap_or_else(|_| {
        Err(anyhow::anyhow!(
            "no answer from {addr} within {REQUEST_TIMEOUT:?}"
        ))
    });
    if !matches!(&result, Ok(r) if !r.close) {
        *slot = None;
    }
    result
}

/// One HTTP response.
#[derive(Debug)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// The body.
    pub body: Vec<u8>,
    /// The server said `Connection: close`: the next request needs a new connection.
    pub close: bool,
}

/// Reads one response with a `Content-Length` body (the admin API always sends one; so do
/// the peers' publish endpoints that `bench peers-push` posts to).
pub async fn read_response(stream: &mut TcpStream) -> anyhow::Result<Response> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            bail!("connection closed before the answer");
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        if let httparse::Status::Complete(head_len) = resp.parse(&buf)? {
            let status = resp.code.unwrap_or(0);
            let close = resp.headers.iter().any(|h| {
                h.name.eq_ignore_ascii_case("connection") && h.value.eq_ignore_ascii_case(b"close")
            });
            let len: usize = resp
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok())
                .unwrap_or(0);
            while buf.len() < head_len + len {
                let n = stream.read(&mut chunk).await?;
                if n == 0 {
                    bail!("connection closed in the body");
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            return Ok(Response {
                status,
                body: buf[head_len..head_len + len].to_vec(),
                close,
            });
        }
        if buf.len() > 64 * 1024 {
            bail!("response head too large");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(share: f64) -> KafkaTarget {
        KafkaTarget {
            brokers: String::new(),
            topic: String::new(),
            extra: Vec::new(),
            share,
        }
    }

    #[test]
    fn a_kafka_share_takes_that_fraction_of_the_messages_spread_evenly() {
        let all = target(1.0);
        assert!((0..1000).all(|m| all.takes(m)));
        let quarter = target(0.25);
        let taken: Vec<u64> = (0..16).filter(|&m| quarter.takes(m)).collect();
        assert_eq!(taken, [3, 7, 11, 15]);
        for share in [0.1, 0.3, 0.5, 0.9] {
            let t = target(share);
            let n = (0..10_000).filter(|&m| t.takes(m)).count() as f64;
            assert!((n - 10_000.0 * share).abs() <= 1.0, "{share}: {n}");
        }
    }
}
