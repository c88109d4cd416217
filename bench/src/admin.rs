//! A tiny HTTP/1.1 client for the server's admin port (and Nchan's status page): one `GET`,
//! `Connection: close`, read with loadtest's response reader. Both answer small, complete
//! bodies with a `Content-Length`, so this is all the bench needs.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// How long one admin request may take; the admin port answers in milliseconds.
const TIMEOUT: Duration = Duration::from_secs(5);

/// `GET path` on `addr`: the status code and the body.
pub async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let get = async {
        let mut stream = TcpStream::connect(addr).await?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let r = loadtest::pusher::read_response(&mut stream).await?;
        anyhow::Ok((r.status, String::from_utf8_lossy(&r.body).into_owned()))
    };
    tokio::time::timeout(TIMEOUT, get)
        .await
        .with_context(|| format!("GET http://{addr}{path} took longer than {TIMEOUT:?}"))?
}

/// The value of `push_connections_open{transport="<transport>"}` in a Prometheus text body;
/// `None` when the series is absent (no connection of that transport yet).
pub fn connections_open(metrics: &str, transport: &str) -> Option<f64> {
    let series = format!("push_connections_open{{transport=\"{transport}\"}}");
    metrics.lines().find_map(|l| {
        l.strip_prefix(&series)
            .filter(|rest| rest.starts_with(' '))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_gauge_of_one_transport() {
        let text = "# TYPE push_connections_open gauge\n\
                    push_connections_open{transport=\"ws\"} 15000\n\
                    push_connections_open{transport=\"sse\"} 3\n";
        assert_eq!(connections_open(text, "ws"), Some(15000.0));
        assert_eq!(connections_open(text, "sse"), Some(3.0));
        assert_eq!(connections_open("", "ws"), None);
    }
}
