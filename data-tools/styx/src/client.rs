//! The HTTP client of the `styx` CLI: one request, JSON in and out; a non-2xx answer becomes
//! an error carrying the server's `reason`.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

/// A failed request.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server could not be reached.
    #[error("cannot reach {url}: {source}")]
    Connect {
        /// The URL.
        url: String,
        /// Why.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The server answered with an error.
    #[error("{status}: {reason}")]
    Status {
        /// The HTTP status.
        status: u16,
        /// The server's `reason`.
        reason: String,
    },
}

/// A client of one Styx server.
#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    http: HyperClient<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
}

impl Client {
    /// `base` is like `http://127.0.0.1:8990`.
    pub fn new(base: &str) -> Client {
        Client {
            base: base.trim_end_matches('/').to_string(),
            http: HyperClient::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// Sends a request to `path` (under the base URL) and returns the JSON answer.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<(Bytes, &str)>,
    ) -> Result<Value, ClientError> {
        let url = format!("{}{}", self.base, path);
        let mut req = Request::builder().method(method).uri(&url);
        let body = match body {
            Some((b, ctype)) => {
                req = req.header("content-type", ctype);
                b
            }
            None => Bytes::new(),
        };
        let req = req
            .body(Full::new(body))
            .map_err(|e| ClientError::Connect {
                url: url.clone(),
                source: e.into(),
            })?;
        let resp = self
            .http
            .request(req)
            .await
            .map_err(|e| ClientError::Connect {
                url: url.clone(),
                source: e.into(),
            })?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| ClientError::Connect {
                url: url.clone(),
                source: e.into(),
            })?
            .to_bytes();
        let v: Value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
        if !status.is_success() {
            let reason = v["reason"]
                .as_str()
                .map(String::from)
                .unwrap_or_else(|| v.to_string());
            return Err(ClientError::Status {
                status: status.as_u16(),
                reason,
            });
        }
        Ok(v)
    }

    /// GET.
    pub async fn get(&self, path: &str) -> Result<Value, ClientError> {
        self.call(Method::GET, path, None).await
    }

    /// POST a JSON body.
    pub async fn post_json(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        self.call(
            Method::POST,
            path,
            Some((Bytes::from(body.to_string()), "application/json")),
        )
        .await
    }
}

/// The readable timeline of `styx events`: one line per event with time, event, state, exit
/// code and message.
pub fn timeline(events: &Value) -> String {
    let mut out = format!(
        "{:<24}  {:<16}  {:<10}  {:<4}  {}\n",
        "TIME", "EVENT", "STATE", "EXIT", "DETAIL"
    );
    for e in events["events"].as_array().into_iter().flatten() {
        let ev = &e["event"];
        let detail = ev["message"]
            .as_str()
            .map(String::from)
            .or_else(|| {
                ev["delay_millis"].as_u64().map(|ms| {
                    format!(
                        "retry in {}",
                        humantime::format_duration(std::time::Duration::from_millis(ms))
                    )
                })
            })
            .or_else(|| ev["execution_id"].as_str().map(String::from))
            .or_else(|| ev["trigger_id"].as_str().map(String::from))
            .unwrap_or_default();
        let exit = ev["exit_code"]
            .as_i64()
            .map(|c| c.to_string())
            .unwrap_or_default();
        out.push_str(&format!(
            "{:<24}  {:<16}  {:<10}  {:<4}  {}\n",
            e["timestamp"].as_str().unwrap_or(""),
            ev["@type"].as_str().unwrap_or(""),
            e["state"].as_str().unwrap_or(""),
            exit,
            detail
        ));
    }
    out
}
