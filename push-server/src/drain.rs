//! A node's drain state, beside the lifecycle policy that spreads a drain over its window
//! ([`Policy::drain_slot`]): whether a drain is in progress, since when, and when it stops
//! waiting for clients. Lock-free: every handshake and every sweep reads it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::lifecycle::{Millis, Policy};
use crate::metrics as m;

/// `u64::MAX` while not draining, else the drain's start in [`Millis`].
#[derive(Debug)]
pub struct Drain {
    started: AtomicU64,
}

impl Default for Drain {
    fn default() -> Self {
        Self::new()
    }
}

impl Drain {
    /// Not draining.
    pub fn new() -> Self {
        metrics::gauge!(m::DRAINING).set(0.0);
        Self {
            started: AtomicU64::new(u64::MAX),
        }
    }

    /// When the drain started, if one is in progress.
    pub fn started(&self) -> Option<Millis> {
        match self.started.load(Ordering::Acquire) {
            u64::MAX => None,
            t => Some(t),
        }
    }

    /// Starts a drain at `now`. True only for the call that started it (idempotent).
    pub fn begin(&self, now: Millis) -> bool {
        let started = self
            .started
            .compare_exchange(u64::MAX, now, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if started {
            metrics::gauge!(m::DRAINING).set(1.0);
        }
        started
    }
}

/// Time after which a drain that started at `started` stops waiting for clients: the window,
/// the reconnect grace of the last slot, and a second for the last closes.
pub fn deadline(policy: &Policy, started: Millis) -> Millis {
    started
        + (policy.drain_window + policy.reconnect_grace + Duration::from_secs(1)).as_millis()
            as Millis
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn begins_once_and_keeps_its_start() {
        let d = Drain::new();
        assert_eq!(d.started(), None);
        assert!(d.begin(5));
        assert!(!d.begin(9), "a second drain does not restart the window");
        assert_eq!(d.started(), Some(5));
    }

    #[test]
    fn deadline_covers_window_and_grace() {
        let p = Policy {
            drain_window: Duration::from_secs(10),
            reconnect_grace: Duration::from_secs(2),
            ..Policy::default()
        };
        assert_eq!(deadline(&p, 1_000), 1_000 + 13_000);
    }
}
