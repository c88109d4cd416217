//! `GET /healthz`, `GET /readyz` and `GET /metrics`: open to kubelets and scrapers.

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Response, StatusCode};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;

use super::http::{json_response, Resp};

/// `GET /healthz`: 200 while the process serves.
pub(super) fn healthz() -> Resp {
    json_response(StatusCode::OK, json!({"status": "ok"}))
}

/// What readiness is decided on.
#[derive(Debug, Clone, Copy)]
pub(super) struct Readiness {
    /// Open connections (and reservations).
    pub open: usize,
    /// `--max-connections`.
    pub capacity: usize,
    pub at_capacity: bool,
    pub draining: bool,
}

/// `GET /readyz`: 200, or 503 when draining or at capacity, so that no new clients are sent.
pub(super) fn readyz(r: Readiness) -> Resp {
    let body = |status: &str| json!({"status": status, "open": r.open, "capacity": r.capacity});
    if r.draining {
        json_response(StatusCode::SERVICE_UNAVAILABLE, body("draining"))
    } else if r.at_capacity {
        json_response(StatusCode::SERVICE_UNAVAILABLE, body("at_capacity"))
    } else {
        json_response(StatusCode::OK, body("ready"))
    }
}

/// `GET /metrics`: Prometheus text format.
pub(super) fn metrics(prometheus: &PrometheusHandle) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(prometheus.render())));
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    r
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    async fn answer(r: Readiness) -> (StatusCode, serde_json::Value) {
        let resp = readyz(r);
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&body).unwrap())
    }

    #[tokio::test]
    async fn readiness() {
        let r = Readiness {
            open: 3,
            capacity: 10,
            at_capacity: false,
            draining: false,
        };
        let (status, body) = answer(r).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, json!({"status": "ready", "open": 3, "capacity": 10}));
        let full = Readiness {
            open: 10,
            at_capacity: true,
            ..r
        };
        let (status, body) = answer(full).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["status"], "at_capacity");
        let (status, body) = answer(Readiness {
            draining: true,
            ..full
        })
        .await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["status"], "draining");
    }
}
