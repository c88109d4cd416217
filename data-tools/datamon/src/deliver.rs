//! Delivers queued notifications to owners' webhooks, retrying with backoff.
//!
//! The queue is the `deliveries` table: the checker only inserts rows and pokes a `Notify`,
//! so a receiver that is down never slows a pass, and a restart re-sends what was not
//! delivered. The sender task takes at most [`BATCH`] rows per round.

use std::sync::Arc;

use chrono::Utc;
use tokio::sync::Notify;

use crate::alert::backoff;
use crate::http::HttpClient;
use crate::state::State;

/// Notifications sent per round before the queue is read again: bounds memory and lets a
/// fresh notification overtake a long backlog of retries only by one round.
pub const BATCH: usize = 100;

/// Result of one round.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Round {
    /// Accepted by the receiver (2xx).
    pub delivered: usize,
    /// Failed; rescheduled.
    pub failed: usize,
}

/// Sends every notification due now, once.
pub async fn deliver_due(state: &State, client: &HttpClient, base_url: &str) -> Round {
    let mut round = Round::default();
    let due = match state.due(Utc::now(), BATCH) {
        Ok(d) => d,
        Err(e) => {
            tracing::error!(error = %e, "reading the delivery queue");
            return round;
        }
    };
    for d in due {
        let body = d.notice.body(base_url);
        let result = match client.post_json(&d.notice.url, &body).await {
            Ok(code) if (200..300).contains(&code) => Ok(()),
            Ok(code) => Err(format!("HTTP {code}")),
            Err(e) => Err(e),
        };
        let saved = match result {
            Ok(()) => {
                round.delivered += 1;
                metrics::counter!(crate::metrics::ALERTS_SENT, "state" => d.notice.state.name())
                    .increment(1);
                state.delivered(d.id, Utc::now())
            }
            Err(e) => {
                round.failed += 1;
                metrics::counter!(crate::metrics::ALERT_FAILURES).increment(1);
                let wait = backoff(d.attempts + 1);
                tracing::warn!(url = %d.notice.url, dataset = %d.notice.dataset,
                    partition = %d.notice.partition, error = %e, retry_in = ?wait,
                    "alert not delivered");
                let next = Utc::now() + chrono::Duration::from_std(wait).unwrap_or_default();
                state.failed(d.id, next, &e)
            }
        };
        if let Err(e) = saved {
            tracing::error!(error = %e, "recording a delivery");
        }
    }
    round
}

/// The sender task: a round whenever poked, or when the earliest retry is due.
pub async fn run(state: Arc<State>, client: HttpClient, base_url: String, poke: Arc<Notify>) {
    loop {
        let round = deliver_due(&state, &client, &base_url).await;
        if round.delivered + round.failed >= BATCH {
            continue; // more may be due right away
        }
        let wait = match state.next_due() {
            Ok(Some(next)) => (next - Utc::now()).to_std().unwrap_or_default(),
            // Nothing queued: sleep until poked (the minute is only a safety net).
            _ => std::time::Duration::from_secs(60),
        };
        tokio::select! {
            _ = poke.notified() => {}
            _ = tokio::time::sleep(wait.max(std::time::Duration::from_millis(50))) => {}
        }
    }
}
