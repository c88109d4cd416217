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

/// Sum of the series `selector` selects in a Prometheus text body: a metric's name (every
/// label set of it) or one whole series, `name{labels}`; 0 when there is none (no connection
/// of that transport yet, no message dead-lettered).
pub fn metric_sum(body: &str, selector: &str) -> f64 {
    body.lines()
        .filter(|l| {
            l.strip_prefix(selector)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_the_series_selected() {
        let body = "# TYPE push_connections_open gauge\n\
                    push_connections_open{transport=\"ws\"} 15000\n\
                    push_connections_open{transport=\"sse\"} 3\n\
                    msgproc_dead_lettered_total{reason=\"malformed\"} 2\n\
                    msgproc_dead_lettered_total{reason=\"undeliverable\"} 3\n\
                    msgproc_dead_lettered_total_other 7\n\
                    msgproc_stored_total 4\n";
        let ws = "push_connections_open{transport=\"ws\"}";
        assert_eq!(metric_sum(body, ws), 15000.0);
        assert_eq!(metric_sum(body, "push_connections_open"), 15003.0);
        assert_eq!(metric_sum(body, "msgproc_dead_lettered_total"), 5.0);
        assert_eq!(metric_sum(body, "msgproc_stored_total"), 4.0);
        assert_eq!(metric_sum("", ws), 0.0);
    }
}
