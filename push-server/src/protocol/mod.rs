//! Sans-I/O protocol code: bytes and values in, bytes and values out. No sockets, no clocks.
//!
//! - [`http`]: the request head on the client port, and refusal responses.
//! - [`ws`]: the WebSocket handshake and frame codec.
//! - [`sse`]: Server-Sent Events encoding.
//! - [`message`]: the client protocol (hello, message, reconnect, ack) on both transports.

pub mod http;
pub mod message;
pub mod sse;
pub mod ws;
