//! The hub: which local connections belong to which user, and each connection's bounded
//! outbound queue.
//!
//! A connection's driver task owns the socket; everything else reaches the connection
//! through its [`ConnHandle`]: the admin API enqueues messages, the sweeper enqueues
//! heartbeats and `reconnect`, or asks it to close. The driver is woken by the handle's
//! `Notify` and writes what is queued.
//!
//! Locks are `std::sync::Mutex`, never held across an `.await` (clippy denies it): every
//! critical section is a few pointer moves. Lock order: a hub shard, then a connection's
//! state; never the reverse.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::task::AtomicWaker;

use crate::lifecycle::{Clock, DisconnectReason, Millis};
use crate::protocol::message::{self, Payload};

/// The client transport of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// WebSocket on `/ws`.
    Ws,
    /// Server-Sent Events on `/sse`.
    Sse,
}

impl Transport {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ws => "ws",
            Self::Sse => "sse",
        }
    }

    /// Index into per-transport arrays (metrics, counters).
    pub(crate) fn index(self) -> usize {
        match self {
            Self::Ws => 0,
            Self::Sse => 1,
        }
    }
}

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
}

/// One frame waiting to be written.
#[derive(Debug, Clone)]
pub struct Outbound {
    /// Encoded frame or event, shared with the other receivers of the same message.
    pub bytes: Bytes,
    /// When the admin API received the message; `None` for control frames.
    pub received_at: Option<tokio::time::Instant>,
    /// The message's per-user ID; 0 for control frames.
    pub id: u64,
}

impl Outbound {
    /// A control frame (heartbeat, `reconnect`, `error`, `gap`, `pong`).
    pub fn control(bytes: Bytes) -> Self {
        Self {
            bytes,
            received_at: None,
            id: 0,
        }
    }
}

/// The mutable state of a connection, behind its handle's lock.
#[derive(Debug)]
pub struct ConnState {
    /// Lifecycle clock, driven by the sweeper.
    pub clock: Clock,
    /// Frames not yet written. Empty and unallocated while idle.
    queue: VecDeque<Outbound>,
    /// Bytes in `queue`.
    queued_bytes: usize,
    /// Set when the connection must close; the driver closes after writing what is queued.
    close: Option<DisconnectReason>,
    /// A newer connection for the same (user, device) exists; this one gets no messages.
    pub superseded: bool,
    /// The highest message ID queued on this connection. A message at or below it is not
    /// queued again: IDs on one connection only increase, so a message that reaches the
    /// connection twice (live and in a resume's backlog, or redelivered) is sent once.
    last_id: u64,
}

impl ConnState {
    /// Frames waiting to be written.
    pub fn queued(&self) -> usize {
        self.queue.len()
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
            }),
            waker: AtomicWaker::new(),
            woken: AtomicBool::new(false),
        }
    }

    /// Locks the connection's state.
    pub fn state(&self) -> MutexGuard<'_, ConnState> {
        // A panic while holding this lock leaves plain data in a consistent state.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Offers a frame. Wakes the driver if it was queued.
    pub fn enqueue(&self, out: Outbound, limits: QueueLimits) -> Enqueued {
        let result = {
            let mut st = self.state();
            let fits = |st: &ConnState| {
                st.queue.is_empty()
                    || (st.queue.len() < limits.max_frames
                        && st.queued_bytes + out.bytes.len() <= limits.max_bytes)
            };
            if st.close.is_some() {
                Enqueued::Refused
            } else if fits(&st) {
                st.push_back(out);
                Enqueued::Queued
            } else {
                match limits.policy {
                    SlowConsumerPolicy::DropOldest => {
                        while !fits(&st) {
                            st.pop_front();
                        }
                        st.push_back(out);
                        Enqueued::DroppedOldest
                    }
                    SlowConsumerPolicy::Disconnect => {
                        st.queue = VecDeque::new();
                        st.queued_bytes = 0;
                        st.close = Some(DisconnectReason::SlowConsumer);
                        Enqueued::Refused
                    }
                }
            }
        };
        self.wake();
        result
    }

    /// Offers a message with its per-user ID: skipped (reported as queued) if a message with
    /// this or a later ID was queued already.
    pub fn enqueue_message(&self, out: Outbound, limits: QueueLimits) -> Enqueued {
        {
            let mut st = self.state();
            if out.id <= st.last_id {
                return Enqueued::AlreadySent;
            }
            if st.close.is_none() {
                st.last_id = out.id;
            }
        }
        self.enqueue(out, limits)
    }

    /// Puts a resume's backlog in front of whatever live messages were queued since the
    /// connection was registered: `gap` first if there is one, then the backlog (IDs
    /// increasing), then the live messages with a larger ID than the backlog's last (the
    /// others are in the backlog already). Not subject to the queue limits: the backlog is
    /// bounded by the history's limits.
    pub fn resume(&self, gap: Option<Bytes>, backlog: Vec<Outbound>) {
        {
            let mut st = self.state();
            let last = backlog.last().map_or(0, |o| o.id);
            let live = std::mem::take(&mut st.queue);
            st.queued_bytes = 0;
            if let Some(g) = gap {
                st.push_back(Outbound::control(g));
            }
            for out in backlog {
                st.push_back(out);
            }
            for out in live {
                if out.id == 0 || out.id > last {
                    st.push_back(out);
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

    /// Takes the next frame to write, or the close reason once the queue is empty.
    pub fn next_outbound(&self) -> Next {
        let mut st = self.state();
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

    /// Puts back the unwritten rest of a frame at the front of the queue.
    pub fn requeue_front(&self, out: Outbound) {
        let mut st = self.state();
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

/// The result of a push to a user on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PushOutcome {
    /// The message's per-user ID.
    pub id: Option<u64>,
    /// The history already held this queue message ID (a redelivery): it keeps its first
    /// ID, and connections that were sent it do not get it again.
    pub duplicate: bool,
    /// Connections the message was queued for.
    pub delivered: usize,
    /// Connections that refused it (closing, or slow consumers).
    pub dropped: usize,
    /// Of `delivered`, connections that were asked to reconnect (rotation, drain): their
    /// client may already be reading a newer connection on another node.
    pub leaving: usize,
}

struct UserEntry {
    conns: Vec<Arc<ConnHandle>>,
}

/// A user holds the most connections allowed on this node (`--max-connections-per-user`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("this user holds {held} connections on this node, the most allowed")]
pub struct UserAtCapacity {
    /// The user's connections now (staying and leaving).
    pub held: usize,
}

/// One message for one user, as the admin API or the message processor hands it over.
#[derive(Debug, Clone, Copy)]
pub struct PushRequest<'a> {
    /// The user.
    pub user: &'a str,
    /// Only this device's connection, if set.
    pub device: Option<&'a str>,
    /// The queue's message ID (push-lib envelope), for deduplication and shown to
    /// WebSocket clients as `mid`.
    pub message_id: Option<&'a str>,
    /// The payload.
    pub payload: &'a Payload,
    /// The per-user ID, when the sender took it from the history already (the message
    /// processor does); otherwise the push path appends the message and takes one.
    pub id: Option<u64>,
}

impl<'a> PushRequest<'a> {
    /// A push to every connection of `user`.
    pub fn to_user(user: &'a str, payload: &'a Payload) -> Self {
        Self {
            user,
            device: None,
            message_id: None,
            payload,
            id: None,
        }
    }
}

/// Number of lock shards. A power of two well above the core count keeps contention low
/// between admin pushes, connects and the sweeper.
const SHARDS: usize = 64;

type Shard = Mutex<HashMap<Arc<str>, UserEntry>>;

/// Users to connections, sharded by user.
pub struct Hub {
    shards: Box<[Shard]>,
    open: [AtomicUsize; 2],
    next_conn_id: AtomicU64,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("open_ws", &self.open[0])
            .field("open_sse", &self.open[1])
            .finish_non_exhaustive()
    }
}

impl Default for Hub {
    fn default() -> Self {
        Self::new()
    }
}

impl Hub {
    /// An empty hub.
    pub fn new() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            open: [AtomicUsize::new(0), AtomicUsize::new(0)],
            next_conn_id: AtomicU64::new(1),
        }
    }

    fn shard(&self, user: &str) -> MutexGuard<'_, HashMap<Arc<str>, UserEntry>> {
        self.shards[push_registry::shard_of(user, SHARDS)]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// A fresh connection ID.
    pub fn next_conn_id(&self) -> u64 {
        self.next_conn_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Connections open, by transport.
    pub fn open(&self, transport: Transport) -> usize {
        self.open[transport.index()].load(Ordering::Relaxed)
    }

    /// Connections open in all.
    pub fn open_total(&self) -> usize {
        self.open(Transport::Ws) + self.open(Transport::Sse)
    }

    /// Reserves a place for a connection if fewer than `max` are open or reserved.
    /// Returns false at capacity. A reservation becomes a connection by [`Hub::register`]
    /// or is given back by [`Hub::release`].
    pub fn reserve(&self, transport: Transport, max: usize) -> bool {
        let counter = &self.open[transport.index()];
        let prev = counter.fetch_add(1, Ordering::AcqRel);
        if prev + self.open(other(transport)) >= max {
            counter.fetch_sub(1, Ordering::AcqRel);
            false
        } else {
            true
        }
    }

    /// Gives back a reservation or a closed connection's place.
    pub fn release(&self, transport: Transport) {
        self.open[transport.index()].fetch_sub(1, Ordering::AcqRel);
    }

    /// Adds a connection (whose place was reserved), unless its user is at `max_per_user`
    /// (0: no cap). A previous connection for the same user and device is marked
    /// superseded: it gets no more messages, and it is returned so that the caller can
    /// start its grace period.
    ///
    /// The cap counts the user's *staying* connections: those superseded or asked to
    /// reconnect are on their way out, and a client replacing one (rotation, drain, a
    /// reconnect of the same device) must get in even at the cap, or rotation would lock
    /// out a user who holds exactly `max_per_user`. Leaving connections are still bounded:
    /// all of a user's connections together stay below twice the cap, so an entry (walked
    /// under the shard lock by [`Hub::deliver`] and [`Hub::unregister`]) never holds more
    /// than `2 × max_per_user` connections.
    pub fn register(
        &self,
        handle: Arc<ConnHandle>,
        max_per_user: usize,
    ) -> Result<Vec<Arc<ConnHandle>>, UserAtCapacity> {
        let mut shard = self.shard(&handle.user);
        let entry = shard
            .entry(handle.user.clone())
            .or_insert_with(|| UserEntry {
                conns: Vec::with_capacity(1),
            });
        if max_per_user > 0 {
            let replaces = |c: &ConnHandle| handle.device.is_some() && c.device == handle.device;
            let staying = entry
                .conns
                .iter()
                .filter(|c| {
                    let st = c.state();
                    !st.superseded && st.clock.asked_at.is_none() && !replaces(c)
                })
                .count();
            if staying >= max_per_user || entry.conns.len() >= 2 * max_per_user {
                // Not empty (at least one connection is staying or leaving), so no empty
                // entry is left behind.
                return Err(UserAtCapacity {
                    held: entry.conns.len(),
                });
            }
        }
        let mut superseded = Vec::new();
        if handle.device.is_some() {
            for c in &entry.conns {
                if c.device == handle.device {
                    let mut st = c.state();
                    if !st.superseded {
                        st.superseded = true;
                        superseded.push(c.clone());
                    }
                }
            }
        }
        entry.conns.push(handle);
        Ok(superseded)
    }

    /// Removes a connection. The user's entry goes with its last connection. A linear walk
    /// of the user's connections under the shard lock, like [`Hub::deliver`]'s: cheap because
    /// [`Hub::register`] keeps a user below `2 × max_connections_per_user` (32 by default).
    pub fn unregister(&self, handle: &ConnHandle) {
        let mut shard = self.shard(&handle.user);
        if let Some(entry) = shard.get_mut(&handle.user) {
            entry.conns.retain(|c| c.id != handle.id);
            if entry.conns.is_empty() {
                shard.remove(&handle.user);
            }
        }
    }

    /// Queues message `id` for the live connections of a user on this node (all of them, or
    /// the one device named in the request).
    ///
    /// The frame is encoded once per transport and shared. Callers queue one user's messages
    /// in ID order (see push.rs); a connection skips an ID it was queued before.
    pub fn deliver(
        &self,
        req: &PushRequest<'_>,
        id: u64,
        received_at: tokio::time::Instant,
        limits: QueueLimits,
    ) -> PushOutcome {
        let mut outcome = PushOutcome {
            id: Some(id),
            ..PushOutcome::default()
        };
        let shard = self.shard(req.user);
        let Some(entry) = shard.get(req.user) else {
            return outcome;
        };
        let targets = |c: &&Arc<ConnHandle>| {
            req.device.is_none_or(|d| c.device.as_deref() == Some(d)) && !c.state().superseded
        };
        let mut ws_frame = None;
        let mut sse_frame = None;
        for conn in entry.conns.iter().filter(targets) {
            let bytes = match conn.transport {
                Transport::Ws => ws_frame
                    .get_or_insert_with(|| {
                        message::message_ws_frame(id, req.message_id, req.payload)
                    })
                    .clone(),
                Transport::Sse => sse_frame
                    .get_or_insert_with(|| message::message_sse_event(id, req.payload))
                    .clone(),
            };
            let out = Outbound {
                bytes,
                received_at: Some(received_at),
                id,
            };
            let leaving = conn.state().clock.asked_at.is_some();
            match conn.enqueue_message(out, limits) {
                Enqueued::Queued | Enqueued::AlreadySent => {
                    outcome.delivered += 1;
                    outcome.leaving += usize::from(leaving);
                }
                Enqueued::DroppedOldest => {
                    outcome.delivered += 1;
                    outcome.leaving += usize::from(leaving);
                    metrics::counter!(crate::metrics::MESSAGES_DROPPED, "reason" => "slow_consumer_drop_oldest").increment(1);
                }
                Enqueued::Refused => {
                    outcome.dropped += 1;
                    metrics::counter!(crate::metrics::MESSAGES_DROPPED, "reason" => "connection_closing").increment(1);
                }
            }
        }
        outcome
    }

    /// The connections of `user` on this node.
    pub fn connections(&self, user: &str) -> Vec<Arc<ConnHandle>> {
        self.shard(user)
            .get(user)
            .map(|e| e.conns.clone())
            .unwrap_or_default()
    }

    /// Calls `f` on every connection, one shard at a time (the shard stays locked during
    /// its calls, so `f` must be quick and must not touch the hub).
    pub fn for_each(&self, mut f: impl FnMut(&Arc<ConnHandle>)) {
        for shard in self.shards.iter() {
            let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            for entry in shard.values() {
                entry.conns.iter().for_each(&mut f);
            }
        }
    }
}

fn other(t: Transport) -> Transport {
    match t {
        Transport::Ws => Transport::Sse,
        Transport::Sse => Transport::Ws,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::Policy;

    const LIMITS: QueueLimits = QueueLimits {
        max_frames: 2,
        max_bytes: 1 << 20,
        policy: SlowConsumerPolicy::Disconnect,
    };

    /// Room for every frame a test queues.
    const ROOMY: QueueLimits = QueueLimits {
        max_frames: 10,
        ..LIMITS
    };

    fn conn(hub: &Hub, user: &str, device: Option<&str>, t: Transport) -> Arc<ConnHandle> {
        assert!(hub.reserve(t, 100));
        let h = Arc::new(ConnHandle::new(
            hub.next_conn_id(),
            user.into(),
            device.map(Into::into),
            t,
            "127.0.0.1:1".parse().unwrap(),
            Policy::default().new_clock(0, 0.5),
            0,
        ));
        hub.register(h.clone(), 0).unwrap();
        h
    }

    fn drain(h: &ConnHandle) -> Vec<Bytes> {
        let mut v = Vec::new();
        while let Next::Frame(o) = h.next_outbound() {
            v.push(o.bytes);
        }
        v
    }

    fn text(p: &str) -> Payload {
        Payload::text(Bytes::copy_from_slice(p.as_bytes())).unwrap()
    }

    #[test]
    fn push_reaches_every_device_once_with_increasing_ids() {
        let hub = Hub::new();
        let a = conn(&hub, "u", Some("phone"), Transport::Ws);
        let b = conn(&hub, "u", Some("laptop"), Transport::Sse);
        let other = conn(&hub, "v", None, Transport::Ws);
        let now = tokio::time::Instant::now();
        let limits = ROOMY;
        let o1 = hub.deliver(&PushRequest::to_user("u", &text("one")), 1, now, limits);
        let o2 = hub.deliver(&PushRequest::to_user("u", &text("two")), 2, now, limits);
        assert_eq!(o1.delivered, 2);
        assert!(o2.id.unwrap() == o1.id.unwrap() + 1);
        assert_eq!(drain(&a).len(), 2);
        let sse = drain(&b);
        assert!(std::str::from_utf8(&sse[1]).unwrap().contains("data: two"));
        assert!(drain(&other).is_empty());
        assert_eq!(
            hub.deliver(&PushRequest::to_user("nobody", &text("x")), 3, now, limits)
                .delivered,
            0
        );
    }

    #[test]
    fn newer_connection_of_a_device_supersedes_the_older() {
        let hub = Hub::new();
        let old = conn(&hub, "u", Some("phone"), Transport::Ws);
        let new = conn(&hub, "u", Some("phone"), Transport::Ws);
        assert!(old.state().superseded);
        let o = hub.deliver(
            &PushRequest::to_user("u", &text("x")),
            4,
            tokio::time::Instant::now(),
            ROOMY,
        );
        assert_eq!(o.delivered, 1);
        assert!(drain(&old).is_empty());
        assert_eq!(drain(&new).len(), 1);
        hub.unregister(&old);
        hub.unregister(&new);
        assert!(hub.connections("u").is_empty());
    }

    #[test]
    fn slow_consumer_policies() {
        let hub = Hub::new();
        let c = conn(&hub, "u", None, Transport::Ws);
        let now = tokio::time::Instant::now();
        hub.deliver(&PushRequest::to_user("u", &text("1")), 5, now, LIMITS);
        hub.deliver(&PushRequest::to_user("u", &text("2")), 6, now, LIMITS);
        let o = hub.deliver(&PushRequest::to_user("u", &text("3")), 7, now, LIMITS);
        assert_eq!(o.dropped, 1);
        assert!(matches!(
            c.next_outbound(),
            Next::Close(DisconnectReason::SlowConsumer)
        ));

        let d = conn(&hub, "w", None, Transport::Ws);
        let keep = QueueLimits {
            max_frames: 2,
            max_bytes: 1 << 20,
            policy: SlowConsumerPolicy::DropOldest,
        };
        for (id, p) in [(8, "1"), (9, "2"), (10, "3")] {
            hub.deliver(&PushRequest::to_user("w", &text(p)), id, now, keep);
        }
        let frames = drain(&d);
        assert_eq!(frames.len(), 2);
        assert!(String::from_utf8_lossy(&frames[1]).contains("\"3\""));
    }

    #[test]
    fn queue_is_bounded_in_bytes_too() {
        let hub = Hub::new();
        let c = conn(&hub, "u", None, Transport::Sse);
        let limits = QueueLimits {
            max_frames: 100,
            max_bytes: 250,
            policy: SlowConsumerPolicy::DropOldest,
        };
        let now = tokio::time::Instant::now();
        let big = "x".repeat(100);
        for id in 20..25 {
            hub.deliver(&PushRequest::to_user("u", &text(&big)), id, now, limits);
        }
        let st = c.state();
        assert!(st.queued_bytes <= 250, "{} bytes queued", st.queued_bytes);
        assert_eq!(
            st.queued_bytes,
            st.queue.iter().map(|o| o.bytes.len()).sum::<usize>()
        );
        drop(st);
        // One frame larger than the budget still goes through an empty queue.
        let d = conn(&hub, "w", None, Transport::Sse);
        let o = hub.deliver(
            &PushRequest::to_user("w", &text(&"y".repeat(1000))),
            10,
            now,
            limits,
        );
        assert_eq!(o.delivered, 1);
        assert_eq!(drain(&d).len(), 1);
    }

    #[test]
    fn a_connection_gets_each_id_once_and_in_increasing_order() {
        let hub = Hub::new();
        let c = conn(&hub, "u", None, Transport::Ws);
        let now = tokio::time::Instant::now();
        let limits = ROOMY;
        for id in [5, 5, 6, 4, 7] {
            hub.deliver(&PushRequest::to_user("u", &text("x")), id, now, limits);
        }
        let ids: Vec<u64> = std::iter::from_fn(|| match c.next_outbound() {
            Next::Frame(o) => Some(o.id),
            _ => None,
        })
        .collect();
        assert_eq!(ids, vec![5, 6, 7]);
    }

    #[test]
    fn resume_puts_gap_and_backlog_before_live_messages_without_duplicates() {
        let hub = Hub::new();
        let c = conn(&hub, "u", None, Transport::Ws);
        let now = tokio::time::Instant::now();
        let limits = ROOMY;
        // Live messages that arrived while the backlog was being read: 11 is also in the
        // backlog, 12 is not.
        hub.deliver(&PushRequest::to_user("u", &text("11")), 11, now, limits);
        hub.deliver(&PushRequest::to_user("u", &text("12")), 12, now, limits);
        c.enqueue(Outbound::control(Bytes::from_static(b"ping")), limits);
        let backlog = (9..=11)
            .map(|id| Outbound {
                bytes: Bytes::from(format!("m{id}")),
                received_at: None,
                id,
            })
            .collect();
        c.resume(Some(Bytes::from_static(b"gap")), backlog);
        let got: Vec<(u64, Bytes)> = std::iter::from_fn(|| match c.next_outbound() {
            Next::Frame(o) => Some((o.id, o.bytes)),
            _ => None,
        })
        .collect();
        let ids: Vec<u64> = got.iter().map(|(id, _)| *id).collect();
        assert_eq!(ids, vec![0, 9, 10, 11, 12, 0]);
        assert_eq!(&got[0].1[..], b"gap");
        assert_eq!(&got[5].1[..], b"ping");
        // Later live messages continue after the backlog.
        hub.deliver(&PushRequest::to_user("u", &text("11")), 11, now, limits);
        hub.deliver(&PushRequest::to_user("u", &text("13")), 13, now, limits);
        assert!(matches!(c.next_outbound(), Next::Frame(o) if o.id == 13));
    }

    fn conn_capped(
        hub: &Hub,
        user: &str,
        device: Option<&str>,
        max: usize,
    ) -> Result<Arc<ConnHandle>, UserAtCapacity> {
        let h = Arc::new(ConnHandle::new(
            hub.next_conn_id(),
            user.into(),
            device.map(Into::into),
            Transport::Ws,
            "127.0.0.1:1".parse().unwrap(),
            Policy::default().new_clock(0, 0.5),
            0,
        ));
        hub.register(h.clone(), max).map(|_| h)
    }

    #[test]
    fn per_user_cap_refuses_the_newest_but_lets_replacements_in() {
        let hub = Hub::new();
        let a = conn_capped(&hub, "u", Some("phone"), 2).unwrap();
        let b = conn_capped(&hub, "u", None, 2).unwrap();
        assert_eq!(
            conn_capped(&hub, "u", None, 2).unwrap_err(),
            UserAtCapacity { held: 2 }
        );
        assert!(conn_capped(&hub, "other", None, 2).is_ok());
        // The same device reconnecting replaces its old connection, even at the cap.
        let a2 = conn_capped(&hub, "u", Some("phone"), 2).unwrap();
        assert!(a.state().superseded);
        // A connection asked to reconnect (rotation) leaves room for its replacement.
        b.state().clock.asked_at = Some(1);
        let b2 = conn_capped(&hub, "u", None, 2).unwrap();
        // Leaving connections count towards the hard bound of twice the cap.
        assert_eq!(hub.connections("u").len(), 4);
        a2.state().clock.asked_at = Some(1);
        assert!(conn_capped(&hub, "u", Some("tablet"), 2).is_err());
        hub.unregister(&a);
        hub.unregister(&b);
        let c = conn_capped(&hub, "u", None, 2).unwrap();
        assert_eq!(hub.connections("u").len(), 3);
        assert!(conn_capped(&hub, "u", None, 2).is_err(), "b2 and c stay");
        drop((b2, c));
    }

    #[test]
    fn capacity_reservations() {
        let hub = Hub::new();
        assert!(hub.reserve(Transport::Ws, 2));
        assert!(hub.reserve(Transport::Sse, 2));
        assert!(!hub.reserve(Transport::Ws, 2));
        hub.release(Transport::Sse);
        assert!(hub.reserve(Transport::Ws, 2));
        assert_eq!(hub.open(Transport::Ws), 2);
    }
}
