//! One client connection: the handshake, then the driver loop that moves bytes between the
//! socket and the connection's [`ConnHandle`].
//!
//! Memory is the design constraint here (see docs/BENCHMARKS.md). An idle connection is one
//! tokio task whose future holds the socket, the handle and a frame reader with no buffer:
//! - the handshake runs in a boxed future that is freed before the connection goes idle,
//!   so its request buffer and parsing state are not part of the long-lived task;
//! - reads go into a per-worker-thread scratch buffer; only an incomplete frame is copied
//!   into the connection ([`WsReader`]);
//! - writes go straight from the shared encoded frame to the socket; only a frame the
//!   kernel did not take whole stays queued;
//! - timers are not per connection: the sweeper (server.rs) looks at each connection when
//!   its `next_due` passes and wakes it through the handle.

use std::cell::RefCell;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::{Buf, Bytes};
use socket2::SockRef;
use tokio::net::TcpStream;

use crate::auth::{self, AuthError};
use crate::hub::{ConnHandle, Next, Outbound, Transport};
use crate::lifecycle::{DisconnectReason, Policy};
use crate::metrics as m;
use crate::protocol::http::{self, HeadError, RequestHead};
use crate::protocol::message::{self, ClientMessage, ServerMessage};
use crate::protocol::sse;
use crate::protocol::ws::{self, close_code, Message, WsReader};
use crate::receipts::Ack;
use crate::server::{close_frame_for, Shared};

/// Size of the per-worker read buffer. One read takes up to this much; a larger message
/// arrives over several reads and is assembled in the connection's reader.
const SCRATCH_LEN: usize = 16 * 1024;

/// Reads per wake-up before yielding, so one busy client cannot starve the others on its
/// worker thread. 8 × 16 KiB covers any message up to the default size limit.
const MAX_READS_PER_WAKE: usize = 8;

/// How long the server waits, after answering a client's close, for the client to close
/// TCP first (so the client, not the server, holds TIME_WAIT).
///
/// Why short: clients that close eagerly (most libraries, the load generator) send their
/// FIN one round trip after the close reply, well within this; clients that follow RFC 6455
/// 7.1.1 (browsers, the Autobahn suite) wait for the server to close TCP, and must not be
/// kept waiting: Autobahn fails a server that has not closed within 0.5 s in its UTF-8
/// cases (this was 2 s). A client further than 200 ms away leaves TIME_WAIT on the server.
const CLOSE_LINGER: Duration = Duration::from_millis(200);

thread_local! {
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; SCRATCH_LEN].into_boxed_slice());
}

/// Serves one accepted socket to the end.
pub(crate) async fn serve(stream: TcpStream, remote: SocketAddr, shared: Arc<Shared>) {
    // Boxed so the handshake's state is freed when it ends instead of sizing this task.
    let Some(accepted) = Box::pin(handshake(&stream, remote, &shared)).await else {
        return;
    };
    drop(shared);
    let guard = accepted.guard;
    let handle = &guard.handle;
    let shared = &guard.shared;
    let mut reader = WsReader::default();
    let mut end = if accepted.leftover.is_empty() {
        None
    } else {
        on_bytes(&accepted.leftover, &mut reader, handle, shared)
    };
    drop(accepted.leftover);
    let end = loop {
        if let Some(mut end) = end.take() {
            // Replies to what the client sent before its close or its error (pongs, echoes)
            // go out first, as far as the socket takes them now (RFC 6455 5.5.1: data may
            // precede a close frame). A frame left half-written leaves no room for a close
            // frame after it: then the socket is just closed.
            if let Flush::Blocked | Flush::Failed = flush(&stream, handle, shared) {
                end.close = None;
                end.server_initiated = false;
            }
            break end;
        }
        let blocked = match flush(&stream, handle, shared) {
            Flush::Idle => false,
            Flush::Blocked => true,
            Flush::Close(reason) => break End::server(reason),
            Flush::Failed => break End::io(),
        };
        // One poll_fn instead of `select!` over three futures: the readiness of the socket
        // and the handle's wake are polled in place, so the task carries no future state
        // for them (this halved the task's size).
        let event = std::future::poll_fn(|cx| {
            if handle.poll_woken(cx).is_ready() {
                return Poll::Ready(Event::Woken);
            }
            match stream.poll_read_ready(cx) {
                Poll::Ready(Ok(())) => return Poll::Ready(Event::Readable),
                Poll::Ready(Err(_)) => return Poll::Ready(Event::Failed),
                Poll::Pending => {}
            }
            if blocked {
                match stream.poll_write_ready(cx) {
                    Poll::Ready(Ok(())) => return Poll::Ready(Event::Woken),
                    Poll::Ready(Err(_)) => return Poll::Ready(Event::Failed),
                    Poll::Pending => {}
                }
            }
            Poll::Pending
        })
        .await;
        end = match event {
            Event::Woken => None,
            Event::Readable => on_readable(&stream, &mut reader, handle, shared),
            Event::Failed => Some(End::io()),
        };
    };
    // Boxed: the close path's timer and buffers are needed once, not for the whole life.
    Box::pin(finish(&stream, handle, end)).await;
    guard.set_reason(end.reason);
}

/// How a connection ended.
#[derive(Debug, Clone, Copy)]
struct End {
    reason: DisconnectReason,
    /// WebSocket close frame to send: code and reason text.
    close: Option<(u16, &'static str)>,
    /// The client sent a close frame: answer it, then wait for its FIN.
    client_close_frame: bool,
    /// The server decided to close (send the reason's close frame, then FIN).
    server_initiated: bool,
}

impl End {
    fn io() -> Self {
        Self {
            reason: DisconnectReason::IoError,
            close: None,
            client_close_frame: false,
            server_initiated: false,
        }
    }

    fn server(reason: DisconnectReason) -> Self {
        Self {
            reason,
            close: None,
            client_close_frame: false,
            server_initiated: true,
        }
    }

    fn protocol(code: u16, text: &'static str) -> Self {
        Self {
            reason: DisconnectReason::ProtocolError,
            close: Some((code, text)),
            client_close_frame: false,
            server_initiated: true,
        }
    }

    fn client(handle: &ConnHandle, close_frame: Option<u16>) -> Self {
        let st = handle.state();
        Self {
            reason: Policy::client_close_reason(&st.clock, st.superseded),
            close: close_frame.map(|c| (c, "")),
            client_close_frame: close_frame.is_some(),
            server_initiated: false,
        }
    }
}

enum Event {
    Woken,
    Readable,
    Failed,
}

enum Flush {
    Idle,
    Blocked,
    Close(DisconnectReason),
    Failed,
}

/// Writes queued frames until the queue is empty or the socket would block.
fn flush(stream: &TcpStream, handle: &ConnHandle, shared: &Shared) -> Flush {
    loop {
        let mut out = match handle.next_outbound() {
            Next::Idle => return Flush::Idle,
            Next::Close(reason) => return Flush::Close(reason),
            Next::Frame(out) => out,
        };
        match stream.try_write(&out.bytes) {
            Ok(n) if n == out.bytes.len() => {
                if let Some(received) = out.received_at {
                    let t = handle.transport.index();
                    shared.hot.delivered[t].increment(1);
                    shared.hot.latency.record(received.elapsed().as_secs_f64());
                }
                out.written();
            }
            Ok(n) => {
                out.bytes.advance(n);
                out.partial |= n > 0;
                handle.requeue_front(out);
                return Flush::Blocked;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                handle.requeue_front(out);
                return Flush::Blocked;
            }
            Err(_) => return Flush::Failed,
        }
    }
}

/// Reads what the socket has, into the worker's scratch buffer.
fn on_readable(
    stream: &TcpStream,
    reader: &mut WsReader,
    handle: &Arc<ConnHandle>,
    shared: &Shared,
) -> Option<End> {
    SCRATCH.with(|scratch| {
        let mut buf = scratch.borrow_mut();
        let mut heard = false;
        let mut end = None;
        for _ in 0..MAX_READS_PER_WAKE {
            match stream.try_read(&mut buf) {
                Ok(0) => {
                    end = Some(End::client(handle, None));
                    break;
                }
                Ok(n) => {
                    heard = true;
                    if handle.transport == Transport::Ws {
                        end = on_bytes(&buf[..n], reader, handle, shared);
                    }
                    // SSE clients have nothing to say after their request; what they send
                    // is read and dropped so it cannot pile up.
                    if end.is_some() || n < buf.len() {
                        break;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => {
                    end = Some(End::io());
                    break;
                }
            }
        }
        if heard {
            handle.state().clock.last_heard = shared.now();
        }
        end
    })
}

/// Feeds client bytes to the frame reader and acts on each message.
fn on_bytes(
    data: &[u8],
    reader: &mut WsReader,
    handle: &Arc<ConnHandle>,
    shared: &Shared,
) -> Option<End> {
    let mut end = None;
    let result = reader.feed(data, shared.config.max_message_bytes, |msg| {
        if end.is_some() {
            return;
        }
        match msg {
            Message::Text(text) if echo_mode(shared) => reply(
                handle,
                shared,
                ws::encode_frame(ws::OpCode::Text, text.as_bytes()),
            ),
            Message::Binary(data) if echo_mode(shared) => {
                reply(handle, shared, ws::encode_frame(ws::OpCode::Binary, &data));
            }
            Message::Text(text) => match message::parse_client_message(&text) {
                Ok(ClientMessage::Ack { id }) => {
                    metrics::counter!(m::ACKS).increment(1);
                    match handle.admit_ack(id, shared.now(), shared.config.ack_rate) {
                        Ok(slot) => {
                            shared.receipts.ack(Ack {
                                user: handle.user.clone(),
                                device: handle.device.clone(),
                                transport: Transport::Ws,
                                id,
                                at_ms: push_registry::now_ms(),
                                slot: Some(slot),
                            });
                        }
                        Err(why) => {
                            metrics::counter!(m::RECEIPTS_DROPPED, "reason" => why.as_str())
                                .increment(1);
                        }
                    }
                }
                Ok(ClientMessage::Ping) => reply(handle, shared, message::pong_frame()),
                Err(e) => {
                    metrics::counter!(m::BAD_CLIENT_MESSAGES, "kind" => "unparsable").increment(1);
                    let detail = e.to_string();
                    let err = ServerMessage::Error {
                        code: "bad_message",
                        message: &detail,
                    };
                    reply(handle, shared, err.ws_frame());
                }
            },
            Message::Binary(_) => {
                metrics::counter!(m::BAD_CLIENT_MESSAGES, "kind" => "binary").increment(1);
                let err = ServerMessage::Error {
                    code: "binary_unsupported",
                    message: "client messages are JSON text frames",
                };
                reply(handle, shared, err.ws_frame());
            }
            Message::Ping(payload) => {
                reply(handle, shared, ws::encode_frame(ws::OpCode::Pong, &payload));
            }
            Message::Pong => {}
            Message::Close(code, _) => {
                // Echo the client's code (RFC 6455 5.5.1); 1005 (no code) is answered with 1000.
                end = Some(End::client(
                    handle,
                    Some(code.unwrap_or(close_code::NORMAL)),
                ));
            }
        }
    });
    match result {
        Ok(()) => end,
        Err(e) => {
            let text = match e {
                ws::FrameError::TooBig { .. } => "message too big",
                ws::FrameError::Utf8 => "invalid UTF-8",
                ws::FrameError::Protocol(what) => what,
            };
            Some(End::protocol(e.close_code(), text))
        }
    }
}

/// Autobahn's echo mode (feature `autobahn-echo`, test-only): data messages go back to the
/// client and no `hello` is sent; everything else is this driver as in production.
#[cfg(feature = "autobahn-echo")]
fn echo_mode(shared: &Shared) -> bool {
    shared.config.echo
}

#[cfg(not(feature = "autobahn-echo"))]
const fn echo_mode(_: &Shared) -> bool {
    false
}

fn reply(handle: &ConnHandle, shared: &Shared, bytes: Bytes) {
    handle.enqueue(Outbound::control(bytes), shared.limits);
}

/// Ends the connection the way `end` says: answer or send a close frame, then let whoever
/// should close TCP first do so.
async fn finish(stream: &TcpStream, handle: &ConnHandle, end: End) {
    let ws = handle.transport == Transport::Ws;
    if ws {
        let frame = match end.close {
            Some((code, text)) => Some(ws::close_frame(code, text)),
            None if end.server_initiated => close_frame_for(end.reason),
            None => None,
        };
        // Not after the rest of a partly written frame is dropped: the client would read
        // the close frame's bytes as that frame's tail.
        let frame = frame.filter(|_| handle.state().may_write_close());
        if let Some(frame) = frame {
            // Best effort: a slow consumer's buffer may be full; it is closed regardless.
            let _ = stream.try_write(&frame);
        }
    }
    if end.client_close_frame {
        // The client started the close handshake: let it close TCP first.
        let _ = tokio::time::timeout(CLOSE_LINGER, wait_eof(stream)).await;
    } else if end.server_initiated {
        let _ = SockRef::from(stream).shutdown(std::net::Shutdown::Write);
    }
}

async fn wait_eof(stream: &TcpStream) {
    let mut buf = [0u8; 64];
    loop {
        if stream.readable().await.is_err() {
            return;
        }
        match stream.try_read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
}

/// A registered connection: unregisters and counts the disconnect when dropped, so the
/// accounting holds however the task ends.
struct Registered {
    handle: Arc<ConnHandle>,
    shared: Arc<Shared>,
}

impl Registered {
    fn set_reason(self, reason: DisconnectReason) {
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
struct Accepted {
    guard: Registered,
    /// Bytes received after the request head (early WebSocket frames).
    leftover: Vec<u8>,
}

/// Counts a connection in its handshake, in all (bounded by `max_pending_handshakes`) and
/// for its source (bounded by `max_pending_per_ip`; taken by [`admit_source`]).
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

/// A place reserved for a connection in admission: its transport's reservation in the hub
/// and its source's count. Given back on drop (a refusal, a panic) unless kept, which hands
/// it to the [`Registered`] guard.
struct Slot<'a> {
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

enum ReadHeadError {
    Head(HeadError),
    Closed,
}

async fn read_head(
    stream: &TcpStream,
    max: usize,
) -> Result<(RequestHead, Vec<u8>), ReadHeadError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        stream.readable().await.map_err(|_| ReadHeadError::Closed)?;
        match stream.try_read(&mut chunk) {
            Ok(0) => return Err(ReadHeadError::Closed),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => continue,
            Err(_) => return Err(ReadHeadError::Closed),
        }
        if let Some((head, used)) =
            http::parse_request_head(&buf, max).map_err(ReadHeadError::Head)?
        {
            return Ok((head, buf.split_off(used)));
        }
    }
}

async fn write_all(stream: &TcpStream, mut data: &[u8]) -> std::io::Result<()> {
    while !data.is_empty() {
        stream.writable().await?;
        match stream.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A refusal: status, reason phrase, error code, message, extra headers.
struct Refusal {
    status: u16,
    phrase: &'static str,
    code: &'static str,
    message: String,
    headers: Vec<(&'static str, String)>,
    /// The `push_connects_total` result label.
    result: &'static str,
}

impl Refusal {
    fn new(
        status: u16,
        phrase: &'static str,
        code: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Self {
            status,
            phrase,
            code,
            message: message.into(),
            headers: Vec::new(),
            result: code,
        }
    }

    fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }
}

/// Writes a refusal and waits briefly for the client to close first.
async fn refuse(stream: &TcpStream, r: Refusal) {
    metrics::counter!(m::CONNECTS, "result" => r.result).increment(1);
    let headers: Vec<(&str, &str)> = r.headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
    let resp = http::simple_response(
        r.status,
        r.phrase,
        &headers,
        &http::error_body(r.code, &r.message),
    );
    respond(stream, &resp).await;
}

/// Writes a complete `Connection: close` response and lets the client close first.
async fn respond(stream: &TcpStream, resp: &[u8]) {
    if tokio::time::timeout(Duration::from_secs(1), write_all(stream, resp))
        .await
        .is_ok()
    {
        // `Connection: close` and a Content-Length: the client closes once it has read the
        // body, and keeps the TIME_WAIT. Bounded, so a client that stays does not hold us.
        let _ = tokio::time::timeout(Duration::from_secs(1), wait_eof(stream)).await;
    }
}

async fn handshake(
    stream: &TcpStream,
    remote: SocketAddr,
    shared: &Arc<Shared>,
) -> Option<Accepted> {
    let cfg = &shared.config;
    // Admission per source runs first, before a byte is read: a source that connects too
    // often, or holds too many silent handshakes, must not get to hold any more of the
    // slots that every client shares.
    if let Err(r) = admit_source(remote, shared) {
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
    match admit(&head, remote, shared) {
        Ok(admitted) => accept(stream, remote, shared, head, admitted, leftover).await,
        Err(r) => {
            refuse(stream, *r).await;
            None
        }
    }
}

/// The per-source checks at accept: the connect rate (`--per-ip-rate`, `--per-ip-burst`)
/// and the handshakes in progress (`--max-pending-per-ip`). On success the source's pending
/// count was taken; the caller's [`Pending`] gives it back.
fn admit_source(remote: SocketAddr, shared: &Shared) -> Result<(), Box<Refusal>> {
    let ip = remote.ip();
    let mut limiter = shared
        .rate_limiter
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if !limiter.allow(ip, shared.now()) {
        let retry = limiter.retry_after_secs();
        drop(limiter);
        let r = Refusal::new(
            429,
            "Too Many Requests",
            "rate_limited",
            "too many connects from this address",
        )
        .header("Retry-After", retry.to_string());
        return Err(Box::new(r));
    }
    drop(limiter);
    let acquired = shared
        .pending_per_ip
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .acquire(ip);
    if !acquired {
        let mut r = Refusal::new(
            429,
            "Too Many Requests",
            "too_many_pending",
            format!(
                "this address has {} connections in their handshake already",
                shared.config.max_pending_per_ip
            ),
        )
        .header("Retry-After", "1");
        r.result = "pending_ip_limit";
        return Err(Box::new(r));
    }
    Ok(())
}

/// `POST /ack?id=N[,M…]` with the client's token: acknowledgements for clients that cannot
/// send them on their connection (SSE). Returns how many IDs were accepted.
fn ack(head: &RequestHead, shared: &Shared) -> Result<usize, Box<Refusal>> {
    if head.method != "POST" {
        let r = Refusal::new(405, "Method Not Allowed", "method_not_allowed", "use POST")
            .header("Allow", "POST");
        return Err(Box::new(r));
    }
    // The per-IP rate and pending limits already ran at accept (`admit_source`): each
    // request costs what a connect costs. The drain check comes first here.
    draining_check(shared)?;
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
        }));
    }
    Ok(accepted)
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

struct Admitted<'a> {
    slot: Slot<'a>,
    transport: Transport,
    /// The last message ID the client saw, when it resumes.
    since: Option<u64>,
    claims: auth::Claims,
    /// WebSocket: the `Sec-WebSocket-Accept` value and the subprotocol to select.
    ws: Option<(String, Option<String>)>,
}

/// Refuses while the node drains.
fn draining_check(shared: &Shared) -> Result<(), Box<Refusal>> {
    if shared.draining().is_some() {
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

/// Routing, limits and authentication, in order of cost. Reserves a place on success.
fn admit<'a>(
    head: &RequestHead,
    remote: SocketAddr,
    shared: &'a Shared,
) -> Result<Admitted<'a>, Box<Refusal>> {
    let cfg = &shared.config;
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
    // The per-IP limits ran at accept, before the head was read (`admit_source`).
    draining_check(shared)?;
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
        .and_then(|t| shared.auth.verify(t));
    let claims = match claims {
        Ok(c) => c,
        Err(e) => {
            let r = Refusal::new(401, "Unauthorized", "unauthorized", e.to_string())
                .header("WWW-Authenticate", "Bearer");
            return Err(Box::new(r));
        }
    };
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
    let slot = Slot {
        shared,
        transport,
        ip: remote.ip(),
        kept: false,
    };
    Ok(Admitted {
        slot,
        transport,
        since,
        claims,
        ws,
    })
}

async fn accept(
    stream: &TcpStream,
    remote: SocketAddr,
    shared: &Arc<Shared>,
    _head: RequestHead,
    admitted: Admitted<'_>,
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
    if !echo_mode(shared) {
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
    let mut place = admitted.slot;
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

/// Reads what a resuming client is owed and puts it at the front of its queue.
async fn resume(handle: &ConnHandle, after: u64, shared: &Shared) {
    let read = tokio::time::timeout(
        shared.config.handshake_timeout,
        shared.store.since(&handle.user, after),
    )
    .await;
    let (gap, backlog) = match read {
        Ok(Ok(r)) => {
            let mut backlog: Vec<Outbound> = r
                .messages
                .iter()
                .filter(|m| {
                    m.device
                        .as_deref()
                        .is_none_or(|d| handle.device.as_deref() == Some(d))
                })
                .map(|m| backlog_frame(m, handle.transport))
                .collect();
            let before = backlog.len();
            let trimmed = trim_backlog(&mut backlog, shared.limits.max_bytes);
            if trimmed.is_some() {
                metrics::counter!(m::MESSAGES_DROPPED, "reason" => "resume_over_queue_bytes")
                    .increment((before - backlog.len()) as u64);
            }
            let oldest = trimmed.or(r.gap);
            let result = if oldest.is_some() { "gap" } else { "complete" };
            metrics::counter!(m::RESUMES, "result" => result).increment(1);
            metrics::counter!(m::RESUMED_MESSAGES).increment(backlog.len() as u64);
            let gap = oldest.map(|oldest| ServerMessage::Gap {
                after,
                oldest: Some(oldest),
            });
            (gap, backlog)
        }
        failed => {
            let why = match failed {
                Ok(Err(e)) => e.to_string(),
                _ => "timed out".to_owned(),
            };
            tracing::warn!(user = %handle.user, error = %why, "resume without history");
            metrics::counter!(m::HISTORY_ERRORS, "op" => "since").increment(1);
            metrics::counter!(m::RESUMES, "result" => "unavailable").increment(1);
            let gap = ServerMessage::Gap {
                after,
                oldest: None,
            };
            (Some(gap), Vec::new())
        }
    };
    let gap = gap.map(|g| match handle.transport {
        Transport::Ws => g.ws_frame(),
        Transport::Sse => g.sse_event(),
    });
    handle.resume(gap, backlog);
}

fn backlog_frame(m: &push_registry::Buffered, transport: Transport) -> Outbound {
    let payload = message::Payload {
        bytes: m.data.clone(),
        is_json: m.json,
    };
    let bytes = match transport {
        Transport::Ws => message::message_ws_frame(m.id, m.mid.as_deref(), &payload),
        Transport::Sse => message::message_sse_event(m.id, &payload),
    };
    Outbound {
        bytes,
        received_at: None,
        id: m.id,
        fate: None,
        partial: false,
    }
}

/// Keeps the newest frames of a backlog that fit in `max_bytes` (at least one): a resume
/// counts against the connection's queue byte limit, so `since=0` from a client that never
/// reads cannot hold the whole history. Returns the ID of the oldest kept frame when older
/// ones were left out (the client is told by a `gap`; they stay in the history).
fn trim_backlog(backlog: &mut Vec<Outbound>, max_bytes: usize) -> Option<u64> {
    let mut bytes = 0usize;
    let keep = backlog
        .iter()
        .rev()
        .take_while(|o| {
            bytes += o.bytes.len();
            bytes <= max_bytes
        })
        .count()
        .max(1);
    let cut = backlog.len().checked_sub(keep).filter(|&c| c > 0)?;
    backlog.drain(..cut);
    backlog.first().map(|o| o.id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    /// The per-connection task is the largest per-connection allocation. Keep it small: see
    /// the table in docs/BENCHMARKS.md (a 2.8 KB future cost 3.4 KiB per connection).
    #[tokio::test]
    async fn connection_future_stays_small() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = TcpStream::connect(addr).await.unwrap();
        let (server_side, remote) = listener.accept().await.unwrap();
        let server = crate::Server::start(Config::local_test("0123456789abcdef0123"))
            .await
            .unwrap();
        let fut = serve(server_side, remote, server.shared().clone());
        let size = std::mem::size_of_val(&fut);
        eprintln!("connection future: {size} bytes");
        assert!(size <= 512, "connection future is {size} bytes");
        drop(client);
    }
}
