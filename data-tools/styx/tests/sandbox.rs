//! The local runner end to end: real bubblewrap sandboxes driven by the real scheduler loop.
//! Success, exit 20 (retry), exit 50 (stop), a timeout that kills the sandbox, and isolation:
//! a job cannot see another run's files or the scheduler's, cannot reach the network, cannot
//! signal the scheduler.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use styx::engine::{Engine, EngineConfig};
use styx::runner::local::{find_in_path, LocalRunner};
use styx::service::{self, Handle};
use styx::state::{Event, State};
use styx::store::{SqliteStore, StoredEvent};
use styx::workflow::{InstanceKey, Workflow, WorkflowId};

struct Env {
    dir: PathBuf,
    handle: Handle,
    driver: tokio::task::JoinHandle<()>,
}

impl Drop for Env {
    fn drop(&mut self) {
        self.driver.abort();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start(name: &str) -> Env {
    assert!(
        find_in_path("bwrap").is_some(),
        "bwrap (Debian package bubblewrap) is required: scripts/test installs it, or apt-get install bubblewrap"
    );
    let dir = std::env::temp_dir().join(format!("styx-sandbox-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let store = SqliteStore::open(&dir.join("styx.db")).unwrap();
    let engine = Engine::open(
        Box::new(store),
        EngineConfig {
            seed: Some(5),
            ..EngineConfig::default()
        },
    )
    .unwrap();
    let handle = Handle::new(engine, service::system_clock());
    let runner = Arc::new(LocalRunner::new(&dir.join("runs")).unwrap());
    let driver = service::spawn(handle.clone(), runner, Duration::from_millis(50));
    Env {
        dir,
        handle,
        driver,
    }
}

impl Env {
    fn run(&self, id: &str, extra: &str, script: &str) -> InstanceKey {
        let yaml = format!(
            "component: test\nid: {id}\nschedule: daily\ncommand: /bin/sh\nargs: ['-c', {}, 'job', '{{}}']\nenabled: false\n{extra}",
            serde_json::to_string(script).unwrap()
        );
        let wf = Workflow::from_yaml("test.yaml", &yaml).unwrap();
        let wid = WorkflowId {
            component: "test".into(),
            id: id.into(),
        };
        self.handle.with(|e, now| e.put_workflow(wf, now)).unwrap();
        self.handle
            .with(|e, now| e.trigger(&wid, "2026-11-29", now))
            .unwrap();
        InstanceKey {
            workflow: wid,
            parameter: "2026-11-29".into(),
        }
    }

    fn events(&self, key: &InstanceKey) -> Vec<StoredEvent> {
        self.handle.lock().events(key).unwrap()
    }

    /// Polls (generous deadline: a loaded 2-core machine) until `done` holds for the events.
    async fn wait(
        &self,
        key: &InstanceKey,
        what: &str,
        done: impl Fn(&[StoredEvent]) -> bool,
    ) -> Vec<StoredEvent> {
        for _ in 0..1200 {
            let evs = self.events(key);
            if done(&evs) {
                return evs;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "{key}: {what} did not happen; events: {:#?}",
            self.events(key)
        );
    }

    fn log_of(&self, key: &InstanceKey, evs: &[StoredEvent]) -> String {
        let exec = evs
            .iter()
            .find_map(|e| match &e.event {
                Event::Submitted { execution_id } => Some(execution_id.clone()),
                _ => None,
            })
            .unwrap();
        let path = self
            .dir
            .join("runs/logs")
            .join(&key.workflow.component)
            .join(&key.workflow.id)
            .join(&key.parameter)
            .join(format!("{exec}.log"));
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }
}

fn last_state(evs: &[StoredEvent]) -> Option<State> {
    evs.last().map(|e| e.state)
}

fn exit_codes(evs: &[StoredEvent]) -> Vec<i32> {
    evs.iter()
        .filter_map(|e| match e.event {
            Event::Terminate { exit_code } => Some(exit_code),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn success_runs_to_done_with_its_output_logged() {
    let env = start("success");
    let key = env.run(
        "ok",
        "env: {GREETING: hello}\n",
        r#"echo "$GREETING $1 $STYX_COMPONENT_ID/$STYX_WORKFLOW_ID/$STYX_PARAMETER"; pwd"#,
    );
    let evs = env
        .wait(&key, "DONE", |e| last_state(e) == Some(State::Done))
        .await;
    let names: Vec<&str> = evs.iter().map(|e| e.event.name()).collect();
    assert_eq!(
        names,
        [
            "triggerExecution",
            "dequeue",
            "submit",
            "submitted",
            "started",
            "terminate",
            "success"
        ]
    );
    assert_eq!(exit_codes(&evs), [0]);
    let log = env.log_of(&key, &evs);
    assert!(log.contains("hello 2026-11-29 test/ok/2026-11-29"), "{log}");
    assert!(log.contains("/work"), "runs in its work dir: {log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_20_is_retried_later_and_exit_50_stops() {
    let env = start("exits");
    let missing = env.run("missing", "", "exit 20");
    let fatal = env.run("fatal", "", "exit 50");
    let evs = env
        .wait(&missing, "retryAfter", |e| {
            e.iter().any(|e| e.event.name() == "retryAfter")
        })
        .await;
    assert_eq!(exit_codes(&evs), [20]);
    assert_eq!(
        evs.last().unwrap().event,
        Event::RetryAfter {
            delay_millis: 600_000
        }
    );
    assert_eq!(last_state(&evs), Some(State::Queued));
    let evs = env
        .wait(&fatal, "ERROR", |e| last_state(e) == Some(State::Error))
        .await;
    assert_eq!(exit_codes(&evs), [50]);
    assert_eq!(evs.last().unwrap().event, Event::Stop);
}

fn processes_with(marker: &str) -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .chars()
                .all(|c| c.is_ascii_digit())
        })
        .filter(|e| {
            std::fs::read(e.path().join("cmdline"))
                .map(|c| {
                    String::from_utf8_lossy(&c)
                        .replace('\0', " ")
                        .contains(marker)
                })
                .unwrap_or(false)
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_kills_the_sandbox() {
    let env = start("timeout");
    // A marker no other process has, to find the job's processes from outside.
    let marker = format!("987.{}", std::process::id());
    let key = env.run(
        "slow",
        "running_timeout: PT2S\n",
        &format!("sleep {marker}; echo finished"),
    );
    env.wait(&key, "RUNNING", |e| last_state(e) == Some(State::Running))
        .await;
    for _ in 0..600 {
        if processes_with(&format!("sleep {marker}")) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        processes_with(&format!("sleep {marker}")) > 0,
        "the job's sleep is running"
    );
    let evs = env
        .wait(&key, "timeout", |e| {
            e.iter().any(|e| e.event == Event::Timeout)
        })
        .await;
    assert!(
        evs.iter()
            .any(|e| matches!(e.event, Event::RetryAfter { .. })),
        "a timeout is retried: {evs:#?}"
    );
    let mut gone = false;
    for _ in 0..600 {
        if processes_with(&format!("sleep {marker}")) == 0 {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(gone, "the sandbox's processes were killed");
    env.handle.with(|e, now| e.halt(&key, now)).unwrap();
}

fn exists(p: &Path) -> bool {
    p.exists()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolation_holds() {
    let env = start("isolation");
    // Run A leaves a secret in its work dir and keeps running.
    let a = env.run("a", "", "echo secret > /work/secret; sleep 600");
    let evs = env
        .wait(&a, "RUNNING", |e| last_state(e) == Some(State::Running))
        .await;
    let exec = env
        .handle
        .lock()
        .active_run(&a)
        .unwrap()
        .execution_id
        .clone()
        .unwrap();
    let secret = env.dir.join("runs/work").join(&exec).join("secret");
    for _ in 0..600 {
        if exists(&secret) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(exists(&secret), "A wrote its file: {}", secret.display());
    assert!(!evs.is_empty());
    let db = env.dir.join("styx.db");
    assert!(exists(&db));

    // B looks for A's file (host path and its own /work), the scheduler's database, the
    // network and the scheduler process. Each check exits with its own code when isolation
    // is broken; 0 means it held.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let me = std::process::id();
    let connect = format!("echo x > /dev/tcp/127.0.0.1/{port}");
    let script = format!(
        "test -e {secret} && exit 11; test -e /work/secret && exit 12; test -e {db} && exit 13; \
         bash -c '{connect}' 2>/dev/null && exit 14; kill -0 {me} 2>/dev/null && exit 15; \
         kill -TERM {me} 2>/dev/null && exit 16; exit 0",
        secret = secret.display(),
        db = db.display(),
    );
    // The same probes succeed outside the sandbox, so a 0 inside is the sandbox's doing.
    let outside = |cmd: &str| {
        std::process::Command::new("bash")
            .arg("-c")
            .arg(cmd)
            .status()
            .unwrap()
            .success()
    };
    assert!(outside(&format!("test -e {}", secret.display())));
    assert!(outside(&connect), "the listener is reachable from the host");
    assert!(outside(&format!("kill -0 {me}")));
    let b = env.run("b", "", &script);
    let evs = env.wait(&b, "an exit", |e| !exit_codes(e).is_empty()).await;
    assert_eq!(
        exit_codes(&evs),
        [0],
        "isolation broken (11-13: files, 14: network, 15-16: signal): {:?}",
        env.log_of(&b, &evs)
    );
    listener.set_nonblocking(true).unwrap();
    // The host-side probe above connected once; nothing else did.
    assert!(listener.accept().is_ok());
    assert!(
        listener.accept().is_err(),
        "the sandboxed job reached the listener"
    );
    env.handle.with(|e, now| e.halt(&a, now)).unwrap();
}
