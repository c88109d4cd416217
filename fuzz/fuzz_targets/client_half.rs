//! The client halves (what loadtest, bench and other clients read from a server), on
//! arbitrary bytes split at an arbitrary point: the server-frame decoder with its message
//! assembly, and the SSE event parser with the server-message parser behind both. They must
//! never panic, never use more bytes than given, and yield the same messages (or the same
//! error) whether the bytes arrive in one read or two.
#![no_main]

use libfuzzer_sys::fuzz_target;
use push_proto::message::{parse_server_message, Received};
use push_proto::{sse, ws};

const MAX_MESSAGE: usize = 4096;

/// Feeds `chunks` to one reader as a client does: append, decode, drop what was used.
fn ws_run(chunks: &[&[u8]]) -> (Vec<ws::Message>, Option<String>) {
    let mut reader = ws::WsReader::default();
    let mut pending = Vec::new();
    let mut out = Vec::new();
    for chunk in chunks {
        pending.extend_from_slice(chunk);
        loop {
            match reader.next_from_server(&pending, MAX_MESSAGE) {
                Ok((message, used)) => {
                    assert!(used <= pending.len());
                    pending.drain(..used);
                    match message {
                        Some(ws::Message::Text(text)) => {
                            let _ = parse_server_message(&text);
                            out.push(ws::Message::Text(text));
                        }
                        Some(m) => out.push(m),
                        None => break,
                    }
                }
                Err(e) => return (out, Some(e.to_string())),
            }
        }
    }
    (out, None)
}

fn sse_run(chunks: &[&[u8]]) -> Vec<(sse::SseEvent, Option<Received>)> {
    let mut pending = Vec::new();
    let mut out = Vec::new();
    for chunk in chunks {
        pending.extend_from_slice(chunk);
        while let Some((event, used)) = sse::parse_event(&pending) {
            assert!(used > 0 && used <= pending.len());
            pending.drain(..used);
            let received = Received::from_sse(&event);
            out.push((event, received));
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let at = usize::from(split) * rest.len() / 255;
    assert_eq!(ws_run(&[rest]), ws_run(&[&rest[..at], &rest[at..]]));
    assert_eq!(sse_run(&[rest]), sse_run(&[&rest[..at], &rest[at..]]));
});
