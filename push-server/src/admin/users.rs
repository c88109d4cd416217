//! `GET /v1/users/{user}`: that user's connections on this node.

use hyper::StatusCode;
use serde_json::json;

use super::http::{json_response, Resp};
use crate::hub::Hub;

/// The user's connections in `hub`, with this node's ID (`node`).
pub(super) fn connections(user: &str, hub: &Hub, node: &str) -> Resp {
    let conns: Vec<_> = hub
        .connections(user)
        .iter()
        .map(|c| {
            let st = c.state();
            json!({
                "conn_id": c.id,
                "device": c.device.as_deref(),
                "transport": c.transport.as_str(),
                "remote": c.remote.to_string(),
                "connected_at_unix_ms": c.connected_at_unix_ms,
                "superseded": st.superseded,
                "asked_to_reconnect": st.clock.asked_at.is_some(),
                "queued": st.queued(),
            })
        })
        .collect();
    json_response(
        StatusCode::OK,
        json!({"user": user, "node": node, "connections": conns}),
    )
}
