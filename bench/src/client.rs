//! A minimal push client on raw TCP, small enough that 15,000 of them fit in one process:
//! a hand-written request, the response head, the `hello`, then idle reads that answer
//! WebSocket pings. No client library, so the client's own buffers stay small.

use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{bail, Context as _};
use push_server::protocol::{sse, ws};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// The transport a client uses: push-server's own, with its metric labels.
pub use push_server::hub::Transport;

/// Any valid key will do (16 bytes, base64): the bench checks the server's answer to it.
const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// Largest response head plus hello accepted; the server's are a few hundred bytes.
const MAX_HANDSHAKE: usize = 16 * 1024;

/// A connection that has its `hello`.
#[derive(Debug)]
pub struct Conn {
    stream: TcpStream,
    transport: Transport,
    /// WebSocket bytes after the hello (the start of the next frame, if any).
    pending: Vec<u8>,
}

/// How a held connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The server closed TCP.
    Eof,
    /// The server sent a WebSocket close frame with this code.
    CloseFrame(Option<u16>),
    /// A read or write failed, or the server broke the protocol.
    Error,
}

/// Connects from `source` (port chosen by the kernel) to `server`, sends the request with
/// `token`, and waits for the `hello`.
pub async fn open(
    source: IpAddr,
    server: SocketAddr,
    transport: Transport,
    token: &str,
) -> anyhow::Result<Conn> {
    let request = match transport {
        Transport::Ws => format!(
            "GET /ws HTTP/1.1\r\nHost: {server}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n\
             Authorization: Bearer {token}\r\n\r\n"
        ),
        Transport::Sse => format!(
            "GET /sse HTTP/1.1\r\nHost: {server}\r\nAccept: text/event-stream\r\n\
             Authorization: Bearer {token}\r\n\r\n"
        ),
    };
    let (mut stream, mut rest) = handshake(source, server, transport, &request).await?;
    match transport {
        Transport::Ws => {
            // The first frame is the hello (a text frame); read until it is whole.
            loop {
                if let Some(frame) = parse_server_frame(&rest)? {
                    if frame.opcode != 0x1 || !is_hello(&rest[frame.payload.clone()]) {
                        bail!("first frame is not the hello");
                    }
                    rest.drain(..frame.len);
                    break;
                }
                read_some(&mut stream, &mut rest).await?;
            }
        }
        Transport::Sse => loop {
            // `event: hello` then `data: {...}` then a blank line.
            if let Some(end) = find(&rest, b"\n\n") {
                if !is_hello(&rest[..end]) {
                    bail!("first event is not the hello");
                }
                rest.clear();
                break;
            }
            read_some(&mut stream, &mut rest).await?;
        },
    }
    rest.shrink_to_fit();
    Ok(Conn {
        stream,
        transport,
        pending: rest,
    })
}

/// A subscriber of a peer (Nchan, Pushpin): a plain `GET path` with no token, SSE
/// (`Accept: text/event-stream`) or a WebSocket upgrade. Open once the response head is
/// `200` (SSE) or `101` with the right `Sec-WebSocket-Accept`; there is no hello.
pub async fn open_raw(
    source: IpAddr,
    server: SocketAddr,
    transport: Transport,
    path: &str,
) -> anyhow::Result<Conn> {
    let request = match transport {
        Transport::Ws => format!(
            "GET {path} HTTP/1.1\r\nHost: {server}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ),
        Transport::Sse => {
            format!("GET {path} HTTP/1.1\r\nHost: {server}\r\nAccept: text/event-stream\r\n\r\n")
        }
    };
    let (stream, mut rest) = handshake(source, server, transport, &request).await?;
    if transport == Transport::Sse {
        // Whatever the peer sent after the head (padding, a comment) is read and dropped.
        rest = Vec::new();
    }
    rest.shrink_to_fit();
    Ok(Conn {
        stream,
        transport,
        pending: rest,
    })
}

/// Connects from `source` (port chosen by the kernel) to `server`, sends `request` and
/// reads the response head; checks the status (`101` and the accept key for WebSocket,
/// `200` for SSE). Returns the stream and the bytes that followed the head.
async fn handshake(
    source: IpAddr,
    server: SocketAddr,
    transport: Transport,
    request: &str,
) -> anyhow::Result<(TcpStream, Vec<u8>)> {
    let socket = match source {
        IpAddr::V4(_) => TcpSocket::new_v4()?,
        IpAddr::V6(_) => TcpSocket::new_v6()?,
    };
    // Binding before connect spreads clients over several source addresses: one address
    // has only ~28k ephemeral ports towards one server port.
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
        // Refusals carry a short JSON body saying why; show what arrived of it.
        let body = String::from_utf8_lossy(&buf[head_end..]);
        bail!("server answered `{status_line}`: {}", body.trim());
    }
    if transport == Transport::Ws {
        let accept = ws::accept_key(WS_KEY);
        let ok = head.lines().any(|l| {
            l.split_once(':').is_some_and(|(n, v)| {
                n.eq_ignore_ascii_case("sec-websocket-accept") && v.trim() == accept
            })
        });
        if !ok {
            bail!("101 without the right Sec-WebSocket-Accept");
        }
    }
    Ok((stream, buf.split_off(head_end)))
}

impl Conn {
    /// Holds the connection until the server ends it: reads and drops SSE heartbeats and
    /// events, answers WebSocket pings with pongs. Counts heartbeats seen (WebSocket pings,
    /// reads holding an SSE heartbeat comment) in `heartbeats`.
    pub async fn hold(self, heartbeats: &AtomicUsize) -> Ended {
        self.receive(heartbeats, |_| {}).await
    }

    /// Like [`hold`](Self::hold), and hands the payload of every WebSocket text frame after
    /// the hello (the `message` JSON) to `on_text`. SSE events are not parsed: they are read
    /// and dropped, as in `hold`.
    pub async fn receive(
        mut self,
        heartbeats: &AtomicUsize,
        mut on_text: impl FnMut(&[u8]),
    ) -> Ended {
        loop {
            if self.stream.readable().await.is_err() {
                return Ended::Error;
            }
            // The read buffer lives only in this block, not across an await, so it is not
            // part of the task's future: an idle client costs little in the hold process.
            {
                let mut buf = [0u8; 512];
                match self.stream.try_read(&mut buf) {
                    Ok(0) => return Ended::Eof,
                    // SSE heartbeats and events are read and dropped.
                    Ok(n) if self.transport == Transport::Sse => {
                        if find(&buf[..n], sse::HEARTBEAT).is_some() {
                            heartbeats.fetch_add(1, Ordering::Relaxed);
                        }
                        continue;
                    }
                    Ok(n) => self.pending.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => continue,
                    Err(_) => return Ended::Error,
                }
            }
            loop {
                let frame = match parse_server_frame(&self.pending) {
                    Ok(Some(f)) => f,
                    Ok(None) => break,
                    Err(_) => return Ended::Error,
                };
                let payload = &self.pending[frame.payload.clone()];
                match frame.opcode {
                    0x8 => {
                        let code = payload.get(..2).map(|c| u16::from_be_bytes([c[0], c[1]]));
                        return Ended::CloseFrame(code);
                    }
                    0x9 => {
                        heartbeats.fetch_add(1, Ordering::Relaxed);
                        let pong = ws::encode_client_frame(
                            true,
                            ws::OpCode::Pong,
                            payload,
                            [0x5a, 0x17, 0xc3, 0x01],
                        );
                        if self.stream.write_all(&pong).await.is_err() {
                            return Ended::Error;
                        }
                    }
                    0x1 => on_text(payload),
                    _ => {}
                }
                self.pending.drain(..frame.len);
            }
            if self.pending.is_empty() {
                self.pending = Vec::new();
            }
        }
    }
}

/// Appends what the socket has to `buf`; a closed socket or an oversized head is an error.
async fn read_some(stream: &mut TcpStream, buf: &mut Vec<u8>) -> anyhow::Result<()> {
    if buf.len() > MAX_HANDSHAKE {
        bail!("handshake larger than {MAX_HANDSHAKE} bytes");
    }
    let mut chunk = [0u8; 1024];
    let n = stream.read(&mut chunk).await?;
    if n == 0 {
        if buf.is_empty() {
            bail!("server closed the connection without answering");
        }
        bail!(
            "server closed the connection after: {}",
            String::from_utf8_lossy(buf).trim()
        );
    }
    buf.extend_from_slice(&chunk[..n]);
    Ok(())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn is_hello(bytes: &[u8]) -> bool {
    find(bytes, br#""type":"hello""#).is_some()
}

/// One unmasked server frame at the front of a buffer.
#[derive(Debug)]
struct ServerFrame {
    opcode: u8,
    payload: std::ops::Range<usize>,
    /// Bytes the frame takes in the buffer.
    len: usize,
}

/// Parses the frame at the front of `buf`; `Ok(None)` until it is complete.
fn parse_server_frame(buf: &[u8]) -> anyhow::Result<Option<ServerFrame>> {
    let [b0, b1, ..] = *buf else {
        return Ok(None);
    };
    if b1 & 0x80 != 0 {
        bail!("server frames must not be masked");
    }
    let (len, start) = match b1 & 0x7f {
        126 => match buf.get(2..4) {
            Some(b) => (usize::from(u16::from_be_bytes([b[0], b[1]])), 4),
            None => return Ok(None),
        },
        127 => match buf.get(2..10) {
            Some(b) => {
                let len = u64::from_be_bytes(b.try_into().expect("8 bytes"));
                (usize::try_from(len).context("frame too large")?, 10)
            }
            None => return Ok(None),
        },
        n => (usize::from(n), 2),
    };
    if buf.len() < start + len {
        return Ok(None);
    }
    Ok(Some(ServerFrame {
        opcode: b0 & 0x0f,
        payload: start..start + len,
        len: start + len,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_server_frames_whole_or_not_at_all() {
        let frame = ws::encode_frame(ws::OpCode::Ping, b"hb");
        assert!(parse_server_frame(&frame[..3]).unwrap().is_none());
        let f = parse_server_frame(&frame).unwrap().unwrap();
        assert_eq!(f.opcode, 0x9);
        assert_eq!(&frame[f.payload], b"hb");
        assert_eq!(f.len, frame.len());

        let big = ws::encode_frame(ws::OpCode::Text, &[b'x'; 300]);
        let f = parse_server_frame(&big).unwrap().unwrap();
        assert_eq!(f.payload.len(), 300);
        assert_eq!(f.len, big.len());
    }

    #[test]
    fn refuses_masked_server_frames() {
        let masked = ws::encode_client_frame(true, ws::OpCode::Text, b"x", [1, 2, 3, 4]);
        assert!(parse_server_frame(&masked).is_err());
    }
}
