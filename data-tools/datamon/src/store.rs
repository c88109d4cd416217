//! Reading success markers through `object_store`.
//!
//! This build carries the local filesystem store only (`file://` URLs or absolute paths):
//! object_store's cloud stores pull in an HTTP/TLS stack that costs every clean CI build
//! minutes. A location with another scheme is refused when declarations load, with a
//! clear message, instead of failing at check time.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::ObjectStoreExt;

/// Markers bigger than this are not parsed: a marker is a small JSON object or empty, and a
/// stray big file must not be read whole for each check. The last-modified time is used.
pub const MAX_MARKER_BYTES: u64 = 64 * 1024;

/// A location that cannot be read by this build.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Not a URL or an absolute path.
    #[error("{0:?} is not a file:// URL or an absolute path")]
    BadLocation(String),
    /// A scheme whose store is not built in.
    #[error("scheme {0:?} is not built into this datamon (local filesystem only: file:// or an absolute path)")]
    Scheme(String),
    /// The store answered with an error other than "not found".
    #[error("reading {path}: {source}")]
    Read {
        /// The marker's path.
        path: String,
        /// The store's error.
        source: object_store::Error,
    },
}

/// Turns a rendered location (a partition's directory) into a store path.
pub fn parse_location(location: &str) -> Result<Path, StoreError> {
    let url = if location.starts_with('/') {
        url::Url::from_file_path(location)
            .map_err(|()| StoreError::BadLocation(location.to_string()))?
    } else {
        url::Url::parse(location).map_err(|_| StoreError::BadLocation(location.to_string()))?
    };
    if url.scheme() != "file" {
        return Err(StoreError::Scheme(url.scheme().to_string()));
    }
    Path::from_url_path(url.path()).map_err(|_| StoreError::BadLocation(location.to_string()))
}

/// The stores markers are read from.
#[derive(Clone, Debug)]
pub struct Stores {
    local: Arc<LocalFileSystem>,
}

impl Default for Stores {
    fn default() -> Self {
        Stores {
            local: Arc::new(LocalFileSystem::new()),
        }
    }
}

impl Stores {
    /// The landed time of the marker `marker` in the partition directory `location`, or
    /// `None` when there is no marker.
    pub async fn landed(
        &self,
        location: &str,
        marker: &str,
    ) -> Result<Option<DateTime<Utc>>, StoreError> {
        let dir = parse_location(location)?;
        let path = dir.clone().join(marker);
        let read = |source| StoreError::Read {
            path: path.to_string(),
            source,
        };
        let got = match self.local.get(&path).await {
            Ok(got) => got,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(read(e)),
        };
        let modified = got.meta.last_modified;
        if got.meta.size > MAX_MARKER_BYTES {
            return Ok(Some(modified));
        }
        let bytes = got.bytes().await.map_err(read)?;
        Ok(Some(crate::classify::marker_landed(&bytes, modified)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations() {
        assert_eq!(
            parse_location("file:///srv/gabo/r/2026-11-29/14/")
                .unwrap()
                .as_ref(),
            "srv/gabo/r/2026-11-29/14"
        );
        assert_eq!(parse_location("/srv/x/").unwrap().as_ref(), "srv/x");
        assert!(matches!(parse_location("s3://bucket/x"), Err(StoreError::Scheme(s)) if s == "s3"));
        assert!(parse_location("relative/dir").is_err());
    }

    #[tokio::test]
    async fn markers_json_empty_and_absent() {
        let dir = std::env::temp_dir().join(format!("datamon-store-{}", std::process::id()));
        let loc = format!("file://{}/", dir.display());
        std::fs::create_dir_all(&dir).unwrap();
        let stores = Stores::default();
        assert_eq!(stores.landed(&loc, "_SUCCESS").await.unwrap(), None);

        std::fs::write(
            dir.join("_SUCCESS"),
            r#"{"completed_at":"2026-11-29T15:02:00Z"}"#,
        )
        .unwrap();
        assert_eq!(
            stores
                .landed(&loc, "_SUCCESS")
                .await
                .unwrap()
                .unwrap()
                .to_rfc3339(),
            "2026-11-29T15:02:00+00:00"
        );

        std::fs::write(dir.join("DONE"), "").unwrap();
        let mtime = stores.landed(&loc, "DONE").await.unwrap().unwrap();
        assert!((Utc::now() - mtime).num_seconds().abs() < 3600, "{mtime}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
