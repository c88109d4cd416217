//! `msg-processor`: see the crate docs (`src/lib.rs`) and `docs/envelope.md`.

use anyhow::Context as _;
use clap::Parser as _;
use msg_processor::{Args, Processor, Stats};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match args.log_format.as_str() {
        "json" => subscriber.json().init(),
        "human" => subscriber.init(),
        other => anyhow::bail!("--log-format {other:?}: expected human or json"),
    }
    let settings = args
        .settings()
        .map_err(anyhow::Error::msg)
        .context("bad flags")?;
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
