//! Server-Sent Events encoding (the `text/event-stream` format of the HTML standard).
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
    let mut out = BytesMut::with_capacity(data.len() + event.len() + 40);
    if let Some(id) = id {
        out.put_slice(b"id: ");
        out.put_slice(id.to_string().as_bytes());
        out.put_u8(b'\n');
    }
    out.put_slice(b"event: ");
    out.put_slice(event.as_bytes());
    out.put_u8(b'\n');
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

#[cfg(test)]
mod tests {
    use super::*;

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
