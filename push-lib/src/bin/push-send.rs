//! `push-send`: push messages by user ID from the command line, for operators and for load.
//!
//! ```sh
//! push-send --brokers 127.0.0.1:9092 --topic push --user alice --data 'hello'
//! push-send --brokers 127.0.0.1:9092 --users 10000 --count 100000 --rate 20000 --data 'n={n}'
//! push-send --direct http://127.0.0.1:9090 --admin-token T --user alice --data '{"a":1}' --json
//! ```
//!
//! Prints one summary line (`key=value` pairs, for scripts) and exits non-zero if any
//! message failed.

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Parser;
use futures_util::stream::{FuturesUnordered, StreamExt};
use push_lib::{
    Accepted, DeliverConfig, Envelope, KafkaConfig, PendingSend, PushClient, Receipt, Result,
    SendOptions,
};

#[derive(Debug, Parser)]
#[command(
    name = "push-send",
    version,
    about = "Push messages to users by user ID"
)]
struct Args {
    /// Kafka bootstrap servers (`host:port,...`): send through the queue.
    #[arg(long, env = "PUSH_BROKERS", conflicts_with = "direct")]
    brokers: Option<String>,
    /// Kafka topic the message processors consume.
    #[arg(long, env = "PUSH_TOPIC", default_value = "push")]
    topic: String,
    /// A push-server node's admin URL (`http://host:port`): send to it directly, no queue.
    #[arg(long)]
    direct: Option<String>,
    /// The node's `--admin-token` (direct only).
    #[arg(long, env = "PUSH_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// The node's `--internal-secret` (direct only; sent instead of the admin token).
    #[arg(long, env = "PUSH_INTERNAL_SECRET", hide_env_values = true)]
    internal_secret: Option<String>,
    /// The user to push to.
    #[arg(long, default_value = "demo", conflicts_with = "users")]
    user: String,
    /// Spread messages over N users, `<user-prefix>0` .. `<user-prefix>N-1`, round robin.
    #[arg(long)]
    users: Option<u64>,
    /// Prefix of the user IDs with `--users`.
    #[arg(long, default_value = "user-")]
    user_prefix: String,
    /// Only this device of each user.
    #[arg(long)]
    device: Option<String>,
    /// Payload. `{n}` becomes the message's index and `{user}` its user. Text unless `--json`.
    #[arg(long, default_value = "hello {n}")]
    data: String,
    /// Parse the payload as JSON (after substitution).
    #[arg(long)]
    json: bool,
    /// Messages to send.
    #[arg(long, default_value_t = 1)]
    count: u64,
    /// Messages per second; 0 sends as fast as the transport accepts.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Time to live of each message (e.g. `30s`); none by default.
    #[arg(long, value_parser = humantime::parse_duration)]
    ttl: Option<Duration>,
    /// Most messages awaiting their acknowledgement at once.
    #[arg(long, default_value_t = 10_000)]
    in_flight: usize,
    /// Extra librdkafka producer property, `key=value` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// How long the broker may take to acknowledge one message.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Continue a caller's trace: `NAME=VALUE` of a W3C (`traceparent`) or B3 (`b3`, or
    /// `x-b3-traceid` + `x-b3-spanid` [+ `x-b3-sampled`]) header (repeatable).
    #[arg(long = "trace-header", value_name = "NAME=VALUE")]
    trace_header: Vec<String>,
    /// Span export.
    #[command(flatten)]
    otlp: telemetry::OtlpArgs,
}

impl Args {
    fn client(&self) -> anyhow::Result<PushClient> {
        match (&self.brokers, &self.direct) {
            (Some(brokers), None) => {
                let mut cfg = KafkaConfig::new(brokers, &self.topic);
                cfg.message_timeout = self.timeout;
                for kv in &self.set {
                    let (k, v) = kv
                        .split_once('=')
                        .with_context(|| format!("--set {kv:?}: expected KEY=VALUE"))?;
                    cfg = cfg.set(k, v);
                }
                Ok(PushClient::kafka(&cfg)?)
            }
            (None, Some(url)) => {
                let cfg = DeliverConfig {
                    admin_token: self.admin_token.clone(),
                    internal_secret: self.internal_secret.clone(),
                    timeout: self.timeout,
                    ..DeliverConfig::default()
                };
                Ok(PushClient::direct(url, &cfg)?)
            }
            _ => bail!("give --brokers (through Kafka) or --direct (to one node)"),
        }
    }

    fn envelope(&self, n: u64) -> anyhow::Result<Envelope> {
        let user = match self.users {
            Some(users) => format!("{}{}", self.user_prefix, n % users.max(1)),
            None => self.user.clone(),
        };
        let text = self
            .data
            .replace("{n}", &n.to_string())
            .replace("{user}", &user);
        let data = if self.json {
            serde_json::from_str(&text).with_context(|| format!("--json: {text:?} is not JSON"))?
        } else {
            serde_json::Value::String(text)
        };
        let mut env = Envelope::new(user, data);
        env.device = self.device.clone();
        let mut headers = Vec::with_capacity(self.trace_header.len());
        for kv in &self.trace_header {
            let (k, v) = kv
                .split_once('=')
                .with_context(|| format!("--trace-header {kv:?}: expected NAME=VALUE"))?;
            headers.push((k.trim().to_ascii_lowercase(), v.trim()));
        }
        env.traceparent = SendOptions::default()
            .trace_headers(|name| headers.iter().find(|(k, _)| k == name).map(|(_, v)| *v))
            .traceparent;
        if let Some(ttl) = self.ttl {
            env = env.ttl(ttl);
        }
        Ok(env)
    }
}

/// Counts and acknowledgement latencies.
struct Tally {
    ok: u64,
    failed: u64,
    not_connected: u64,
    latency_us: hdrhistogram::Histogram<u64>,
}

impl Tally {
    fn record(&mut self, started: Instant, result: Result<Receipt>, verbose: bool) {
        let us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        let _ = self.latency_us.record(us.max(1));
        match result {
            Ok(r) => {
                self.ok += 1;
                if matches!(r.accepted, Accepted::Direct(ref o) if !o.is_delivered()) {
                    self.not_connected += 1;
                }
                if verbose {
                    println!("{} {:?}", r.id, r.accepted);
                }
            }
            Err(e) => {
                self.failed += 1;
                // The first few failures say what is wrong; thousands more say nothing new.
                if self.failed <= 5 {
                    tracing::error!(error = %e, "send failed");
                }
            }
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let traces = telemetry::TraceExport::from_args(&args.otlp, "push-send");
    // Held until main returns: dropping it flushes the spans still queued.
    let _traces =
        telemetry::init_logging_with_traces(telemetry::LogFormat::Human, "warn", &traces)?;
    let client = args.client()?;
    // Build one envelope up front so a bad --data fails before anything is sent.
    args.envelope(0)?;
    let verbose = args.count <= 10;
    let mut tally = Tally {
        ok: 0,
        failed: 0,
        not_connected: 0,
        latency_us: hdrhistogram::Histogram::new(3).expect("3 significant figures is valid"),
    };
    let mut inflight = FuturesUnordered::new();
    let start = Instant::now();
    for n in 0..args.count {
        if args.rate > 0.0 {
            let due = start + Duration::from_secs_f64(n as f64 / args.rate);
            tokio::time::sleep_until(due.into()).await;
        }
        while inflight.len() >= args.in_flight.max(1) {
            if let Some((t, r)) = inflight.next().await {
                tally.record(t, r, verbose);
            }
        }
        let sent_at = Instant::now();
        // Enqueue in order (keeps each user's messages in order), await acks concurrently.
        let pending: Result<PendingSend> = client.enqueue(args.envelope(n)?).await;
        match pending {
            Ok(fut) => inflight.push(async move { (sent_at, fut.await) }),
            Err(e) => tally.record(sent_at, Err(e), verbose),
        }
    }
    while let Some((t, r)) = inflight.next().await {
        tally.record(t, r, verbose);
    }
    let elapsed = start.elapsed().as_secs_f64();
    let h = &tally.latency_us;
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "sent={} failed={} not_connected={} elapsed_s={:.3} rate_per_s={:.0} ack_p50_ms={:.2} ack_p99_ms={:.2} ack_max_ms={:.2}",
        tally.ok,
        tally.failed,
        tally.not_connected,
        elapsed,
        tally.ok as f64 / elapsed.max(1e-9),
        ms(0.5),
        ms(0.99),
        h.max() as f64 / 1000.0,
    );
    if tally.failed > 0 {
        bail!("{} of {} messages failed", tally.failed, args.count);
    }
    Ok(())
}
