//! `redis-server` children for the scenarios: started on free ports without persistence, and
//! stopped when dropped ([`Tree`]), also when the scenario fails half-way.
//!
//! testkit does the same for tests, but blocking and panicking; a scenario runner wants
//! errors it can report and a child the async runtime reaps.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context as _};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::Command;

use crate::sys::{self, Tree};

/// How long a fresh `redis-server` has to answer `PING`; it usually takes a few milliseconds.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// One `redis-server` on `127.0.0.1:<port>`, stopped when dropped.
#[derive(Debug)]
pub struct RedisProc {
    tree: Tree,
    /// Its port on 127.0.0.1.
    pub port: u16,
}

impl RedisProc {
    /// Starts `redis-server --port P --save "" --appendonly no` on a free port (retrying on
    /// another port if one is taken between the probe and the bind).
    pub async fn start() -> anyhow::Result<Self> {
        let mut last_error = None;
        for _ in 0..5 {
            let port = sys::free_port()?;
            match Self::start_on(port).await {
                Ok(r) => return Ok(r),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.expect("five attempts")).context("redis-server did not start")
    }

    async fn start_on(port: u16) -> anyhow::Result<Self> {
        let mut tree = Tree::spawn(
            "redis-server",
            Command::new("redis-server")
                .arg("--port")
                .arg(port.to_string())
                .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .args(["--protected-mode", "no", "--daemonize", "no"])
                // No dump file is ever written (`--save ""`), but keep redis out of the cwd.
                .args(["--dir", "/tmp"])
                .stdout(Stdio::null())
                .stderr(Stdio::inherit()),
        )
        .context("is redis-server installed? (Debian: apt-get install -y redis-server)")?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let what = format!("answering PING on {addr}");
        tree.wait_ready(
            &what,
            START_TIMEOUT,
            || async move { ping(addr).await.is_ok() },
        )
        .await?;
        Ok(Self { tree, port })
    }

    /// Its process ID (for CPU readings).
    pub fn pid(&self) -> Option<u32> {
        Some(self.tree.pid)
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

/// Sends `PING` and expects `+PONG`.
async fn ping(addr: SocketAddr) -> anyhow::Result<()> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(b"PING\r\n").await?;
    let mut reply = [0u8; 7];
    stream.read_exact(&mut reply).await?;
    if &reply != b"+PONG\r\n" {
        bail!(
            "unexpected PING reply {:?}",
            String::from_utf8_lossy(&reply)
        );
    }
    Ok(())
}
