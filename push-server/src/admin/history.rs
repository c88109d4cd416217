//! `GET /v1/history/{user}?since=ID`: what a client that last saw `since` would be sent.

use hyper::StatusCode;
use push_registry::MessageStore;
use serde_json::json;

use super::http::{error, json_response, ApiError, Resp};

/// Answers from `store`; `query` is the request's query string.
pub(super) async fn history(query: Option<&str>, user: &str, store: &dyn MessageStore) -> Resp {
    let since = match since(query) {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    match store.since(user, since).await {
        Ok(r) => json_response(
            StatusCode::OK,
            json!({"user": user, "since": since, "gap": r.gap, "messages": r.messages}),
        ),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, "history_unavailable", e),
    }
}

/// `since=ID` in the query (the first one); 0 (everything kept) without one.
fn since(query: Option<&str>) -> Result<u64, ApiError> {
    let since = query
        .and_then(|q| q.split('&').find_map(|p| p.strip_prefix("since=")))
        .map(str::parse::<u64>);
    match since {
        None => Ok(0),
        Some(Ok(s)) => Ok(s),
        Some(Err(_)) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_since",
            "since must be a message ID (an unsigned integer)",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_parameter() {
        assert_eq!(since(None).unwrap(), 0);
        assert_eq!(since(Some("x=1")).unwrap(), 0);
        assert_eq!(since(Some("x=1&since=42&since=7")).unwrap(), 42);
        for bad in ["since=", "since=-1", "since=abc"] {
            let e = since(Some(bad)).expect_err(bad).into_response();
            assert_eq!(e.status(), StatusCode::BAD_REQUEST, "{bad}");
        }
    }
}
