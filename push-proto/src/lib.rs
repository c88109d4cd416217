//! push-proto: the push platform's wire, in one place. Everything both ends agree on, and
//! nothing else: no sockets, no clocks, no tokio (the shape of `quinn-proto`). Bytes and
//! values in, bytes and values out, so every codec is tested and fuzzed without I/O.
//!
//! push-server, push-lib, msg-processor, loadtest, bench, the test clients and the fuzz
//! targets all speak the protocol through this crate; none of them imports push-server for it.
//!
//! Modules, lowest first; a module uses only those above it in this table:
//!
//! | module | role |
//! |---|---|
//! | [`transport`] | [`Transport`]: `ws` or `sse`, one name in URLs, metrics, receipts and flags |
//! | [`http`] | the HTTP/1.1 request head (client port), refusal responses, percent-decoding |
//! | [`ws`] | WebSocket handshake and frame codec, both halves: server and client encoders and decoders |
//! | [`sse`] | Server-Sent Events: the server's encoder, a client's event parser |
//! | [`message`] | the client protocol (`hello`, `message`, `gap`, `reconnect`, `error`, `ack`, `ping`/`pong`), both directions |
//! | [`auth`] | token claims, where a request carries its token; HS256 mint/verify with feature `jwt` |
//! | [`api`] | what crates exchange: the deliver item and outcome, the delivery receipt |
//!
//! Features: `jwt` (token minting and verification, pulls in `jsonwebtoken`), `clap`
//! (`Transport` as a command-line value). The protocol is documented in `docs/protocol.md`.

pub mod api;
pub mod auth;
pub mod http;
pub mod message;
pub mod sse;
pub mod transport;
pub mod ws;

pub use transport::Transport;
