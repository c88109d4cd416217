//! The dedup of one (type, hour) with DataFusion under a memory limit, spilling to disk:
//! staging NDJSON → one row per event ID → `part-0.parquet`, then the `_SUCCESS` marker with
//! the counts, written last. A closed hour is never rewritten: a second run finds the marker
//! and returns it.
//!
//! Order of a close: (1) refuse unless complete ([`crate::completeness`]) or forced; (2) fence
//! the staging hour ([`Staging::close`]) so later events go to the late bucket; (3) write the
//! Parquet part through the output store; (4) write the marker; (5) drop the staging files.
//! A crash before (4) leaves no marker: the next run redoes (3) from the same staging files.
//!
//! Among copies of one ID the bucket keeps the earliest receive time and, should the copies'
//! payloads differ, the smallest payload in byte order: deterministic, and each is a `min`
//! aggregate that DataFusion can spill (an order-sensitive `first_value` keeps more state per
//! group).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono::{SecondsFormat, Utc};
use datafusion::arrow::array::{Array, Int64Array, UInt64Array};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::dataframe::DataFrameWriteOptions;
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::memory_pool::FairSpillPool;
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::prelude::{JsonReadOptions, SessionConfig, SessionContext};

use crate::completeness::{self, Incomplete};
use crate::hour::{Hour, MARKER, PART0};
use crate::staging::Staging;
use crate::store::{Marker, Store, StoreError};

/// How a dedup runs.
#[derive(Debug, Clone)]
pub struct DedupOptions {
    /// DataFusion's memory pool: beyond it, aggregation spills to `spill_dir`. 256 MiB dedups
    /// any hour on a small machine; raise it for speed, never needed for correctness.
    pub memory_limit: usize,
    /// Where spill files go (removed when the dedup ends).
    pub spill_dir: PathBuf,
    /// The completeness rule's grace period.
    pub grace: Duration,
    /// Close the hour even when the rule says it is not complete.
    pub force: bool,
    /// DataFusion's parallelism (defaults to the machine's cores).
    pub target_partitions: usize,
}

impl DedupOptions {
    /// Defaults: 256 MiB, spills under the staging directory's `_spill`, 2 min grace.
    pub fn new(spill_dir: impl Into<PathBuf>) -> Self {
        Self {
            memory_limit: 256 << 20,
            spill_dir: spill_dir.into(),
            grace: Duration::from_secs(120),
            force: false,
            target_partitions: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
        }
    }
}

/// Why a dedup did not close the hour.
#[derive(Debug, thiserror::Error)]
pub enum DedupError {
    /// The completeness rule says the hour may still receive events.
    #[error(
        "hour {hour} of `{type_name}` is not complete: {why} (use --force to close it anyway)"
    )]
    Incomplete {
        /// The type.
        type_name: String,
        /// The hour.
        hour: Hour,
        /// Why.
        why: Incomplete,
    },
    /// Staging I/O.
    #[error("staging: {0}")]
    Io(#[from] std::io::Error),
    /// The output store.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// DataFusion (including running out of spill space).
    #[error("dedup engine: {0}")]
    Engine(#[from] datafusion::error::DataFusionError),
}

/// What a dedup did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Closed {
    /// This run closed the hour.
    Now(Marker),
    /// The hour was already closed; nothing written.
    Before(Marker),
}

/// Closes `hour` of `type_name`: see the module docs.
pub async fn dedup(
    type_name: &str,
    hour: Hour,
    staging: &Staging,
    store: &Store,
    opts: &DedupOptions,
) -> Result<Closed, DedupError> {
    if let Some(m) = store.marker(type_name, hour).await? {
        return Ok(Closed::Before(m));
    }
    if !opts.force {
        let (partitions, marks) = staging.watermarks(type_name).unwrap_or((1, Vec::new()));
        completeness::is_complete(hour, opts.grace, partitions, &marks).map_err(|why| {
            DedupError::Incomplete {
                type_name: type_name.into(),
                hour,
                why,
            }
        })?;
    }
    let files = {
        let st = staging.clone();
        let name = type_name.to_string();
        tokio::task::spawn_blocking(move || st.close(&name, hour))
            .await
            .map_err(std::io::Error::other)??
    };
    std::fs::create_dir_all(&opts.spill_dir)?;
    let ctx = session(store, opts)?;
    let schema = staged_schema();
    let dir = staging.hour_dir(type_name, hour);
    if files.is_empty() {
        // An hour with no events still gets an (empty) bucket and a marker: "complete and
        // empty" is different from "missing" for Datamon.
        ctx.register_batch(
            "staged",
            datafusion::arrow::record_batch::RecordBatch::new_empty(Arc::new(schema.clone())),
        )?;
    } else {
        ctx.register_json(
            "staged",
            format!("{}/", dir.display()),
            JsonReadOptions::default()
                .schema(&schema)
                .file_extension(".ndjson"),
        )
        .await?;
    }
    let staged = count(&ctx, "SELECT count(*) FROM staged").await?;
    let records = count(
        &ctx,
        "SELECT count(*) FROM (SELECT src FROM staged GROUP BY src)",
    )
    .await?;
    let df = ctx
        .sql(
            "SELECT id, min(received_at) AS received_at, min(payload) AS payload \
             FROM staged GROUP BY id",
        )
        .await?;
    let part = format!("gabo://out/{}/{PART0}", hour.bucket_path(type_name));
    let written = df
        .write_parquet(
            &part,
            DataFrameWriteOptions::new().with_single_file_output(true),
            None,
        )
        .await?;
    let unique = written
        .first()
        .and_then(|b| {
            let c = b.column(0);
            c.as_any().downcast_ref::<UInt64Array>().map(|a| a.value(0))
        })
        .unwrap_or(0);
    let ledger = store.accepted(type_name, hour).await?;
    let late = store.late(type_name, hour).await?;
    let marker = Marker {
        type_name: type_name.into(),
        hour: hour.to_string(),
        completed_at: Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true),
        // Ingested types have no gateway ledger: every distinct record read is accepted.
        accepted: if ledger > 0 { ledger } else { records },
        staged,
        unique,
        duplicates: records.saturating_sub(unique),
        late,
    };
    store
        .put(
            &format!("{}/{MARKER}", hour.bucket_path(type_name)),
            serde_json::to_vec(&marker).expect("a marker serialises"),
        )
        .await?;
    let st = staging.clone();
    let name = type_name.to_string();
    tokio::task::spawn_blocking(move || st.remove_hour(&name, hour))
        .await
        .map_err(std::io::Error::other)??;
    let l = |n: &'static str| metrics::counter!(n, "type" => type_name.to_string());
    l(crate::metrics::UNIQUE).increment(marker.unique);
    l(crate::metrics::DUPLICATES).increment(marker.duplicates);
    l(crate::metrics::HOURS_CLOSED).increment(1);
    Ok(Closed::Now(marker))
}

/// The staging line's columns (see [`crate::envelope::StagedLine`]).
fn staged_schema() -> Schema {
    Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("received_at", DataType::Utf8, false),
        Field::new("src", DataType::Utf8, false),
        Field::new("payload", DataType::Utf8, false),
    ])
}

fn session(store: &Store, opts: &DedupOptions) -> Result<SessionContext, DedupError> {
    let runtime = RuntimeEnvBuilder::new()
        // A fair pool, not the greedy one of `with_memory_limit`: with the greedy pool the
        // partial aggregation took the whole pool and the final one, holding nothing it could
        // spill, failed ("Failed to allocate … for FinalHashAggregateStream") on an hour 10x
        // the limit. The fair pool gives each spilling operator its share. KNOWN LIMIT: on
        // such an hour (2 M events, 32 MiB) the Parquet writer, which cannot spill, still
        // fails to get memory after the aggregation (docs/BENCHMARKS.md, GABO 2026-11-30).
        .with_memory_pool(Arc::new(FairSpillPool::new(opts.memory_limit)))
        .with_disk_manager_builder(
            DiskManagerBuilder::default()
                .with_mode(DiskManagerMode::Directories(vec![opts.spill_dir.clone()])),
        )
        .build_arc()?;
    // Row groups of 64 Ki rows instead of 1 Mi: the Parquet writer buffers a whole row group
    // in the same memory pool; smaller groups shrink that buffer (not yet enough, see above).
    let config = SessionConfig::new()
        .with_target_partitions(opts.target_partitions.max(1))
        .set_usize("datafusion.execution.parquet.max_row_group_size", 64 * 1024);
    let ctx = SessionContext::new_with_config_rt(config, runtime);
    // Buckets are written through the output store, whatever it is.
    let url = ObjectStoreUrl::parse("gabo://out")?;
    ctx.register_object_store(url.as_ref(), store.inner.clone());
    Ok(ctx)
}

async fn count(ctx: &SessionContext, sql: &str) -> Result<u64, DedupError> {
    let batches = ctx.sql(sql).await?.collect().await?;
    let b = batches.first().ok_or_else(|| {
        datafusion::error::DataFusionError::Internal(format!("no result for {sql}"))
    })?;
    let c = b.column(0);
    if let Some(a) = c.as_any().downcast_ref::<Int64Array>() {
        return Ok(a.value(0).max(0) as u64);
    }
    if let Some(a) = c.as_any().downcast_ref::<UInt64Array>() {
        return Ok(a.value(0));
    }
    Err(datafusion::error::DataFusionError::Internal(format!(
        "unexpected count type {}",
        c.data_type()
    ))
    .into())
}
