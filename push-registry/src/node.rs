//! One standalone Redis node: a lazily (re)connected multiplexed connection with timeouts,
//! whose errors name the node.

use std::borrow::Cow;
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{AsyncConnectionConfig, FromRedisValue, IntoConnectionInfo};

use crate::script::{self, Scripts};
use crate::{Error, NodePing, Result};

/// What [`Node::run`] (and the cluster backends) send: a command or a pipeline.
pub(crate) trait Request: Clone + Sync {
    /// The same, with script calls in their text form.
    fn with_text(&self) -> Self;
    /// One attempt.
    fn send<T: FromRedisValue, C: ConnectionLike + Send>(
        &self,
        c: &mut C,
    ) -> impl std::future::Future<Output = redis::RedisResult<T>> + Send;
}

impl Request for redis::Cmd {
    fn with_text(&self) -> Self {
        script::with_text(self)
    }

    fn send<T: FromRedisValue, C: ConnectionLike + Send>(
        &self,
        c: &mut C,
    ) -> impl std::future::Future<Output = redis::RedisResult<T>> + Send {
        self.query_async(c)
    }
}

impl Request for redis::Pipeline {
    fn with_text(&self) -> Self {
        script::pipeline_with_text(self)
    }

    fn send<T: FromRedisValue, C: ConnectionLike + Send>(
        &self,
        c: &mut C,
    ) -> impl std::future::Future<Output = redis::RedisResult<T>> + Send {
        self.query_async(c)
    }
}

/// Connection and response timeouts. A killed node refuses at once; these bound a node that
/// hangs (paused, partitioned) so a quorum operation is not held up by one slow replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Bound on establishing a connection.
    pub connect: Duration,
    /// Bound on waiting for a reply.
    pub response: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_millis(1000),
            response: Duration::from_millis(2000),
        }
    }
}

/// A storage node. Connects on first use and again after a connection-level failure, so a
/// node that was down when the registry opened, or that restarted, is picked up again.
pub(crate) struct Node {
    /// `host:port`, for error messages and `ping`.
    pub addr: String,
    client: redis::Client,
    config: AsyncConnectionConfig,
    /// How script calls go out (see `script.rs`).
    scripts: Scripts,
    /// tokio's mutex: it is held across the connect, so concurrent callers wait for one
    /// connection attempt instead of each making their own.
    conn: tokio::sync::Mutex<Option<MultiplexedConnection>>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node").field("addr", &self.addr).finish()
    }
}

impl Node {
    /// A node at `url` (`redis://host:port[/db]`); does not connect yet.
    pub fn new(addr: String, url: &str, timeouts: Timeouts, scripts: Scripts) -> Result<Self> {
        let invalid = |e: redis::RedisError| Error::InvalidUrl {
            url: url.to_string(),
            reason: e.to_string(),
        };
        let info = url.into_connection_info().map_err(invalid)?;
        // No CLIENT SETINFO on connect: Dynomite does not proxy CLIENT commands.
        let settings = info.redis_settings().clone().set_skip_set_lib_name();
        let info = info.set_redis_settings(settings);
        let client = redis::Client::open(info).map_err(invalid)?;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(timeouts.connect))
            .set_response_timeout(Some(timeouts.response));
        Ok(Node {
            addr,
            client,
            config,
            scripts,
            conn: tokio::sync::Mutex::new(None),
        })
    }

    fn fail(&self, source: redis::RedisError) -> Error {
        Error::Node {
            node: self.addr.clone(),
            source,
        }
    }

    async fn connection(&self) -> Result<MultiplexedConnection> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let c = self
            .client
            .get_multiplexed_async_connection_with_config(&self.config)
            .await
            .map_err(|e| self.fail(e))?;
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Forgets the connection after a failure that may have broken it, so the next attempt
    /// reconnects; script and type errors leave it alone. Returns whether the failure was the
    /// connection dropping under us (the node restarted since we last used it), which is worth
    /// one immediate retry on a fresh connection. Every command we send may safely run twice:
    /// register and refresh write the same value again, and a repeated compare-and-delete
    /// finds nothing left to delete. A timeout is not retried: the node is slow, and waiting
    /// twice would double the caller's worst case.
    async fn after_error(&self, e: &redis::RedisError) -> bool {
        let dropped = e.is_connection_dropped() || (e.is_io_error() && !e.is_timeout());
        if dropped || e.is_timeout() || e.is_unrecoverable_error() {
            *self.conn.lock().await = None;
        }
        dropped
    }

    /// Runs one command. A script called by hash that the node does not hold is sent again
    /// with its text, once (after a restart or `SCRIPT FLUSH`; the text call caches it again).
    pub async fn query<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T> {
        self.run(cmd).await
    }

    /// Runs a pipeline (no MULTI/EXEC): one write, one read of all replies. Scripts as in
    /// [`Node::query`]: a pipeline that met `NOSCRIPT` goes again whole, with the texts (its
    /// commands may all run twice).
    pub async fn pipeline<T: FromRedisValue>(&self, pipe: &redis::Pipeline) -> Result<T> {
        self.run(pipe).await
    }

    /// Sends `request` (by hash or by text, see [`Scripts`]), again with the texts after
    /// `NOSCRIPT`, and once more on a fresh connection after the connection dropped.
    async fn run<R: Request, T: FromRedisValue>(&self, request: &R) -> Result<T> {
        let mut with_text = self.scripts == Scripts::Text;
        let mut request = if with_text {
            Cow::Owned(request.with_text())
        } else {
            Cow::Borrowed(request)
        };
        let mut retried = false;
        loop {
            let mut c = self.connection().await?;
            match request.send(&mut c).await {
                Ok(v) => return Ok(v),
                Err(e) if script::is_no_script(&e) && !with_text => {
                    with_text = true;
                    request = Cow::Owned(request.with_text());
                }
                Err(e) => {
                    if self.after_error(&e).await && !retried {
                        retried = true;
                        continue;
                    }
                    return Err(self.fail(e));
                }
            }
        }
    }

    /// `PING` with its round-trip time.
    pub async fn ping(&self) -> NodePing {
        let start = Instant::now();
        let result = self
            .query::<String>(&redis::cmd("PING"))
            .await
            .map(|_| u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX));
        NodePing {
            node: self.addr.clone(),
            result,
        }
    }

    /// Every user with a key on this node, found with SCAN (Dynomite proxies it; KEYS it does
    /// not, and KEYS would block the node).
    pub async fn scan_users(&self) -> Result<Vec<String>> {
        let mut users = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let mut cmd = redis::cmd("SCAN");
            cmd.arg(cursor)
                .arg("MATCH")
                .arg(crate::store::KEY_PATTERN)
                .arg("COUNT")
                .arg(1000);
            let (next, keys): (u64, Vec<String>) = self.query(&cmd).await?;
            users.extend(
                keys.iter()
                    .filter_map(|k| crate::store::user_of_key(k).map(str::to_string)),
            );
            if next == 0 {
                return Ok(users);
            }
            cursor = next;
        }
    }
}
