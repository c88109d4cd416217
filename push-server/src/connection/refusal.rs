//! Refusals: the HTTP answer to a client that is not admitted, with a JSON error body, a
//! clear code and message, and the `push_connects_total` result it counts under. Built by
//! the pure admission checks, written by [`refuse`].

use std::time::Duration;

use tokio::net::TcpStream;

use super::io::{wait_eof, write_all};
use crate::metrics as m;
use crate::protocol::http;

/// A refusal: status, reason phrase, error code, message, extra headers.
#[derive(Debug)]
pub(super) struct Refusal {
    /// HTTP status.
    pub status: u16,
    /// HTTP reason phrase.
    pub phrase: &'static str,
    /// Error code in the body.
    pub code: &'static str,
    /// Error message in the body.
    pub message: String,
    /// Extra headers.
    pub headers: Vec<(&'static str, String)>,
    /// The `push_connects_total` result label.
    pub result: &'static str,
}

impl Refusal {
    /// A refusal counted under its `code`.
    pub fn new(
        status: u16,
        phrase: &'static str,
        code: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Self {
            status,
            phrase,
            code,
            message: message.into(),
            headers: Vec::new(),
            result: code,
        }
    }

    /// Adds a header.
    pub fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }
}

/// Writes a refusal and waits briefly for the client to close first.
pub(super) async fn refuse(stream: &TcpStream, r: Refusal) {
    metrics::counter!(m::CONNECTS, "result" => r.result).increment(1);
    let headers: Vec<(&str, &str)> = r.headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
    let resp = http::simple_response(
        r.status,
        r.phrase,
        &headers,
        &http::error_body(r.code, &r.message),
    );
    respond(stream, &resp).await;
}

/// Writes a complete `Connection: close` response and lets the client close first.
pub(super) async fn respond(stream: &TcpStream, resp: &[u8]) {
    if tokio::time::timeout(Duration::from_secs(1), write_all(stream, resp))
        .await
        .is_ok()
    {
        // `Connection: close` and a Content-Length: the client closes once it has read the
        // body, and keeps the TIME_WAIT. Bounded, so a client that stays does not hold us.
        let _ = tokio::time::timeout(Duration::from_secs(1), wait_eof(stream)).await;
    }
}
