//! One user's messages across connections.
//!
//! A [`Session`] holds one connection at a time and hides the protocol's connection
//! changes from its caller:
//! - **resume by ID**: every connection after the first asks for the messages after the last
//!   ID the caller was given (WebSocket `?since=`, SSE `Last-Event-ID`);
//! - **rotation and drain, new connection first**: on `reconnect` the session opens the new
//!   connection, then closes the old one and reads what the old one still had; a message
//!   both carried (or the resume replays) is given to the caller once, by its ID;
//! - **acks**: each message is acknowledged when it is handed over (WebSocket `ack`, SSE
//!   `POST /ack`), unless [`Options::auto_ack`] is off and the caller calls [`Session::ack`];
//! - **dead connections**: nothing at all (not even a heartbeat) for three heartbeat
//!   intervals counts as a dead connection, like a close;
//! - **reconnects** after a close or a failed attempt wait a backoff with full jitter and a
//!   cap, so clients cut off together do not come back together.
//!
//! The token source is called before each connection, so a token can be refreshed before it
//! expires.

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use push_proto::message::{self, Hello, Received};
use push_proto::Transport;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::conn::{self, Conn, Event};

/// How long the old connection is read after a switch, for what it still carried. The
/// server closes it within its reconnect grace anyway; what it had after this is also in
/// the history, which the new connection resumes from.
const OLD_CONNECTION_READ: Duration = Duration::from_secs(5);

/// Largest answer read from `POST /ack` (a status line and a short JSON error).
const MAX_ACK_ANSWER: usize = 4096;

/// Reconnect delays: full jitter, `uniform(0, min(cap, base × 2^attempt))`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The first attempt's upper bound.
    pub base: Duration,
    /// The largest delay.
    pub cap: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            base: Duration::from_millis(500),
            cap: Duration::from_secs(30),
        }
    }
}

impl Backoff {
    /// The delay before attempt `attempt` (0 for the first retry).
    pub fn delay(&self, attempt: u32, rng: &mut impl rand::Rng) -> Duration {
        let bound = self
            .base
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.cap);
        bound.mul_f64(rng.random::<f64>())
    }
}

/// How a session connects and behaves.
#[derive(Debug, Clone)]
pub struct Options {
    /// The node's client port.
    pub server: SocketAddr,
    /// WebSocket or SSE.
    pub transport: Transport,
    /// Local address to connect from (unspecified: the system picks).
    pub source: IpAddr,
    /// Resume after this ID on the first connection (a message ID the app kept).
    pub since: Option<u64>,
    /// Deadline of one connection attempt, up to the `hello`.
    pub connect_timeout: Duration,
    /// Acknowledge each message as it is handed over.
    pub auto_ack: bool,
    /// Delays between reconnect attempts.
    pub backoff: Backoff,
    /// Consecutive failed attempts after which [`Session::next`] gives up with
    /// [`SessionError::Connect`]; `None` keeps trying.
    pub max_attempts: Option<u32>,
}

impl Options {
    /// Defaults: any local address, 10 s to connect, automatic acks, 0.5 s to 30 s
    /// backoff, retry forever.
    pub fn new(server: SocketAddr, transport: Transport) -> Self {
        Self {
            server,
            transport,
            source: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            since: None,
            connect_timeout: Duration::from_secs(10),
            auto_ack: true,
            backoff: Backoff::default(),
            max_attempts: None,
        }
    }
}

/// A push, handed to the caller once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Per-user increasing ID: keep the last one to resume from after a restart.
    pub id: u64,
    /// The queue's message ID (push-lib envelope), if it came that way (WebSocket only).
    pub mid: Option<String>,
    /// The payload: JSON text on WebSocket (a JSON string for a text payload), the payload
    /// itself on SSE.
    pub data: String,
}

/// What a session reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Update {
    /// A connection is up (the first one, or one after a switch or a reconnect).
    Connected(Hello),
    /// A message.
    Message(Message),
    /// The history no longer covers the resume point: messages after `after` were lost
    /// (older than `oldest`). Refresh the app's state from its backend.
    Gap {
        /// The resume point asked for.
        after: u64,
        /// The oldest message the history still keeps, if it could be read.
        oldest: Option<u64>,
    },
    /// The connection ended (close code if the server sent one); the session reconnects on
    /// the next call.
    Disconnected {
        /// The WebSocket close code, if any.
        code: Option<u16>,
    },
}

/// Why a session stopped.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// No connection after [`Options::max_attempts`] attempts in a row.
    #[error("no connection to {server} after {attempts} attempts: {last:#}")]
    Connect {
        /// The node.
        server: SocketAddr,
        /// Attempts made.
        attempts: u32,
        /// The last attempt's error.
        last: anyhow::Error,
    },
    /// `POST /ack` (SSE) was refused.
    #[error("ack {id} refused: {answer}")]
    AckRefused {
        /// The message ID.
        id: u64,
        /// The status line.
        answer: String,
    },
    /// The socket failed while acknowledging.
    #[error("ack {id}: {source}")]
    AckIo {
        /// The message ID.
        id: u64,
        /// The socket error.
        source: std::io::Error,
    },
}

/// One user's messages across connections (see the module docs).
pub struct Session<F> {
    opts: Options,
    token: F,
    /// The token of the current connection (SSE acks carry it).
    current_token: String,
    conn: Option<Conn>,
    /// The last message ID handed over: resume point and duplicate filter.
    last_id: Option<u64>,
    /// Updates decided but not yet handed over (the old connection's last messages after a
    /// switch, a `Connected`).
    queued: VecDeque<Update>,
    /// Silence after which the connection counts as dead (from the hello's heartbeat).
    dead_after: Option<Duration>,
}

impl<F> std::fmt::Debug for Session<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("server", &self.opts.server)
            .field("transport", &self.opts.transport)
            .field("connected", &self.conn.is_some())
            .field("last_id", &self.last_id)
            .finish_non_exhaustive()
    }
}

impl<F: FnMut() -> String> Session<F> {
    /// Connects (retrying as [`Options::max_attempts`] allows); the first update is the
    /// `Connected` of this connection.
    pub async fn connect(opts: Options, token: F) -> Result<Self, SessionError> {
        let mut session = Self {
            last_id: opts.since,
            opts,
            token,
            current_token: String::new(),
            conn: None,
            queued: VecDeque::new(),
            dead_after: None,
        };
        let conn = session.open_with_retries().await?;
        session.install(conn);
        Ok(session)
    }

    /// The last message ID handed over (the resume point).
    pub fn last_id(&self) -> Option<u64> {
        self.last_id
    }

    /// The next update. Errors only when reconnecting gave up ([`Options::max_attempts`])
    /// or, with automatic acks, when an SSE ack is refused.
    pub async fn next(&mut self) -> Result<Update, SessionError> {
        loop {
            if let Some(update) = self.queued.pop_front() {
                match self.hand_over(update).await? {
                    Some(update) => return Ok(update),
                    None => continue,
                }
            }
            let Some(conn) = self.conn.as_mut() else {
                let conn = self.open_with_retries().await?;
                self.install(conn);
                continue;
            };
            let event = match self.dead_after {
                Some(limit) => tokio::time::timeout(limit, conn.next_event())
                    .await
                    .unwrap_or(Event::Closed(None)),
                None => conn.next_event().await,
            };
            match event {
                Event::Message { id, mid, data } => {
                    self.queued
                        .push_back(Update::Message(Message { id, mid, data }));
                }
                Event::Reconnect { .. } => self.switch().await,
                Event::Ping(payload) => {
                    // A failed pong shows up as a close on the next read.
                    let _ = conn.pong(&payload).await;
                }
                Event::Heartbeat => {}
                Event::Other(text) => {
                    if let Ok(Received::Gap { after, oldest }) =
                        message::parse_server_message(&text)
                    {
                        self.queued.push_back(Update::Gap { after, oldest });
                    }
                }
                Event::Closed(code) => {
                    self.conn = None;
                    return Ok(Update::Disconnected { code });
                }
            }
        }
    }

    /// Acknowledges message `id` (with [`Options::auto_ack`] off). WebSocket: on the
    /// connection; SSE: `POST /ack?id=` on the client port with the current token.
    pub async fn ack(&mut self, id: u64) -> Result<(), SessionError> {
        match self.opts.transport {
            Transport::Ws => match self.conn.as_mut() {
                Some(conn) => conn
                    .ack(id)
                    .await
                    .map(drop)
                    .map_err(|source| SessionError::AckIo { id, source }),
                // No connection: the next one resumes after `last_id`; the server keeps the
                // message, and the app may ack again.
                None => Ok(()),
            },
            Transport::Sse => self.post_ack(id).await,
        }
    }

    /// Closes the connection (client-initiated: the client holds TIME_WAIT).
    pub async fn close(mut self) {
        if let Some(mut conn) = self.conn.take() {
            conn.start_close().await;
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                while !matches!(conn.next_event().await, Event::Closed(_)) {}
            })
            .await;
        }
    }

    /// Filters and acknowledges an update on its way to the caller; `None` drops it (a
    /// message already handed over).
    async fn hand_over(&mut self, update: Update) -> Result<Option<Update>, SessionError> {
        let Update::Message(m) = update else {
            return Ok(Some(update));
        };
        if self.last_id.is_some_and(|last| m.id <= last) {
            return Ok(None);
        }
        self.last_id = Some(m.id);
        if self.opts.auto_ack {
            self.ack(m.id).await?;
        }
        Ok(Some(Update::Message(m)))
    }

    /// Rotation or drain: the new connection first, then the old one closed and read out.
    async fn switch(&mut self) {
        let resume = self.resume_point();
        let new = match self.open_once(resume).await {
            Ok(new) => new,
            // The new connection could not be opened (e.g. this node drains and refuses):
            // stay on the old one, which the server closes at the end of its grace; the
            // reconnect after that close goes through the backoff.
            Err(_) => return,
        };
        let Some(mut old) = self.conn.take() else {
            self.install(new);
            return;
        };
        self.install(new);
        old.start_close().await;
        let mut carried = Vec::new();
        let _ = tokio::time::timeout(OLD_CONNECTION_READ, async {
            loop {
                match old.next_event().await {
                    Event::Message { id, mid, data } => carried.push(Message { id, mid, data }),
                    Event::Closed(_) => break,
                    _ => {}
                }
            }
        })
        .await;
        // The old connection's last messages come before what the new one replays; the
        // duplicates (carried by both) are dropped by ID when handed over.
        let connected = self.queued.drain(..).collect::<Vec<_>>();
        self.queued
            .extend(carried.into_iter().map(Update::Message).chain(connected));
    }

    /// The ID to resume after: the last handed over, or the last one queued.
    fn resume_point(&self) -> Option<u64> {
        let queued = self.queued.iter().rev().find_map(|u| match u {
            Update::Message(m) => Some(m.id),
            _ => None,
        });
        queued.max(self.last_id)
    }

    fn install(&mut self, conn: Conn) {
        let heartbeat = conn.hello.heartbeat_ms;
        self.dead_after = (heartbeat > 0).then(|| Duration::from_millis(heartbeat * 3));
        self.queued.push_back(Update::Connected(conn.hello.clone()));
        self.conn = Some(conn);
    }

    async fn open_once(&mut self, since: Option<u64>) -> anyhow::Result<Conn> {
        self.current_token = (self.token)();
        conn::open(
            self.opts.source,
            self.opts.server,
            self.opts.transport,
            &self.current_token,
            since,
            self.opts.connect_timeout,
        )
        .await
    }

    async fn open_with_retries(&mut self) -> Result<Conn, SessionError> {
        let mut attempt = 0u32;
        loop {
            let resume = self.resume_point();
            match self.open_once(resume).await {
                Ok(conn) => return Ok(conn),
                Err(last) => {
                    attempt += 1;
                    if self.opts.max_attempts.is_some_and(|max| attempt >= max) {
                        return Err(SessionError::Connect {
                            server: self.opts.server,
                            attempts: attempt,
                            last,
                        });
                    }
                    let delay = self.opts.backoff.delay(attempt - 1, &mut rand::rng());
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    async fn post_ack(&mut self, id: u64) -> Result<(), SessionError> {
        let io = |source| SessionError::AckIo { id, source };
        let mut stream = TcpStream::connect(self.opts.server).await.map_err(io)?;
        let request = format!(
            "POST /ack?id={id} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\n\
             Content-Length: 0\r\nConnection: close\r\n\r\n",
            self.opts.server, self.current_token
        );
        stream.write_all(request.as_bytes()).await.map_err(io)?;
        // Only the status line is needed: read up to it, not to the end (the node may keep
        // the connection open a while after answering).
        let mut answer = Vec::new();
        let read = tokio::time::timeout(self.opts.connect_timeout, async {
            let mut buf = [0u8; 512];
            while !answer.contains(&b'\n') && answer.len() < MAX_ACK_ANSWER {
                let n = stream.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                answer.extend_from_slice(&buf[..n]);
            }
            Ok::<_, std::io::Error>(())
        })
        .await;
        match read {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(io(e)),
            Err(_) => return Err(io(std::io::ErrorKind::TimedOut.into())),
        }
        let status_line = String::from_utf8_lossy(&answer)
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned();
        match status_line.split_whitespace().nth(1) {
            Some(code) if code.starts_with('2') => Ok(()),
            _ => Err(SessionError::AckRefused {
                id,
                answer: status_line,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng as _;

    #[test]
    fn backoff_has_full_jitter_under_a_growing_bound_and_a_cap() {
        let b = Backoff {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(1),
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for attempt in 0..20 {
            let bound = (Duration::from_millis(100) * 2u32.pow(attempt.min(16)))
                .min(Duration::from_secs(1));
            let delays: Vec<_> = (0..200).map(|_| b.delay(attempt, &mut rng)).collect();
            assert!(delays.iter().all(|d| *d <= bound), "attempt {attempt}");
            // Full jitter: the delays spread over the whole range, some near zero.
            assert!(delays.iter().any(|d| *d < bound / 4), "attempt {attempt}");
            assert!(
                delays.iter().any(|d| *d > bound * 3 / 4),
                "attempt {attempt}"
            );
        }
    }
}
