//! Server-Sent Events (the `text/event-stream` format of the HTML standard): the server's
//! encoder, and a client-side parser of one event at a time.
//!
//! The response carries neither `Content-Length` nor chunked encoding: an event stream ends
//! when the connection closes (RFC 9112 section 6.3), which saves a chunk header per event
//! and keeps every encoded event a plain byte string that can be shared between clients.

use bytes::{BufMut, Bytes, BytesMut};

/// The response head that opens an event stream.
pub const RESPONSE_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\n\
Content-Type: text/event-stream\r\n\
Cache-Control: no-cache, no-transform\r\n\
Connection: keep-alive\r\n\
X-Accel-Buffering: no\r\n\r\n";

/// A heartbeat: a comment line, ignored by `EventSource` but enough to keep NATs and
/// proxies from closing an idle stream, and to find out that the peer has gone.
pub const HEARTBEAT: &[u8] = b": hb\n\n";

/// Encodes one event. `data` is split on line breaks (`\n`, `\r\n` or `\r`) into several
/// `data:` lines, which the client joins back with `\n`.
pub fn encode_event(event: &str, id: Option<u64>, data: &[u8]) -> Bytes {
    encode_event_with(event, id, &[], data)
}

/// [`encode_event`] with more fields (`name: value` lines before the data; `EventSource`
/// ignores names it does not know, other parsers read them). A field whose value holds a
/// line break is left out: it would end the field, and could forge the rest of an event.
pub fn encode_event_with(
    event: &str,
    id: Option<u64>,
    fields: &[(&str, &str)],
    data: &[u8],
) -> Bytes {
    let extra: usize = fields.iter().map(|(n, v)| n.len() + v.len() + 3).sum();
    let mut out = BytesMut::with_capacity(data.len() + event.len() + extra + 40);
    if let Some(id) = id {
        out.put_slice(b"id: ");
        out.put_slice(id.to_string().as_bytes());
        out.put_u8(b'\n');
    }
    out.put_slice(b"event: ");
    out.put_slice(event.as_bytes());
    out.put_u8(b'\n');
    for (name, value) in fields {
        if value.contains(['\n', '\r']) {
            continue;
        }
        out.put_slice(name.as_bytes());
        out.put_slice(b": ");
        out.put_slice(value.as_bytes());
        out.put_u8(b'\n');
    }
    let mut rest = data;
    loop {
        out.put_slice(b"data: ");
        match rest.iter().position(|&b| b == b'\n' || b == b'\r') {
            Some(i) => {
                out.put_slice(&rest[..i]);
                out.put_u8(b'\n');
                let skip = if rest[i] == b'\r' && rest.get(i + 1) == Some(&b'\n') {
                    2
                } else {
                    1
                };
                rest = &rest[i + skip..];
            }
            None => {
                out.put_slice(rest);
                out.put_u8(b'\n');
                break;
            }
        }
    }
    out.put_u8(b'\n');
    out.freeze()
}

/// One event as a client reads it: the fields of one blank-line-terminated block.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` field, if any (`EventSource` calls an unnamed event `message`).
    pub event: Option<String>,
    /// The `id:` field as sent (push-server's are numbers; other servers' need not be).
    pub id: Option<String>,
    /// The `data:` lines joined with `\n`; empty for a comment-only block (a heartbeat).
    pub data: String,
    /// The `traceparent:` field (push-server's `message` events of a traced message).
    pub traceparent: Option<String>,
}

impl SseEvent {
    /// A block with no event name and no data: a heartbeat comment (or nothing at all).
    pub fn is_heartbeat(&self) -> bool {
        self.event.is_none() && self.data.is_empty()
    }
}

/// Parses one event (or heartbeat comment block) at the front of `buf`: `None` until the
/// blank line that ends it has arrived, then the event and the bytes it used.
///
/// push-server ends lines with `\n` only; `\r\n` is accepted too (a lone `\r` is not).
/// Lines are read one by one, so the answer does not depend on how the bytes were split
/// into reads. `data:` lines are joined with `\n`, as `EventSource` does; one space after
/// the colon is not part of the value.
pub fn parse_event(buf: &[u8]) -> Option<(SseEvent, usize)> {
    let mut event = SseEvent::default();
    let mut data = Vec::<String>::new();
    let mut at = 0;
    loop {
        let eol = at + buf[at..].iter().position(|&b| b == b'\n')?;
        let raw = &buf[at..eol];
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        at = eol + 1;
        if raw.is_empty() {
            break;
        }
        let line = String::from_utf8_lossy(raw);
        if line.starts_with(':') {
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((&line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => event.event = Some(value.to_owned()),
            "id" => event.id = Some(value.to_owned()),
            "data" => data.push(value.to_owned()),
            "traceparent" => event.traceparent = Some(value.to_owned()),
            _ => {}
        }
    }
    event.data = data.join("\n");
    Some((event, at))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_back_what_it_encodes() {
        let mut wire = HEARTBEAT.to_vec();
        wire.extend_from_slice(&encode_event("message", Some(7), b"a\nb"));
        let (hb, used) = parse_event(&wire).unwrap();
        assert!(hb.is_heartbeat());
        let (ev, used2) = parse_event(&wire[used..]).unwrap();
        assert_eq!(used + used2, wire.len());
        assert_eq!(
            ev,
            SseEvent {
                event: Some("message".into()),
                id: Some("7".into()),
                data: "a\nb".into(),
                traceparent: None,
            }
        );
        // Incomplete until the blank line; CRLF line ends are accepted.
        assert!(parse_event(b"id: 1\nevent: message\ndata: x\n").is_none());
        let (ev, _) = parse_event(b"id: 1795694168:0\r\ndata:{\"s\":1}\r\n\r\n").unwrap();
        assert_eq!(ev.id.as_deref(), Some("1795694168:0"));
        assert_eq!(ev.data, r#"{"s":1}"#);
        assert!(!ev.is_heartbeat());
        // The same event whatever the split: the first blank line ends it.
        let wire = b"data: a\r\n\r\ndata: b\n\n";
        for split in 0..wire.len() {
            let whole = parse_event(wire).unwrap();
            let first = parse_event(&wire[..split]);
            assert!(
                first.is_none() || first == Some(whole.clone()),
                "split at {split}"
            );
            assert_eq!(
                whole,
                (
                    SseEvent {
                        data: "a".into(),
                        ..Default::default()
                    },
                    11
                )
            );
        }
    }

    #[test]
    fn single_line_event() {
        assert_eq!(
            &encode_event("message", Some(7), b"hello")[..],
            b"id: 7\nevent: message\ndata: hello\n\n"
        );
    }

    #[test]
    fn multi_line_data_becomes_several_data_lines() {
        assert_eq!(
            &encode_event("message", None, b"a\nb\r\nc\rd")[..],
            b"event: message\ndata: a\ndata: b\ndata: c\ndata: d\n\n"
        );
        assert_eq!(
            &encode_event("message", None, b"end\n")[..],
            b"event: message\ndata: end\ndata: \n\n"
        );
    }
}
