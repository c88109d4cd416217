//! The gateway (hyper): `POST /v1/events/{type}` → validate ([`crate::envelope::prepare`]) →
//! one Kafka record per request (idempotent producer, `acks=all`) → answer after the ack →
//! add to this instance's accepted ledger. Also `GET /metrics` and `GET /healthz`.
//!
//! Answers: 200 `{"accepted":N,"ids":[…],"rejected":[{"index":i,"reason":…}]}` (valid events
//! accepted, invalid ones listed); 422 when nothing was accepted (every event invalid, or any
//! invalid with `?atomic=true`); 400 unusable body; 404 unknown type; 405 a type ingested from
//! another topic (`source_topic`: its producer writes that topic, and the writer reads each
//! record there as one raw event, so a gateway record would be skipped after a 200); 413 body
//! over the limit; 503 broker unavailable (nothing accepted: the record was not acked).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusHandle;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::envelope::{self, BodyError, Limits, Record};
use crate::hour::Hour;
use crate::store::{ledger_dir, LedgerEntry, Store};
use crate::types::EventType;

/// The clock that stamps receive times (tests pass a fixed one).
pub type Clock = Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>;

/// The system clock.
pub fn system_clock() -> Clock {
    Arc::new(Utc::now)
}

/// Gateway settings.
#[derive(Clone)]
pub struct GatewaySettings {
    /// Kafka bootstrap servers.
    pub brokers: String,
    /// Extra librdkafka settings.
    pub kafka: Vec<(String, String)>,
    /// Body and batch limits.
    pub limits: Limits,
    /// How long a produce may wait for the broker's ack before the request gets 503. The
    /// completionist's grace period must be longer (see [`crate::completeness`]).
    pub produce_timeout: Duration,
    /// Names this instance's ledger objects; unique per running gateway.
    pub instance: String,
    /// Stamps receive times.
    pub clock: Clock,
    /// Renders `/metrics`, when a recorder is installed.
    pub metrics: Option<PrometheusHandle>,
}

impl std::fmt::Debug for GatewaySettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewaySettings")
            .field("brokers", &self.brokers)
            .field("limits", &self.limits)
            .field("produce_timeout", &self.produce_timeout)
            .field("instance", &self.instance)
            .finish_non_exhaustive()
    }
}

impl GatewaySettings {
    /// Defaults for `brokers`: 30 s produce timeout, a random instance name, the system clock.
    pub fn new(brokers: &str) -> Self {
        Self {
            brokers: brokers.into(),
            kafka: Vec::new(),
            limits: Limits::default(),
            produce_timeout: Duration::from_secs(30),
            instance: format!("gw-{}-{:08x}", std::process::id(), rand::random::<u32>()),
            clock: system_clock(),
            metrics: None,
        }
    }
}

struct TypeEntry {
    topic: String,
    validator: jsonschema::Validator,
    /// Ingested from `topic` (`source_topic`): not posted here.
    ingested: bool,
}

struct Shared {
    types: HashMap<String, TypeEntry>,
    producer: FutureProducer,
    store: Store,
    settings: GatewaySettings,
    /// This instance's running counts per (type, hour); the lock also orders ledger writes.
    ledger: tokio::sync::Mutex<HashMap<(String, Hour), u64>>,
}

/// A running gateway; stops when dropped.
#[derive(Debug)]
pub struct Gateway {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Gateway {
    /// Starts serving `types` on `listener`.
    pub fn start(
        listener: TcpListener,
        types: &[EventType],
        store: Store,
        settings: GatewaySettings,
    ) -> anyhow::Result<Self> {
        let mut cc = ClientConfig::new();
        cc.set("bootstrap.servers", &settings.brokers)
            // Idempotence: a retried produce is written once; with acks=all, an ack means
            // every in-sync replica has the record.
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set(
                "message.timeout.ms",
                settings.produce_timeout.as_millis().to_string(),
            )
            // Concurrent requests share produce batches: a few ms of linger buys throughput.
            .set("linger.ms", "2");
        for (k, v) in &settings.kafka {
            cc.set(k, v);
        }
        let producer: FutureProducer = cc.create()?;
        let types = types
            .iter()
            .map(|t| {
                (
                    t.name.clone(),
                    TypeEntry {
                        topic: t.topic(),
                        validator: t.validator(),
                        ingested: t.source_topic.is_some(),
                    },
                )
            })
            .collect();
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            types,
            producer,
            store,
            settings,
            ledger: tokio::sync::Mutex::new(HashMap::new()),
        });
        let task = tokio::spawn(accept_loop(listener, shared));
        Ok(Self { addr, task })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of descriptors or similar: back off rather than spin.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(&shared, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn reply(status: StatusCode, ctype: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
    r
}

fn json_reply(status: StatusCode, v: serde_json::Value) -> Response<Full<Bytes>> {
    reply(status, "application/json", format!("{v}\n"))
}

fn reason(status: StatusCode, why: impl std::fmt::Display) -> Response<Full<Bytes>> {
    json_reply(status, json!({ "reason": why.to_string() }))
}

async fn handle(shared: &Shared, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let segments: Vec<&str> = req.uri().path().split('/').skip(1).collect();
    match (req.method(), segments.as_slice()) {
        (&Method::POST, ["v1", "events", name]) => {
            let name = name.to_string();
            let started = Instant::now();
            let r = post_events(shared, &name, req).await;
            metrics::histogram!(crate::metrics::GATEWAY_LATENCY, "type" => name)
                .record(started.elapsed().as_secs_f64());
            r
        }
        (_, ["v1", "events", _]) => reason(StatusCode::METHOD_NOT_ALLOWED, "use POST"),
        (&Method::GET, ["metrics"]) => match &shared.settings.metrics {
            Some(h) => reply(StatusCode::OK, "text/plain; version=0.0.4", h.render()),
            None => reply(StatusCode::OK, "text/plain; version=0.0.4", ""),
        },
        (&Method::GET, ["healthz"]) => reply(StatusCode::OK, "text/plain", "ok\n"),
        _ => reason(StatusCode::NOT_FOUND, "no such route"),
    }
}

async fn post_events(
    shared: &Shared,
    name: &str,
    req: Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    let Some(ty) = shared.types.get(name) else {
        return reason(
            StatusCode::NOT_FOUND,
            format!("unknown event type `{name}`"),
        );
    };
    if ty.ingested {
        return reason(
            StatusCode::METHOD_NOT_ALLOWED,
            format!(
                "event type `{name}` is ingested from Kafka topic {}: its producer writes there",
                ty.topic
            ),
        );
    }
    let atomic = req.uri().query().is_some_and(|q| {
        q.split('&')
            .any(|kv| kv == "atomic=true" || kv == "atomic=1")
    });
    let limits = shared.settings.limits;
    let body = match Limited::new(req.into_body(), limits.max_body)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return reason(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("body over {} bytes", limits.max_body),
            )
        }
        Err(e) => return reason(StatusCode::BAD_REQUEST, format!("reading body: {e}")),
    };
    let (events, rejected) =
        match envelope::prepare(&body, limits, &ty.validator, envelope::random_id) {
            Ok(x) => x,
            Err(e @ BodyError::TooManyEvents(..)) => {
                return reason(StatusCode::PAYLOAD_TOO_LARGE, e)
            }
            Err(e) => return reason(StatusCode::BAD_REQUEST, e),
        };
    if !rejected.is_empty() {
        metrics::counter!(crate::metrics::REJECTED, "type" => name.to_string())
            .increment(rejected.len() as u64);
    }
    if events.is_empty() || (atomic && !rejected.is_empty()) {
        return json_reply(
            StatusCode::UNPROCESSABLE_ENTITY,
            json!({ "accepted": 0, "ids": [], "rejected": rejected }),
        );
    }
    let received_at = (shared.settings.clock)();
    let ids: Vec<String> = events.iter().map(|e| e.id.clone()).collect();
    let n = events.len() as u64;
    let record = Record {
        type_name: name.into(),
        received_at,
        events,
    };
    let payload = serde_json::to_vec(&record).expect("a record serialises");
    let sent = shared
        .producer
        .send(
            FutureRecord::<(), _>::to(&ty.topic).payload(&payload),
            Timeout::After(shared.settings.produce_timeout),
        )
        .await;
    if let Err((e, _)) = sent {
        tracing::warn!(%e, r#type = name, "produce failed");
        return reason(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("broker unavailable, nothing accepted: {e}"),
        );
    }
    metrics::counter!(crate::metrics::ACCEPTED, "type" => name.to_string()).increment(n);
    if let Err(e) = add_to_ledger(shared, name, Hour::containing(received_at), n).await {
        // The events are in Kafka and will reach the bucket; only the count is missing, and
        // `gabo audit` will show the hour as unbalanced rather than hide it.
        tracing::error!(%e, r#type = name, "accepted ledger not written");
    }
    json_reply(
        StatusCode::OK,
        json!({ "accepted": n, "ids": ids, "rejected": rejected }),
    )
}

async fn add_to_ledger(shared: &Shared, name: &str, hour: Hour, n: u64) -> anyhow::Result<()> {
    let mut ledger = shared.ledger.lock().await;
    let count = ledger.entry((name.to_string(), hour)).or_insert(0);
    *count += n;
    let entry = LedgerEntry { accepted: *count };
    let path = format!(
        "{}/{}.json",
        ledger_dir(name, hour),
        shared.settings.instance
    );
    shared.store.put(&path, serde_json::to_vec(&entry)?).await?;
    Ok(())
}
