//! The Kubernetes runner's pure halves: the generated Job against a golden file, and the
//! watch → event mapping against recorded watch responses (no cluster runs here).
//!
//! After an intended change of the Job: `UPDATE_GOLDEN=1 cargo nextest run -p styx k8s`, then
//! review the diff of `tests/k8s/job.golden.json`.

use std::path::PathBuf;

use serde_json::Value;
use styx::engine::Launch;
use styx::runner::k8s::{job, watch_event};
use styx::state::Event;
use styx::workflow::{InstanceKey, Workflow};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/k8s")
}

fn launch() -> Launch {
    let wf = Workflow::from_yaml(
        "k8s.yaml",
        "component: push\nid: delivered-report\nschedule: hourly\ncommand: /bin/sh\nargs: [/styx/report.sh, '{}']\n\
         env: {OUT: /data/out}\nrunning_timeout: PT10M\nimage: registry.example/push/report:1.4\ncpu: 500m\nmemory: 256Mi\n",
    )
    .unwrap();
    Launch {
        key: InstanceKey {
            workflow: wf.key(),
            parameter: "2026-11-29T14".into(),
        },
        execution_id: "styx-run-00c0ffee12345678".into(),
        trigger_id: "natural-trigger".into(),
        workflow: wf,
    }
}

#[test]
fn job_matches_the_golden_file() {
    let got = job(&launch(), "styx");
    let path = dir().join("job.golden.json");
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, serde_json::to_string_pretty(&got).unwrap() + "\n").unwrap();
    }
    let want: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(
        got, want,
        "regenerate with UPDATE_GOLDEN=1 if the change is intended"
    );
    // What the golden file must say, independently of how it was produced.
    let c = &want["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(want["spec"]["backoffLimit"], 0);
    assert_eq!(want["spec"]["activeDeadlineSeconds"], 600);
    assert_eq!(
        c["args"],
        serde_json::json!(["/styx/report.sh", "2026-11-29T14"])
    );
    assert_eq!(c["resources"]["limits"]["memory"], "256Mi");
    let env: Vec<&str> = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    for name in [
        "STYX_COMPONENT_ID",
        "STYX_WORKFLOW_ID",
        "STYX_PARAMETER",
        "STYX_EXECUTION_ID",
        "OUT",
    ] {
        assert!(env.contains(&name), "{name} in {env:?}");
    }
}

#[test]
fn recorded_watch_streams_map_to_events() {
    let cases: [(&str, Vec<Event>); 3] = [
        (
            "success.jsonl",
            vec![
                Event::Submitted { execution_id: "styx-run-00c0ffee12345678".into() },
                Event::Started,
                Event::Terminate { exit_code: 0 },
            ],
        ),
        (
            "missing-deps.jsonl",
            // The Job's own Failed condition follows the pod's exit; the engine drops it, since
            // the run has no live execution any more (see `Engine::report`).
            vec![
                Event::Submitted { execution_id: "styx-run-00c0ffee12345678".into() },
                Event::Started,
                Event::Terminate { exit_code: 20 },
                Event::RunError { message: "job failed: BackoffLimitExceeded: Job has reached the specified backoff limit".into() },
            ],
        ),
        (
            "image-pull.jsonl",
            vec![
                Event::Submitted { execution_id: "styx-run-00c0ffee12345678".into() },
                Event::RunError { message: "pod cannot start: ErrImagePull".into() },
            ],
        ),
    ];
    for (file, want) in cases {
        let text = std::fs::read_to_string(dir().join(file)).unwrap();
        let mut got: Vec<Event> = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .filter_map(|l| watch_event(&serde_json::from_str(l).unwrap()))
            .collect();
        got.dedup();
        assert_eq!(got, want, "{file}");
    }
    let deadline: Value = serde_json::json!({"type": "MODIFIED", "object": {"kind": "Job", "metadata": {}, "status": {"conditions": [
        {"type": "Failed", "status": "True", "reason": "DeadlineExceeded", "message": "Job was active longer than specified deadline"}]}}});
    assert!(
        matches!(watch_event(&deadline), Some(Event::RunError { message }) if message.contains("DeadlineExceeded"))
    );
}
