//! The HTTP/1.1 request head, the only HTTP the client port speaks before it upgrades to
//! WebSocket or starts an event stream.
//!
//! Sans-I/O: [`parse_request_head`] takes the bytes read so far and either asks for more,
//! returns the head and how many bytes it used, or says why the bytes are not a request.
//! Header bytes are parsed by `httparse` (well fuzzed); this module keeps only what the
//! push protocol needs, so a connection drops the raw head as soon as it is parsed.

use std::fmt::Write as _;

/// Headers kept from a client request. Others are read and forgotten.
///
/// Why a fixed set: the head is held only during the handshake, and a struct of the few
/// headers the protocol uses is cheaper to carry and to reason about than a header map.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// `GET`, `POST`, ... as sent.
    pub method: String,
    /// Path without the query string, percent-decoding not applied.
    pub path: String,
    /// Raw query string after `?`, if any.
    pub query: Option<String>,
    /// `Authorization` header value.
    pub authorization: Option<String>,
    /// `Upgrade` header value.
    pub upgrade: Option<String>,
    /// `Connection` header value.
    pub connection: Option<String>,
    /// `Sec-WebSocket-Key` header value.
    pub ws_key: Option<String>,
    /// `Sec-WebSocket-Version` header value.
    pub ws_version: Option<String>,
    /// `Sec-WebSocket-Protocol` header value(s), joined by `, ` when repeated.
    pub ws_protocol: Option<String>,
    /// `Last-Event-ID` header value (SSE resume).
    pub last_event_id: Option<String>,
    /// `Origin` header value.
    pub origin: Option<String>,
}

/// Why a request head was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeadError {
    /// The head grew past the configured limit before its terminating blank line.
    #[error("request head larger than {limit} bytes")]
    TooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// The bytes are not an HTTP/1.x request head.
    #[error("malformed request head: {0}")]
    Malformed(String),
}

/// Most headers a request may carry. Browsers send about 15; 64 leaves room for proxies.
pub const MAX_HEADERS: usize = 64;

/// Parses a request head from `buf`.
///
/// Returns `Ok(None)` when the head is not complete yet and `buf` is still within
/// `max_len`; `Ok(Some((head, used)))` when complete, where `used` is the length of the head
/// including its blank line (bytes after it belong to the next protocol, e.g. WebSocket frames).
pub fn parse_request_head(
    buf: &[u8],
    max_len: usize,
) -> Result<Option<(RequestHead, usize)>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let used = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return if buf.len() >= max_len {
                Err(HeadError::TooLarge { limit: max_len })
            } else {
                Ok(None)
            };
        }
        Err(e) => return Err(HeadError::Malformed(e.to_string())),
    };
    if used > max_len {
        return Err(HeadError::TooLarge { limit: max_len });
    }
    // WebSocket needs HTTP/1.1 (RFC 6455 4.1), and an HTTP/1.1 request without Host is
    // refused with 400 (RFC 9112 3.2); docs/protocol.md promises both.
    if req.version != Some(1) {
        return Err(HeadError::Malformed(
            "only HTTP/1.1 is served on the client port".into(),
        ));
    }
    if !req
        .headers
        .iter()
        .any(|h| h.name.eq_ignore_ascii_case("host"))
    {
        return Err(HeadError::Malformed(
            "missing Host header (required by HTTP/1.1)".into(),
        ));
    }
    let method = req.method.unwrap_or_default().to_owned();
    let target = req.path.unwrap_or_default();
    if !target.starts_with('/') {
        return Err(HeadError::Malformed(
            "request target must be an absolute path".into(),
        ));
    }
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_owned(), Some(q.to_owned())),
        None => (target.to_owned(), None),
    };
    let mut head = RequestHead {
        method,
        path,
        query,
        ..RequestHead::default()
    };
    for h in req.headers.iter() {
        let Ok(value) = std::str::from_utf8(h.value) else {
            // Non-UTF-8 values are legal HTTP but never meaningful for the headers we keep.
            continue;
        };
        let value = value.trim();
        let slot = match h.name.to_ascii_lowercase().as_str() {
            "authorization" => &mut head.authorization,
            "upgrade" => &mut head.upgrade,
            "connection" => &mut head.connection,
            "sec-websocket-key" => &mut head.ws_key,
            "sec-websocket-version" => &mut head.ws_version,
            "sec-websocket-protocol" => &mut head.ws_protocol,
            "last-event-id" => &mut head.last_event_id,
            "origin" => &mut head.origin,
            _ => continue,
        };
        match slot {
            // Repeated list headers are equivalent to one comma-joined header (RFC 9110 5.3).
            Some(existing) => {
                existing.push_str(", ");
                existing.push_str(value);
            }
            None => *slot = Some(value.to_owned()),
        }
    }
    Ok(Some((head, used)))
}

impl RequestHead {
    /// The first value of query parameter `name`, percent-decoded.
    pub fn query_param(&self, name: &str) -> Option<String> {
        let query = self.query.as_deref()?;
        query.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k)? == name).then(|| percent_decode(v))?
        })
    }

    /// Whether a comma-separated header contains `token`, compared case-insensitively.
    pub fn header_has_token(value: Option<&str>, token: &str) -> bool {
        value.is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    }
}

/// Decodes `%XX` escapes and `+` (as space, the form encoding browsers use in queries).
/// Returns `None` for a bad escape or bytes that are not UTF-8.
pub fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                let hi = (hex[0] as char).to_digit(16)?;
                let lo = (hex[1] as char).to_digit(16)?;
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// A complete HTTP/1.1 response with a small body, used for refusals on the client port
/// (401, 404, 429, 503, ...). The connection is closed after it.
pub fn simple_response(
    status: u16,
    reason: &str,
    extra_headers: &[(&str, &str)],
    body: &str,
) -> Vec<u8> {
    let mut head = String::with_capacity(160 + body.len());
    let _ = write!(
        head,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (name, value) in extra_headers {
        let _ = write!(head, "{name}: {value}\r\n");
    }
    head.push_str("\r\n");
    head.push_str(body);
    head.into_bytes()
}

/// A JSON error body: `{"error":"<code>","message":"<message>"}`.
pub fn error_body(code: &str, message: &str) -> String {
    serde_json::json!({ "error": code, "message": message }).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_websocket_upgrade() {
        let raw = b"GET /ws?token=a%2Eb&x=1 HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n\
Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
Sec-WebSocket-Version: 13\r\n\r\nrest";
        let (head, used) = parse_request_head(raw, 8192).unwrap().unwrap();
        assert_eq!(head.method, "GET");
        assert_eq!(head.path, "/ws");
        assert_eq!(head.query_param("token").as_deref(), Some("a.b"));
        assert_eq!(head.query_param("x").as_deref(), Some("1"));
        assert_eq!(head.query_param("missing"), None);
        assert!(RequestHead::header_has_token(
            head.connection.as_deref(),
            "upgrade"
        ));
        assert_eq!(&raw[used..], b"rest");
    }

    #[test]
    fn incomplete_head_asks_for_more_until_the_limit() {
        let raw = b"GET /sse HTTP/1.1\r\nHost: h\r\n";
        assert_eq!(parse_request_head(raw, 8192), Ok(None));
        assert_eq!(
            parse_request_head(raw, 10),
            Err(HeadError::TooLarge { limit: 10 })
        );
    }

    #[test]
    fn garbage_is_malformed() {
        assert!(matches!(
            parse_request_head(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 8192),
            Err(HeadError::Malformed(_))
        ));
        assert!(matches!(
            parse_request_head(b"GET http://x/ws HTTP/1.1\r\n\r\n", 8192),
            Err(HeadError::Malformed(_))
        ));
    }

    #[test]
    fn http_1_0_and_a_missing_host_are_malformed() {
        // RFC 9112 3.2: an HTTP/1.1 request without Host gets 400; WebSocket needs 1.1
        // (RFC 6455 4.1), and docs/protocol.md promises 400 for anything but HTTP/1.1.
        let upgrade = "Upgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
        let old = format!("GET /ws HTTP/1.0\r\nHost: h\r\n{upgrade}");
        assert!(matches!(
            parse_request_head(old.as_bytes(), 8192),
            Err(HeadError::Malformed(m)) if m.contains("HTTP/1.1")
        ));
        let no_host = format!("GET /ws HTTP/1.1\r\n{upgrade}");
        assert!(matches!(
            parse_request_head(no_host.as_bytes(), 8192),
            Err(HeadError::Malformed(m)) if m.contains("Host")
        ));
        let sse = b"GET /sse HTTP/1.0\r\nHost: h\r\n\r\n";
        assert!(parse_request_head(sse, 8192).is_err());
        let ok = format!("GET /ws HTTP/1.1\r\nhost: h\r\n{upgrade}");
        assert!(parse_request_head(ok.as_bytes(), 8192).unwrap().is_some());
    }

    #[test]
    fn repeated_headers_are_joined() {
        let raw = b"GET /ws HTTP/1.1\r\nHost: h\r\nSec-WebSocket-Protocol: push.v1\r\nSec-WebSocket-Protocol: a.b.c\r\n\r\n";
        let (head, _) = parse_request_head(raw, 8192).unwrap().unwrap();
        assert_eq!(head.ws_protocol.as_deref(), Some("push.v1, a.b.c"));
    }

    #[test]
    fn percent_decoding_rejects_bad_escapes() {
        assert_eq!(percent_decode("a%20b+c").as_deref(), Some("a b c"));
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%2"), None);
        assert_eq!(percent_decode("%ff"), None);
    }
}
