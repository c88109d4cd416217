//! `traces serve`: one HTTP port (hyper) for everything a tracing backend answers.
//!
//! | route | what |
//! |---|---|
//! | `POST /v1/traces` | OTLP/HTTP ingest, protobuf or JSON |
//! | `GET /sampling?service=`, `GET /api/sampling?service=` | Jaeger remote sampling strategies |
//! | `GET /api/services`, `/api/services/{s}/operations`, `/api/operations?service=`, `/api/traces…` | Jaeger query API |
//! | `GET /trace/{id}` | the waterfall page |
//! | `GET /metrics`, `GET /healthz` | Prometheus metrics, liveness |
//!
//! Ingest never waits for storage: spans go to a bounded queue that one writer task drains
//! into the store every `flush_interval`. When the queue is full the request is answered 503
//! with `Retry-After`, which OTLP exporters treat as "retry later" (the spec's throttling).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, RETRY_AFTER};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics::counter;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use prost::Message;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::jaeger::{self, Search};
use crate::kafka::{KafkaSettings, SpanProducer};
use crate::model::SpanRow;
use crate::otlp::{self, Encoding};
use crate::page;
use crate::sampling::{Sampler, Strategies};
use crate::store::SpanStore;

/// What `traces serve` runs with.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where to listen (the OTLP/HTTP port is 4318 by convention).
    pub listen: SocketAddr,
    /// Largest request body accepted, bytes (OTLP exporters batch 512 spans by default).
    pub max_body: usize,
    /// Spans waiting for the writer before ingest answers 503.
    pub max_queue_spans: usize,
    /// How often queued spans are written to the store.
    pub flush_interval: Duration,
    /// Write earlier once this many spans wait.
    pub flush_spans: usize,
    /// The sampling rules file (Jaeger's strategies JSON); `None`: the default rules.
    pub sampling_file: Option<PathBuf>,
    /// How often the rules file is checked for changes.
    pub sampling_reload: Duration,
    /// Spans older than this are deleted (whole hours); `None` keeps everything.
    pub retention: Option<Duration>,
    /// Produce spans to Kafka for store writers ([`crate::kafka`]) instead of writing the
    /// store; the store is still read for the query API.
    pub kafka: Option<KafkaSettings>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:4318".parse().expect("a literal address"),
            max_body: 8 << 20,
            max_queue_spans: 200_000,
            flush_interval: Duration::from_secs(1),
            flush_spans: 50_000,
            sampling_file: None,
            sampling_reload: Duration::from_secs(5),
            retention: Some(Duration::from_secs(7 * 24 * 3600)),
            kafka: None,
        }
    }
}

/// A running server; dropping it does not stop it, [`Running::shutdown`] does.
#[derive(Debug)]
pub struct Running {
    /// The bound address (port 0 resolved).
    pub addr: SocketAddr,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Stops accepting, writes what is queued, and waits for the tasks.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

struct App {
    store: SpanStore,
    sampler: Arc<Sampler>,
    queue: mpsc::UnboundedSender<Vec<SpanRow>>,
    queued: Arc<AtomicUsize>,
    settings: Settings,
    metrics: PrometheusHandle,
}

/// The process's Prometheus handle (one recorder per process).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (an embedding program): then this
            // handle renders nothing, which /metrics shows as an empty page.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// Starts the server: binds, loads the sampling rules, spawns the writer, the rules watcher
/// and the retention pass.
pub async fn start(settings: Settings, store: SpanStore) -> anyhow::Result<Running> {
    let rules = match &settings.sampling_file {
        Some(path) => load_rules(path)?,
        None => Strategies::default(),
    };
    let sampler = Arc::new(Sampler::new(rules));
    let sink = match &settings.kafka {
        Some(k) => Sink::Kafka(SpanProducer::new(k)?),
        None => Sink::Store(store.clone()),
    };
    let listener = TcpListener::bind(settings.listen).await?;
    let addr = listener.local_addr()?;
    let (stop, stop_rx) = watch::channel(false);
    let (queue, queue_rx) = mpsc::unbounded_channel();
    let queued = Arc::new(AtomicUsize::new(0));
    let app = Arc::new(App {
        store: store.clone(),
        sampler: Arc::clone(&sampler),
        queue,
        queued: Arc::clone(&queued),
        settings: settings.clone(),
        metrics: metrics_handle(),
    });
    let mut tasks = vec![tokio::spawn(writer(
        sink,
        queue_rx,
        queued,
        settings.clone(),
        stop_rx.clone(),
    ))];
    if let Some(path) = settings.sampling_file.clone() {
        tasks.push(tokio::spawn(watch_rules(
            path,
            sampler,
            settings.sampling_reload,
            stop_rx.clone(),
        )));
    }
    if let Some(retention) = settings.retention {
        tasks.push(tokio::spawn(expire(store, retention, stop_rx.clone())));
    }
    tasks.push(tokio::spawn(accept(listener, app, stop_rx)));
    tracing::info!(%addr, "traces listening: OTLP/HTTP on /v1/traces, Jaeger query on /api, sampling on /sampling");
    Ok(Running { addr, stop, tasks })
}

/// Reads a rules file; the error names the file.
pub fn load_rules(path: &std::path::Path) -> anyhow::Result<Strategies> {
    let text =
        std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Strategies::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

async fn accept(listener: TcpListener, app: Arc<App>, mut stop: watch::Receiver<bool>) {
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let app = Arc::clone(&app);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let app = Arc::clone(&app);
                async move { Ok::<_, Infallible>(handle(&app, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

type Resp = Response<Full<Bytes>>;

fn respond(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Resp {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, content_type)
        .body(Full::new(body.into()))
        .expect("a valid response")
}

fn json(status: StatusCode, v: &serde_json::Value) -> Resp {
    respond(status, "application/json", v.to_string())
}

/// The routes, parsed from the path's segments (percent-decoded; `+` stays `+`).
#[derive(Debug, PartialEq)]
enum Route {
    Ingest,
    Sampling,
    Services,
    Operations(String),
    OperationsQuery,
    Trace(String),
    Search,
    Page(String),
    Metrics,
    Health,
    NotFound,
}

fn route(method: &Method, path: &str) -> Result<Route, &'static str> {
    let segments: Vec<String> = path
        .strip_prefix('/')
        .unwrap_or(path)
        .split('/')
        .map(percent_decode)
        .collect::<Option<_>>()
        .ok_or("bad percent-encoding in path")?;
    if segments
        .iter()
        .any(|s| s.is_empty() || s == "." || s == "..")
        && path != "/"
    {
        return Err("non-canonical path");
    }
    let s: Vec<&str> = segments.iter().map(String::as_str).collect();
    let get = method == Method::GET;
    Ok(match (method.clone(), s.as_slice()) {
        (Method::POST, ["v1", "traces"]) => Route::Ingest,
        (_, ["sampling"] | ["api", "sampling"]) if get => Route::Sampling,
        (_, ["api", "services"]) if get => Route::Services,
        (_, ["api", "services", svc, "operations"]) if get => Route::Operations((*svc).to_owned()),
        (_, ["api", "operations"]) if get => Route::OperationsQuery,
        (_, ["api", "traces", id]) if get => Route::Trace((*id).to_owned()),
        (_, ["api", "traces"]) if get => Route::Search,
        (_, ["trace", id]) if get => Route::Page((*id).to_owned()),
        (_, ["metrics"]) if get => Route::Metrics,
        (_, ["healthz"]) if get => Route::Health,
        _ => Route::NotFound,
    })
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn query_params(query: Option<&str>) -> HashMap<String, String> {
    query
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            // Query strings are form-encoded: `+` is a space there (unlike in the path).
            let v = percent_decode(&v.replace('+', " "))?;
            Some((percent_decode(k)?, v))
        })
        .collect()
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

async fn handle(app: &App, req: Request<Incoming>) -> Resp {
    let route = match route(req.method(), req.uri().path()) {
        Ok(r) => r,
        Err(why) => return json(StatusCode::BAD_REQUEST, &jaeger::error(400, why)),
    };
    let params = query_params(req.uri().query());
    let store_error = |e: crate::store::StoreError| {
        tracing::warn!(error = %e, "span store read failed");
        json(
            StatusCode::INTERNAL_SERVER_ERROR,
            &jaeger::error(500, &e.to_string()),
        )
    };
    match route {
        Route::Ingest => ingest(app, req).await,
        Route::Sampling => match params.get("service").filter(|s| !s.is_empty()) {
            Some(service) => {
                let rules = app.sampler.rules();
                // Labelled by the service only when the rules name it: the query string is
                // the caller's, and a label per made-up name would grow without bound.
                let label = if rules.names(service) {
                    service.clone()
                } else {
                    "other".to_owned()
                };
                counter!("traces_sampling_requests_total", "service" => label).increment(1);
                json(StatusCode::OK, &rules.remote_response(service))
            }
            None => respond(
                StatusCode::BAD_REQUEST,
                "text/plain",
                "'service' parameter must be provided\n",
            ),
        },
        Route::Services => match jaeger::services(&app.store, now_ns()).await {
            Ok(names) => {
                let n = names.len();
                json(
                    StatusCode::OK,
                    &jaeger::envelope(serde_json::json!(names), n),
                )
            }
            Err(e) => store_error(e),
        },
        Route::Operations(service) => {
            match jaeger::operations(&app.store, &service, now_ns()).await {
                Ok(names) => {
                    let n = names.len();
                    json(
                        StatusCode::OK,
                        &jaeger::envelope(serde_json::json!(names), n),
                    )
                }
                Err(e) => store_error(e),
            }
        }
        Route::OperationsQuery => {
            let Some(service) = params.get("service") else {
                return json(
                    StatusCode::BAD_REQUEST,
                    &jaeger::error(400, "parameter service is required"),
                );
            };
            match jaeger::operations(&app.store, service, now_ns()).await {
                Ok(names) => {
                    let ops: Vec<_> = names
                        .iter()
                        .map(|n| serde_json::json!({"name": n, "spanKind": ""}))
                        .collect();
                    json(
                        StatusCode::OK,
                        &jaeger::envelope(serde_json::json!(ops), names.len()),
                    )
                }
                Err(e) => store_error(e),
            }
        }
        Route::Trace(id) => {
            if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
                return json(
                    StatusCode::BAD_REQUEST,
                    &jaeger::error(400, "trace ID must be 32 hex digits"),
                );
            }
            match app.store.trace(&id).await {
                Ok(spans) if spans.is_empty() => json(
                    StatusCode::NOT_FOUND,
                    &jaeger::error(404, "trace not found"),
                ),
                Ok(spans) => json(
                    StatusCode::OK,
                    &jaeger::envelope(serde_json::json!([jaeger::trace_json(&spans)]), 1),
                ),
                Err(e) => store_error(e),
            }
        }
        Route::Search => match Search::parse(&params, now_ns()) {
            Err(why) => json(StatusCode::BAD_REQUEST, &jaeger::error(400, &why)),
            Ok(q) => match jaeger::search(&app.store, &q).await {
                Ok(traces) => {
                    let data: Vec<_> = traces.iter().map(|t| jaeger::trace_json(t)).collect();
                    let n = data.len();
                    json(
                        StatusCode::OK,
                        &jaeger::envelope(serde_json::json!(data), n),
                    )
                }
                Err(e) => store_error(e),
            },
        },
        Route::Page(id) => match app.store.trace(&id).await {
            Ok(spans) => {
                let status = if spans.is_empty() {
                    StatusCode::NOT_FOUND
                } else {
                    StatusCode::OK
                };
                respond(
                    status,
                    "text/html; charset=utf-8",
                    page::trace_page(&id, &spans),
                )
            }
            Err(e) => store_error(e),
        },
        Route::Metrics => respond(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            app.metrics.render(),
        ),
        Route::Health => respond(StatusCode::OK, "text/plain", "ok\n"),
        Route::NotFound => json(StatusCode::NOT_FOUND, &jaeger::error(404, "no such route")),
    }
}

async fn ingest(app: &App, req: Request<Incoming>) -> Resp {
    let ct = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let Some(encoding) = Encoding::from_content_type(ct) else {
        counter!("traces_requests_total", "result" => "unsupported_media_type").increment(1);
        return respond(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "text/plain",
            "Content-Type must be application/x-protobuf or application/json\n",
        );
    };
    if req
        .headers()
        .get(hyper::header::CONTENT_ENCODING)
        .is_some_and(|v| v != "identity")
    {
        counter!("traces_requests_total", "result" => "unsupported_encoding").increment(1);
        return respond(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "text/plain",
            "compressed bodies are not accepted: send uncompressed OTLP\n",
        );
    }
    let body = match Limited::new(req.into_body(), app.settings.max_body)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            let too_big = e
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some();
            counter!("traces_requests_total", "result" => if too_big { "too_large" } else { "read_error" }).increment(1);
            return if too_big {
                respond(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "text/plain",
                    format!(
                        "body over {} bytes: send smaller batches\n",
                        app.settings.max_body
                    ),
                )
            } else {
                respond(
                    StatusCode::BAD_REQUEST,
                    "text/plain",
                    "could not read the body\n",
                )
            };
        }
    };
    let decoded = match otlp::decode(&body, encoding) {
        Ok(d) => d,
        Err(e) => {
            counter!("traces_requests_total", "result" => "bad_request").increment(1);
            return respond(StatusCode::BAD_REQUEST, "text/plain", format!("{e}\n"));
        }
    };
    let n = decoded.rows.len();
    // Reserve room in the queue first; a full queue refuses the whole request (nothing
    // half-taken), and the exporter retries after Retry-After.
    let reserved = app.queued.fetch_add(n, Ordering::AcqRel) + n;
    if reserved > app.settings.max_queue_spans {
        app.queued.fetch_sub(n, Ordering::AcqRel);
        counter!("traces_spans_dropped_total", "reason" => "queue_full").increment(n as u64);
        counter!("traces_requests_total", "result" => "throttled").increment(1);
        let mut r = respond(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "span queue full: retry later\n",
        );
        r.headers_mut()
            .insert(RETRY_AFTER, hyper::header::HeaderValue::from_static("1"));
        return r;
    }
    if n > 0 && app.queue.send(decoded.rows).is_err() {
        app.queued.fetch_sub(n, Ordering::AcqRel);
        return respond(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "shutting down\n",
        );
    }
    counter!("traces_spans_accepted_total").increment(n as u64);
    counter!("traces_spans_rejected_total").increment(decoded.rejected);
    counter!("traces_requests_total", "result" => "ok").increment(1);
    // OTLP's answer: an empty response, or partial_success naming what was refused.
    use opentelemetry_proto::tonic::collector::trace::v1::{
        ExportTracePartialSuccess, ExportTraceServiceResponse,
    };
    let answer = ExportTraceServiceResponse {
        partial_success: (decoded.rejected > 0).then(|| ExportTracePartialSuccess {
            rejected_spans: i64::try_from(decoded.rejected).unwrap_or(i64::MAX),
            error_message: decoded.first_error.unwrap_or_default(),
        }),
    };
    match encoding {
        Encoding::Protobuf => respond(
            StatusCode::OK,
            "application/x-protobuf",
            answer.encode_to_vec(),
        ),
        Encoding::Json => respond(
            StatusCode::OK,
            "application/json",
            serde_json::to_vec(&answer).unwrap_or_else(|_| b"{}".to_vec()),
        ),
    }
}

/// Where the writer puts spans.
#[derive(Debug)]
enum Sink {
    /// The span store itself (the embedded default).
    Store(SpanStore),
    /// A Kafka topic that store writers consume.
    Kafka(SpanProducer),
}

impl Sink {
    async fn put(&self, rows: Vec<SpanRow>) {
        let n = rows.len();
        match self {
            Sink::Store(store) => match store.write(rows, chrono::Utc::now()).await {
                Ok(files) => {
                    counter!("traces_spans_stored_total").increment(n as u64);
                    counter!("traces_store_files_total").increment(files as u64);
                }
                Err(e) => {
                    tracing::error!(error = %e, spans = n, "span store write failed; spans dropped");
                    counter!("traces_spans_dropped_total", "reason" => "store_error")
                        .increment(n as u64);
                }
            },
            Sink::Kafka(producer) => {
                let failed = producer.send(&rows).await;
                counter!("traces_spans_produced_total").increment((n - failed) as u64);
                if failed > 0 {
                    tracing::error!(spans = failed, "kafka did not take spans; dropped");
                    counter!("traces_spans_dropped_total", "reason" => "kafka_error")
                        .increment(failed as u64);
                }
            }
        }
    }
}

/// Drains the queue into the sink: every `flush_interval`, or sooner at `flush_spans`. A
/// failed write drops that batch with a counter (spans are telemetry: never block ingest on it).
async fn writer(
    sink: Sink,
    mut rx: mpsc::UnboundedReceiver<Vec<SpanRow>>,
    queued: Arc<AtomicUsize>,
    settings: Settings,
    mut stop: watch::Receiver<bool>,
) {
    let mut pending: Vec<SpanRow> = Vec::new();
    let mut tick = tokio::time::interval(settings.flush_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stopping = false;
    loop {
        tokio::select! {
            batch = rx.recv() => match batch {
                Some(b) => {
                    pending.extend(b);
                    if pending.len() < settings.flush_spans { continue; }
                }
                None => stopping = true,
            },
            _ = tick.tick() => {}
            _ = stop.changed(), if !stopping => {
                stopping = true;
                while let Ok(b) = rx.try_recv() { pending.extend(b); }
            }
        }
        if !pending.is_empty() {
            let rows = std::mem::take(&mut pending);
            let n = rows.len();
            sink.put(rows).await;
            queued.fetch_sub(n, Ordering::AcqRel);
        }
        if stopping {
            return;
        }
    }
}

/// Reloads the rules when the file's contents change; a bad file keeps the old rules.
async fn watch_rules(
    path: PathBuf,
    sampler: Arc<Sampler>,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut last = std::fs::read(&path).ok();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
        let now = std::fs::read(&path).ok();
        if now == last {
            continue;
        }
        last = now;
        match load_rules(&path) {
            Ok(rules) => {
                sampler.set_rules(rules);
                counter!("traces_sampling_reloads_total", "result" => "ok").increment(1);
                tracing::info!(file = %path.display(), "sampling rules reloaded");
            }
            Err(e) => {
                counter!("traces_sampling_reloads_total", "result" => "error").increment(1);
                tracing::error!(error = %e, "sampling rules not reloaded; the previous rules stay");
            }
        }
    }
}

async fn expire(store: SpanStore, retention: Duration, mut stop: watch::Receiver<bool>) {
    // Hours are the unit of deletion: checking every ten minutes keeps at most one extra.
    let mut tick = tokio::time::interval(Duration::from_secs(600));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let cutoff =
            now_ns().saturating_sub(i64::try_from(retention.as_nanos()).unwrap_or(i64::MAX));
        match store.expire(cutoff).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(objects = n, "expired spans past retention"),
            Err(e) => tracing::warn!(error = %e, "retention pass failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_parsed_not_prefixed() {
        assert_eq!(route(&Method::POST, "/v1/traces"), Ok(Route::Ingest));
        assert_eq!(route(&Method::GET, "/v1/traces"), Ok(Route::NotFound));
        assert_eq!(
            route(&Method::GET, "/api/services/push%2Dserver/operations"),
            Ok(Route::Operations("push-server".into()))
        );
        assert_eq!(
            route(&Method::GET, "/api/services/a+b/operations"),
            Ok(Route::Operations("a+b".into()))
        );
        assert!(route(&Method::POST, "//v1/traces").is_err());
        assert!(route(&Method::GET, "/api/../metrics").is_err());
        assert!(route(&Method::GET, "/api/traces/%zz").is_err());
    }

    #[test]
    fn query_strings_are_form_decoded() {
        let p = query_params(Some("service=push-server&operation=POST+%2Fv1%2Fpush&x"));
        assert_eq!(p["operation"], "POST /v1/push");
        assert_eq!(p["x"], "");
    }
}
