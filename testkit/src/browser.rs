//! A real headless Chromium (Debian's `chromium`) driven over the DevTools protocol, for tests
//! of pages: open a URL, wait for it to load, evaluate JavaScript in it, take a screenshot.
//!
//! One page per browser; the browser is killed and its profile directory removed on drop.
//! Every step panics with the reason on failure (test support, like the rest of testkit).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

/// Where Debian's package puts the browser.
pub const CHROMIUM: &str = "/usr/bin/chromium";

/// How long one DevTools call or one page load may take. Generous: CI machines are shared, and
/// a call returns as soon as Chromium answers.
const DEADLINE: Duration = Duration::from_secs(60);

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A headless Chromium showing one page.
pub struct Browser {
    child: Child,
    ws: Ws,
    next_id: u64,
    /// The page's DevTools session (flattened into the browser's socket).
    session: String,
    profile: PathBuf,
}

impl std::fmt::Debug for Browser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Browser")
            .field("pid", &self.child.id())
            .field("session", &self.session)
            .field("profile", &self.profile)
            .finish_non_exhaustive()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

impl Browser {
    /// Starts Chromium with a fresh profile and a window of `width` × `height` pixels, on a
    /// blank page. Panics, naming the package to install, when Chromium is missing.
    pub async fn start(width: u32, height: u32) -> Browser {
        assert!(
            std::path::Path::new(CHROMIUM).exists(),
            "{CHROMIUM} is missing: `apt-get install chromium` (scripts/test installs it)"
        );
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let profile = std::env::temp_dir().join(format!(
            "testkit-chromium-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&profile).expect("profile directory");
        let mut child = Command::new(CHROMIUM)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--window-size={width},{height}"))
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("chromium starts");
        // "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/…" on stderr.
        let stderr = child.stderr.take().expect("piped stderr");
        let ws_url = tokio::task::spawn_blocking(move || {
            let mut lines = BufReader::new(stderr).lines();
            let url = loop {
                let line = lines
                    .next()
                    .expect("chromium printed its DevTools URL")
                    .expect("chromium's stderr reads");
                if let Some(i) = line.find("ws://") {
                    break line[i..].trim().to_string();
                }
            };
            // Keep draining so Chromium never blocks on a full pipe.
            std::thread::spawn(move || lines.for_each(drop));
            url
        })
        .await
        .expect("reader thread");
        let (ws, _) = tokio_tungstenite::connect_async(ws_url.as_str())
            .await
            .expect("DevTools socket opens");
        let mut b = Browser {
            child,
            ws,
            next_id: 0,
            session: String::new(),
            profile,
        };
        let target = b
            .send(None, "Target.createTarget", json!({"url": "about:blank"}))
            .await;
        let target = target["targetId"].as_str().expect("targetId").to_string();
        let attached = b
            .send(
                None,
                "Target.attachToTarget",
                json!({"targetId": target, "flatten": true}),
            )
            .await;
        b.session = attached["sessionId"]
            .as_str()
            .expect("sessionId")
            .to_string();
        b
    }

    /// Calls a DevTools method on the page and returns its `result`; panics on an error reply.
    pub async fn call(&mut self, method: &str, params: Value) -> Value {
        let session = self.session.clone();
        self.send(Some(&session), method, params).await
    }

    async fn send(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        self.ws
            .send(Message::text(msg.to_string()))
            .await
            .expect("DevTools socket open");
        loop {
            let m = tokio::time::timeout(DEADLINE, self.ws.next())
                .await
                .expect("DevTools answers within a minute")
                .expect("DevTools socket open")
                .expect("DevTools frame reads");
            let Message::Text(text) = m else { continue };
            let mut v: Value = serde_json::from_str(&text).expect("DevTools sends JSON");
            if v["id"] == json!(id) {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].take();
            }
        }
    }

    /// Evaluates `expr` in the page and returns its value (by value: JSON-serialisable).
    pub async fn eval(&mut self, expr: &str) -> Value {
        let mut r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expr, "returnByValue": true}),
            )
            .await;
        r["result"]["value"].take()
    }

    /// Navigates to `url` and waits until the page has loaded (`document.readyState` is
    /// `complete` at that address).
    pub async fn open(&mut self, url: &str) {
        self.call("Page.navigate", json!({"url": url})).await;
        let deadline = Instant::now() + DEADLINE;
        loop {
            let ready = self.eval("document.readyState + ' ' + location.href").await;
            if ready.as_str() == Some(&format!("complete {url}")) {
                return;
            }
            assert!(Instant::now() < deadline, "{url} did not load: {ready}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A PNG of the page as drawn now.
    pub async fn screenshot(&mut self) -> Vec<u8> {
        let r = self
            .call("Page.captureScreenshot", json!({"format": "png"}))
            .await;
        base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().expect("screenshot data"))
            .expect("screenshot is base64")
    }
}
