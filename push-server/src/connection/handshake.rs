//! The handshake of one accepted socket: the per-source checks before a byte is read, the
//! request head within its timeouts, then `/ack`, or admission, a reserved place and
//! registration. Runs boxed, so its buffers are freed before the connection goes idle.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::net::TcpStream;

use super::ack::ack;
use super::admission::{admit, check_source};
use super::io::{read_head, ReadHeadError};
use super::refusal::{refuse, respond, Refusal};
use super::register::{accept, reserve, Accepted};
use crate::metrics as m;
use crate::protocol::http::{self, HeadError};
use crate::state::Shared;

/// Counts a connection in its handshake, in all (bounded by `max_pending_handshakes`) and
/// for its source (bounded by `max_pending_per_ip`; taken by [`check_source`]).
struct Pending<'a> {
    shared: &'a Shared,
    ip: std::net::IpAddr,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.shared
            .pending_handshakes
            .fetch_sub(1, Ordering::AcqRel);
        self.shared
            .pending_per_ip
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .release(self.ip);
    }
}

/// Reads and answers the request head: `None` when the client was refused or answered.
pub(super) async fn handshake(
    stream: &TcpStream,
    remote: SocketAddr,
    shared: &Arc<Shared>,
) -> Option<Accepted> {
    let cfg = &shared.config;
    // Admission per source runs first, before a byte is read: a source that connects too
    // often, or holds too many silent handshakes, must not get to hold any more of the
    // slots that every client shares.
    let source = {
        let mut limiter = shared
            .rate_limiter
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let mut pending = shared
            .pending_per_ip
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        check_source(
            remote.ip(),
            shared.now(),
            &mut limiter,
            &mut pending,
            cfg.max_pending_per_ip,
        )
    };
    if let Err(r) = source {
        refuse(stream, *r).await;
        return None;
    }
    let pending = shared.pending_handshakes.fetch_add(1, Ordering::AcqRel);
    let _pending = Pending {
        shared,
        ip: remote.ip(),
    };
    if pending >= cfg.max_pending_handshakes {
        refuse(
            stream,
            Refusal::new(
                503,
                "Service Unavailable",
                "busy",
                "too many connections in their handshake",
            )
            .header("Retry-After", "1"),
        )
        .await;
        return None;
    }
    // A real client sends its request as soon as TCP is up: a connection still silent after
    // the first-byte timeout is let go long before the full handshake timeout would.
    // `peek`, not `readable()`: a freshly accepted socket reports itself readable before any
    // byte arrived, which let a silent connection through to the full handshake timeout.
    let mut first = [0u8; 1];
    if tokio::time::timeout(
        cfg.first_byte_timeout.min(cfg.handshake_timeout),
        stream.peek(&mut first),
    )
    .await
    .is_err()
    {
        let mut r = Refusal::new(
            408,
            "Request Timeout",
            "timeout",
            "no request received in time",
        );
        r.result = "first_byte_timeout";
        refuse(stream, r).await;
        return None;
    }
    let (head, leftover) =
        match tokio::time::timeout(cfg.handshake_timeout, read_head(stream, cfg.max_head_bytes))
            .await
        {
            Err(_) => {
                let r = Refusal::new(
                    408,
                    "Request Timeout",
                    "timeout",
                    "request head not received in time",
                );
                refuse(stream, r).await;
                return None;
            }
            Ok(Err(ReadHeadError::Closed)) => {
                metrics::counter!(m::CONNECTS, "result" => "closed_early").increment(1);
                return None;
            }
            Ok(Err(ReadHeadError::Head(e @ HeadError::TooLarge { .. }))) => {
                refuse(
                    stream,
                    Refusal::new(
                        431,
                        "Request Header Fields Too Large",
                        "head_too_large",
                        e.to_string(),
                    ),
                )
                .await;
                return None;
            }
            Ok(Err(ReadHeadError::Head(e))) => {
                refuse(
                    stream,
                    Refusal::new(400, "Bad Request", "bad_request", e.to_string()),
                )
                .await;
                return None;
            }
            Ok(Ok(x)) => x,
        };
    if head.path == "/ack" {
        match ack(&head, shared) {
            Ok(n) => {
                let body = serde_json::json!({ "accepted": n }).to_string();
                respond(stream, &http::simple_response(202, "Accepted", &[], &body)).await;
            }
            Err(r) => refuse(stream, *r).await,
        }
        return None;
    }
    let admitted = admit(&head, shared.draining().is_some(), &shared.auth)
        .and_then(|a| Ok((reserve(shared, a.transport, remote)?, a)));
    match admitted {
        Ok((slot, admitted)) => {
            accept(stream, remote, shared, head, admitted, slot, leftover).await
        }
        Err(r) => {
            refuse(stream, *r).await;
            None
        }
    }
}
