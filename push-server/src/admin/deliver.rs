//! `POST /internal/v1/deliver`: the message processor's (and the other nodes') batches, an
//! outcome per item.

use hyper::body::Incoming;
use hyper::{Request, StatusCode};
use push_proto::api::{DeliverAnswer, DeliverResult, ItemError, OutcomeKind};
use push_registry::MessageStore;

use super::batch::{
    parse_batch, push_request, read_batch, receipt_wait, receive_spans, wait_receipts, BatchItem,
    PushPath,
};
use super::http::{history_unavailable, typed_json_response, ApiError, BodyLimits, Resp};
use crate::hub::PushRequest;
use crate::metrics as m;
use crate::protocol::message::Payload;

/// Each item gets its own outcome, in order: `delivered` (queued for a connection here),
/// `stored` (no connection of that user/device here: kept in the history for when they
/// resume), `duplicate` (kept before under the same `message_id`; connections that had it do
/// not get it again), or `invalid` (never deliverable: dead-letter it). `?wait_receipt_ms=N`
/// waits for receipts.
///
/// `trusted_ids`: the caller holds the internal secret. Otherwise an item's `id` must name a
/// message the history (`store`) keeps for that user with the same content, or the item is
/// `invalid`: an id of `u64::MAX` would make a connection skip every later message.
pub(super) async fn deliver(
    req: Request<Incoming>,
    path: PushPath<'_>,
    store: &dyn MessageStore,
    limits: BodyLimits,
    trusted_ids: bool,
) -> Resp {
    let received = tokio::time::Instant::now();
    let wait = match receipt_wait(req.uri().query()) {
        Ok(w) => w,
        Err(e) => return e.into_response(),
    };
    let body = match read_batch(req.into_body(), limits).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let checks = IdChecks {
        trusted: trusted_ids,
        store,
    };
    deliver_items(
        &body,
        received,
        wait,
        checks,
        path,
        limits.max_message_bytes,
    )
    .await
    .unwrap_or_else(ApiError::into_response)
}

/// Whether an item's `id` is taken as sent, or checked against the history.
#[derive(Clone, Copy)]
struct IdChecks<'a> {
    trusted: bool,
    store: &'a dyn MessageStore,
}

async fn deliver_items(
    body: &[u8],
    received: tokio::time::Instant,
    wait: Option<std::time::Duration>,
    ids: IdChecks<'_>,
    path: PushPath<'_>,
    max_message_bytes: usize,
) -> Result<Resp, ApiError> {
    let items = parse_batch(body)?;
    metrics::counter!(m::PUSHES).increment(items.len() as u64);
    let mut payloads: Vec<Result<Payload, ItemError>> = items
        .iter()
        .map(|item| item.payload(max_message_bytes))
        .collect();
    if !ids.trusted {
        if let Err(e) = check_ids(&items, &mut payloads, ids.store).await {
            return Ok(history_unavailable(e));
        }
    }
    let valid: Vec<(&BatchItem<'_>, &Payload)> = items
        .iter()
        .zip(&payloads)
        .filter_map(|(item, p)| p.as_ref().ok().map(|p| (item, p)))
        .collect();
    let (spans, seen) = receive_spans(valid.iter().map(|(i, _)| *i), || {
        tracing::info_span!("internal receive")
    });
    let reqs: Vec<PushRequest<'_>> = valid
        .iter()
        .enumerate()
        .map(|(k, (i, p))| push_request(k, i, p, &seen))
        .collect();
    let pushed = path.pusher.push(&reqs, received, wait.is_some(), spans);
    let mut pushed = match pushed.await {
        Ok(p) => p,
        Err(e) => return Ok(history_unavailable(e)),
    };
    let receipts = match wait {
        Some(w) => {
            let users = valid.iter().map(|(i, _)| i.user.to_string());
            wait_receipts(path.receipts, users, &mut pushed, w).await
        }
        None => Vec::new(),
    };
    let mut pushed = pushed.into_iter();
    let mut receipts = receipts.into_iter();
    // Written through the wire types, not `serde_json::Value`: a map per item cost a
    // measurable share of a batch's CPU (docs/BENCHMARKS.md, "Per core").
    let results = payloads
        .iter()
        .map(|p| match p {
            Err(reason) => DeliverResult {
                outcome: OutcomeKind::Invalid,
                id: None,
                delivered: None,
                reason: Some(reason.to_string()),
                receipt: None,
            },
            Ok(_) => {
                let o = pushed.next().expect("one result per valid item").outcome;
                let outcome = if o.duplicate {
                    OutcomeKind::Duplicate
                } else if o.delivered == 0 {
                    OutcomeKind::Stored
                } else {
                    OutcomeKind::Delivered
                };
                let receipt = receipts.next().flatten();
                DeliverResult {
                    outcome,
                    id: o.id,
                    delivered: Some(o.delivered as u64),
                    reason: None,
                    receipt,
                }
            }
        })
        .collect();
    Ok(typed_json_response(
        StatusCode::OK,
        &DeliverAnswer { results },
    ))
}

/// Marks invalid every item whose `id` the history does not keep for its user with the same
/// payload, device and message ID (one `get` per user).
async fn check_ids(
    items: &[BatchItem<'_>],
    payloads: &mut [Result<Payload, ItemError>],
    store: &dyn MessageStore,
) -> Result<(), push_registry::Error> {
    let mut by_user: std::collections::BTreeMap<&str, Vec<usize>> = Default::default();
    for (i, item) in items.iter().enumerate() {
        if item.id.is_some() && payloads[i].is_ok() {
            by_user.entry(item.user.as_ref()).or_default().push(i);
        }
    }
    for (user, idxs) in by_user {
        let ids: Vec<u64> = idxs.iter().filter_map(|&i| items[i].id).collect();
        let kept = store.get(user, &ids).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_compare_as_sent_or_as_json_values() {
        assert!(same_payload(b"hi", b"hi", false));
        assert!(!same_payload(b"hi", b"hi ", false));
        // Text is compared byte for byte even when it looks like JSON.
        assert!(!same_payload(br#"{"a":1}"#, br#"{ "a": 1 }"#, false));
        assert!(same_payload(
            br#"{"a":1,"b":2}"#,
            br#"{ "b": 2, "a": 1 }"#,
            true
        ));
        assert!(!same_payload(br#"{"a":1}"#, br#"{"a":2}"#, true));
    }
}
