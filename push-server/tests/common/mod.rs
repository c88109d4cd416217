//! Test support: a real server on 127.0.0.1 port 0, real WebSocket (tokio-tungstenite) and
//! SSE (raw TCP) clients, and a minimal HTTP/1.1 client for the admin port.

#![allow(dead_code)] // each test file uses a different part

use std::io::BufRead as _;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use push_server::{Config, Server};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const SECRET: &str = "integration-test-secret-0123456789";

/// Upper bound for any single wait in a test: generous, so a loaded CI machine does not
/// fail a correct server; a hang still ends the test.
pub const WAIT: Duration = Duration::from_secs(10);

pub fn config() -> Config {
    Config::local_test(SECRET)
}

pub async fn start(cfg: Config) -> Server {
    Server::start(cfg).await.expect("server starts")
}

pub fn token(server: &Server, user: &str, device: Option<&str>) -> String {
    server.mint_token(user, device, Duration::from_secs(3600))
}

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Opens a WebSocket with the token in the query string.
pub async fn ws_connect(server: &Server, token: &str) -> Ws {
    let url = format!("ws://{}/ws?token={token}", server.client_addr());
    let (ws, resp) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
        .await
        .expect("connect in time")
        .expect("websocket handshake");
    assert_eq!(resp.status(), 101);
    ws
}

/// Opens a WebSocket with extra request headers; returns the handshake error if refused.
pub async fn ws_connect_with(
    server: &Server,
    query: &str,
    headers: &[(&str, &str)],
) -> Result<
    (
        Ws,
        tokio_tungstenite::tungstenite::handshake::client::Response,
    ),
    tokio_tungstenite::tungstenite::Error,
> {
    let mut req = format!("ws://{}/ws{query}", server.client_addr())
        .into_client_request()
        .unwrap();
    for (k, v) in headers {
        let name =
            tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(k.as_bytes()).unwrap();
        req.headers_mut()
            .insert(name, v.parse().expect("header value"));
    }
    tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(req))
        .await
        .expect("connect in time")
}

/// The next JSON text message, skipping pings and pongs.
pub async fn ws_next_json(ws: &mut Ws) -> serde_json::Value {
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("message in time")
            .expect("stream open")
            .expect("valid frame");
        match msg {
            Message::Text(t) => return serde_json::from_str(&t).expect("JSON text"),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

/// Reads until the server closes; returns the close code.
pub async fn ws_close_code(ws: &mut Ws) -> Option<u16> {
    loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("close in time")
        {
            Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return None,
        }
    }
}

pub async fn ws_send_json(ws: &mut Ws, v: serde_json::Value) {
    ws.send(Message::Text(v.to_string().into())).await.unwrap();
}

/// One Server-Sent Event.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Event {
    pub event: String,
    pub id: Option<String>,
    pub data: String,
    /// The `traceparent:` field of a traced message.
    pub traceparent: Option<String>,
    /// Comment lines seen before this event (heartbeats).
    pub comments: usize,
}

/// A raw SSE client.
pub struct Sse {
    pub reader: BufReader<TcpStream>,
    pub status: u16,
    pub head: String,
}

/// Sends a raw GET and reads the response head.
pub async fn sse_connect_raw(addr: SocketAddr, target: &str, headers: &[(&str, &str)]) -> Sse {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut req = format!("GET {target} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut reader = BufReader::new(stream);
    let mut head = String::new();
    loop {
        let mut line = String::new();
        let n = tokio::time::timeout(WAIT, reader.read_line(&mut line))
            .await
            .expect("head in time")
            .unwrap();
        if n == 0 || line == "\r\n" {
            break;
        }
        head.push_str(&line);
    }
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Sse {
        reader,
        status,
        head,
    }
}

pub async fn sse_connect(server: &Server, token: &str) -> Sse {
    let auth = format!("Bearer {token}");
    let sse = sse_connect_raw(server.client_addr(), "/sse", &[("Authorization", &auth)]).await;
    assert_eq!(sse.status, 200, "{}", sse.head);
    sse
}

impl Sse {
    /// The next event; `None` when the server closed the stream.
    pub async fn next_event(&mut self) -> Option<Event> {
        let mut ev = Event::default();
        let mut data_lines: Vec<String> = Vec::new();
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(WAIT, self.reader.read_line(&mut line))
                .await
                .expect("event in time")
                .ok()?;
            if n == 0 {
                return None;
            }
            let line = line.trim_end_matches('\n');
            if line.is_empty() {
                if data_lines.is_empty() && ev.event.is_empty() {
                    continue; // end of a comment-only block
                }
                ev.data = data_lines.join("\n");
                return Some(ev);
            }
            if line.starts_with(':') {
                ev.comments += 1;
            } else if let Some(v) = line.strip_prefix("event: ") {
                ev.event = v.to_owned();
            } else if let Some(v) = line.strip_prefix("id: ") {
                ev.id = Some(v.to_owned());
            } else if let Some(v) = line.strip_prefix("traceparent: ") {
                ev.traceparent = Some(v.to_owned());
            } else if let Some(v) = line.strip_prefix("data: ") {
                data_lines.push(v.to_owned());
            }
        }
    }

    /// Reads until the server closes the stream (or WAIT passes).
    pub async fn closed(&mut self) -> bool {
        let mut buf = [0u8; 1024];
        loop {
            match tokio::time::timeout(WAIT, self.reader.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }
}

/// An HTTP response from the admin port.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub head: String,
    pub body: String,
}

impl HttpResponse {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

/// A one-shot HTTP/1.1 request (Connection: close).
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpResponse {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut raw))
        .await
        .expect("response in time")
        .unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    HttpResponse {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    }
}

/// `POST /v1/push/{user}` with a text body.
pub async fn push(server: &Server, user: &str, body: &str) -> serde_json::Value {
    let r = http(
        server.admin_addr(),
        "POST",
        &format!("/v1/push/{user}"),
        &[],
        body.as_bytes(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

/// The value of one sample in /metrics, e.g. `push_disconnects_total{reason="rotated"}`.
pub async fn metric(server: &Server, sample: &str) -> f64 {
    let r = http(server.admin_addr(), "GET", "/metrics", &[], b"").await;
    r.body
        .lines()
        .find_map(|l| {
            l.strip_prefix(sample)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0.0)
}

#[allow(unused_imports)] // not every test binary polls
pub use testkit::eventually;

/// A WebSocket opened by hand, for tests that need control over every byte.
pub struct RawWs {
    pub stream: TcpStream,
}

/// Opens a WebSocket over `stream` by hand and reads the 101 response and the hello frame.
pub async fn raw_ws_over(mut stream: TcpStream, addr: SocketAddr, token: &str) -> RawWs {
    let req = format!(
        "GET /ws?token={token} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        tokio::time::timeout(WAIT, stream.read_exact(&mut b))
            .await
            .expect("head in time")
            .unwrap();
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    let mut ws = RawWs { stream };
    let (op, hello) = ws.read_frame().await.expect("hello");
    assert_eq!(op, 1);
    assert!(String::from_utf8_lossy(&hello).contains("\"hello\""));
    ws
}

pub async fn raw_ws(server: &Server, token: &str) -> RawWs {
    let stream = TcpStream::connect(server.client_addr()).await.unwrap();
    raw_ws_over(stream, server.client_addr(), token).await
}

impl RawWs {
    /// Reads one unmasked server frame: (opcode, payload). `None` at EOF.
    pub async fn read_frame(&mut self) -> Option<(u8, Vec<u8>)> {
        let s = &mut self.stream;
        let mut h = [0u8; 2];
        tokio::time::timeout(WAIT, s.read_exact(&mut h))
            .await
            .expect("frame in time")
            .ok()?;
        let len = match h[1] & 0x7F {
            126 => {
                let mut b = [0u8; 2];
                s.read_exact(&mut b).await.ok()?;
                u64::from(u16::from_be_bytes(b))
            }
            127 => {
                let mut b = [0u8; 8];
                s.read_exact(&mut b).await.ok()?;
                u64::from_be_bytes(b)
            }
            n => u64::from(n),
        };
        let mut payload = vec![0u8; len as usize];
        s.read_exact(&mut payload).await.ok()?;
        Some((h[0] & 0x0F, payload))
    }

    /// Reads frames until a close frame; returns its code. `None` if the stream ended first.
    pub async fn close_code(&mut self) -> Option<u16> {
        loop {
            let (op, payload) = self.read_frame().await?;
            if op == 8 {
                return payload.get(..2).map(|b| u16::from_be_bytes([b[0], b[1]]));
            }
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }
}

/// A `push-server` process, killed if the test ends early.
pub const BIN: &str = env!("CARGO_BIN_EXE_push-server");

pub struct Proc {
    pub child: Child,
    pub client: SocketAddr,
    pub admin: SocketAddr,
    pub token: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the `push-server` binary on port 0 with [`SECRET`] and reads its banner (which,
/// on a pipe, prints no token: the sample token is minted here with the same secret).
pub fn spawn(args: &[&str], envs: &[(&str, &str)]) -> Proc {
    let mut cmd = Command::new(BIN);
    cmd.args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .env("PUSH_AUTH_SECRET", SECRET);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn push-server");
    let stdout = child.stdout.take().unwrap();
    let mut lines = std::io::BufReader::new(stdout).lines();
    let (mut client, mut admin) = (None, None);
    for line in lines.by_ref() {
        let line = line.unwrap();
        let t = line.trim();
        if let Some(rest) = t.strip_prefix("clients  ws://") {
            client = rest.split('/').next().and_then(|a| a.parse().ok());
        }
        if let Some(rest) = t.strip_prefix("admin    http://") {
            admin = rest.split_whitespace().next().and_then(|a| a.parse().ok());
        }
        if t.starts_with("token ") {
            break;
        }
    }
    let token = push_server::auth::Authenticator::new(SECRET.as_bytes(), true).mint(
        "demo",
        None,
        Duration::from_secs(3600),
    );
    // Keep draining stdout so the process never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Proc {
        child,
        client: client.expect("banner names the client address"),
        admin: admin.expect("banner names the admin address"),
        token,
    }
}
