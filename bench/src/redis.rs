//! `redis-server` children for the scenarios: testkit's [`RedisServer`] (a free port, no
//! persistence, killed when dropped, also when a scenario fails half-way), started off the
//! async runtime, and its pid read from Redis itself for the CPU readings.

use anyhow::{bail, Context as _};
use testkit::resp::Reply;
pub use testkit::RedisServer;

/// Starts a `redis-server` on a free port. testkit, built for tests, panics when it cannot;
/// the panic (its message is printed) comes back here as an error.
pub async fn start() -> anyhow::Result<RedisServer> {
    tokio::task::spawn_blocking(RedisServer::start)
        .await
        .context("redis-server did not start (Debian: apt-get install -y redis-server)")
}

/// The server's process ID (`process_id` of `INFO server`), for CPU readings.
pub fn pid(redis: &RedisServer) -> anyhow::Result<u32> {
    let info = match redis.try_command(&["INFO", "server"])? {
        Reply::Bulk(Some(text)) => text,
        other => bail!("unexpected reply to INFO: {other:?}"),
    };
    info.lines()
        .find_map(|l| l.strip_prefix("process_id:")?.trim().parse().ok())
        .context("no process_id in INFO server")
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn starts_and_names_its_process() {
        let redis = super::start().await.expect("redis-server starts");
        let pid = super::pid(&redis).expect("pid");
        assert_eq!(
            crate::sys::process_name(pid).as_deref(),
            Some("redis-server")
        );
    }
}
