//! Resume: what a reconnecting client is owed, read from the history and put at the front
//! of its queue, with a `gap` when some of it is no longer kept or does not fit.

use crate::hub::{ConnHandle, Outbound, Transport};
use crate::metrics as m;
use crate::protocol::message::ServerMessage;
use crate::state::Shared;

/// Reads what a resuming client is owed and puts it at the front of its queue.
pub(super) async fn resume(handle: &ConnHandle, after: u64, shared: &Shared) {
    let read = tokio::time::timeout(
        shared.config.handshake_timeout,
        shared.store.since(&handle.user, after),
    )
    .await;
    let (gap, backlog, read_up_to) = match read {
        Ok(Ok(r)) => {
            // The client stands at the newest ID read, whichever device it was for.
            let read_up_to = r.messages.last().map_or(after, |m| m.id.max(after));
            let mut backlog: Vec<Outbound> = r
                .messages
                .iter()
                .filter(|m| handle.wants(m.device.as_deref()))
                .map(|m| Outbound::stored(m, handle.transport))
                .collect();
            let before = backlog.len();
            let trimmed = trim_backlog(&mut backlog, shared.limits.max_bytes);
            if trimmed.is_some() {
                metrics::counter!(m::MESSAGES_DROPPED, "reason" => "resume_over_queue_bytes")
                    .increment((before - backlog.len()) as u64);
            }
            let oldest = trimmed.or(r.gap);
            let result = if oldest.is_some() { "gap" } else { "complete" };
            metrics::counter!(m::RESUMES, "result" => result).increment(1);
            metrics::counter!(m::RESUMED_MESSAGES).increment(backlog.len() as u64);
            let gap = oldest.map(|oldest| ServerMessage::Gap {
                after,
                oldest: Some(oldest),
            });
            (gap, backlog, Some(read_up_to))
        }
        failed => {
            let why = match failed {
                Ok(Err(e)) => e.to_string(),
                _ => "timed out".to_owned(),
            };
            tracing::warn!(user = %handle.user, error = %why, "resume without history");
            metrics::counter!(m::HISTORY_ERRORS, "op" => "since").increment(1);
            metrics::counter!(m::RESUMES, "result" => "unavailable").increment(1);
            let gap = ServerMessage::Gap {
                after,
                oldest: None,
            };
            (Some(gap), Vec::new(), None)
        }
    };
    let gap = gap.map(|g| match handle.transport {
        Transport::Ws => g.ws_frame(),
        Transport::Sse => g.sse_event(),
    });
    handle.resume(gap, backlog, read_up_to);
}

/// Keeps the newest frames of a backlog that fit in `max_bytes` (at least one): a resume
/// counts against the connection's queue byte limit, so `since=0` from a client that never
/// reads cannot hold the whole history. Returns the ID of the oldest kept frame when older
/// ones were left out (the client is told by a `gap`; they stay in the history).
fn trim_backlog(backlog: &mut Vec<Outbound>, max_bytes: usize) -> Option<u64> {
    let mut bytes = 0usize;
    let keep = backlog
        .iter()
        .rev()
        .take_while(|o| {
            bytes += o.bytes.len();
            bytes <= max_bytes
        })
        .count()
        .max(1);
    let cut = backlog.len().checked_sub(keep).filter(|&c| c > 0)?;
    backlog.drain(..cut);
    backlog.first().map(|o| o.id)
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn frame(id: u64, len: usize) -> Outbound {
        Outbound {
            bytes: Bytes::from(vec![b'x'; len]),
            received_at: None,
            id,
            fate: None,
            partial: false,
            trace: None,
        }
    }

    #[test]
    fn a_backlog_keeps_its_newest_frames_within_the_byte_bound() {
        let mut b: Vec<Outbound> = (1..=5).map(|id| frame(id, 10)).collect();
        assert_eq!(trim_backlog(&mut b, 30), Some(3));
        assert_eq!(b.iter().map(|o| o.id).collect::<Vec<_>>(), [3, 4, 5]);
        let mut whole: Vec<Outbound> = (1..=2).map(|id| frame(id, 10)).collect();
        assert_eq!(trim_backlog(&mut whole, 100), None);
        assert_eq!(whole.len(), 2);
        // One frame larger than the bound is still sent: the client must make progress.
        let mut big = vec![frame(1, 10), frame(2, 500)];
        assert_eq!(trim_backlog(&mut big, 30), Some(2));
        assert_eq!(big.len(), 1);
    }
}
