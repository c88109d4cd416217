//! Connection lifecycle policy as pure functions: randomised lifetimes, reconnect and its
//! grace period, heartbeats and dead-peer detection, and spreading a drain over a window.
//!
//! Nothing here reads a clock. Times are [`Millis`] since the node's epoch, passed in by the
//! caller (the sweeper in `server.rs`), so every rule is tested without sockets or sleeps.

use std::time::Duration;

use crate::protocol::message::ReconnectReason;

/// Milliseconds since the node's epoch (the server's start).
pub type Millis = u64;

/// Why a connection ended. The label of `push_disconnects_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DisconnectReason {
    /// The client closed a connection it had not been asked to close.
    ClientClose,
    /// The client closed after a `reconnect` for rotation (the healthy path).
    Rotated,
    /// The client closed after a `reconnect` during a drain.
    Drain,
    /// The client did not close within the grace period after `reconnect`; the server did.
    ForcedAfterGrace,
    /// No frame from the client within the heartbeat timeout.
    HeartbeatTimeout,
    /// The client read too slowly and its bounded queue overflowed.
    SlowConsumer,
    /// A newer connection for the same user and device took over, and the old one closed.
    Replaced,
    /// The client broke the WebSocket protocol or sent a message too large.
    ProtocolError,
    /// A socket error (reset, broken pipe).
    IoError,
}

impl DisconnectReason {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClientClose => "client_close",
            Self::Rotated => "rotated",
            Self::Drain => "drain",
            Self::ForcedAfterGrace => "forced_after_grace",
            Self::HeartbeatTimeout => "heartbeat_timeout",
            Self::SlowConsumer => "slow_consumer",
            Self::Replaced => "replaced",
            Self::ProtocolError => "protocol_error",
            Self::IoError => "io_error",
        }
    }

    /// Whether the client, not the server, closed first (so the client holds TIME_WAIT).
    pub fn client_initiated(self) -> bool {
        matches!(
            self,
            Self::ClientClose | Self::Rotated | Self::Drain | Self::Replaced | Self::IoError
        )
    }
}

/// The lifecycle settings of a node.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Mean connection lifetime before the server asks the client to reconnect.
    pub lifetime: Duration,
    /// Fraction of `lifetime` by which each connection's lifetime varies (0.25 = ±25 %).
    /// Randomising spreads reconnects so that connections made together (after a deploy)
    /// do not all come back together.
    pub lifetime_jitter: f64,
    /// How long after `reconnect` the server waits for the client to close before closing.
    pub reconnect_grace: Duration,
    /// Interval between heartbeats (WebSocket ping, SSE comment).
    pub heartbeat_interval: Duration,
    /// A WebSocket client silent for this long (no pong, no frame) is taken for dead.
    pub heartbeat_timeout: Duration,
    /// Window over which a drain spreads its `reconnect` messages.
    pub drain_window: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            lifetime: Duration::from_secs(30 * 60),
            lifetime_jitter: 0.25,
            reconnect_grace: Duration::from_secs(30),
            heartbeat_interval: Duration::from_secs(30),
            heartbeat_timeout: Duration::from_secs(75),
            drain_window: Duration::from_secs(60),
        }
    }
}

/// What the sweeper should do with a connection now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Nothing is due.
    Nothing,
    /// Send a heartbeat.
    Heartbeat,
    /// Send `reconnect`.
    AskReconnect(ReconnectReason),
    /// Close the connection.
    Close(DisconnectReason),
}

/// The lifecycle state of one connection: 40 bytes, no allocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Clock {
    /// When the connection will be asked to reconnect for rotation.
    pub expires_at: Millis,
    /// Last time bytes arrived from the client.
    pub last_heard: Millis,
    /// When the next heartbeat is due.
    pub next_heartbeat: Millis,
    /// When `reconnect` was sent (or the connection was superseded), if it was.
    pub asked_at: Option<Millis>,
    /// Why the client was asked to go, if it was.
    pub asked_for: Option<ReconnectReason>,
}

impl Policy {
    /// A connection's lifetime, given `u` drawn uniformly from `[0, 1)`.
    pub fn lifetime_for(&self, u: f64) -> Duration {
        let factor = 1.0 + self.lifetime_jitter * (2.0 * u.clamp(0.0, 1.0) - 1.0);
        self.lifetime.mul_f64(factor.max(0.0))
    }

    /// The clock of a connection opened at `now` with lifetime sample `u`.
    pub fn new_clock(&self, now: Millis, u: f64) -> Clock {
        Clock {
            expires_at: now + ms(self.lifetime_for(u)),
            last_heard: now,
            next_heartbeat: now + ms(self.heartbeat_interval),
            asked_at: None,
            asked_for: None,
        }
    }

    /// Decides what is due for a connection at `now`, and updates its clock as if the
    /// action were taken. At most one action per call, most severe first.
    ///
    /// `drain_slot` is this connection's turn in a drain in progress ([`Policy::drain_slot`]).
    /// `hears_client` is true for transports whose clients answer heartbeats (WebSocket);
    /// SSE peers are found dead by failed writes and TCP keepalive instead.
    pub fn on_tick(
        &self,
        clock: &mut Clock,
        now: Millis,
        drain_slot: Option<Millis>,
        hears_client: bool,
    ) -> Action {
        if let Some(asked) = clock.asked_at {
            if now >= asked + ms(self.reconnect_grace) {
                return Action::Close(DisconnectReason::ForcedAfterGrace);
            }
        } else {
            let reason = match drain_slot {
                Some(slot) if now >= slot => Some(ReconnectReason::Drain),
                _ if now >= clock.expires_at => Some(ReconnectReason::Rotate),
                _ => None,
            };
            if let Some(reason) = reason {
                clock.asked_at = Some(now);
                clock.asked_for = Some(reason);
                return Action::AskReconnect(reason);
            }
        }
        if hears_client && now >= clock.last_heard + ms(self.heartbeat_timeout) {
            return Action::Close(DisconnectReason::HeartbeatTimeout);
        }
        if now >= clock.next_heartbeat {
            clock.next_heartbeat = now + ms(self.heartbeat_interval);
            return Action::Heartbeat;
        }
        Action::Nothing
    }

    /// The earliest time at which [`Policy::on_tick`] may return something other than
    /// `Nothing`. The sweeper skips a connection until then without locking it.
    pub fn next_due(
        &self,
        clock: &Clock,
        drain_slot: Option<Millis>,
        hears_client: bool,
    ) -> Millis {
        let mut due = clock.next_heartbeat;
        match clock.asked_at {
            Some(asked) => due = due.min(asked + ms(self.reconnect_grace)),
            None => {
                due = due.min(clock.expires_at);
                if let Some(slot) = drain_slot {
                    due = due.min(slot);
                }
            }
        }
        if hears_client {
            due = due.min(clock.last_heard + ms(self.heartbeat_timeout));
        }
        due
    }

    /// When connection `conn_id` is asked to reconnect in a drain started at `started_at`:
    /// a point spread evenly over the drain window, so that a node's clients do not all
    /// reconnect to the rest of the fleet in the same instant.
    pub fn drain_slot(&self, conn_id: u64, started_at: Millis) -> Millis {
        // Fibonacci hashing: consecutive IDs land far apart in [0, 1).
        let frac = (conn_id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11) as f64 / (1u64 << 53) as f64;
        started_at + (ms(self.drain_window) as f64 * frac) as Millis
    }

    /// The reason to record when the client closes a connection.
    pub fn client_close_reason(clock: &Clock, superseded: bool) -> DisconnectReason {
        match clock.asked_for {
            Some(ReconnectReason::Rotate) => DisconnectReason::Rotated,
            Some(ReconnectReason::Drain) => DisconnectReason::Drain,
            None if superseded => DisconnectReason::Replaced,
            None => DisconnectReason::ClientClose,
        }
    }
}

fn ms(d: Duration) -> Millis {
    d.as_millis() as Millis
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            lifetime: Duration::from_secs(100),
            lifetime_jitter: 0.25,
            reconnect_grace: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(30),
            heartbeat_timeout: Duration::from_secs(75),
            drain_window: Duration::from_secs(60),
        }
    }

    #[test]
    fn lifetimes_stay_within_the_jitter() {
        let p = policy();
        assert_eq!(p.lifetime_for(0.0), Duration::from_secs(75));
        assert_eq!(p.lifetime_for(0.5), Duration::from_secs(100));
        assert!(p.lifetime_for(0.999_999) <= Duration::from_secs(125));
        let none = Policy {
            lifetime_jitter: 0.0,
            ..p
        };
        assert_eq!(none.lifetime_for(0.9), Duration::from_secs(100));
    }

    #[test]
    fn rotation_asks_once_then_forces_after_grace() {
        let p = Policy {
            heartbeat_interval: Duration::from_secs(1000),
            heartbeat_timeout: Duration::from_secs(1000),
            ..policy()
        };
        let mut c = p.new_clock(0, 0.5); // expires at 100 s
        assert_eq!(p.on_tick(&mut c, 99_999, None, true), Action::Nothing);
        assert_eq!(p.next_due(&c, None, true), 100_000);
        assert_eq!(
            p.on_tick(&mut c, 100_000, None, true),
            Action::AskReconnect(ReconnectReason::Rotate)
        );
        assert_eq!(p.on_tick(&mut c, 105_000, None, true), Action::Nothing);
        assert_eq!(p.next_due(&c, None, true), 110_000);
        assert_eq!(
            p.on_tick(&mut c, 110_000, None, true),
            Action::Close(DisconnectReason::ForcedAfterGrace)
        );
        assert_eq!(
            Policy::client_close_reason(&c, false),
            DisconnectReason::Rotated
        );
    }

    #[test]
    fn heartbeats_repeat_and_silence_is_death() {
        let p = policy();
        let mut c = p.new_clock(0, 0.5);
        assert_eq!(p.on_tick(&mut c, 30_000, None, true), Action::Heartbeat);
        assert_eq!(p.on_tick(&mut c, 30_001, None, true), Action::Nothing);
        assert_eq!(p.next_due(&c, None, true), 60_000);
        assert_eq!(p.on_tick(&mut c, 60_000, None, true), Action::Heartbeat);
        // Nothing heard since 0: at 75 s the WebSocket peer is dead...
        assert_eq!(
            p.on_tick(&mut c, 75_000, None, true),
            Action::Close(DisconnectReason::HeartbeatTimeout)
        );
        // ...but not if it answered.
        c.last_heard = 61_000;
        assert_eq!(p.on_tick(&mut c, 75_000, None, true), Action::Nothing);
        // SSE clients never answer; they are not timed out by silence.
        let mut s = p.new_clock(0, 0.5);
        s.next_heartbeat = 1_000_000;
        assert_eq!(p.on_tick(&mut s, 80_000, None, false), Action::Nothing);
    }

    #[test]
    fn drain_slots_spread_over_the_window() {
        let p = policy();
        let slots: Vec<Millis> = (0..1000).map(|id| p.drain_slot(id, 5_000)).collect();
        assert!(slots.iter().all(|s| (5_000..65_000).contains(s)));
        // Every tenth of the window gets a fair share (no herd at the start or end).
        for decile in 0..10u64 {
            let lo = 5_000 + decile * 6_000;
            let n = slots
                .iter()
                .filter(|s| (lo..lo + 6_000).contains(*s))
                .count();
            assert!((60..=140).contains(&n), "decile {decile} got {n}");
        }
    }

    #[test]
    fn drain_asks_at_the_slot_then_forces() {
        let p = policy();
        let mut c = p.new_clock(0, 0.5);
        c.next_heartbeat = u64::MAX / 2;
        c.last_heard = 40_000;
        assert_eq!(
            p.on_tick(&mut c, 40_000, Some(45_000), true),
            Action::Nothing
        );
        assert_eq!(p.next_due(&c, Some(45_000), true), 45_000);
        assert_eq!(
            p.on_tick(&mut c, 45_000, Some(45_000), true),
            Action::AskReconnect(ReconnectReason::Drain)
        );
        assert_eq!(
            Policy::client_close_reason(&c, false),
            DisconnectReason::Drain
        );
        assert_eq!(
            p.on_tick(&mut c, 55_000, Some(45_000), true),
            Action::Close(DisconnectReason::ForcedAfterGrace)
        );
    }

    #[test]
    fn an_already_rotating_connection_is_not_asked_again_by_a_drain() {
        let p = policy();
        let mut c = p.new_clock(0, 0.5);
        c.last_heard = 100_000;
        c.next_heartbeat = u64::MAX / 2;
        assert_eq!(
            p.on_tick(&mut c, 100_000, None, true),
            Action::AskReconnect(ReconnectReason::Rotate)
        );
        assert_eq!(p.on_tick(&mut c, 101_000, Some(0), true), Action::Nothing);
    }

    #[test]
    fn close_reasons_of_clients() {
        let p = policy();
        let c = p.new_clock(0, 0.5);
        assert_eq!(
            Policy::client_close_reason(&c, false),
            DisconnectReason::ClientClose
        );
        assert_eq!(
            Policy::client_close_reason(&c, true),
            DisconnectReason::Replaced
        );
        assert!(DisconnectReason::Rotated.client_initiated());
        assert!(!DisconnectReason::ForcedAfterGrace.client_initiated());
    }
}
