//! The client port's request-head parser, on arbitrary bytes: it must never panic, never
//! claim more bytes than it was given, and give the same answer for the same input however
//! the bytes arrived (as a whole, or as a prefix that asks for more).
#![no_main]

use libfuzzer_sys::fuzz_target;
use push_proto::http::{parse_request_head, RequestHead};
use push_proto::ws;

fuzz_target!(|data: &[u8]| {
    const MAX: usize = 8 * 1024;
    match parse_request_head(data, MAX) {
        Ok(Some((head, used))) => {
            assert!(used <= data.len() && used <= MAX);
            // Everything the handshake does with a parsed head must be total.
            let _ = head.query_param("token");
            let _ = RequestHead::header_has_token(head.connection.as_deref(), "upgrade");
            let _ = ws::check_upgrade(&head);
            // The complete head parses the same without the bytes after it.
            let again = parse_request_head(&data[..used], MAX).unwrap().unwrap();
            assert_eq!(again.0, head);
        }
        Ok(None) => assert!(data.len() < MAX),
        Err(_) => {}
    }
});
