//! The span store: Parquet files partitioned by hour, written through `object_store` (a local
//! directory is the embedded default; an S3/GCS-compatible store serves at scale), each with a
//! small JSON index beside it for lookup by trace ID and for the service/operation lists.
//!
//! Layout under the store's root:
//!
//! ```text
//! spans/2026-11-29/14/part-1764424800123-9f3a0c21-0.parquet   immutable, written once
//! spans/2026-11-29/14/part-1764424800123-9f3a0c21-0.idx.json  {"trace_ids":[…],"services":{"svc":["op",…]},…}
//! ```
//!
//! Files are immutable: the in-memory index cache never goes stale, and a retention pass
//! deletes whole hours.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use datafusion::parquet::arrow::ArrowWriter;
use futures_util::TryStreamExt;
// DataFusion's own object_store (re-exported): one copy compiled, and the store handed to the
// query runner is the type DataFusion expects.
use datafusion::object_store::local::LocalFileSystem;
use datafusion::object_store::path::Path;
use datafusion::object_store::{self, ObjectStore, ObjectStoreExt, PutPayload};

use crate::model::{self, hour_of, SpanRow, HOUR_NS};

/// A store that cannot be opened, read or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The object store failed (I/O, permissions, network).
    #[error("span store: {0}")]
    Object(#[from] object_store::Error),
    /// A Parquet file could not be written or read.
    #[error("span store: parquet: {0}")]
    Parquet(#[from] datafusion::parquet::errors::ParquetError),
    /// An index file is not what this version writes.
    #[error("span store: bad index {path}: {reason}")]
    Index { path: String, reason: String },
    /// The URL names a store this build cannot reach.
    #[error("span store: unsupported location {0:?} (this build reads local directories: a path or file:///…)")]
    Unsupported(String),
    /// The directory could not be created.
    #[error("span store: {0}")]
    Io(#[from] std::io::Error),
}

/// What the index beside each Parquet file says about it.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct FileIndex {
    /// Trace IDs with at least one span in the file, sorted.
    pub trace_ids: BTreeSet<String>,
    /// Service → its operation names.
    pub services: BTreeMap<String, BTreeSet<String>>,
    /// Earliest span start in the file (ns).
    pub min_start_ns: i64,
    /// Latest span start in the file (ns).
    pub max_start_ns: i64,
    /// Spans in the file.
    pub spans: u64,
}

/// A handle on the store; cheap to clone.
#[derive(Debug, Clone)]
pub struct SpanStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    objects: Arc<dyn ObjectStore>,
    indexes: Mutex<HashMap<Path, Arc<FileIndex>>>,
    /// Random per handle: several writers (the Kafka transport's) share one store, and two
    /// files written in the same millisecond must not share a name.
    writer: u32,
    seq: AtomicU64,
}

impl SpanStore {
    /// Opens a store at a local directory (`/var/lib/traces`, `file:///var/lib/traces`),
    /// creating it when missing.
    pub fn open(location: &str) -> Result<Self, StoreError> {
        let dir = match location.strip_prefix("file://") {
            Some(path) => path.to_owned(),
            None if location.contains("://") => {
                return Err(StoreError::Unsupported(location.into()))
            }
            None => location.to_owned(),
        };
        std::fs::create_dir_all(&dir)?;
        let dir = std::fs::canonicalize(&dir)?;
        let objects = LocalFileSystem::new_with_prefix(&dir)?;
        Ok(Self::with_object_store(Arc::new(objects)))
    }

    /// A store over any `object_store` implementation, its paths relative to the store's root.
    pub fn with_object_store(objects: Arc<dyn ObjectStore>) -> Self {
        Self {
            inner: Arc::new(Inner {
                objects,
                indexes: Mutex::new(HashMap::new()),
                writer: rand::random(),
                seq: AtomicU64::new(0),
            }),
        }
    }

    /// The object store, for the query runner.
    pub fn objects(&self) -> Arc<dyn ObjectStore> {
        Arc::clone(&self.inner.objects)
    }

    /// Writes spans: one Parquet file (and its index) per hour they start in. Returns the
    /// number of files written.
    pub async fn write(&self, rows: Vec<SpanRow>, now: DateTime<Utc>) -> Result<usize, StoreError> {
        let mut by_hour: BTreeMap<i64, Vec<SpanRow>> = BTreeMap::new();
        for row in rows {
            by_hour.entry(hour_of(row.start_ns)).or_default().push(row);
        }
        let mut files = 0;
        for (hour, rows) in by_hour {
            let seq = self.inner.seq.fetch_add(1, Ordering::Relaxed);
            let stem = format!(
                "{}/part-{}-{:08x}-{seq}",
                hour_dir(hour),
                now.timestamp_millis(),
                self.inner.writer
            );
            let parquet = encode(&rows)?;
            let index = index_of(&rows);
            let index_json = serde_json::to_vec(&index).expect("an index serialises");
            // Data first, index last: a reader that finds an index finds its data.
            self.inner
                .objects
                .put(
                    &Path::from(format!("{stem}.parquet")),
                    PutPayload::from(parquet),
                )
                .await?;
            let index_path = Path::from(format!("{stem}.idx.json"));
            self.inner
                .objects
                .put(&index_path, PutPayload::from(index_json))
                .await?;
            self.cache(index_path, Arc::new(index));
            files += 1;
        }
        Ok(files)
    }

    fn cache(&self, path: Path, index: Arc<FileIndex>) {
        self.inner
            .indexes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(path, index);
    }

    /// Every file's index whose hour overlaps `[from_ns, to_ns)`, with its Parquet path.
    pub async fn files(
        &self,
        from_ns: i64,
        to_ns: i64,
    ) -> Result<Vec<(Path, Arc<FileIndex>)>, StoreError> {
        let listed: Vec<_> = self
            .inner
            .objects
            .list(Some(&Path::from("spans")))
            .try_collect()
            .await?;
        let mut out = Vec::new();
        for meta in listed {
            let name = meta.location.as_ref();
            let Some(stem) = name.strip_suffix(".idx.json") else {
                continue;
            };
            let Some(hour) = hour_from_path(name) else {
                continue;
            };
            if hour + HOUR_NS <= from_ns || hour >= to_ns {
                continue;
            }
            let index = self.index(&meta.location).await?;
            out.push((Path::from(format!("{stem}.parquet")), index));
        }
        out.sort_by_key(|(path, _)| path.clone());
        Ok(out)
    }

    async fn index(&self, path: &Path) -> Result<Arc<FileIndex>, StoreError> {
        if let Some(i) = self
            .inner
            .indexes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(path)
        {
            return Ok(Arc::clone(i));
        }
        let bytes = self.inner.objects.get(path).await?.bytes().await?;
        let index: FileIndex = serde_json::from_slice(&bytes).map_err(|e| StoreError::Index {
            path: path.to_string(),
            reason: e.to_string(),
        })?;
        let index = Arc::new(index);
        self.cache(path.clone(), Arc::clone(&index));
        Ok(index)
    }

    /// Reads one Parquet file's spans, keeping those `keep` accepts.
    pub async fn read(
        &self,
        path: &Path,
        keep: impl Fn(&SpanRow) -> bool,
    ) -> Result<Vec<SpanRow>, StoreError> {
        let bytes: Bytes = self.inner.objects.get(path).await?.bytes().await?;
        let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)?.build()?;
        let mut out = Vec::new();
        for batch in reader {
            let batch = batch.map_err(|e| {
                datafusion::parquet::errors::ParquetError::ArrowError(e.to_string())
            })?;
            let rows = model::from_batch(&batch).map_err(|reason| StoreError::Index {
                path: path.to_string(),
                reason,
            })?;
            out.extend(rows.into_iter().filter(|r| keep(r)));
        }
        Ok(out)
    }

    /// All spans of one trace, sorted by start; empty when the store has none.
    pub async fn trace(&self, trace_id: &str) -> Result<Vec<SpanRow>, StoreError> {
        let trace_id = trace_id.to_ascii_lowercase();
        let mut spans = Vec::new();
        for (path, index) in self.files(i64::MIN, i64::MAX).await? {
            if index.trace_ids.contains(&trace_id) {
                spans.extend(self.read(&path, |r| r.trace_id == trace_id).await?);
            }
        }
        spans.sort_by_key(|s| (s.start_ns, s.span_id.clone()));
        // A span delivered twice by the Kafka transport (at least once) is shown once.
        spans.dedup_by(|a, b| a.span_id == b.span_id && a.start_ns == b.start_ns);
        Ok(spans)
    }

    /// Deletes every hour that ended before `cutoff_ns`. Returns the objects deleted.
    pub async fn expire(&self, cutoff_ns: i64) -> Result<usize, StoreError> {
        let listed: Vec<_> = self
            .inner
            .objects
            .list(Some(&Path::from("spans")))
            .try_collect()
            .await?;
        let mut deleted = 0;
        for meta in listed {
            let Some(hour) = hour_from_path(meta.location.as_ref()) else {
                continue;
            };
            if hour + HOUR_NS <= cutoff_ns {
                self.inner.objects.delete(&meta.location).await?;
                self.inner
                    .indexes
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&meta.location);
                deleted += 1;
            }
        }
        Ok(deleted)
    }
}

fn encode(rows: &[SpanRow]) -> Result<Vec<u8>, StoreError> {
    let batch = model::to_batch(rows);
    let mut buf = Vec::new();
    let mut writer = ArrowWriter::try_new(&mut buf, batch.schema(), None)?;
    writer.write(&batch)?;
    writer.close()?;
    Ok(buf)
}

fn index_of(rows: &[SpanRow]) -> FileIndex {
    let mut index = FileIndex {
        min_start_ns: i64::MAX,
        max_start_ns: i64::MIN,
        spans: rows.len() as u64,
        ..FileIndex::default()
    };
    for r in rows {
        index.trace_ids.insert(r.trace_id.clone());
        index
            .services
            .entry(r.service.clone())
            .or_default()
            .insert(r.name.clone());
        index.min_start_ns = index.min_start_ns.min(r.start_ns);
        index.max_start_ns = index.max_start_ns.max(r.start_ns);
    }
    index
}

/// `spans/2026-11-29/14` for the hour starting at `hour_ns`.
pub fn hour_dir(hour_ns: i64) -> String {
    let t = DateTime::<Utc>::from_timestamp_nanos(hour_ns);
    t.format("spans/%Y-%m-%d/%H").to_string()
}

/// The hour a store path lies in, from its `spans/DATE/HOUR/` prefix.
fn hour_from_path(path: &str) -> Option<i64> {
    let mut parts = path.split('/');
    if parts.next()? != "spans" {
        return None;
    }
    let date = parts.next()?;
    let hour = parts.next()?;
    let t =
        chrono::NaiveDateTime::parse_from_str(&format!("{date} {hour}:00:00"), "%Y-%m-%d %H:%M:%S")
            .ok()?;
    t.and_utc().timestamp_nanos_opt()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::sample;

    const T0: i64 = 1_764_424_800_000_000_000; // 2025-11-29T14:00:00Z

    #[test]
    fn hour_paths_round_trip() {
        assert_eq!(hour_dir(T0), "spans/2025-11-29/14");
        assert_eq!(
            hour_from_path("spans/2025-11-29/14/part-1-0.parquet"),
            Some(T0)
        );
        assert_eq!(hour_from_path("other/2025-11-29/14/x"), None);
        assert_eq!(hour_from_path("spans/garbage/14/x"), None);
    }

    #[tokio::test]
    async fn spans_are_found_by_trace_and_hour_and_expire_by_age() {
        let dir = tempfile::tempdir().unwrap();
        let store = SpanStore::open(dir.path().to_str().unwrap()).unwrap();
        let a = "a".repeat(32);
        let b = "b".repeat(32);
        let rows = vec![
            sample(
                &a,
                &"1".repeat(16),
                "",
                "push-server",
                "POST /v1/push",
                T0 + 10,
                100,
            ),
            sample(
                &a,
                &"2".repeat(16),
                &"1".repeat(16),
                "push-server",
                "append",
                T0 + 20,
                10,
            ),
            // Same trace, next hour: a second file.
            sample(
                &a,
                &"3".repeat(16),
                &"1".repeat(16),
                "msg-processor",
                "consume",
                T0 + HOUR_NS + 1,
                5,
            ),
            sample(
                &b,
                &"4".repeat(16),
                "",
                "msg-processor",
                "consume",
                T0 + 30,
                5,
            ),
        ];
        assert_eq!(store.write(rows, Utc::now()).await.unwrap(), 2);

        // A fresh handle (as after a restart) reads the indexes from the files.
        let store = SpanStore::open(dir.path().to_str().unwrap()).unwrap();
        let trace = store.trace(&a.to_uppercase()).await.unwrap();
        let names: Vec<_> = trace.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["POST /v1/push", "append", "consume"]);
        assert!(store.trace(&"c".repeat(32)).await.unwrap().is_empty());

        let first_hour = store.files(T0, T0 + HOUR_NS).await.unwrap();
        assert_eq!(first_hour.len(), 1);
        let services = &first_hour[0].1.services;
        assert_eq!(
            services["push-server"].iter().collect::<Vec<_>>(),
            ["POST /v1/push", "append"]
        );

        assert_eq!(
            store.expire(T0 + HOUR_NS).await.unwrap(),
            2,
            "the first hour's parquet and index"
        );
        assert_eq!(store.trace(&a).await.unwrap().len(), 1);
    }

    #[test]
    fn other_schemes_are_refused_clearly() {
        let err = SpanStore::open("s3://bucket/spans")
            .unwrap_err()
            .to_string();
        assert!(err.contains("s3://bucket/spans"), "{err}");
    }
}
