//! The hub: which local connections belong to which user, and the delivery of a message
//! to them. Each connection's queue and handle are in queue.rs (re-exported here).
//!
//! Locks are `std::sync::Mutex`, never held across an `.await` (clippy denies it): every
//! critical section is a few pointer moves. Lock order: a hub shard, then a connection's
//! state; never the reverse.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::time::Instant;

use crate::protocol::message::{self, Payload};
use crate::trace::FrameSpans;
use telemetry::propagation::TraceContext;

pub use crate::queue::{
    AckRefused, AckSlot, ConnHandle, ConnState, Enqueued, Fate, Next, Offer, Outbound, QueueLimits,
    SlowConsumerPolicy, Transport, ACKS_IN_FLIGHT,
};

/// The result of a push to a user on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PushOutcome {
    /// The message's per-user ID.
    pub id: Option<u64>,
    /// The history already held this queue message ID (a redelivery): it keeps its first
    /// ID, and connections that were sent it do not get it again.
    pub duplicate: bool,
    /// Connections whose socket took the message (written whole, before the push answered;
    /// or written before, for a redelivery).
    pub delivered: usize,
    /// Connections that did not write it: closing, or slow consumers (it stays in the
    /// history for their resume).
    pub dropped: usize,
    /// Of `delivered`, connections that were asked to reconnect (rotation, drain): their
    /// client may already be reading a newer connection on another node.
    pub leaving: usize,
}

/// A message queued for a user's connections, not yet known to be written.
#[derive(Debug)]
pub struct Delivery {
    outcome: PushOutcome,
    /// Connections it was queued for, the frame's fate there, and whether the connection
    /// was asked to reconnect.
    pending: Vec<(Arc<ConnHandle>, Arc<Fate>, bool)>,
    policy: SlowConsumerPolicy,
}

impl Delivery {
    /// Waits until each connection wrote the frame, or `deadline`: `delivered` then counts
    /// the connections whose socket took it, `dropped` the others. A connection that did
    /// not write it in time is a slow consumer: cut off under the disconnect policy (its
    /// client resumes from the history); under drop-oldest it keeps the frame queued.
    pub async fn settle(self, deadline: Instant) -> PushOutcome {
        let mut outcome = self.outcome;
        for (conn, fate, leaving) in self.pending {
            match fate.wait(deadline).await {
                Some(true) => {
                    outcome.delivered += 1;
                    outcome.leaving += usize::from(leaving);
                }
                Some(false) => {
                    // Dropped from the queue: counted where it was dropped (drop-oldest),
                    // or as the queue of a connection that closed.
                    outcome.dropped += 1;
                    if self.policy == SlowConsumerPolicy::Disconnect {
                        metrics::counter!(crate::metrics::MESSAGES_DROPPED, "reason" => "connection_closing").increment(1);
                    }
                }
                None => {
                    outcome.dropped += 1;
                    metrics::counter!(crate::metrics::MESSAGES_DROPPED, "reason" => "not_written_in_time").increment(1);
                    if self.policy == SlowConsumerPolicy::Disconnect {
                        conn.cut_off();
                    }
                }
            }
        }
        outcome
    }
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
    /// W3C `traceparent` shown to WebSocket clients with the message (the node's receive
    /// span when traced here, else the sender's).
    pub traceparent: Option<&'a str>,
    /// The node's receive span, when it is sampled: the parent of each connection's
    /// `queue` and `socket write` spans (trace.rs). `None` costs nothing per connection.
    pub trace: Option<&'a TraceContext>,
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
            traceparent: None,
            trace: None,
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
    /// the one device named in the request). A full queue is waited on until `deadline`
    /// (back-pressure on the sender), then the slow-consumer policy applies. The returned
    /// [`Delivery`] settles into the outcome once the frames are written.
    ///
    /// The frame is encoded once per transport and shared. Callers queue one user's messages
    /// in ID order (see push.rs); a connection skips an ID it was queued before.
    pub async fn deliver(
        &self,
        req: &PushRequest<'_>,
        id: u64,
        received_at: Instant,
        limits: QueueLimits,
        deadline: Instant,
    ) -> Delivery {
        let mut d = Delivery {
            outcome: PushOutcome {
                id: Some(id),
                ..PushOutcome::default()
            },
            pending: Vec::new(),
            policy: limits.policy,
        };
        let targets: Vec<Arc<ConnHandle>> = {
            let shard = self.shard(req.user);
            let Some(entry) = shard.get(req.user) else {
                return d;
            };
            let mut targets = Vec::new();
            for c in &entry.conns {
                if !c.wants(req.device) {
                    c.passed(id);
                } else if !c.state().superseded {
                    targets.push(c.clone());
                }
            }
            targets
        };
        let mut ws_frame = None;
        let mut sse_frame = None;
        for conn in targets {
            let bytes = match conn.transport {
                Transport::Ws => ws_frame
                    .get_or_insert_with(|| {
                        message::message_ws_frame(id, req.message_id, req.traceparent, req.payload)
                    })
                    .clone(),
                Transport::Sse => sse_frame
                    .get_or_insert_with(|| {
                        message::message_sse_event_traced(id, req.traceparent, req.payload)
                    })
                    .clone(),
            };
            let fate = Arc::new(Fate::default());
            let out = Outbound {
                bytes,
                received_at: Some(received_at),
                id,
                fate: Some(fate.clone()),
                partial: false,
                trace: req.trace.map(|cx| FrameSpans::queued(cx, conn.id)),
            };
            let leaving = conn.state().clock.asked_at.is_some();
            match conn.enqueue_message(out, limits, deadline).await {
                Enqueued::Queued | Enqueued::DroppedOldest => {
                    d.pending.push((conn, fate, leaving));
                }
                Enqueued::AlreadySent => {
                    d.outcome.delivered += 1;
                    d.outcome.leaving += usize::from(leaving);
                }
                Enqueued::Refused => {
                    d.outcome.dropped += 1;
                    metrics::counter!(crate::metrics::MESSAGES_DROPPED, "reason" => "connection_closing").increment(1);
                }
            }
        }
        d
    }

    /// The connections that message `id` of `req` is for and that would skip IDs before it
    /// (see [`ConnHandle::skips_before`]), each with the ID its client stands at.
    pub fn skipping(&self, req: &PushRequest<'_>, id: u64) -> Vec<(Arc<ConnHandle>, u64)> {
        let shard = self.shard(req.user);
        let Some(entry) = shard.get(req.user) else {
            return Vec::new();
        };
        entry
            .conns
            .iter()
            .filter(|c| c.wants(req.device))
            .filter_map(|c| c.skips_before(id).map(|at| (c.clone(), at)))
            .collect()
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
    use std::time::Duration;

    use bytes::{Buf, Bytes};

    use super::*;
    use crate::lifecycle::{DisconnectReason, Policy};
    use crate::queue::CONTROL_SLACK;

    const LIMITS: QueueLimits = QueueLimits {
        max_frames: 2,
        max_bytes: 1 << 20,
        policy: SlowConsumerPolicy::Disconnect,
        slow_after: Duration::from_secs(2),
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

    /// Writes everything queued, as the driver does on a socket that takes it all.
    fn drain(h: &ConnHandle) -> Vec<Bytes> {
        drain_out(h).into_iter().map(|(_, b)| b).collect()
    }

    fn drain_out(h: &ConnHandle) -> Vec<(u64, Bytes)> {
        let mut v = Vec::new();
        while let Next::Frame(o) = h.next_outbound() {
            v.push((o.id, o.bytes.clone()));
            o.written();
        }
        v
    }

    fn text(p: &str) -> Payload {
        Payload::text(Bytes::copy_from_slice(p.as_bytes())).unwrap()
    }

    /// Queues without waiting for room (the deadline has passed).
    async fn queue(hub: &Hub, user: &str, p: &str, id: u64, limits: QueueLimits) -> Delivery {
        let now = Instant::now();
        hub.deliver(&PushRequest::to_user(user, &text(p)), id, now, limits, now)
            .await
    }

    #[tokio::test]
    async fn push_reaches_every_device_once_with_increasing_ids() {
        let hub = Hub::new();
        let a = conn(&hub, "u", Some("phone"), Transport::Ws);
        let b = conn(&hub, "u", Some("laptop"), Transport::Sse);
        let other = conn(&hub, "v", None, Transport::Ws);
        let d1 = queue(&hub, "u", "one", 1, ROOMY).await;
        let d2 = queue(&hub, "u", "two", 2, ROOMY).await;
        assert_eq!(drain(&a).len(), 2);
        let sse = drain(&b);
        assert!(std::str::from_utf8(&sse[1]).unwrap().contains("data: two"));
        let o1 = d1.settle(Instant::now()).await;
        let o2 = d2.settle(Instant::now()).await;
        assert_eq!(o1.delivered, 2);
        assert!(o2.id.unwrap() == o1.id.unwrap() + 1);
        assert!(drain(&other).is_empty());
        let none = queue(&hub, "nobody", "x", 3, ROOMY).await;
        assert_eq!(none.settle(Instant::now()).await.delivered, 0);
    }

    #[tokio::test]
    async fn delivered_counts_only_frames_written_to_the_socket() {
        let hub = Hub::new();
        let c = conn(&hub, "u", None, Transport::Ws);
        let d = queue(&hub, "u", "x", 1, ROOMY).await;
        // Nothing wrote it: not delivered, and the silent connection is a slow consumer.
        let o = d.settle(Instant::now()).await;
        assert_eq!((o.delivered, o.dropped), (0, 1));
        assert!(matches!(
            c.next_outbound(),
            Next::Close(DisconnectReason::SlowConsumer)
        ));
    }

    #[tokio::test]
    async fn newer_connection_of_a_device_supersedes_the_older() {
        let hub = Hub::new();
        let old = conn(&hub, "u", Some("phone"), Transport::Ws);
        let new = conn(&hub, "u", Some("phone"), Transport::Ws);
        assert!(old.state().superseded);
        let d = queue(&hub, "u", "x", 4, ROOMY).await;
        assert!(drain(&old).is_empty());
        assert_eq!(drain(&new).len(), 1);
        assert_eq!(d.settle(Instant::now()).await.delivered, 1);
        hub.unregister(&old);
        hub.unregister(&new);
        assert!(hub.connections("u").is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_to_a_reading_client_is_paced_not_cut_off() {
        let hub = Arc::new(Hub::new());
        let c = conn(&hub, "u", None, Transport::Ws);
        let reader = {
            let c = c.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                while got.len() < 1000 {
                    got.extend(drain_out(&c).into_iter().map(|(id, _)| id));
                    tokio::task::yield_now().await;
                }
                got
            })
        };
        let now = Instant::now();
        let deadline = now + LIMITS.slow_after;
        let mut deliveries = Vec::new();
        for id in 1..=1000 {
            let p = text("m");
            let req = PushRequest::to_user("u", &p);
            deliveries.push(hub.deliver(&req, id, now, LIMITS, deadline).await);
        }
        let mut delivered = 0;
        for d in deliveries {
            delivered += d.settle(deadline).await.delivered;
        }
        assert_eq!(delivered, 1000);
        let got = reader.await.unwrap();
        assert_eq!(got, (1..=1000).collect::<Vec<u64>>());
        assert!(matches!(c.next_outbound(), Next::Idle));
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_stops_reading_is_cut_off_after_the_bound() {
        let hub = Hub::new();
        let c = conn(&hub, "u", None, Transport::Ws);
        let start = Instant::now();
        let deadline = start + LIMITS.slow_after;
        let mut outcomes = Vec::new();
        for id in 1..=3 {
            let p = text("m");
            let req = PushRequest::to_user("u", &p);
            let d = hub.deliver(&req, id, start, LIMITS, deadline).await;
            outcomes.push(d.settle(deadline).await);
        }
        // The third waited for room until the bound (paused time jumps there), then the
        // connection was cut off; none of the three counts as delivered.
        assert_eq!(Instant::now(), deadline);
        assert!(outcomes.iter().all(|o| o.delivered == 0 && o.dropped == 1));
        assert!(matches!(
            c.next_outbound(),
            Next::Close(DisconnectReason::SlowConsumer)
        ));
    }

    #[tokio::test]
    async fn slow_consumer_policies() {
        let hub = Hub::new();
        let c = conn(&hub, "u", None, Transport::Ws);
        queue(&hub, "u", "1", 5, LIMITS).await;
        queue(&hub, "u", "2", 6, LIMITS).await;
        let o = queue(&hub, "u", "3", 7, LIMITS).await;
        assert_eq!(o.settle(Instant::now()).await.dropped, 1);
        assert!(matches!(
            c.next_outbound(),
            Next::Close(DisconnectReason::SlowConsumer)
        ));

        let d = conn(&hub, "w", None, Transport::Ws);
        let keep = QueueLimits {
            policy: SlowConsumerPolicy::DropOldest,
            ..LIMITS
        };
        for (id, p) in [(8, "1"), (9, "2"), (10, "3")] {
            queue(&hub, "w", p, id, keep).await;
        }
        let frames = drain(&d);
        assert_eq!(frames.len(), 2);
        assert!(String::from_utf8_lossy(&frames[1]).contains("\"3\""));
    }

    #[tokio::test]
    async fn a_heartbeat_into_a_full_queue_does_not_cut_off_the_client() {
        let hub = Hub::new();
        let c = conn(&hub, "u", None, Transport::Ws);
        queue(&hub, "u", "1", 1, LIMITS).await;
        queue(&hub, "u", "2", 2, LIMITS).await;
        let ping = Outbound::control(Bytes::from_static(b"ping"));
        assert_eq!(c.enqueue(ping, LIMITS), Enqueued::Queued);
        // A client that floods pings without reading still reaches a limit.
        let refused = (0..CONTROL_SLACK * 2)
            .map(|_| c.enqueue(Outbound::control(Bytes::from_static(b"p")), LIMITS))
            .any(|e| e == Enqueued::Refused);
        assert!(refused);
    }

    #[tokio::test]
    async fn drop_oldest_never_drops_the_rest_of_a_partly_written_frame() {
        let hub = Hub::new();
        let c = conn(&hub, "u", None, Transport::Ws);
        let keep = QueueLimits {
            policy: SlowConsumerPolicy::DropOldest,
            ..LIMITS
        };
        queue(&hub, "u", "first", 1, keep).await;
        queue(&hub, "u", "second", 2, keep).await;
        // The driver wrote 3 bytes of the first frame; the socket took no more.
        let Next::Frame(mut out) = c.next_outbound() else {
            panic!("a frame is queued")
        };
        out.bytes.advance(3);
        out.partial = true;
        let tail = out.bytes.clone();
        c.requeue_front(out);
        for id in 3..6 {
            queue(&hub, "u", "later", id, keep).await;
        }
        let got = drain_out(&c);
        assert_eq!(
            got[0],
            (1, tail),
            "the partly written frame is finished first"
        );
        assert_eq!(got.last().unwrap().0, 5);
    }

    #[tokio::test]
    async fn no_close_frame_while_a_frame_is_partly_written() {
        let hub = Hub::new();
        let c = conn(&hub, "u", None, Transport::Ws);
        queue(&hub, "u", "first", 1, LIMITS).await;
        queue(&hub, "u", "second", 2, LIMITS).await;
        let Next::Frame(mut out) = c.next_outbound() else {
            panic!("a frame is queued")
        };
        out.bytes.advance(1);
        out.partial = true;
        c.requeue_front(out);
        assert!(!c.state().may_write_close());
        // Cut off as a slow consumer: it closes at once, without its close frame.
        queue(&hub, "u", "3", 3, LIMITS).await;
        queue(&hub, "u", "4", 4, LIMITS).await;
        assert!(matches!(
            c.next_outbound(),
            Next::Close(DisconnectReason::SlowConsumer)
        ));
        assert!(!c.state().may_write_close());

        // A frame written whole leaves the connection free to send its close frame.
        let d = conn(&hub, "w", None, Transport::Ws);
        queue(&hub, "w", "x", 1, LIMITS).await;
        drain(&d);
        assert!(d.state().may_write_close());
    }

    #[tokio::test]
    async fn a_push_waiting_on_a_connection_that_ends_stops_waiting() {
        let hub = Hub::new();
        let c = conn(&hub, "u", None, Transport::Ws);
        let d = queue(&hub, "u", "x", 1, ROOMY).await;
        c.discard();
        let far = Instant::now() + Duration::from_secs(3600);
        let o = tokio::time::timeout(Duration::from_secs(60), d.settle(far))
            .await
            .expect("settles when the connection ends");
        assert_eq!((o.delivered, o.dropped), (0, 1));
    }

    #[tokio::test]
    async fn queue_is_bounded_in_bytes_too() {
        let hub = Hub::new();
        let c = conn(&hub, "u", None, Transport::Sse);
        let limits = QueueLimits {
            max_frames: 100,
            max_bytes: 250,
            policy: SlowConsumerPolicy::DropOldest,
            slow_after: Duration::from_secs(1),
        };
        let big = "x".repeat(100);
        for id in 20..25 {
            queue(&hub, "u", &big, id, limits).await;
        }
        {
            let st = c.state();
            assert!(st.queued_bytes <= 250, "{} bytes queued", st.queued_bytes);
            assert_eq!(
                st.queued_bytes,
                st.queue.iter().map(|o| o.bytes.len()).sum::<usize>()
            );
        }
        // One frame larger than the budget still goes through an empty queue.
        let d = conn(&hub, "w", None, Transport::Sse);
        let o = queue(&hub, "w", &"y".repeat(1000), 10, limits).await;
        assert_eq!(drain(&d).len(), 1);
        assert_eq!(o.settle(Instant::now()).await.delivered, 1);
    }

    #[tokio::test]
    async fn a_connection_gets_each_id_once_and_in_increasing_order() {
        let hub = Hub::new();
        let c = conn(&hub, "u", None, Transport::Ws);
        for id in [5, 5, 6, 4, 7] {
            queue(&hub, "u", "x", id, ROOMY).await;
        }
        let ids: Vec<u64> = drain_out(&c).into_iter().map(|(id, _)| id).collect();
        assert_eq!(ids, vec![5, 6, 7]);
    }

    #[tokio::test]
    async fn resume_puts_gap_and_backlog_before_live_messages_without_duplicates() {
        let hub = Hub::new();
        let c = conn(&hub, "u", None, Transport::Ws);
        // Live messages that arrived while the backlog was being read: 11 is also in the
        // backlog, 12 is not.
        queue(&hub, "u", "11", 11, ROOMY).await;
        queue(&hub, "u", "12", 12, ROOMY).await;
        c.enqueue(Outbound::control(Bytes::from_static(b"ping")), ROOMY);
        let backlog = (9..=11)
            .map(|id| Outbound {
                bytes: Bytes::from(format!("m{id}")),
                received_at: None,
                id,
                fate: None,
                partial: false,
                trace: None,
            })
            .collect();
        c.resume(Some(Bytes::from_static(b"gap")), backlog, Some(11));
        let got = drain_out(&c);
        let ids: Vec<u64> = got.iter().map(|(id, _)| *id).collect();
        assert_eq!(ids, vec![0, 9, 10, 11, 12, 0]);
        assert_eq!(&got[0].1[..], b"gap");
        assert_eq!(&got[5].1[..], b"ping");
        // Later live messages continue after the backlog.
        queue(&hub, "u", "11", 11, ROOMY).await;
        queue(&hub, "u", "13", 13, ROOMY).await;
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
    fn acks_are_rate_limited_deduplicated_and_bounded_per_connection() {
        let hub = Hub::new();
        let c = conn(&hub, "u", None, Transport::Ws);
        let mut slots = vec![c.admit_ack(1, 1_000, 3).unwrap()];
        assert_eq!(c.admit_ack(1, 1_000, 3).unwrap_err(), AckRefused::Duplicate);
        slots.push(c.admit_ack(2, 1_100, 3).unwrap());
        slots.push(c.admit_ack(3, 1_200, 3).unwrap());
        assert_eq!(c.admit_ack(4, 1_300, 3).unwrap_err(), AckRefused::Rate);
        // The next second has a fresh allowance.
        slots.push(c.admit_ack(4, 2_000, 3).unwrap());
        // The share: acks not yet handled hold places; handling one frees its place.
        let mut now = 10_000;
        let mut id = 100;
        while slots.len() < usize::from(ACKS_IN_FLIGHT) {
            now += 1000;
            id += 1;
            slots.push(c.admit_ack(id, now, 1).unwrap());
        }
        assert_eq!(
            c.admit_ack(id + 1, now + 1000, 1).unwrap_err(),
            AckRefused::Share
        );
        slots.pop();
        assert!(c.admit_ack(id + 2, now + 2000, 1).is_ok());
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
