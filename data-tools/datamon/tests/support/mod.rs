//! Shared test support: temporary trees of declarations and markers, the real `datamon`
//! binary, and small HTTP servers on 127.0.0.1:0.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

/// A directory removed on drop.
pub struct Tree {
    pub dir: PathBuf,
}

impl Tree {
    pub fn new(name: &str) -> Tree {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "datamon-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("data")).unwrap();
        Tree { dir }
    }

    pub fn decls(&self) -> PathBuf {
        self.dir.join("decl.yaml")
    }

    pub fn root(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub fn state(&self) -> PathBuf {
        self.dir.join("state.sqlite")
    }

    pub fn declare(&self, yaml: &str) {
        std::fs::write(self.decls(), yaml).unwrap();
    }

    /// Writes `{root}/{kind}/{date}/{hour}/_SUCCESS` with a JSON `completed_at`.
    pub fn land(&self, kind: &str, hour: &str, completed_at: &str) {
        let (date, h) = hour.split_once('T').unwrap();
        let dir = self.root().join(kind).join(date).join(h);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("part-0.parquet"), b"PAR1").unwrap();
        std::fs::write(
            dir.join("_SUCCESS"),
            format!(r#"{{"type":"{kind}","hour":"{hour}","completed_at":"{completed_at}","accepted":1,"staged":1,"unique":1,"duplicates":0,"late":0}}"#),
        )
        .unwrap();
    }

    /// `datamon` with this tree's declarations, root and state.
    pub fn cmd(&self, now: &str) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_datamon"));
        c.arg("--declarations")
            .arg(self.decls())
            .arg("--root")
            .arg(self.root())
            .arg("--state")
            .arg(self.state())
            .arg("--now")
            .arg(now)
            .env_remove("DATAMON_STYX")
            .env_remove("DATAMON_WEBHOOK");
        c
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A running `datamon serve`, killed on drop.
pub struct Served {
    pub child: Child,
    pub url: String,
}

impl Served {
    /// Starts `cmd serve --listen 127.0.0.1:0 extra…` and waits for its address line.
    pub fn start(mut cmd: Command, extra: &[&str]) -> Served {
        cmd.arg("serve")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .args(extra);
        let (child, url) =
            testkit::spawn_announced(cmd.stderr(Stdio::inherit()), "datamon serving on ");
        Served { child, url }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// GET a URL; (status, body).
pub async fn get(url: &str) -> (u16, String) {
    let (code, body) = datamon::http::HttpClient::default().get(url).await.unwrap();
    (code, String::from_utf8_lossy(&body).into_owned())
}

/// Polls `cond` every 100 ms until it is true; panics with `what` after a generous minute.
pub async fn wait_for<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if cond().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

/// A tiny HTTP server that answers every request with a fixed (status, body) per path, and
/// records what was POSTed.
#[derive(Clone)]
pub struct Receiver {
    pub addr: std::net::SocketAddr,
    pub bodies: Arc<Mutex<Vec<serde_json::Value>>>,
    pub paths: Arc<Mutex<Vec<String>>>,
}

impl Receiver {
    /// Serves on `listener`; `answer(path)` gives (status, body).
    pub fn start(
        listener: tokio::net::TcpListener,
        answer: impl Fn(&str) -> (u16, String) + Send + Sync + 'static,
    ) -> Receiver {
        let addr = listener.local_addr().unwrap();
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let paths = Arc::new(Mutex::new(Vec::new()));
        let answer = Arc::new(answer);
        let (b, p) = (bodies.clone(), paths.clone());
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let (b, p, answer) = (b.clone(), p.clone(), answer.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let (b, p, answer) = (b.clone(), p.clone(), answer.clone());
                            async move {
                                let path = req.uri().path().to_string();
                                p.lock().unwrap().push(path.clone());
                                let body = req.into_body().collect().await.unwrap().to_bytes();
                                if !body.is_empty() {
                                    b.lock()
                                        .unwrap()
                                        .push(serde_json::from_slice(&body).unwrap());
                                }
                                let (code, text) = answer(&path);
                                Ok::<_, std::convert::Infallible>(
                                    hyper::Response::builder()
                                        .status(code)
                                        .header("content-type", "application/json")
                                        .body(Full::new(Bytes::from(text)))
                                        .unwrap(),
                                )
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Receiver {
            addr,
            bodies,
            paths,
        }
    }

    pub fn bodies(&self) -> Vec<serde_json::Value> {
        self.bodies.lock().unwrap().clone()
    }
}

pub fn exists(p: &Path) -> bool {
    p.exists()
}
