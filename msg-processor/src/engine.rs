//! One batch of one partition, from records to outcomes: decode, TTL, registry lookup,
//! delivery rounds to the nodes, dead letters. Knows nothing of consumer groups or offsets:
//! when [`Engine::process`] returns, every record of the batch has an outcome.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use futures_util::future::join_all;
use push_lib::{DeliverClient, Envelope};
use push_registry::{MessageStore, NewMessage, Record, Registry};
use rand::Rng as _;
use rdkafka::message::{Message as _, OwnedMessage};
use tokio::sync::Semaphore;

use crate::config::Settings;
use crate::dead_letter::{DeadLetters, Source};
use crate::metrics::{self as m, Stats};
use crate::outcomes::{self, Kind, Outcomes};
use crate::route::{self, Delivery, Final, Next};

/// Largest deliver request body we build, roughly. push-server accepts 64 messages of its
/// largest size (4 MiB by default); a quarter of that keeps every node configuration safe
/// while still carrying hundreds of typical messages.
const MAX_REQUEST_BYTES: usize = 1024 * 1024;

/// Everything a batch needs, shared by all partitions of a processor.
#[derive(Debug)]
pub struct Engine {
    /// The processor's settings.
    pub settings: Settings,
    /// Who is connected where.
    pub registry: Arc<dyn Registry>,
    /// Users' recent messages: each message is appended here first, which gives it its
    /// per-user ID and keeps it for clients that resume.
    pub history: Arc<dyn MessageStore>,
    /// Keep-alive HTTP to the nodes.
    pub nodes: DeliverClient,
    /// The dead-letter producer, if a topic is configured.
    pub dead_letters: Option<DeadLetters>,
    /// The push outcomes producer, if `--outcomes-topic` is set.
    pub outcomes: Option<Outcomes>,
    /// Counts for tests and logs.
    pub stats: Arc<Stats>,
    /// Bounds the batches in flight over all partitions (`--concurrency`).
    pub permits: Semaphore,
}

impl Engine {
    /// Gives every record of `batch` (consecutive records of one partition) an outcome.
    pub async fn process(&self, batch: &[OwnedMessage]) {
        metrics::histogram!(m::BATCH_SIZE).record(batch.len() as f64);
        Stats::add(&self.stats.batches, 1);
        let now = push_lib::envelope::now_ms();
        let mut active: Vec<(usize, Delivery)> = Vec::with_capacity(batch.len());
        for (i, msg) in batch.iter().enumerate() {
            let wire_len = msg.payload().map_or(0, <[u8]>::len);
            let decoded = match msg.payload() {
                None => Err("malformed: record has no value".to_owned()),
                // An oversized payload is refused here, before the history keeps it (the
                // node would refuse it after the append, and resumes would send it).
                Some(bytes) => Envelope::decode(bytes).map_err(|e| match e {
                    push_lib::envelope::EnvelopeError::TooLarge { .. } => format!("too large: {e}"),
                    e => format!("malformed: {e}"),
                }),
            };
            match decoded {
                Err(reason) => self.dead_letter(msg, &reason).await,
                Ok(env) if env.is_expired(now) => self.expired(&env),
                Ok(env) => {
                    let mut d = Delivery::new(env, wire_len);
                    if telemetry::otel::is_on() {
                        d.span = consume_span(msg, &d.env);
                    }
                    active.push((i, d));
                }
            }
        }
        self.append(&mut active).await;
        for (i, delivery, outcome) in self.deliver(active).await {
            match outcome {
                Final::Delivered => {
                    Stats::add(&self.stats.delivered, 1);
                    self.outcome(&delivery.env, Kind::Delivered);
                }
                Final::Stored => {
                    // In the user's history: their clients get it when they (re)connect.
                    metrics::counter!(m::STORED).increment(1);
                    Stats::add(&self.stats.stored, 1);
                    self.outcome(&delivery.env, Kind::Stored);
                }
                Final::Expired => self.expired(&delivery.env),
                Final::DeadLetter(reason) => self.dead_letter(&batch[i], &reason).await,
            }
        }
    }

    /// Appends every message to its user's history (one pipelined call), retrying until the
    /// store answers: the ID it gives is what clients resume from, so nothing is delivered
    /// without one. A redelivered message (same envelope ID, still kept) gets its first ID.
    async fn append(&self, active: &mut [(usize, Delivery)]) {
        if active.is_empty() {
            return;
        }
        let bodies: Vec<(bool, Vec<u8>)> = active
            .iter()
            .map(|(_, d)| match &d.env.data {
                // A JSON string is a text payload, as on the node's deliver endpoint.
                serde_json::Value::String(text) => (false, text.clone().into_bytes()),
                other => (
                    true,
                    serde_json::to_vec(other).expect("JSON values serialize"),
                ),
            })
            .collect();
        let messages: Vec<NewMessage<'_>> = active
            .iter()
            .zip(&bodies)
            .map(|((_, d), (json, data))| NewMessage {
                user: &d.env.user,
                mid: Some(d.env.id.as_str()),
                device: d.env.device.as_deref(),
                // The sender's (no node has seen it yet), shown again on a replay; only a
                // well-formed one is kept, so the history never holds a long string for it.
                traceparent: d.env.traceparent.as_deref().filter(|t| {
                    t.len() == 55 && telemetry::propagation::parse_traceparent(t).is_ok()
                }),
                json: *json,
                data,
            })
            .collect();
        let _spans = child_spans(
            active.iter().map(|(_, d)| d),
            |p| tracing::info_span!(parent: p, "history append"),
        );
        let mut backoff = self.settings.retry_backoff;
        let appended = loop {
            match self.history.append(&messages).await {
                Ok(a) => break a,
                Err(e) => {
                    metrics::counter!(m::HISTORY_ERRORS).increment(1);
                    tracing::warn!(error = %e, messages = messages.len(), "history append failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.settings.retry_backoff_max);
                }
            }
        };
        drop(messages);
        for ((_, d), a) in active.iter_mut().zip(appended) {
            d.id = Some(a.id);
        }
    }

    fn expired(&self, env: &Envelope) {
        metrics::counter!(m::EXPIRED).increment(1);
        Stats::add(&self.stats.expired, 1);
        self.outcome(env, Kind::Expired);
    }

    /// Queues `env`'s push outcome, if outcomes are on (never waits: see [`crate::outcomes`]).
    fn outcome(&self, env: &Envelope, kind: Kind) {
        if let Some(o) = &self.outcomes {
            let at = push_lib::envelope::now_ms();
            o.send(&outcomes::Outcome::new(
                env.id.as_str(),
                &env.user,
                kind,
                at,
            ));
        }
    }

    /// Delivery rounds until every message is finished (see [`crate::route`]).
    async fn deliver(&self, mut active: Vec<(usize, Delivery)>) -> Vec<(usize, Delivery, Final)> {
        let mut finished = Vec::with_capacity(active.len());
        let mut backoff = self.settings.retry_backoff;
        let rounds = self.settings.max_attempts.max(1);
        for round in 0..rounds {
            if active.is_empty() {
                break;
            }
            let last = round + 1 == rounds;
            let records = self.lookup(&active).await;
            // Node → indexes into `active`, in partition order.
            let mut per_node: BTreeMap<String, Vec<usize>> = BTreeMap::new();
            let mut had_targets = vec![false; active.len()];
            for (ai, (_, d)) in active.iter().enumerate() {
                let recs = records
                    .get(d.env.user.as_str())
                    .map_or(&[][..], Vec::as_slice);
                for node in d.targets(recs) {
                    per_node.entry(node).or_default().push(ai);
                    had_targets[ai] = true;
                }
            }
            if round > 0 {
                let n = had_targets.iter().filter(|t| **t).count() as u64;
                metrics::counter!(m::RETRIES).increment(n);
                Stats::add(&self.stats.retries, n);
            }
            let answers = join_all(
                per_node
                    .iter()
                    .map(|(node, idxs)| self.send_to_node(node, idxs, &active)),
            )
            .await;
            let now = push_lib::envelope::now_ms();
            for (node, results) in per_node.keys().zip(answers) {
                for (ai, answer) in results {
                    let d = &mut active[ai].1;
                    let before = d.delivered();
                    d.apply(node, answer.as_ref().map_err(String::as_str));
                    if !before && d.delivered() && d.env.created_at > 0 {
                        let secs = now.saturating_sub(d.env.created_at) as f64 / 1000.0;
                        metrics::histogram!(m::END_TO_END_LATENCY).record(secs);
                    }
                }
            }
            let mut wait = false;
            let mut still = Vec::with_capacity(active.len());
            for (ai, (i, mut d)) in active.into_iter().enumerate() {
                match d.next(had_targets[ai], last) {
                    Next::Again { .. } if d.env.is_expired(now) => {
                        finished.push((i, d, Final::Expired));
                    }
                    Next::Again { backoff } => {
                        wait |= backoff;
                        still.push((i, d));
                    }
                    Next::Done(f) => finished.push((i, d, f)),
                }
            }
            active = still;
            if wait && !active.is_empty() {
                // Jitter spreads the retries of many processors hitting one recovering node.
                let jitter = rand::rng().random_range(0.8..1.2);
                tokio::time::sleep(backoff.mul_f64(jitter)).await;
                backoff = (backoff * 2).min(self.settings.retry_backoff_max);
            }
        }
        finished
    }

    /// Sends the messages `idxs` of `active` to `node`, in order, in requests of at most
    /// `node_batch_max`. Returns one answer per message (`Err`: why the node was unreachable).
    async fn send_to_node(
        &self,
        node: &str,
        idxs: &[usize],
        active: &[(usize, Delivery)],
    ) -> Vec<(usize, Result<push_lib::Outcome, String>)> {
        let mut out = Vec::with_capacity(idxs.len());
        // The record's address decides where the internal secret and the payloads go: only
        // to networks in --peer-nets. A refused node counts as "not connected there", so the
        // message stays in the history for the user's resume and is not retried.
        let target = match self.settings.peer_nets.resolve(node).await {
            Ok(t) => t.to_string(),
            Err(e) => {
                metrics::counter!(m::PEER_REFUSED).increment(idxs.len() as u64);
                tracing::warn!(%node, error = %e, "registry record names a node outside --peer-nets; not sent");
                return idxs
                    .iter()
                    .map(|&ai| (ai, Ok(push_lib::Outcome::NotConnected)))
                    .collect();
            }
        };
        let node = target.as_str();
        let mut failed: Option<String> = None;
        let requests = route::chunks(
            idxs,
            |ai| active[ai].1.wire_len,
            self.settings.node_batch_max,
            MAX_REQUEST_BYTES,
        );
        for chunk in requests {
            if let Some(e) = &failed {
                // A later chunk must not overtake an earlier one that will be retried:
                // that could reorder a user's messages.
                out.extend(chunk.iter().map(|&ai| (ai, Err(e.clone()))));
                continue;
            }
            metrics::histogram!(m::NODE_BATCH_SIZE).record(chunk.len() as f64);
            let spans = child_spans(
                chunk.iter().map(|&ai| &active[ai].1),
                |p| tracing::info_span!(parent: p, "deliver batch"),
            );
            // Each message tells the node its deliver span, the parent of the node's spans.
            let traced: Vec<Envelope> = spans
                .iter()
                .zip(chunk)
                .map(|(span, &ai)| {
                    let mut env = active[ai].1.env.clone();
                    let incoming = env
                        .traceparent
                        .as_deref()
                        .and_then(|t| telemetry::propagation::parse_traceparent(t).ok());
                    if let Some(out) = telemetry::otel::outgoing(span, incoming.as_ref()) {
                        env.traceparent = Some(out.traceparent());
                    }
                    env
                })
                .collect();
            let envs: Vec<(&Envelope, Option<u64>)> = if traced.is_empty() {
                chunk
                    .iter()
                    .map(|&ai| (&active[ai].1.env, active[ai].1.id))
                    .collect()
            } else {
                traced
                    .iter()
                    .zip(chunk)
                    .map(|(env, &ai)| (env, active[ai].1.id))
                    .collect()
            };
            let answer = self.nodes.deliver_with_ids(node, &envs, None).await;
            drop(spans);
            match answer {
                Ok(outcomes) => {
                    metrics::counter!(m::DELIVER_REQUESTS, "result" => "ok").increment(1);
                    for (&ai, (o, _)) in chunk.iter().zip(outcomes) {
                        let how = match o {
                            push_lib::Outcome::Delivered { .. } => Some("delivered"),
                            push_lib::Outcome::Duplicate => Some("duplicate"),
                            _ => None,
                        };
                        if let Some(how) = how {
                            metrics::counter!(m::DELIVERED, "how" => how).increment(1);
                        }
                        out.push((ai, Ok(o)));
                    }
                }
                Err(e) => {
                    metrics::counter!(m::DELIVER_REQUESTS, "result" => "error").increment(1);
                    if matches!(e, push_lib::Error::Http { status: 401, .. }) {
                        tracing::error!(%node, "node refused the secret: check --internal-secret (or --admin-token)");
                    } else {
                        tracing::warn!(%node, error = %e, "deliver failed; will retry");
                    }
                    let e = e.to_string();
                    out.extend(chunk.iter().map(|&ai| (ai, Err(e.clone()))));
                    failed = Some(e);
                }
            }
        }
        out
    }

    /// Looks up every user of `active` (one pipelined call), retrying until the registry
    /// answers: without it nothing can be delivered, and lag is the right signal.
    async fn lookup(&self, active: &[(usize, Delivery)]) -> HashMap<String, Vec<Record>> {
        let _spans = child_spans(
            active.iter().map(|(_, d)| d),
            |p| tracing::info_span!(parent: p, "registry lookup"),
        );
        let mut users: Vec<String> = active.iter().map(|(_, d)| d.env.user.clone()).collect();
        users.sort();
        users.dedup();
        let mut backoff = self.settings.retry_backoff;
        loop {
            match self.registry.lookup_many(&users).await {
                Ok(records) => return users.into_iter().zip(records).collect(),
                Err(e) => {
                    metrics::counter!(m::REGISTRY_ERRORS).increment(1);
                    tracing::warn!(error = %e, users = users.len(), "registry lookup failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.settings.retry_backoff_max);
                }
            }
        }
    }

    /// Sends a record to the dead-letter topic, retrying until the broker takes it (the
    /// record's offset must not be committed before). Without a topic: logged and dropped.
    async fn dead_letter(&self, msg: &OwnedMessage, reason: &str) {
        let kind = reason.split(':').next().unwrap_or("other").to_owned();
        metrics::counter!(m::DEAD_LETTERED, "reason" => kind).increment(1);
        Stats::add(&self.stats.dead_lettered, 1);
        let source = Source {
            topic: msg.topic(),
            partition: msg.partition(),
            offset: msg.offset(),
        };
        if let Some(o) = &self.outcomes {
            // The record may not have decoded: its names come from its bytes (module docs).
            let position = format!("{}/{}/{}", source.topic, source.partition, source.offset);
            let (mid, user) = outcomes::undecoded_names(msg.payload(), position);
            let at = push_lib::envelope::now_ms();
            o.send(&outcomes::Outcome::new(&mid, &user, Kind::DeadLettered, at));
        }
        let Some(dl) = &self.dead_letters else {
            tracing::warn!(?source, %reason, "dropping a message (no --dead-letter-topic)");
            return;
        };
        let mut backoff = self.settings.retry_backoff;
        loop {
            match dl.send(msg.key(), msg.payload(), reason, &source).await {
                Ok(()) => {
                    tracing::info!(?source, %reason, topic = dl.topic(), "dead-lettered");
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "dead-letter topic unavailable; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.settings.retry_backoff_max);
                }
            }
        }
    }
}

/// The `consume` span of a record, continuing the producer's trace: the record's
/// `traceparent` header, else the envelope's.
fn consume_span(msg: &OwnedMessage, env: &Envelope) -> tracing::Span {
    use rdkafka::message::Headers as _;
    let span = tracing::info_span!("consume", user = %env.user, partition = msg.partition(), offset = msg.offset());
    let header = msg.headers().and_then(|h| {
        h.iter()
            .find(|h| h.key == push_lib::kafka::TRACEPARENT_HEADER)
            .and_then(|h| h.value)
            .and_then(|v| std::str::from_utf8(v).ok())
    });
    let parse = |t: &str| telemetry::propagation::parse_traceparent(t).ok();
    let parent = header
        .and_then(parse)
        .or_else(|| env.traceparent.as_deref().and_then(parse));
    if let Some(parent) = &parent {
        telemetry::otel::set_parent(&span, parent);
    }
    span
}

/// One span (`open`) under each message's `consume` span, for a call made for all of them
/// at once (they end when the returned spans drop). Empty when tracing is off.
fn child_spans<'a>(
    deliveries: impl Iterator<Item = &'a Delivery>,
    open: impl Fn(&tracing::Span) -> tracing::Span,
) -> Vec<tracing::Span> {
    if !telemetry::otel::is_on() {
        return Vec::new();
    }
    deliveries.map(|d| open(&d.span)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::{Header, OwnedHeaders, Timestamp};

    const HEADER: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    const ENVELOPE: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    fn record(header: Option<&str>) -> OwnedMessage {
        let headers = header.map(|tp| {
            OwnedHeaders::new().insert(Header {
                key: "traceparent",
                value: Some(tp),
            })
        });
        OwnedMessage::new(
            None,
            None,
            "push".into(),
            Timestamp::NotAvailable,
            0,
            7,
            headers,
        )
    }

    fn trace_of(span: &tracing::Span) -> String {
        telemetry::otel::outgoing(span, None)
            .unwrap()
            .trace_id_hex()
    }

    #[test]
    fn consume_continues_the_record_header_else_the_envelope() {
        let env = Envelope::new("u", "x").traceparent(ENVELOPE);
        telemetry::otel::with_test_tracer(|| {
            let from_header = consume_span(&record(Some(HEADER)), &env);
            assert_eq!(trace_of(&from_header), "4bf92f3577b34da6a3ce929d0e0e4736");
            let from_envelope = consume_span(&record(None), &env);
            assert_eq!(trace_of(&from_envelope), "0af7651916cd43dd8448eb211c80319c");
            // A bad header falls back to the envelope rather than losing the trace.
            let bad = consume_span(&record(Some("00-bad")), &env);
            assert_eq!(trace_of(&bad), "0af7651916cd43dd8448eb211c80319c");
        });
    }
}
