//! What a worker measures, and how worker results travel and merge.
//!
//! A worker's clients record into one [`Stats`] behind a std `Mutex`: at load-test rates (a
//! few thousand events per second on two cores) an uncontended lock costs tens of
//! nanoseconds, and one lock keeps counters and histograms consistent with each other in a
//! progress snapshot. The lock is never held across an await.
//!
//! Results cross process boundaries as [`WorkerReport`] JSON; histograms inside it are
//! HdrHistogram V2 bytes in base64, so the parent merges exact distributions, not
//! percentiles of percentiles.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use base64::Engine as _;
use hdrhistogram::serialization::{Deserializer, Serializer as _, V2Serializer};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Most example lines kept per violation kind: enough to debug, bounded in memory.
const MAX_EXAMPLES: usize = 5;

/// Counters of one worker (or, merged, of the whole run).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Clients this worker runs.
    pub clients: u64,
    /// Clients whose first connection got its `hello`.
    pub clients_connected: u64,
    /// Clients connected right now (or at the end, for a final report).
    pub open: u64,
    /// Clients that completed at least one reconnect (new connection's hello received).
    pub clients_reconnected: u64,
    /// Connection attempts, first and later.
    pub connect_attempts: u64,
    /// Connection attempts that failed (see `connect_errors`).
    pub connect_failures: u64,
    /// Reconnects completed (a new connection replaced an old or lost one).
    pub reconnects: u64,
    /// `reconnect` messages with reason `rotate`.
    pub rotate_requests: u64,
    /// `reconnect` messages with reason `drain`.
    pub drain_requests: u64,
    /// Reconnects the load generator started by itself in a storm.
    pub storm_reconnects: u64,
    /// Connections the client dropped at a random time (`--client-lifetime`).
    pub client_random_closes: u64,
    /// Old connections closed by the client after their replacement's hello.
    pub client_initiated_closes: u64,
    /// Connections the server ended without being asked (close frame or EOF).
    pub server_closes: u64,
    /// Data messages received, duplicates included.
    pub messages_received: u64,
    /// Distinct load-test messages received (by payload sequence number).
    pub messages_unique: u64,
    /// Messages received more than once.
    pub duplicates: u64,
    /// Messages whose payload was not a load-test payload.
    pub foreign_messages: u64,
    /// Acks sent (`--ack`, WebSocket).
    pub acks_sent: u64,
    /// Pings answered and SSE heartbeat comments seen.
    pub heartbeats: u64,
}

impl Counts {
    fn add(&mut self, o: &Self) {
        let Self {
            clients,
            clients_connected,
            open,
            clients_reconnected,
            connect_attempts,
            connect_failures,
            reconnects,
            rotate_requests,
            drain_requests,
            storm_reconnects,
            client_random_closes,
            client_initiated_closes,
            server_closes,
            messages_received,
            messages_unique,
            duplicates,
            foreign_messages,
            acks_sent,
            heartbeats,
        } = o;
        // Destructured so that a new field cannot be forgotten here.
        self.clients += clients;
        self.clients_connected += clients_connected;
        self.open += open;
        self.clients_reconnected += clients_reconnected;
        self.connect_attempts += connect_attempts;
        self.connect_failures += connect_failures;
        self.reconnects += reconnects;
        self.rotate_requests += rotate_requests;
        self.drain_requests += drain_requests;
        self.storm_reconnects += storm_reconnects;
        self.client_random_closes += client_random_closes;
        self.client_initiated_closes += client_initiated_closes;
        self.server_closes += server_closes;
        self.messages_received += messages_received;
        self.messages_unique += messages_unique;
        self.duplicates += duplicates;
        self.foreign_messages += foreign_messages;
        self.acks_sent += acks_sent;
        self.heartbeats += heartbeats;
    }
}

/// A latency histogram in microseconds, 1 µs to 1 hour, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("static bounds are valid")
}

/// Microseconds since the Unix epoch: the clock shared by the pusher (which writes it into
/// each payload) and the clients in other processes on the same machine.
pub fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

#[derive(Debug)]
struct Inner {
    counts: Counts,
    connect_errors: BTreeMap<String, u64>,
    server_close_codes: BTreeMap<String, u64>,
    violations: BTreeMap<String, u64>,
    examples: BTreeMap<String, Vec<String>>,
    reconnects_per_sec: BTreeMap<u64, u64>,
    connect_us: Histogram<u64>,
    latency_us: Histogram<u64>,
}

/// The live measurements of one worker.
#[derive(Debug)]
pub struct Stats {
    inner: Mutex<Inner>,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            inner: Mutex::new(Inner {
                counts: Counts::default(),
                connect_errors: BTreeMap::new(),
                server_close_codes: BTreeMap::new(),
                violations: BTreeMap::new(),
                examples: BTreeMap::new(),
                reconnects_per_sec: BTreeMap::new(),
                connect_us: new_histogram(),
                latency_us: new_histogram(),
            }),
        }
    }
}

impl Stats {
    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        // A panic in a client task while holding the lock leaves counts that are still
        // meaningful: keep going rather than poison the whole run.
        let mut guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut guard)
    }

    /// Changes counters.
    pub fn count(&self, f: impl FnOnce(&mut Counts)) {
        self.with(|i| f(&mut i.counts));
    }

    /// Records a connection that got its hello after `micros`; with `replacing`, the client
    /// leaves its previous connection for it (a client-initiated close). One change, so that
    /// `open` never counts a rotating client twice: counted apart, a reading between the two
    /// (the run's end) found one client more than there were (1,000,001 of 1,000,000).
    pub fn connected(&self, micros: u64, replacing: bool) {
        self.with(|i| {
            i.counts.connect_attempts += 1;
            if replacing {
                i.counts.client_initiated_closes += 1;
            } else {
                i.counts.open += 1;
            }
            i.connect_us.saturating_record(micros.max(1));
        });
    }

    /// Records a failed connection attempt.
    pub fn connect_failed(&self, kind: String) {
        self.with(|i| {
            i.counts.connect_attempts += 1;
            i.counts.connect_failures += 1;
            *i.connect_errors.entry(kind).or_default() += 1;
        });
    }

    /// Records a completed reconnect (for the per-second rate).
    pub fn reconnected(&self) {
        let sec = unix_micros() / 1_000_000;
        self.with(|i| {
            i.counts.reconnects += 1;
            *i.reconnects_per_sec.entry(sec).or_default() += 1;
        });
    }

    /// Records the server ending a connection on its own: its close code, `eof` for a TCP
    /// close without a close frame, `silent` for a peer that stopped sending heartbeats.
    pub fn server_closed(&self, key: String) {
        self.with(|i| {
            i.counts.server_closes += 1;
            *i.server_close_codes.entry(key).or_default() += 1;
        });
    }

    /// Records a new distinct message and its end-to-end latency.
    pub fn message(&self, latency_us: u64) {
        self.with(|i| {
            i.counts.messages_received += 1;
            i.counts.messages_unique += 1;
            i.latency_us.saturating_record(latency_us.max(1));
        });
    }

    /// Records a correctness violation of `kind`, with a line saying what happened.
    pub fn violation(&self, kind: &str, detail: String) {
        self.with(|i| {
            *i.violations.entry(kind.to_owned()).or_default() += 1;
            let ex = i.examples.entry(kind.to_owned()).or_default();
            if ex.len() < MAX_EXAMPLES {
                ex.push(detail);
            }
        });
    }

    /// A copy of the counters, for progress.
    pub fn counts(&self) -> Counts {
        self.with(|i| i.counts.clone())
    }

    /// The full result, ready to cross a process boundary.
    pub fn report(&self) -> WorkerReport {
        self.with(|i| WorkerReport {
            counts: i.counts.clone(),
            connect_errors: i.connect_errors.clone(),
            server_close_codes: i.server_close_codes.clone(),
            violations: i.violations.clone(),
            examples: i.examples.clone(),
            reconnects_per_sec: i.reconnects_per_sec.clone(),
            connect_us: encode_histogram(&i.connect_us),
            latency_us: encode_histogram(&i.latency_us),
        })
    }
}

/// A worker's result; also the merged result of all workers.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WorkerReport {
    /// Counters.
    pub counts: Counts,
    /// Failed connection attempts by kind.
    pub connect_errors: BTreeMap<String, u64>,
    /// Connections the server ended on its own, by close code (`eof`: no close frame).
    pub server_close_codes: BTreeMap<String, u64>,
    /// Correctness violations by kind.
    pub violations: BTreeMap<String, u64>,
    /// A few examples of each violation.
    pub examples: BTreeMap<String, Vec<String>>,
    /// Completed reconnects per Unix second.
    pub reconnects_per_sec: BTreeMap<u64, u64>,
    /// Connect latency (TCP connect to hello), µs, HdrHistogram V2 in base64.
    pub connect_us: String,
    /// End-to-end message latency (push scheduled to client receive), µs, V2 in base64.
    pub latency_us: String,
}

impl WorkerReport {
    /// Adds another worker's result to this one.
    pub fn merge(&mut self, o: &WorkerReport) -> anyhow::Result<()> {
        self.counts.add(&o.counts);
        for (dst, src) in [
            (&mut self.connect_errors, &o.connect_errors),
            (&mut self.server_close_codes, &o.server_close_codes),
            (&mut self.violations, &o.violations),
        ] {
            for (k, v) in src {
                *dst.entry(k.clone()).or_default() += v;
            }
        }
        for (k, v) in &o.examples {
            let ex = self.examples.entry(k.clone()).or_default();
            ex.extend(
                v.iter()
                    .take(MAX_EXAMPLES.saturating_sub(ex.len()))
                    .cloned(),
            );
        }
        for (k, v) in &o.reconnects_per_sec {
            *self.reconnects_per_sec.entry(*k).or_default() += v;
        }
        for (dst, src) in [
            (&mut self.connect_us, &o.connect_us),
            (&mut self.latency_us, &o.latency_us),
        ] {
            let mut h = decode_histogram(dst)?;
            h.add(decode_histogram(src)?)
                .context("histograms with different bounds")?;
            *dst = encode_histogram(&h);
        }
        Ok(())
    }
}

/// HdrHistogram V2 bytes in base64.
pub fn encode_histogram(h: &Histogram<u64>) -> String {
    let mut bytes = Vec::new();
    V2Serializer::new()
        .serialize(h, &mut bytes)
        .expect("writing to a Vec cannot fail");
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The inverse of [`encode_histogram`]; an empty string is an empty histogram.
pub fn decode_histogram(s: &str) -> anyhow::Result<Histogram<u64>> {
    if s.is_empty() {
        return Ok(new_histogram());
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(s)
        .context("histogram is not base64")?;
    let h: Histogram<u64> = Deserializer::new()
        .deserialize(&mut bytes.as_slice())
        .context("histogram is not HdrHistogram V2")?;
    // Deserialized histograms keep the sender's bounds; re-home into ours so that merges
    // and reports always use the same precision.
    let mut out = new_histogram();
    out.add(&h).context("histogram out of bounds")?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_merge_counts_and_histograms() {
        let a = Stats::default();
        a.count(|c| c.clients = 2);
        a.message(100);
        a.message(300);
        a.violation("out_of_order", "x".into());
        let b = Stats::default();
        b.count(|c| c.clients = 3);
        b.message(200);
        b.reconnected();
        let mut total = WorkerReport::default();
        total.merge(&a.report()).unwrap();
        total.merge(&b.report()).unwrap();
        let back: WorkerReport =
            serde_json::from_str(&serde_json::to_string(&total).unwrap()).unwrap();
        assert_eq!(back.counts.clients, 5);
        assert_eq!(back.counts.messages_unique, 3);
        assert_eq!(back.counts.reconnects, 1);
        assert_eq!(back.violations["out_of_order"], 1);
        let h = decode_histogram(&back.latency_us).unwrap();
        assert_eq!(h.len(), 3);
        assert_eq!(h.max(), 300);
        assert_eq!(back.reconnects_per_sec.values().sum::<u64>(), 1);
    }

    #[test]
    fn a_rotation_leaves_the_open_count_as_it_was() {
        let s = Stats::default();
        s.connected(900, false);
        s.connected(700, true);
        let c = s.counts();
        assert_eq!(
            (c.open, c.connect_attempts, c.client_initiated_closes),
            (1, 2, 1)
        );
    }
}
