//! One raw client connection (WebSocket or SSE) to a push-server node (also a peer's
//! subscription, for the benchmarks).
//!
//! Hand-written on a `TcpStream` rather than tokio-tungstenite: a worker process holds up to
//! about 19,900 connections (the 20,000 open-files limit), and tungstenite keeps read and
//! write buffers per connection (128 KiB each by default, still KiBs when shrunk). Here an
//! idle connection keeps only its socket and an empty `Vec`: reads go into a stack scratch
//! buffer once the socket is readable, and only a partial frame or event is kept between
//! reads.
//!
//! [`Conn::next_event`] (and [`Conn::poll_event`], the same without a future of its own) is
//! cancel-safe (it is raced in `select!`): it never writes, and all state between awaits
//! lives in `self`. Writes (pongs, acks, close) are separate calls that
//! the caller makes outside any `select!`, so a write is never cut in half.

use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use anyhow::{bail, Context as _};
use push_proto::message::{self, ClientMessage, Received};
use push_proto::{sse, ws};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

pub use push_proto::message::Hello;
pub use push_proto::Transport;

/// Any valid 16-byte base64 key: the client checks the server's accept value against it.
const WS_KEY: &str = "bG9hZHRlc3Qta2V5LTAwMQ==";

/// Largest response head plus hello accepted; the server's are a few hundred bytes.
const MAX_HANDSHAKE: usize = 16 * 1024;

/// Largest partial frame or event kept between reads. Load-test payloads are small; a
/// server that sends more than this is broken or not a push-server.
const MAX_PENDING: usize = 1024 * 1024;

/// A fresh masking key for each client frame, as RFC 6455 requires (an unpredictable key
/// keeps a frame's bytes from being chosen by whoever picks the payload). Client frames are
/// rare here (pongs, acks, the close), so the draw costs nothing measurable.
fn mask() -> [u8; 4] {
    rand::random()
}

/// What arrived on a connection.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A push: the per-user `id`, the queue's `mid` if any, and the payload as JSON text.
    Message {
        /// Per-user increasing ID.
        id: u64,
        /// Message ID from the queue (push-lib), if it came that way.
        mid: Option<String>,
        /// The payload (WebSocket `data`, SSE `data:` lines joined).
        data: String,
    },
    /// The server asks for a new connection: `rotate` or `drain`.
    Reconnect {
        /// `rotate` or `drain`.
        reason: String,
    },
    /// A WebSocket ping: answer it with [`Conn::pong`].
    Ping(Vec<u8>),
    /// A heartbeat that needs no answer (SSE comment, WebSocket pong, other control data).
    Heartbeat,
    /// A second `hello`, an `error`, or another message the client does not act on.
    Other(String),
    /// The server sent a WebSocket close frame (with its code), or closed TCP (`None`).
    Closed(Option<u16>),
}

/// A connection that has received its `hello` (or, opened with [`open_raw`], a peer's
/// subscription).
#[derive(Debug)]
pub struct Conn {
    stream: TcpStream,
    transport: Transport,
    /// Bytes of an incomplete frame or event.
    pending: Vec<u8>,
    /// WebSocket: the fragments of a message being assembled (empty and unallocated
    /// between messages).
    ws: ws::WsReader,
    /// The hello (all zero for a raw connection).
    pub hello: Hello,
    /// A close frame was sent (WebSocket) or the socket shut down.
    closing: bool,
    /// A peer's subscription ([`open_raw`]): any SSE event or WebSocket text frame with
    /// data is a [`Event::Message`] (ID 0 unless the event's `id:` is a number).
    raw: bool,
    /// The response body is chunked (Transfer-Encoding): the raw bytes not yet decoded.
    /// `None` for push-server, which streams without chunking.
    chunked: Option<Vec<u8>>,
}

/// Why a connection attempt failed, where the failure is the protocol's rather than the
/// socket's (those stay `std::io::Error`s in the chain).
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The server refused with an HTTP status other than the transport's (`101`, `200`).
    #[error("server answered `{status_line}`: {body}")]
    Refused {
        /// The status line, e.g. `HTTP/1.1 503 Service Unavailable`.
        status_line: String,
        /// The start of the body (push-server's refusals are `{"error":…,"message":…}`).
        body: String,
    },
    /// No hello (or response head) within the deadline.
    #[error("no {what} within {timeout:?}: timed out")]
    Timeout {
        /// `hello` or `response`.
        what: &'static str,
        /// The deadline.
        timeout: Duration,
    },
    /// The server closed the connection before its hello (or its response head).
    #[error("server closed the connection {0}")]
    Closed(String),
    /// The first message was not the hello (a protocol violation the caller counts).
    #[error("hello_not_first: first message is {0}")]
    HelloNotFirst(String),
    /// Anything else wrong with the server's handshake.
    #[error("{0}")]
    Handshake(String),
}

impl ConnectError {
    /// The row of the report's error table.
    fn kind(&self) -> String {
        match self {
            Self::Refused { status_line, body } => {
                let status = status_line.split_whitespace().nth(1).unwrap_or("?");
                // The refusal codes the report names; others are counted as `refused`.
                let error = serde_json::from_str::<serde_json::Value>(body)
                    .ok()
                    .and_then(|v| v["error"].as_str().map(str::to_owned));
                let code = ["draining", "at_capacity", "rate_limited", "unauthorized"]
                    .into_iter()
                    .find(|c| error.as_deref() == Some(*c))
                    .unwrap_or("refused");
                format!("http_{status}_{code}")
            }
            Self::Timeout { .. } => "timeout".into(),
            Self::Closed(_) => "closed_before_hello".into(),
            Self::HelloNotFirst(_) | Self::Handshake(_) => "other".into(),
        }
    }
}

/// How a connection attempt failed, for the report's error table: from the typed error in
/// the chain ([`ConnectError`], or the socket's `std::io::Error`), never from its text.
pub fn error_kind(e: &anyhow::Error) -> String {
    for cause in e.chain() {
        if let Some(c) = cause.downcast_ref::<ConnectError>() {
            return c.kind();
        }
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            let emfile = [rustix::io::Errno::MFILE, rustix::io::Errno::NFILE]
                .iter()
                .any(|e| io.raw_os_error() == Some(e.raw_os_error()));
            let kind = match io.kind() {
                _ if emfile => "too_many_open_files",
                ErrorKind::ConnectionRefused => "connection_refused",
                ErrorKind::AddrNotAvailable => "no_source_port",
                ErrorKind::TimedOut => "timeout",
                ErrorKind::ConnectionReset => "connection_reset",
                _ => continue,
            };
            return kind.into();
        }
    }
    "other".into()
}

/// Whether the attempt failed because the first message was not the hello.
pub fn is_hello_not_first(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<ConnectError>(),
            Some(ConnectError::HelloNotFirst(_))
        )
    })
}

/// Opens a connection from `source` to `server` with `token`, resuming after `since` if
/// given (WebSocket `?since=`, SSE `Last-Event-ID`; the server may ignore both), and waits
/// for the `hello` for at most `timeout`.
pub async fn open(
    source: IpAddr,
    server: SocketAddr,
    transport: Transport,
    token: &str,
    since: Option<u64>,
    timeout: Duration,
) -> anyhow::Result<Conn> {
    tokio::time::timeout(timeout, open_inner(source, server, transport, token, since))
        .await
        .map_err(|_| ConnectError::Timeout {
            what: "hello",
            timeout,
        })?
}

async fn open_inner(
    source: IpAddr,
    server: SocketAddr,
    transport: Transport,
    token: &str,
    since: Option<u64>,
) -> anyhow::Result<Conn> {
    let mut conn = handshake(
        source,
        server,
        transport,
        &request(server, transport, token, since),
    )
    .await?;
    // The protocol says the hello is the first message; anything else is a violation the
    // caller counts, so it is an error here.
    loop {
        match conn.next_event().await {
            Event::Other(json) => match message::parse_server_message(&json) {
                Ok(Received::Hello(hello)) => {
                    conn.hello = hello;
                    break;
                }
                _ => return Err(ConnectError::HelloNotFirst(format!("`{json}`")).into()),
            },
            Event::Ping(p) => conn.pong(&p).await?,
            Event::Heartbeat => {}
            Event::Closed(code) => {
                return Err(ConnectError::Closed(format!("before hello ({code:?})")).into())
            }
            other => return Err(ConnectError::HelloNotFirst(format!("{other:?}")).into()),
        }
    }
    conn.pending.shrink_to_fit();
    Ok(conn)
}

/// Subscribes to a peer (Nchan, Pushpin) at `path`: a plain `GET` with no token, SSE
/// (`Accept: text/event-stream`) or a WebSocket upgrade. Open once the response head is
/// `200` (SSE) or `101` with the right accept key: peers send no hello. Whatever followed
/// the head (a `: hi` comment, padding) stays to be read as events.
pub async fn open_raw(
    source: IpAddr,
    server: SocketAddr,
    transport: Transport,
    path: &str,
    timeout: Duration,
) -> anyhow::Result<Conn> {
    let request = match transport {
        Transport::Ws => format!(
            "GET {path} HTTP/1.1\r\nHost: {server}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: {WS_KEY}\r\n\
             Sec-WebSocket-Version: 13\r\n\r\n"
        ),
        Transport::Sse => {
            format!("GET {path} HTTP/1.1\r\nHost: {server}\r\nAccept: text/event-stream\r\n\r\n")
        }
    };
    let mut conn = tokio::time::timeout(timeout, handshake(source, server, transport, &request))
        .await
        .map_err(|_| ConnectError::Timeout {
            what: "response",
            timeout,
        })??;
    conn.raw = true;
    conn.pending.shrink_to_fit();
    Ok(conn)
}

/// Connects from `source` (port chosen by the kernel) to `server`, sends `request` and
/// reads the response head; checks the status (`101` and the accept key for WebSocket,
/// `200` for SSE). The connection's `pending` holds what followed the head.
async fn handshake(
    source: IpAddr,
    server: SocketAddr,
    transport: Transport,
    request: &str,
) -> anyhow::Result<Conn> {
    let socket = match source {
        IpAddr::V4(_) => TcpSocket::new_v4()?,
        IpAddr::V6(_) => TcpSocket::new_v6()?,
    };
    // One source address has only ~28k ephemeral ports towards one server port; binding
    // each client to one of many 127.0.0.x addresses lifts that limit.
    //
    // IP_BIND_ADDRESS_NO_PORT: without it, `bind(addr, 0)` picks the port at once, one
    // unique to the address whatever the destination, by walking the kernel's bind buckets;
    // with ~14,000 sockets per address (the million over 64 addresses) that walk was half
    // of a load process's CPU (`inet_bind2_bucket_find`, docs/BENCHMARKS.md). With it, the
    // port is chosen at `connect`, for the 4-tuple, as for an unbound socket.
    #[cfg(target_os = "linux")]
    nix::sys::socket::setsockopt(
        &socket,
        nix::sys::socket::sockopt::IpBindAddressNoPort,
        &true,
    )
    .context("cannot set IP_BIND_ADDRESS_NO_PORT")?;
    socket
        .bind(SocketAddr::new(source, 0))
        .with_context(|| format!("cannot bind {source}:0"))?;
    let mut stream = socket
        .connect(server)
        .await
        .with_context(|| format!("connect {source} -> {server}"))?;
    stream.write_all(request.as_bytes()).await?;

    let mut buf = Vec::with_capacity(1024);
    let head_end = loop {
        read_some(&mut stream, &mut buf).await?;
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let status_line = head.lines().next().unwrap_or_default();
    let expected = match transport {
        Transport::Ws => "101",
        Transport::Sse => "200",
    };
    if status_line.split_whitespace().nth(1) != Some(expected) {
        // Refusals carry a short JSON body saying why (`draining`, `at_capacity`, ...).
        let body = String::from_utf8_lossy(&buf[head_end..]);
        return Err(ConnectError::Refused {
            status_line: status_line.to_owned(),
            body: body.trim().to_owned(),
        }
        .into());
    }
    let header = |name: &str| {
        head.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    };
    if transport == Transport::Ws && header("sec-websocket-accept") != Some(ws::accept_key(WS_KEY))
    {
        return Err(
            ConnectError::Handshake("101 without the right Sec-WebSocket-Accept".into()).into(),
        );
    }
    let chunked = transport == Transport::Sse
        && header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
    let rest = buf.split_off(head_end);
    let mut conn = Conn {
        stream,
        transport,
        pending: Vec::new(),
        ws: ws::WsReader::default(),
        hello: Hello::default(),
        closing: false,
        raw: false,
        chunked: chunked.then(Vec::new),
    };
    conn.take_bytes(&rest)?;
    Ok(conn)
}

/// The HTTP request that opens a connection. The token travels in `Authorization`, the
/// header every non-browser client can set.
fn request(server: SocketAddr, transport: Transport, token: &str, since: Option<u64>) -> String {
    match transport {
        Transport::Ws => {
            let query = since.map(|s| format!("?since={s}")).unwrap_or_default();
            format!(
                "GET /ws{query} HTTP/1.1\r\nHost: {server}\r\nUpgrade: websocket\r\n\
                 Connection: Upgrade\r\nSec-WebSocket-Key: {WS_KEY}\r\n\
                 Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {token}\r\n\r\n"
            )
        }
        Transport::Sse => {
            let resume = since
                .map(|s| format!("Last-Event-ID: {s}\r\n"))
                .unwrap_or_default();
            format!(
                "GET /sse HTTP/1.1\r\nHost: {server}\r\nAccept: text/event-stream\r\n\
                 {resume}Authorization: Bearer {token}\r\n\r\n"
            )
        }
    }
}

impl Conn {
    /// The next event. Cancel-safe: a partial frame stays in `self.pending`.
    pub async fn next_event(&mut self) -> Event {
        std::future::poll_fn(|cx| self.poll_event(cx)).await
    }

    /// [`Conn::next_event`] as a poll: it keeps no state outside `self` (the waker is
    /// registered with the socket), so a caller racing it in `select!` through `poll_fn`
    /// holds a reference, not a ~180-byte readiness future, per connection.
    pub fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Event> {
        loop {
            match self.parse_pending() {
                Ok(Some(ev)) => return Poll::Ready(ev),
                Ok(None) => {}
                Err(e) => return Poll::Ready(Event::Other(format!("protocol_error: {e}"))),
            }
            if self.pending.len() > MAX_PENDING {
                return Poll::Ready(Event::Closed(None));
            }
            if ready!(self.stream.poll_read_ready(cx)).is_err() {
                return Poll::Ready(Event::Closed(None));
            }
            // A scratch buffer on the stack: an idle connection keeps no read buffer.
            let mut buf = [0u8; 2048];
            match self.stream.try_read(&mut buf) {
                Ok(0) => return Poll::Ready(Event::Closed(None)),
                Ok(n) => {
                    if let Err(e) = self.take_bytes(&buf[..n]) {
                        return Poll::Ready(Event::Other(format!("protocol_error: {e}")));
                    }
                }
                // Readiness was cleared: the next `poll_read_ready` registers the waker.
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(_) => return Poll::Ready(Event::Closed(None)),
            }
        }
    }

    /// Appends bytes read from the socket to `pending`, decoding the chunked framing of a
    /// peer's response body if it has one.
    fn take_bytes(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        match &mut self.chunked {
            None => self.pending.extend_from_slice(bytes),
            Some(raw) => {
                raw.extend_from_slice(bytes);
                let used = dechunk(raw, &mut self.pending)?;
                raw.drain(..used);
                if raw.is_empty() {
                    *raw = Vec::new();
                }
            }
        }
        Ok(())
    }

    /// One complete event from the front of `pending`, if there is one.
    fn parse_pending(&mut self) -> anyhow::Result<Option<Event>> {
        let (event, used) = match self.transport {
            Transport::Ws => {
                let (event, used) = parse_ws(&mut self.ws, &self.pending)?;
                (event, used)
            }
            Transport::Sse => match parse_sse(&self.pending) {
                Some((event, used)) => (Some(event), used),
                None => (None, 0),
            },
        };
        self.pending.drain(..used);
        let Some(event) = event else {
            return Ok(None);
        };
        let event = if self.raw { raw_event(event) } else { event };
        if self.pending.is_empty() {
            // Give the allocation back: an idle client should hold no buffer.
            self.pending = Vec::new();
        }
        Ok(Some(event))
    }

    /// Answers a WebSocket ping.
    pub async fn pong(&mut self, payload: &[u8]) -> std::io::Result<()> {
        let frame = ws::encode_client_frame(true, ws::OpCode::Pong, payload, mask());
        self.stream.write_all(&frame).await
    }

    /// Sends `{"type":"ack","id":N}`; `Ok(false)` on SSE, which has no client → server
    /// channel.
    pub async fn ack(&mut self, id: u64) -> std::io::Result<bool> {
        if self.transport != Transport::Ws {
            return Ok(false);
        }
        let frame = ClientMessage::Ack { id }.ws_frame(mask());
        self.stream.write_all(&frame).await.map(|()| true)
    }

    /// Starts a client-initiated close: a close frame (WebSocket) or a shutdown (SSE). The
    /// caller keeps reading until [`Event::Closed`], so the server's last frames are seen
    /// and the client, not the server, ends up holding TIME_WAIT.
    pub async fn start_close(&mut self) {
        if self.closing {
            return;
        }
        self.closing = true;
        match self.transport {
            Transport::Ws => {
                let payload = ws::close_code::NORMAL.to_be_bytes();
                let frame = ws::encode_client_frame(true, ws::OpCode::Close, &payload, mask());
                let _ = self.stream.write_all(&frame).await;
            }
            Transport::Sse => {
                let _ = self.stream.shutdown().await;
            }
        }
    }
}

/// Decodes server frames at the front of `buf` until one completes a message: the event
/// (`None` until then) and the bytes used.
fn parse_ws(reader: &mut ws::WsReader, buf: &[u8]) -> anyhow::Result<(Option<Event>, usize)> {
    let (message, used) = reader.next_from_server(buf, MAX_PENDING)?;
    let event = message.map(|m| match m {
        ws::Message::Text(text) => text_event(&text),
        ws::Message::Close(code, _) => Event::Closed(Some(code.unwrap_or(ws::close_code::NORMAL))),
        ws::Message::Ping(payload) => Event::Ping(payload),
        ws::Message::Pong | ws::Message::Binary(_) => Event::Heartbeat,
    });
    Ok((event, used))
}

/// A WebSocket text message (or an SSE control event's data) → event.
fn text_event(text: &str) -> Event {
    match message::parse_server_message(text) {
        Ok(Received::Message { id, mid, data, .. }) => Event::Message { id, mid, data },
        Ok(Received::Reconnect { reason, .. }) => Event::Reconnect {
            reason: reason.as_str().to_owned(),
        },
        _ => Event::Other(text.to_owned()),
    }
}

/// A peer's event: its data is the payload, whatever the event's name or ID.
fn raw_event(ev: Event) -> Event {
    match ev {
        Event::Other(data) if !data.starts_with("protocol_error") => Event::Message {
            id: 0,
            mid: None,
            data,
        },
        Event::Reconnect { .. } => Event::Other("reconnect".into()),
        ev => ev,
    }
}

/// Decodes the complete chunks at the front of `raw` (`<hex size>[;ext]\r\n<data>\r\n`) into
/// `out`; returns how many bytes of `raw` it used. The last chunk (size 0) ends nothing
/// here: a stream that ends is seen as the socket closing.
fn dechunk(raw: &[u8], out: &mut Vec<u8>) -> anyhow::Result<usize> {
    let mut at = 0;
    loop {
        let Some(eol) = find(&raw[at..], b"\r\n") else {
            if raw.len() - at > 64 {
                bail!("chunk size line too long");
            }
            return Ok(at);
        };
        let line = std::str::from_utf8(&raw[at..at + eol]).context("chunk size not ASCII")?;
        let hex = line.split(';').next().unwrap_or_default().trim();
        let size =
            usize::from_str_radix(hex, 16).with_context(|| format!("bad chunk size `{hex}`"))?;
        let data = at + eol + 2;
        if raw.len() < data + size + 2 {
            return Ok(at);
        }
        out.extend_from_slice(&raw[data..data + size]);
        at = data + size + 2;
    }
}

/// Parses one SSE event (or heartbeat comment block) at the front of `buf`.
fn parse_sse(buf: &[u8]) -> Option<(Event, usize)> {
    let (event, used) = sse::parse_event(buf)?;
    if event.is_heartbeat() {
        return Some((Event::Heartbeat, used));
    }
    let ev = match Received::from_sse(&event) {
        Some(Received::Message { id, mid, data, .. }) => Event::Message { id, mid, data },
        Some(Received::Reconnect { reason, .. }) => Event::Reconnect {
            reason: reason.as_str().to_owned(),
        },
        _ => Event::Other(event.data),
    };
    Some((ev, used))
}

/// Appends what the socket has to `buf`; a closed socket or an oversized head is an error.
async fn read_some(stream: &mut TcpStream, buf: &mut Vec<u8>) -> anyhow::Result<()> {
    if buf.len() > MAX_HANDSHAKE {
        return Err(ConnectError::Handshake(format!(
            "handshake larger than {MAX_HANDSHAKE} bytes"
        ))
        .into());
    }
    let mut chunk = [0u8; 1024];
    let n = stream.read(&mut chunk).await?;
    if n == 0 {
        return Err(ConnectError::Closed(format!(
            "after: {}",
            String::from_utf8_lossy(buf).trim()
        ))
        .into());
    }
    buf.extend_from_slice(&chunk[..n]);
    Ok(())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One whole event from `buf`, by a fresh reader.
    fn ws_event(buf: &[u8]) -> anyhow::Result<Option<Event>> {
        Ok(parse_ws(&mut ws::WsReader::default(), buf)?.0)
    }

    #[test]
    fn parses_ws_frames_whole_or_not_at_all() {
        let payload = message::Payload::json(br#"{"s":3,"t":5}"#.to_vec().into()).unwrap();
        let frame = message::message_ws_frame(42, Some("m1"), None, &payload);
        assert!(ws_event(&frame[..frame.len() - 1]).unwrap().is_none());
        let (ev, used) = parse_ws(&mut ws::WsReader::default(), &frame).unwrap();
        let ev = ev.unwrap();
        assert_eq!(used, frame.len());
        assert_eq!(
            ev,
            Event::Message {
                id: 42,
                mid: Some("m1".into()),
                data: r#"{"s":3,"t":5}"#.into()
            }
        );
        let ping = ws::encode_frame(ws::OpCode::Ping, b"x");
        assert_eq!(
            ws_event(&ping).unwrap().unwrap(),
            Event::Ping(b"x".to_vec())
        );
        let close = ws::close_frame(4003, "late");
        assert_eq!(
            ws_event(&close).unwrap().unwrap(),
            Event::Closed(Some(4003))
        );
        let masked = ws::encode_client_frame(true, ws::OpCode::Text, b"x", mask());
        assert!(ws_event(&masked).is_err());
    }

    #[test]
    fn parses_sse_events_and_heartbeats() {
        let payload = message::Payload::json(br#"{"s":1,"t":2}"#.to_vec().into()).unwrap();
        let mut bytes = sse::HEARTBEAT.to_vec();
        bytes.extend_from_slice(&message::message_sse_event(7, &payload));
        let (ev, used) = parse_sse(&bytes).unwrap();
        assert_eq!(ev, Event::Heartbeat);
        let (ev, used2) = parse_sse(&bytes[used..]).unwrap();
        assert_eq!(used + used2, bytes.len());
        assert_eq!(
            ev,
            Event::Message {
                id: 7,
                mid: None,
                data: r#"{"s":1,"t":2}"#.into()
            }
        );
        let reconnect = message::ServerMessage::Reconnect {
            reason: message::ReconnectReason::Drain,
            grace_ms: 10,
        }
        .sse_event();
        assert_eq!(
            parse_sse(&reconnect).unwrap().0,
            Event::Reconnect {
                reason: "drain".into()
            }
        );
        assert!(parse_sse(b"id: 1\nevent: message\ndata: x\n").is_none());
    }

    #[test]
    fn dechunks_whole_chunks_only() {
        let mut out = Vec::new();
        let raw = b"5\r\n: hi\n\r\n19;x=y\r\nevent: message\ndata: {}\n\n\r\n3\r\nab";
        let used = dechunk(raw, &mut out).unwrap();
        assert_eq!(out, b": hi\nevent: message\ndata: {}\n\n");
        assert_eq!(&raw[used..], b"3\r\nab");
        assert!(dechunk(b"zz\r\n", &mut out).is_err());
    }

    #[test]
    fn a_peer_event_is_a_message_whatever_its_id() {
        let (ev, _) = parse_sse(b"id: 1795694168:0\ndata: {\"s\":1}\n\n").unwrap();
        assert_eq!(
            raw_event(ev),
            Event::Message {
                id: 0,
                mid: None,
                data: r#"{"s":1}"#.into()
            }
        );
        let ev = ws_event(&ws::encode_frame(ws::OpCode::Text, br#"{"s":2}"#))
            .unwrap()
            .unwrap();
        assert!(matches!(raw_event(ev), Event::Message { id: 0, .. }));
        assert_eq!(raw_event(Event::Heartbeat), Event::Heartbeat);
    }

    #[test]
    fn error_kinds_come_from_typed_errors() {
        let refused = |line: &str, body: &str| {
            error_kind(&anyhow::Error::new(ConnectError::Refused {
                status_line: line.into(),
                body: body.into(),
            }))
        };
        assert_eq!(
            refused(
                "HTTP/1.1 503 Service Unavailable",
                r#"{"error":"draining","message":"go elsewhere"}"#
            ),
            "http_503_draining"
        );
        assert_eq!(
            refused(
                "HTTP/1.1 429 Too Many Requests",
                r#"{"error":"too_many_pending"}"#
            ),
            "http_429_refused"
        );
        assert_eq!(
            refused("HTTP/1.1 404 Not Found", "<html>"),
            "http_404_refused"
        );
        let io = |kind| anyhow::Error::new(std::io::Error::from(kind)).context("connect a -> b");
        assert_eq!(
            error_kind(&io(ErrorKind::ConnectionRefused)),
            "connection_refused"
        );
        assert_eq!(
            error_kind(&io(ErrorKind::AddrNotAvailable)),
            "no_source_port"
        );
        let emfile = std::io::Error::from_raw_os_error(rustix::io::Errno::MFILE.raw_os_error());
        assert_eq!(
            error_kind(&anyhow::Error::new(emfile)),
            "too_many_open_files"
        );
        let late = anyhow::Error::new(ConnectError::Timeout {
            what: "hello",
            timeout: Duration::from_secs(1),
        });
        assert_eq!(error_kind(&late), "timeout");
        let first = anyhow::Error::new(ConnectError::HelloNotFirst("x".into()));
        assert!(is_hello_not_first(&first) && !is_hello_not_first(&late));
        assert_eq!(error_kind(&anyhow::anyhow!("Connection refused")), "other");
    }

    #[test]
    fn resume_travels_in_query_or_header() {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert!(request(addr, Transport::Ws, "t", Some(9)).starts_with("GET /ws?since=9 "));
        assert!(request(addr, Transport::Sse, "t", Some(9)).contains("Last-Event-ID: 9\r\n"));
        assert!(!request(addr, Transport::Sse, "t", None).contains("Last-Event-ID"));
    }
}
