//! loadtest: a many-connection load generator and correctness checker for push-server.
//!
//! Layers, lowest first (docs/loadtest.md has the scenarios and flags):
//!
//! | module | role |
//! |---|---|
//! | [`conn`] | one raw WebSocket or SSE connection (the `push-client` crate's, re-exported) |
//! | [`stats`] | counters and HDR histograms; the mergeable [`stats::WorkerReport`] |
//! | [`client`] | one simulated user across reconnects: rotation, resume, acks, checks |
//! | [`worker`] | a set of clients in one process; the `worker` child line protocol |
//! | [`pusher`] | pushes at a fixed rate through the admin API over keep-alive HTTP |
//! | [`run`] | a whole run: workers, pusher, storm/drain, progress, the [`run::Report`] |

pub mod client;
pub use push_client::conn;
pub mod pusher;
pub mod run;
pub mod stats;
pub mod worker;
