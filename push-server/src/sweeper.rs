//! The sweeper: one task that looks at every connection whose `next_due` has passed and
//! applies the lifecycle policy to it (heartbeat, ask to reconnect, close). Timers are not
//! per connection, so an idle connection holds none (see connection.rs).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::clock::NodeClock;
use crate::drain::Drain;
use crate::hub::{ConnHandle, Hub, Outbound, QueueLimits, Transport};
use crate::lifecycle::{Action, Policy};
use crate::protocol::message::{ReconnectReason, ServerMessage};
use crate::protocol::sse;

/// An empty WebSocket ping: `0x89 0x00`.
const PING_FRAME: &[u8] = &[0x89, 0x00];

/// The lifecycle checks over a node's connections.
#[derive(Debug)]
pub struct Sweeper {
    hub: Arc<Hub>,
    policy: Policy,
    drain: Arc<Drain>,
    clock: NodeClock,
    limits: QueueLimits,
    /// Prebuilt frames: `[reason][transport]` for `reconnect`.
    reconnect_frames: [[Bytes; 2]; 2],
}

impl Sweeper {
    /// A sweeper over `hub` applying `policy`.
    pub fn new(
        hub: Arc<Hub>,
        policy: Policy,
        drain: Arc<Drain>,
        clock: NodeClock,
        limits: QueueLimits,
    ) -> Self {
        let grace_ms = policy.reconnect_grace.as_millis() as u64;
        let frames = |reason| {
            let msg = ServerMessage::Reconnect { reason, grace_ms };
            [msg.ws_frame(), msg.sse_event()]
        };
        Self {
            reconnect_frames: [
                frames(ReconnectReason::Rotate),
                frames(ReconnectReason::Drain),
            ],
            hub,
            policy,
            drain,
            clock,
            limits,
        }
    }

    /// Starts a drain now (idempotent).
    pub fn begin_drain(&self) {
        if self.drain.begin(self.clock.now()) {
            tracing::info!(
                connections = self.hub.open_total(),
                window = ?self.policy.drain_window,
                "drain started: spreading reconnect over the window"
            );
            // Every connection must be looked at again to get its drain slot.
            self.hub
                .for_each(|c| c.next_due.store(0, Ordering::Relaxed));
        }
    }

    /// Sweeps every `interval` until the task is aborted.
    pub async fn run(self: Arc<Self>, interval: Duration) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.sweep();
        }
    }

    /// One pass of lifecycle checks over every connection.
    pub fn sweep(&self) {
        let now = self.clock.now();
        let drain = self.drain.started();
        let policy = &self.policy;
        self.hub.for_each(|c| {
            if now < c.next_due.load(Ordering::Relaxed) {
                return;
            }
            let hears = c.transport == Transport::Ws;
            let slot = drain.map(|d| policy.drain_slot(c.id, d));
            let action = {
                let mut st = c.state();
                let action = policy.on_tick(&mut st.clock, now, slot, hears);
                c.next_due
                    .store(policy.next_due(&st.clock, slot, hears), Ordering::Relaxed);
                action
            };
            self.apply(c, action);
        });
    }

    fn apply(&self, c: &ConnHandle, action: Action) {
        let bytes = match action {
            Action::Nothing => return,
            Action::Close(reason) => return c.close(reason),
            Action::Heartbeat => match c.transport {
                Transport::Ws => Bytes::from_static(PING_FRAME),
                Transport::Sse => Bytes::from_static(sse::HEARTBEAT),
            },
            Action::AskReconnect(reason) => self.reconnect_frame(reason, c.transport),
        };
        c.enqueue(Outbound::control(bytes), self.limits);
    }

    fn reconnect_frame(&self, reason: ReconnectReason, t: Transport) -> Bytes {
        let r = match reason {
            ReconnectReason::Rotate => 0,
            ReconnectReason::Drain => 1,
        };
        let i = t.index();
        self.reconnect_frames[r][i].clone()
    }
}
