//! The output root through `object_store`: buckets, markers, late buckets, the gateway's
//! accepted ledger and the applied type declarations. A plain path or `file://` URL is a
//! local directory (the embedded default); other schemes are refused with a clear message
//! (see docs/gabo.md on object stores).

use std::sync::Arc;

use bytes::Bytes;
use datafusion::object_store::local::LocalFileSystem;
use datafusion::object_store::path::Path as ObjPath;
use datafusion::object_store::{ObjectStore, ObjectStoreExt as _, PutPayload};
use futures_util::TryStreamExt;
use serde::{Deserialize, Serialize};

use crate::envelope::StagedLine;
use crate::hour::{Hour, MARKER};

/// A storage error.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The root URL cannot be used.
    #[error("output root `{0}`: {1}")]
    Root(String, String),
    /// The object store failed.
    #[error(transparent)]
    Object(#[from] datafusion::object_store::Error),
    /// A stored object is not what GABO writes.
    #[error("{path}: {message}")]
    Corrupt {
        /// The object.
        path: String,
        /// What is wrong.
        message: String,
    },
}

/// The success marker of a closed hour (the shared contract; written last).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marker {
    /// Event type.
    #[serde(rename = "type")]
    pub type_name: String,
    /// `2026-11-29T14`.
    pub hour: String,
    /// RFC 3339.
    pub completed_at: String,
    /// Events the gateways acknowledged for this hour (their ledger).
    pub accepted: u64,
    /// Lines in staging, redelivered copies included.
    pub staged: u64,
    /// Events in the bucket.
    pub unique: u64,
    /// Accepted events dropped because their ID was already in the bucket.
    pub duplicates: u64,
    /// Events of this hour that reached the writer after it closed (in the late bucket).
    pub late: u64,
}

/// The output root.
#[derive(Debug, Clone)]
pub struct Store {
    /// The object store.
    pub inner: Arc<dyn ObjectStore>,
    /// The URL it was opened from, normalised to `file:///abs/dir/` for local roots.
    pub url: String,
}

impl Store {
    /// Opens `root`: a directory path or a `file://` URL (created when missing).
    pub fn open(root: &str) -> Result<Self, StoreError> {
        let dir = if let Some(p) = root.strip_prefix("file://") {
            p.to_string()
        } else if root.contains("://") {
            return Err(StoreError::Root(
                root.into(),
                "only local directories (a path or file://) are built in; see docs/gabo.md \
                 for object stores"
                    .into(),
            ));
        } else {
            root.to_string()
        };
        std::fs::create_dir_all(&dir).map_err(|e| StoreError::Root(root.into(), e.to_string()))?;
        let abs = std::fs::canonicalize(&dir)
            .map_err(|e| StoreError::Root(root.into(), e.to_string()))?;
        let fs = LocalFileSystem::new_with_prefix(&abs)
            .map_err(|e| StoreError::Root(root.into(), e.to_string()))?;
        Ok(Self {
            inner: Arc::new(fs),
            url: format!("file://{}/", abs.display()),
        })
    }

    /// Writes `bytes` at `path` (whole-object put: readers see all of it or nothing).
    pub async fn put(&self, path: &str, bytes: Vec<u8>) -> Result<(), StoreError> {
        self.inner
            .put(&ObjPath::from(path), PutPayload::from(Bytes::from(bytes)))
            .await?;
        Ok(())
    }

    /// Reads `path`, `None` when absent.
    pub async fn get(&self, path: &str) -> Result<Option<Bytes>, StoreError> {
        match self.inner.get(&ObjPath::from(path)).await {
            Ok(r) => Ok(Some(r.bytes().await?)),
            Err(datafusion::object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Object paths under `prefix`.
    pub async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let p = ObjPath::from(prefix);
        let metas: Vec<_> = self.inner.list(Some(&p)).try_collect().await?;
        Ok(metas.into_iter().map(|m| m.location.to_string()).collect())
    }

    /// The top-level directories (prefixes) of the root: one per applied type, without
    /// listing the buckets below them.
    pub async fn top_level(&self) -> Result<Vec<String>, StoreError> {
        let r = self.inner.list_with_delimiter(None).await?;
        Ok(r.common_prefixes
            .into_iter()
            .map(|p| p.to_string())
            .collect())
    }

    /// Deletes every object under `prefix`; returns how many.
    pub async fn delete_prefix(&self, prefix: &str) -> Result<usize, StoreError> {
        let paths = self.list(prefix).await?;
        for p in &paths {
            self.inner.delete(&ObjPath::from(p.as_str())).await?;
        }
        Ok(paths.len())
    }

    /// The marker of `hour`, `None` while the hour is open.
    pub async fn marker(&self, type_name: &str, hour: Hour) -> Result<Option<Marker>, StoreError> {
        let path = format!("{}/{MARKER}", hour.bucket_path(type_name));
        let Some(b) = self.get(&path).await? else {
            return Ok(None);
        };
        serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| StoreError::Corrupt {
                path,
                message: e.to_string(),
            })
    }

    /// Sum of every gateway's accepted count for `hour`.
    pub async fn accepted(&self, type_name: &str, hour: Hour) -> Result<u64, StoreError> {
        let mut sum = 0;
        for p in self.list(&ledger_dir(type_name, hour)).await? {
            let b = self.get(&p).await?.unwrap_or_default();
            let e: LedgerEntry = serde_json::from_slice(&b).map_err(|e| StoreError::Corrupt {
                path: p.clone(),
                message: e.to_string(),
            })?;
            sum += e.accepted;
        }
        Ok(sum)
    }

    /// Distinct late events of `hour` (a redelivered copy counts once).
    pub async fn late(&self, type_name: &str, hour: Hour) -> Result<u64, StoreError> {
        let mut srcs = std::collections::HashSet::new();
        for p in self.list(&hour.late_path(type_name)).await? {
            let b = self.get(&p).await?.unwrap_or_default();
            for line in b.split(|c| *c == b'\n').filter(|l| !l.is_empty()) {
                let l: StagedLine =
                    serde_json::from_slice(line).map_err(|e| StoreError::Corrupt {
                        path: p.clone(),
                        message: e.to_string(),
                    })?;
                srcs.insert(l.src);
            }
        }
        Ok(srcs.len() as u64)
    }
}

/// One gateway instance's running count for one (type, hour).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct LedgerEntry {
    /// Events acknowledged by this instance.
    pub accepted: u64,
}

/// `{type}/_accepted/{date}/{hour}`: one object per gateway instance.
pub fn ledger_dir(type_name: &str, hour: Hour) -> String {
    format!("{type_name}/_accepted/{}/{}", hour.date(), hour.hh())
}
