//! The Kubernetes runner's driver: creates each execution's Job through the Kubernetes API with
//! the `kube` crate's client and watches it, turning what it sees into reports with the pure
//! halves of [`super::k8s`].
//!
//! The client points at a base URL, normally `kubectl proxy` (`http://127.0.0.1:8001`), which
//! holds the cluster credentials and TLS: `kube` is built without a TLS stack (and without its
//! runtime), which keeps clean builds short for a runner that CI cannot run against a real
//! cluster. Objects go through `kube`'s [`DynamicObject`], so the Job sent is exactly the JSON of
//! [`super::k8s::job`] (golden-tested) and watch events reach [`super::k8s::watch_event`] as the
//! API wrote them. Tests drive it against an API server on 127.0.0.1:0 that answers with
//! recorded watch streams.
//!
//! Per execution: create the Job in the namespace (accepted → `submitted`), then two watches,
//! the pods labelled `styx-execution-id=…` (start, exit code, image pull errors) and the Job by
//! `metadata.name` (deadline, deletion), until the first outcome (`terminate` or `runError`).
//! A kill deletes the Job and its pods (background propagation).

use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, PostParams, WatchEvent, WatchParams,
};
use tokio::sync::{mpsc, oneshot};

use super::k8s::{dns_label, job, watch_event};
use super::{KillSwitches, Report, Reports, Runner};
use crate::engine::Launch;
use crate::state::Event;

/// A watch the API server ended before an outcome is opened again after this pause (API
/// servers end watches every few minutes by design; the pause keeps a failing server from
/// being hammered).
const REWATCH_PAUSE: Duration = Duration::from_secs(1);

/// A Job's own failure (`BackoffLimitExceeded`) arrives on the Job watch about when its pod's
/// exit arrives on the pod watch; the exit code is what the retry policy needs, so a Job-level
/// failure waits this long for it before it is reported as a run error.
const JOB_FAILURE_GRACE: Duration = Duration::from_secs(5);

/// What a watch task passes on: which watch saw it (pods: true), and the event, or why the
/// watch cannot go on.
type Seen = Result<(bool, Event), String>;

/// Why a runner cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    /// The API URL does not parse.
    #[error("the Kubernetes API URL {url:?}: {source}")]
    Url {
        /// The URL given.
        url: String,
        /// Why it does not parse.
        source: hyper::http::uri::InvalidUri,
    },
    /// `kube` refused the configuration.
    #[error("the Kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// Runs executions as Kubernetes Jobs.
#[derive(Clone)]
pub struct K8sRunner {
    namespace: String,
    jobs: Api<DynamicObject>,
    pods: Api<DynamicObject>,
    kills: KillSwitches,
}

impl std::fmt::Debug for K8sRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("K8sRunner").finish_non_exhaustive()
    }
}

impl K8sRunner {
    /// `api` is the API's base URL (`http://127.0.0.1:8001` for `kubectl proxy`). Must be
    /// called inside a Tokio runtime (the client's connection pool lives there).
    pub fn new(api: &str, namespace: &str) -> Result<K8sRunner, K8sError> {
        let uri = api
            .trim_end_matches('/')
            .parse::<hyper::Uri>()
            .map_err(|source| K8sError::Url {
                url: api.to_string(),
                source,
            })?;
        let mut config = kube::Config::new(uri);
        config.default_namespace = namespace.to_string();
        let client = kube::Client::try_from(config)?;
        let resource = |r: ApiResource| Api::namespaced_with(client.clone(), namespace, &r);
        Ok(K8sRunner {
            namespace: namespace.to_string(),
            jobs: resource(ApiResource::erase::<Job>(&())),
            pods: resource(ApiResource::erase::<Pod>(&())),
            kills: KillSwitches::default(),
        })
    }

    async fn create(&self, launch: &Launch) -> Result<(), String> {
        let body: DynamicObject = serde_json::from_value(job(launch, &self.namespace))
            .map_err(|e| format!("building the Job: {e}"))?;
        match self.jobs.create(&PostParams::default(), &body).await {
            Ok(_) => Ok(()),
            // The API's Status object says why (quota, admission, a bad image name).
            Err(kube::Error::Api(s)) => Err(format!(
                "creating the Job: {} {}: {}",
                s.code, s.reason, s.message
            )),
            Err(e) => Err(format!("creating the Job: {e}")),
        }
    }

    /// Streams one watch's events into `tx` until the receiver is gone, reopening it when the
    /// server ends it, from the last resource version seen.
    async fn watch(
        api: Api<DynamicObject>,
        params: WatchParams,
        pods: bool,
        tx: mpsc::UnboundedSender<Seen>,
    ) {
        // "0": start from any recent state; the API sends the current objects as ADDED.
        let mut version = "0".to_string();
        while !tx.is_closed() {
            match api.watch(&params, &version).await {
                Ok(stream) => {
                    let mut stream = std::pin::pin!(stream);
                    while let Some(item) = stream.next().await {
                        let event = match item {
                            Ok(e) => e,
                            Err(e) => {
                                tracing::warn!("watch failed, reopening: {e}");
                                break;
                            }
                        };
                        match &event {
                            WatchEvent::Added(o)
                            | WatchEvent::Modified(o)
                            | WatchEvent::Deleted(o) => {
                                if let Some(v) = &o.metadata.resource_version {
                                    version.clone_from(v);
                                }
                            }
                            WatchEvent::Bookmark(b) => {
                                version.clone_from(&b.metadata.resource_version);
                                continue;
                            }
                            // 410 Gone: the version is too old; start again from the current
                            // state. Anything else ends the watch.
                            WatchEvent::Error(s) if s.code == 410 => {
                                version = "0".into();
                                break;
                            }
                            WatchEvent::Error(s) => {
                                let _ = tx.send(Err(format!(
                                    "watch: {} {}: {}",
                                    s.code, s.reason, s.message
                                )));
                                return;
                            }
                        }
                        if let Some(e) = serde_json::to_value(&event)
                            .ok()
                            .as_ref()
                            .and_then(watch_event)
                        {
                            let _ = tx.send(Ok((pods, e)));
                        }
                    }
                }
                Err(kube::Error::Api(s)) => {
                    let _ = tx.send(Err(format!(
                        "watch: {} {}: {}",
                        s.code, s.reason, s.message
                    )));
                    return;
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
        let pods = WatchParams::default().labels(&format!("styx-execution-id={name}"));
        let jobs = WatchParams::default().fields(&format!("metadata.name={name}"));
        let watchers = [
            tokio::spawn(Self::watch(self.pods.clone(), pods, true, tx.clone())),
            tokio::spawn(Self::watch(self.jobs.clone(), jobs, false, tx)),
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
        match self.jobs.delete(name, &DeleteParams::background()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => tracing::warn!(job = name, "deleting the Job failed: {e}"),
        }
    }

    fn forget(&self, execution_id: &str) {
        self.kills.forget(execution_id);
    }
}

impl Runner for K8sRunner {
    fn launch(&self, launch: Launch, reports: Reports) {
        let rx = self.kills.register(&launch.execution_id);
        tokio::spawn(self.clone().run(launch, reports, rx));
    }

    fn kill(&self, execution_id: &str) {
        self.kills.kill(execution_id);
    }
}
