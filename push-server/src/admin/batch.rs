//! What the push routes and the deliver route share: the batch item (push-proto's wire type)
//! and its bounds, each message's JSON outcome, and waiting for receipts.

use std::time::Duration;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::StatusCode;

use super::http::{read_body, ApiError, BodyLimits};
use crate::hub::{PushOutcome, PushRequest};
use crate::protocol::message::Payload;
use crate::push::{Pushed, Pusher};
use crate::receipts::{Receipt, Receipts};
use crate::trace::{ReceiveSpans, Seen};

/// Most messages in one batch request.
pub(super) const MAX_BATCH: usize = 10_000;

/// A batch's body may carry this many messages of the maximum size.
const BATCH_BODY_MESSAGES: usize = 64;

/// Most time a push request may wait for its receipt.
const MAX_RECEIPT_WAIT: Duration = Duration::from_secs(60);

/// The handles a push route needs: the push path and the receipt waiters.
#[derive(Debug, Clone, Copy)]
pub(super) struct PushPath<'a> {
    pub pusher: &'a Pusher,
    pub receipts: &'a Receipts,
}

/// One item of a push or deliver batch: the wire type from push-proto.
pub(super) type BatchItem<'a> = push_proto::api::DeliverItem<'a>;

/// The push request for checked item `k`; `seen` says what its client sees and whether it
/// is traced here.
pub(super) fn push_request<'b>(
    k: usize,
    item: &'b BatchItem<'_>,
    payload: &'b Payload,
    seen: &'b Seen,
) -> PushRequest<'b> {
    PushRequest {
        user: &item.user,
        device: item.device.as_deref(),
        message_id: item.message_id.as_deref(),
        payload,
        id: item.id,
        traceparent: seen.traceparent(k, item.traceparent.as_deref()),
        trace: seen.sampled(k),
    }
}

/// The receive spans of a batch's items, each under its item's `traceparent`.
pub(super) fn receive_spans<'i>(
    items: impl Iterator<Item = &'i BatchItem<'i>>,
    open: impl Fn() -> tracing::Span,
) -> (ReceiveSpans, Seen) {
    let incoming = items.map(|item| {
        item.traceparent
            .as_deref()
            .and_then(|t| telemetry::propagation::parse_traceparent(t).ok())
    });
    ReceiveSpans::open(incoming, open)
}

/// Reads a batch's body: many messages of the maximum size, up to a bound.
pub(super) async fn read_batch(body: Incoming, limits: BodyLimits) -> Result<Bytes, ApiError> {
    let limit = limits.max_message_bytes.saturating_mul(BATCH_BODY_MESSAGES);
    read_body(body, limit, limits.timeout).await
}

/// Parses a JSON array of [`BatchItem`]s, at most [`MAX_BATCH`] of them.
pub(super) fn parse_batch(body: &[u8]) -> Result<Vec<BatchItem<'_>>, ApiError> {
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

/// One message's outcome on the push routes: `{"user","id","delivered","dropped","stored",
/// "duplicate"}`, and `"receipt"` when the caller waited for one (`null` if none came).
#[derive(Debug, serde::Serialize)]
pub(super) struct OutcomeJson<'a> {
    user: &'a str,
    id: Option<u64>,
    delivered: usize,
    dropped: usize,
    stored: bool,
    duplicate: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) receipt: Option<Option<Receipt>>,
}

/// One message's outcome on the push routes.
pub(super) fn outcome_json(user: &str, o: PushOutcome) -> OutcomeJson<'_> {
    OutcomeJson {
        user,
        id: o.id,
        delivered: o.delivered,
        dropped: o.dropped,
        stored: o.delivered == 0,
        duplicate: o.duplicate,
        receipt: None,
    }
}

/// `?wait_receipt=5s` (or `?wait_receipt_ms=5000`) in the request's query: how long to wait
/// for a receipt.
pub(super) fn receipt_wait(query: Option<&str>) -> Result<Option<Duration>, ApiError> {
    let Some(query) = query else {
        return Ok(None);
    };
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let wait = match k {
            "wait_receipt" => crate::config::parse_duration(v).ok(),
            "wait_receipt_ms" => v.parse().ok().map(Duration::from_millis),
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

/// Waits for each message's receipt (all at once, up to `wait`); `None` for those that did
/// not come in time (`null` in the answers).
pub(super) async fn wait_receipts(
    receipts: &Receipts,
    users: impl Iterator<Item = String>,
    pushed: &mut [Pushed],
    wait: Duration,
) -> Vec<Option<Receipt>> {
    let deadline = tokio::time::Instant::now() + wait;
    let waits = users.zip(pushed.iter_mut()).map(|(user, p)| async move {
        let (Some(rx), Some(id)) = (p.receipt.take(), p.outcome.id) else {
            return None;
        };
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(receipt)) => Some(receipt),
            _ => {
                receipts.forget(&user, id);
                None
            }
        }
    });
    futures_util::future::join_all(waits).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(e: ApiError) -> StatusCode {
        e.into_response().status()
    }

    #[test]
    fn receipt_waits_are_bounded() {
        assert_eq!(receipt_wait(None).unwrap(), None);
        assert_eq!(receipt_wait(Some("since=3")).unwrap(), None);
        assert_eq!(
            receipt_wait(Some("a=1&wait_receipt=5s")).unwrap(),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            receipt_wait(Some("wait_receipt_ms=250")).unwrap(),
            Some(Duration::from_millis(250))
        );
        assert_eq!(
            receipt_wait(Some("wait_receipt=60s")).unwrap(),
            Some(MAX_RECEIPT_WAIT)
        );
        for bad in [
            "wait_receipt=61s",
            "wait_receipt_ms=x",
            "wait_receipt",
            "wait_receipt=soon",
        ] {
            let e = receipt_wait(Some(bad)).expect_err(bad);
            assert_eq!(code(e), StatusCode::BAD_REQUEST, "{bad}");
        }
    }

    #[test]
    fn batches_are_bounded() {
        let items =
            parse_batch(br#"[{"user":"a","data":"x"},{"user":"b","data":{"k":1}}]"#).unwrap();
        assert_eq!(items.len(), 2);
        assert_eq!(items[1].user, "b");
        assert_eq!(
            code(parse_batch(b"{}").unwrap_err()),
            StatusCode::BAD_REQUEST
        );
        let one = r#"{"user":"a","data":"x"}"#;
        let too_many = format!("[{}]", vec![one; MAX_BATCH + 1].join(","));
        assert_eq!(
            code(parse_batch(too_many.as_bytes()).unwrap_err()),
            StatusCode::PAYLOAD_TOO_LARGE
        );
    }
}
