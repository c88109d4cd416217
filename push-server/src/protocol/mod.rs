//! The wire, from [`push_proto`]: the server uses it under `crate::protocol::…` so the
//! paths inside push-server read as before the codecs moved to their own crate.
//!
//! - [`http`]: the request head on the client port, and refusal responses.
//! - [`ws`]: the WebSocket handshake and frame codec.
//! - [`sse`]: Server-Sent Events encoding.
//! - [`message`]: the client protocol (hello, message, reconnect, ack) on both transports.

pub use push_proto::{http, message, sse, ws};
