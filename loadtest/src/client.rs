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
use std::task::Poll;
use std::time::Duration;

use push_proto::auth::Authenticator;
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

/// The device ID of every load-test client: one client per user, so (user, device) is
/// unique, and a reconnect with the same device takes over delivery at once.
pub const DEVICE: &str = "lt";

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
    /// Mints the token of each connect. A client keeps no token between connects: a JWT is
    /// ~200 bytes, a million of them 200 MB of the load generator's memory.
    pub auth: Authenticator,
    /// User IDs are `prefix` + the client's index.
    pub prefix: String,
    /// Lifetime of the tokens minted.
    pub token_ttl: Duration,
}

/// One client's identity.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Global client index (user `prefix + index`).
    pub index: u64,
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

/// A connect under way: the target's index, the connection, and how long it took.
type Opening = Pin<Box<dyn Future<Output = Opened> + Send>>;
type Opened = (usize, anyhow::Result<Box<Conn>>, Duration);

/// A live connection and what this client checks on it.
#[derive(Debug)]
struct Live {
    /// Boxed: a `Live` is moved between the states of the client's future (current,
    /// closing, just opened), and each state it may be in is a slot of that future's size.
    conn: Box<Conn>,
    target: usize,
    /// Last message ID on this connection: IDs must increase on one connection.
    last_id: Option<u64>,
    /// When the client hears nothing for this long, it takes the peer for dead.
    silent_after: Option<Duration>,
    last_heard: Instant,
}

/// Runs one client until `control` says stop.
///
/// A function returning an `async move` block, not an `async fn`: an `async fn` keeps its
/// arguments twice (as passed, and moved into its body), and this future is what a load
/// process holds per client for the whole run.
#[allow(clippy::manual_async_fn)]
pub fn run(
    spec: Spec,
    env: Arc<Env>,
    mut control: watch::Receiver<Control>,
) -> impl Future<Output = ()> + Send {
    let mut c = Client {
        spec,
        env,
        seen: HashSet::new(),
        resume_id: None,
        reconnected: false,
    };
    async move {
        let Some(first) = c.first_connect(&mut control).await else {
            return;
        };
        c.env.stats.count(|k| k.clients_connected += 1);
        c.hold(first, control).await;
    }
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
        let (source, transport) = (self.spec.source, self.spec.transport);
        let user = format!("{}{}", self.env.prefix, self.spec.index);
        let token = self.env.auth.mint(&user, Some(DEVICE), self.env.token_ttl);
        let (since, timeout) = (self.resume_id, self.env.connect_timeout);
        Box::pin(async move {
            sleep(delay).await;
            let start = Instant::now();
            let r = conn::open(source, addr, transport, &token, since, timeout)
                .await
                .map(Box::new);
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

    fn live(&self, conn: Box<Conn>, target: usize) -> Live {
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
                    self.env.stats.connected(took.as_micros() as u64, false);
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
    ///
    /// This future is what a load process holds per client, so it is kept small: one timer
    /// for every deadline (a new `Sleep` per deadline per turn cost 112 bytes each, and a
    /// timer registration each per event), events handled without an `.await` of their own,
    /// and the once-per-client stop in a box of its own. Its state is made before the
    /// `async move` block and moved in, so that nothing is stored twice.
    #[allow(clippy::manual_async_fn)]
    fn hold(
        &mut self,
        first: Live,
        mut control: watch::Receiver<Control>,
    ) -> impl Future<Output = ()> + Send + '_ {
        let stats = self.env.stats.clone();
        let mut current = Some(first);
        let mut closing: Option<(Live, Instant)> = None;
        let mut opening: Option<Opening> = None;
        let mut random_close = self.random_close_at();
        let mut storm_seen = control.borrow().storm;
        let far = Instant::now() + Duration::from_secs(86_400 * 365);
        // Boxed: pinned inside the block, it would be stored twice (moved, then pinned).
        let mut timer = Box::pin(sleep_until(far));
        async move {
            loop {
                let silent_at = current
                    .as_ref()
                    .and_then(|l| l.silent_after.map(|d| l.last_heard + d))
                    .unwrap_or(far);
                let close_by = closing.as_ref().map_or(far, |(_, t)| *t);
                let drop_at = random_close.filter(|_| current.is_some()).unwrap_or(far);
                let wake = drop_at.min(silent_at).min(close_by);
                // Set again only when a deadline came nearer (or the timer went off): every
                // event moves `silent_at` later, and a reset per event was a timer-wheel
                // removal and insertion per heartbeat. A timer that goes off early finds
                // nothing due and is set to the later deadline.
                if wake < timer.deadline() || timer.is_elapsed() {
                    timer.as_mut().reset(wake);
                }
                tokio::select! {
                    ev = next(current.as_mut()) => {
                        let live = current.as_mut().expect("next() pends without a connection");
                        live.last_heard = Instant::now();
                        let (step, reply) = self.handle(live, ev);
                        live.send(reply, &stats).await;
                        match step {
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
                    ev = next(closing.as_mut().map(|(l, _)| l)) => {
                        let (live, _) = closing.as_mut().expect("next() pends without a connection");
                        let (step, reply) = self.handle(live, ev);
                        live.send(reply, &stats).await;
                        if let Step::Closed(_) = step {
                            closing = None;
                        }
                    }
                    (target, result, took) = poll_opening(&mut opening) => {
                        opening = None;
                        match result {
                            Ok(conn) => {
                                stats.connected(took.as_micros() as u64, current.is_some());
                                stats.reconnected();
                                if !self.reconnected {
                                    self.reconnected = true;
                                    stats.count(|k| k.clients_reconnected += 1);
                                }
                                let new = self.live(conn, target);
                                if let Some(mut old) = current.replace(new) {
                                    // The new connection has its hello: now leave the old one.
                                    old.conn.start_close().await;
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
                    () = &mut timer => {
                        let now = Instant::now();
                        if drop_at <= now {
                            // An app killed or a network lost: drop first, reconnect after.
                            let mut old = current.take().expect("guarded by drop_at");
                            // Counted before the close's write, as the state it follows.
                            stats.count(|k| { k.client_random_closes += 1; k.open -= 1; });
                            old.conn.start_close().await;
                            if opening.is_none() {
                                opening = Some(self.opening(old.target, Duration::ZERO));
                            }
                            closing = Some((old, Instant::now() + CLOSE_WAIT));
                            random_close = None;
                        } else if silent_at <= now {
                            let old = current.take().expect("guarded by silent_at");
                            stats.server_closed("silent".into());
                            stats.count(|k| k.open -= 1);
                            drop(old);
                            if opening.is_none() {
                                opening = Some(self.opening(self.home(), Duration::ZERO));
                            }
                        } else if close_by <= now {
                            // The server did not answer our close in time; drop the socket.
                            closing = None;
                        }
                        // Else a deadline moved later since the timer was set: nothing is due.
                    }
                }
            }
            // Boxed: it runs once per client, and inline it would make every client's future
            // larger for the whole run.
            let open = [current, closing.map(|(l, _)| l)];
            Box::pin(self.close_all(open)).await;
        }
    }

    /// Stop: closes what is open, politely but bounded in time.
    async fn close_all(&mut self, open: [Option<Live>; 2]) {
        let deadline = Instant::now() + Duration::from_secs(2);
        let stats = self.env.stats.clone();
        for mut live in open.into_iter().flatten() {
            live.conn.start_close().await;
            while Instant::now() < deadline {
                match tokio::time::timeout_at(deadline, live.conn.next_event()).await {
                    Ok(Event::Closed(_)) | Err(_) => break,
                    Ok(ev) => {
                        let (_, reply) = self.handle(&mut live, ev);
                        live.send(reply, &stats).await;
                    }
                }
            }
        }
    }

    /// Acts on one event of `live` (current or closing): what the loop does next, and what
    /// to send back.
    fn handle(&mut self, live: &mut Live, ev: Event) -> (Step, Reply) {
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
                let reply = if self.env.ack {
                    Reply::Ack(id)
                } else {
                    Reply::None
                };
                (Step::Continue, reply)
            }
            Event::Ping(payload) => {
                stats.count(|k| k.heartbeats += 1);
                (Step::Continue, Reply::Pong(payload))
            }
            Event::Heartbeat => {
                stats.count(|k| k.heartbeats += 1);
                (Step::Continue, Reply::None)
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
                (Step::Reconnect(drain), Reply::None)
            }
            Event::Other(text) => {
                if text.starts_with("protocol_error") {
                    stats.violation("protocol_error", text);
                    return (Step::Closed(None), Reply::None);
                }
                if matches!(
                    push_proto::message::parse_server_message(&text),
                    Ok(push_proto::message::Received::Hello(_))
                ) {
                    stats.violation("second_hello", text);
                }
                (Step::Continue, Reply::None)
            }
            Event::Closed(code) => (Step::Closed(code), Reply::None),
        }
    }
}

/// What a client sends back after an event.
#[derive(Debug)]
enum Reply {
    None,
    /// Answer a WebSocket ping with this payload.
    Pong(Vec<u8>),
    /// Ack message `id` (WebSocket; nothing is sent on SSE).
    Ack(u64),
}

impl Live {
    /// Sends `reply`. A failed write shows up as `Closed` on the next read.
    async fn send(&mut self, reply: Reply, stats: &Stats) {
        match reply {
            Reply::None => {}
            Reply::Pong(payload) => {
                let _ = self.conn.pong(&payload).await;
            }
            Reply::Ack(id) => {
                if matches!(self.conn.ack(id).await, Ok(true)) {
                    stats.count(|k| k.acks_sent += 1);
                }
            }
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

/// The next event of `live`'s connection; pends for ever without one.
///
/// A `poll_fn` over `Conn::poll_event` rather than `next_event().await`: the futures of a
/// `select!` are stored side by side in the client's future, and the two calls hold a
/// reference each instead of a readiness future each.
fn next(mut live: Option<&mut Live>) -> impl Future<Output = Event> + '_ {
    std::future::poll_fn(move |cx| match live.as_deref_mut() {
        Some(l) => l.conn.poll_event(cx),
        None => Poll::Pending,
    })
}

async fn poll_opening(o: &mut Option<Opening>) -> Opened {
    match o {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A load process holds this future per client for the whole run: it was 4,536 bytes
    /// (5.9 KiB of RSS per client with its task), and a million clients need it small
    /// (docs/BENCHMARKS.md, "The load generator's bytes per client").
    #[test]
    fn client_future_stays_small() {
        let (_tx, rx) = watch::channel(Control::default());
        let env = Arc::new(Env {
            targets: vec![],
            stats: Arc::default(),
            ramp_permits: Arc::new(Semaphore::new(1)),
            ramp_deadline: Instant::now(),
            connect_timeout: Duration::ZERO,
            ack: false,
            client_lifetime: None,
            auth: Authenticator::new(b"0123456789abcdef0123", false),
            prefix: String::new(),
            token_ttl: Duration::ZERO,
        });
        let spec = Spec {
            index: 0,
            source: std::net::Ipv4Addr::LOCALHOST.into(),
            transport: crate::conn::Transport::Ws,
        };
        let size = std::mem::size_of_val(&run(spec, env, rx));
        eprintln!("client future: {size} bytes");
        assert!(size <= 1024, "client future is {size} bytes");
    }
}
