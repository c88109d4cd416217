//! `POST /ack` on the client port: acknowledgements for clients that cannot send them on
//! their connection (SSE), checked like a connect (drain, token) and turned into receipts.

use std::sync::Arc;

use super::admission::check_draining;
use super::refusal::Refusal;
use crate::auth::{self, AuthError};
use crate::hub::Transport;
use crate::metrics as m;
use crate::protocol::http::RequestHead;
use crate::receipts::Ack;
use crate::state::Shared;

/// `POST /ack?id=N[,M…]` with the client's token: acknowledgements for clients that cannot
/// send them on their connection (SSE). Returns how many IDs were accepted.
pub(super) fn ack(head: &RequestHead, shared: &Shared) -> Result<usize, Box<Refusal>> {
    if head.method != "POST" {
        let r = Refusal::new(405, "Method Not Allowed", "method_not_allowed", "use POST")
            .header("Allow", "POST");
        return Err(Box::new(r));
    }
    // The per-IP rate and pending limits already ran at accept (`check_source`): each
    // request costs what a connect costs. The drain check comes first here.
    check_draining(shared.draining().is_some())?;
    let token = auth::token_from_request(
        head.authorization.as_deref(),
        head.query_param("token"),
        None,
    );
    let claims = token
        .as_deref()
        .ok_or(AuthError::Missing)
        .and_then(|t| shared.auth.verify(t))
        .map_err(|e| {
            Box::new(
                Refusal::new(401, "Unauthorized", "unauthorized", e.to_string())
                    .header("WWW-Authenticate", "Bearer"),
            )
        })?;
    let bad = || {
        Box::new(Refusal::new(
            400,
            "Bad Request",
            "bad_ack",
            "give the acknowledged message IDs as ?id=N or ?id=N,M,… (at most 100)",
        ))
    };
    let ids: Vec<u64> = head
        .query_param("id")
        .ok_or_else(bad)?
        .split(',')
        .map(|v| v.trim().parse::<u64>())
        .collect::<Result<_, _>>()
        .map_err(|_| bad())?;
    if ids.is_empty() || ids.len() > 100 {
        return Err(bad());
    }
    if !shared.receipts.room_for_posted() {
        let r = Refusal::new(
            503,
            "Service Unavailable",
            "receipts_busy",
            "acknowledgements are queued faster than they are handled; try again",
        )
        .header("Retry-After", "1");
        return Err(Box::new(r));
    }
    let mut ids = ids;
    // One receipt per ID: a request that names an ID twice acks it once.
    ids.sort_unstable();
    ids.dedup();
    let user: Arc<str> = claims.sub.as_str().into();
    let at_ms = push_registry::now_ms();
    let mut accepted = 0;
    for &id in &ids {
        metrics::counter!(m::ACKS).increment(1);
        accepted += usize::from(shared.receipts.ack(Ack {
            user: user.clone(),
            device: claims.did.as_deref().map(Into::into),
            transport: Transport::Sse,
            id,
            at_ms,
            slot: None,
            span: shared.receipts.traces.receipt_span(&user, id),
        }));
    }
    Ok(accepted)
}
