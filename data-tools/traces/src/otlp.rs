//! OTLP trace requests (protobuf or JSON, the `opentelemetry-proto` types) → [`SpanRow`]s.
//!
//! Pure: bytes in, rows and a count of rejected spans out. Any OpenTelemetry SDK's OTLP/HTTP
//! exporter sends what this reads.

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value::Value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::trace::v1::{span::SpanKind, status::StatusCode};
use prost::Message;

use crate::model::SpanRow;
use crate::propagation::hex;

/// How the request body is encoded (from its `Content-Type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// `application/x-protobuf`
    Protobuf,
    /// `application/json`
    Json,
}

impl Encoding {
    /// The encoding a `Content-Type` names, if we read it.
    pub fn from_content_type(ct: &str) -> Option<Self> {
        let mime = ct
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        match mime.as_str() {
            "application/x-protobuf" | "application/protobuf" => Some(Self::Protobuf),
            "application/json" => Some(Self::Json),
            _ => None,
        }
    }
}

/// A request body that is not an OTLP trace export.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Bad protobuf.
    #[error("not an OTLP ExportTraceServiceRequest (protobuf): {0}")]
    Protobuf(#[from] prost::DecodeError),
    /// Bad JSON.
    #[error("not an OTLP ExportTraceServiceRequest (JSON): {0}")]
    Json(#[from] serde_json::Error),
}

/// The spans of one request.
#[derive(Debug, Default)]
pub struct Decoded {
    /// Spans that can be stored.
    pub rows: Vec<SpanRow>,
    /// Spans refused (bad IDs), with the first reason.
    pub rejected: u64,
    /// Why the first refused span was refused.
    pub first_error: Option<String>,
}

/// Decodes and flattens a request.
pub fn decode(body: &[u8], encoding: Encoding) -> Result<Decoded, DecodeError> {
    let request = match encoding {
        Encoding::Protobuf => ExportTraceServiceRequest::decode(body)?,
        Encoding::Json => serde_json::from_slice(body)?,
    };
    Ok(flatten(request))
}

/// Flattens a decoded request.
pub fn flatten(request: ExportTraceServiceRequest) -> Decoded {
    let mut out = Decoded::default();
    for rs in request.resource_spans {
        let resource_attrs = rs.resource.map(|r| r.attributes).unwrap_or_default();
        let service = resource_attrs
            .iter()
            .find(|kv| kv.key == "service.name")
            .and_then(|kv| kv.value.as_ref())
            .and_then(|v| match &v.value {
                Some(Value::StringValue(s)) => Some(s.clone()),
                _ => None,
            })
            .unwrap_or_else(|| "unknown_service".to_owned());
        let resource = attributes_json(&resource_attrs);
        for ss in rs.scope_spans {
            for span in ss.spans {
                if span.trace_id.len() != 16 || span.trace_id.iter().all(|b| *b == 0) {
                    out.reject(format!(
                        "span {:?}: trace_id must be 16 non-zero bytes",
                        span.name
                    ));
                    continue;
                }
                if span.span_id.len() != 8 || span.span_id.iter().all(|b| *b == 0) {
                    out.reject(format!(
                        "span {:?}: span_id must be 8 non-zero bytes",
                        span.name
                    ));
                    continue;
                }
                if !(span.parent_span_id.is_empty() || span.parent_span_id.len() == 8) {
                    out.reject(format!(
                        "span {:?}: parent_span_id must be 8 bytes",
                        span.name
                    ));
                    continue;
                }
                let start = clamp_ns(span.start_time_unix_nano);
                let end = clamp_ns(span.end_time_unix_nano).max(start);
                let kind = match SpanKind::try_from(span.kind).unwrap_or(SpanKind::Unspecified) {
                    SpanKind::Server => "server",
                    SpanKind::Client => "client",
                    SpanKind::Producer => "producer",
                    SpanKind::Consumer => "consumer",
                    SpanKind::Internal => "internal",
                    SpanKind::Unspecified => "unspecified",
                };
                let (status, status_message) = match span.status {
                    Some(s) => {
                        let code = match StatusCode::try_from(s.code).unwrap_or(StatusCode::Unset) {
                            StatusCode::Ok => "ok",
                            StatusCode::Error => "error",
                            StatusCode::Unset => "unset",
                        };
                        (code, s.message)
                    }
                    None => ("unset", String::new()),
                };
                let events: Vec<serde_json::Value> = span
                    .events
                    .iter()
                    .map(|e| {
                        serde_json::json!({
                            "time_ns": clamp_ns(e.time_unix_nano),
                            "name": e.name,
                            "attributes": attributes_value(&e.attributes),
                        })
                    })
                    .collect();
                out.rows.push(SpanRow {
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    service: service.clone(),
                    name: span.name,
                    kind: kind.to_owned(),
                    start_ns: start,
                    end_ns: end,
                    duration_ns: end - start,
                    status: status.to_owned(),
                    status_message,
                    attributes: attributes_json(&span.attributes),
                    resource: resource.clone(),
                    events: serde_json::Value::Array(events).to_string(),
                });
            }
        }
    }
    out
}

impl Decoded {
    fn reject(&mut self, why: String) {
        self.rejected += 1;
        self.first_error.get_or_insert(why);
    }
}

/// Nanoseconds as i64 (Parquet and SQL have no u64 timestamps); past year 2262 is clamped.
fn clamp_ns(ns: u64) -> i64 {
    i64::try_from(ns).unwrap_or(i64::MAX)
}

fn attributes_json(attrs: &[KeyValue]) -> String {
    attributes_value(attrs).to_string()
}

fn attributes_value(attrs: &[KeyValue]) -> serde_json::Value {
    let map = attrs
        .iter()
        .map(|kv| (kv.key.clone(), any_value(kv.value.as_ref())))
        .collect::<serde_json::Map<_, _>>();
    serde_json::Value::Object(map)
}

fn any_value(v: Option<&AnyValue>) -> serde_json::Value {
    use serde_json::Value as J;
    match v.and_then(|v| v.value.as_ref()) {
        None => J::Null,
        Some(Value::StringValue(s)) => J::String(s.clone()),
        Some(Value::BoolValue(b)) => J::Bool(*b),
        Some(Value::IntValue(i)) => J::from(*i),
        Some(Value::DoubleValue(d)) => serde_json::Number::from_f64(*d).map_or(J::Null, J::Number),
        Some(Value::BytesValue(b)) => J::String(hex(b)),
        Some(Value::ArrayValue(a)) => {
            J::Array(a.values.iter().map(|v| any_value(Some(v))).collect())
        }
        Some(Value::KvlistValue(kv)) => attributes_value(&kv.values),
        #[allow(unreachable_patterns)] // newer proto versions add kinds (string table refs)
        Some(_) => J::Null,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status};

    pub(crate) fn kv(key: &str, value: &str) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: Some(AnyValue {
                value: Some(Value::StringValue(value.into())),
            }),
            ..Default::default()
        }
    }

    /// A request with one service's spans: (span id byte, parent id byte or 0, name, start, end).
    pub(crate) fn request(
        service: &str,
        trace: u8,
        spans: &[(u8, u8, &str, u64, u64)],
    ) -> ExportTraceServiceRequest {
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![kv("service.name", service)],
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    spans: spans
                        .iter()
                        .map(|(id, parent, name, start, end)| Span {
                            trace_id: vec![trace; 16],
                            span_id: vec![*id; 8],
                            parent_span_id: if *parent == 0 {
                                vec![]
                            } else {
                                vec![*parent; 8]
                            },
                            name: (*name).into(),
                            kind: SpanKind::Server as i32,
                            start_time_unix_nano: *start,
                            end_time_unix_nano: *end,
                            attributes: vec![kv("user", "alice")],
                            status: Some(Status {
                                code: StatusCode::Ok as i32,
                                message: String::new(),
                            }),
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }

    #[test]
    fn protobuf_requests_flatten_to_rows() {
        let req = request(
            "push-server",
            0xab,
            &[
                (1, 0, "POST /v1/push", 1_000, 5_000),
                (2, 1, "append", 1_500, 2_000),
            ],
        );
        let decoded = decode(&req.encode_to_vec(), Encoding::Protobuf).unwrap();
        assert_eq!(decoded.rejected, 0);
        let [root, child] = &decoded.rows[..] else {
            panic!("two rows")
        };
        assert_eq!(root.trace_id, "ab".repeat(16));
        assert_eq!(root.parent_span_id, "");
        assert_eq!(child.parent_span_id, "01".repeat(8));
        assert_eq!(
            (
                root.service.as_str(),
                root.kind.as_str(),
                root.status.as_str()
            ),
            ("push-server", "server", "ok")
        );
        assert_eq!(root.duration_ns, 4_000);
        assert_eq!(root.attributes, r#"{"user":"alice"}"#);
        assert_eq!(root.resource, r#"{"service.name":"push-server"}"#);
    }

    #[test]
    fn json_requests_use_otlps_json_mapping() {
        // The OTLP/JSON mapping: hex IDs, camelCase fields, integers as strings allowed.
        let body = r#"{"resourceSpans":[{"resource":{"attributes":[{"key":"service.name","value":{"stringValue":"msg-processor"}}]},
          "scopeSpans":[{"spans":[{"traceId":"5b8efff798038103d269b633813fc60c","spanId":"eee19b7ec3c1b174",
          "name":"consume","kind":5,"startTimeUnixNano":"1544712660000000000","endTimeUnixNano":"1544712661000000000",
          "attributes":[{"key":"partition","value":{"intValue":"3"}}]}]}]}]}"#;
        let decoded = decode(body.as_bytes(), Encoding::Json).unwrap();
        let row = &decoded.rows[0];
        assert_eq!(row.trace_id, "5b8efff798038103d269b633813fc60c");
        assert_eq!(row.kind, "consumer");
        assert_eq!(row.duration_ns, 1_000_000_000);
        assert_eq!(row.attributes, r#"{"partition":3}"#);
    }

    #[test]
    fn bad_ids_are_counted_not_stored_and_bad_bodies_are_errors() {
        let mut req = request("s", 1, &[(1, 0, "ok", 1, 2), (2, 0, "bad", 1, 2)]);
        req.resource_spans[0].scope_spans[0].spans[1].span_id = vec![0; 8];
        let decoded = flatten(req);
        assert_eq!((decoded.rows.len(), decoded.rejected), (1, 1));
        assert!(decoded.first_error.unwrap().contains("\"bad\""));
        assert!(decode(b"\xff\xff\xff", Encoding::Protobuf).is_err());
        assert!(decode(b"[1,2]", Encoding::Json).is_err());
        assert_eq!(
            Encoding::from_content_type("application/json; charset=utf-8"),
            Some(Encoding::Json)
        );
        assert_eq!(Encoding::from_content_type("text/plain"), None);
    }
}
