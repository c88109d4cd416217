//! One simulated client: a user's connection over the whole run, across reconnects.
//!
//! It behaves as docs/protocol.md asks of a well-behaved client: answers pings; on
//! `reconnect` opens the new connection first, waits for its `hello`, then closes the old
//! one itself (so TIME_WAIT stays here, not on the server); resumes after the last ID seen
//! (the server may ignore it); acks each message when asked; deduplicates by payload
//! sequence number. It also checks the server: hello first, IDs increasing on a connection.

use std::collections::HashSet;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng as _;
use serde::Deserialize;
use tokio::sync::{watch, Semaphore};
use tokio::time::{sleep, sleep_until, Instant};

use crate::conn::{self, Conn, Event, Transport};
use crate::stats::{unix_micros, Stats};

/// Time an old connection has to finish its close handshake before it is dropped.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// Pause before retrying a failed connect, so a refusing node (draining, at capacity) is not
/// hammered; the next attempt goes to the next target.
const RETRY_BACKOFF: Duration = Duration::from_millis(200);

/// What the worker tells its clients.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Control {
    /// Close everything and return.
    pub stop: bool,
    /// Bumped to make every client reconnect at once (the `storm` scenario).
    pub storm: u64,
}

/// Settings and shared state of all clients of a worker.
#[derive(Debug)]
pub struct Env {
    /// Client ports of the nodes.
    pub targets: Vec<SocketAddr>,
    /// Measurements.
    pub stats: Arc<Stats>,
    /// Bounds first connects in flight (the ramp). Reconnects do not take a permit: a herd
    /// is what the storm and drain scenarios want to see.
    pub ramp_permits: Arc<Semaphore>,
    /// First connects stop retrying at this instant.
    pub ramp_deadline: Instant,
    /// Per-attempt bound for connect + request + hello.
    pub connect_timeout: Duration,
    /// Send an ack for each message (WebSocket).
    pub ack: bool,
    /// Mean lifetime after which a client drops its connection by itself, if set.
    pub client_lifetime: Option<Duration>,
}

/// One client's identity.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Global client index (user `prefix + index`).
    pub index: u64,
    /// Token for the user.
    pub token: String,
    /// Source address to bind.
    pub source: IpAddr,
    /// Transport.
    pub transport: Transport,
}

/// The load-test payload: sequence number (global, unique per message) and the time the
/// push was scheduled, µs since the Unix epoch.
#[derive(Debug, Deserialize)]
struct Payload {
    s: u64,
    t: u64,
}

type Opening = Pin<Box<dyn Future<Output = (usize, anyhow::Result<Conn>, Duration)> + Send>>;

/// A live connection and what this client checks on it.
#[derive(Debug)]
struct Live {
    conn: Conn,
    target: usize,
    /// Last message ID on this connection: IDs must increase on one connection.
    last_id: Option<u64>,
    /// When the client hears nothing for this long, it takes the peer for dead.
    silent_after: Option<Duration>,
    last_heard: Instant,
}

/// Runs one client until `control` says stop.
pub async fn run(spec: Spec, env: Arc<Env>, mut control: watch::Receiver<Control>) {
    let mut c = Client {
        spec,
        env,
        seen: HashSet::new(),
        resume_id: None,
        reconnected: false,
    };
    let Some(first) = c.first_connect(&mut control).await else {
        return;
    };
    c.env.stats.count(|k| k.clients_connected += 1);
    c.hold(first, control).await;
}

#[derive(Debug)]
struct Client {
    spec: Spec,
    env: Arc<Env>,
    /// Sequence numbers seen: duplicates are counted, not delivered twice.
    seen: HashSet<u64>,
    /// Highest message ID seen, sent on reconnect to resume.
    resume_id: Option<u64>,
    reconnected: bool,
}

impl Client {
    fn home(&self) -> usize {
        (self.spec.index % self.env.targets.len() as u64) as usize
    }

    fn opening(&self, target: usize, delay: Duration) -> Opening {
        let addr = self.env.targets[target];
        let (source, transport, token) = (
            self.spec.source,
            self.spec.transport,
            self.spec.token.clone(),
        );
        let (since, timeout) = (self.resume_id, self.env.connect_timeout);
        Box::pin(async move {
            sleep(delay).await;
            let start = Instant::now();
            let r = conn::open(source, addr, transport, &token, since, timeout).await;
            (target, r, start.elapsed())
        })
    }

    fn failed(&self, e: &anyhow::Error) {
        let kind = conn::error_kind(e);
        if conn::is_hello_not_first(e) {
            self.env
                .stats
                .violation("hello_not_first", format!("{e:#}"));
        }
        self.env.stats.connect_failed(kind);
    }

    fn live(&self, conn: Conn, target: usize) -> Live {
        let hb = conn.hello.heartbeat_ms;
        Live {
            conn,
            target,
            last_id: None,
            // Three heartbeats missed, as docs/protocol.md advises.
            silent_after: (hb > 0).then(|| Duration::from_millis(hb * 3)),
            last_heard: Instant::now(),
        }
    }

    /// The first connection, retried (next target each time) until the ramp deadline.
    async fn first_connect(&mut self, control: &mut watch::Receiver<Control>) -> Option<Live> {
        let mut target = self.home();
        loop {
            let permit = self.env.ramp_permits.clone().acquire_owned().await.ok()?;
            let (t, result, took) = self.opening(target, Duration::ZERO).await;
            drop(permit);
            match result {
                Ok(conn) => {
                    self.env.stats.connected(took.as_micros() as u64);
                    return Some(self.live(conn, t));
                }
                Err(e) => self.failed(&e),
            }
            if control.borrow().stop || Instant::now() + RETRY_BACKOFF >= self.env.ramp_deadline {
                return None;
            }
            sleep(RETRY_BACKOFF).await;
            target = (target + 1) % self.env.targets.len();
        }
    }

    fn random_close_at(&self) -> Option<Instant> {
        let mean = self.env.client_lifetime?;
        // Uniform in [0.5, 1.5) × mean, so clients do not all drop together.
        let f: f64 = rand::rng().random_range(0.5..1.5);
        Some(Instant::now() + mean.mul_f64(f))
    }

    /// Holds the connection, reconnecting as asked, until stop.
    async fn hold(&mut self, first: Live, mut control: watch::Receiver<Control>) {
        let stats = self.env.stats.clone();
        let mut current = Some(first);
        let mut closing: Option<(Live, Instant)> = None;
        let mut opening: Option<Opening> = None;
        let mut random_close = self.random_close_at();
        let mut storm_seen = control.borrow().storm;
        let far = Instant::now() + Duration::from_secs(86_400 * 365);
        loop {
            let silent_at = current
                .as_ref()
                .and_then(|l| l.silent_after.map(|d| l.last_heard + d))
                .unwrap_or(far);
            let close_by = closing.as_ref().map_or(far, |(_, t)| *t);
            let drop_at = random_close.filter(|_| current.is_some()).unwrap_or(far);
            tokio::select! {
                ev = next(&mut current) => {
                    let live = current.as_mut().expect("next() pends without a connection");
                    live.last_heard = Instant::now();
                    match self.handle(live, ev).await {
                        Step::Continue => {}
                        Step::Reconnect(drain) => {
                            if opening.is_none() {
                                let t = if drain { (live.target + 1) % self.env.targets.len() } else { live.target };
                                opening = Some(self.opening(t, Duration::ZERO));
                            }
                        }
                        Step::Closed(code) => {
                            let old = current.take().expect("handled a live connection");
                            stats.server_closed(code.map_or_else(|| "eof".into(), |c| c.to_string()));
                            stats.count(|k| k.open -= 1);
                            if opening.is_none() {
                                // 1001: the node is going away; try the next one first.
                                let t = if code == Some(1001) { (old.target + 1) % self.env.targets.len() } else { old.target };
                                opening = Some(self.opening(t, Duration::ZERO));
                            }
                        }
                    }
                }
                ev = next_closing(&mut closing) => {
                    let (live, _) = closing.as_mut().expect("next_closing() pends without a connection");
                    if let Step::Closed(_) = self.handle(live, ev).await {
                        closing = None;
                    }
                }
                (target, result, took) = poll_opening(&mut opening) => {
                    opening = None;
                    match result {
                        Ok(conn) => {
                            stats.connected(took.as_micros() as u64);
                            stats.reconnected();
                            if !self.reconnected {
                                self.reconnected = true;
                                stats.count(|k| k.clients_reconnected += 1);
                            }
                            let new = self.live(conn, target);
                            if let Some(mut old) = current.replace(new) {
                                // The new connection has its hello: now leave the old one.
                                old.conn.start_close().await;
                                stats.count(|k| { k.client_initiated_closes += 1; k.open -= 1; });
                                closing = Some((old, Instant::now() + CLOSE_WAIT));
                            }
                            random_close = self.random_close_at();
                        }
                        Err(e) => {
                            self.failed(&e);
                            let next = (target + 1) % self.env.targets.len();
                            opening = Some(self.opening(next, RETRY_BACKOFF));
                        }
                    }
                }
                _ = control.changed() => {
                    let ctl = *control.borrow();
                    if ctl.stop {
                        break;
                    }
                    if ctl.storm != storm_seen {
                        storm_seen = ctl.storm;
                        if let (Some(live), None) = (&current, &opening) {
                            stats.count(|k| k.storm_reconnects += 1);
                            opening = Some(self.opening(live.target, Duration::ZERO));
                        }
                    }
                }
                () = sleep_until(drop_at) => {
                    // An app killed or a network lost: drop first, reconnect after.
                    let mut old = current.take().expect("guarded by drop_at");
                    old.conn.start_close().await;
                    stats.count(|k| { k.client_random_closes += 1; k.open -= 1; });
                    if opening.is_none() {
                        opening = Some(self.opening(old.target, Duration::ZERO));
                    }
                    closing = Some((old, Instant::now() + CLOSE_WAIT));
                    random_close = None;
                }
                () = sleep_until(silent_at) => {
                    let old = current.take().expect("guarded by silent_at");
                    stats.server_closed("silent".into());
                    stats.count(|k| k.open -= 1);
                    drop(old);
                    if opening.is_none() {
                        opening = Some(self.opening(self.home(), Duration::ZERO));
                    }
                }
                () = sleep_until(close_by) => {
                    // The server did not answer our close in time; drop the socket.
                    closing = None;
                }
            }
        }
        // Stop: close what is open, politely but bounded in time.
        let deadline = Instant::now() + Duration::from_secs(2);
        for mut live in [current, closing.map(|(l, _)| l)].into_iter().flatten() {
            live.conn.start_close().await;
            while Instant::now() < deadline {
                match tokio::time::timeout_at(deadline, live.conn.next_event()).await {
                    Ok(Event::Closed(_)) | Err(_) => break,
                    Ok(ev) => {
                        let _ = self.handle(&mut live, ev).await;
                    }
                }
            }
        }
    }

    /// Acts on one event of `live` (current or closing).
    async fn handle(&mut self, live: &mut Live, ev: Event) -> Step {
        let stats = &self.env.stats;
        match ev {
            Event::Message { id, data, .. } => {
                if let Some(last) = live.last_id.filter(|&last| id <= last) {
                    stats.violation(
                        "out_of_order",
                        format!(
                            "client {} conn {}: id {id} after {last}",
                            self.spec.index, live.conn.hello.conn_id
                        ),
                    );
                }
                live.last_id = Some(id);
                self.resume_id = Some(self.resume_id.map_or(id, |r| r.max(id)));
                match serde_json::from_str::<Payload>(&data) {
                    Ok(p) if self.seen.insert(p.s) => {
                        stats.message(unix_micros().saturating_sub(p.t));
                    }
                    Ok(_) => stats.count(|k| {
                        k.messages_received += 1;
                        k.duplicates += 1;
                    }),
                    Err(_) => stats.count(|k| {
                        k.messages_received += 1;
                        k.foreign_messages += 1;
                    }),
                }
                if self.env.ack && matches!(live.conn.ack(id).await, Ok(true)) {
                    stats.count(|k| k.acks_sent += 1);
                }
                Step::Continue
            }
            Event::Ping(payload) => {
                stats.count(|k| k.heartbeats += 1);
                // A failed write shows up as Closed on the next read.
                let _ = live.conn.pong(&payload).await;
                Step::Continue
            }
            Event::Heartbeat => {
                stats.count(|k| k.heartbeats += 1);
                Step::Continue
            }
            Event::Reconnect { reason } => {
                let drain = reason == "drain";
                stats.count(|k| {
                    if drain {
                        k.drain_requests += 1;
                    } else {
                        k.rotate_requests += 1;
                    }
                });
                Step::Reconnect(drain)
            }
            Event::Other(text) => {
                if text.starts_with("protocol_error") {
                    stats.violation("protocol_error", text);
                    return Step::Closed(None);
                }
                if matches!(
                    push_proto::message::parse_server_message(&text),
                    Ok(push_proto::message::Received::Hello(_))
                ) {
                    stats.violation("second_hello", text);
                }
                Step::Continue
            }
            Event::Closed(code) => Step::Closed(code),
        }
    }
}

/// What the client loop does after an event.
#[derive(Debug)]
enum Step {
    Continue,
    /// The server asked for a new connection (`true`: drain, go to another node).
    Reconnect(bool),
    /// The connection ended, with the server's close code if it sent one.
    Closed(Option<u16>),
}

async fn next(live: &mut Option<Live>) -> Event {
    match live {
        Some(l) => l.conn.next_event().await,
        None => std::future::pending().await,
    }
}

async fn next_closing(live: &mut Option<(Live, Instant)>) -> Event {
    match live {
        Some((l, _)) => l.conn.next_event().await,
        None => std::future::pending().await,
    }
}

async fn poll_opening(o: &mut Option<Opening>) -> (usize, anyhow::Result<Conn>, Duration) {
    match o {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}
