//! The node's clock (not a connection's [`crate::lifecycle::Clock`]): milliseconds since
//! start on tokio's clock, so that tests with paused time move it. The lifecycle policy takes
//! these [`Millis`] as `now`.

use crate::lifecycle::Millis;

/// Milliseconds since the node started.
#[derive(Debug, Clone, Copy)]
pub struct NodeClock {
    epoch: tokio::time::Instant,
}

impl NodeClock {
    /// A clock that reads 0 now.
    pub fn start() -> Self {
        Self {
            epoch: tokio::time::Instant::now(),
        }
    }

    /// Milliseconds since [`NodeClock::start`].
    pub fn now(&self) -> Millis {
        self.epoch.elapsed().as_millis() as Millis
    }
}
