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
    ) -> Result<Vec<usize>, String> {
        let items: Vec<serde_json::Value> = idxs
            .iter()
            .map(|&i| {
                let r = &reqs[i];
                let text = std::str::from_utf8(&r.payload.bytes).unwrap_or_default();
                let data: serde_json::Value = if r.payload.is_json {
                    serde_json::from_str(text).unwrap_or(serde_json::Value::Null)
                } else {
                    serde_json::Value::String(text.to_owned())
                };
                serde_json::json!({
                    "user": r.user,
                    "device": r.device,
                    "message_id": r.message_id,
                    "data": data,
                    "id": outcomes[i].id,
                })
            })
            .collect();
        let body = serde_json::to_vec(&items).map_err(|e| e.to_string())?;
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(format!("http://{target}/internal/v1/deliver"))
            .header(hyper::header::HOST, node)
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        if let Some(auth) = &self.auth {
            req.headers_mut().insert(AUTHORIZATION, auth.clone());
        }
        let exchange = async {
            let resp = self.client.request(req).await.map_err(|e| e.to_string())?;
            let status = resp.status();
            let bytes = http_body_util::Limited::new(resp.into_body(), MAX_ANSWER_BYTES)
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            if !status.is_success() {
                let text = String::from_utf8_lossy(&bytes);
                let shown: String = text.chars().take(200).collect();
                return Err(format!("HTTP {status}: {shown}"));
            }
            let v: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
            let results = v["results"].as_array().cloned().unwrap_or_default();
            if results.len() != idxs.len() {
                return Err(format!(
                    "{} results for {} items",
                    results.len(),
                    idxs.len()
                ));
            }
            Ok(results
                .iter()
                .map(|r| {
                    let n = r["delivered"].as_u64().unwrap_or(0);
                    usize::try_from(n).unwrap_or(usize::MAX)
                })
                .collect())
        };
        tokio::time::timeout(TIMEOUT, exchange)
            .await
            .map_err(|_| format!("no answer within {TIMEOUT:?}"))?
    }
}
