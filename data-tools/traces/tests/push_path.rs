//! The push path on the real collector: `traces serve` (in process, store in a temporary
//! directory) is the OTLP endpoint and the sampling endpoint of push-lib's sender,
//! msg-processor and a push-server node; one push goes through librdkafka's mock cluster and a
//! Redis registry to a WebSocket client, and its trace is then found by ID through the Jaeger
//! query API, as an operator would look for it.
//!
//! Each service reports under its own `service.name`, as separate processes would: each runs on
//! a tokio runtime of its own whose threads have that service's span exporter as their default
//! subscriber (`telemetry::trace_dispatch`), with its own Jaeger remote sampler fetching its own
//! rules. The pipeline's set-up (nodes, processors, Kafka producer, WebSocket client) is
//! msg-processor's test module, included as is.

#[path = "../../../msg-processor/tests/common/mod.rs"]
mod common;
mod support;

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use push_lib::SendOptions;
use serde_json::Value;
use traces::server::Settings;

/// Roots of push-send sampled by its rule; the other services' own rules say never, so their
/// spans in a trace are there only because they honour the caller's sampled flag.
const RULES_ON: &str = r#"{"service_strategies": [
    {"service": "push-send", "type": "probabilistic", "param": 1.0}],
  "default_strategy": {"type": "probabilistic", "param": 0.0}}"#;

/// Everything sampled, except push-send's `push send` endpoint (an operation rule).
const RULES_SEND_OFF: &str = r#"{"service_strategies": [
    {"service": "push-send", "type": "probabilistic", "param": 1.0,
     "operation_strategies": [{"operation": "push send", "type": "probabilistic", "param": 0.0}]}],
  "default_strategy": {"type": "probabilistic", "param": 1.0}}"#;

/// The spans of one push through the pipeline, with the service that reports each (the
/// client does not ack, so the node reports no `receipt`).
const HOPS: [(&str, &str); 8] = [
    ("push send", "push-send"),
    ("consume", "msg-processor"),
    ("history append", "msg-processor"),
    ("registry lookup", "msg-processor"),
    ("deliver batch", "msg-processor"),
    ("internal receive", "push-server"),
    ("queue", "push-server"),
    ("socket write", "push-server"),
];

/// One service of the pipeline: a runtime whose threads export their spans as `name`.
struct Service {
    rt: Option<tokio::runtime::Runtime>,
    guard: telemetry::TraceGuard,
}

impl Service {
    /// `initial_ratio`: the root sampling ratio until the first rules arrive from `collector`.
    fn start(name: &str, collector: &str, initial_ratio: f64) -> Self {
        let mut cfg = telemetry::TraceExport::from_args(
            &telemetry::OtlpArgs {
                otlp_endpoint: Some(collector.to_owned()),
            },
            name,
        );
        cfg.service_name = name.to_owned();
        cfg.initial_ratio = initial_ratio;
        // Rules fetched often, so a test waits for them briefly.
        cfg.sampling_refresh = Duration::from_millis(200);
        let (dispatch, guard) = telemetry::trace_dispatch(&cfg)
            .expect("exporter builds")
            .expect("export is on");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            // The guard would restore the previous default: the thread keeps this one for life.
            .on_thread_start(move || std::mem::forget(tracing::dispatcher::set_default(&dispatch)))
            .build()
            .expect("runtime");
        Self {
            rt: Some(rt),
            guard,
        }
    }

    /// Runs `f` on this service's runtime (so its spans are this service's) and waits for it.
    async fn run<F>(&self, f: F) -> F::Output
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let rt = self.rt.as_ref().expect("running");
        rt.spawn(f).await.expect("task completes")
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.guard.flush();
        if let Some(rt) = self.rt.take() {
            // Dropping a runtime blocks, which tokio forbids inside the test's runtime.
            rt.shutdown_background();
        }
    }
}

/// The collector, the three services and the pipeline between them, with user `trudy`
/// connected to the node.
struct Pipeline {
    collector: support::Harness,
    sender: Service,
    processor_svc: Service,
    node_svc: Service,
    processor: Option<msg_processor::Processor>,
    ws: common::Ws,
    kafka: common::MockKafka,
    _node: push_server::Server,
    _redis: testkit::RedisServer,
    _rules: tempfile::TempDir,
}

impl Pipeline {
    async fn start(rules: &str, sender_initial_ratio: f64) -> Self {
        let rules_dir = tempfile::tempdir().unwrap();
        let rules_file = rules_dir.path().join("sampling.json");
        std::fs::write(&rules_file, rules).unwrap();
        let collector = support::start(Settings {
            sampling_file: Some(rules_file),
            ..Settings::default()
        })
        .await;
        let endpoint = format!("http://{}", collector.running.addr);
        let sender = Service::start("push-send", &endpoint, sender_initial_ratio);
        let processor_svc = Service::start("msg-processor", &endpoint, 0.0);
        let node_svc = Service::start("push-server", &endpoint, 0.0);

        let kafka = common::MockKafka::start();
        kafka.create_topic("push", 1);
        kafka.create_topic("push-dlq", 1);
        let redis = testkit::RedisServer::start();
        let node = {
            let url = redis.url();
            node_svc
                .run(async move { common::node("node-a", &url, None).await })
                .await
        };
        let ws = common::connect_ws(&node, "trudy").await;
        common::wait_registered(&redis.url(), &[("trudy".into(), "node-a".into())]).await;
        let settings = common::settings(&kafka.brokers(), "push", &redis.url());
        let processor = processor_svc.run(common::processor(settings)).await;
        Self {
            collector,
            sender,
            processor_svc,
            node_svc,
            processor: Some(processor),
            ws,
            kafka,
            _node: node,
            _redis: redis,
            _rules: rules_dir,
        }
    }

    /// Waits until `service` has fetched its rules twice: its sampler takes an answer before
    /// it asks again, so the first answer is then in force.
    async fn wait_for_rules(&self, service: &str) {
        let line = format!("traces_sampling_requests_total{{service=\"{service}\"}} ");
        support::eventually_some("the sampler's second rules fetch", async || {
            let (_, _, body) = self
                .collector
                .client
                .send("GET", "/metrics", &[], vec![])
                .await;
            let text = String::from_utf8(body).ok()?;
            let n: u64 = text
                .lines()
                .find_map(|l| l.strip_prefix(&line))?
                .parse()
                .ok()?;
            (n >= 2).then_some(())
        })
        .await;
    }

    /// Sends `data` to trudy through push-lib (as the push-send service) and returns the
    /// `message` her WebSocket receives.
    async fn push(&mut self, data: &str, opts: SendOptions) -> Value {
        let (brokers, data_owned) = (self.kafka.brokers(), data.to_owned());
        self.sender
            .run(async move {
                common::producer(&brokers, "push")
                    .send("trudy", data_owned, &opts)
                    .await
                    .expect("broker acknowledges")
            })
            .await;
        let msg = common::next_message(&mut self.ws).await;
        assert_eq!(msg["data"], data, "{msg}");
        msg
    }

    fn flush(&self) {
        for s in [&self.sender, &self.processor_svc, &self.node_svc] {
            s.guard.flush();
        }
    }

    /// The trace `id` from `GET /api/traces/{id}` once it holds every span of [`HOPS`].
    async fn trace_with_every_hop(&self, id: &str) -> Value {
        support::eventually_some("every hop's span in the stored trace", async || {
            self.flush();
            let (status, v) = self
                .collector
                .client
                .get_json(&format!("/api/traces/{id}"))
                .await;
            if status != 200 {
                return None;
            }
            let names: Vec<&str> = v["data"][0]["spans"]
                .as_array()?
                .iter()
                .filter_map(|s| s["operationName"].as_str())
                .collect();
            HOPS.iter().all(|(hop, _)| names.contains(hop)).then_some(v)
        })
        .await
    }

    async fn shutdown(mut self) {
        if let Some(p) = self.processor.take() {
            self.processor_svc.run(p.shutdown()).await;
        }
    }
}

/// `(trace ID, span ID, sampled)` of a W3C `traceparent`.
fn traceparent_parts(msg: &Value) -> (String, String, bool) {
    let tp = msg["traceparent"]
        .as_str()
        .expect("the message carries a traceparent");
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts.len(), 4, "{tp}");
    (parts[1].to_owned(), parts[2].to_owned(), parts[3] == "01")
}

/// One span of a Jaeger trace, by what the checks need.
#[derive(Debug)]
struct Hop {
    span_id: String,
    parent: Option<String>,
    service: String,
}

/// The trace's spans by operation name; each name exactly once.
fn hops(trace: &Value) -> HashMap<String, Hop> {
    let data = &trace["data"];
    assert_eq!(data.as_array().map(Vec::len), Some(1), "one trace: {trace}");
    let processes = &data[0]["processes"];
    let mut out = HashMap::new();
    for s in data[0]["spans"].as_array().unwrap() {
        let name = s["operationName"].as_str().unwrap().to_owned();
        let hop = Hop {
            span_id: s["spanID"].as_str().unwrap().to_owned(),
            parent: s["references"][0]["spanID"].as_str().map(str::to_owned),
            service: processes[s["processID"].as_str().unwrap()]["serviceName"]
                .as_str()
                .unwrap()
                .to_owned(),
        };
        assert!(
            out.insert(name.clone(), hop).is_none(),
            "{name} twice: {trace}"
        );
    }
    out
}

/// The parent links of one push: push send → consume → (history append, registry lookup,
/// deliver batch); deliver batch → internal receive → (queue, socket write); and each span's
/// service.
fn assert_push_path(h: &HashMap<String, Hop>) {
    for (name, service) in HOPS {
        assert_eq!(h[name].service, service, "{name}'s service");
    }
    assert_eq!(h["consume"].parent, Some(h["push send"].span_id.clone()));
    for child in ["history append", "registry lookup", "deliver batch"] {
        assert_eq!(
            h[child].parent,
            Some(h["consume"].span_id.clone()),
            "{child}"
        );
    }
    assert_eq!(
        h["internal receive"].parent,
        Some(h["deliver batch"].span_id.clone())
    );
    for child in ["queue", "socket write"] {
        assert_eq!(
            h[child].parent,
            Some(h["internal receive"].span_id.clone()),
            "{child}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_push_is_one_stored_trace_found_by_id_and_a_b3_caller_continues() {
    // Until push-send has the rules, its roots are never sampled: a stored trace shows the
    // rule fetched from the collector decided.
    let mut p = Pipeline::start(RULES_ON, 0.0).await;
    p.wait_for_rules("push-send").await;

    let msg = p.push("first", SendOptions::default()).await;
    let (trace_id, client_parent, sampled) = traceparent_parts(&msg);
    assert!(sampled, "push-send's rule samples: {msg}");
    let trace = p.trace_with_every_hop(&trace_id).await;
    let h = hops(&trace);
    assert_eq!(h.len(), HOPS.len(), "only the push path's spans: {trace}");
    assert_eq!(h["push send"].parent, None, "push send is the root");
    assert_push_path(&h);
    assert_eq!(
        client_parent, h["internal receive"].span_id,
        "the client's traceparent names the node's span"
    );

    // A caller speaking B3 (single header): the trace continues under its IDs.
    let (b3_trace, b3_span) = ("80f198ee56343ba864fe8b2a57d3eff7", "e457b5a2e4d86bd1");
    let b3 = format!("{b3_trace}-{b3_span}-1");
    let opts = SendOptions::default().trace_headers(|name| (name == "b3").then_some(b3.as_str()));
    let msg = p.push("second", opts).await;
    let (seen_trace, client_parent, _) = traceparent_parts(&msg);
    assert_eq!(seen_trace, b3_trace, "the B3 caller's trace ID is kept");
    let trace = p.trace_with_every_hop(b3_trace).await;
    let h = hops(&trace);
    assert_eq!(h["push send"].parent.as_deref(), Some(b3_span));
    assert_push_path(&h);
    assert_eq!(client_parent, h["internal receive"].span_id);
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_send_endpoint_unsampled_nothing_is_stored_and_the_push_arrives() {
    // Sampled until the rules arrive: nothing stored shows the fetched rule decided.
    let mut p = Pipeline::start(RULES_SEND_OFF, 1.0).await;
    p.wait_for_rules("push-send").await;

    let msg = p.push("unsampled", SendOptions::default()).await;
    let (trace_id, _, sampled) = traceparent_parts(&msg);
    assert!(!sampled, "the unsampled flag travels to the client: {msg}");

    // A push from a sampled caller after it: once its trace is stored whole, every span the
    // first push could have exported (earlier in each service's queue) would be stored too.
    let caller = "0af7651916cd43dd8448eb211c80319c";
    let opts = SendOptions {
        traceparent: Some(format!("00-{caller}-b7ad6b7169203331-01")),
        ..SendOptions::default()
    };
    p.push("sampled", opts).await;
    p.trace_with_every_hop(caller).await;
    let (status, _) = p
        .collector
        .client
        .get_json(&format!("/api/traces/{trace_id}"))
        .await;
    assert_eq!(status, 404, "the unsampled push left no spans");
    let (_, found) = p
        .collector
        .client
        .get_json("/api/traces?service=push-server&lookback=1h&limit=20")
        .await;
    let ids: Vec<&str> = found["data"]
        .as_array()
        .expect("search answer")
        .iter()
        .filter_map(|t| t["traceID"].as_str())
        .collect();
    assert_eq!(ids, [caller], "only the sampled caller's trace is stored");
    p.shutdown().await;
}
