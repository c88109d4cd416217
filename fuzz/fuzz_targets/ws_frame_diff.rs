//! Differential: our frame decoder against tungstenite's frame-header parser, on arbitrary
//! bytes. Where tungstenite reads a complete header, both must agree on what the frame is
//! (final bit, opcode, length, unmasked payload, bytes used) or, for a frame a server must
//! refuse (reserved bits, unmasked, bad control frame, 64-bit length with its top bit set,
//! over the size limit), ours must refuse it with the right close code. Where tungstenite
//! needs more bytes, ours must not claim a frame.
#![no_main]

use std::io::Cursor;

use libfuzzer_sys::fuzz_target;
use push_proto::ws::{close_code, decode_frame, OpCode};
use tungstenite::protocol::frame::coding::{Control, Data, OpCode as TOpCode};
use tungstenite::protocol::frame::FrameHeader;

/// Small, so that the fuzzer reaches the size limit often.
const MAX_PAYLOAD: usize = 1024;

fn same_opcode(ours: OpCode, theirs: TOpCode) -> bool {
    matches!(
        (ours, theirs),
        (OpCode::Continuation, TOpCode::Data(Data::Continue))
            | (OpCode::Text, TOpCode::Data(Data::Text))
            | (OpCode::Binary, TOpCode::Data(Data::Binary))
            | (OpCode::Close, TOpCode::Control(Control::Close))
            | (OpCode::Ping, TOpCode::Control(Control::Ping))
            | (OpCode::Pong, TOpCode::Control(Control::Pong))
    )
}

fuzz_target!(|data: &[u8]| {
    let ours = decode_frame(data, MAX_PAYLOAD);
    let mut cursor = Cursor::new(data);
    let (header, len) = match FrameHeader::parse(&mut cursor) {
        // tungstenite refuses only reserved opcodes here; so must we.
        Err(_) => {
            assert!(ours.is_err(), "tungstenite refused, ours gave {ours:?}");
            return;
        }
        // Incomplete header: ours may already refuse it from its first bytes, but it
        // cannot have a frame.
        Ok(None) => {
            assert!(!matches!(ours, Ok(Some(_))), "frame from an incomplete header");
            return;
        }
        Ok(Some(h)) => h,
    };
    let header_len = cursor.position() as usize;
    let control = matches!(header.opcode, TOpCode::Control(_));
    let protocol_error = header.rsv1
        || header.rsv2
        || header.rsv3
        || header.mask.is_none()
        || (control && (!header.is_final || len > 125))
        || len >> 63 != 0;
    if protocol_error {
        let err = ours.expect_err("a frame a server must refuse was accepted");
        assert_eq!(err.close_code(), close_code::PROTOCOL_ERROR, "{err}");
        return;
    }
    if len > MAX_PAYLOAD as u64 {
        let err = ours.expect_err("a frame over the limit was accepted");
        assert_eq!(err.close_code(), close_code::TOO_BIG, "{err}");
        return;
    }
    let len = len as usize;
    let Some(masked) = data.get(header_len..header_len + len) else {
        assert_eq!(ours, Ok(None), "frame before its payload arrived");
        return;
    };
    let mask = header.mask.expect("checked above");
    let payload: Vec<u8> = masked
        .iter()
        .enumerate()
        .map(|(i, b)| b ^ mask[i % 4])
        .collect();
    let (frame, used) = ours
        .expect("a valid frame was refused")
        .expect("a complete frame was not decoded");
    assert_eq!(used, header_len + len);
    assert_eq!(frame.fin, header.is_final);
    assert!(same_opcode(frame.opcode, header.opcode), "{frame:?} vs {header:?}");
    assert_eq!(frame.payload, payload);
});
