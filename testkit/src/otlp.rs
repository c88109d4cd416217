//! A stand-in OTLP/HTTP collector on 127.0.0.1 for the tests of the span exporters (the real
//! one, `traces`, builds DataFusion: too heavy to be every crate's test dependency). It
//! answers `GET /sampling` with one probabilistic rule and takes anything else with 200,
//! reporting each request; [`StandInCollector::set_down`] makes it drop connections unanswered,
//! as a dead collector would.

use std::io::{Read as _, Write as _};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};

/// One request the stand-in took.
#[derive(Debug, Clone)]
pub struct Received {
    /// `METHOD /path?query`.
    pub line: String,
    /// The body (an OTLP `ExportTraceServiceRequest` in protobuf for `POST /v1/traces`).
    pub body: Vec<u8>,
}

/// The stand-in; its thread lives as long as the test process.
#[derive(Debug)]
pub struct StandInCollector {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// Requests, in arrival order.
    pub requests: mpsc::Receiver<Received>,
    down: Arc<AtomicBool>,
}

impl StandInCollector {
    /// Starts one serving `samplingRate` `rate` to every service.
    pub fn start(rate: f64) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let base = format!("http://{}", listener.local_addr().expect("bound address"));
        let (tx, requests) = mpsc::channel();
        let down = Arc::new(AtomicBool::new(false));
        let is_down = down.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                if is_down.load(Ordering::SeqCst) {
                    continue; // dropped unanswered
                }
                let Some(req) = read_request(&mut conn) else {
                    continue;
                };
                let answer = if req.line.starts_with("GET /sampling") {
                    format!(
                        r#"{{"strategyType":"PROBABILISTIC","probabilisticSampling":{{"samplingRate":{rate}}}}}"#
                    )
                } else {
                    String::new()
                };
                let _ = write!(
                    conn,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
                    answer.len()
                );
                if tx.send(req).is_err() {
                    return;
                }
            }
        });
        Self {
            base,
            requests,
            down,
        }
    }

    /// From now on connections are dropped unanswered (`true`) or served again.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }
}

fn read_request(conn: &mut std::net::TcpStream) -> Option<Received> {
    let mut got = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = conn.read(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        got.extend_from_slice(&buf[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        if let Ok(httparse::Status::Complete(head)) = req.parse(&got) {
            let len: usize = req
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok())
                .unwrap_or(0);
            if got.len() >= head + len {
                return Some(Received {
                    line: format!("{} {}", req.method?, req.path?),
                    body: got[head..head + len].to_vec(),
                });
            }
        }
    }
}
