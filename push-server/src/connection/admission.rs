//! Admission as pure policy: the request head, the peer's address and `now` in, admitted or
//! a [`Refusal`] out. No socket, no shared state: the per-source counters and the
//! authenticator are passed in, so every refusal is unit-tested without a server. The
//! places an admitted client takes (its source's count, the node's capacity) are reserved
//! after this, in register.rs.
//!
//! Order of the checks is order of cost: the per-source ones ([`check_source`]) run at
//! accept, before a byte is read; routing, the drain, the upgrade, the resume point and the
//! token ([`admit`]) once the head is in.

use std::net::IpAddr;

use super::refusal::Refusal;
use crate::auth::{self, AuthError, Authenticator};
use crate::hub::Transport;
use crate::lifecycle::Millis;
use crate::protocol::http::RequestHead;
use crate::protocol::{message, ws};
use crate::ratelimit::{PerSource, RateLimiter};

/// What an admitted client asked for.
#[derive(Debug)]
pub(super) struct Admission {
    /// WebSocket or SSE.
    pub transport: Transport,
    /// The last message ID the client saw, when it resumes.
    pub since: Option<u64>,
    /// Who the client is.
    pub claims: auth::Claims,
    /// WebSocket: the `Sec-WebSocket-Accept` value and the subprotocol to select.
    pub ws: Option<(String, Option<String>)>,
}

/// The per-source checks at accept: the connect rate (`--per-ip-rate`, `--per-ip-burst`)
/// and the handshakes in progress (`--max-pending-per-ip`). On success the source's pending
/// count was taken in `pending`; the caller gives it back when the handshake ends.
pub(super) fn check_source(
    ip: IpAddr,
    now: Millis,
    limiter: &mut RateLimiter,
    pending: &mut PerSource,
    max_pending_per_ip: usize,
) -> Result<(), Box<Refusal>> {
    if !limiter.allow(ip, now) {
        let retry = limiter.retry_after_secs();
        let r = Refusal::new(
            429,
            "Too Many Requests",
            "rate_limited",
            "too many connects from this address",
        )
        .header("Retry-After", retry.to_string());
        return Err(Box::new(r));
    }
    if !pending.acquire(ip) {
        let mut r = Refusal::new(
            429,
            "Too Many Requests",
            "too_many_pending",
            format!(
                "this address has {} connections in their handshake already",
                max_pending_per_ip
            ),
        )
        .header("Retry-After", "1");
        r.result = "pending_ip_limit";
        return Err(Box::new(r));
    }
    Ok(())
}

/// Refuses while the node drains.
pub(super) fn check_draining(draining: bool) -> Result<(), Box<Refusal>> {
    if draining {
        let r = Refusal::new(
            503,
            "Service Unavailable",
            "draining",
            "this node is draining; connect to another node",
        )
        .header("Retry-After", "1");
        return Err(Box::new(r));
    }
    Ok(())
}

/// Routing, the drain, the upgrade, the resume point and the token, in order of cost.
pub(super) fn admit(
    head: &RequestHead,
    draining: bool,
    auth: &Authenticator,
) -> Result<Admission, Box<Refusal>> {
    let transport = match head.path.as_str() {
        "/ws" => Transport::Ws,
        "/sse" => Transport::Sse,
        _ => {
            return Err(Box::new(Refusal::new(404, "Not Found", "not_found", format!(
                "no such path `{}`: clients connect to /ws (WebSocket) or /sse (Server-Sent Events)",
                head.path
            ))))
        }
    };
    if head.method != "GET" {
        let r = Refusal::new(405, "Method Not Allowed", "method_not_allowed", "use GET")
            .header("Allow", "GET");
        return Err(Box::new(r));
    }
    // The per-IP limits ran at accept, before the head was read (`check_source`).
    check_draining(draining)?;
    let ws = if transport == Transport::Ws {
        match ws::check_upgrade(head) {
            Ok(accept) => Some(accept),
            Err(e @ ws::HandshakeError::Version) => {
                let r = Refusal::new(426, "Upgrade Required", "bad_upgrade", e.to_string())
                    .header("Sec-WebSocket-Version", "13");
                return Err(Box::new(r));
            }
            Err(e) => {
                return Err(Box::new(Refusal::new(
                    400,
                    "Bad Request",
                    "bad_upgrade",
                    e.to_string(),
                )))
            }
        }
    } else {
        None
    };
    let since = since(head, transport)?;
    let token = auth::token_from_request(
        head.authorization.as_deref(),
        head.query_param("token"),
        head.ws_protocol.as_deref().filter(|_| ws.is_some()),
    );
    let claims = token
        .as_deref()
        .ok_or(AuthError::Missing)
        .and_then(|t| auth.verify(t));
    let claims = match claims {
        Ok(c) => c,
        Err(e) => {
            let r = Refusal::new(401, "Unauthorized", "unauthorized", e.to_string())
                .header("WWW-Authenticate", "Bearer");
            return Err(Box::new(r));
        }
    };
    let ws = ws.map(|accept| {
        // Only the fixed protocol name is ever selected: echoing the token would put the
        // secret into a response header that proxies and browser tools log. Browsers that
        // carry the token there offer `push.v1` beside it (docs/protocol.md).
        let protocol = head.ws_protocol.as_deref().and_then(|offered| {
            offered
                .split(',')
                .map(str::trim)
                .any(|p| p == message::SUBPROTOCOL)
                .then(|| message::SUBPROTOCOL.to_owned())
        });
        (accept, protocol)
    });
    Ok(Admission {
        transport,
        since,
        claims,
        ws,
    })
}

/// The resume point a client asks for: SSE's `Last-Event-ID` (sent by browsers on their own
/// reconnects, so it wins over the URL), else `?since=`.
fn since(head: &RequestHead, transport: Transport) -> Result<Option<u64>, Box<Refusal>> {
    let raw = match (transport, &head.last_event_id) {
        (Transport::Sse, Some(id)) if !id.trim().is_empty() => Some(id.trim().to_owned()),
        _ => head.query_param("since"),
    };
    raw.map(|v| v.parse::<u64>()).transpose().map_err(|_| {
        Box::new(Refusal::new(
            400,
            "Bad Request",
            "bad_since",
            "since (or Last-Event-ID) must be a message ID: an unsigned integer",
        ))
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::protocol::http::parse_request_head;

    const SECRET: &[u8] = b"0123456789abcdef0123";

    fn head(raw: &str) -> RequestHead {
        let (h, _) = parse_request_head(raw.as_bytes(), 8192)
            .expect("valid head")
            .expect("complete head");
        h
    }

    fn auth() -> Authenticator {
        Authenticator::new(SECRET, false)
    }

    fn token(user: &str) -> String {
        auth().mint(user, Some("phone"), Duration::from_secs(60))
    }

    fn refused(r: Result<Admission, Box<Refusal>>) -> (u16, &'static str) {
        let r = r.expect_err("refused");
        (r.status, r.result)
    }

    const UPGRADE: &str = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";

    #[test]
    fn a_websocket_with_a_token_is_admitted_with_its_claims_and_resume_point() {
        let h = head(&format!(
            "GET /ws?token={}&since=41 HTTP/1.1\r\nHost: x\r\n{UPGRADE}\r\n",
            token("ann")
        ));
        let a = admit(&h, false, &auth()).expect("admitted");
        assert_eq!(a.transport, Transport::Ws);
        assert_eq!(a.since, Some(41));
        assert_eq!(a.claims.sub, "ann");
        assert_eq!(a.claims.did.as_deref(), Some("phone"));
        let (accept, protocol) = a.ws.expect("upgrade answer");
        assert_eq!(accept, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        assert_eq!(protocol, None);
    }

    #[test]
    fn sse_resumes_from_last_event_id_over_the_url() {
        let h = head(&format!(
            "GET /sse?since=3 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nLast-Event-ID: 9\r\n\r\n",
            token("bo")
        ));
        let a = admit(&h, false, &auth()).expect("admitted");
        assert_eq!(a.transport, Transport::Sse);
        assert_eq!(a.since, Some(9));
        assert!(a.ws.is_none());
    }

    #[test]
    fn each_refusal_has_its_status_and_result() {
        let t = token("cy");
        let cases = [
            (format!("GET /nope?token={t} HTTP/1.1\r\nHost: x\r\n\r\n"), false, (404, "not_found")),
            (format!("POST /sse?token={t} HTTP/1.1\r\nHost: x\r\n\r\n"), false, (405, "method_not_allowed")),
            (format!("GET /sse?token={t} HTTP/1.1\r\nHost: x\r\n\r\n"), true, (503, "draining")),
            ("GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 8\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".to_owned(), false, (426, "bad_upgrade")),
            ("GET /ws HTTP/1.1\r\nHost: x\r\n\r\n".to_owned(), false, (400, "bad_upgrade")),
            (format!("GET /sse?token={t}&since=-1 HTTP/1.1\r\nHost: x\r\n\r\n"), false, (400, "bad_since")),
            ("GET /sse HTTP/1.1\r\nHost: x\r\n\r\n".to_owned(), false, (401, "unauthorized")),
            ("GET /sse?token=forged HTTP/1.1\r\nHost: x\r\n\r\n".to_owned(), false, (401, "unauthorized")),
        ];
        for (raw, draining, want) in cases {
            assert_eq!(
                refused(admit(&head(&raw), draining, &auth())),
                want,
                "{raw}"
            );
        }
    }

    #[test]
    fn a_source_over_its_connect_rate_or_pending_limit_is_refused() {
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let other: IpAddr = "192.0.2.8".parse().unwrap();
        let mut limiter = RateLimiter::new(1.0, 2, 100);
        let mut pending = PerSource::new(10);
        assert!(check_source(ip, 0, &mut limiter, &mut pending, 10).is_ok());
        assert!(check_source(ip, 0, &mut limiter, &mut pending, 10).is_ok());
        let r = check_source(ip, 0, &mut limiter, &mut pending, 10).expect_err("over the burst");
        assert_eq!((r.status, r.result), (429, "rate_limited"));
        // A second later the bucket has a token again.
        assert!(check_source(ip, 1_000, &mut limiter, &mut pending, 10).is_ok());

        let mut limiter = RateLimiter::new(1000.0, 1000, 100);
        let mut pending = PerSource::new(1);
        assert!(check_source(ip, 0, &mut limiter, &mut pending, 1).is_ok());
        let r = check_source(ip, 0, &mut limiter, &mut pending, 1).expect_err("one pending");
        assert_eq!((r.status, r.result), (429, "pending_ip_limit"));
        assert!(check_source(other, 0, &mut limiter, &mut pending, 1).is_ok());
        pending.release(ip);
        assert!(check_source(ip, 0, &mut limiter, &mut pending, 1).is_ok());
    }
}
