//! Span export: the `tracing` spans every crate already opens, sent to an OpenTelemetry
//! collector over OTLP/HTTP (protobuf), in the background, sampled at the root by the
//! collector's Jaeger remote-sampling rules and honoured downstream (parent-based).
//!
//! Off unless an endpoint is given (`--otlp-endpoint` or `OTEL_EXPORTER_OTLP_ENDPOINT`): then
//! no SDK object exists and the subscriber is the one logging always had.
//!
//! A dead or slow collector never slows a push: spans end into a bounded queue drained by the
//! SDK's batch processor on its own thread; a full queue drops the span and counts it
//! (`telemetry_spans_dropped_total{reason="queue_full"}`), a batch the collector did not take
//! within the export timeout is counted too (`reason="export_failed"`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{Protocol, WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider, SpanData, SpanExporter,
    SpanProcessor,
};
use opentelemetry_sdk::Resource;

use crate::propagation::TraceContext;

/// Spans counted when they were not exported: label `reason` is `queue_full` or `export_failed`.
pub const SPANS_DROPPED: &str = "telemetry_spans_dropped_total";
/// Spans the collector accepted.
pub const SPANS_EXPORTED: &str = "telemetry_spans_exported_total";

/// Describes the span-export counters; binaries call it from their own `describe` function.
pub fn describe_trace_metrics() {
    metrics::describe_counter!(
        SPANS_DROPPED,
        "Spans not exported: reason=queue_full (collector slower than the spans) or export_failed (collector down or timed out)."
    );
    metrics::describe_counter!(SPANS_EXPORTED, "Spans the OTLP collector accepted.");
}

/// The `--otlp-endpoint` flag every binary flattens into its CLI.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct OtlpArgs {
    /// OTLP/HTTP collector base URL (e.g. http://127.0.0.1:4318): spans go to URL/v1/traces,
    /// sampling rules come from URL/sampling. Tracing is off when unset.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", value_name = "URL")]
    pub otlp_endpoint: Option<String>,
}

/// How spans are exported; [`TraceExport::from_args`] fills it from the flag and environment.
#[derive(Debug, Clone)]
pub struct TraceExport {
    /// Collector base URL (`http://host:port`); `None`: tracing off.
    pub endpoint: Option<String>,
    /// `service.name` of the spans: `OTEL_SERVICE_NAME`, else the binary's name.
    pub service_name: String,
    /// How often the sampling rules are fetched again. The SDK's first fetch happens one
    /// interval after start; until then `initial_ratio` decides.
    pub sampling_refresh: Duration,
    /// Root sampling ratio before the first rules arrive (Jaeger clients' default 0.001).
    pub initial_ratio: f64,
    /// Spans waiting for export; past it they are dropped and counted.
    pub max_queue: usize,
    /// Longest one export (with its retries) may take before its spans count as dropped.
    pub export_timeout: Duration,
}

impl TraceExport {
    /// From the flag (which clap already fills from `OTEL_EXPORTER_OTLP_ENDPOINT`) and
    /// `OTEL_SERVICE_NAME`, with `default_service` as the fallback name.
    pub fn from_args(args: &OtlpArgs, default_service: &str) -> Self {
        let service_name = std::env::var("OTEL_SERVICE_NAME")
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| default_service.to_string());
        TraceExport {
            endpoint: args.otlp_endpoint.clone().filter(|s| !s.is_empty()),
            service_name,
            sampling_refresh: Duration::from_secs(10),
            initial_ratio: 0.001,
            max_queue: 2048,
            export_timeout: Duration::from_secs(5),
        }
    }
}

/// Keeps the pipeline alive; dropping it flushes what is queued (bounded by the export
/// timeout) and stops the export thread.
#[derive(Debug)]
pub struct TraceGuard {
    provider: SdkTracerProvider,
}

impl TraceGuard {
    /// Exports every ended span now (tests; a binary just drops the guard).
    pub fn flush(&self) {
        let _ = self.provider.force_flush();
    }
}

impl Drop for TraceGuard {
    fn drop(&mut self) {
        let _ = self.provider.shutdown();
    }
}

/// Errors building the pipeline (a bad endpoint).
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// The endpoint is not an `http://host[:port]` URL.
    #[error("--otlp-endpoint {0:?}: expected http://HOST[:PORT] (https needs a TLS client, not built in)")]
    Endpoint(String),
    /// The SDK refused the configuration.
    #[error("OTLP exporter: {0}")]
    Exporter(String),
}

/// Builds the provider (exporter, gate, batch processor, sampler) for `cfg`, sending to
/// `endpoint` (a collector base URL); [`crate::init_logging_with_traces`] wraps it in a layer.
pub fn provider(cfg: &TraceExport, endpoint: &str) -> Result<SdkTracerProvider, TraceError> {
    let base = endpoint.trim_end_matches('/');
    let parsed: opentelemetry_http::Request<()> = Request::get(base)
        .body(())
        .map_err(|_| TraceError::Endpoint(endpoint.to_string()))?;
    if parsed.uri().scheme_str() != Some("http") || parsed.uri().host().is_none() {
        return Err(TraceError::Endpoint(endpoint.to_string()));
    }
    let client = BlockingClient::new(cfg.export_timeout);
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(client.clone())
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(format!("{base}/v1/traces"))
        .with_timeout(cfg.export_timeout)
        .build()
        .map_err(|e| TraceError::Exporter(e.to_string()))?;
    let queued = Arc::new(AtomicUsize::new(0));
    let batch = BatchSpanProcessor::builder(CountingExporter {
        inner: exporter,
        queued: queued.clone(),
    })
    .with_batch_config(
        BatchConfigBuilder::default()
            .with_max_queue_size(cfg.max_queue)
            .build(),
    )
    .build();
    // The sampler's update task needs a runtime: the SDK's current-thread tokio runtime runs
    // it on a thread of its own (so it works whether or not the binary is inside tokio, and
    // never occupies a worker of the binary's runtime). Our blocking client is fine there.
    let remote = Sampler::jaeger_remote(
        opentelemetry_sdk::runtime::TokioCurrentThread,
        client,
        Sampler::TraceIdRatioBased(cfg.initial_ratio),
        cfg.service_name.clone(),
    )
    .with_endpoint(format!("{base}/sampling"))
    .with_update_interval(cfg.sampling_refresh)
    .build()
    .map_err(|e| TraceError::Exporter(e.to_string()))?;
    Ok(SdkTracerProvider::builder()
        .with_span_processor(QueueGate {
            inner: batch,
            queued,
            cap: cfg.max_queue,
        })
        .with_sampler(Sampler::ParentBased(Box::new(remote)))
        .with_resource(
            Resource::builder()
                .with_service_name(cfg.service_name.clone())
                .build(),
        )
        .build())
}

/// The `tracing` layer that turns spans into OpenTelemetry spans.
pub(crate) type OtelLayer<S> =
    tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::Tracer>;

/// The `tracing` layer over the provider, and the guard that owns it.
pub(crate) fn layer<S>(cfg: &TraceExport) -> Result<Option<(OtelLayer<S>, TraceGuard)>, TraceError>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    let Some(endpoint) = cfg.endpoint.as_deref() else {
        return Ok(None);
    };
    let provider = provider(cfg, endpoint)?;
    let tracer = provider.tracer("push-platform");
    // W3C traceparent/tracestate for the code that injects and extracts headers.
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    ON.store(true, Ordering::Relaxed);
    Ok(Some((
        tracing_opentelemetry::layer().with_tracer(tracer),
        TraceGuard { provider },
    )))
}

/// Whether span export was installed in this process: hot paths open their per-message
/// spans only then, so tracing off costs one relaxed load.
pub fn is_on() -> bool {
    ON.load(Ordering::Relaxed)
}

static ON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Makes the caller's context `parent` the parent of `span` (a receive span: admin push,
/// Kafka consume, internal deliver), so the trace continues here. Does nothing when tracing
/// is off (no layer holds the span) or the span is disabled.
pub fn set_parent(span: &tracing::Span, parent: &TraceContext) {
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState,
    };
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    if span.is_disabled() {
        return;
    }
    let flags = if parent.sampled {
        TraceFlags::SAMPLED
    } else {
        TraceFlags::default()
    };
    let state = parent
        .tracestate
        .parse()
        .unwrap_or_else(|_| TraceState::default());
    let remote = SpanContext::new(
        TraceId::from_bytes(parent.trace_id),
        SpanId::from_bytes(parent.span_id),
        flags,
        true,
        state,
    );
    let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
}

/// The context to pass on from inside `span`: `span`'s own when it is exported (so the next
/// service's spans hang under it), else `incoming` unchanged (a hop that does not trace still
/// forwards the caller's trace).
pub fn outgoing(span: &tracing::Span, incoming: Option<&TraceContext>) -> Option<TraceContext> {
    use opentelemetry::trace::TraceContextExt as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    if !span.is_disabled() {
        let cx = span.context();
        let sc = cx.span().span_context().clone();
        if sc.is_valid() {
            return Some(TraceContext {
                trace_id: sc.trace_id().to_bytes(),
                span_id: sc.span_id().to_bytes(),
                sampled: sc.is_sampled(),
                tracestate: sc.trace_state().header(),
            });
        }
    }
    incoming.cloned()
}

/// Runs `f` with this thread's spans going to an OpenTelemetry layer that samples everything
/// and exports nothing: for the unit tests of the crates that call [`set_parent`] and
/// [`outgoing`] (what a test checks is the context passed on).
pub fn with_test_tracer<R>(f: impl FnOnce() -> R) -> R {
    use tracing_subscriber::layer::SubscriberExt as _;
    let provider = SdkTracerProvider::builder().build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    tracing::subscriber::with_default(subscriber, f)
}

/// Drops (and counts) spans past `cap` before the batch processor sees them: the SDK's own
/// queue drops silently, this one says how many in `/metrics`. `queued` counts spans handed to
/// the batch processor and not yet taken by an export, so the processor's queue (same size)
/// never fills first.
#[derive(Debug)]
struct QueueGate<P> {
    inner: P,
    queued: Arc<AtomicUsize>,
    cap: usize,
}

impl<P: SpanProcessor> SpanProcessor for QueueGate<P> {
    fn on_start(&self, span: &mut opentelemetry_sdk::trace::Span, cx: &opentelemetry::Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        if self.queued.fetch_add(1, Ordering::AcqRel) >= self.cap {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            metrics::counter!(SPANS_DROPPED, "reason" => "queue_full").increment(1);
            return;
        }
        self.inner.on_end(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// The OTLP exporter, counting what it exported and what the collector did not take.
#[derive(Debug)]
struct CountingExporter<E> {
    inner: E,
    queued: Arc<AtomicUsize>,
}

impl<E: SpanExporter> SpanExporter for CountingExporter<E> {
    fn export(
        &self,
        batch: Vec<SpanData>,
    ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        let n = batch.len();
        self.queued.fetch_sub(n, Ordering::AcqRel);
        let export = self.inner.export(batch);
        async move {
            let result = export.await;
            let n = n as u64;
            match result {
                Ok(()) => metrics::counter!(SPANS_EXPORTED).increment(n),
                Err(_) => {
                    metrics::counter!(SPANS_DROPPED, "reason" => "export_failed").increment(n)
                }
            }
            result
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// Largest response read (the sampling rules; an export answer is near empty): a larger
/// one is an error, not memory taken from the service.
const MAX_RESPONSE: u64 = 4 << 20;

/// The exporter's and the sampler's HTTP client: one blocking `ureq` agent (keep-alive pool
/// shared by both). The batch processor exports from a plain thread with no async runtime,
/// and the sampler's updates run on their own thread too, so blocking is harmless there and
/// no async HTTP stack (reqwest, hyper: a runtime and TLS) is compiled. Plain `http://` only
/// (ureq is built without TLS). Each request, from connecting to the last byte of the
/// answer, is bounded by the agent's timeout; 4xx and 5xx answers reach the exporter as
/// responses (OTLP's retry rules need the status), redirects are not followed.
#[derive(Debug, Clone)]
struct BlockingClient {
    agent: ureq::Agent,
}

impl BlockingClient {
    fn new(timeout: Duration) -> Self {
        let agent = ureq::Agent::config_builder()
            // One budget for the whole call: DNS, connect, send, headers and body.
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .max_redirects(0)
            .build()
            .new_agent();
        BlockingClient { agent }
    }

    fn send(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let uri = request.uri().clone();
        if uri.scheme_str() != Some("http") {
            return Err(format!("{uri}: only http:// is supported").into());
        }
        let (parts, body) = request.into_parts();
        let response = self
            .agent
            .run(Request::from_parts(parts, body.as_ref()))
            .map_err(|e| format!("{uri}: {e}"))?;
        let (parts, body) = response.into_parts();
        let body = body
            .into_with_config()
            .limit(MAX_RESPONSE)
            .read_to_vec()
            .map_err(|e| match e {
                ureq::Error::BodyExceedsLimit(_) => {
                    format!("{uri}: response larger than 4 MiB")
                }
                e => format!("{uri}: reading the response: {e}"),
            })?;
        Ok(Response::from_parts(parts, Bytes::from(body)))
    }
}

#[async_trait::async_trait]
impl HttpClient for BlockingClient {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        self.send(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endpoint_must_be_plain_http() {
        let mut cfg = TraceExport::from_args(&OtlpArgs::default(), "t");
        for bad in ["https://collector:4318", "collector:4318", "not a url"] {
            cfg.endpoint = Some(bad.into());
            let err = provider(&cfg, bad).unwrap_err();
            assert!(matches!(err, TraceError::Endpoint(_)), "{bad}: {err}");
        }
    }

    #[test]
    fn a_dead_collector_is_an_error_not_a_hang() {
        // Connections to this port are refused.
        let refused = testkit::RefusedPort::new();
        let request = Request::post(format!("http://{}/v1/traces", refused.addr))
            .body(Bytes::from_static(b"x"))
            .unwrap();
        assert!(BlockingClient::new(Duration::from_secs(2))
            .send(request)
            .is_err());
    }

    /// A batch processor that keeps nothing and never exports: the gate's count only rises.
    #[derive(Debug)]
    struct Hold;

    impl SpanProcessor for Hold {
        fn on_start(&self, _: &mut opentelemetry_sdk::trace::Span, _: &opentelemetry::Context) {}
        fn on_end(&self, _: SpanData) {}
        fn force_flush(&self) -> OTelSdkResult {
            Ok(())
        }
        fn shutdown_with_timeout(&self, _: Duration) -> OTelSdkResult {
            Ok(())
        }
    }

    #[test]
    fn spans_past_the_queue_are_dropped_and_counted() {
        use opentelemetry::trace::Tracer as _;
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(QueueGate {
                inner: Hold,
                queued: Arc::new(AtomicUsize::new(0)),
                cap: 2,
            })
            .build();
        let tracer = provider.tracer("test");
        metrics::with_local_recorder(&recorder, || {
            for _ in 0..5 {
                tracer.in_span("s", |_| {});
            }
        });
        let text = handle.render();
        assert!(
            text.contains("telemetry_spans_dropped_total{reason=\"queue_full\"} 3"),
            "{text}"
        );
    }

    /// A server on 127.0.0.1:0 that takes one request, answers `answer` (unless `None`: then
    /// it holds the connection unanswered until `release` is dropped or sent to) and returns
    /// the request it read.
    fn one_shot(
        answer: Option<Vec<u8>>,
    ) -> (
        String,
        std::sync::mpsc::Sender<()>,
        std::thread::JoinHandle<String>,
    ) {
        use std::io::{Read as _, Write as _};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (release, released) = std::sync::mpsc::channel::<()>();
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 1024];
            loop {
                let text = String::from_utf8_lossy(&got).to_ascii_lowercase();
                if let Some(end) = text.find("\r\n\r\n") {
                    let len: usize = text[..end]
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map_or(0, |v| v.trim().parse().unwrap());
                    if got.len() >= end + 4 + len {
                        break;
                    }
                }
                // A client that gave up early: the test's own assertions say what went wrong.
                let n = conn.read(&mut buf).unwrap_or(0);
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            match answer {
                // The client may stop reading an answer it refuses: a failed write is fine.
                Some(answer) => drop(conn.write_all(&answer)),
                None => drop(released.recv()),
            }
            String::from_utf8_lossy(&got).into_owned()
        });
        (base, release, server)
    }

    fn post(url: String, body: &'static [u8]) -> Request<Bytes> {
        Request::post(url)
            .header("Content-Type", "application/x-protobuf")
            .body(Bytes::from_static(body))
            .unwrap()
    }

    #[test]
    fn the_client_posts_and_reads_the_answer() {
        let (base, _release, server) = one_shot(Some(
            b"HTTP/1.1 202 Accepted\r\nContent-Length: 3\r\n\r\nok!".to_vec(),
        ));
        let client = BlockingClient::new(Duration::from_secs(30));
        let response = client
            .send(post(format!("{base}/v1/traces?x=1"), b"hello"))
            .unwrap();
        assert_eq!(response.status(), 202);
        assert_eq!(response.body().as_ref(), b"ok!");
        let request = server.join().unwrap();
        assert!(
            request.starts_with("POST /v1/traces?x=1 HTTP/1.1\r\n"),
            "{request}"
        );
        let lower = request.to_ascii_lowercase();
        assert!(
            lower.contains("content-type: application/x-protobuf\r\n"),
            "{request}"
        );
        assert!(lower.contains("content-length: 5\r\n"), "{request}");
        assert!(request.ends_with("\r\n\r\nhello"), "{request}");
    }

    #[test]
    fn a_503_reaches_the_caller_as_a_response() {
        // OTLP's exporter retries on 503 with Retry-After: it must see the status, not an error.
        let (base, _release, server) = one_shot(Some(
            b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 4\r\n\r\nbusy"
                .to_vec(),
        ));
        let client = BlockingClient::new(Duration::from_secs(30));
        let response = client
            .send(post(format!("{base}/v1/traces"), b"x"))
            .unwrap();
        assert_eq!(response.status(), 503);
        assert_eq!(response.headers()["retry-after"], "1");
        assert_eq!(response.body().as_ref(), b"busy");
        server.join().unwrap();
    }

    #[test]
    fn an_answer_over_4_mib_is_an_error_and_one_at_the_limit_is_read() {
        let client = BlockingClient::new(Duration::from_secs(60));
        for (len, fits) in [(MAX_RESPONSE, true), (MAX_RESPONSE + 1, false)] {
            let mut answer =
                format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\n\r\n").into_bytes();
            answer.resize(answer.len() + len as usize, b'r');
            let (base, _release, server) = one_shot(Some(answer));
            let result = client.send(
                Request::get(format!("{base}/sampling?service=t"))
                    .body(Bytes::new())
                    .unwrap(),
            );
            if fits {
                assert_eq!(result.unwrap().body().len() as u64, len);
            } else {
                let err = result.unwrap_err().to_string();
                assert!(err.contains("response larger than"), "{err}");
            }
            server.join().unwrap();
        }
    }

    #[test]
    fn a_silent_collector_times_out_instead_of_hanging() {
        // The server keeps the connection open and never answers until the client returned:
        // only the client's own bound can end the call.
        let (base, release, server) = one_shot(None);
        let client = BlockingClient::new(Duration::from_secs(2));
        let err = client
            .send(post(format!("{base}/v1/traces"), b"x"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("timeout"), "{err}");
        release.send(()).unwrap();
        server.join().unwrap();
    }

    #[test]
    fn the_client_refuses_other_schemes() {
        let client = BlockingClient::new(Duration::from_secs(2));
        let err = client
            .send(post("https://127.0.0.1:1/v1/traces".into(), b"x"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("only http:// is supported"), "{err}");
    }

    #[test]
    fn a_received_context_is_the_parent_and_the_child_is_passed_on() {
        let parent = crate::propagation::parse_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .unwrap();
        // Tracing off (no layer): the incoming context is forwarded unchanged.
        let span = tracing::info_span!("receive");
        assert_eq!(outgoing(&span, Some(&parent)), Some(parent.clone()));
        assert_eq!(outgoing(&span, None), None);

        with_test_tracer(|| {
            let span = tracing::info_span!("receive");
            set_parent(&span, &parent);
            let out = outgoing(&span, Some(&parent)).unwrap();
            assert_eq!(out.trace_id, parent.trace_id);
            assert_ne!(out.span_id, parent.span_id, "the receive span's own id");
            assert!(out.sampled);
            // A span with no parent starts a trace of its own.
            let root = tracing::info_span!("root");
            assert_ne!(outgoing(&root, None).unwrap().trace_id, parent.trace_id);
        });
    }
}
