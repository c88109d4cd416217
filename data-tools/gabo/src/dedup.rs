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
//!
//! The memory limit is the dedup's whole budget, split in two ([`writer_budget`]): the
//! Parquet writer's buffers get a fixed share, DataFusion's pool the rest. The aggregation
//! spills when its pool runs short; a writer cannot spill, so it is not in that pool (where it
//! failed to get memory once the aggregation had taken its share) but bounds its own buffers:
//! it ends a row group when the encoder holds half its share, and uploads through a buffer of
//! a quarter of it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono::{SecondsFormat, Utc};
use datafusion::arrow::array::{Array, Int64Array, UInt64Array};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::memory_pool::FairSpillPool;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::object_store::buffered::BufWriter;
use datafusion::object_store::path::Path as ObjPath;
use datafusion::parquet::arrow::AsyncArrowWriter;
use datafusion::parquet::basic::{Compression, ZstdLevel};
use datafusion::parquet::file::properties::WriterProperties;
use datafusion::physical_plan::{execute_stream, ExecutionPlan};
use datafusion::prelude::{JsonReadOptions, SessionConfig, SessionContext};
use futures_util::StreamExt as _;

use crate::completeness::{self, Incomplete};
use crate::hour::{Hour, MARKER, PART0};
use crate::staging::Staging;
use crate::store::{Marker, Store, StoreError};

/// How a dedup runs.
#[derive(Debug, Clone)]
pub struct DedupOptions {
    /// The dedup's memory: DataFusion's pool (beyond it, aggregation spills to `spill_dir`)
    /// plus the Parquet writer's share ([`writer_budget`]). 256 MiB dedups any hour on a small
    /// machine; raise it for speed, never needed for correctness.
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
    /// Encoding or uploading the Parquet bucket.
    #[error("writing the bucket: {0}")]
    Parquet(#[from] datafusion::parquet::errors::ParquetError),
}

/// What a dedup did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Closed {
    /// This run closed the hour, spilling this much of its aggregation to disk.
    Now(Marker, Spilled),
    /// The hour was already closed; nothing written.
    Before(Marker),
}

/// What the dedup's aggregation wrote to spill files (DataFusion's operator metrics): zero
/// when the hour fitted the memory pool.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Spilled {
    /// Spill files written.
    pub files: u64,
    /// Bytes written to them.
    pub bytes: u64,
}

/// The Parquet writer's share of a memory limit: an eighth, at least 1 MiB (below that a row
/// group holds too few rows to compress well) and at most 32 MiB (row groups of ~16 MiB
/// encoded, plenty for readers; more buys nothing). At the 256 MiB default its upload parts
/// are 8 MiB, above S3's 5 MiB minimum for multipart uploads.
pub fn writer_budget(memory_limit: usize) -> usize {
    (memory_limit / 8).clamp(1 << 20, 32 << 20)
}

/// Rows per DataFusion batch: one limit's 64th in rows of 1 KiB, between 256 and DataFusion's
/// default 8192. The final aggregation must hold at least one batch's groups before it can
/// spill; with the default, an hour of ~800-byte events under 16 MiB failed ("Failed to
/// allocate 6.7 MB for FinalHashAggregateStream") without ever spilling.
pub fn batch_rows(memory_limit: usize) -> usize {
    (memory_limit >> 16).clamp(256, 8192)
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
    let ctx = session(opts)?;
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
    let plan = df.create_physical_plan().await?;
    let part = format!("{}/{PART0}", hour.bucket_path(type_name));
    let unique = write_bucket(
        store,
        &part,
        plan.clone(),
        &ctx,
        writer_budget(opts.memory_limit),
    )
    .await?;
    let spilled = spilled(&plan);
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
    tracing::info!(
        r#type = type_name, %hour, unique, spill_files = spilled.files,
        spill_bytes = spilled.bytes, "bucket written"
    );
    Ok(Closed::Now(marker, spilled))
}

/// Runs `plan` (one row per ID) into the Parquet object `path` of `store`, holding about
/// `budget` bytes of buffers (module docs); returns the rows written. The object appears
/// whole or not at all: a local store renames a finished temporary file, a remote one
/// completes a multipart upload.
async fn write_bucket(
    store: &Store,
    path: &str,
    plan: Arc<dyn ExecutionPlan>,
    ctx: &SessionContext,
    budget: usize,
) -> Result<u64, DedupError> {
    let schema = plan.schema();
    let mut rows = execute_stream(plan, ctx.task_ctx())?;
    let upload = BufWriter::with_capacity(store.inner.clone(), ObjPath::from(path), budget / 4)
        // One part in flight: the upload holds at most two parts (half the budget).
        .with_max_concurrency(1);
    let props = WriterProperties::builder()
        // DataFusion's default for the Parquet files it writes.
        .set_compression(Compression::ZSTD(
            ZstdLevel::try_new(3).expect("3 is a zstd level"),
        ))
        .build();
    let mut w = AsyncArrowWriter::try_new(upload, schema, Some(props))?;
    let wrote = async {
        let mut n = 0u64;
        while let Some(batch) = rows.next().await {
            let batch = batch?;
            n += batch.num_rows() as u64;
            w.write(&batch).await?;
            if w.memory_size() >= budget / 2 {
                w.flush().await?;
            }
        }
        Ok::<_, DedupError>(n)
    }
    .await;
    match wrote {
        Ok(n) => {
            w.close().await?;
            Ok(n)
        }
        Err(e) => {
            // Leave no partial upload behind; the error that stopped the write is the one to
            // report.
            let _ = w.into_inner().abort().await;
            Err(e)
        }
    }
}

/// Sums the spill metrics of every operator in `plan` (after it ran).
fn spilled(plan: &Arc<dyn ExecutionPlan>) -> Spilled {
    let own = plan.metrics().map_or(Spilled::default(), |m| Spilled {
        files: m.spill_count().unwrap_or(0) as u64,
        bytes: m.spilled_bytes().unwrap_or(0) as u64,
    });
    plan.children().into_iter().fold(own, |acc, c| {
        let s = spilled(c);
        Spilled {
            files: acc.files + s.files,
            bytes: acc.bytes + s.bytes,
        }
    })
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

fn session(opts: &DedupOptions) -> Result<SessionContext, DedupError> {
    let runtime = RuntimeEnvBuilder::new()
        // A fair pool, not the greedy one of `with_memory_limit`: with the greedy pool the
        // partial aggregation took the whole pool and the final one, holding nothing it could
        // spill, failed ("Failed to allocate … for FinalHashAggregateStream") on an hour 10x
        // the limit. The fair pool gives each spilling operator its share. The Parquet
        // writer, which cannot spill, is outside it (module docs): inside, it failed to get
        // memory after the aggregation on such an hour (2 M events, 32 MiB).
        .with_memory_pool(Arc::new(FairSpillPool::new(
            opts.memory_limit
                .saturating_sub(writer_budget(opts.memory_limit)),
        )))
        .with_disk_manager_builder(
            DiskManagerBuilder::default()
                .with_mode(DiskManagerMode::Directories(vec![opts.spill_dir.clone()])),
        )
        .build_arc()?;
    let config = SessionConfig::new()
        .with_target_partitions(opts.target_partitions.max(1))
        .with_batch_size(batch_rows(opts.memory_limit));
    let ctx = SessionContext::new_with_config_rt(config, runtime);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_writer_gets_an_eighth_of_the_limit_within_bounds() {
        const MIB: usize = 1 << 20;
        assert_eq!(writer_budget(256 * MIB), 32 * MIB, "the default limit");
        assert_eq!(writer_budget(32 * MIB), 4 * MIB);
        assert_eq!(writer_budget(4 * MIB), MIB, "at least 1 MiB");
        assert_eq!(writer_budget(4096 * MIB), 32 * MIB, "at most 32 MiB");
        assert_eq!(batch_rows(256 * MIB), 4096);
        assert_eq!(batch_rows(16 * MIB), 256);
        assert_eq!(batch_rows(4096 * MIB), 8192, "DataFusion's default at most");
        // The pool keeps the rest: the two never exceed the limit.
        for limit in [MIB, 4 * MIB, 256 * MIB] {
            assert!(writer_budget(limit) <= limit);
        }
    }
}
