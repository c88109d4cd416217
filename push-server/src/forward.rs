//! Forwarding: a push that reaches this node's admin API for a user whose connections are on
//! other nodes is handed to those nodes (the registry says which), with the ID the history
//! gave it. Any node's admin API then reaches a user anywhere in the cluster, and the message
//! is kept once: pushed to the "wrong" node, it would otherwise sit in the shared history under
//! an ID the user's live connection never sees.
//!
//! Forwarded items carry their ID, and a node never forwards an item that came with one, so a
//! message crosses at most one hop.
//!
//! The registry decides where a forward goes, and whoever can write to the registry's storage
//! writes its records: a node sends the internal secret and the payload only to addresses in
//! `--peer-nets` (default loopback), reads at most [`MAX_ANSWER_BYTES`] of an answer, and adds
//! the counts a node returns with saturating arithmetic.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use push_proto::api::{DeliverAnswer, DeliverItem, DELIVER_PATH};

use crate::hub::{PushOutcome, PushRequest};
use crate::metrics as m;
use crate::presence::Presence;

/// Whole-request deadline of one forward: nodes of a cluster are on one network, and the
/// sender's request waits for this.
const TIMEOUT: Duration = Duration::from_secs(2);

/// Largest answer read from another node: an outcome is under 200 bytes, and a forward
/// carries at most one batch (10,000 items); anything larger is not a push-server talking.
pub const MAX_ANSWER_BYTES: usize = 4 * 1024 * 1024;

/// A keep-alive HTTP client for the other nodes' internal deliver endpoint.
pub struct Forwarder {
    client: Client<HttpConnector, Full<Bytes>>,
    auth: Option<HeaderValue>,
    peer_nets: push_registry::PeerNets,
    /// The registry link that says where users are; none: nothing is forwarded.
    presence: Option<Arc<Presence>>,
    /// This node's ID: records naming it are not forwarded to.
    node_id: String,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder").finish_non_exhaustive()
    }
}

impl Forwarder {
    /// A client presenting `secret` (the cluster's `--internal-secret`, or without one its
    /// `--admin-token`) to nodes in `peer_nets`, finding them through `presence`.
    pub fn new(
        secret: Option<&str>,
        peer_nets: push_registry::PeerNets,
        presence: Option<Arc<Presence>>,
        node_id: String,
    ) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(1)));
        Self {
            client: Client::builder(TokioExecutor::new())
                .pool_max_idle_per_host(4)
                .build(connector),
            auth: secret.and_then(|t| {
                let mut v = HeaderValue::from_str(&format!("Bearer {t}")).ok()?;
                // Keeps the secret out of debug output of the request.
                v.set_sensitive(true);
                Some(v)
            }),
            peer_nets,
            presence,
            node_id,
        }
    }

    /// Hands the messages that reached no connection here, or only connections asked to
    /// reconnect (and were appended here, so no one routed them yet), to the other nodes that
    /// hold their users, adding what those nodes delivered to each outcome. Failures leave
    /// the message in the history (counted).
    ///
    /// Why the leaving connections too: a client that was asked to reconnect may already
    /// have resumed on another node (from an ID below this message) and be closing this
    /// connection without reading it further. Sending it both ways costs a duplicate the
    /// client drops by ID; sending it only here could lose it.
    pub async fn forward(&self, reqs: &[PushRequest<'_>], outcomes: &mut [PushOutcome]) {
        let Some(presence) = &self.presence else {
            return;
        };
        let pending: Vec<usize> = (0..reqs.len())
            .filter(|&i| {
                let o = &outcomes[i];
                reqs[i].id.is_none() && o.delivered == o.leaving
            })
            .collect();
        if pending.is_empty() {
            return;
        }
        let mut users: Vec<String> = pending.iter().map(|&i| reqs[i].user.to_owned()).collect();
        users.sort();
        users.dedup();
        let records = match presence.registry().lookup_many(&users).await {
            Ok(r) => r,
            Err(e) => {
                metrics::counter!(m::FORWARD_ERRORS, "reason" => "registry").increment(1);
                tracing::warn!(error = %e, "registry lookup for forwarding failed; messages kept");
                return;
            }
        };
        let by_user: std::collections::HashMap<&str, &Vec<push_registry::Record>> =
            users.iter().map(String::as_str).zip(&records).collect();
        // Node address → messages for it, in request order.
        let mut per_node: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for &i in &pending {
            let req = &reqs[i];
            let Some(recs) = by_user.get(req.user) else {
                continue;
            };
            let mut nodes: Vec<&str> = recs
                .iter()
                .filter(|r| r.node_id != self.node_id)
                .filter(|r| req.device.is_none() || r.device.as_deref() == req.device)
                .map(|r| r.node_addr.as_str())
                .collect();
            nodes.sort_unstable();
            nodes.dedup();
            for n in nodes {
                per_node.entry(n).or_default().push(i);
            }
        }
        for (node, idxs) in per_node {
            let target = match self.peer_nets.resolve(node).await {
                Ok(t) => t,
                Err(e) => {
                    metrics::counter!(m::FORWARD_REFUSED, "reason" => "peer_not_allowed")
                        .increment(1);
                    tracing::warn!(%node, error = %e, "registry record names a node outside --peer-nets; not forwarded, messages kept in the history");
                    continue;
                }
            };
            match self.deliver(node, target, reqs, outcomes, &idxs).await {
                Ok(delivered) => {
                    metrics::counter!(m::FORWARDED).increment(idxs.len() as u64);
                    for (&i, n) in idxs.iter().zip(delivered) {
                        let o = &mut outcomes[i];
                        o.delivered = o.delivered.saturating_add(n);
                    }
                }
                Err(e) => {
                    metrics::counter!(m::FORWARD_ERRORS, "reason" => "node").increment(1);
                    tracing::warn!(%node, error = %e, "forward failed; messages kept in the history");
                }
            }
        }
    }

    async fn deliver(
        &self,
        node: &str,
        target: std::net::SocketAddr,
        reqs: &[PushRequest<'_>],
        outcomes: &[PushOutcome],
        idxs: &[usize],
    ) -> Result<Vec<usize>, ForwardError> {
        let data: Vec<_> = idxs
            .iter()
            .map(|&i| reqs[i].payload.to_raw_json())
            .collect();
        let items: Vec<DeliverItem<'_>> = idxs
            .iter()
            .zip(&data)
            .map(|(&i, data)| {
                let r = &reqs[i];
                DeliverItem {
                    user: r.user.into(),
                    device: r.device.map(Into::into),
                    message_id: r.message_id.map(Into::into),
                    data,
                    id: outcomes[i].id,
                    traceparent: r.traceparent.map(Into::into),
                }
            })
            .collect();
        let body = serde_json::to_vec(&items).expect("deliver items serialize");
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(format!("http://{target}{DELIVER_PATH}"))
            .header(hyper::header::HOST, node)
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| ForwardError::Request(e.to_string()))?;
        if let Some(auth) = &self.auth {
            req.headers_mut().insert(AUTHORIZATION, auth.clone());
        }
        let exchange = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| ForwardError::Request(e.to_string()))?;
            let status = resp.status();
            let bytes = http_body_util::Limited::new(resp.into_body(), MAX_ANSWER_BYTES)
                .collect()
                .await
                .map_err(|e| ForwardError::Request(e.to_string()))?
                .to_bytes();
            if !status.is_success() {
                let text = String::from_utf8_lossy(&bytes);
                let shown: String = text.chars().take(200).collect();
                return Err(ForwardError::Status(status, shown));
            }
            let answer: DeliverAnswer = serde_json::from_slice(&bytes)?;
            if answer.results.len() != idxs.len() {
                return Err(ForwardError::Count {
                    results: answer.results.len(),
                    items: idxs.len(),
                });
            }
            Ok(answer
                .results
                .iter()
                .map(|r| usize::try_from(r.delivered.unwrap_or(0)).unwrap_or(usize::MAX))
                .collect())
        };
        tokio::time::timeout(TIMEOUT, exchange)
            .await
            .map_err(|_| ForwardError::Timeout(TIMEOUT))?
    }
}

/// Why a forward to another node failed (the messages stay in the history).
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// The request could not be built, sent, or its answer read.
    #[error("{0}")]
    Request(String),
    /// The node answered with an error status (and this start of a body).
    #[error("HTTP {0}: {1}")]
    Status(hyper::StatusCode, String),
    /// The answer is not the deliver endpoint's JSON.
    #[error("bad answer: {0}")]
    Answer(#[from] serde_json::Error),
    /// The answer does not have one result per item.
    #[error("{results} results for {items} items")]
    Count {
        /// Results in the answer.
        results: usize,
        /// Items sent.
        items: usize,
    },
    /// No answer in time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}
