//! The Kubernetes runner's two pure halves: the Job object for an execution, and the mapping
//! from a watched Job's or Pod's status to Styx events. [`super::k8s_http`] drives them against
//! the API.
//!
//! The Job is built as plain JSON (the API's own format), which the driver hands to `kube` as a
//! `DynamicObject` unchanged; it is tested against a golden file, and the
//! mapping against recorded watch responses (no cluster runs in this project's CI).

use serde_json::{json, Value};

use super::styx_env;
use crate::engine::Launch;
use crate::state::Event;

/// Kubernetes names: lowercase alphanumerics and '-', at most 63 characters.
pub fn dns_label(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    out.truncate(63);
    out.trim_matches('-').to_string()
}

/// The Job for one execution. `backoffLimit: 0`: retries are Styx's, by its policy, not the
/// cluster's; `activeDeadlineSeconds` is the workflow's running timeout, so the cluster also
/// stops a run whose scheduler is gone.
pub fn job(launch: &Launch, namespace: &str) -> Value {
    let wf = &launch.workflow;
    let env: Vec<Value> = styx_env(launch)
        .into_iter()
        .chain(wf.env.clone())
        .map(|(name, value)| json!({"name": name, "value": value}))
        .collect();
    let mut resources = serde_json::Map::new();
    let mut amounts = serde_json::Map::new();
    if let Some(cpu) = &wf.cpu {
        amounts.insert("cpu".into(), json!(cpu));
    }
    if let Some(mem) = &wf.memory {
        amounts.insert("memory".into(), json!(mem));
    }
    if !amounts.is_empty() {
        // Requests equal limits: the job gets a guaranteed slice and cannot take more.
        resources.insert("requests".into(), Value::Object(amounts.clone()));
        resources.insert("limits".into(), Value::Object(amounts));
    }
    let argv = wf.argv(&launch.key.parameter);
    let labels = json!({
        "app.kubernetes.io/managed-by": "styx",
        "styx-component": dns_label(&launch.key.workflow.component),
        "styx-workflow": dns_label(&launch.key.workflow.id),
        "styx-execution-id": dns_label(&launch.execution_id),
    });
    json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": dns_label(&launch.execution_id),
            "namespace": namespace,
            "labels": labels,
            "annotations": {
                "styx.io/workflow-instance": launch.key.to_string(),
                "styx.io/trigger-id": launch.trigger_id,
            },
        },
        "spec": {
            "backoffLimit": 0,
            "activeDeadlineSeconds": wf.running_timeout.as_secs(),
            // Finished Jobs are removed after a day; the outcome is in Styx's event log.
            "ttlSecondsAfterFinished": 86400,
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": false,
                    "containers": [{
                        "name": "styx-run",
                        "image": wf.image.clone().unwrap_or_else(|| "busybox:stable".into()),
                        "command": [argv[0]],
                        "args": argv[1..],
                        "env": env,
                        "resources": resources,
                    }],
                },
            },
        },
    })
}

/// Maps one watch event (`{"type":"MODIFIED","object":{Job or Pod}}`) to a Styx event.
///
/// - a Pod of the Job in phase `Running` → `started`;
/// - a Pod's terminated container → `terminate(exit_code)`;
/// - a Job condition `Failed` with reason `DeadlineExceeded` → `runError` (the cluster's
///   deadline), other failed conditions without a pod exit → `runError` with the reason;
/// - a Job object first seen (`ADDED`) → `submitted`;
/// - `DELETED` before an outcome → `runError`.
///
/// Returns `None` for events that change nothing.
pub fn watch_event(v: &Value) -> Option<Event> {
    let kind = v["object"]["kind"].as_str()?;
    let typ = v["type"].as_str()?;
    let obj = &v["object"];
    let execution_id = || {
        obj["metadata"]["labels"]["styx-execution-id"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    match (kind, typ) {
        ("Job", "ADDED") => Some(Event::Submitted {
            execution_id: execution_id(),
        }),
        ("Job", "DELETED") => Some(Event::RunError {
            message: "job deleted before it finished".into(),
        }),
        ("Job", _) => obj["status"]["conditions"]
            .as_array()?
            .iter()
            .find_map(|c| {
                (c["type"] == "Failed" && c["status"] == "True").then(|| Event::RunError {
                    message: format!(
                        "job failed: {}: {}",
                        c["reason"].as_str().unwrap_or("unknown"),
                        c["message"].as_str().unwrap_or("")
                    ),
                })
            }),
        ("Pod", "DELETED") => None,
        ("Pod", _) => {
            let statuses = obj["status"]["containerStatuses"].as_array();
            let terminated = statuses.and_then(|s| {
                s.iter()
                    .find_map(|c| c["state"]["terminated"]["exitCode"].as_i64())
            });
            if let Some(code) = terminated {
                return Some(Event::Terminate {
                    exit_code: code as i32,
                });
            }
            let waiting = statuses.and_then(|s| {
                s.iter()
                    .find_map(|c| c["state"]["waiting"]["reason"].as_str())
            });
            match waiting {
                Some(
                    r @ ("ErrImagePull"
                    | "ImagePullBackOff"
                    | "InvalidImageName"
                    | "CreateContainerConfigError"),
                ) => Some(Event::RunError {
                    message: format!("pod cannot start: {r}"),
                }),
                _ => (obj["status"]["phase"] == "Running").then_some(Event::Started),
            }
        }
        _ => None,
    }
}
