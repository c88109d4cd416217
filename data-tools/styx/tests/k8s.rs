//! The Kubernetes runner: the generated Job against a golden file, the watch → event mapping
//! against recorded watch responses, and the runner against an API server on port 0 that plays
//! those recordings back (no cluster runs here).
//!
//! After an intended change of the Job:
//! `UPDATE_GOLDEN=1 cargo nextest run -p styx -E 'binary(k8s)'`, then review the diff of
//! `tests/k8s/job.golden.json`.

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

/// An API server on 127.0.0.1:0 that plays back a recorded stream: the Job's and the Pod's
/// watch events of `file`, split by kind onto the two watches the runner opens. It records
/// every request (method, path and query, body).
struct RecordedApi {
    url: String,
    seen: std::sync::Arc<std::sync::Mutex<Vec<(String, String, String)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RecordedApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn recorded_api(file: &str, create_status: u16) -> RecordedApi {
    use http_body_util::{BodyExt, Full};
    let text = std::fs::read_to_string(dir().join(file)).unwrap();
    let (mut jobs, mut pods) = (String::new(), String::new());
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line).unwrap();
        let out = if v["object"]["kind"] == "Pod" {
            &mut pods
        } else {
            &mut jobs
        };
        out.push_str(line);
        out.push('\n');
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    let task = tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let (jobs, pods, seen) = (jobs.clone(), pods.clone(), seen2.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let (jobs, pods, seen) = (jobs.clone(), pods.clone(), seen.clone());
                        async move {
                            let method = req.method().to_string();
                            let target = req.uri().path_and_query().unwrap().to_string();
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            seen.lock().unwrap().push((
                                method.clone(),
                                target.clone(),
                                String::from_utf8_lossy(&body).into_owned(),
                            ));
                            let path = target.split('?').next().unwrap_or_default();
                            let watch = target.contains("watch=true");
                            let (status, body) = match method.as_str() {
                                // A created object comes back as the API stored it.
                                "POST" if create_status == 201 => {
                                    (201, String::from_utf8_lossy(&body).into_owned())
                                }
                                "POST" => (
                                    create_status,
                                    format!(
                                        r#"{{"kind":"Status","apiVersion":"v1","status":"Failure","message":"jobs \"x\" is forbidden: exceeded quota","reason":"Forbidden","code":{create_status}}}"#
                                    ),
                                ),
                                "GET" if watch && path.ends_with("/pods") => (200, pods),
                                "GET" if watch && path.ends_with("/jobs") => (200, jobs),
                                _ => (
                                    200,
                                    r#"{"kind":"Status","apiVersion":"v1","status":"Success","code":200}"#
                                        .to_string(),
                                ),
                            };
                            let mut r = hyper::Response::new(Full::new(bytes::Bytes::from(body)));
                            *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                            Ok::<_, std::convert::Infallible>(r)
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    RecordedApi { url, seen, task }
}

/// Launches one execution on a `K8sRunner` against `api` and collects its reports until an
/// outcome (or `limit` reports).
async fn reports_of(api: &RecordedApi, limit: usize) -> Vec<Event> {
    use styx::runner::Runner;
    let runner = styx::runner::k8s_http::K8sRunner::new(&api.url, "styx").unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    runner.launch(launch(), tx);
    let mut got = Vec::new();
    while got.len() < limit {
        let r = tokio::time::timeout(std::time::Duration::from_secs(60), rx.recv())
            .await
            .expect("a report within a minute")
            .expect("the runner keeps the channel until an outcome");
        assert_eq!(r.execution_id, "styx-run-00c0ffee12345678");
        let outcome = matches!(r.event, Event::Terminate { .. } | Event::RunError { .. });
        got.push(r.event);
        if outcome {
            break;
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runner_creates_the_job_and_follows_its_watches() {
    let api = recorded_api("success.jsonl", 201).await;
    assert_eq!(
        reports_of(&api, 10).await,
        [
            Event::Submitted {
                execution_id: "styx-run-00c0ffee12345678".into()
            },
            Event::Started,
            Event::Terminate { exit_code: 0 },
        ]
    );
    let seen = api.seen.lock().unwrap().clone();
    let (_, target, body) = seen.iter().find(|(m, _, _)| m == "POST").expect("a POST");
    assert_eq!(
        target.split('?').next().unwrap(),
        "/apis/batch/v1/namespaces/styx/jobs"
    );
    let posted: Value = serde_json::from_str(body).unwrap();
    assert_eq!(posted, job(&launch(), "styx"), "the Job of the golden file");
    let watch = |path: &str, selector: &str| {
        seen.iter().any(|(m, t, _)| {
            m == "GET"
                && t.split('?').next() == Some(path)
                && t.contains("watch=true")
                && t.contains(selector)
        })
    };
    assert!(
        watch(
            "/api/v1/namespaces/styx/pods",
            "labelSelector=styx-execution-id%3Dstyx-run-00c0ffee12345678"
        ),
        "{seen:?}"
    );
    // The Job's watch may not be open yet when the pod's exit ends the run: see the kill test.

    let api = recorded_api("missing-deps.jsonl", 201).await;
    assert_eq!(
        reports_of(&api, 10).await.last(),
        Some(&Event::Terminate { exit_code: 20 })
    );
    let api = recorded_api("image-pull.jsonl", 201).await;
    assert_eq!(
        reports_of(&api, 10).await.last(),
        Some(&Event::RunError {
            message: "pod cannot start: ErrImagePull".into()
        })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_job_is_a_run_error_with_the_api_reason() {
    let api = recorded_api("success.jsonl", 403).await;
    match &reports_of(&api, 10).await[..] {
        [Event::RunError { message }] => {
            assert!(
                message.contains("403") && message.contains("exceeded quota"),
                "{message}"
            )
        }
        other => panic!("expected one runError, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_deletes_the_job() {
    use styx::runner::Runner;
    // A stream that never ends in an outcome: the Job is added, its pod runs.
    let api = recorded_api("running.jsonl", 201).await;
    let runner = styx::runner::k8s_http::K8sRunner::new(&api.url, "styx").unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut l = launch();
    l.execution_id = "styx-run-kill".into();
    runner.launch(l, tx);
    let first = rx.recv().await.unwrap();
    assert!(matches!(first.event, Event::Submitted { .. }));
    // Both watches open, with their selectors, before the kill (the stream has no outcome, so
    // the runner keeps them open); when the server ends a watch, it is reopened from the last
    // resourceVersion it carried (the recording's pod at 4107, its Job at 4101).
    let watching = |path: &str, selector: &str| {
        api.seen.lock().unwrap().iter().any(|(m, t, _)| {
            m == "GET"
                && t.split('?').next() == Some(path)
                && t.contains("watch=true")
                && t.contains(selector)
        })
    };
    let mut open = false;
    for _ in 0..1200 {
        open = watching(
            "/api/v1/namespaces/styx/pods",
            "labelSelector=styx-execution-id%3Dstyx-run-kill",
        ) && watching(
            "/apis/batch/v1/namespaces/styx/jobs",
            "fieldSelector=metadata.name%3Dstyx-run-kill",
        ) && watching("/api/v1/namespaces/styx/pods", "resourceVersion=4107")
            && watching(
                "/apis/batch/v1/namespaces/styx/jobs",
                "resourceVersion=4101",
            );
        if open {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(open, "both watches: {:?}", api.seen.lock().unwrap());
    runner.kill("styx-run-kill");
    for _ in 0..1200 {
        if api.seen.lock().unwrap().iter().any(|(m, t, body)| {
            m == "DELETE"
                && t.split('?').next() == Some("/apis/batch/v1/namespaces/styx/jobs/styx-run-kill")
                && body.contains(r#""propagationPolicy":"Background""#)
        }) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("no DELETE of the Job: {:?}", api.seen.lock().unwrap());
}

#[tokio::test]
async fn a_bad_api_url_is_a_clear_error() {
    let err = styx::runner::k8s_http::K8sRunner::new("http://not a host", "styx").unwrap_err();
    assert!(err.to_string().contains("not a host"), "{err}");
}
