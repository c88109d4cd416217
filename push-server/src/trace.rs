//! The node's spans of one message (docs/tracing.md, "Spans on the node"):
//!
//! - `admin receive` / `internal receive`: from the request until the message is handed to
//!   its connections' outbound queues (history append and catch-ups included);
//! - then, per connection, `queue` (in the connection's outbound queue, until the driver
//!   starts writing the frame), `socket write` (until the socket took the whole frame) and
//!   `receipt` (from the client's ack reaching the node until the receipt task handled it).
//!
//! The last three are children of the receive span, which has ended by then: they are opened
//! with no `tracing` parent and the receive span's context as their OpenTelemetry parent, so
//! they neither keep the receive span open (a `tracing` child holds its parent until it
//! closes) nor need it to be alive.
//!
//! Cost: all of it exists only for a message whose receive span is exported and sampled.
//! Otherwise a frame's [`FrameSpans`] slot is `None` (the `Option<Box<_>>` is one pointer,
//! null), a request's receive spans are an empty `Vec` (no allocation), and an ack looks for
//! a receipt context only when sampled messages were delivered lately (one relaxed load):
//! no allocation, clock read or span object per message.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use telemetry::propagation::TraceContext;

/// The receive spans of one push request, one per message in request order, each open until
/// its message is handed to the queues ([`ReceiveSpans::end`]). Empty when span export is off.
#[derive(Debug, Default)]
pub struct ReceiveSpans {
    spans: Vec<tracing::Span>,
}

/// The trace context each message of a request passes on. Empty when span export is off: then
/// each client is shown the sender's `traceparent` unchanged, at no cost.
#[derive(Debug, Default)]
pub struct Seen {
    traceparents: Vec<Option<String>>,
    /// The receive span's own context, when it is sampled: the parent of the node's later
    /// spans. `None` for a message that is not traced here.
    sampled: Vec<Option<TraceContext>>,
}

impl ReceiveSpans {
    /// Spans opened by `open`, one per incoming context (the caller's, if any), and what
    /// each message passes on. Nothing is opened when span export is off.
    pub fn open(
        incoming: impl Iterator<Item = Option<TraceContext>>,
        open: impl Fn() -> tracing::Span,
    ) -> (Self, Seen) {
        let mut out = Self::default();
        let mut seen = Seen::default();
        if !telemetry::otel::is_on() {
            return (out, seen);
        }
        for incoming in incoming {
            let span = open();
            if let Some(parent) = &incoming {
                telemetry::otel::set_parent(&span, parent);
            }
            // The span's own context when it is exported, else the caller's unchanged.
            let own = telemetry::otel::outgoing(&span, None);
            let passed = own.as_ref().or(incoming.as_ref());
            seen.traceparents.push(passed.map(|c| c.traceparent()));
            seen.sampled.push(own.filter(|c| c.sampled));
            out.spans.push(span);
        }
        (out, seen)
    }

    /// The receive span of message `k` while it is open (a parent for its history append).
    pub fn span(&self, k: usize) -> Option<&tracing::Span> {
        self.spans.get(k).filter(|s| !s.is_disabled())
    }

    /// Message `k` was handed to its connections' queues: its receive span ends.
    pub fn end(&mut self, k: usize) {
        if let Some(s) = self.spans.get_mut(k) {
            *s = tracing::Span::none();
        }
    }
}

impl Seen {
    /// What the clients of message `k` see; `sent` (the sender's) when not traced here.
    pub fn traceparent<'b>(&'b self, k: usize, sent: Option<&'b str>) -> Option<&'b str> {
        match self.traceparents.get(k) {
            Some(tp) => tp.as_deref(),
            None => sent,
        }
    }

    /// The receive span's context of message `k`, when sampled.
    pub fn sampled(&self, k: usize) -> Option<&TraceContext> {
        self.sampled.get(k).and_then(Option::as_ref)
    }
}

/// The spans of a sampled message on one connection: `queue` from creation, then
/// `socket write` from [`FrameSpans::writing`]; the open one ends when the frame is written,
/// or is dropped (slow consumer, connection gone: then marked `dropped = true`).
#[derive(Debug)]
pub struct FrameSpans {
    parent: TraceContext,
    span: tracing::Span,
    writing: bool,
}

impl FrameSpans {
    /// The `queue` span of a frame for connection `conn`, under `parent` (the receive span).
    pub fn queued(parent: &TraceContext, conn: u64) -> Box<Self> {
        let span =
            tracing::info_span!(parent: None, "queue", conn, dropped = tracing::field::Empty);
        telemetry::otel::set_parent(&span, parent);
        Box::new(Self {
            parent: parent.clone(),
            span,
            writing: false,
        })
    }

    /// The driver starts writing the frame: `queue` ends, `socket write` starts (once: a
    /// frame the socket takes in parts keeps its write span).
    pub fn writing(&mut self) {
        if self.writing {
            return;
        }
        self.writing = true;
        // Ended before the next one starts, so the two never overlap.
        self.span = tracing::Span::none();
        let span =
            tracing::info_span!(parent: None, "socket write", dropped = tracing::field::Empty);
        telemetry::otel::set_parent(&span, &self.parent);
        self.span = span;
    }

    /// The frame will not be written: the open span says so as it ends.
    pub fn dropped(&self) {
        self.span.record("dropped", true);
    }
}

/// Sampled messages remembered for their receipt span. An entry is about 120 bytes (its ID in
/// the map and the FIFO, the user's name, the context); 4,096 of them (about 500 KiB, and
/// only while sampled traffic flows) cover the acks of far more sampled messages
/// than a node sees between a write and its ack; an older one gets no receipt span (its
/// message and receipt are unaffected).
const TRACED: usize = 4096;

/// Which sampled messages may still be acked: (user, ID) → the receive span's context.
#[derive(Debug, Default)]
pub struct ReceiptTraces {
    /// Entries in `map`, read without the lock so that an ack costs one load when nothing
    /// sampled is waiting.
    len: AtomicUsize,
    map: Mutex<Traced>,
}

/// Keyed by ID, then user: an ack's lookup needs no key of its own (no allocation). IDs are
/// per user but seeded from the clock, so one ID rarely has more than one user.
#[derive(Debug, Default)]
struct Traced {
    /// ID → (user, context, the entry's sequence number).
    map: HashMap<u64, Vec<(Box<str>, TraceContext, u64)>>,
    /// (ID, sequence number) in the order remembered, oldest first out. The sequence number
    /// tells the entry apart from a later one under the same ID once an ack has taken it.
    order: VecDeque<(u64, u64)>,
    next: u64,
    entries: usize,
}

impl Traced {
    fn take(&mut self, user: &str, id: u64) -> Option<TraceContext> {
        self.remove(id, |(u, _, _)| &**u == user)
    }

    /// Forgets entry `seq` under `id`, unless an ack took it already.
    fn evict(&mut self, id: u64, seq: u64) {
        self.remove(id, |e| e.2 == seq);
    }

    /// Removes the first entry under `id` that `matches`, and `id` once it has none.
    fn remove(
        &mut self,
        id: u64,
        matches: impl Fn(&(Box<str>, TraceContext, u64)) -> bool,
    ) -> Option<TraceContext> {
        let list = self.map.get_mut(&id)?;
        let at = list.iter().position(matches)?;
        let (_, cx, _) = list.swap_remove(at);
        if list.is_empty() {
            self.map.remove(&id);
        }
        self.entries -= 1;
        Some(cx)
    }
}

impl ReceiptTraces {
    /// Message `id` of `user`, traced under `cx`, may be acked.
    pub fn remember(&self, user: &str, id: u64, cx: &TraceContext) {
        let mut t = self.map.lock().unwrap_or_else(|e| e.into_inner());
        t.take(user, id);
        let seq = t.next;
        t.next += 1;
        t.map
            .entry(id)
            .or_default()
            .push((user.into(), cx.clone(), seq));
        t.entries += 1;
        t.order.push_back((id, seq));
        while t.order.len() > TRACED {
            let Some((old, seq)) = t.order.pop_front() else {
                break;
            };
            t.evict(old, seq);
        }
        self.len.store(t.entries, Ordering::Relaxed);
    }

    /// The `receipt` span of an ack of message `id` of `user`, if that message was sampled
    /// here; the first ack takes it (later ones, from other devices, get none). Ends when
    /// the receipt task has handled the ack.
    pub fn receipt_span(&self, user: &str, id: u64) -> Option<Box<tracing::Span>> {
        if self.len.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let cx = {
            let mut t = self.map.lock().unwrap_or_else(|e| e.into_inner());
            let cx = t.take(user, id)?;
            // Its place in `order` goes when it is the oldest; `entries` is what is counted.
            self.len.store(t.entries, Ordering::Relaxed);
            cx
        };
        let span = tracing::info_span!(parent: None, "receipt", id);
        telemetry::otel::set_parent(&span, &cx);
        Some(Box::new(span))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cx(n: u8) -> TraceContext {
        TraceContext::new_root([n; 16], [n; 8], true)
    }

    #[test]
    fn receipt_contexts_are_taken_once_and_bounded() {
        let t = ReceiptTraces::default();
        assert!(t.receipt_span("u", 1).is_none(), "nothing remembered");
        t.remember("u", 1, &cx(1));
        assert!(t.receipt_span("v", 1).is_none(), "another user's message");
        assert!(t.receipt_span("u", 1).is_some());
        assert!(t.receipt_span("u", 1).is_none(), "the first ack took it");
        // Two users' messages under one ID are told apart.
        t.remember("u", 2, &cx(1));
        t.remember("v", 2, &cx(3));
        assert!(t.receipt_span("v", 2).is_some());
        assert!(t.receipt_span("u", 2).is_some());
        assert!(t.receipt_span("u", 2).is_none());
        assert_eq!(t.len.load(Ordering::Relaxed), 0);
        for id in 0..(TRACED as u64 + 10) {
            t.remember("w", id, &cx(2));
        }
        assert_eq!(t.len.load(Ordering::Relaxed), TRACED);
        assert!(
            t.receipt_span("w", 0).is_none(),
            "the oldest were forgotten"
        );
        assert!(t.receipt_span("w", TRACED as u64 + 9).is_some());
    }

    #[test]
    fn an_acked_entry_leaving_the_fifo_does_not_take_a_newer_one_under_its_id() {
        let t = ReceiptTraces::default();
        t.remember("u", 1, &cx(1));
        assert!(t.receipt_span("u", 1).is_some());
        t.remember("v", 1, &cx(2));
        // The acked entry's place is the oldest: these push it out, and only it.
        for id in 2..=(TRACED as u64) {
            t.remember("w", id, &cx(3));
        }
        assert!(t.receipt_span("v", 1).is_some(), "the newer entry stays");
    }

    #[test]
    fn nothing_is_opened_or_allocated_when_export_is_off() {
        let (spans, seen) = ReceiveSpans::open([None, None].into_iter(), || {
            tracing::info_span!("admin receive")
        });
        assert_eq!(spans.spans.capacity(), 0);
        assert_eq!(seen.traceparents.capacity(), 0);
        assert_eq!(seen.traceparent(1, Some("sent")), Some("sent"));
        assert!(seen.sampled(0).is_none());
    }
}
