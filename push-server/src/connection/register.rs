//! Registration: an admitted client's place (its source's count and the node's capacity),
//! then its entry in the hub and the registry, undone by RAII guards however the connection
//! ends ([`Slot`] before the hello is written, [`Registered`] after).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::net::TcpStream;

use super::admission::Admission;
use super::io::write_all;
use super::refusal::{refuse, Refusal};
use super::resume::resume;
use crate::hub::{ConnHandle, Transport};
use crate::lifecycle::DisconnectReason;
use crate::metrics as m;
use crate::protocol::http::RequestHead;
use crate::protocol::message::{self, ServerMessage};
use crate::protocol::{sse, ws};
use crate::state::Shared;

/// A registered connection: unregisters and counts the disconnect when dropped, so the
/// accounting holds however the task ends.
pub(super) struct Registered {
    pub handle: Arc<ConnHandle>,
    pub shared: Arc<Shared>,
}

impl Registered {
    /// Counts the disconnect under `reason`, then unregisters (on drop).
    pub fn set_reason(self, reason: DisconnectReason) {
        metrics::counter!(m::DISCONNECTS, "reason" => reason.as_str()).increment(1);
        tracing::debug!(conn = self.handle.id, user = %self.handle.user, reason = reason.as_str(), "disconnected");
        // Drop runs the rest.
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        let t = self.handle.transport;
        self.shared.hub.unregister(&self.handle);
        // Pushes waiting for this connection's frames learn they were not written.
        self.handle.discard();
        if let Some(presence) = &self.shared.presence {
            presence.unregister(&self.handle);
        }
        self.shared.release_slot(t, self.handle.remote.ip());
        let i = t.index();
        self.shared.hot.open[i].decrement(1.0);
    }
}

/// A connection that passed its handshake.
pub(super) struct Accepted {
    /// Undoes the registration when dropped.
    pub guard: Registered,
    /// Bytes received after the request head (early WebSocket frames).
    pub leftover: Vec<u8>,
}

/// A place reserved for a connection in admission: its transport's reservation in the hub
/// and its source's count. Given back on drop (a refusal, a panic) unless kept, which hands
/// it to the [`Registered`] guard.
pub(super) struct Slot<'a> {
    shared: &'a Shared,
    transport: Transport,
    ip: std::net::IpAddr,
    kept: bool,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if !self.kept {
            self.shared.release_slot(self.transport, self.ip);
        }
    }
}

/// Reserves an admitted client's place: its source's count (`--max-connections-per-ip`),
/// then its transport's place within `--max-connections`.
pub(super) fn reserve(
    shared: &Shared,
    transport: Transport,
    remote: SocketAddr,
) -> Result<Slot<'_>, Box<Refusal>> {
    let cfg = &shared.config;
    let ip_ok = shared
        .conns_per_ip
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .acquire(remote.ip());
    if !ip_ok {
        let mut r = Refusal::new(
            429,
            "Too Many Requests",
            "too_many_connections",
            format!(
                "this address holds its maximum of {} connections on this node",
                cfg.max_connections_per_ip
            ),
        )
        .header("Retry-After", "5");
        r.result = "ip_limit";
        return Err(Box::new(r));
    }
    if !shared.hub.reserve(transport, cfg.max_connections) {
        shared
            .conns_per_ip
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .release(remote.ip());
        let r = Refusal::new(
            503,
            "Service Unavailable",
            "at_capacity",
            format!(
                "this node holds its maximum of {} connections; connect to another node",
                cfg.max_connections
            ),
        )
        .header("Retry-After", "5");
        return Err(Box::new(r));
    }
    Ok(Slot {
        shared,
        transport,
        ip: remote.ip(),
        kept: false,
    })
}

/// Registers an admitted client in its reserved `place`, reads what it is owed when it
/// resumes, and writes the handshake answer and `hello`.
pub(super) async fn accept(
    stream: &TcpStream,
    remote: SocketAddr,
    shared: &Arc<Shared>,
    _head: RequestHead,
    admitted: Admission,
    mut place: Slot<'_>,
    leftover: Vec<u8>,
) -> Option<Accepted> {
    let cfg = &shared.config;
    let now = shared.now();
    let policy = &cfg.lifecycle;
    let clock = policy.new_clock(now, rand::random::<f64>());
    let lifetime_ms = clock.expires_at - now;
    let id = shared.hub.next_conn_id();
    let unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let transport = admitted.transport;
    let handle = Arc::new(ConnHandle::new(
        id,
        admitted.claims.sub.as_str().into(),
        admitted.claims.did.as_deref().map(Into::into),
        transport,
        remote,
        clock,
        unix_ms,
    ));
    let hello = ServerMessage::Hello {
        version: message::PROTOCOL_VERSION,
        conn_id: id,
        node: &cfg.node_id,
        user: &handle.user,
        device: handle.device.as_deref(),
        lifetime_ms,
        heartbeat_ms: policy.heartbeat_interval.as_millis() as u64,
    };
    let mut response = match &admitted.ws {
        Some((accept, protocol)) => ws::upgrade_response(accept, protocol.as_deref()),
        None => sse::RESPONSE_HEAD.to_vec(),
    };
    if !super::echo_mode(shared) {
        response.extend_from_slice(&match transport {
            Transport::Ws => hello.ws_frame(),
            Transport::Sse => hello.sse_event(),
        });
    }
    // Registered before the hello is written: a client that pushes to itself as soon as it
    // reads `hello` must find its connection. No message can precede the hello, because
    // queued messages are written only by the driver, which starts after this returns.
    let hears = transport == Transport::Ws;
    let slot = shared.draining().map(|d| policy.drain_slot(id, d));
    handle.next_due.store(
        policy.next_due(&handle.state().clock, slot, hears),
        Ordering::Relaxed,
    );
    if let Some(after) = admitted.since {
        // Live messages queued before the resume's read answers already know where the
        // client stands (push.rs fills what they would skip).
        handle.resume_from(after);
    }
    match shared
        .hub
        .register(handle.clone(), cfg.max_connections_per_user)
    {
        Ok(superseded) => {
            for old in superseded {
                old.supersede(now);
            }
        }
        Err(e) => {
            // Newest refused (not oldest replaced): replacing would let a client with one
            // connection too many kick its own connections out in a loop.
            let mut r = Refusal::new(
                429,
                "Too Many Requests",
                "too_many_connections",
                format!(
                    "{e} ({}); close one, or give each device its own `did`",
                    cfg.max_connections_per_user
                ),
            )
            .header("Retry-After", "5");
            r.result = "user_limit";
            drop(place);
            refuse(stream, r).await;
            return None;
        }
    }
    // From here the guard undoes the registration however this ends (a write error, a
    // panic): the place, the hub entry, the registry record and the gauge.
    place.kept = true;
    drop(place);
    shared.hot.open[transport.index()].increment(1.0);
    let guard = Registered {
        handle: handle.clone(),
        shared: shared.clone(),
    };
    // Registered first, then the history read: a message appended before the read is in the
    // backlog, one appended after it finds this connection registered (here and in the
    // registry) and is queued live. Both at once are sent once (`ConnHandle::resume`).
    if let Some(presence) = &shared.presence {
        if admitted.since.is_some() {
            let wait = presence.register_and_wait(&handle);
            let _ = tokio::time::timeout(cfg.handshake_timeout, wait).await;
        } else {
            presence.register(&handle).await;
        }
    }
    if let Some(after) = admitted.since {
        resume(&handle, after, shared).await;
    }
    let written = tokio::time::timeout(cfg.handshake_timeout, write_all(stream, &response)).await;
    if !matches!(written, Ok(Ok(()))) {
        drop(guard);
        metrics::counter!(m::CONNECTS, "result" => "closed_early").increment(1);
        return None;
    }
    metrics::counter!(m::CONNECTS, "result" => "ok").increment(1);
    tracing::debug!(conn = id, user = %handle.user, transport = transport.as_str(), %remote, "connected");
    Some(Accepted { guard, leftover })
}
