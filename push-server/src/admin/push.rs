//! `POST /v1/push/{user}` (body = payload; `?wait_receipt=5s` waits for the receipt) and
//! `POST /v1/push` (a JSON array of `{"user":…,"data":…}`, validated whole, then applied).

use hyper::body::Incoming;
use hyper::{Request, StatusCode};

use super::batch::{
    outcome_json, parse_batch, push_request, read_batch, receipt_wait, receive_spans,
    wait_receipts, OutcomeJson, PushPath,
};
use super::http::{
    error, history_unavailable, is_json, read_body, typed_json_response, ApiError, BodyLimits, Resp,
};
use crate::hub::PushRequest;
use crate::metrics as m;
use crate::protocol::message::Payload;
use crate::push::Pusher;
use crate::trace::ReceiveSpans;

/// `POST /v1/push/{user}`: one message; a JSON content type makes it a JSON payload, else text.
pub(super) async fn one(
    req: Request<Incoming>,
    user: &str,
    path: PushPath<'_>,
    limits: BodyLimits,
) -> Resp {
    let received = tokio::time::Instant::now();
    let json = is_json(req.headers());
    // The caller's trace (W3C, else B3 single or multi headers) continues here.
    let incoming = telemetry::propagation::extract(|name| {
        req.headers().get(name).and_then(|v| v.to_str().ok())
    });
    let sent = incoming.as_ref().map(|c| c.traceparent());
    let (spans, seen) = ReceiveSpans::open(std::iter::once(incoming), || {
        tracing::info_span!("admin receive", user)
    });
    let wait = match receipt_wait(req.uri().query()) {
        Ok(w) => w,
        Err(e) => return e.into_response(),
    };
    let body = match read_body(req.into_body(), limits.max_message_bytes, limits.timeout).await {
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
    let request = PushRequest {
        traceparent: seen.traceparent(0, sent.as_deref()),
        trace: seen.sampled(0),
        ..PushRequest::to_user(user, &payload)
    };
    let requests = [request];
    let pushed = path.pusher.push(&requests, received, wait.is_some(), spans);
    let mut pushed = match pushed.await {
        Ok(p) => p,
        Err(e) => return history_unavailable(e),
    };
    let mut body = outcome_json(user, pushed[0].outcome);
    if let Some(wait) = wait {
        let users = std::iter::once(user.to_owned());
        let r = wait_receipts(path.receipts, users, &mut pushed, wait).await;
        body.receipt = Some(r.into_iter().next().flatten());
    }
    typed_json_response(StatusCode::OK, &body)
}

/// `POST /v1/push`: validated whole, then applied; one bad item refuses the batch.
pub(super) async fn batch(req: Request<Incoming>, pusher: &Pusher, limits: BodyLimits) -> Resp {
    let received = tokio::time::Instant::now();
    let body = match read_batch(req.into_body(), limits).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    batch_items(&body, received, pusher, limits.max_message_bytes)
        .await
        .unwrap_or_else(ApiError::into_response)
}

async fn batch_items(
    body: &[u8],
    received: tokio::time::Instant,
    pusher: &Pusher,
    max_message_bytes: usize,
) -> Result<Resp, ApiError> {
    let items = parse_batch(body)?;
    let payloads = items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            item.payload(max_message_bytes).map_err(|e| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "bad_item",
                    format!("item {i}: {e}"),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    metrics::counter!(m::PUSHES).increment(items.len() as u64);
    let (spans, seen) = receive_spans(items.iter(), || tracing::info_span!("admin receive"));
    let reqs: Vec<PushRequest<'_>> = items
        .iter()
        .zip(&payloads)
        .enumerate()
        .map(|(k, (item, payload))| push_request(k, item, payload, &seen))
        .collect();
    let pushed = match pusher.push(&reqs, received, false, spans).await {
        Ok(p) => p,
        Err(e) => return Ok(history_unavailable(e)),
    };
    let delivered: usize = pushed.iter().map(|p| p.outcome.delivered).sum();
    let results: Vec<_> = items
        .iter()
        .zip(&pushed)
        .map(|(item, p)| outcome_json(&item.user, p.outcome))
        .collect();
    #[derive(serde::Serialize)]
    struct Answer<'a> {
        delivered: usize,
        results: Vec<OutcomeJson<'a>>,
    }
    Ok(typed_json_response(
        StatusCode::OK,
        &Answer { delivered, results },
    ))
}
