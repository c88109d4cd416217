//! The Kubernetes runner's driver: creates each execution's Job through the Kubernetes API and
//! watches it, turning what it sees into reports with the pure halves of [`super::k8s`].
//!
//! It speaks the API's plain HTTP/JSON to a base URL, normally `kubectl proxy`
//! (`http://127.0.0.1:8001`), which holds the cluster credentials and TLS: no Kubernetes
//! client library or TLS stack is compiled in for a runner that CI cannot run against a real
//! cluster. Tests drive it against an API server on 127.0.0.1:0 that answers with recorded
//! watch streams.
//!
//! Per execution: `POST /apis/batch/v1/namespaces/{ns}/jobs` (accepted → `submitted`), then two
//! watches, `GET …/pods?watch=1&labelSelector=styx-execution-id=…` (start, exit code, image
//! pull errors) and `GET …/jobs?watch=1&fieldSelector=metadata.name=…` (deadline, deletion),
//! until the first outcome (`terminate` or `runError`). A kill deletes the Job and its pods.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use super::k8s::{dns_label, job, watch_event};
use super::{Report, Reports, Runner};
use crate::engine::Launch;
use crate::state::Event;

/// A watch the API server ended before an outcome is opened again after this pause (API
/// servers end watches every few minutes by design; the pause keeps a failing server from
/// being hammered).
const REWATCH_PAUSE: Duration = Duration::from_secs(1);

/// Watch lines are single objects of a few KiB; a line longer than this is refused rather
/// than buffered without bound.
const MAX_LINE: usize = 4 << 20;

/// A Job's own failure (`BackoffLimitExceeded`) arrives on the Job watch about when its pod's
/// exit arrives on the pod watch; the exit code is what the retry policy needs, so a Job-level
/// failure waits this long for it before it is reported as a run error.
const JOB_FAILURE_GRACE: Duration = Duration::from_secs(5);

/// What a watch task passes on: which watch saw it (pods: true), and the event, or why the
/// watch cannot go on.
type Seen = Result<(bool, Event), String>;

/// Runs executions as Kubernetes Jobs.
#[derive(Debug, Clone)]
pub struct K8sRunner {
    api: String,
    namespace: String,
    http: Client<HttpConnector, Full<Bytes>>,
    kills: Arc<Mutex<HashMap<String, oneshot::Sender<()>>>>,
}

impl K8sRunner {
    /// `api` is the API's base URL (`http://127.0.0.1:8001` for `kubectl proxy`).
    pub fn new(api: &str, namespace: &str) -> K8sRunner {
        K8sRunner {
            api: api.trim_end_matches('/').to_string(),
            namespace: namespace.to_string(),
            http: Client::builder(TokioExecutor::new()).build_http(),
            kills: Arc::default(),
        }
    }

    fn jobs_path(&self) -> String {
        format!(
            "{}/apis/batch/v1/namespaces/{}/jobs",
            self.api, self.namespace
        )
    }

    async fn request(
        &self,
        method: Method,
        url: &str,
        body: Bytes,
    ) -> Result<(StatusCode, hyper::body::Incoming), String> {
        let req = Request::builder()
            .method(method)
            .uri(url)
            .header("content-type", "application/json")
            .body(Full::new(body))
            .map_err(|e| format!("{url}: {e}"))?;
        let resp = self
            .http
            .request(req)
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        Ok((resp.status(), resp.into_body()))
    }

    async fn create(&self, launch: &Launch) -> Result<(), String> {
        let body = Bytes::from(job(launch, &self.namespace).to_string());
        let (status, body) = self.request(Method::POST, &self.jobs_path(), body).await?;
        if status.is_success() {
            return Ok(());
        }
        // The API's Status object says why (quota, admission, a bad image name).
        let bytes = body
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        let reason = serde_json::from_slice::<Value>(&bytes)
            .ok()
            .and_then(|v| v["message"].as_str().map(String::from))
            .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
        Err(format!("creating the Job: {status}: {reason}"))
    }

    /// Streams one watch's events into `tx` until the receiver is gone, reopening it when the
    /// server ends it.
    async fn watch(self, url: String, pods: bool, tx: mpsc::UnboundedSender<Seen>) {
        while !tx.is_closed() {
            match self.request(Method::GET, &url, Bytes::new()).await {
                Ok((status, _)) if !status.is_success() => {
                    let _ = tx.send(Err(format!("watch {url}: {status}")));
                    return;
                }
                Ok((_, mut body)) => {
                    let mut buf: Vec<u8> = Vec::new();
                    while let Some(frame) = body.frame().await {
                        let Ok(data) = frame.map(|f| f.into_data().unwrap_or_default()) else {
                            break;
                        };
                        buf.extend_from_slice(&data);
                        while let Some(i) = buf.iter().position(|b| *b == b'\n') {
                            let line: Vec<u8> = buf.drain(..=i).collect();
                            if let Some(e) = serde_json::from_slice::<Value>(&line)
                                .ok()
                                .as_ref()
                                .and_then(watch_event)
                            {
                                let _ = tx.send(Ok((pods, e)));
                            }
                        }
                        if buf.len() > MAX_LINE {
                            let _ =
                                tx.send(Err(format!("watch {url}: a line over {MAX_LINE} bytes")));
                            return;
                        }
                    }
                }
                Err(e) => tracing::warn!("watch failed, reopening: {e}"),
            }
            tokio::time::sleep(REWATCH_PAUSE).await;
        }
    }

    async fn run(self, launch: Launch, reports: Reports, mut kill: oneshot::Receiver<()>) {
        let report = |event: Event| {
            let _ = reports.send(Report {
                key: launch.key.clone(),
                execution_id: launch.execution_id.clone(),
                event,
            });
        };
        if let Err(message) = self.create(&launch).await {
            self.forget(&launch.execution_id);
            return report(Event::RunError { message });
        }
        report(Event::Submitted {
            execution_id: launch.execution_id.clone(),
        });
        let name = dns_label(&launch.execution_id);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let pods = format!(
            "{}/api/v1/namespaces/{}/pods?watch=1&labelSelector=styx-execution-id%3D{name}",
            self.api, self.namespace
        );
        let jobs = format!(
            "{}?watch=1&fieldSelector=metadata.name%3D{name}",
            self.jobs_path()
        );
        let watchers = [
            tokio::spawn(self.clone().watch(pods, true, tx.clone())),
            tokio::spawn(self.clone().watch(jobs, false, tx)),
        ];
        let mut started = false;
        // A Job-level failure waiting for its pod's exit code, and until when.
        let mut job_failure: Option<(Event, tokio::time::Instant)> = None;
        loop {
            let grace_over = async {
                match &job_failure {
                    Some((_, until)) => tokio::time::sleep_until(*until).await,
                    None => std::future::pending().await,
                }
            };
            let next = tokio::select! {
                e = rx.recv() => e,
                _ = grace_over => {
                    report(job_failure.take().expect("set when the grace runs").0);
                    break;
                }
                _ = &mut kill => {
                    self.delete(&name).await;
                    break;
                }
            };
            match next {
                // The Job was created above: its ADDED is old news.
                Some(Ok((_, Event::Submitted { .. }))) => {}
                Some(Ok((_, Event::Started))) => {
                    if !started {
                        started = true;
                        report(Event::Started);
                    }
                }
                Some(Ok((false, failure @ Event::RunError { .. }))) => {
                    if job_failure.is_none() {
                        job_failure =
                            Some((failure, tokio::time::Instant::now() + JOB_FAILURE_GRACE));
                    }
                }
                Some(Ok((_, outcome))) => {
                    // A pod that ran and exited between two watch events was never seen
                    // running: the state machine still goes through RUNNING.
                    if matches!(outcome, Event::Terminate { .. }) && !started {
                        report(Event::Started);
                    }
                    report(outcome);
                    break;
                }
                Some(Err(message)) => {
                    report(Event::RunError { message });
                    break;
                }
                None => break,
            }
        }
        for w in watchers {
            w.abort();
        }
        self.forget(&launch.execution_id);
    }

    async fn delete(&self, name: &str) {
        let url = format!("{}/{name}?propagationPolicy=Background", self.jobs_path());
        match self.request(Method::DELETE, &url, Bytes::new()).await {
            Ok((s, _)) if s.is_success() || s == StatusCode::NOT_FOUND => {}
            Ok((s, _)) => tracing::warn!(job = name, status = %s, "deleting the Job failed"),
            Err(e) => tracing::warn!(job = name, "deleting the Job failed: {e}"),
        }
    }

    fn forget(&self, execution_id: &str) {
        self.kills.lock().expect("kills lock").remove(execution_id);
    }
}

impl Runner for K8sRunner {
    fn launch(&self, launch: Launch, reports: Reports) {
        let (tx, rx) = oneshot::channel();
        self.kills
            .lock()
            .expect("kills lock")
            .insert(launch.execution_id.clone(), tx);
        tokio::spawn(self.clone().run(launch, reports, rx));
    }

    fn kill(&self, execution_id: &str) {
        if let Some(tx) = self.kills.lock().expect("kills lock").remove(execution_id) {
            let _ = tx.send(());
        }
    }
}
