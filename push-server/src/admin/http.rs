//! What every admin handler shares: JSON answers, the refusal type ([`ApiError`]), and body
//! reads bounded in size and time.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Body;
use hyper::header::{HeaderMap, HeaderValue, CONTENT_TYPE};
use hyper::{Response, StatusCode};
use serde_json::json;

use crate::metrics as m;

/// Every admin answer: a complete body.
pub(super) type Resp = Response<Full<Bytes>>;

/// `body` as `application/json` with `status`, written straight from its type: answers on
/// the push path use their wire types, as building a `serde_json::Value` map per item costs
/// a measurable share of a batch's CPU.
pub(super) fn typed_json_response(status: StatusCode, body: &impl serde::Serialize) -> Resp {
    let bytes = serde_json::to_vec(body).expect("answers serialize");
    let mut r = Response::new(Full::new(Bytes::from(bytes)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// `body` as `application/json` with `status`.
pub(super) fn json_response(status: StatusCode, body: serde_json::Value) -> Resp {
    typed_json_response(status, &body)
}

/// `{"error": code, "message": …}` with `status`.
pub(super) fn error(status: StatusCode, code: &str, message: impl std::fmt::Display) -> Resp {
    json_response(
        status,
        json!({ "error": code, "message": message.to_string() }),
    )
}

/// A refusal on the admin API: small to return, made into a response at the edge.
#[derive(Debug)]
pub(super) struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    pub(super) fn new(
        status: StatusCode,
        code: &'static str,
        message: impl std::fmt::Display,
    ) -> Self {
        Self {
            status,
            code,
            message: message.to_string(),
        }
    }

    pub(super) fn into_response(self) -> Resp {
        let mut r = error(self.status, self.code, self.message);
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert("WWW-Authenticate", HeaderValue::from_static("Bearer"));
        }
        r
    }
}

/// A counted refusal (`push_admin_refused_total{reason}`).
pub(super) fn refuse(
    reason: &'static str,
    status: StatusCode,
    message: impl std::fmt::Display,
) -> ApiError {
    metrics::counter!(m::ADMIN_REFUSED, "reason" => reason).increment(1);
    ApiError::new(status, reason, message)
}

/// 503 when the history could not be read or written: nothing was sent, the caller retries.
pub(super) fn history_unavailable(e: push_registry::Error) -> Resp {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "history_unavailable",
        format!("message not accepted, nothing was sent (retry): {e}"),
    )
}

/// The bounds on a request body, from the node's settings.
#[derive(Debug, Clone, Copy)]
pub(super) struct BodyLimits {
    /// Largest message (`--max-message-bytes`): a single push's body; batches get a multiple.
    pub max_message_bytes: usize,
    /// Most time for the whole body to arrive (`--admin-body-timeout`).
    pub timeout: Duration,
}

/// Reads a body of at most `limit` bytes within `timeout`, or answers 413 / 408.
pub(super) async fn read_body<B>(
    body: B,
    limit: usize,
    timeout: Duration,
) -> Result<Bytes, ApiError>
where
    B: Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let read = Limited::new(body, limit).collect();
    let Ok(read) = tokio::time::timeout(timeout, read).await else {
        metrics::counter!(m::ADMIN_REFUSED, "reason" => "body_timeout").increment(1);
        return Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            format!("the body did not arrive within {timeout:?}"),
        ));
    };
    match read {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("body exceeds {limit} bytes"),
        )),
        Err(e) => Err(ApiError::new(StatusCode::BAD_REQUEST, "bad_body", e)),
    }
}

/// Whether the body is JSON (`application/json` or a `+json` type, any parameters).
pub(super) fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            let mime = v.split(';').next().unwrap_or("").trim();
            mime.eq_ignore_ascii_case("application/json") || mime.ends_with("+json")
        })
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http_body_util::StreamBody;
    use hyper::body::Frame;

    use super::*;

    fn status(r: Result<Bytes, ApiError>) -> StatusCode {
        r.map_or_else(|e| e.into_response().status(), |_| StatusCode::OK)
    }

    #[tokio::test]
    async fn bodies_are_bounded_in_size() {
        let t = Duration::from_secs(5);
        let body = || Full::new(Bytes::from_static(b"0123456789"));
        assert_eq!(read_body(body(), 10, t).await.unwrap(), "0123456789");
        assert_eq!(
            status(read_body(body(), 9, t).await),
            StatusCode::PAYLOAD_TOO_LARGE
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_never_ends_times_out() {
        let stalled = StreamBody::new(futures_util::stream::pending::<
            Result<Frame<Bytes>, Infallible>,
        >());
        let r = read_body(stalled, 10, Duration::from_secs(5)).await;
        assert_eq!(status(r), StatusCode::REQUEST_TIMEOUT);
    }

    #[test]
    fn json_content_types() {
        let with = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(CONTENT_TYPE, HeaderValue::from_static(v));
            is_json(&h)
        };
        assert!(with("application/json"));
        assert!(with("Application/JSON; charset=utf-8"));
        assert!(with("application/cloudevents+json"));
        assert!(!with("text/plain"));
        assert!(!is_json(&HeaderMap::new()));
    }

    #[test]
    fn unauthorized_answers_name_the_scheme() {
        let r = ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "x").into_response();
        assert_eq!(r.headers()["WWW-Authenticate"], "Bearer");
        assert_eq!(r.headers()[CONTENT_TYPE], "application/json");
    }
}
