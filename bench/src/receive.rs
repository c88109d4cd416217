//! The accounting of `bench hold --account` (the pipeline benchmark's receiver): one
//! WebSocket connection per user, spread over several push-server nodes, and every message
//! the pipeline benchmark sends accounted for.
//!
//! Per user it drops duplicates by `mid` (the queue's message ID: a redelivery carries the
//! same one), checks that the server's per-connection `id` only grows, and that the sender's
//! sequence number does too (the pipeline promises per-user order). Per run it counts what
//! arrived and records the latency from the send time in the payload to the receive time.
//! The parent asks with `report <run>` on the child's stdin; the answer is a [`Report`] line.
//!
//! The payload the sender puts in `data`: `{"r":<run>,"s":<seq>,"t":<send time, µs since
//! the Unix epoch>}` (the bench's own producer), or `{"r":<run>,"n":<n>}` (push-send, which
//! has no time placeholder: the latency is then taken from the millisecond timestamp in the
//! first 48 bits of the push-lib message ID).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use anyhow::Context as _;
use hdrhistogram::Histogram;
use loadtest::stats::{new_histogram, unix_micros};
use serde::{Deserialize, Serialize};

/// The sender's part of a message: what `data` holds.
#[derive(Debug, Deserialize)]
struct Payload {
    /// Run number (the parent runs several rounds through the same connections).
    #[serde(default)]
    r: u32,
    /// Per-user sequence number (the bench's producer).
    s: Option<u64>,
    /// Global message index (push-send's `{n}`; it sends round robin, so it grows per user).
    n: Option<u64>,
    /// Send time, microseconds since the Unix epoch.
    t: Option<u64>,
}

/// One message, as the accounting sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arrival {
    pub conn_seq: Option<u64>,
    pub mid: String,
    pub run: u32,
    pub seq: u64,
    /// Send time, µs since the Unix epoch, when the sender gave one (or the ID carries it).
    pub sent_us: Option<u64>,
}

/// One `message` as the client parsed it: its per-connection `id`, `mid` and `data`.
fn arrival(id: u64, mid: Option<&str>, data: &str) -> anyhow::Result<Arrival> {
    let data: Payload = serde_json::from_str(data).context("data is not the expected JSON")?;
    let mid = mid.context("message without `mid`")?.to_owned();
    let seq = data
        .s
        .or(data.n)
        .context("payload has neither `s` nor `n`")?;
    let sent_us = data.t.or_else(|| id_millis(&mid).map(|ms| ms * 1000));
    Ok(Arrival {
        conn_seq: Some(id),
        mid,
        run: data.r,
        seq,
        sent_us,
    })
}

/// The creation time in a push-lib generated message ID: 32 hex digits whose first 12 are
/// milliseconds since the Unix epoch (docs/envelope.md).
fn id_millis(mid: &str) -> Option<u64> {
    if mid.len() != 32 {
        return None;
    }
    u64::from_str_radix(mid.get(..12)?, 16).ok()
}

/// What one arrival was, for one user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// First time this `mid` arrived, in order.
    New,
    /// First time, but its (run, sequence) is not above the last one seen: reordered.
    OutOfOrder,
    /// This `mid` arrived before: a redelivery that got through.
    Duplicate,
}

/// Order and deduplication state of one user's connection.
#[derive(Debug, Default)]
pub struct UserTracker {
    mids: HashSet<String>,
    last: Option<(u32, u64)>,
    last_conn_seq: Option<u64>,
    /// Times the server's per-connection `id` did not grow.
    pub conn_seq_regressions: u64,
}

impl UserTracker {
    /// Accounts one arrival.
    pub fn observe(&mut self, a: &Arrival) -> Seen {
        if let Some(id) = a.conn_seq {
            if self.last_conn_seq.is_some_and(|last| id <= last) {
                self.conn_seq_regressions += 1;
            }
            self.last_conn_seq = Some(id);
        }
        if !self.mids.insert(a.mid.clone()) {
            return Seen::Duplicate;
        }
        let key = (a.run, a.seq);
        if self.last.is_some_and(|last| key <= last) {
            return Seen::OutOfOrder;
        }
        self.last = Some(key);
        Seen::New
    }
}

/// One run's tally over all connections (also one push step's, in `peers-push`).
#[derive(Debug)]
pub struct RunStats {
    /// Distinct messages.
    pub received: u64,
    /// Redeliveries that got through.
    pub duplicates: u64,
    out_of_order: u64,
    /// Arrivals without a send time (no latency recorded).
    untimed: u64,
    /// Send → receipt, µs.
    pub latency_us: Histogram<u64>,
    first_us: u64,
    last_us: u64,
}

impl RunStats {
    /// Nothing seen yet.
    pub fn new() -> Self {
        Self {
            received: 0,
            duplicates: 0,
            out_of_order: 0,
            untimed: 0,
            latency_us: new_histogram(),
            first_us: u64::MAX,
            last_us: 0,
        }
    }

    /// Accounts one arrival at `now_us`, sent at `sent_us` when known.
    pub fn add(&mut self, seen: Seen, sent_us: Option<u64>, now_us: u64) {
        if seen == Seen::Duplicate {
            self.duplicates += 1;
            return;
        }
        self.received += 1;
        if seen == Seen::OutOfOrder {
            self.out_of_order += 1;
        }
        self.first_us = self.first_us.min(now_us);
        self.last_us = self.last_us.max(now_us);
        match sent_us {
            // Same machine, same clock; clamp in case the sender's ms-precision time (from
            // the ID) lies a little after the receive time.
            Some(t) => self
                .latency_us
                .saturating_record(now_us.saturating_sub(t).max(1)),
            None => self.untimed += 1,
        }
    }
}

/// Everything the connections of a hold process report into.
#[derive(Debug, Default)]
pub struct Books {
    runs: Mutex<HashMap<u32, RunStats>>,
    bad_frames: AtomicUsize,
    conn_seq_regressions: AtomicUsize,
    /// Connections the server ended.
    pub closed: AtomicUsize,
    /// Heartbeats seen (WebSocket pings, SSE comments), all connections together.
    pub heartbeats: AtomicUsize,
}

impl Books {
    /// Accounts one message of one user's connection.
    pub fn record(&self, tracker: &mut UserTracker, id: u64, mid: Option<&str>, data: &str) {
        let now = unix_micros();
        match arrival(id, mid, data) {
            Ok(a) => {
                let seen = tracker.observe(&a);
                let mut runs = self.runs.lock().expect("no panics under the lock");
                runs.entry(a.run)
                    .or_insert_with(RunStats::new)
                    .add(seen, a.sent_us, now);
            }
            Err(e) => {
                // The first few say what is wrong; thousands more say nothing new.
                if self.bad_frames.fetch_add(1, Ordering::Relaxed) < 5 {
                    eprintln!("bench hold: {e:#}: {data}");
                }
            }
        }
    }

    /// Accounts a connection the server ended.
    pub fn ended(&self, tracker: &UserTracker) {
        self.closed.fetch_add(1, Ordering::Relaxed);
        self.conn_seq_regressions
            .fetch_add(tracker.conn_seq_regressions as usize, Ordering::Relaxed);
    }

    /// The answer to `report <run>`.
    pub fn report(&self, run: u32) -> Report {
        let mut report = Report {
            run,
            bad_frames: self.bad_frames.load(Ordering::Relaxed),
            closed: self.closed.load(Ordering::Relaxed),
            conn_seq_regressions: self.conn_seq_regressions.load(Ordering::Relaxed),
            ..Report::default()
        };
        if let Some(s) = self
            .runs
            .lock()
            .expect("no panics under the lock")
            .get(&run)
        {
            report.received = s.received;
            report.duplicates = s.duplicates;
            report.out_of_order = s.out_of_order;
            report.untimed = s.untimed;
            report.p50_us = Some(s.latency_us.value_at_quantile(0.5));
            report.p99_us = Some(s.latency_us.value_at_quantile(0.99));
            report.max_us = Some(s.latency_us.max());
            report.first_us = Some(s.first_us);
            report.last_us = Some(s.last_us);
        }
        report
    }
}

/// `bench hold --account`'s answer to `report <run>`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Report {
    /// The run asked about.
    pub run: u32,
    /// Distinct messages of the run.
    pub received: u64,
    /// Redeliveries that got through.
    pub duplicates: u64,
    /// Messages that came before one sent earlier, per user.
    pub out_of_order: u64,
    /// Arrivals without a send time.
    pub untimed: u64,
    /// Latency, send → receipt, µs.
    pub p50_us: Option<u64>,
    /// Latency, µs.
    pub p99_us: Option<u64>,
    /// Latency, µs.
    pub max_us: Option<u64>,
    /// First arrival, µs since the Unix epoch.
    pub first_us: Option<u64>,
    /// Last arrival, µs since the Unix epoch.
    pub last_us: Option<u64>,
    /// Messages that were not the expected JSON, all runs.
    pub bad_frames: usize,
    /// Connections closed, all runs.
    pub closed: usize,
    /// Times a server's per-connection `id` did not grow (counted when a connection ends).
    pub conn_seq_regressions: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arrival(mid: &str, run: u32, seq: u64, conn_seq: u64) -> Arrival {
        Arrival {
            conn_seq: Some(conn_seq),
            mid: mid.into(),
            run,
            seq,
            sent_us: None,
        }
    }

    #[test]
    fn drops_duplicates_by_mid_and_flags_reordering() {
        let mut t = UserTracker::default();
        assert_eq!(t.observe(&arrival("a", 1, 0, 1)), Seen::New);
        assert_eq!(t.observe(&arrival("b", 1, 1, 2)), Seen::New);
        // A redelivery of `a`: same mid, whatever order it comes in.
        assert_eq!(t.observe(&arrival("a", 1, 0, 3)), Seen::Duplicate);
        assert_eq!(t.observe(&arrival("c", 1, 3, 4)), Seen::New);
        // A new message that was sent before `c`.
        assert_eq!(t.observe(&arrival("d", 1, 2, 5)), Seen::OutOfOrder);
        // A later run starts its sequence again at 0: still in order.
        assert_eq!(t.observe(&arrival("e", 2, 0, 6)), Seen::New);
        assert_eq!(t.conn_seq_regressions, 0);
        t.observe(&arrival("f", 2, 1, 6));
        assert_eq!(t.conn_seq_regressions, 1);
    }

    #[test]
    fn parses_the_benchs_and_push_sends_payloads() {
        let bench = r#"{"r":2,"s":7,"t":1700000000000000}"#;
        assert_eq!(
            super::arrival(4, Some("m1"), bench).unwrap(),
            Arrival {
                conn_seq: Some(4),
                mid: "m1".into(),
                run: 2,
                seq: 7,
                sent_us: Some(1_700_000_000_000_000),
            }
        );
        // push-send: `--json --data '{"r":1,"n":{n}}'`; the time comes from the ID.
        let mid = format!("{:012x}{}", 1_700_000_000_123u64, "0".repeat(20));
        let a = super::arrival(1, Some(&mid), r#"{"r":1,"n":42}"#).unwrap();
        assert_eq!((a.run, a.seq), (1, 42));
        assert_eq!(a.sent_us, Some(1_700_000_000_123_000));
        assert!(
            super::arrival(1, None, r#"{"r":1,"s":1}"#).is_err(),
            "no mid"
        );
        assert!(
            super::arrival(1, Some("m"), r#"{"r":1}"#).is_err(),
            "no sequence"
        );
        assert!(super::arrival(1, Some("m"), "hello").is_err(), "not JSON");
    }

    #[test]
    fn tallies_a_run() {
        let mut s = RunStats::new();
        s.add(Seen::New, Some(1_000), 3_000);
        s.add(Seen::OutOfOrder, None, 4_000);
        s.add(Seen::Duplicate, Some(1_000), 5_000);
        assert_eq!(
            (s.received, s.out_of_order, s.duplicates, s.untimed),
            (2, 1, 1, 1)
        );
        assert_eq!((s.first_us, s.last_us), (3_000, 4_000));
        assert_eq!(s.latency_us.max(), 2_000);
    }
}
