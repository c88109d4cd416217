//! A small HTTP/1 client (hyper) for webhooks and the Styx API, with a deadline per request.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;

/// A request gives up after this: a receiver or Styx that hangs must not hold a delivery
/// round or an `explain` for long.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Answers bigger than this are refused: Styx's event lists for one partition are small.
pub const MAX_RESPONSE_BYTES: usize = 4 * 1024 * 1024;

/// Plain-HTTP client (no TLS in this build: webhooks and Styx are reached inside the cluster,
/// or through a local proxy).
#[derive(Clone, Debug)]
pub struct HttpClient {
    inner: Client<HttpConnector, Full<Bytes>>,
}

impl Default for HttpClient {
    fn default() -> Self {
        HttpClient {
            inner: Client::builder(TokioExecutor::new()).build_http(),
        }
    }
}

impl HttpClient {
    async fn send(&self, req: hyper::Request<Full<Bytes>>) -> Result<(u16, Bytes), String> {
        let run = async {
            let resp = self.inner.request(req).await.map_err(|e| {
                let mut msg = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(s) = src {
                    msg = format!("{msg}: {s}");
                    src = s.source();
                }
                msg
            })?;
            let status = resp.status().as_u16();
            let body = http_body_util::Limited::new(resp.into_body(), MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map_err(|e| format!("reading the answer: {e}"))?
                .to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(REQUEST_TIMEOUT, run)
            .await
            .map_err(|_| format!("no answer within {REQUEST_TIMEOUT:?}"))?
    }

    /// POSTs JSON; the status code, or why there is none.
    pub async fn post_json(&self, url: &str, body: &serde_json::Value) -> Result<u16, String> {
        let req = hyper::Request::post(url)
            .header("content-type", "application/json")
            .header("user-agent", "datamon")
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| format!("bad URL {url:?}: {e}"))?;
        Ok(self.send(req).await?.0)
    }

    /// GETs a URL; status and body.
    pub async fn get(&self, url: &str) -> Result<(u16, Bytes), String> {
        let req = hyper::Request::get(url)
            .header("accept", "application/json")
            .header("user-agent", "datamon")
            .body(Full::new(Bytes::new()))
            .map_err(|e| format!("bad URL {url:?}: {e}"))?;
        self.send(req).await
    }
}
