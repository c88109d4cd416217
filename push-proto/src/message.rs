//! The client protocol: what the server sends to clients and what WebSocket clients send
//! back. Version 1, documented in `docs/protocol.md`.
//!
//! Every server message is encoded once and the bytes shared by all receivers: a push to a
//! user with three devices builds one WebSocket frame and (if needed) one SSE event.
//!
//! Both halves live here: the server encodes [`ServerMessage`] and data messages and parses
//! [`ClientMessage`]; a client parses what the server sent with [`parse_server_message`]
//! (WebSocket text) or [`Received::from_sse`] (an SSE event), and encodes its
//! [`ClientMessage`]s with [`ClientMessage::ws_frame`].

use bytes::Bytes;
use serde::{Deserialize, Serialize};
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

    /// The payload as one JSON value, as the deliver API carries it: the document itself
    /// for a JSON payload, a JSON string for a text payload (the inverse of
    /// [`DeliverItem::payload`](crate::api::DeliverItem::payload)).
    pub fn to_raw_json(&self) -> Box<RawValue> {
        let text = self.as_str();
        if self.is_json {
            if let Ok(raw) = RawValue::from_string(text.to_owned()) {
                return raw;
            }
            // Only a hand-built `Payload` (the fields are public) gets here; its bytes are
            // sent as text rather than as broken JSON.
        }
        serde_json::value::to_raw_value(text).expect("strings serialize")
    }
}

/// Why the server asks a client to reconnect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReconnectReason {
    /// The connection reached its (randomised) lifetime.
    Rotate,
    /// The node is draining before shutdown or deploy.
    Drain,
}

impl ReconnectReason {
    /// The name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rotate => "rotate",
            Self::Drain => "drain",
        }
    }
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
/// `"mid":"…"` (the queue's message ID, the same on a redelivery) when there is one and
/// `"traceparent":"…"` (W3C Trace Context of the node's span, so the client can report its
/// own receive span) when the push was traced. Clients ignore fields they do not know.
pub fn message_ws_frame(
    id: u64,
    mid: Option<&str>,
    traceparent: Option<&str>,
    payload: &Payload,
) -> Bytes {
    use std::fmt::Write as _;
    let data = if payload.is_json {
        payload.as_str().to_owned()
    } else {
        serde_json::to_string(payload.as_str()).expect("strings serialize")
    };
    let mut json = format!(r#"{{"type":"message","id":{id}"#);
    for (name, value) in [("mid", mid), ("traceparent", traceparent)] {
        if let Some(v) = value {
            let v = serde_json::to_string(v).expect("strings serialize");
            let _ = write!(json, r#","{name}":{v}"#);
        }
    }
    let _ = write!(json, r#","data":{data}}}"#);
    ws::encode_frame(ws::OpCode::Text, json.as_bytes())
}

/// The SSE event for a data message: `id: N`, `event: message`, the payload as `data:`.
pub fn message_sse_event(id: u64, payload: &Payload) -> Bytes {
    message_sse_event_traced(id, None, payload)
}

/// [`message_sse_event`] with the message's W3C `traceparent` as a `traceparent:` field
/// (`EventSource` ignores it; a client that parses the stream reads it). A value with a line
/// break is left out.
pub fn message_sse_event_traced(id: u64, traceparent: Option<&str>, payload: &Payload) -> Bytes {
    match traceparent {
        Some(tp) => {
            sse::encode_event_with("message", Some(id), &[("traceparent", tp)], &payload.bytes)
        }
        None => sse::encode_event("message", Some(id), &payload.bytes),
    }
}

/// A message from a WebSocket client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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

impl ClientMessage {
    /// The message as JSON text, e.g. `{"type":"ack","id":5}`.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("client messages serialize")
    }

    /// The masked WebSocket text frame a client sends (RFC 6455 5.3: every client frame is
    /// masked; the caller picks the key).
    pub fn ws_frame(&self, mask: [u8; 4]) -> Vec<u8> {
        ws::encode_client_frame(true, ws::OpCode::Text, self.to_json().as_bytes(), mask)
    }
}

/// The `hello` that opens every connection, as a client reads it (the server writes it
/// from [`ServerMessage::Hello`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Hello {
    /// Protocol version.
    #[serde(default)]
    pub version: u32,
    /// Connection ID on its node.
    pub conn_id: u64,
    /// Node ID.
    pub node: String,
    /// Authenticated user.
    #[serde(default)]
    pub user: String,
    /// Device ID from the token, if any.
    #[serde(default)]
    pub device: Option<String>,
    /// When the server will ask this connection to reconnect, ms from now.
    #[serde(default)]
    pub lifetime_ms: u64,
    /// The server's heartbeat interval, ms.
    #[serde(default)]
    pub heartbeat_ms: u64,
}

/// A server message as a client reads it.
///
/// The control messages deserialize tagged by `type`; a data message is read apart by
/// [`parse_server_message`] (its `data` is raw JSON, which serde cannot buffer inside a
/// tagged enum).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Received {
    /// The first message of a connection.
    Hello(Hello),
    /// A push.
    #[serde(skip_deserializing)]
    Message {
        /// Per-user increasing ID.
        id: u64,
        /// The queue's message ID (push-lib envelope), if it came that way (WebSocket only).
        mid: Option<String>,
        /// W3C `traceparent` of the push, when it was traced (WebSocket only).
        traceparent: Option<String>,
        /// The payload: JSON text on WebSocket (a JSON string for a text payload), the
        /// payload itself on SSE (`data:` lines joined with `\n`).
        data: String,
    },
    /// Open a new connection, then close this one, within `grace_ms`.
    Reconnect {
        /// Why.
        reason: ReconnectReason,
        /// How long the server waits before closing this connection itself.
        #[serde(default)]
        grace_ms: u64,
    },
    /// The history lost messages after the client's resume point ([`ServerMessage::Gap`]).
    Gap {
        /// The resume point the client asked for.
        after: u64,
        /// The oldest message ID still kept, if the history could be read.
        oldest: Option<u64>,
    },
    /// The server could not understand a client message.
    Error {
        /// A stable code, e.g. `bad_message`.
        code: String,
        /// Human-readable detail.
        message: String,
    },
    /// The answer to an application-level `ping`.
    Pong,
}

/// Parses a server message from a WebSocket text frame (or an SSE control event's data).
pub fn parse_server_message(text: &str) -> Result<Received, serde_json::Error> {
    #[derive(Deserialize)]
    struct Data<'a> {
        #[serde(rename = "type", borrow)]
        kind: std::borrow::Cow<'a, str>,
        #[serde(default)]
        id: Option<u64>,
        #[serde(default)]
        mid: Option<String>,
        #[serde(default)]
        traceparent: Option<String>,
        #[serde(default, borrow)]
        data: Option<&'a RawValue>,
    }
    let flat: Data<'_> = serde_json::from_str(text)?;
    if flat.kind == "message" {
        let id = flat
            .id
            .ok_or_else(|| serde::de::Error::missing_field("id"))?;
        return Ok(Received::Message {
            id,
            mid: flat.mid,
            traceparent: flat.traceparent,
            data: flat.data.map(|d| d.get().to_owned()).unwrap_or_default(),
        });
    }
    serde_json::from_str(text)
}

impl Received {
    /// The server message an SSE event carries: `message` events (and unnamed events with
    /// a numeric `id:`, as `EventSource` reads them) are data messages whose data is the
    /// payload itself; other events carry a control message as JSON. `None` for a
    /// heartbeat or an event that is not one of ours.
    pub fn from_sse(event: &sse::SseEvent) -> Option<Self> {
        let id = event.id.as_deref().and_then(|i| i.parse::<u64>().ok());
        match (event.event.as_deref(), id) {
            (Some("message") | None, Some(id)) => Some(Self::Message {
                id,
                mid: None,
                traceparent: event.traceparent.clone(),
                data: event.data.clone(),
            }),
            (Some(_), _) => parse_server_message(&event.data).ok(),
            (None, None) => None,
        }
    }
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
        let v = ws_text(&message_ws_frame(3, None, None, &p));
        assert_eq!(
            v,
            serde_json::json!({"type":"message","id":3,"data":"hello \"you\""})
        );
    }

    #[test]
    fn json_payload_is_embedded() {
        let p = Payload::json(Bytes::from_static(br#"{"a":[1,2]}"#)).unwrap();
        let v = ws_text(&message_ws_frame(4, Some("m-1"), None, &p));
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
    fn clients_read_what_the_server_writes() {
        let hello = ServerMessage::Hello {
            version: PROTOCOL_VERSION,
            conn_id: 9,
            node: "n1",
            user: "u",
            device: Some("d"),
            lifetime_ms: 1000,
            heartbeat_ms: 30_000,
        };
        let text = serde_json::to_string(&hello).unwrap();
        let Received::Hello(h) = parse_server_message(&text).unwrap() else {
            panic!("not a hello: {text}");
        };
        assert_eq!(
            (h.version, h.conn_id, h.node.as_str(), h.user.as_str()),
            (1, 9, "n1", "u")
        );
        assert_eq!(
            (h.device.as_deref(), h.lifetime_ms, h.heartbeat_ms),
            (Some("d"), 1000, 30_000)
        );

        let p = Payload::json(Bytes::from_static(br#"{"a":1}"#)).unwrap();
        let frame = message_ws_frame(4, Some("m"), None, &p);
        let text = std::str::from_utf8(&frame[2..]).unwrap();
        assert_eq!(
            parse_server_message(text).unwrap(),
            Received::Message {
                id: 4,
                mid: Some("m".into()),
                traceparent: None,
                data: r#"{"a":1}"#.into()
            }
        );
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let frame = message_ws_frame(5, None, Some(tp), &p);
        let text = std::str::from_utf8(&frame[2..]).unwrap();
        assert_eq!(
            text,
            format!(r#"{{"type":"message","id":5,"traceparent":"{tp}","data":{{"a":1}}}}"#)
        );
        assert_eq!(
            parse_server_message(text).unwrap(),
            Received::Message {
                id: 5,
                mid: None,
                traceparent: Some(tp.into()),
                data: r#"{"a":1}"#.into()
            }
        );
        for (msg, want) in [
            (
                ServerMessage::Reconnect {
                    reason: ReconnectReason::Rotate,
                    grace_ms: 7,
                },
                Received::Reconnect {
                    reason: ReconnectReason::Rotate,
                    grace_ms: 7,
                },
            ),
            (
                ServerMessage::Gap {
                    after: 2,
                    oldest: None,
                },
                Received::Gap {
                    after: 2,
                    oldest: None,
                },
            ),
            (
                ServerMessage::Error {
                    code: "bad_message",
                    message: "x",
                },
                Received::Error {
                    code: "bad_message".into(),
                    message: "x".into(),
                },
            ),
        ] {
            let text = serde_json::to_string(&msg).unwrap();
            assert_eq!(parse_server_message(&text).unwrap(), want);
            // The same message as an SSE event.
            let (event, _) = sse::parse_event(&msg.sse_event()).unwrap();
            assert_eq!(Received::from_sse(&event), Some(want));
        }
        let pong = pong_frame();
        let text = std::str::from_utf8(&pong[2..]).unwrap();
        assert_eq!(parse_server_message(text).unwrap(), Received::Pong);
        assert!(parse_server_message(r#"{"type":"message"}"#).is_err());
        assert!(parse_server_message(r#"{"type":"nope"}"#).is_err());

        let (event, _) = sse::parse_event(&message_sse_event(5, &p)).unwrap();
        assert_eq!(
            Received::from_sse(&event),
            Some(Received::Message {
                id: 5,
                mid: None,
                traceparent: None,
                data: r#"{"a":1}"#.into()
            })
        );
        // A traced message's SSE event carries its traceparent; one with a line break (a
        // forged field) is left out rather than splitting the event.
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let traced = message_sse_event_traced(6, Some(tp), &p);
        let (event, used) = sse::parse_event(&traced).unwrap();
        assert_eq!(used, traced.len(), "one event");
        assert_eq!(
            Received::from_sse(&event),
            Some(Received::Message {
                id: 6,
                mid: None,
                traceparent: Some(tp.into()),
                data: r#"{"a":1}"#.into()
            })
        );
        let forged = message_sse_event_traced(7, Some("x\n\nevent: gap\ndata: {}"), &p);
        let (event, used) = sse::parse_event(&forged).unwrap();
        assert_eq!(used, forged.len(), "still one event");
        assert_eq!((event.traceparent, event.id.as_deref()), (None, Some("7")));
        let (heartbeat, _) = sse::parse_event(sse::HEARTBEAT).unwrap();
        assert_eq!(Received::from_sse(&heartbeat), None);
    }

    #[test]
    fn the_server_reads_what_clients_write() {
        let ack = ClientMessage::Ack { id: 5 };
        assert_eq!(ack.to_json(), r#"{"type":"ack","id":5}"#);
        let mut reader = ws::WsReader::default();
        let mut got = Vec::new();
        reader
            .feed(&ack.ws_frame([9, 8, 7, 6]), 1024, |m| got.push(m))
            .unwrap();
        let [ws::Message::Text(text)] = &got[..] else {
            panic!("{got:?}");
        };
        assert_eq!(parse_client_message(text).unwrap(), ack);
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
