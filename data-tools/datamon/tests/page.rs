//! The grid page in a real headless Chromium (Debian's `chromium`), driven over the DevTools
//! protocol: seeded markers → the right class and computed colour per cell, the owner filter
//! and owner page, links to explanations; a screenshot is kept under
//! `target/test-artifacts/datamon-grid.png`.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use support::{Served, Tree};
use tokio_tungstenite::tungstenite::Message;

const CHROMIUM: &str = "/usr/bin/chromium";

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A headless Chromium, killed on drop.
struct Browser {
    child: std::process::Child,
    ws: Ws,
    next_id: u64,
    session: String,
    _profile: Tree,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Browser {
    async fn start() -> Browser {
        assert!(
            std::path::Path::new(CHROMIUM).exists(),
            "{CHROMIUM} is missing: `apt-get install chromium` (scripts/test installs it)"
        );
        let profile = Tree::new("chromium-profile");
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
                "--window-size=1000,400",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.dir.display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("chromium starts");
        let stderr = child.stderr.take().unwrap();
        let ws_url = tokio::task::spawn_blocking(move || {
            let mut lines = BufReader::new(stderr).lines();
            let url = loop {
                let line = lines
                    .next()
                    .expect("chromium printed its DevTools URL")
                    .unwrap();
                if let Some(i) = line.find("ws://") {
                    break line[i..].trim().to_string();
                }
            };
            // Keep draining so Chromium never blocks on a full pipe.
            std::thread::spawn(move || for _ in lines {});
            url
        })
        .await
        .unwrap();
        let (ws, _) = tokio_tungstenite::connect_async(ws_url.as_str())
            .await
            .unwrap();
        let mut b = Browser {
            child,
            ws,
            next_id: 0,
            session: String::new(),
            _profile: profile,
        };
        let target = b
            .call(None, "Target.createTarget", json!({"url": "about:blank"}))
            .await;
        let target = target["targetId"].as_str().unwrap().to_string();
        let attached = b
            .call(
                None,
                "Target.attachToTarget",
                json!({"targetId": target, "flatten": true}),
            )
            .await;
        b.session = attached["sessionId"].as_str().unwrap().to_string();
        b
    }

    async fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        self.ws.send(Message::text(msg.to_string())).await.unwrap();
        loop {
            let m = tokio::time::timeout(Duration::from_secs(60), self.ws.next())
                .await
                .expect("DevTools answers within a minute")
                .expect("DevTools connection open")
                .unwrap();
            let Message::Text(text) = m else { continue };
            let v: Value = serde_json::from_str(&text).unwrap();
            if v["id"] == json!(id) {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    async fn eval(&mut self, expr: &str) -> Value {
        let s = self.session.clone();
        let r = self
            .call(
                Some(&s),
                "Runtime.evaluate",
                json!({"expression": expr, "returnByValue": true}),
            )
            .await;
        r["result"]["value"].clone()
    }

    /// Navigates and waits until the page has loaded.
    async fn open(&mut self, url: &str) {
        let s = self.session.clone();
        self.call(Some(&s), "Page.navigate", json!({"url": url}))
            .await;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ready = self.eval("document.readyState + ' ' + location.href").await;
            if ready.as_str() == Some(&format!("complete {url}")) {
                return;
            }
            assert!(Instant::now() < deadline, "{url} did not load: {ready}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// (dataset, partition, class, computed background colour, link) of every cell.
    async fn cells(&mut self) -> Vec<(String, String, String, String, String)> {
        let v = self
            .eval(
                "JSON.stringify(Array.from(document.querySelectorAll('td.cell')).map(td => [\
                   td.closest('tr').dataset.dataset, td.dataset.partition, \
                   td.className.replace('cell ', ''), getComputedStyle(td).backgroundColor, \
                   td.querySelector('a').getAttribute('href')]))",
            )
            .await;
        serde_json::from_str(v.as_str().unwrap()).unwrap()
    }

    async fn screenshot(&mut self) -> Vec<u8> {
        let s = self.session.clone();
        let r = self
            .call(Some(&s), "Page.captureScreenshot", json!({"format": "png"}))
            .await;
        base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().unwrap())
            .unwrap()
    }
}

const GREEN: &str = "rgb(46, 160, 67)";
const AMBER: &str = "rgb(230, 160, 0)";
const RED: &str = "rgb(207, 34, 46)";
const GREY: &str = "rgb(200, 200, 200)";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grid_shows_the_right_colours_in_chromium() {
    let tree = Tree::new("page");
    tree.declare(
        r#"
datasets:
  - id: a.steady
    owner: { team: alpha, contact: a@example.com }
    location: "file://{root}/a/{date}/{hour}/"
    partitioning: hourly
    sla: PT1H
  - id: b.slow
    owner: { team: alpha, contact: a@example.com }
    location: "file://{root}/b/{date}/{hour}/"
    partitioning: hourly
    sla: PT1H
  - id: c.broken
    owner: { team: beta, contact: b@example.com }
    location: "file://{root}/c/{date}/{hour}/"
    partitioning: hourly
    sla: PT1H
"#,
    );
    // At 14:30 with a window of 4: hours 11, 12 are due (13:00, 14:00); 13, 14 are pending.
    tree.land("a", "2026-11-29T11", "2026-11-29T12:05:00Z");
    tree.land("a", "2026-11-29T12", "2026-11-29T13:05:00Z");
    tree.land("b", "2026-11-29T11", "2026-11-29T13:30:00Z"); // 30 min late
    let served = Served::start(tree.cmd("2026-11-29T14:30:00Z"), &["--window", "4"]);

    let mut browser = Browser::start().await;
    browser.open(&format!("{}/", served.url)).await;
    let cells = browser.cells().await;
    let expect = [
        ("a.steady", "2026-11-29T11", "on_time", GREEN),
        ("a.steady", "2026-11-29T12", "on_time", GREEN),
        ("a.steady", "2026-11-29T13", "pending", GREY),
        ("a.steady", "2026-11-29T14", "pending", GREY),
        ("b.slow", "2026-11-29T11", "late", AMBER),
        ("b.slow", "2026-11-29T12", "missing", RED),
        ("b.slow", "2026-11-29T13", "pending", GREY),
        ("b.slow", "2026-11-29T14", "pending", GREY),
        ("c.broken", "2026-11-29T11", "missing", RED),
        ("c.broken", "2026-11-29T12", "missing", RED),
        ("c.broken", "2026-11-29T13", "pending", GREY),
        ("c.broken", "2026-11-29T14", "pending", GREY),
    ];
    assert_eq!(cells.len(), expect.len(), "{cells:?}");
    for (got, want) in cells.iter().zip(expect) {
        assert_eq!(
            (
                got.0.as_str(),
                got.1.as_str(),
                got.2.as_str(),
                got.3.as_str()
            ),
            want,
            "{cells:?}"
        );
        assert_eq!(got.4, format!("/explain/{}/{}", want.0, want.1));
    }
    let png = browser.screenshot().await;
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 1000);
    let artifacts = std::path::Path::new(env!("CARGO_BIN_EXE_datamon"))
        .parent()
        .and_then(|p| p.parent())
        .unwrap()
        .join("test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    std::fs::write(artifacts.join("datamon-grid.png"), &png).unwrap();

    // The owner filter and the owner page show only that team's rows.
    browser.open(&format!("{}/?owner=alpha", served.url)).await;
    let rows: std::collections::BTreeSet<String> =
        browser.cells().await.into_iter().map(|c| c.0).collect();
    assert_eq!(rows.into_iter().collect::<Vec<_>>(), ["a.steady", "b.slow"]);
    browser.open(&format!("{}/owner/beta", served.url)).await;
    let cells = browser.cells().await;
    assert_eq!(cells.len(), 4);
    assert!(cells.iter().all(|c| c.0 == "c.broken"));
    let title = browser
        .eval("document.querySelector('h1').textContent")
        .await;
    assert_eq!(title, "Datasets of beta");

    // A cell's link leads to its explanation.
    browser
        .open(&format!("{}/explain/b.slow/2026-11-29T12", served.url))
        .await;
    let why = browser
        .eval("document.getElementById('why').textContent")
        .await;
    assert!(
        why.as_str()
            .unwrap()
            .contains("b.slow 2026-11-29T12 is missing"),
        "{why}"
    );
}
