//! The REST API, in the shape of Styx's `/api/v3`. Every error is JSON `{"reason": "…"}`.
//!
//! | method and path | what |
//! |---|---|
//! | `GET /api/v3/workflows[/{component}]` | list workflows |
//! | `POST /api/v3/workflows/{component}` | create or replace one from YAML (or JSON) |
//! | `GET`, `DELETE /api/v3/workflows/{component}/{workflow}` | get, delete |
//! | `GET`, `PATCH /api/v3/workflows/{c}/{w}/state` | enabled, next natural trigger; `{"enabled":bool}` |
//! | `GET /api/v3/status/events/{c}/{w}/{parameter}` | an instance's events with the state after each |
//! | `GET /api/v3/status/activeStates[?component=c]` | active runs |
//! | `GET`, `POST /api/v3/backfills`; `GET`, `DELETE /api/v3/backfills/{id}` | backfills (DELETE halts) |
//! | `POST /api/v3/scheduler/{trigger,retry,halt}` | `{"component","workflow","parameter"}` |
//! | `GET`, `POST /api/v3/resources` | resources and their limits, `{"id","concurrency"}` |
//! | `GET /metrics` | Prometheus |

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::net::TcpListener;

use crate::engine::EngineError;
use crate::service::Handle;
use crate::store::StoredWorkflow;
use crate::workflow::{InstanceKey, Workflow, WorkflowId};

type Resp = Response<Full<Bytes>>;

/// Workflow files are a few hundred bytes; 1 MiB leaves room and bounds a bad client.
const BODY_LIMIT: usize = 1 << 20;

/// An answer with a status and a `reason`.
#[derive(Debug)]
struct ApiError(StatusCode, String);

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let status = match &e {
            EngineError::UnknownWorkflow(_)
            | EngineError::UnknownBackfill(_)
            | EngineError::NotActive(_) => StatusCode::NOT_FOUND,
            EngineError::AlreadyActive(_) | EngineError::Illegal { .. } => StatusCode::CONFLICT,
            EngineError::Invalid(_) => StatusCode::BAD_REQUEST,
            EngineError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.to_string())
    }
}

fn bad(reason: impl ToString) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, reason.to_string())
}

fn not_found(reason: impl ToString) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, reason.to_string())
}

fn json_response(status: StatusCode, body: &Value) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// Serves the API until the task is aborted.
pub async fn serve(listener: TcpListener, handle: Handle, metrics: PrometheusHandle) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                // Out of file descriptors, most likely: give the others time to close.
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let (handle, metrics) = (handle.clone(), metrics.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let (handle, metrics) = (handle.clone(), metrics.clone());
                async move { Ok::<_, Infallible>(route(req, &handle, &metrics).await) }
            });
            // A stalled client cannot hold a connection for ever.
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(30))
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
}

/// A parsed request path. Routing and any future authorisation work on this, never on the
/// raw string.
#[derive(Debug, PartialEq)]
enum Route {
    Workflows(Option<String>),
    Workflow(WorkflowId),
    WorkflowState(WorkflowId),
    Events(InstanceKey),
    ActiveStates,
    Backfills,
    Backfill(String),
    Scheduler(String),
    Resources,
    Metrics,
    Health,
}

fn parse_route(path: &str) -> Option<Route> {
    let segs: Vec<&str> = path.split('/').skip(1).collect();
    if segs.iter().any(|s| s.is_empty() || *s == "." || *s == "..") {
        return None;
    }
    let wf = |c: &str, w: &str| WorkflowId {
        component: c.to_string(),
        id: w.to_string(),
    };
    Some(match segs.as_slice() {
        ["metrics"] => Route::Metrics,
        ["health"] => Route::Health,
        ["api", "v3", rest @ ..] => match rest {
            ["workflows"] => Route::Workflows(None),
            ["workflows", c] => Route::Workflows(Some(c.to_string())),
            ["workflows", c, w] => Route::Workflow(wf(c, w)),
            ["workflows", c, w, "state"] => Route::WorkflowState(wf(c, w)),
            ["status", "events", c, w, p] => Route::Events(InstanceKey {
                workflow: wf(c, w),
                parameter: p.to_string(),
            }),
            ["status", "activeStates"] => Route::ActiveStates,
            ["backfills"] => Route::Backfills,
            ["backfills", id] => Route::Backfill(id.to_string()),
            ["scheduler", op @ ("trigger" | "retry" | "halt")] => Route::Scheduler(op.to_string()),
            ["resources"] => Route::Resources,
            _ => return None,
        },
        _ => return None,
    })
}

async fn route(req: Request<Incoming>, handle: &Handle, metrics: &PrometheusHandle) -> Resp {
    let Some(route) = parse_route(req.uri().path()) else {
        return json_response(
            StatusCode::NOT_FOUND,
            &json!({"reason": format!("no such path: {}", req.uri().path())}),
        );
    };
    if route == Route::Metrics {
        let mut r = Response::new(Full::new(Bytes::from(metrics.render())));
        r.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        );
        return r;
    }
    match handle_route(route, req, handle).await {
        Ok((status, body)) => json_response(status, &body),
        Err(ApiError(status, reason)) => json_response(status, &json!({ "reason": reason })),
    }
}

fn workflow_json(sw: &StoredWorkflow) -> Value {
    json!({
        "component_id": sw.workflow.component,
        "workflow_id": sw.workflow.id,
        "configuration": sw.workflow,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InstanceBody {
    component: String,
    workflow: String,
    parameter: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BackfillBody {
    component: String,
    workflow: String,
    start: String,
    end: String,
    #[serde(default = "one")]
    concurrency: u32,
    #[serde(default)]
    reverse: bool,
}

fn one() -> u32 {
    1
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResourceBody {
    id: String,
    concurrency: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StateBody {
    enabled: bool,
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| bad(format!("bad request body: {e}")))
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes, ApiError> {
    match Limited::new(req.into_body(), BODY_LIMIT).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("body exceeds {BODY_LIMIT} bytes"),
        )),
        Err(e) => Err(bad(e)),
    }
}

fn state_json(handle: &Handle, id: &WorkflowId) -> Result<Value, ApiError> {
    let engine = handle.lock();
    let sw = engine
        .workflow(id)
        .ok_or_else(|| not_found(format!("unknown workflow {id}")))?;
    let next = engine.next_natural(id);
    Ok(json!({
        "enabled": sw.workflow.enabled,
        "next_natural_trigger": next.as_ref().map(|(t, _)| t.to_rfc3339()),
        "next_natural_trigger_parameter": next.map(|(_, p)| p),
    }))
}

async fn handle_route(
    route: Route,
    req: Request<Incoming>,
    handle: &Handle,
) -> Result<(StatusCode, Value), ApiError> {
    let method = req.method().clone();
    let query = req.uri().query().unwrap_or("").to_string();
    let ok = |v: Value| Ok((StatusCode::OK, v));
    match (route, method) {
        (Route::Health, Method::GET) => ok(json!({"status": "ok"})),
        (Route::Workflows(component), Method::GET) => {
            let engine = handle.lock();
            let list: Vec<Value> = engine
                .workflows()
                .filter(|w| {
                    component
                        .as_ref()
                        .is_none_or(|c| &w.workflow.component == c)
                })
                .map(workflow_json)
                .collect();
            ok(Value::Array(list))
        }
        (Route::Workflows(Some(component)), Method::POST) => {
            let body = read_body(req).await?;
            let text = std::str::from_utf8(&body).map_err(|_| bad("body is not UTF-8"))?;
            let wf = Workflow::from_yaml("<request>", text).map_err(bad)?;
            if wf.component != component {
                return Err(bad(format!(
                    "component {:?} in the body does not match {component:?} in the path",
                    wf.component
                )));
            }
            let id = wf.key();
            handle.with(|e, now| e.put_workflow(wf, now))?;
            let engine = handle.lock();
            ok(workflow_json(engine.workflow(&id).expect("just stored")))
        }
        (Route::Workflow(id), Method::GET) => {
            let engine = handle.lock();
            let sw = engine
                .workflow(&id)
                .ok_or_else(|| not_found(format!("unknown workflow {id}")))?;
            ok(workflow_json(sw))
        }
        (Route::Workflow(id), Method::DELETE) => {
            handle.with(|e, now| e.delete_workflow(&id, now))?;
            ok(json!({ "deleted": id.to_string() }))
        }
        (Route::WorkflowState(id), Method::GET) => ok(state_json(handle, &id)?),
        (Route::WorkflowState(id), Method::PATCH) => {
            let body: StateBody = parse_json(&read_body(req).await?)?;
            handle.with(|e, _| e.set_enabled(&id, body.enabled))?;
            ok(state_json(handle, &id)?)
        }
        (Route::Events(key), Method::GET) => {
            let engine = handle.lock();
            let events = engine.events(&key)?;
            if events.is_empty() && engine.workflow(&key.workflow).is_none() {
                return Err(not_found(format!("unknown workflow {}", key.workflow)));
            }
            let instance = key.to_string();
            let list: Vec<Value> = events
                .into_iter()
                .map(|e| {
                    let mut event = serde_json::to_value(&e.event).expect("events serialise");
                    event["workflow_instance"] = json!(instance);
                    json!({"timestamp": e.timestamp.to_rfc3339_opts(chrono::SecondsFormat::Millis, true), "event": event, "state": e.state})
                })
                .collect();
            ok(json!({ "events": list }))
        }
        (Route::ActiveStates, Method::GET) => {
            let component = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("component="));
            let runs = handle.lock().active_runs(component);
            ok(json!({ "active_states": runs }))
        }
        (Route::Backfills, Method::GET) => ok(json!({ "backfills": handle.lock().backfills() })),
        (Route::Backfills, Method::POST) => {
            let b: BackfillBody = parse_json(&read_body(req).await?)?;
            let id = WorkflowId {
                component: b.component,
                id: b.workflow,
            };
            let created = handle.with(|e, now| {
                e.create_backfill(&id, &b.start, &b.end, b.concurrency, b.reverse, now)
            })?;
            let status = handle.lock().backfill(&created.id).expect("just created");
            ok(serde_json::to_value(status).expect("serialises"))
        }
        (Route::Backfill(id), Method::GET) => {
            let status = handle
                .lock()
                .backfill(&id)
                .ok_or_else(|| not_found(format!("unknown backfill {id}")))?;
            ok(serde_json::to_value(status).expect("serialises"))
        }
        (Route::Backfill(id), Method::DELETE) => {
            let status = handle.with(|e, now| e.halt_backfill(&id, now))?;
            ok(serde_json::to_value(status).expect("serialises"))
        }
        (Route::Scheduler(op), Method::POST) => {
            let b: InstanceBody = parse_json(&read_body(req).await?)?;
            let id = WorkflowId {
                component: b.component,
                id: b.workflow,
            };
            let key = InstanceKey {
                workflow: id.clone(),
                parameter: b.parameter.clone(),
            };
            let run = handle.with(|e, now| match op.as_str() {
                "trigger" => e.trigger(&id, &b.parameter, now),
                "retry" => e.retry(&key, now),
                _ => e.halt(&key, now),
            })?;
            ok(json!({"workflow_instance": key.to_string(), "state": run.state, "run": run}))
        }
        (Route::Resources, Method::GET) => {
            let list: Vec<Value> = handle
                .lock()
                .resources()
                .into_iter()
                .map(|(id, concurrency, usage)| json!({"id": id, "concurrency": concurrency, "usage": usage}))
                .collect();
            ok(json!({ "resources": list }))
        }
        (Route::Resources, Method::POST) => {
            let r: ResourceBody = parse_json(&read_body(req).await?)?;
            handle.with(|e, _| e.put_resource(&r.id, r.concurrency))?;
            ok(json!({"id": r.id, "concurrency": r.concurrency}))
        }
        (_, m) => Err(ApiError(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("method {m} not allowed here"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_parse_on_segments() {
        assert_eq!(
            parse_route("/api/v3/workflows"),
            Some(Route::Workflows(None))
        );
        assert_eq!(
            parse_route("/api/v3/status/events/push/report/2026-11-29T14"),
            Some(Route::Events(InstanceKey {
                workflow: WorkflowId {
                    component: "push".into(),
                    id: "report".into()
                },
                parameter: "2026-11-29T14".into()
            }))
        );
        for bad in [
            "//api/v3/workflows",
            "/api/v3/workflows/",
            "/api/v3/workflows/../x",
            "/api/v3/scheduler/run",
            "/api/v2/workflows",
        ] {
            assert_eq!(parse_route(bad), None, "{bad}");
        }
    }
}
