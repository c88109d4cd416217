//! Hot-path micro-benchmarks: WebSocket frame decode/encode, SSE encode, message encode.
//! Run with `cargo bench -p bench --bench codec`.

use std::hint::black_box;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use push_proto::message::{self, Payload};
use push_proto::{sse, ws};

fn frames(c: &mut Criterion) {
    let mut g = c.benchmark_group("ws");
    let ack = ws::encode_client_frame(
        true,
        ws::OpCode::Text,
        br#"{"type":"ack","id":1234567}"#,
        [9, 8, 7, 6],
    );
    g.throughput(Throughput::Bytes(ack.len() as u64));
    g.bench_function("decode_ack_frame", |b| {
        b.iter(|| {
            let mut r = ws::WsReader::default();
            let mut n = 0;
            r.feed(black_box(&ack), 65536, |_| n += 1).unwrap();
            n
        })
    });
    let payload = vec![b'x'; 1024];
    g.throughput(Throughput::Bytes(1024));
    g.bench_function("encode_1k_text_frame", |b| {
        b.iter(|| ws::encode_frame(ws::OpCode::Text, black_box(&payload)))
    });
    g.finish();

    let mut g = c.benchmark_group("message");
    let p = Payload::text(Bytes::from_static(b"your download is ready")).unwrap();
    g.bench_function("ws_message_frame", |b| {
        b.iter(|| message::message_ws_frame(black_box(123_456), None, None, &p))
    });
    g.bench_function("sse_message_event", |b| {
        b.iter(|| message::message_sse_event(black_box(123_456), &p))
    });
    let multi = b"line one\nline two\nline three";
    g.bench_function("sse_multiline_event", |b| {
        b.iter(|| sse::encode_event("message", Some(7), black_box(multi)))
    });
    g.finish();
}

criterion_group!(benches, frames);
criterion_main!(benches);
