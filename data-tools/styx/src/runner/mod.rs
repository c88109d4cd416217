//! Runners execute what the engine launches and report back what happened, as events
//! (`submitted`, `started`, `terminate(exit_code)`, `runError`).
//!
//! | runner | where |
//! |---|---|
//! | [`local::LocalRunner`] | the embedded default: one bubblewrap sandbox per run |
//! | [`k8s`] | a Kubernetes Job per run: the Job object and the watch → event mapping (pure) |
//! | [`k8s_http::K8sRunner`] | creates and watches those Jobs through the API with the `kube` client |
//! | [`StubRunner`] | succeeds at once (benchmarks, API tests) |

pub mod k8s;
pub mod k8s_http;
pub mod local;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};

use crate::engine::Launch;
use crate::state::Event;
use crate::workflow::InstanceKey;

/// A runner's report about one execution.
#[derive(Debug, Clone)]
pub struct Report {
    /// The instance.
    pub key: InstanceKey,
    /// The execution it is about.
    pub execution_id: String,
    /// What happened.
    pub event: Event,
}

/// Where reports go.
pub type Reports = mpsc::UnboundedSender<Report>;

/// Something that runs executions. Calls return at once; outcomes arrive as [`Report`]s.
pub trait Runner: Send + Sync + 'static {
    /// Starts an execution.
    fn launch(&self, launch: Launch, reports: Reports);
    /// Kills an execution (halt, timeout); a no-op when it already ended.
    fn kill(&self, execution_id: &str);
}

/// The `STYX_*` environment every execution gets.
pub fn styx_env(launch: &Launch) -> Vec<(String, String)> {
    vec![
        (
            "STYX_COMPONENT_ID".into(),
            launch.key.workflow.component.clone(),
        ),
        ("STYX_WORKFLOW_ID".into(), launch.key.workflow.id.clone()),
        ("STYX_PARAMETER".into(), launch.key.parameter.clone()),
        ("STYX_EXECUTION_ID".into(), launch.execution_id.clone()),
        ("STYX_TRIGGER_ID".into(), launch.trigger_id.clone()),
    ]
}

/// Reports `submitted`, `started` and then `terminate` with a fixed exit code at once.
#[derive(Debug, Clone, Copy, Default)]
pub struct StubRunner {
    /// The exit code every execution reports.
    pub exit_code: i32,
}

impl StubRunner {
    /// The events one execution produces.
    pub fn outcome(&self, launch: &Launch) -> [Event; 3] {
        [
            Event::Submitted {
                execution_id: launch.execution_id.clone(),
            },
            Event::Started,
            Event::Terminate {
                exit_code: self.exit_code,
            },
        ]
    }
}

impl Runner for StubRunner {
    fn launch(&self, launch: Launch, reports: Reports) {
        for event in self.outcome(&launch) {
            let _ = reports.send(Report {
                key: launch.key.clone(),
                execution_id: launch.execution_id.clone(),
                event,
            });
        }
    }

    fn kill(&self, _execution_id: &str) {}
}

/// The kill switches of a runner's runs in flight, by execution ID: [`Runner::kill`] fires
/// one, the run's task waits on its receiver and forgets it when the run ends.
#[derive(Debug, Clone, Default)]
pub struct KillSwitches(Arc<Mutex<HashMap<String, oneshot::Sender<()>>>>);

impl KillSwitches {
    /// A switch for `execution_id`; the run's task waits on the receiver.
    pub fn register(&self, execution_id: &str) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        self.lock().insert(execution_id.to_owned(), tx);
        rx
    }

    /// Fires the switch of `execution_id`, if the run is still in flight.
    pub fn kill(&self, execution_id: &str) {
        if let Some(tx) = self.lock().remove(execution_id) {
            let _ = tx.send(());
        }
    }

    /// Drops the switch of a run that ended.
    pub fn forget(&self, execution_id: &str) {
        self.lock().remove(execution_id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, oneshot::Sender<()>>> {
        self.0.lock().expect("kill switches lock")
    }
}
