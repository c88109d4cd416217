//! A tiny HTTP/1.1 client for the server's admin port: one `GET`, `Connection: close`.
//! The admin port answers small, complete bodies, so this is all the bench needs.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context as _};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long one admin request may take; the admin port answers in milliseconds.
const TIMEOUT: Duration = Duration::from_secs(5);

/// `GET path` on `addr`: the status code and the body.
pub async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    tokio::time::timeout(TIMEOUT, get_inner(addr, path))
        .await
        .with_context(|| format!("GET http://{addr}{path} took longer than {TIMEOUT:?}"))?
}

async fn get_inner(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    let text = String::from_utf8_lossy(&raw);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!("incomplete HTTP response from {addr}{path}");
    };
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line from {addr}{path}"))?;
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_owned()
    };
    Ok((status, body))
}

fn dechunk(mut body: &str) -> anyhow::Result<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").context("bad chunked body")?;
        let size = usize::from_str_radix(size.trim(), 16).context("bad chunk size")?;
        if size == 0 {
            return Ok(out);
        }
        out.push_str(rest.get(..size).context("short chunk")?);
        body = rest.get(size + 2..).context("short chunk")?;
    }
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

    #[test]
    fn dechunks() {
        assert_eq!(
            dechunk("3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n").unwrap(),
            "abcde"
        );
    }
}
