//! `msg-processor`: see the crate docs (`src/lib.rs`) and `docs/envelope.md`.

use anyhow::Context as _;
use clap::Parser as _;
use msg_processor::{Args, Processor, Stats};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let traces = telemetry::TraceExport::from_args(&args.otlp, "msg-processor");
    // Held until main returns: dropping it flushes the spans still queued.
    let _traces = telemetry::init_logging_with_traces(args.log_format, "info", &traces)?;
    let settings = args.settings().context("bad flags")?;
    let mut processor = Processor::start(settings)
        .await
        .context("starting msg-processor")?;
    if let Some(addr) = processor.metrics_addr() {
        println!("metrics  http://{addr}/metrics");
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
        _ = processor.stopped() => anyhow::bail!("processor stopped unexpectedly"),
    }
    tracing::info!("shutting down: finishing batches in flight");
    let stats = processor.stats().clone();
    processor.shutdown().await;
    tracing::info!(
        consumed = Stats::get(&stats.consumed),
        delivered = Stats::get(&stats.delivered),
        stored = Stats::get(&stats.stored),
        expired = Stats::get(&stats.expired),
        dead_lettered = Stats::get(&stats.dead_lettered),
        retries = Stats::get(&stats.retries),
        "stopped"
    );
    Ok(())
}
