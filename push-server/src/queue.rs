//! Each connection's bounded outbound queue and the handle everything but the driver reaches
//! the connection through ([`ConnHandle`]): the push path enqueues messages, the sweeper
//! enqueues heartbeats and `reconnect`, or asks it to close. The driver is woken by the
//! handle's `AtomicWaker` and writes what is queued. The user index is in hub.rs.
//!
//! Locks are `std::sync::Mutex`, never held across an `.await` (clippy denies it): every
//! critical section is a few pointer moves. Lock order: a hub shard, then a connection's
//! state; never the reverse.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::lifecycle::{Clock, DisconnectReason, Millis};
use crate::protocol::message;
use crate::trace::FrameSpans;

pub use push_proto::Transport;

/// What to do when a connection's outbound queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum SlowConsumerPolicy {
    /// Close the connection (the client reconnects and resumes from its last ID).
    Disconnect,
    /// Drop the oldest queued message and keep the connection.
    DropOldest,
}

/// Limits applied to each connection's queue.
#[derive(Debug, Clone, Copy)]
pub struct QueueLimits {
    /// Most frames queued for one connection.
    pub max_frames: usize,
    /// Most bytes queued for one connection (a single frame is always accepted into an
    /// empty queue).
    pub max_bytes: usize,
    /// Policy when full.
    pub policy: SlowConsumerPolicy,
    /// How long a push waits for room in a full queue, and for its frame to be written,
    /// before the connection counts as a slow consumer. A burst that fills the queue of a
    /// client that reads is paced by this wait instead of cutting the client off.
    pub slow_after: Duration,
}

/// What became of one queued frame: written whole to the socket, or dropped (queue cleared
/// for a slow consumer, drop-oldest, connection gone). A push waits on it so that
/// `delivered` counts only frames the socket took.
#[derive(Debug, Default)]
pub struct Fate {
    state: AtomicU8,
    settled: Notify,
}

const PENDING: u8 = 0;
const WRITTEN: u8 = 1;
const DROPPED: u8 = 2;

impl Fate {
    fn settle(&self, to: u8) {
        if self
            .state
            .compare_exchange(PENDING, to, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.settled.notify_waiters();
        }
    }

    /// `Some(true)` once written, `Some(false)` once dropped, `None` while queued.
    pub fn get(&self) -> Option<bool> {
        match self.state.load(Ordering::Acquire) {
            PENDING => None,
            s => Some(s == WRITTEN),
        }
    }

    /// Waits until the frame is written or dropped, or `deadline` passes (`None`).
    pub async fn wait(&self, deadline: Instant) -> Option<bool> {
        loop {
            // Enabled before the check: a settle between the two is not lost.
            let notified = self.settled.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(written) = self.get() {
                return Some(written);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.get();
            }
        }
    }
}

/// Control frames a full queue still takes (see `ConnState::fits`).
pub(crate) const CONTROL_SLACK: usize = 16;

/// One frame waiting to be written.
#[derive(Debug)]
pub struct Outbound {
    /// Encoded frame or event, shared with the other receivers of the same message.
    pub bytes: Bytes,
    /// When the admin API received the message; `None` for control frames.
    pub received_at: Option<tokio::time::Instant>,
    /// The message's per-user ID; 0 for control frames.
    pub id: u64,
    /// Told when the frame is written or dropped, if someone waits for that.
    pub fate: Option<Arc<Fate>>,
    /// Part of it is on the socket already (`bytes` is the unwritten rest).
    pub partial: bool,
    /// The `queue` / `socket write` spans of a sampled message (trace.rs); `None` for every
    /// other frame: one null pointer, no allocation or span.
    pub trace: Option<Box<FrameSpans>>,
}

impl Outbound {
    /// A message to the user (live or from the history), not a control frame.
    pub fn is_message(&self) -> bool {
        self.id != 0 || self.received_at.is_some()
    }

    /// A control frame (heartbeat, `reconnect`, `error`, `gap`, `pong`).
    pub fn control(bytes: Bytes) -> Self {
        Self {
            bytes,
            received_at: None,
            id: 0,
            fate: None,
            partial: false,
            trace: None,
        }
    }

    /// A message kept in the history, as one transport writes it (resumes and catch-ups).
    pub fn stored(m: &push_registry::Buffered, transport: Transport) -> Self {
        let payload = message::Payload {
            bytes: m.data.clone(),
            is_json: m.json,
        };
        let bytes = match transport {
            Transport::Ws => message::message_ws_frame(
                m.id,
                m.mid.as_deref(),
                m.traceparent.as_deref(),
                &payload,
            ),
            Transport::Sse => {
                message::message_sse_event_traced(m.id, m.traceparent.as_deref(), &payload)
            }
        };
        Self {
            bytes,
            received_at: None,
            id: m.id,
            fate: None,
            partial: false,
            trace: None,
        }
    }

    /// The socket took the whole frame.
    pub fn written(mut self) {
        if let Some(f) = &self.fate {
            f.settle(WRITTEN);
        }
        // Its `socket write` span ends here, not as a dropped frame's.
        self.trace = None;
    }
}

impl Drop for Outbound {
    fn drop(&mut self) {
        // Written frames settled already; anything else dropped here was not written.
        if let Some(f) = &self.fate {
            f.settle(DROPPED);
        }
        // Its open span ends with it, just after (the field is dropped after this).
        if let Some(spans) = &self.trace {
            spans.dropped();
        }
    }
}

/// The mutable state of a connection, behind its handle's lock.
#[derive(Debug)]
pub struct ConnState {
    /// Lifecycle clock, driven by the sweeper.
    pub clock: Clock,
    /// Frames not yet written. Empty and unallocated while idle.
    pub(crate) queue: VecDeque<Outbound>,
    /// Bytes in `queue`.
    pub(crate) queued_bytes: usize,
    /// Set when the connection must close; the driver closes after writing what is queued.
    close: Option<DisconnectReason>,
    /// A newer connection for the same (user, device) exists; this one gets no messages.
    pub superseded: bool,
    /// The highest message ID queued on this connection. A message at or below it is not
    /// queued again: IDs on one connection only increase, so a message that reaches the
    /// connection twice (live and in a resume's backlog, or redelivered) is sent once.
    last_id: u64,
    /// The ID the client stands at: the one it resumed from, the newest its resume read, or
    /// the last queued here, whichever is highest. Unlike `last_id`, a `since` the history
    /// never reached (a client from before a history reset) does not hold messages back.
    at: u64,
    /// `at` is known. False until the client resumes or gets its first message (one that
    /// asked for no history starts there) and after the history failed to answer (the
    /// client was told by a `gap`).
    tracked: bool,
    /// Part of a frame is on the socket and its rest is not: that rest must be written
    /// before anything else (a dropped tail or a close frame after it would desync the
    /// client's framing).
    partial: bool,
    /// Acknowledgement limits: the start of the current one-second window (`Millis`), the
    /// acks taken in it, and the last ID acked (a repeat of it is dropped here).
    ack_window: Millis,
    acks_in_window: u32,
    last_ack: u64,
}

impl ConnState {
    /// Frames waiting to be written.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Message `id` is queued: nothing at or below it is queued again, and the client
    /// stands at least there.
    fn advance(&mut self, id: u64) {
        self.last_id = self.last_id.max(id);
        if id != 0 {
            self.at = self.at.max(id);
            self.tracked = true;
        }
    }

    fn push_back(&mut self, out: Outbound) {
        self.queued_bytes += out.bytes.len();
        self.queue.push_back(out);
    }

    fn pop_front(&mut self) -> Option<Outbound> {
        let out = self.queue.pop_front()?;
        self.queued_bytes -= out.bytes.len();
        Some(out)
    }

    /// Drops the oldest frame that may be dropped: never the rest of a partly written one.
    fn drop_oldest(&mut self) -> bool {
        let at = usize::from(self.partial);
        match self.queue.remove(at) {
            Some(out) => {
                self.queued_bytes -= out.bytes.len();
                true
            }
            None => false,
        }
    }

    /// Whether a close frame may be written now: not while part of a frame is unwritten.
    pub fn may_write_close(&self) -> bool {
        !self.partial
    }

    fn fits(&self, out: &Outbound, limits: QueueLimits) -> bool {
        // Control frames (heartbeat, pong, reconnect) get a little room over the limits: one
        // arriving while a burst fills the queue must not cut off a client that reads. A
        // client that sends pings without reading the pongs still hits the limit.
        let (frames, bytes) = if out.id == 0 {
            (
                limits.max_frames + CONTROL_SLACK,
                limits.max_bytes + CONTROL_SLACK * 1024,
            )
        } else {
            (limits.max_frames, limits.max_bytes)
        };
        // A frame always fits a queue that holds nothing but the rest of a partly written
        // frame, as it fits an empty one: a single frame over the byte budget still goes.
        self.queue.len() <= usize::from(self.partial)
            || (self.queue.len() < frames && self.queued_bytes + out.bytes.len() <= bytes)
    }

    /// Drops every queued frame but the rest of a partly written one (which goes too once
    /// the connection closes).
    fn clear(&mut self) {
        let keep = if self.partial {
            self.queue.pop_front()
        } else {
            None
        };
        self.queue = VecDeque::new();
        self.queued_bytes = 0;
        if let Some(out) = keep {
            self.push_back(out);
        }
    }
}

/// The shared side of one client connection.
#[derive(Debug)]
pub struct ConnHandle {
    /// Connection ID, unique on this node.
    pub id: u64,
    /// Authenticated user.
    pub user: Arc<str>,
    /// Device ID from the token, if any.
    pub device: Option<Box<str>>,
    /// Transport.
    pub transport: Transport,
    /// Peer address.
    pub remote: SocketAddr,
    /// Wall-clock connect time, milliseconds since the Unix epoch (for operators).
    pub connected_at_unix_ms: u64,
    /// Earliest time the sweeper needs to look at this connection again.
    pub next_due: AtomicU64,
    state: Mutex<ConnState>,
    /// The driver's waker, and whether it was woken since it last looked. Smaller than a
    /// `Notify` and, polled from the driver's `poll_fn`, needs no future of its own.
    waker: AtomicWaker,
    woken: AtomicBool,
    /// Acknowledgements of this connection waiting in the receipts queue.
    acks_in_flight: AtomicU16,
}

/// Acknowledgements one connection may have in the node's receipts queue at once: its
/// share, so that one client cannot fill the queue and starve everyone's receipts. 256 is
/// far more than a client that acks what it reads has outstanding between two passes of
/// the receipts task.
pub const ACKS_IN_FLIGHT: u16 = 256;

/// Why an acknowledgement was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckRefused {
    /// The same ID as the connection's previous ack.
    Duplicate,
    /// Over the connection's acks per second.
    Rate,
    /// The connection has its share of the receipts queue already.
    Share,
}

impl AckRefused {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Duplicate => "duplicate",
            Self::Rate => "ack_rate",
            Self::Share => "connection_share",
        }
    }
}

/// One of a connection's places in the receipts queue, given back when dropped.
#[derive(Debug)]
pub struct AckSlot(Arc<ConnHandle>);

impl Drop for AckSlot {
    fn drop(&mut self) {
        self.0.acks_in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Result of offering a frame to a connection.
#[derive(Debug)]
pub enum Offer {
    /// Settled: queued, dropped-oldest, refused or already sent.
    Done(Enqueued),
    /// The queue is full: wait on the fate of its oldest frame (room is made when that is
    /// written), then offer the frame again.
    Full(Outbound, Arc<Fate>),
}

/// Result of offering a frame to a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    /// Queued.
    Queued,
    /// Queued after dropping the oldest frame (slow consumer, drop-oldest policy).
    DroppedOldest,
    /// Not queued: the connection is closing (or now closes as a slow consumer).
    Refused,
    /// Not queued: this message (or a later one) was queued on this connection before.
    AlreadySent,
}

impl ConnHandle {
    /// A handle for a new connection.
    pub fn new(
        id: u64,
        user: Arc<str>,
        device: Option<Box<str>>,
        transport: Transport,
        remote: SocketAddr,
        clock: Clock,
        connected_at_unix_ms: u64,
    ) -> Self {
        Self {
            id,
            user,
            device,
            transport,
            remote,
            connected_at_unix_ms,
            next_due: AtomicU64::new(0),
            state: Mutex::new(ConnState {
                clock,
                queue: VecDeque::new(),
                queued_bytes: 0,
                close: None,
                superseded: false,
                last_id: 0,
                at: 0,
                tracked: false,
                partial: false,
                ack_window: 0,
                acks_in_window: 0,
                last_ack: 0,
            }),
            acks_in_flight: AtomicU16::new(0),
            waker: AtomicWaker::new(),
            woken: AtomicBool::new(false),
        }
    }

    /// Takes an acknowledgement of `id` at `now` if the connection's limits allow it: at most
    /// `per_sec` in each second, not the ID it acked last, and within its share of the
    /// receipts queue (the slot holds the place until the ack is handled).
    pub fn admit_ack(
        self: &Arc<Self>,
        id: u64,
        now: Millis,
        per_sec: u32,
    ) -> Result<AckSlot, AckRefused> {
        {
            let mut st = self.state();
            if id == st.last_ack {
                return Err(AckRefused::Duplicate);
            }
            if now.saturating_sub(st.ack_window) >= 1000 {
                st.ack_window = now;
                st.acks_in_window = 0;
            }
            if st.acks_in_window >= per_sec {
                return Err(AckRefused::Rate);
            }
            st.acks_in_window += 1;
            st.last_ack = id;
        }
        let taken = self
            .acks_in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < ACKS_IN_FLIGHT).then_some(n + 1)
            });
        match taken {
            Ok(_) => Ok(AckSlot(self.clone())),
            Err(_) => Err(AckRefused::Share),
        }
    }

    /// Whether the connection is closing (or closed): set once, never cleared.
    pub fn is_closing(&self) -> bool {
        self.state().close.is_some()
    }

    /// Locks the connection's state.
    pub fn state(&self) -> MutexGuard<'_, ConnState> {
        // A panic while holding this lock leaves plain data in a consistent state.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The client resumes from `after`: it stands there until its backlog and live messages
    /// move it on. Called before the connection is registered.
    pub fn resume_from(&self, after: u64) {
        let mut st = self.state();
        st.at = after;
        st.tracked = true;
    }

    /// Where the client stands, when message `id` is about to be queued and the IDs between
    /// would be skipped: one user's IDs are consecutive, so `Some(last)` means the client may
    /// be owed `last + 1 .. id` (sent to a node it had just left, or for another device).
    /// `None`: nothing between, or no known position.
    pub fn skips_before(&self, id: u64) -> Option<u64> {
        let st = self.state();
        (st.tracked && !st.superseded && st.at.saturating_add(1) < id).then_some(st.at)
    }

    /// Message `id` went to another device of this user: a client that stood just before it
    /// stands past it now (its next message does not look like a skip).
    pub fn passed(&self, id: u64) {
        let mut st = self.state();
        if st.tracked && st.at.saturating_add(1) == id {
            st.at = id;
        }
    }

    /// Forgets where the client stands (the history could not say what it missed; it was
    /// told by a `gap`). Its next message sets it again.
    pub fn untrack(&self) {
        self.state().tracked = false;
    }

    /// Whether a message addressed to `device` (or to every device) is for this connection.
    pub fn wants(&self, device: Option<&str>) -> bool {
        device.is_none_or(|d| self.device.as_deref() == Some(d))
    }

    /// Offers a frame; when the queue is full, the slow-consumer policy applies at once.
    /// Wakes the driver.
    pub fn enqueue(&self, out: Outbound, limits: QueueLimits) -> Enqueued {
        match self.offer(out, limits, false) {
            Offer::Done(e) => e,
            Offer::Full(..) => unreachable!("offer without waiting settles"),
        }
    }

    /// Offers a frame. A full queue applies the slow-consumer policy, or, with `wait`,
    /// hands the frame back with what to wait on.
    pub fn offer(&self, out: Outbound, limits: QueueLimits, wait: bool) -> Offer {
        let result = {
            let mut st = self.state();
            if out.id != 0 && out.id <= st.last_id {
                return Offer::Done(Enqueued::AlreadySent);
            }
            if st.close.is_some() {
                Enqueued::Refused
            } else if st.fits(&out, limits) {
                st.advance(out.id);
                st.push_back(out);
                Enqueued::Queued
            } else if wait {
                let at = usize::from(st.partial).min(st.queue.len() - 1);
                let oldest = &mut st.queue[at];
                let fate = oldest.fate.get_or_insert_with(Default::default).clone();
                drop(st);
                self.wake();
                return Offer::Full(out, fate);
            } else {
                match limits.policy {
                    SlowConsumerPolicy::DropOldest => {
                        while !st.fits(&out, limits) && st.drop_oldest() {
                            metrics::counter!(crate::metrics::MESSAGES_DROPPED, "reason" => "slow_consumer_drop_oldest").increment(1);
                        }
                        st.advance(out.id);
                        st.push_back(out);
                        Enqueued::DroppedOldest
                    }
                    SlowConsumerPolicy::Disconnect => {
                        st.clear();
                        st.close = Some(DisconnectReason::SlowConsumer);
                        Enqueued::Refused
                    }
                }
            }
        };
        self.wake();
        Offer::Done(result)
    }

    /// Cuts off a slow consumer: its queue is dropped (a resume gets the messages from the
    /// history) and it closes.
    pub fn cut_off(&self) {
        {
            let mut st = self.state();
            st.clear();
            st.close.get_or_insert(DisconnectReason::SlowConsumer);
        }
        self.wake();
    }

    /// The connection ended: drop what is queued, so that pushes waiting on it stop waiting.
    pub fn discard(&self) {
        let mut st = self.state();
        st.queue = VecDeque::new();
        st.queued_bytes = 0;
        st.close.get_or_insert(DisconnectReason::IoError);
    }

    /// Offers a message with its per-user ID: skipped (reported as already sent) if a
    /// message with this or a later ID was queued already. Waits for room in a full queue
    /// until `deadline`, then applies the slow-consumer policy.
    pub async fn enqueue_message(
        &self,
        mut out: Outbound,
        limits: QueueLimits,
        deadline: Instant,
    ) -> Enqueued {
        loop {
            let wait = Instant::now() < deadline;
            match self.offer(out, limits, wait) {
                Offer::Done(e) => return e,
                Offer::Full(back, oldest) => {
                    out = back;
                    oldest.wait(deadline).await;
                }
            }
        }
    }

    /// Puts a resume's backlog in front of whatever live messages were queued since the
    /// connection was registered: `gap` first if there is one, then the backlog (IDs
    /// increasing), then the live messages with a larger ID than the backlog's last (the
    /// others are in the backlog already). Not subject to the queue limits: the backlog is
    /// bounded by the history's limits.
    ///
    /// `read_up_to`: the newest ID the history read returned, for any device (the client
    /// stands there now); `None` when the read failed (the client stands nowhere known).
    pub fn resume(&self, gap: Option<Bytes>, backlog: Vec<Outbound>, read_up_to: Option<u64>) {
        {
            let mut st = self.state();
            match read_up_to {
                Some(id) => st.at = st.at.max(id),
                None => st.tracked = false,
            }
            let last = backlog.last().map_or(0, |o| o.id);
            let live = std::mem::take(&mut st.queue);
            st.queued_bytes = 0;
            if let Some(g) = gap {
                st.push_back(Outbound::control(g));
            }
            for out in backlog {
                st.push_back(out);
            }
            for mut out in live {
                if out.id == 0 || out.id > last {
                    st.push_back(out);
                } else if let Some(fate) = out.fate.take() {
                    // In the backlog too: the push waiting on it waits on that copy.
                    match st.queue.iter_mut().find(|b| b.id == out.id) {
                        Some(copy) => copy.fate = Some(fate),
                        None => fate.settle(DROPPED),
                    }
                }
            }
            st.last_id = st.last_id.max(last);
        }
        self.wake();
    }

    /// Asks the driver to close the connection for `reason` once the queue is written
    /// (or at once, for a slow consumer whose queue was dropped).
    pub fn close(&self, reason: DisconnectReason) {
        {
            let mut st = self.state();
            if st.close.is_none() {
                st.close = Some(reason);
            }
        }
        self.wake();
    }

    /// Marks the connection as taken over by a newer one of the same (user, device): it gets
    /// no more messages, and the reconnect grace period starts (the client is normally closing
    /// it anyway, as the last step of its own reconnect).
    pub fn supersede(&self, now: Millis) {
        let mut st = self.state();
        st.superseded = true;
        st.clock.asked_at.get_or_insert(now);
        drop(st);
        self.next_due.store(0, Ordering::Relaxed);
    }

    /// Takes the next frame to write, or the close reason once the queue is empty (at once
    /// for a slow consumer: what it did not read is not waited for).
    pub fn next_outbound(&self) -> Next {
        let mut st = self.state();
        if st.close == Some(DisconnectReason::SlowConsumer) {
            return Next::Close(DisconnectReason::SlowConsumer);
        }
        // The driver holds the frame now; `requeue_front` tells again if part of it stays.
        st.partial = false;
        match st.pop_front() {
            Some(out) => {
                if st.queue.is_empty() {
                    // Give the queue's memory back while idle: an idle connection's queue
                    // only ever held a heartbeat, and keeping its allocation (room for four
                    // frames) after every heartbeat cost about 0.1 KiB per connection.
                    st.queue = VecDeque::new();
                }
                Next::Frame(out)
            }
            None => match st.close {
                Some(reason) => Next::Close(reason),
                None => Next::Idle,
            },
        }
    }

    /// Puts back the unwritten rest of a frame at the front of the queue. A slow consumer's
    /// is dropped instead (it is cut off without waiting), and no close frame follows it.
    pub fn requeue_front(&self, out: Outbound) {
        let mut st = self.state();
        st.partial = out.partial;
        if st.close == Some(DisconnectReason::SlowConsumer) {
            return;
        }
        st.queued_bytes += out.bytes.len();
        st.queue.push_front(out);
    }

    fn wake(&self) {
        self.woken.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Ready once something was enqueued or a close requested since the last ready poll.
    pub fn poll_woken(&self, cx: &mut Context<'_>) -> Poll<()> {
        // Register first, then check: a wake between the two is not lost.
        self.waker.register(cx.waker());
        if self.woken.swap(false, Ordering::AcqRel) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Frames waiting to be written.
    pub fn queued(&self) -> usize {
        self.state().queued()
    }
}

/// What the driver should do next.
#[derive(Debug)]
pub enum Next {
    /// Write this frame.
    Frame(Outbound),
    /// Nothing queued; wait.
    Idle,
    /// Queue written; close for this reason.
    Close(DisconnectReason),
}
