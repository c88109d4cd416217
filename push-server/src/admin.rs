//! The admin port (hyper): push API, metrics, health and inspection.
//!
//! | route | what |
//! |---|---|
//! | `POST /v1/push/{user}` | body = payload; answers `{"id":…,"delivered":…}`; `?wait_receipt=5s` waits for the receipt |
//! | `POST /v1/push` | JSON array of `{"user":…,"data":…}` |
//! | `GET /v1/history/{user}` | that user's kept messages (`?since=ID`) |
//! | `GET /v1/users/{user}` | that user's connections on this node |
//! | `POST /internal/v1/deliver` | the message processor's batch, an outcome per item |
//! | `GET /metrics` | Prometheus text format |
//! | `GET /healthz` | 200 while the process serves |
//! | `GET /readyz` | 200, or 503 when at capacity or draining |
//! | `GET /demo` | with `--demo` only: the demo page (`demo`) |
//!
//! Every request target is parsed once into an [`AdminRoute`] (a non-canonical path such as
//! `//v1/push/x` is refused with 400), and who may call it is a property of that route: the
//! probes and `/metrics` are open for kubelets and scrapers; `/v1/*` needs `--admin-token`
//! when one is set; `/internal/v1/deliver` needs `--internal-secret` when one is set (else the
//! admin token). Only a caller with the internal secret may set a message's `id`; other
//! callers' ids must name a message the history keeps with the same content.
//!
//! Before routing: the `Host` header must be an IP literal, `localhost`, the advertised host
//! or an `--admin-allowed-hosts` name (a DNS-rebinding page sends its own name), and requests
//! from a browser page (`Origin`, or `Sec-Fetch-Site` other than `none`) are refused on every
//! route that needs a secret. The port holds at most `--admin-max-connections`, and times out
//! slow heads and bodies. See docs/security.md.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use push_proto::api::ItemError;
use serde_json::json;
use tokio::net::TcpListener;

use crate::admin_route::{Access, AdminRoute, RouteError};
use crate::hub::{PushOutcome, PushRequest};
use crate::metrics as m;
use crate::protocol::message::Payload;
use crate::push::Pushed;
use crate::state::Shared;

/// Most messages in one batch request.
pub const MAX_BATCH: usize = 10_000;

type Resp = Response<Full<Bytes>>;

/// Answer to a connection over `--admin-max-connections`, written before closing it.
const TOO_MANY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\nConnection: close\r\nContent-Length: 73\r\n\r\n{\"error\":\"too_many_connections\",\"message\":\"admin port connection limit\"}\n";

/// Serves the admin port until the task is aborted.
pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let sec = &shared.config.admin_security;
    let slots = Arc::new(tokio::sync::Semaphore::new(sec.admin_max_connections));
    let header_timeout = sec.admin_header_timeout;
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics::counter!(m::ADMIN_REFUSED, "reason" => "too_many_connections").increment(1);
            // Answered on a task of its own, bounded in time, so a full port still accepts
            // (and refuses) quickly and a refused peer that does not read costs nothing.
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
                let mut stream = stream;
                let answer = async {
                    stream.write_all(TOO_MANY).await?;
                    stream.shutdown().await?;
                    // Read (a little of) what the peer sent before closing: closing with
                    // unread input sends a reset, which can discard the answer at the peer.
                    let mut sink = [0u8; 4096];
                    let mut left = 64 * 1024;
                    while left > 0 {
                        match stream.read(&mut sink).await? {
                            0 => break,
                            n => left -= n.min(left),
                        }
                    }
                    Ok::<_, std::io::Error>(())
                };
                let _ = tokio::time::timeout(std::time::Duration::from_secs(1), answer).await;
            });
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(route(req, &shared).await) }
            });
            // A header timeout keeps a stalled or slowloris admin client from holding a
            // connection for ever (bodies have theirs in read_body); keep-alive serves the
            // message processor's steady stream.
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout)
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "admin connection ended with an error");
            }
        });
    }
}

fn json_response(status: StatusCode, body: serde_json::Value) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn error(status: StatusCode, code: &str, message: impl std::fmt::Display) -> Resp {
    json_response(
        status,
        json!({ "error": code, "message": message.to_string() }),
    )
}

/// A refusal on the admin API: small to return, made into a response at the edge.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl std::fmt::Display) -> Self {
        Self {
            status,
            code,
            message: message.to_string(),
        }
    }

    fn into_response(self) -> Resp {
        let mut r = error(self.status, self.code, self.message);
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert("WWW-Authenticate", HeaderValue::from_static("Bearer"));
        }
        r
    }
}

/// A counted refusal (`push_admin_refused_total{reason}`).
fn refuse(reason: &'static str, status: StatusCode, message: impl std::fmt::Display) -> ApiError {
    metrics::counter!(m::ADMIN_REFUSED, "reason" => reason).increment(1);
    ApiError::new(status, reason, message)
}

async fn route(req: Request<Incoming>, shared: &Shared) -> Resp {
    if let Err(e) = check_host(&req, shared) {
        return e.into_response();
    }
    let route = match AdminRoute::parse(req.uri().path()) {
        Ok(r) => r,
        Err(e @ RouteError::NotCanonical(_)) => {
            return refuse("not_canonical", StatusCode::BAD_REQUEST, e).into_response()
        }
        Err(e @ RouteError::BadUser) => return error(StatusCode::BAD_REQUEST, "bad_user", e),
        Err(RouteError::NotFound) => {
            return error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no admin route `{}`", req.uri().path()),
            )
        }
    };
    let trusted_ids = match authorize(&req, route.access(), shared) {
        Ok(t) => t,
        Err(e) => return e.into_response(),
    };
    let method = req.method().clone();
    match (method, route) {
        (Method::GET, AdminRoute::Healthz) => {
            json_response(StatusCode::OK, json!({"status": "ok"}))
        }
        (Method::GET, AdminRoute::Readyz) => readyz(shared),
        (Method::GET, AdminRoute::Metrics) => {
            let mut r = Response::new(Full::new(Bytes::from(shared.prometheus.render())));
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            r
        }
        (Method::POST, AdminRoute::PushBatch) => push_batch(req, shared).await,
        (Method::POST, AdminRoute::Deliver) => deliver(req, shared, trusted_ids).await,
        (Method::POST, AdminRoute::PushOne(user)) => push_one(req, &user, shared).await,
        (Method::GET, AdminRoute::Users(user)) => user_connections(&user, shared),
        (Method::GET, AdminRoute::History(user)) => history(&req, &user, shared).await,
        (Method::GET, AdminRoute::Demo(asset)) if shared.config.demo => {
            crate::demo::serve(&[asset.as_str()], shared.config.listen.port())
        }
        (_, AdminRoute::Demo(_)) => error(
            StatusCode::NOT_FOUND,
            "not_found",
            "the demo page is off (start the node with --demo)",
        ),
        _ => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "see docs/protocol.md for the admin routes",
        ),
    }
}

/// Checks the caller's secret for a route of `access`. `Ok(true)`: the caller holds the
/// internal secret, so the message IDs it sends are taken as they are.
fn authorize(req: &Request<Incoming>, access: Access, shared: &Shared) -> Result<bool, ApiError> {
    if access == Access::Open {
        return Ok(false);
    }
    // The one browser page the admin port serves is its own demo (`--demo`, off by default);
    // it may push from its own origin. A cross-site page still gets 403, and a rebinding
    // page is stopped by the Host check before routing.
    if from_browser(req) && !(shared.config.demo && same_origin(req)) {
        return Err(refuse(
            "browser",
            StatusCode::FORBIDDEN,
            "the admin API does not serve browser pages (Origin or Sec-Fetch-Site present)",
        ));
    }
    let internal = shared.config.admin_security.internal_secret.as_deref();
    let (expected, what, trusted) = match (access, internal) {
        (Access::Internal, Some(secret)) => (Some(secret), "internal secret", true),
        _ => (shared.config.admin_token.as_deref(), "admin token", false),
    };
    match expected {
        Some(expected) if !bearer_matches(req, expected) => Err(refuse(
            "unauthorized",
            StatusCode::UNAUTHORIZED,
            format!("this route requires `Authorization: Bearer <{what}>`"),
        )),
        _ => Ok(trusted),
    }
}

/// Whether a browser sent the request from a page: browsers add `Origin` to every cross-
/// origin POST (a `text/plain` form or `fetch(…, {mode: "no-cors"})` needs no preflight), and
/// `Sec-Fetch-Site` to every request, `none` only when a person typed the address.
fn from_browser(req: &Request<Incoming>) -> bool {
    let h = req.headers();
    h.contains_key(hyper::header::ORIGIN)
        || h.get("sec-fetch-site")
            .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"none"))
}

/// A browser request from a page of this same origin (the demo page).
fn same_origin(req: &Request<Incoming>) -> bool {
    req.headers()
        .get("sec-fetch-site")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"same-origin"))
}

/// DNS rebinding: a page on `evil.example` whose name now resolves to 127.0.0.1 reaches the
/// admin port as its own origin, but its requests carry `Host: evil.example`. Callers that
/// mean this node use an address, `localhost`, the advertised name, or an allowed name.
fn check_host(req: &Request<Incoming>, shared: &Shared) -> Result<(), ApiError> {
    let Some(host) = req
        .headers()
        .get(hyper::header::HOST)
        .and_then(|v| v.to_str().ok())
    else {
        return Err(refuse(
            "bad_host",
            StatusCode::BAD_REQUEST,
            "a Host header is required (HTTP/1.1)",
        ));
    };
    let name = host_name(host);
    let sec = &shared.config.admin_security;
    let advertised = shared.config.advertise_addr.as_deref().map(host_name);
    let ok = name.parse::<std::net::IpAddr>().is_ok()
        || name.eq_ignore_ascii_case("localhost")
        || advertised.is_some_and(|a| a.eq_ignore_ascii_case(name))
        || sec
            .admin_allowed_hosts
            .iter()
            .any(|h| h.eq_ignore_ascii_case(name));
    if ok {
        Ok(())
    } else {
        Err(refuse(
            "bad_host",
            StatusCode::FORBIDDEN,
            format!("Host `{name}` is not this node's (add it to --admin-allowed-hosts)"),
        ))
    }
}

/// The host part of a `Host` header or `host:port` (brackets of an IPv6 literal removed).
fn host_name(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

fn bearer_matches(req: &Request<Incoming>, expected: &str) -> bool {
    let Some(value) = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let Some(token) = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
    else {
        return false;
    };
    constant_time_eq(token.trim().as_bytes(), expected.as_bytes())
}

/// Compares without an early exit, so response time does not reveal a matching prefix.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn readyz(shared: &Shared) -> Resp {
    let open = shared.hub.open_total();
    let capacity = shared.config.max_connections;
    let body = |status: &str| json!({"status": status, "open": open, "capacity": capacity});
    if shared.draining().is_some() {
        json_response(StatusCode::SERVICE_UNAVAILABLE, body("draining"))
    } else if shared.at_capacity() {
        json_response(StatusCode::SERVICE_UNAVAILABLE, body("at_capacity"))
    } else {
        json_response(StatusCode::OK, body("ready"))
    }
}

/// Reads a body of at most `limit` bytes within `--admin-body-timeout`, or answers 413 / 408.
async fn read_body(
    req: Request<Incoming>,
    limit: usize,
    shared: &Shared,
) -> Result<Bytes, ApiError> {
    let timeout = shared.config.admin_security.admin_body_timeout;
    let read = Limited::new(req.into_body(), limit).collect();
    let Ok(read) = tokio::time::timeout(timeout, read).await else {
        metrics::counter!(m::ADMIN_REFUSED, "reason" => "body_timeout").increment(1);
        return Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            format!("the body did not arrive within {timeout:?}"),
        ));
    };
    match read {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("body exceeds {limit} bytes"),
        )),
        Err(e) => Err(ApiError::new(StatusCode::BAD_REQUEST, "bad_body", e)),
    }
}

fn is_json(req: &Request<Incoming>) -> bool {
    req.headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            let mime = v.split(';').next().unwrap_or("").trim();
            mime.eq_ignore_ascii_case("application/json") || mime.ends_with("+json")
        })
}

fn outcome_json(user: &str, o: PushOutcome) -> serde_json::Value {
    json!({
        "user": user,
        "id": o.id,
        "delivered": o.delivered,
        "dropped": o.dropped,
        "stored": o.delivered == 0,
        "duplicate": o.duplicate,
    })
}

/// Most time a push request may wait for its receipt.
const MAX_RECEIPT_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// `?wait_receipt=5s` (or `?wait_receipt_ms=5000`): how long to wait for a receipt.
fn receipt_wait(req: &Request<Incoming>) -> Result<Option<std::time::Duration>, ApiError> {
    let Some(query) = req.uri().query() else {
        return Ok(None);
    };
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let wait = match k {
            "wait_receipt" => crate::config::parse_duration(v).ok(),
            "wait_receipt_ms" => v.parse().ok().map(std::time::Duration::from_millis),
            _ => continue,
        };
        return match wait {
            Some(w) if w <= MAX_RECEIPT_WAIT => Ok(Some(w)),
            _ => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_wait",
                format!(
                    "{k} must be a duration up to {}s (e.g. wait_receipt=5s or wait_receipt_ms=5000)",
                    MAX_RECEIPT_WAIT.as_secs()
                ),
            )),
        };
    }
    Ok(None)
}

/// Waits for each message's receipt (all at once, up to `wait`); `null` for those that did
/// not come in time.
async fn receipts_json(
    shared: &Shared,
    users: impl Iterator<Item = String>,
    pushed: &mut [Pushed],
    wait: std::time::Duration,
) -> Vec<serde_json::Value> {
    let deadline = tokio::time::Instant::now() + wait;
    let waits = users.zip(pushed.iter_mut()).map(|(user, p)| async move {
        let (Some(rx), Some(id)) = (p.receipt.take(), p.outcome.id) else {
            return serde_json::Value::Null;
        };
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(receipt)) => json!(receipt),
            _ => {
                shared.receipts.forget(&user, id);
                serde_json::Value::Null
            }
        }
    });
    futures_util::future::join_all(waits).await
}

fn history_unavailable(e: push_registry::Error) -> Resp {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "history_unavailable",
        format!("message not accepted, nothing was sent (retry): {e}"),
    )
}

async fn push_one(req: Request<Incoming>, user: &str, shared: &Shared) -> Resp {
    let received = tokio::time::Instant::now();
    let json = is_json(&req);
    let wait = match receipt_wait(&req) {
        Ok(w) => w,
        Err(e) => return e.into_response(),
    };
    let body = match read_body(req, shared.config.max_message_bytes, shared).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let payload = if json {
        Payload::json(body).map_err(|e| e.to_string())
    } else {
        Payload::text(body).map_err(|e| format!("payload must be UTF-8 text: {e}"))
    };
    let payload = match payload {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_payload", e),
    };
    metrics::counter!(m::PUSHES).increment(1);
    let request = PushRequest::to_user(user, &payload);
    let mut pushed = match shared
        .pusher
        .push(&[request], received, wait.is_some())
        .await
    {
        Ok(p) => p,
        Err(e) => return history_unavailable(e),
    };
    let mut body = outcome_json(user, pushed[0].outcome);
    if let Some(wait) = wait {
        let r = receipts_json(shared, std::iter::once(user.to_owned()), &mut pushed, wait).await;
        body["receipt"] = r.into_iter().next().unwrap_or_default();
    }
    json_response(StatusCode::OK, body)
}

/// One item of a push or deliver batch: the wire type from push-proto.
type BatchItem<'a> = push_proto::api::DeliverItem<'a>;

/// The push request for a checked item.
fn push_request<'b>(item: &'b BatchItem<'_>, payload: &'b Payload) -> PushRequest<'b> {
    PushRequest {
        user: &item.user,
        device: item.device.as_deref(),
        message_id: item.message_id.as_deref(),
        payload,
        id: item.id,
    }
}

/// Reads and parses a JSON array of [`BatchItem`]s.
async fn read_batch(req: Request<Incoming>, shared: &Shared) -> Result<Bytes, ApiError> {
    // A batch may carry many messages of the maximum size, up to a bound.
    let limit = shared.config.max_message_bytes.saturating_mul(64);
    read_body(req, limit, shared).await
}

fn parse_batch(body: &[u8]) -> Result<Vec<BatchItem<'_>>, ApiError> {
    let items: Vec<BatchItem<'_>> = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_batch",
            format!("expected a JSON array of {{\"user\":…,\"data\":…}}: {e}"),
        )
    })?;
    if items.len() > MAX_BATCH {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_many",
            format!("at most {MAX_BATCH} messages per batch"),
        ));
    }
    Ok(items)
}

/// `POST /v1/push`: validated whole, then applied; one bad item refuses the batch.
async fn push_batch(req: Request<Incoming>, shared: &Shared) -> Resp {
    let received = tokio::time::Instant::now();
    let body = match read_batch(req, shared).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    push_batch_items(&body, received, shared)
        .await
        .unwrap_or_else(ApiError::into_response)
}

async fn push_batch_items(
    body: &[u8],
    received: tokio::time::Instant,
    shared: &Shared,
) -> Result<Resp, ApiError> {
    let items = parse_batch(body)?;
    let payloads = items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            item.payload(shared.config.max_message_bytes).map_err(|e| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "bad_item",
                    format!("item {i}: {e}"),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    metrics::counter!(m::PUSHES).increment(items.len() as u64);
    let reqs: Vec<PushRequest<'_>> = items
        .iter()
        .zip(&payloads)
        .map(|(item, payload)| push_request(item, payload))
        .collect();
    let pushed = match shared.pusher.push(&reqs, received, false).await {
        Ok(p) => p,
        Err(e) => return Ok(history_unavailable(e)),
    };
    let delivered: usize = pushed.iter().map(|p| p.outcome.delivered).sum();
    let results: Vec<_> = items
        .iter()
        .zip(&pushed)
        .map(|(item, p)| outcome_json(&item.user, p.outcome))
        .collect();
    Ok(json_response(
        StatusCode::OK,
        json!({"delivered": delivered, "results": results}),
    ))
}

/// `POST /internal/v1/deliver`: the message processor's batch. Each item gets its own
/// outcome, in order: `delivered` (queued for a connection here), `stored` (no connection of
/// that user/device here: kept in the history for when they resume), `duplicate` (kept
/// before under the same `message_id`; connections that had it do not get it again), or
/// `invalid` (never deliverable: dead-letter it). `?wait_receipt_ms=N` waits for receipts.
///
/// `trusted_ids`: the caller holds the internal secret. Otherwise an item's `id` must name a
/// message the history keeps for that user with the same content, or the item is `invalid`:
/// an id of `u64::MAX` would make a connection skip every later message.
async fn deliver(req: Request<Incoming>, shared: &Shared, trusted_ids: bool) -> Resp {
    let received = tokio::time::Instant::now();
    let wait = match receipt_wait(&req) {
        Ok(w) => w,
        Err(e) => return e.into_response(),
    };
    let body = match read_batch(req, shared).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    deliver_items(&body, received, wait, trusted_ids, shared)
        .await
        .unwrap_or_else(ApiError::into_response)
}

async fn deliver_items(
    body: &[u8],
    received: tokio::time::Instant,
    wait: Option<std::time::Duration>,
    trusted_ids: bool,
    shared: &Shared,
) -> Result<Resp, ApiError> {
    let items = parse_batch(body)?;
    metrics::counter!(m::PUSHES).increment(items.len() as u64);
    let mut payloads: Vec<Result<Payload, ItemError>> = items
        .iter()
        .map(|item| item.payload(shared.config.max_message_bytes))
        .collect();
    if !trusted_ids {
        if let Err(e) = check_ids(&items, &mut payloads, shared).await {
            return Ok(history_unavailable(e));
        }
    }
    let valid: Vec<(&BatchItem<'_>, &Payload)> = items
        .iter()
        .zip(&payloads)
        .filter_map(|(item, p)| p.as_ref().ok().map(|p| (item, p)))
        .collect();
    let reqs: Vec<PushRequest<'_>> = valid.iter().map(|(i, p)| push_request(i, p)).collect();
    let mut pushed = match shared.pusher.push(&reqs, received, wait.is_some()).await {
        Ok(p) => p,
        Err(e) => return Ok(history_unavailable(e)),
    };
    let receipts = match wait {
        Some(w) => {
            let users = valid.iter().map(|(i, _)| i.user.to_string());
            receipts_json(shared, users, &mut pushed, w).await
        }
        None => Vec::new(),
    };
    let mut pushed = pushed.into_iter();
    let mut receipts = receipts.into_iter();
    let results: Vec<_> = payloads
        .iter()
        .map(|p| match p {
            Err(reason) => json!({"outcome": "invalid", "reason": reason.to_string()}),
            Ok(_) => {
                let o = pushed.next().expect("one result per valid item").outcome;
                let outcome = if o.duplicate {
                    "duplicate"
                } else if o.delivered == 0 {
                    "stored"
                } else {
                    "delivered"
                };
                let mut r = json!({"outcome": outcome, "id": o.id, "delivered": o.delivered});
                if wait.is_some() {
                    r["receipt"] = receipts.next().unwrap_or_default();
                }
                r
            }
        })
        .collect();
    Ok(json_response(StatusCode::OK, json!({ "results": results })))
}

/// `GET /v1/history/{user}?since=ID`: what a client that last saw `since` would be sent.
async fn history(req: &Request<Incoming>, user: &str, shared: &Shared) -> Resp {
    let since = req
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|p| p.strip_prefix("since=")))
        .map(str::parse::<u64>);
    let since = match since {
        None => 0,
        Some(Ok(s)) => s,
        Some(Err(_)) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_since",
                "since must be a message ID (an unsigned integer)",
            )
        }
    };
    match shared.store.since(user, since).await {
        Ok(r) => json_response(
            StatusCode::OK,
            json!({"user": user, "since": since, "gap": r.gap, "messages": r.messages}),
        ),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, "history_unavailable", e),
    }
}

/// Marks invalid every item whose `id` the history does not keep for its user with the same
/// payload, device and message ID (one `get` per user).
async fn check_ids(
    items: &[BatchItem<'_>],
    payloads: &mut [Result<Payload, ItemError>],
    shared: &Shared,
) -> Result<(), push_registry::Error> {
    let mut by_user: std::collections::BTreeMap<&str, Vec<usize>> = Default::default();
    for (i, item) in items.iter().enumerate() {
        if item.id.is_some() && payloads[i].is_ok() {
            by_user.entry(item.user.as_ref()).or_default().push(i);
        }
    }
    for (user, idxs) in by_user {
        let ids: Vec<u64> = idxs.iter().filter_map(|&i| items[i].id).collect();
        let kept = shared.store.get(user, &ids).await?;
        for i in idxs {
            let item = &items[i];
            let Ok(p) = &payloads[i] else { continue };
            let matches = kept.iter().any(|b| {
                Some(b.id) == item.id
                    && b.json == p.is_json
                    && same_payload(&b.data, &p.bytes, p.is_json)
                    && b.device.as_deref() == item.device.as_deref()
                    && b.mid.as_deref() == item.message_id.as_deref()
            });
            if !matches {
                metrics::counter!(m::ADMIN_REFUSED, "reason" => "bad_id").increment(1);
                payloads[i] = Err(ItemError::UntrustedId);
            }
        }
    }
    Ok(())
}

/// Equal payloads; JSON compared as values, since a forwarding node re-encodes it (key order,
/// spacing).
fn same_payload(kept: &[u8], sent: &[u8], json: bool) -> bool {
    if !json {
        return kept == sent;
    }
    let parse = |b: &[u8]| serde_json::from_slice::<serde_json::Value>(b).ok();
    kept == sent || matches!((parse(kept), parse(sent)), (Some(a), Some(b)) if a == b)
}

fn user_connections(user: &str, shared: &Shared) -> Resp {
    let conns: Vec<_> = shared
        .hub
        .connections(user)
        .iter()
        .map(|c| {
            let st = c.state();
            json!({
                "conn_id": c.id,
                "device": c.device.as_deref(),
                "transport": c.transport.as_str(),
                "remote": c.remote.to_string(),
                "connected_at_unix_ms": c.connected_at_unix_ms,
                "superseded": st.superseded,
                "asked_to_reconnect": st.clock.asked_at.is_some(),
                "queued": st.queued(),
            })
        })
        .collect();
    json_response(
        StatusCode::OK,
        json!({"user": user, "node": shared.config.node_id, "connections": conns}),
    )
}
