//! Jaeger's HTTP query API (what Jaeger UI and Grafana's Jaeger data source call), answered
//! from the span store, and the critical path of a trace for the waterfall page.
//!
//! Endpoints (all `GET`, JSON `{"data": …, "total", "limit", "offset", "errors"}`):
//! `/api/services`, `/api/services/{service}/operations`, `/api/operations?service=`,
//! `/api/traces/{traceID}`, `/api/traces?service=&operation=&tags=&start=&end=&minDuration=
//! &maxDuration=&limit=&lookback=`. Times in the API are microseconds, as Jaeger's are.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::Duration;

use serde_json::{json, Value};

use crate::model::SpanRow;
use crate::store::{SpanStore, StoreError};

/// Most traces one search returns, whatever `limit` asks.
pub const MAX_SEARCH_LIMIT: usize = 1_500;
/// Default search window when the request gives no `start` (Jaeger UI's default lookback).
pub const DEFAULT_LOOKBACK: Duration = Duration::from_secs(3600);
/// How far back the service and operation lists look.
pub const SERVICES_LOOKBACK: Duration = Duration::from_secs(7 * 24 * 3600);

/// Jaeger's response envelope.
pub fn envelope(data: Value, total: usize) -> Value {
    json!({"data": data, "total": total, "limit": 0, "offset": 0, "errors": null})
}

/// Jaeger's error envelope.
pub fn error(code: u16, msg: &str) -> Value {
    json!({"data": null, "total": 0, "limit": 0, "offset": 0, "errors": [{"code": code, "msg": msg}]})
}

/// Service names with spans in the last [`SERVICES_LOOKBACK`].
pub async fn services(store: &SpanStore, now_ns: i64) -> Result<Vec<String>, StoreError> {
    let from = now_ns.saturating_sub(SERVICES_LOOKBACK.as_nanos() as i64);
    let mut names = BTreeSet::new();
    for (_, index) in store.files(from, i64::MAX).await? {
        names.extend(index.services.keys().cloned());
    }
    Ok(names.into_iter().collect())
}

/// Operation names of one service.
pub async fn operations(
    store: &SpanStore,
    service: &str,
    now_ns: i64,
) -> Result<Vec<String>, StoreError> {
    let from = now_ns.saturating_sub(SERVICES_LOOKBACK.as_nanos() as i64);
    let mut names = BTreeSet::new();
    for (_, index) in store.files(from, i64::MAX).await? {
        if let Some(ops) = index.services.get(service) {
            names.extend(ops.iter().cloned());
        }
    }
    Ok(names.into_iter().collect())
}

/// A trace search, parsed from Jaeger's query parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct Search {
    /// Required.
    pub service: String,
    /// Any operation when `None`.
    pub operation: Option<String>,
    /// Tags a span must carry (attributes, or `error`/`span.kind`-style fields).
    pub tags: BTreeMap<String, String>,
    /// Window start, ns.
    pub start_ns: i64,
    /// Window end, ns.
    pub end_ns: i64,
    /// Shortest span duration, ns.
    pub min_duration_ns: Option<i64>,
    /// Longest span duration, ns.
    pub max_duration_ns: Option<i64>,
    /// Most traces returned.
    pub limit: usize,
}

impl Search {
    /// Parses `/api/traces` query parameters; `now_ns` fills a missing window.
    pub fn parse(params: &HashMap<String, String>, now_ns: i64) -> Result<Self, String> {
        let service = params
            .get("service")
            .filter(|s| !s.is_empty())
            .ok_or("parameter service is required")?
            .clone();
        let operation = params
            .get("operation")
            .filter(|s| !s.is_empty() && *s != "all")
            .cloned();
        let tags = match params.get("tags").filter(|s| !s.is_empty()) {
            None => BTreeMap::new(),
            Some(raw) => {
                let v: BTreeMap<String, Value> = serde_json::from_str(raw)
                    .map_err(|e| format!("tags must be a JSON object: {e}"))?;
                v.into_iter()
                    .map(|(k, v)| (k, v.as_str().map_or_else(|| v.to_string(), str::to_owned)))
                    .collect()
            }
        };
        let micros = |name: &str| -> Result<Option<i64>, String> {
            params
                .get(name)
                .filter(|s| !s.is_empty())
                .map(|s| {
                    s.parse::<i64>()
                        .map(|us| us.saturating_mul(1000))
                        .map_err(|_| format!("{name} must be microseconds"))
                })
                .transpose()
        };
        let duration = |name: &str| -> Result<Option<i64>, String> {
            params
                .get(name)
                .filter(|s| !s.is_empty())
                .map(|s| {
                    humantime::parse_duration(s)
                        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
                        .map_err(|_| format!("{name} must be a duration like 10ms or 1.5s"))
                })
                .transpose()
        };
        let end_ns = micros("end")?.unwrap_or(now_ns);
        let lookback = match params
            .get("lookback")
            .filter(|s| !s.is_empty() && *s != "custom")
        {
            Some(l) => humantime::parse_duration(l)
                .map_err(|_| "lookback must be a duration like 1h".to_owned())?,
            None => DEFAULT_LOOKBACK,
        };
        let start_ns =
            micros("start")?.unwrap_or(end_ns.saturating_sub(lookback.as_nanos() as i64));
        let limit = match params.get("limit").filter(|s| !s.is_empty()) {
            Some(l) => l
                .parse::<usize>()
                .map_err(|_| "limit must be a number".to_owned())?,
            None => 20,
        }
        .clamp(1, MAX_SEARCH_LIMIT);
        Ok(Self {
            service,
            operation,
            tags,
            start_ns,
            end_ns,
            min_duration_ns: duration("minDuration")?,
            max_duration_ns: duration("maxDuration")?,
            limit,
        })
    }

    /// Whether one span matches every condition.
    pub fn matches(&self, span: &SpanRow) -> bool {
        if span.service != self.service
            || span.start_ns < self.start_ns
            || span.start_ns >= self.end_ns
            || self.operation.as_ref().is_some_and(|op| *op != span.name)
            || self.min_duration_ns.is_some_and(|d| span.duration_ns < d)
            || self.max_duration_ns.is_some_and(|d| span.duration_ns > d)
        {
            return false;
        }
        if self.tags.is_empty() {
            return true;
        }
        let attrs: serde_json::Map<String, Value> =
            serde_json::from_str(&span.attributes).unwrap_or_default();
        self.tags.iter().all(|(k, want)| match k.as_str() {
            "error" => (span.status == "error").to_string() == *want,
            "span.kind" => span.kind == *want,
            _ => attrs
                .get(k)
                .is_some_and(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned) == *want),
        })
    }
}

/// The traces that match a search, newest first, each whole.
pub async fn search(store: &SpanStore, q: &Search) -> Result<Vec<Vec<SpanRow>>, StoreError> {
    let mut hits: Vec<(i64, String)> = Vec::new();
    let mut seen = HashSet::new();
    for (path, index) in store.files(q.start_ns, q.end_ns).await?.into_iter().rev() {
        if !index.services.contains_key(&q.service) {
            continue;
        }
        for span in store.read(&path, |s| q.matches(s)).await? {
            if seen.insert(span.trace_id.clone()) {
                hits.push((span.start_ns, span.trace_id));
            }
        }
    }
    hits.sort_by_key(|h| std::cmp::Reverse(h.0));
    hits.truncate(q.limit);
    let mut traces = Vec::with_capacity(hits.len());
    for (_, id) in hits {
        traces.push(store.trace(&id).await?);
    }
    Ok(traces)
}

/// One trace in Jaeger's JSON model.
pub fn trace_json(spans: &[SpanRow]) -> Value {
    let mut processes: BTreeMap<String, String> = BTreeMap::new();
    for s in spans {
        let next = format!("p{}", processes.len() + 1);
        processes.entry(s.service.clone()).or_insert(next);
    }
    let json_spans: Vec<Value> = spans
        .iter()
        .map(|s| {
            let references = if s.parent_span_id.is_empty() {
                json!([])
            } else {
                json!([{"refType": "CHILD_OF", "traceID": s.trace_id, "spanID": s.parent_span_id}])
            };
            let mut tags = tags_of(&s.attributes);
            tags.push(json!({"key": "span.kind", "type": "string", "value": s.kind}));
            if s.status == "error" {
                tags.push(json!({"key": "error", "type": "bool", "value": true}));
            }
            if !s.status_message.is_empty() {
                tags.push(json!({"key": "otel.status_description", "type": "string", "value": s.status_message}));
            }
            let logs: Vec<Value> = serde_json::from_str::<Vec<Value>>(&s.events)
                .unwrap_or_default()
                .into_iter()
                .map(|e| {
                    let mut fields = vec![json!({"key": "event", "type": "string", "value": e["name"]})];
                    if let Some(attrs) = e["attributes"].as_object() {
                        fields.extend(attrs.iter().map(|(k, v)| tag(k, v)));
                    }
                    json!({"timestamp": e["time_ns"].as_i64().unwrap_or(0) / 1000, "fields": fields})
                })
                .collect();
            json!({
                "traceID": s.trace_id,
                "spanID": s.span_id,
                "operationName": s.name,
                "references": references,
                "startTime": s.start_ns / 1000,
                "duration": s.duration_ns / 1000,
                "tags": tags,
                "logs": logs,
                "processID": processes[&s.service],
                "warnings": null,
            })
        })
        .collect();
    let processes: serde_json::Map<String, Value> = processes
        .iter()
        .map(|(service, id)| (id.clone(), json!({"serviceName": service, "tags": []})))
        .collect();
    json!({
        "traceID": spans.first().map(|s| s.trace_id.as_str()).unwrap_or(""),
        "spans": json_spans,
        "processes": processes,
        "warnings": null,
    })
}

fn tags_of(attributes: &str) -> Vec<Value> {
    serde_json::from_str::<serde_json::Map<String, Value>>(attributes)
        .unwrap_or_default()
        .iter()
        .map(|(k, v)| tag(k, v))
        .collect()
}

fn tag(key: &str, v: &Value) -> Value {
    match v {
        Value::Bool(b) => json!({"key": key, "type": "bool", "value": b}),
        Value::Number(n) if n.is_i64() || n.is_u64() => {
            json!({"key": key, "type": "int64", "value": n})
        }
        Value::Number(n) => json!({"key": key, "type": "float64", "value": n}),
        Value::String(s) => json!({"key": key, "type": "string", "value": s}),
        other => json!({"key": key, "type": "string", "value": other.to_string()}),
    }
}

/// The critical path: the spans that bound the trace's end-to-end time. From each root,
/// repeatedly step into the child that finished last (the one the parent waited for). Returns
/// their span IDs.
pub fn critical_path(spans: &[SpanRow]) -> HashSet<String> {
    let ids: HashSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
    let mut children: HashMap<&str, Vec<&SpanRow>> = HashMap::new();
    let mut roots = Vec::new();
    for s in spans {
        if s.parent_span_id.is_empty() || !ids.contains(s.parent_span_id.as_str()) {
            roots.push(s);
        } else {
            children
                .entry(s.parent_span_id.as_str())
                .or_default()
                .push(s);
        }
    }
    let mut path = HashSet::new();
    // The root that ends last bounds the trace.
    let mut current = roots
        .into_iter()
        .max_by_key(|s| (s.end_ns, std::cmp::Reverse(s.start_ns)));
    while let Some(span) = current {
        if !path.insert(span.span_id.clone()) {
            break; // a cycle in bad data: stop
        }
        current = children.get(span.span_id.as_str()).and_then(|c| {
            c.iter()
                .copied()
                .max_by_key(|s| (s.end_ns, std::cmp::Reverse(s.start_ns)))
        });
    }
    path
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::sample;

    fn params(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn search_parameters_parse_like_jaegers() {
        let q = Search::parse(
            &params(&[
                ("service", "push-server"),
                ("operation", "deliver"),
                ("tags", r#"{"user":"alice","error":"true"}"#),
                ("start", "1000"),
                ("end", "2000"),
                ("minDuration", "1ms"),
                ("maxDuration", "1.5s"),
                ("limit", "5000"),
            ]),
            0,
        )
        .unwrap();
        assert_eq!((q.start_ns, q.end_ns), (1_000_000, 2_000_000));
        assert_eq!(
            (q.min_duration_ns, q.max_duration_ns),
            (Some(1_000_000), Some(1_500_000_000))
        );
        assert_eq!(q.limit, MAX_SEARCH_LIMIT);
        assert_eq!(q.tags["error"], "true");
        let q = Search::parse(
            &params(&[("service", "s"), ("operation", "all"), ("lookback", "2h")]),
            10_000_000_000_000,
        )
        .unwrap();
        assert_eq!(q.operation, None);
        assert_eq!(q.start_ns, 10_000_000_000_000 - 7_200_000_000_000);
        assert!(Search::parse(&params(&[]), 0)
            .unwrap_err()
            .contains("service"));
        assert!(
            Search::parse(&params(&[("service", "s"), ("tags", "[")]), 0)
                .unwrap_err()
                .contains("tags")
        );
        assert!(Search::parse(&params(&[("service", "s"), ("minDuration", "fast")]), 0).is_err());
    }

    #[test]
    fn matching_checks_tags_status_and_durations() {
        let mut span = sample(
            &"a".repeat(32),
            &"1".repeat(16),
            "",
            "push-server",
            "deliver",
            100,
            50,
        );
        span.attributes = r#"{"user":"alice","items":3}"#.into();
        span.status = "error".into();
        let q = |pairs: &[(&str, &str)]| {
            let mut p = params(&[("service", "push-server"), ("start", "0"), ("end", "1")]);
            p.extend(params(pairs));
            Search::parse(&p, 0).unwrap()
        };
        assert!(q(&[]).matches(&span));
        assert!(q(&[("tags", r#"{"user":"alice","items":3,"error":"true"}"#)]).matches(&span));
        assert!(!q(&[("tags", r#"{"user":"bob"}"#)]).matches(&span));
        assert!(!q(&[("operation", "other")]).matches(&span));
        assert!(
            !q(&[("minDuration", "1us")]).matches(&span),
            "50 ns is shorter than 1 µs"
        );
    }

    #[test]
    fn traces_render_in_jaegers_model() {
        let t = "a".repeat(32);
        let root = sample(
            &t,
            &"1".repeat(16),
            "",
            "push-lib",
            "send",
            1_000_000,
            9_000_000,
        );
        let mut child = sample(
            &t,
            &"2".repeat(16),
            &"1".repeat(16),
            "push-server",
            "deliver",
            2_000_000,
            1_000_000,
        );
        child.attributes = r#"{"user":"alice"}"#.into();
        let json = trace_json(&[root, child]);
        assert_eq!(json["traceID"], t);
        let spans = json["spans"].as_array().unwrap();
        assert_eq!(spans[1]["references"][0]["refType"], "CHILD_OF");
        assert_eq!(spans[1]["references"][0]["spanID"], "1".repeat(16));
        assert_eq!(spans[1]["startTime"], 2000);
        assert_eq!(spans[1]["duration"], 1000);
        assert_eq!(
            spans[1]["tags"][0],
            json!({"key": "user", "type": "string", "value": "alice"})
        );
        let p = spans[1]["processID"].as_str().unwrap();
        assert_eq!(json["processes"][p]["serviceName"], "push-server");
    }

    #[test]
    fn the_critical_path_follows_the_child_that_ends_last() {
        let t = "a".repeat(32);
        let s = |id: u8, parent: u8, start: i64, dur: i64| {
            let parent = if parent == 0 {
                String::new()
            } else {
                format!("{parent:016x}")
            };
            sample(&t, &format!("{id:016x}"), &parent, "s", "op", start, dur)
        };
        // root 1 [0,100]: children 2 [0,30] and 3 [10,90]; 3 has children 4 [10,20] and 5 [20,85].
        let spans = [
            s(1, 0, 0, 100),
            s(2, 1, 0, 30),
            s(3, 1, 10, 80),
            s(4, 3, 10, 10),
            s(5, 3, 20, 65),
        ];
        let path = critical_path(&spans);
        let want: HashSet<String> = [1u8, 3, 5].iter().map(|i| format!("{i:016x}")).collect();
        assert_eq!(path, want);
        assert!(critical_path(&[]).is_empty());
    }
}
