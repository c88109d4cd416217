//! What the integration tests share: OTLP requests built from a compact description, a small
//! HTTP client over hyper, a server on 127.0.0.1:0 with its store in a temporary directory,
//! and polling for a condition.

// Each test binary uses a different part of this module.
#![allow(dead_code)]

use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value::Value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use traces::server::{self, Running, Settings};
use traces::store::SpanStore;

pub fn kv(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(Value::StringValue(value.into())),
        }),
        ..Default::default()
    }
}

pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// Five seconds before the first request this test binary built. Every request's offsets count
/// from this one instant, so spans of one trace sent in several requests line up however long
/// the test took between building them.
fn base_ns() -> u64 {
    static BASE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *BASE.get_or_init(|| now_ns() - 5_000_000_000)
}

/// One service's spans: (span id byte, parent byte or 0, name, offset µs, duration µs), offsets
/// counted from [`base_ns`].
pub fn request(
    service: &str,
    trace: u8,
    spans: &[(u8, u8, &str, u64, u64)],
) -> ExportTraceServiceRequest {
    let t0 = base_ns();
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![kv("service.name", service)],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                spans: spans
                    .iter()
                    .map(|(id, parent, name, off, dur)| Span {
                        trace_id: vec![trace; 16],
                        span_id: vec![*id; 8],
                        parent_span_id: if *parent == 0 {
                            vec![]
                        } else {
                            vec![*parent; 8]
                        },
                        name: (*name).into(),
                        start_time_unix_nano: t0 + off * 1000,
                        end_time_unix_nano: t0 + (off + dur) * 1000,
                        attributes: vec![kv("user", "alice")],
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

pub struct Harness {
    pub dir: tempfile::TempDir,
    pub running: Running,
    pub client: reqwest_like::Client,
}

/// A tiny HTTP/1.1 client over hyper (the workspace has no reqwest).
pub mod reqwest_like {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper_util::client::legacy::connect::HttpConnector;
    use hyper_util::client::legacy::Client as HyperClient;
    use hyper_util::rt::TokioExecutor;

    #[derive(Debug)]
    pub struct Client {
        base: String,
        inner: HyperClient<HttpConnector, Full<Bytes>>,
    }

    impl Client {
        pub fn new(base: String) -> Self {
            Self {
                base,
                inner: HyperClient::builder(TokioExecutor::new()).build_http(),
            }
        }

        pub async fn send(
            &self,
            method: &str,
            path: &str,
            headers: &[(&str, &str)],
            body: Vec<u8>,
        ) -> (u16, hyper::HeaderMap, Vec<u8>) {
            let mut req = hyper::Request::builder()
                .method(method)
                .uri(format!("{}{}", self.base, path));
            for (k, v) in headers {
                req = req.header(*k, *v);
            }
            let resp = self
                .inner
                .request(req.body(Full::new(Bytes::from(body))).unwrap())
                .await
                .unwrap();
            let status = resp.status().as_u16();
            let headers = resp.headers().clone();
            let body = resp
                .into_body()
                .collect()
                .await
                .unwrap()
                .to_bytes()
                .to_vec();
            (status, headers, body)
        }

        pub async fn get_json(&self, path: &str) -> (u16, serde_json::Value) {
            let (status, _, body) = self.send("GET", path, &[], vec![]).await;
            (
                status,
                serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
            )
        }
    }
}

pub async fn start(settings: Settings) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let store = SpanStore::open(dir.path().to_str().unwrap()).unwrap();
    let running = server::start(
        Settings {
            listen: "127.0.0.1:0".parse().unwrap(),
            flush_interval: Duration::from_millis(100),
            ..settings
        },
        store,
    )
    .await
    .unwrap();
    let client = reqwest_like::Client::new(format!("http://{}", running.addr));
    Harness {
        dir,
        running,
        client,
    }
}

pub use testkit::eventually_some;
