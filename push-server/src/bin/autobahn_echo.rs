//! Test-only echo node for the Autobahn suite (feature `autobahn-echo`):
//! `cargo run -p push-server --features autobahn-echo --bin autobahn-echo -- 127.0.0.1:9001`
//! prints the URL (with a token) to give `wstest -m fuzzingclient`, then serves until killed.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use push_server::autobahn::echo_config;
use push_server::Server;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let listen: SocketAddr = std::env::args()
        .nth(1)
        .as_deref()
        .unwrap_or("127.0.0.1:9001")
        .parse()
        .context("usage: autobahn-echo [LISTEN_ADDR]")?;
    let secret = format!("autobahn-{:032x}", rand::random::<u128>());
    let server = Server::start(echo_config(listen, &secret))
        .await
        .context("starting the echo node")?;
    let token = server.mint_token("autobahn", None, Duration::from_secs(24 * 3600));
    println!("ws://{}/ws?token={token}", server.client_addr());
    tokio::signal::ctrl_c()
        .await
        .context("waiting for ctrl-c")?;
    server.stop();
    Ok(())
}
