//! The client protocol: what the server sends to clients and what WebSocket clients send
//! back. Version 1, documented in `docs/protocol.md`.
//!
//! Every server message is encoded once and the bytes shared by all receivers: a push to a
//! user with three devices builds one WebSocket frame and (if needed) one SSE event.

use bytes::Bytes;
use serde::Serialize;
use serde_json::value::RawValue;

use super::{sse, ws};

/// Version of the client protocol, sent in `hello`.
pub const PROTOCOL_VERSION: u32 = 1;

/// The WebSocket subprotocol name clients may offer.
pub const SUBPROTOCOL: &str = "push.v1";

/// A message payload as the admin API received it.
#[derive(Debug, Clone)]
pub struct Payload {
    /// The payload bytes, UTF-8.
    pub bytes: Bytes,
    /// The bytes are a JSON document and are embedded as-is in WebSocket messages;
    /// otherwise they are embedded as a JSON string.
    pub is_json: bool,
}

impl Payload {
    /// A text payload. Fails if `bytes` is not UTF-8.
    pub fn text(bytes: Bytes) -> Result<Self, std::str::Utf8Error> {
        std::str::from_utf8(&bytes)?;
        Ok(Self {
            bytes,
            is_json: false,
        })
    }

    /// A JSON payload. Fails if `bytes` is not one JSON document.
    pub fn json(bytes: Bytes) -> Result<Self, serde_json::Error> {
        serde_json::from_slice::<&RawValue>(&bytes)?;
        Ok(Self {
            bytes,
            is_json: true,
        })
    }

    fn as_str(&self) -> &str {
        // Checked UTF-8 by both constructors.
        std::str::from_utf8(&self.bytes).unwrap_or_default()
    }
}

/// Why the server asks a client to reconnect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReconnectReason {
    /// The connection reached its (randomised) lifetime.
    Rotate,
    /// The node is draining before shutdown or deploy.
    Drain,
}

/// A control or data message to one client.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage<'a> {
    /// First message on every connection.
    Hello {
        /// Protocol version.
        version: u32,
        /// Connection ID, unique on this node.
        conn_id: u64,
        /// Node ID.
        node: &'a str,
        /// Authenticated user.
        user: &'a str,
        /// Device ID from the token, if any.
        #[serde(skip_serializing_if = "Option::is_none")]
        device: Option<&'a str>,
        /// When this connection will be asked to reconnect, in milliseconds from now.
        lifetime_ms: u64,
        /// Server heartbeat interval in milliseconds.
        heartbeat_ms: u64,
    },
    /// Open a new connection, then close this one, within `grace_ms`.
    Reconnect {
        /// Why.
        reason: ReconnectReason,
        /// How long the server waits before closing this connection itself.
        grace_ms: u64,
    },
    /// The history no longer holds every message after the client's resume point: the
    /// messages that follow start at `oldest`; those between `after` and `oldest` are lost to
    /// this client. `oldest` is null when the history could not be read at all (then no
    /// backlog follows, only live messages).
    Gap {
        /// The resume point the client asked for.
        after: u64,
        /// The oldest message ID still kept (or the next ID to be given).
        oldest: Option<u64>,
    },
    /// A client message could not be understood; the connection stays open.
    Error {
        /// A stable code, e.g. `bad_message`.
        code: &'a str,
        /// Human-readable detail.
        message: &'a str,
    },
}

impl ServerMessage<'_> {
    fn event_name(&self) -> &'static str {
        match self {
            Self::Hello { .. } => "hello",
            Self::Reconnect { .. } => "reconnect",
            Self::Gap { .. } => "gap",
            Self::Error { .. } => "error",
        }
    }

    /// The WebSocket text frame carrying this message as JSON.
    pub fn ws_frame(&self) -> Bytes {
        let json = serde_json::to_vec(self).expect("control messages serialize");
        ws::encode_frame(ws::OpCode::Text, &json)
    }

    /// The SSE event carrying this message: `event: <type>` and the JSON as data.
    pub fn sse_event(&self) -> Bytes {
        let json = serde_json::to_vec(self).expect("control messages serialize");
        sse::encode_event(self.event_name(), None, &json)
    }
}

/// The WebSocket frame for a data message: `{"type":"message","id":N,"data":…}`, with
/// `"mid":"…"` (the queue's message ID, the same on a redelivery) when there is one.
pub fn message_ws_frame(id: u64, mid: Option<&str>, payload: &Payload) -> Bytes {
    let data = if payload.is_json {
        payload.as_str().to_owned()
    } else {
        serde_json::to_string(payload.as_str()).expect("strings serialize")
    };
    let json = match mid {
        Some(mid) => {
            let mid = serde_json::to_string(mid).expect("strings serialize");
            format!(r#"{{"type":"message","id":{id},"mid":{mid},"data":{data}}}"#)
        }
        None => format!(r#"{{"type":"message","id":{id},"data":{data}}}"#),
    };
    ws::encode_frame(ws::OpCode::Text, json.as_bytes())
}

/// The SSE event for a data message: `id: N`, `event: message`, the payload as `data:`.
pub fn message_sse_event(id: u64, payload: &Payload) -> Bytes {
    sse::encode_event("message", Some(id), &payload.bytes)
}

/// A message from a WebSocket client.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMessage {
    /// The client has received and handled message `id` (exactly that one: acknowledge
    /// each message whose receipt matters). The node publishes a delivery receipt.
    Ack {
        /// The message ID.
        id: u64,
    },
    /// Application-level ping for clients that cannot send WebSocket pings (browsers).
    Ping,
}

/// Parses a client text message.
pub fn parse_client_message(text: &str) -> Result<ClientMessage, serde_json::Error> {
    serde_json::from_str(text)
}

/// The reply to an application-level `ping`.
pub fn pong_frame() -> Bytes {
    ws::encode_frame(ws::OpCode::Text, br#"{"type":"pong"}"#)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ws_text(frame: &Bytes) -> serde_json::Value {
        // Server frames with a short payload: 2-byte header; longer: 4-byte header.
        let start = if frame[1] == 126 { 4 } else { 2 };
        serde_json::from_slice(&frame[start..]).unwrap()
    }

    #[test]
    fn text_payload_is_a_json_string() {
        let p = Payload::text(Bytes::from_static(b"hello \"you\"")).unwrap();
        let v = ws_text(&message_ws_frame(3, None, &p));
        assert_eq!(
            v,
            serde_json::json!({"type":"message","id":3,"data":"hello \"you\""})
        );
    }

    #[test]
    fn json_payload_is_embedded() {
        let p = Payload::json(Bytes::from_static(br#"{"a":[1,2]}"#)).unwrap();
        let v = ws_text(&message_ws_frame(4, Some("m-1"), &p));
        assert_eq!(v["mid"], "m-1");
        assert_eq!(v["data"], serde_json::json!({"a":[1,2]}));
        assert!(Payload::json(Bytes::from_static(b"{nope")).is_err());
        assert!(Payload::json(Bytes::from_static(b"1 2")).is_err());
        assert!(Payload::text(Bytes::from_static(b"\xff")).is_err());
    }

    #[test]
    fn control_messages() {
        let hello = ServerMessage::Hello {
            version: PROTOCOL_VERSION,
            conn_id: 9,
            node: "n1",
            user: "u",
            device: None,
            lifetime_ms: 1000,
            heartbeat_ms: 30_000,
        };
        let v = ws_text(&hello.ws_frame());
        assert_eq!(v["type"], "hello");
        assert_eq!(v["conn_id"], 9);
        assert!(v.get("device").is_none());
        let rc = ServerMessage::Reconnect {
            reason: ReconnectReason::Drain,
            grace_ms: 5,
        };
        assert_eq!(
            &rc.sse_event()[..],
            b"event: reconnect\ndata: {\"type\":\"reconnect\",\"reason\":\"drain\",\"grace_ms\":5}\n\n"
        );
    }

    #[test]
    fn client_messages() {
        assert_eq!(
            parse_client_message(r#"{"type":"ack","id":5}"#).unwrap(),
            ClientMessage::Ack { id: 5 }
        );
        assert_eq!(
            parse_client_message(r#"{"type":"ping"}"#).unwrap(),
            ClientMessage::Ping
        );
        assert!(parse_client_message(r#"{"type":"nope"}"#).is_err());
        assert!(parse_client_message("nope").is_err());
    }
}
