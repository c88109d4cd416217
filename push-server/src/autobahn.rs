//! Test-only (feature `autobahn-echo`): a node that echoes WebSocket data messages, for the
//! Autobahn conformance suite (`wstest -m fuzzingclient`, docs/security.md).
//!
//! Why a mode of the real node rather than a separate echo server: the suite must judge the
//! codec and the connection driver that production runs. Only two things differ, both in
//! `connection/` behind `Config::echo`: text and binary messages are sent back instead of
//! being read as the client protocol, and no `hello` precedes them. Authentication, the
//! handshake checks, queues and the close handshake are the production ones.

use std::net::SocketAddr;
use std::time::Duration;

use crate::Config;

/// Largest message the suite sends: case 9.1.6 and 9.2.6 are 16 MiB.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// An echo node on `listen` (client port; the admin port takes any free port on 127.0.0.1),
/// with limits that fit the suite.
pub fn echo_config(listen: SocketAddr, secret: &str) -> Config {
    let mut cfg = Config::local_test(secret);
    cfg.listen = listen;
    cfg.node_id = "autobahn-echo".into();
    cfg.echo = true;
    // Case 9 sends messages of up to 16 MiB and bursts of 1,000 messages; the echo must
    // hold a whole message and queue a burst of echoes for a client that reads them later.
    cfg.max_message_bytes = MAX_MESSAGE_BYTES + 1024;
    cfg.max_queue = 100_000;
    cfg.max_queue_bytes = 4 * MAX_MESSAGE_BYTES;
    // No ping or rotation may land inside a case: the suite counts every frame it gets.
    cfg.lifecycle.heartbeat_interval = Duration::from_secs(3600);
    cfg.lifecycle.heartbeat_timeout = Duration::from_secs(7200);
    cfg.lifecycle.lifetime = Duration::from_secs(24 * 3600);
    cfg.lifecycle.lifetime_jitter = 0.0;
    cfg.registry = crate::config::Registry::None;
    cfg
}
