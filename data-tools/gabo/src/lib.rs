//! GABO: event delivery that provisions itself, and deduplicates more than fits in memory.
//!
//! Teams declare event types in YAML; `gabo apply` creates what each needs; events travel
//! gateway → Kafka → writer (hourly staging) → completionist → dedup (DataFusion, spilling) →
//! an immutable Parquet bucket per hour with a `_SUCCESS` marker holding the counts, which
//! `gabo audit` checks. docs/gabo.md explains the model and the guarantees.
//!
//! Module map (pure cores first, thin drivers after):
//! - [`types`]: declarations (`types.yaml`), validated with errors naming file, line, type, field.
//! - [`hour`]: hour partitions and the bucket layout shared with Datamon and Styx.
//! - [`completeness`]: the completeness rule (watermarks past hour end + grace), pure.
//! - [`envelope`]: request body → validated events; the Kafka record; the staging line. Pure.
//! - [`audit`]: accepted = unique + duplicates + late, and reading the counts.
//! - [`provision`]: the apply plan (pure) and its execution with rdkafka's admin client.
//! - [`staging`]: the writer's local staging files, hour fences and watermarks.
//! - [`store`]: the output root through `object_store`: buckets, markers, ledger, late bucket.
//! - [`gateway`]: hyper HTTP → Kafka (one record per request), answers after the ack.
//! - [`writer`]: Kafka → staging, fsync, then commit; also ingests existing topics.
//! - [`dedup`]: one hour's close with DataFusion under a memory limit.
//! - [`completionist`]: closes complete hours.
//! - [`metrics`]: metric names and the Prometheus recorder.

pub mod audit;
pub mod completeness;
pub mod completionist;
pub mod dedup;
pub mod envelope;
pub mod gateway;
pub mod hour;
pub mod metrics;
pub mod provision;
pub mod staging;
pub mod store;
pub mod types;
pub mod writer;
