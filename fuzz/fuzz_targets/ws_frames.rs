//! The WebSocket frame decoder, on arbitrary bytes split at an arbitrary point: it must never
//! panic, never hold more than the size limit, and yield the same messages (or the same
//! error) whether the bytes arrive in one read or two.
#![no_main]

use libfuzzer_sys::fuzz_target;
use push_proto::ws::WsReader;

const MAX_MESSAGE: usize = 4096;

fn run(chunks: &[&[u8]]) -> (Vec<push_proto::ws::Message>, Option<String>) {
    let mut reader = WsReader::default();
    let mut out = Vec::new();
    for chunk in chunks {
        if let Err(e) = reader.feed(chunk, MAX_MESSAGE, |m| out.push(m)) {
            return (out, Some(e.to_string()));
        }
        // A partial frame is bounded by its declared size (checked before buffering), plus
        // the header bytes of the frame after it.
        assert!(reader.buffered() <= 2 * (MAX_MESSAGE + 14) + chunk.len());
    }
    (out, None)
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let at = usize::from(split) * rest.len() / 255;
    let whole = run(&[rest]);
    let split = run(&[&rest[..at], &rest[at..]]);
    assert_eq!(whole, split);
});
