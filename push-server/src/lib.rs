//! push-server: the edge of the push platform. It holds one long-lived WebSocket or SSE
//! connection per client and writes a message to a user's connections the moment the admin
//! API (or, later, the message processor) asks.
//!
//! Layers, lowest first; a layer never uses one above it:
//!
//! | module | role |
//! |---|---|
//! | [`protocol`] | sans-I/O: HTTP request head, WebSocket frames, SSE events, client messages |
//! | [`auth`] | HS256 JWT verification and minting |
//! | [`lifecycle`] | pure policy with `now` passed in: lifetimes, heartbeats, drain slots |
//! | [`ratelimit`] | per-IP connect token buckets (pure) |
//! | [`hub`] | user → local connections; each connection's bounded outbound queue |
//! | [`presence`] | keeps the registry (push-registry) in step with local connections |
//! | [`receipts`] | client acknowledgements → delivery receipts (waiters, Kafka) |
//! | [`forward`] | admin pushes for users held by other nodes, handed to those nodes |
//! | [`push`] | the push path: append to the history for an ID, then queue, per user in order |
//! | `connection` | one socket: handshake, then the driver loop (I/O) |
//! | `listener` | client port socket options and accept loop |
//! | [`admin_route`] | admin request target → route and who may call it (pure) |
//! | `admin` | admin HTTP on hyper: push API, metrics, probes |
//! | `demo` | the `--demo` page on the admin port, built on `clients/js` |
//! | [`server`] | wires the above: [`Server::start`], the sweeper, drain |
//! | [`config`] | flags, `PUSH_*` environment, TOML file → [`Config`] |
//! | [`metrics`] | metric names and the Prometheus recorder |
//! | `autobahn` | test-only (feature `autobahn-echo`): the echo node for the Autobahn suite |
//!
//! The client protocol is documented in `docs/protocol.md`.

pub mod admin_route;
pub mod auth;
#[cfg(feature = "autobahn-echo")]
pub mod autobahn;
pub mod clock;
pub mod config;
pub mod drain;
pub mod forward;
pub mod hub;
pub mod lifecycle;
pub mod metrics;
pub mod presence;
pub mod protocol;
pub mod push;
pub mod ratelimit;
pub mod receipts;
pub mod server;
pub mod sweeper;

mod admin;
mod connection;
mod demo;
mod listener;
mod state;

pub use config::Config;
pub use server::Server;
