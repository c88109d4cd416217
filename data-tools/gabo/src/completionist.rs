//! The completionist: every few seconds, for each type, closes the staged hours that the
//! completeness rule says are complete (or that a crashed dedup left fenced without a marker).

use std::time::Duration;

use tokio::task::JoinHandle;

use crate::dedup::{self, Closed, DedupError, DedupOptions};
use crate::staging::Staging;
use crate::store::Store;
use crate::types::EventType;

/// A running completionist; stops when dropped.
#[derive(Debug)]
pub struct Completionist {
    task: JoinHandle<()>,
}

impl Drop for Completionist {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Completionist {
    /// Starts checking every `interval`.
    pub fn start(
        types: Vec<EventType>,
        staging: Staging,
        store: Store,
        opts: DedupOptions,
        interval: Duration,
    ) -> Self {
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                for ty in &types {
                    pass(ty, &staging, &store, &opts).await;
                }
            }
        });
        Self { task }
    }
}

async fn pass(ty: &EventType, staging: &Staging, store: &Store, opts: &DedupOptions) {
    let hours = match staging.hours(&ty.name) {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!(%e, r#type = %ty.name, "listing staging");
            return;
        }
    };
    for (hour, fenced) in hours {
        if fenced && !staging.has_files(&ty.name, hour) {
            continue; // closed and cleaned up
        }
        match dedup::dedup(&ty.name, hour, staging, store, opts).await {
            Ok(Closed::Now(m, _)) => tracing::info!(
                r#type = %ty.name, %hour, unique = m.unique, duplicates = m.duplicates,
                "hour closed"
            ),
            Ok(Closed::Before(_)) => {
                // Marker written but staging not cleaned (crash in between): clean now.
                let _ = staging.remove_hour(&ty.name, hour);
            }
            Err(DedupError::Incomplete { .. }) => {}
            Err(e) => tracing::error!(%e, r#type = %ty.name, %hour, "dedup failed"),
        }
    }
}
