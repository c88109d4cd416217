//! The direct transport: HTTP to a push-server node's internal deliver endpoint.
//!
//! `POST http://{node}/internal/v1/deliver` takes a JSON array of
//! `{"user","device","message_id","data"}` and answers one outcome per item, in order
//! (`docs/protocol.md`). The message processor uses [`DeliverClient`] for every node it
//! delivers to; small setups without Kafka use [`DirectTransport`] to reach their one node.
//!
//! The client keeps connections alive in a small pool per node: a steady stream of batches
//! then costs no TCP or HTTP handshake each.
//!
//! The endpoint takes the nodes' `--internal-secret` (or, on nodes without one, their
//! `--admin-token`); only a caller with the internal secret may set a message's `id` (the
//! message processor does). Answers are read up to [`MAX_ANSWER_BYTES`]; counts in them are
//! taken as they come (u64), never added up unchecked.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use push_proto::api::{DeliverAnswer, DeliverItem, DeliverResult, DELIVER_PATH};

use crate::envelope::Envelope;
use crate::error::{Error, Result};
use crate::receipt::DeliveryReceipt;

/// The node's answer for one item: the wire type from push-proto.
pub use push_proto::api::DeliverOutcome as Outcome;

/// Settings of a [`DeliverClient`].
#[derive(Debug, Clone)]
pub struct DeliverConfig {
    /// The nodes' `--admin-token`; `None` when they run without one. Sent only when no
    /// `internal_secret` is given.
    pub admin_token: Option<String>,
    /// The nodes' `--internal-secret`: sent instead of the admin token when set.
    pub internal_secret: Option<String>,
    /// Whole-request deadline: connect, send, answer.
    pub timeout: Duration,
    /// Connect deadline. Short: a dead node should be found out fast and retried elsewhere.
    pub connect_timeout: Duration,
    /// Idle keep-alive connections kept per node.
    pub max_idle_per_node: usize,
}

impl Default for DeliverConfig {
    fn default() -> Self {
        Self {
            admin_token: None,
            internal_secret: None,
            timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(1),
            max_idle_per_node: 8,
        }
    }
}

/// A keep-alive HTTP client for the deliver endpoint of any number of nodes.
#[derive(Clone)]
pub struct DeliverClient {
    client: Client<HttpConnector, Full<Bytes>>,
    auth: Option<HeaderValue>,
    timeout: Duration,
}

impl std::fmt::Debug for DeliverClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeliverClient")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl DeliverClient {
    /// A client with its own connection pool.
    pub fn new(config: &DeliverConfig) -> Result<Self> {
        let secret = config
            .internal_secret
            .as_ref()
            .or(config.admin_token.as_ref());
        let auth = match secret {
            Some(t) => {
                let mut v = HeaderValue::from_str(&format!("Bearer {t}")).map_err(|_| {
                    Error::InvalidUrl {
                        url: "(secret)".into(),
                        reason: "internal secret and admin token must be visible ASCII".into(),
                    }
                })?;
                // Keeps the secret out of debug output of the request.
                v.set_sensitive(true);
                Some(v)
            }
            None => None,
        };
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(config.connect_timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(config.max_idle_per_node)
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(Self {
            client,
            auth,
            timeout: config.timeout,
        })
    }

    /// Delivers `items` through node `addr` (`host:port` of its admin port, as the registry
    /// records it) and returns one outcome per item, in order.
    pub async fn deliver(&self, addr: &str, items: &[&Envelope]) -> Result<Vec<Outcome>> {
        let items: Vec<(&Envelope, Option<u64>)> = items.iter().map(|e| (*e, None)).collect();
        Ok(self
            .deliver_with_ids(addr, &items, None)
            .await?
            .into_iter()
            .map(|(o, _)| o)
            .collect())
    }

    /// Like [`DeliverClient::deliver`], for messages whose per-user ID was taken from the
    /// history already (the message processor appends before it delivers), and optionally
    /// waiting up to `wait_receipt` for each message's delivery receipt.
    pub async fn deliver_with_ids(
        &self,
        addr: &str,
        items: &[(&Envelope, Option<u64>)],
        wait_receipt: Option<Duration>,
    ) -> Result<Vec<(Outcome, Option<DeliveryReceipt>)>> {
        let data = items
            .iter()
            .map(|(e, _)| serde_json::value::to_raw_value(&e.data))
            .collect::<std::result::Result<Vec<_>, _>>()
            .expect("JSON values serialize");
        let body: Vec<DeliverItem<'_>> = items
            .iter()
            .zip(&data)
            .map(|((e, id), data)| DeliverItem {
                user: e.user.as_str().into(),
                device: e.device.as_deref().map(Into::into),
                message_id: Some(e.id.as_str().into()),
                data,
                id: *id,
                traceparent: e.traceparent.as_deref().map(Into::into),
            })
            .collect();
        let body = serde_json::to_vec(&body).expect("deliver items always serialize");
        let query = wait_receipt
            .map(|w| format!("?wait_receipt_ms={}", w.as_millis()))
            .unwrap_or_default();
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(format!("http://{addr}{DELIVER_PATH}{query}"))
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| Error::InvalidUrl {
                url: addr.to_owned(),
                reason: e.to_string(),
            })?;
        if let Some(auth) = &self.auth {
            req.headers_mut().insert(AUTHORIZATION, auth.clone());
        }
        let unreachable = |reason: String| Error::Unreachable {
            addr: addr.to_owned(),
            reason,
        };
        let exchange = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| unreachable(error_chain(&e)))?;
            let status = resp.status();
            let bytes = http_body_util::Limited::new(resp.into_body(), MAX_ANSWER_BYTES)
                .collect()
                .await
                .map_err(|e| unreachable(e.to_string()))?
                .to_bytes();
            Ok::<_, Error>((status, bytes))
        };
        let deadline = self.timeout + wait_receipt.unwrap_or_default();
        let (status, bytes) = tokio::time::timeout(deadline, exchange)
            .await
            .map_err(|_| unreachable(format!("no answer within {deadline:?}")))??;
        if !status.is_success() {
            return Err(Error::Http {
                status: status.as_u16(),
                body: String::from_utf8_lossy(&bytes).chars().take(500).collect(),
            });
        }
        let answer: DeliverAnswer = serde_json::from_slice(&bytes).map_err(|e| {
            let shown: String = String::from_utf8_lossy(&bytes).chars().take(500).collect();
            Error::BadResponse(format!("{e}: {shown}"))
        })?;
        if answer.results.len() != items.len() {
            return Err(Error::BadResponse(format!(
                "{} results for {} items",
                answer.results.len(),
                items.len()
            )));
        }
        Ok(answer
            .results
            .into_iter()
            .map(DeliverResult::into_outcome)
            .collect())
    }
}

/// hyper-util's errors say "client error (Connect)" at the top and the useful part
/// ("Connection refused") in the sources.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

/// Sends straight to one push-server node, without a queue: for small setups with a single
/// node (a user on another node is `NotConnected`).
#[derive(Debug, Clone)]
pub struct DirectTransport {
    client: DeliverClient,
    addr: String,
}

/// Largest answer read from a node: an outcome (with a receipt) is well under 400 bytes and a
/// request carries at most [`MAX_ITEMS_PER_REQUEST`] items; anything larger is not a
/// push-server answering, and is not buffered.
pub const MAX_ANSWER_BYTES: usize = 8 * 1024 * 1024;

/// Most items per request: push-server's batch limit.
pub const MAX_ITEMS_PER_REQUEST: usize = 10_000;

impl DirectTransport {
    /// `url` is the node's admin address, `http://host:port` or `host:port`.
    pub fn new(url: &str, config: &DeliverConfig) -> Result<Self> {
        let addr = url
            .strip_prefix("http://")
            .unwrap_or(url)
            .trim_end_matches('/');
        if addr.is_empty() || addr.contains('/') || !addr.contains(':') {
            return Err(Error::InvalidUrl {
                url: url.to_owned(),
                reason: "expected http://host:port of the node's admin port (no path, no TLS)"
                    .into(),
            });
        }
        Ok(Self {
            client: DeliverClient::new(config)?,
            addr: addr.to_owned(),
        })
    }

    /// The node's `host:port`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Delivers one envelope and waits up to `timeout` for its delivery receipt.
    pub async fn send_and_wait_receipt(
        &self,
        env: &Envelope,
        timeout: Duration,
    ) -> Result<DeliveryReceipt> {
        env.validate()?;
        let (_, receipt) = self
            .client
            .deliver_with_ids(&self.addr, &[(env, None)], Some(timeout))
            .await?
            .pop()
            .expect("one outcome per envelope");
        receipt.ok_or_else(|| Error::ReceiptTimeout {
            id: env.id.clone(),
            waited: timeout,
        })
    }

    /// Delivers a batch (split into requests of at most [`MAX_ITEMS_PER_REQUEST`]), one
    /// outcome per envelope. Envelopes are validated first; an invalid one fails the batch.
    pub async fn send_batch(&self, envs: &[Envelope]) -> Result<Vec<Outcome>> {
        for e in envs {
            e.validate()?;
        }
        let mut out = Vec::with_capacity(envs.len());
        for chunk in envs.chunks(MAX_ITEMS_PER_REQUEST) {
            let refs: Vec<&Envelope> = chunk.iter().collect();
            out.extend(self.client.deliver(&self.addr, &refs).await?);
        }
        Ok(out)
    }
}
