//! push-server: the edge of the push platform. It holds one long-lived WebSocket or SSE
//! connection per client and writes a message to a user's connections the moment the admin
//! API or the message processor (through the internal deliver endpoint) asks.
//!
//! Layers, lowest first; a module uses only modules above it in this table (checked by
//! `tests/layers.rs`, which reads each module's `crate::` imports):
//!
//! | module | role |
//! |---|---|
//! | [`protocol`] | the wire, re-exported from the `push-proto` crate: HTTP request head, WebSocket frames, SSE events, client messages |
//! | [`auth`] | HS256 JWT verification and minting (re-exported from `push-proto`) |
//! | [`metrics`] | metric names, the Prometheus recorder, hot-path handles |
//! | [`lifecycle`] | pure policy with `now` passed in: lifetimes, heartbeats, drain slots |
//! | [`clock`] | the node's clock: milliseconds since start, the `now` the policy is given |
//! | [`drain`] | the drain state beside the policy: in progress since when, its deadline |
//! | [`ratelimit`] | per-IP connect token buckets (pure) |
//! | [`trace`] | the node's spans of one message: receive, then per connection queue, socket write, receipt |
//! | [`queue`] | each connection's bounded outbound queue and its [`queue::ConnHandle`] |
//! | [`hub`] | user → local connections, delivery to them (re-exports [`queue`]'s types) |
//! | [`config`] | one settings list → flags, `PUSH_*` environment, TOML file → [`Config`] (the registry as a [`config::Registry`]) |
//! | [`presence`] | keeps the registry (push-registry) in step with local connections |
//! | [`receipts`] | client acknowledgements → delivery receipts (waiters, Kafka) |
//! | [`forward`] | admin pushes for users held by other nodes, handed to those nodes |
//! | [`push`] | the push path ([`push::Pusher`]): append to the history for an ID, then queue, per user in order, then forward |
//! | [`sweeper`] | lifecycle checks over every connection: heartbeats, reconnects, closes, the drain |
//! | `state` | `Shared`: what the connection driver, listener and admin API share, below them |
//! | `connection` | one socket: handshake (pure admission, refusals, `/ack`, registration, resume), then the driver loop (I/O); idle connections parked without a task |
//! | `listener` | client port socket options and accept loop |
//! | `demo` | the `--demo` page on the admin port, built on `clients/js` |
//! | [`admin`] | admin HTTP on hyper, one module per route group: the parsed routes ([`admin::route`], pure), push, deliver, history, users, probes |
//! | [`server`] | wiring only: builds the parts, hands each its handle, [`Server::start`], drain, stop |
//! | `autobahn` | test-only (feature `autobahn-echo`): the echo node for the Autobahn suite |
//!
//! The client protocol is documented in `docs/protocol.md`.

pub mod admin;
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
pub mod queue;
pub mod ratelimit;
pub mod receipts;
pub mod server;
pub mod sweeper;
pub mod trace;

mod connection;
mod demo;
mod listener;
mod state;

pub use config::Config;
pub use server::Server;
