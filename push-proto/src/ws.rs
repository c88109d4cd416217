//! WebSocket (RFC 6455), both ends. Server half: the opening handshake, a decoder of
//! client frames ([`WsReader::feed`]) and an encoder of server frames ([`encode_frame`]).
//! Client half: an encoder of masked frames ([`encode_client_frame`]) and a decoder of
//! server frames that assembles fragmented messages ([`WsReader::next_from_server`]).
//! Both decoders share one frame parser and one message assembler; they differ only in
//! whether frames must be masked (client → server) or must not be (server → client).
//!
//! Why our own codec rather than tungstenite: an idle connection must cost well under 2 KiB
//! of RSS. tungstenite keeps a read buffer and a write buffer per connection (128 KiB by
//! default, 4 KiB at best before throughput suffers), which measured 4.1–7.6 KiB per idle
//! connection here (see docs/BENCHMARKS.md). This decoder keeps nothing while idle: the
//! driver reads into a per-worker scratch buffer and only a partial frame is copied into the
//! connection's own `WsReader::partial`. The codec is sans-I/O and fuzzed (`fuzz/`).

use base64::Engine as _;
use bytes::{BufMut, Bytes, BytesMut};
use sha1::{Digest, Sha1};

use crate::http::RequestHead;

/// The GUID of RFC 6455 section 1.3, appended to the client key before hashing.
const ACCEPT_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Frame opcodes (RFC 6455 section 5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpCode {
    /// Continuation of a fragmented message.
    Continuation,
    /// UTF-8 text.
    Text,
    /// Binary data.
    Binary,
    /// Close, with an optional code and reason.
    Close,
    /// Ping; must be answered with a pong carrying the same payload.
    Ping,
    /// Pong.
    Pong,
}

impl OpCode {
    fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            0x0 => Self::Continuation,
            0x1 => Self::Text,
            0x2 => Self::Binary,
            0x8 => Self::Close,
            0x9 => Self::Ping,
            0xA => Self::Pong,
            _ => return None,
        })
    }

    fn as_u8(self) -> u8 {
        match self {
            Self::Continuation => 0x0,
            Self::Text => 0x1,
            Self::Binary => 0x2,
            Self::Close => 0x8,
            Self::Ping => 0x9,
            Self::Pong => 0xA,
        }
    }

    fn is_control(self) -> bool {
        matches!(self, Self::Close | Self::Ping | Self::Pong)
    }
}

/// Close codes the server sends (RFC 6455 section 7.4, and 4000–4999 for this protocol).
pub mod close_code {
    /// Normal closure.
    pub const NORMAL: u16 = 1000;
    /// Going away: server shutting down or connection rotated.
    pub const GOING_AWAY: u16 = 1001;
    /// Protocol error.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// Data not consistent with the message type (bad UTF-8).
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// Policy violation.
    pub const POLICY: u16 = 1008;
    /// Frame or message too big.
    pub const TOO_BIG: u16 = 1009;
    /// Token rejected or expired while connected.
    pub const UNAUTHORIZED: u16 = 4001;
    /// A newer connection for the same user and device took over.
    pub const REPLACED: u16 = 4002;
    /// The client did not reconnect within the grace period after `reconnect`.
    pub const RECONNECT_TIMEOUT: u16 = 4003;
    /// The client did not read fast enough and its queue overflowed.
    pub const SLOW_CONSUMER: u16 = 4008;
    /// No pong or other frame from the client within the heartbeat timeout.
    pub const HEARTBEAT_TIMEOUT: u16 = 4009;
}

/// Why an upgrade request was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HandshakeError {
    /// Not a GET request.
    #[error("WebSocket upgrade must use GET")]
    Method,
    /// `Upgrade: websocket` or `Connection: upgrade` missing.
    #[error("missing `Upgrade: websocket` and `Connection: Upgrade` headers")]
    NotUpgrade,
    /// `Sec-WebSocket-Version` is not 13.
    #[error("unsupported WebSocket version (only 13)")]
    Version,
    /// `Sec-WebSocket-Key` missing or not 16 bytes of base64.
    #[error("missing or malformed Sec-WebSocket-Key")]
    Key,
}

/// Checks that `head` is a valid WebSocket upgrade and returns the `Sec-WebSocket-Accept` value.
pub fn check_upgrade(head: &RequestHead) -> Result<String, HandshakeError> {
    if head.method != "GET" {
        return Err(HandshakeError::Method);
    }
    if !RequestHead::header_has_token(head.upgrade.as_deref(), "websocket")
        || !RequestHead::header_has_token(head.connection.as_deref(), "upgrade")
    {
        return Err(HandshakeError::NotUpgrade);
    }
    if head.ws_version.as_deref() != Some("13") {
        return Err(HandshakeError::Version);
    }
    let key = head.ws_key.as_deref().ok_or(HandshakeError::Key)?;
    match base64::engine::general_purpose::STANDARD.decode(key) {
        Ok(raw) if raw.len() == 16 => Ok(accept_key(key)),
        _ => Err(HandshakeError::Key),
    }
}

/// `Sec-WebSocket-Accept` for a client key (RFC 6455 section 4.2.2).
pub fn accept_key(key: &str) -> String {
    let mut sha = Sha1::new();
    sha.update(key.as_bytes());
    sha.update(ACCEPT_GUID);
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

/// The `101 Switching Protocols` response.
pub fn upgrade_response(accept: &str, protocol: Option<&str>) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n"
    );
    if let Some(p) = protocol {
        out.push_str("Sec-WebSocket-Protocol: ");
        out.push_str(p);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    out.into_bytes()
}

/// A complete message or control frame from the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A text message (UTF-8 checked).
    Text(String),
    /// A binary message.
    Binary(Vec<u8>),
    /// A ping with its payload.
    Ping(Vec<u8>),
    /// A pong.
    Pong,
    /// A close frame: code (if any) and reason.
    Close(Option<u16>, String),
}

/// Why the client's bytes cannot be accepted. Each maps to a close code.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// A frame or assembled message is larger than the limit (close 1009).
    #[error("message of {len} bytes exceeds the limit of {limit}")]
    TooBig {
        /// Declared or accumulated length.
        len: u64,
        /// The limit.
        limit: usize,
    },
    /// Violates RFC 6455 framing (close 1002).
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    /// A text message or close reason that is not UTF-8 (close 1007).
    #[error("invalid UTF-8 in a text message")]
    Utf8,
}

impl FrameError {
    /// The close code that reports this error to the client.
    pub fn close_code(&self) -> u16 {
        match self {
            Self::TooBig { .. } => close_code::TOO_BIG,
            Self::Protocol(_) => close_code::PROTOCOL_ERROR,
            Self::Utf8 => close_code::INVALID_PAYLOAD,
        }
    }
}

/// Incremental reader of client frames.
///
/// Holds no buffer while idle: `partial` is empty and unallocated between frames. Feed it
/// any chunking of the byte stream; it yields the same messages.
#[derive(Debug, Default)]
pub struct WsReader {
    /// Bytes of an incomplete frame carried to the next read.
    partial: Vec<u8>,
    /// A fragmented message being assembled.
    fragments: Option<Fragments>,
}

/// A fragmented message being assembled.
#[derive(Debug)]
struct Fragments {
    opcode: OpCode,
    data: Vec<u8>,
    /// Text: how much of `data` is known to be valid UTF-8. Each fragment is checked as it
    /// arrives (RFC 6455 8.1 asks to fail fast), so only a code point split across fragments
    /// (at most 3 bytes) is looked at twice.
    checked: usize,
}

impl Fragments {
    /// Checks the text received so far: an error unless it is valid UTF-8 or a valid
    /// prefix of it (a code point cut at the end may be completed by the next fragment).
    fn check_text(&mut self) -> Result<(), FrameError> {
        if self.opcode != OpCode::Text {
            return Ok(());
        }
        match std::str::from_utf8(&self.data[self.checked..]) {
            Ok(_) => self.checked = self.data.len(),
            Err(e) if e.error_len().is_none() => self.checked += e.valid_up_to(),
            Err(_) => return Err(FrameError::Utf8),
        }
        Ok(())
    }
}

impl WsReader {
    /// Feeds bytes read from the socket, calling `on_message` for each complete message.
    /// `max_message` bounds both a single frame and an assembled message.
    ///
    /// After an error the reader must not be fed again: the connection is to be closed.
    pub fn feed(
        &mut self,
        data: &[u8],
        max_message: usize,
        mut on_message: impl FnMut(Message),
    ) -> Result<(), FrameError> {
        if self.partial.is_empty() {
            // Fast path: decode straight from the caller's (scratch) buffer and copy only
            // the unfinished tail.
            let used = self.decode_all(data, max_message, &mut on_message)?;
            if used < data.len() {
                self.partial.extend_from_slice(&data[used..]);
            }
        } else {
            let mut buf = std::mem::take(&mut self.partial);
            buf.extend_from_slice(data);
            let used = self.decode_all(&buf, max_message, &mut on_message)?;
            buf.drain(..used);
            if !buf.is_empty() {
                self.partial = buf;
            }
            // else: `buf` is dropped, releasing its capacity while idle.
        }
        Ok(())
    }

    /// No frame or fragmented message is under way: the reader holds nothing, and a
    /// fresh one would read the next bytes the same way.
    pub fn is_idle(&self) -> bool {
        self.partial.is_empty() && self.fragments.is_none()
    }

    /// Bytes held between reads (for metrics and tests).
    pub fn buffered(&self) -> usize {
        self.partial.capacity() + self.fragments.as_ref().map_or(0, |f| f.data.capacity())
    }

    fn decode_all(
        &mut self,
        mut data: &[u8],
        max_message: usize,
        on_message: &mut impl FnMut(Message),
    ) -> Result<usize, FrameError> {
        let total = data.len();
        while let Some((frame, used)) = decode(data, max_message, Role::Server)? {
            data = &data[used..];
            if let Some(message) = self.on_frame(frame, max_message)? {
                on_message(message);
            }
        }
        Ok(total - data.len())
    }

    /// Client half: decodes server frames from the front of `buf` until one completes a
    /// message. Returns the message (`None`: more bytes are needed) and how many bytes of
    /// `buf` were used; the caller drops those and keeps the rest for the next call.
    /// Fragments of a message are held in the reader between calls; control frames
    /// interleaved with them come out on their own.
    ///
    /// Server frames must not be masked (RFC 6455 5.1). `max_message` bounds a frame and
    /// an assembled message, as on the server side.
    pub fn next_from_server(
        &mut self,
        buf: &[u8],
        max_message: usize,
    ) -> Result<(Option<Message>, usize), FrameError> {
        let mut used = 0;
        while let Some((frame, n)) = decode(&buf[used..], max_message, Role::Client)? {
            used += n;
            if let Some(message) = self.on_frame(frame, max_message)? {
                return Ok((Some(message), used));
            }
        }
        Ok((None, used))
    }

    /// Applies one frame: a complete message, or `None` while a fragmented one is still
    /// being assembled.
    fn on_frame(
        &mut self,
        frame: Frame,
        max_message: usize,
    ) -> Result<Option<Message>, FrameError> {
        Ok(match frame.opcode {
            OpCode::Ping => Some(Message::Ping(frame.payload)),
            OpCode::Pong => Some(Message::Pong),
            OpCode::Close => Some(parse_close(&frame.payload)?),
            OpCode::Text | OpCode::Binary => {
                if self.fragments.is_some() {
                    return Err(FrameError::Protocol("new message inside a fragmented one"));
                }
                if frame.fin {
                    Some(finish(frame.opcode, frame.payload)?)
                } else {
                    let mut fragments = Fragments {
                        opcode: frame.opcode,
                        data: frame.payload,
                        checked: 0,
                    };
                    fragments.check_text()?;
                    self.fragments = Some(fragments);
                    None
                }
            }
            OpCode::Continuation => {
                let Some(fragments) = self.fragments.as_mut() else {
                    return Err(FrameError::Protocol("continuation without a message"));
                };
                let len = fragments.data.len() + frame.payload.len();
                if len > max_message {
                    return Err(FrameError::TooBig {
                        len: len as u64,
                        limit: max_message,
                    });
                }
                fragments.data.extend_from_slice(&frame.payload);
                if frame.fin {
                    // `finish` checks the whole text, including a code point left open.
                    let f = self.fragments.take().expect("checked above");
                    Some(finish(f.opcode, f.data)?)
                } else {
                    fragments.check_text()?;
                    None
                }
            }
        })
    }
}

fn finish(op: OpCode, data: Vec<u8>) -> Result<Message, FrameError> {
    Ok(match op {
        OpCode::Text => Message::Text(String::from_utf8(data).map_err(|_| FrameError::Utf8)?),
        _ => Message::Binary(data),
    })
}

fn parse_close(payload: &[u8]) -> Result<Message, FrameError> {
    match payload {
        [] => Ok(Message::Close(None, String::new())),
        [_] => Err(FrameError::Protocol("close payload of one byte")),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            // RFC 6455 7.4 and the IANA registry: 1004–1006 and 1015 are never sent on the
            // wire; 1012–1014 (service restart, try again later, bad gateway) are registered.
            let valid = matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999);
            if !valid {
                return Err(FrameError::Protocol("invalid close code"));
            }
            let reason = std::str::from_utf8(reason).map_err(|_| FrameError::Utf8)?;
            Ok(Message::Close(Some(code), reason.to_owned()))
        }
    }
}

/// One decoded (unmasked) frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Final fragment of its message.
    pub fin: bool,
    /// The opcode.
    pub opcode: OpCode,
    /// Unmasked payload.
    pub payload: Vec<u8>,
}

/// Decodes one client frame from the front of `buf`.
///
/// `Ok(None)` means more bytes are needed. Client frames must be masked and use no
/// extensions (none are negotiated); control frames must be final and at most 125 bytes.
/// A declared length above `max_payload` is refused before any payload is buffered, so a
/// peer cannot make the server hold more than `max_payload` bytes.
pub fn decode_frame(buf: &[u8], max_payload: usize) -> Result<Option<(Frame, usize)>, FrameError> {
    decode(buf, max_payload, Role::Server)
}

/// Decodes one server frame from the front of `buf`: the client half of [`decode_frame`],
/// with the same checks except that server frames must not be masked.
pub fn decode_server_frame(
    buf: &[u8],
    max_payload: usize,
) -> Result<Option<(Frame, usize)>, FrameError> {
    decode(buf, max_payload, Role::Client)
}

/// Which end decodes: the two differ only in the masking rule (RFC 6455 5.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Reads client frames: masked.
    Server,
    /// Reads server frames: not masked.
    Client,
}

fn decode(
    buf: &[u8],
    max_payload: usize,
    role: Role,
) -> Result<Option<(Frame, usize)>, FrameError> {
    let [b0, b1, ..] = *buf else {
        return Ok(None);
    };
    let fin = b0 & 0x80 != 0;
    if b0 & 0x70 != 0 {
        return Err(FrameError::Protocol(
            "reserved bits set without an extension",
        ));
    }
    let opcode = OpCode::from_u8(b0 & 0x0F).ok_or(FrameError::Protocol("unknown opcode"))?;
    let masked = b1 & 0x80 != 0;
    match role {
        Role::Server if !masked => {
            return Err(FrameError::Protocol("client frames must be masked"));
        }
        Role::Client if masked => {
            return Err(FrameError::Protocol("server frames must not be masked"));
        }
        _ => {}
    }
    let (len, mut pos) = match b1 & 0x7F {
        126 => match buf.get(2..4) {
            Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 4),
            None => return Ok(None),
        },
        127 => match buf.get(2..10) {
            // RFC 6455 5.2: the most significant bit must be 0. Malformed framing (1002),
            // checked before the size limit so it is not reported as a big message (1009).
            Some(b) if b[0] & 0x80 != 0 => {
                return Err(FrameError::Protocol("64-bit length with the top bit set"))
            }
            Some(b) => (u64::from_be_bytes(b.try_into().expect("8 bytes")), 10),
            None => return Ok(None),
        },
        n => (u64::from(n), 2),
    };
    if opcode.is_control() && (len > 125 || !fin) {
        return Err(FrameError::Protocol(
            "control frames must be final and at most 125 bytes",
        ));
    }
    if len > max_payload as u64 {
        return Err(FrameError::TooBig {
            len,
            limit: max_payload,
        });
    }
    let mask: [u8; 4] = if masked {
        let Some(mask) = buf.get(pos..pos + 4) else {
            return Ok(None);
        };
        pos += 4;
        mask.try_into().expect("4 bytes")
    } else {
        // XOR with zeros: the unmasked payload as it is.
        [0; 4]
    };
    let len = len as usize;
    let Some(body) = buf.get(pos..pos + len) else {
        return Ok(None);
    };
    let payload = body
        .iter()
        .enumerate()
        .map(|(i, b)| b ^ mask[i & 3])
        .collect();
    Ok(Some((
        Frame {
            fin,
            opcode,
            payload,
        },
        pos + len,
    )))
}

/// Encodes a final, unmasked server frame.
pub fn encode_frame(opcode: OpCode, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(payload.len() + 10);
    out.put_u8(0x80 | opcode.as_u8());
    match payload.len() {
        n @ 0..=125 => out.put_u8(n as u8),
        n @ 126..=0xFFFF => {
            out.put_u8(126);
            out.put_u16(n as u16);
        }
        n => {
            out.put_u8(127);
            out.put_u64(n as u64);
        }
    }
    out.put_slice(payload);
    out.freeze()
}

/// Encodes a close frame with a code and a reason (truncated to fit 125 bytes).
pub fn close_frame(code: u16, reason: &str) -> Bytes {
    let mut payload = Vec::with_capacity(2 + reason.len().min(123));
    payload.extend_from_slice(&code.to_be_bytes());
    let mut cut = reason.len().min(123);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    payload.extend_from_slice(&reason.as_bytes()[..cut]);
    encode_frame(OpCode::Close, &payload)
}

/// Encodes a masked client frame: the client half of [`encode_frame`]. Used by the load
/// generator, the bench, tests and the fuzzer's round trips; the server never masks.
pub fn encode_client_frame(fin: bool, opcode: OpCode, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(if fin { 0x80 } else { 0 } | opcode.as_u8());
    match payload.len() {
        n @ 0..=125 => out.push(0x80 | n as u8),
        n @ 126..=0xFFFF => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const MASK: [u8; 4] = [1, 2, 3, 4];

    fn read_all(chunks: &[&[u8]], max: usize) -> Result<Vec<Message>, FrameError> {
        let mut r = WsReader::default();
        let mut out = Vec::new();
        for c in chunks {
            r.feed(c, max, |m| out.push(m))?;
        }
        Ok(out)
    }

    #[test]
    fn the_client_half_reads_server_frames_and_fragments() {
        let mut wire = encode_frame(OpCode::Text, b"whole").to_vec();
        // A fragmented message (as other servers may send) with a ping in between.
        wire.extend(unmasked(false, OpCode::Text, "h\u{e9}".as_bytes()));
        wire.extend_from_slice(&encode_frame(OpCode::Ping, b"p"));
        wire.extend(unmasked(true, OpCode::Continuation, b"llo"));
        wire.extend_from_slice(&close_frame(close_code::REPLACED, "newer"));
        for split in 0..wire.len() {
            let mut r = WsReader::default();
            let mut pending = Vec::new();
            let mut got = Vec::new();
            for chunk in [&wire[..split], &wire[split..]] {
                pending.extend_from_slice(chunk);
                loop {
                    let (msg, used) = r.next_from_server(&pending, 1024).unwrap();
                    pending.drain(..used);
                    match msg {
                        Some(m) => got.push(m),
                        None => break,
                    }
                }
            }
            assert!(pending.is_empty(), "split at {split}");
            assert_eq!(
                got,
                vec![
                    Message::Text("whole".into()),
                    Message::Ping(b"p".to_vec()),
                    Message::Text("h\u{e9}llo".into()),
                    Message::Close(Some(close_code::REPLACED), "newer".into()),
                ],
                "split at {split}"
            );
        }
        // Masked frames are a client's, never a server's.
        let masked = encode_client_frame(true, OpCode::Text, b"x", MASK);
        assert!(decode_server_frame(&masked, 1024).is_err());
        assert!(decode_frame(&encode_frame(OpCode::Text, b"x"), 1024).is_err());
        let big = encode_frame(OpCode::Binary, &[0; 2000]);
        assert!(matches!(
            decode_server_frame(&big, 1024),
            Err(FrameError::TooBig { .. })
        ));
    }

    /// A server frame with the FIN bit as given (the server itself sends final frames only).
    fn unmasked(fin: bool, opcode: OpCode, payload: &[u8]) -> Vec<u8> {
        let mut f = encode_frame(opcode, payload).to_vec();
        if !fin {
            f[0] &= 0x7f;
        }
        f
    }

    #[test]
    fn accept_key_matches_the_rfc_example() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn decodes_across_any_split() {
        let mut wire = encode_client_frame(true, OpCode::Text, b"hello", MASK);
        wire.extend(encode_client_frame(true, OpCode::Ping, b"p", MASK));
        wire.extend(encode_client_frame(true, OpCode::Binary, &[7u8; 300], MASK));
        for split in 0..wire.len() {
            let msgs = read_all(&[&wire[..split], &wire[split..]], 1024).unwrap();
            assert_eq!(
                msgs,
                vec![
                    Message::Text("hello".into()),
                    Message::Ping(b"p".to_vec()),
                    Message::Binary(vec![7u8; 300])
                ],
                "split at {split}"
            );
        }
    }

    #[test]
    fn reader_keeps_no_buffer_between_whole_frames() {
        let mut r = WsReader::default();
        let wire = encode_client_frame(true, OpCode::Text, b"{\"type\":\"ack\"}", MASK);
        r.feed(&wire, 1024, |_| {}).unwrap();
        assert_eq!(r.buffered(), 0);
        r.feed(&wire[..3], 1024, |_| {}).unwrap();
        assert!(r.buffered() > 0);
        r.feed(&wire[3..], 1024, |_| {}).unwrap();
        assert_eq!(r.buffered(), 0);
    }

    #[test]
    fn a_reader_is_idle_only_between_whole_messages() {
        let mut r = WsReader::default();
        assert!(r.is_idle());
        let whole = encode_client_frame(true, OpCode::Text, b"hi", MASK);
        r.feed(&whole[..2], 1024, |_| {}).unwrap();
        assert!(!r.is_idle(), "half a frame is held");
        r.feed(&whole[2..], 1024, |_| {}).unwrap();
        assert!(r.is_idle());
        // An empty first fragment holds no bytes, but a message is under way.
        r.feed(
            &encode_client_frame(false, OpCode::Text, b"", MASK),
            1024,
            |_| {},
        )
        .unwrap();
        assert_eq!(r.buffered(), 0);
        assert!(!r.is_idle());
        let mut got = Vec::new();
        r.feed(
            &encode_client_frame(true, OpCode::Continuation, b"end", MASK),
            1024,
            |m| got.push(m),
        )
        .unwrap();
        assert_eq!(got, vec![Message::Text("end".into())]);
        assert!(r.is_idle());
    }

    #[test]
    fn assembles_fragments_with_interleaved_control_frames() {
        let mut wire = encode_client_frame(false, OpCode::Text, b"hel", MASK);
        wire.extend(encode_client_frame(true, OpCode::Ping, b"", MASK));
        wire.extend(encode_client_frame(true, OpCode::Continuation, b"lo", MASK));
        let msgs = read_all(&[&wire], 1024).unwrap();
        assert_eq!(
            msgs,
            vec![Message::Ping(vec![]), Message::Text("hello".into())]
        );
    }

    #[test]
    fn oversized_frame_is_refused_from_its_header() {
        let wire = encode_client_frame(true, OpCode::Binary, &[0u8; 2000], MASK);
        // Only the header has arrived: the declared length alone is enough to refuse.
        let err = read_all(&[&wire[..8]], 1024).unwrap_err();
        assert_eq!(err.close_code(), close_code::TOO_BIG);
    }

    #[test]
    fn oversized_assembled_message_is_refused() {
        let mut wire = encode_client_frame(false, OpCode::Binary, &[0u8; 600], MASK);
        wire.extend(encode_client_frame(
            true,
            OpCode::Continuation,
            &[0u8; 600],
            MASK,
        ));
        let err = read_all(&[&wire], 1024).unwrap_err();
        assert_eq!(
            err,
            FrameError::TooBig {
                len: 1200,
                limit: 1024
            }
        );
    }

    #[test]
    fn protocol_violations_are_errors() {
        let unmasked = [0x81, 0x01, b'a'];
        assert_eq!(
            read_all(&[&unmasked], 1024).unwrap_err().close_code(),
            close_code::PROTOCOL_ERROR
        );
        let rsv = encode_client_frame(true, OpCode::Text, b"a", MASK);
        let mut rsv = rsv.clone();
        rsv[0] |= 0x40;
        assert!(read_all(&[&rsv], 1024).is_err());
        let long_ping = encode_client_frame(true, OpCode::Ping, &[0u8; 126], MASK);
        assert!(read_all(&[&long_ping], 1024).is_err());
        let cont = encode_client_frame(true, OpCode::Continuation, b"x", MASK);
        assert!(read_all(&[&cont], 1024).is_err());
        let bad_utf8 = encode_client_frame(true, OpCode::Text, &[0xff, 0xfe], MASK);
        assert_eq!(read_all(&[&bad_utf8], 1024).unwrap_err(), FrameError::Utf8);
        let bad_close = encode_client_frame(true, OpCode::Close, &[0x03, 0xE8 + 4], MASK);
        assert!(read_all(&[&bad_close], 1024).is_err());
    }

    #[test]
    fn invalid_utf8_fails_at_the_fragment_that_carries_it() {
        // Autobahn 6.4.1/6.4.2: the message is not finished, yet it can never become valid.
        let mut wire = encode_client_frame(false, OpCode::Text, "κόσμε".as_bytes(), MASK);
        wire.extend(encode_client_frame(
            false,
            OpCode::Continuation,
            &[0xce, 0xbc, 0xf4, 0x90, 0x80, 0x80],
            MASK,
        ));
        assert_eq!(read_all(&[&wire], 1024).unwrap_err(), FrameError::Utf8);
        let first = encode_client_frame(false, OpCode::Text, &[b'a', 0xc0, 0xaf], MASK);
        assert_eq!(read_all(&[&first], 1024).unwrap_err(), FrameError::Utf8);
    }

    #[test]
    fn code_points_split_across_fragments_are_text() {
        // "€" is E2 82 AC; "😀" is F0 9F 98 80. Split them at every byte, one byte per frame.
        let text = "a€😀b";
        for cut in 0..=text.len() {
            let bytes = text.as_bytes();
            let mut wire = encode_client_frame(false, OpCode::Text, &bytes[..cut], MASK);
            for b in &bytes[cut..] {
                wire.extend(encode_client_frame(
                    false,
                    OpCode::Continuation,
                    &[*b],
                    MASK,
                ));
            }
            wire.extend(encode_client_frame(true, OpCode::Continuation, b"", MASK));
            assert_eq!(
                read_all(&[&wire], 1024).unwrap(),
                vec![Message::Text(text.into())],
                "cut at {cut}"
            );
        }
        // A code point still open when the message ends is invalid.
        let mut wire = encode_client_frame(false, OpCode::Text, &[0xe2, 0x82], MASK);
        wire.extend(encode_client_frame(true, OpCode::Continuation, b"", MASK));
        assert_eq!(read_all(&[&wire], 1024).unwrap_err(), FrameError::Utf8);
    }

    #[test]
    fn registered_close_codes_1012_to_1014_are_accepted() {
        for code in [1012u16, 1013, 1014] {
            let wire = encode_client_frame(true, OpCode::Close, &code.to_be_bytes(), MASK);
            assert_eq!(
                read_all(&[&wire], 1024).unwrap(),
                vec![Message::Close(Some(code), String::new())]
            );
        }
        // Reserved or not to be sent on the wire (RFC 6455 7.4.1, IANA registry).
        for code in [999u16, 1004, 1005, 1006, 1015, 1016, 2999, 5000] {
            let wire = encode_client_frame(true, OpCode::Close, &code.to_be_bytes(), MASK);
            assert_eq!(
                read_all(&[&wire], 1024).unwrap_err().close_code(),
                close_code::PROTOCOL_ERROR,
                "code {code}"
            );
        }
    }

    #[test]
    fn length_with_the_top_bit_set_is_a_protocol_error() {
        // RFC 6455 5.2: the most significant bit of a 64-bit length must be 0. This is
        // malformed framing (1002), not a big message (1009), whatever the limit.
        let mut wire = vec![0x82, 0x80 | 127];
        wire.extend_from_slice(&(u64::MAX - 1).to_be_bytes());
        wire.extend_from_slice(&MASK);
        assert_eq!(
            read_all(&[&wire], usize::MAX).unwrap_err().close_code(),
            close_code::PROTOCOL_ERROR
        );
        assert_eq!(
            read_all(&[&wire], 1024).unwrap_err().close_code(),
            close_code::PROTOCOL_ERROR
        );
    }

    #[test]
    fn close_frames_carry_code_and_reason() {
        let mut payload = 1000u16.to_be_bytes().to_vec();
        payload.extend_from_slice(b"bye");
        let wire = encode_client_frame(true, OpCode::Close, &payload, MASK);
        assert_eq!(
            read_all(&[&wire], 1024).unwrap(),
            vec![Message::Close(Some(1000), "bye".into())]
        );
    }

    #[test]
    fn server_frames_use_the_shortest_length_form() {
        assert_eq!(
            &encode_frame(OpCode::Text, b"hi")[..],
            &[0x81, 2, b'h', b'i']
        );
        let f = encode_frame(OpCode::Binary, &[0u8; 200]);
        assert_eq!(&f[..4], &[0x82, 126, 0, 200]);
        let f = encode_frame(OpCode::Binary, &vec![0u8; 70_000]);
        assert_eq!(f[1], 127);
        assert_eq!(f.len(), 70_000 + 10);
        let c = close_frame(4001, &"x".repeat(300));
        assert_eq!(c.len(), 2 + 125);
    }

    #[test]
    fn handshake_validation() {
        let mut head = RequestHead {
            method: "GET".into(),
            path: "/ws".into(),
            upgrade: Some("websocket".into()),
            connection: Some("Upgrade".into()),
            ws_version: Some("13".into()),
            ws_key: Some("dGhlIHNhbXBsZSBub25jZQ==".into()),
            ..Default::default()
        };
        assert_eq!(
            check_upgrade(&head).as_deref(),
            Ok("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
        );
        head.ws_version = Some("8".into());
        assert_eq!(check_upgrade(&head), Err(HandshakeError::Version));
        head.ws_version = Some("13".into());
        head.ws_key = Some("c2hvcnQ=".into());
        assert_eq!(check_upgrade(&head), Err(HandshakeError::Key));
        head.upgrade = None;
        assert_eq!(check_upgrade(&head), Err(HandshakeError::NotUpgrade));
    }
}
