//! The writer's local staging directory: per type, per hour, one append-only NDJSON file per
//! partition (`{staging}/{type}/{date}/{hour}/p{partition}.ndjson`), plus the partitions'
//! watermarks (`{staging}/{type}/_watermarks/{partition}`).
//!
//! Closing an hour and appending to it are serialised by an exclusive `flock` on the hour's
//! `.lock` file, so a dedup in another process (Styx running `gabo dedup`) and the writer agree
//! on a single moment: the dedup writes the `_CLOSING` fence under the lock, and every append
//! checks the fence under the same lock. An append after the fence is routed to the late
//! bucket instead, so no event lands in a file the dedup has already read.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use rustix::fs::{flock, FlockOperation};

use crate::completeness::Watermark;
use crate::hour::Hour;

/// The fence file: present once a dedup has started closing the hour.
pub const FENCE: &str = "_CLOSING";

/// Where an append went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// Into the hour's staging file (fsynced).
    Staged,
    /// Nowhere: the hour is closing or closed; the caller routes the lines to the late bucket.
    Closed,
}

/// A staging directory.
#[derive(Debug, Clone)]
pub struct Staging {
    dir: PathBuf,
}

impl Staging {
    /// Opens (creates) `dir`.
    pub fn open(dir: impl Into<PathBuf>) -> std::io::Result<Self> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir)?;
        Ok(Self { dir })
    }

    /// `{staging}/{type}/{date}/{hour}`.
    pub fn hour_dir(&self, type_name: &str, hour: Hour) -> PathBuf {
        self.dir.join(type_name).join(hour.date()).join(hour.hh())
    }

    /// Appends `lines` (complete NDJSON lines) from `partition` to `hour`, then fsyncs; or
    /// reports the hour closed.
    pub fn append(
        &self,
        type_name: &str,
        hour: Hour,
        partition: i32,
        lines: &[u8],
    ) -> std::io::Result<Appended> {
        let dir = self.hour_dir(type_name, hour);
        std::fs::create_dir_all(&dir)?;
        let _lock = HourLock::take(&dir)?;
        if dir.join(FENCE).exists() {
            return Ok(Appended::Closed);
        }
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(dir.join(format!("p{partition}.ndjson")))?;
        drop_torn_tail(&f)?;
        f.write_all(lines)?;
        // Offsets are committed only after this returns: the data must be on disk first.
        f.sync_data()?;
        Ok(Appended::Staged)
    }

    /// Fences `hour` (no append lands after this returns) and lists its staging files.
    pub fn close(&self, type_name: &str, hour: Hour) -> std::io::Result<Vec<PathBuf>> {
        let dir = self.hour_dir(type_name, hour);
        std::fs::create_dir_all(&dir)?;
        {
            let _lock = HourLock::take(&dir)?;
            let f = File::create(dir.join(FENCE))?;
            f.sync_all()?;
            // A writer killed for good may have left a torn line: the dedup reads whole lines.
            for e in std::fs::read_dir(&dir)? {
                let p = e?.path();
                if p.extension().is_some_and(|x| x == "ndjson") {
                    drop_torn_tail(&OpenOptions::new().read(true).write(true).open(&p)?)?;
                }
            }
        }
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "ndjson"))
            .collect();
        files.sort();
        Ok(files)
    }

    /// Hours with a staging directory, oldest first, and whether each is fenced.
    pub fn hours(&self, type_name: &str) -> std::io::Result<Vec<(Hour, bool)>> {
        let mut out = Vec::new();
        let tdir = self.dir.join(type_name);
        let Ok(dates) = std::fs::read_dir(&tdir) else {
            return Ok(out);
        };
        for d in dates.flatten() {
            let date = d.file_name().to_string_lossy().to_string();
            let Ok(hours) = std::fs::read_dir(d.path()) else {
                continue;
            };
            for h in hours.flatten() {
                let name = format!("{date}T{}", h.file_name().to_string_lossy());
                if let Ok(hour) = name.parse::<Hour>() {
                    out.push((hour, h.path().join(FENCE).exists()));
                }
            }
        }
        out.sort();
        Ok(out)
    }

    fn marks_dir(&self, type_name: &str) -> PathBuf {
        self.dir.join(type_name).join("_watermarks")
    }

    /// Records how far `partition` has been consumed (never moves back) and how many
    /// partitions the topic has.
    pub fn set_watermark(
        &self,
        type_name: &str,
        partitions: i32,
        partition: i32,
        reached: DateTime<Utc>,
    ) -> std::io::Result<()> {
        let dir = self.marks_dir(type_name);
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(partition.to_string());
        if let Some(old) = read_time(&path) {
            if old >= reached {
                return Ok(());
            }
        }
        write_atomic(&path, reached.to_rfc3339().as_bytes())?;
        write_atomic(&dir.join("partitions"), partitions.to_string().as_bytes())
    }

    /// The topic's partition count (as the writer last saw it) and every partition's
    /// watermark; `None` before any writer ran.
    pub fn watermarks(&self, type_name: &str) -> Option<(i32, Vec<Watermark>)> {
        let dir = self.marks_dir(type_name);
        let partitions: i32 = std::fs::read_to_string(dir.join("partitions"))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let marks = (0..partitions)
            .filter_map(|p| {
                read_time(&dir.join(p.to_string())).map(|reached| Watermark {
                    partition: p,
                    reached,
                })
            })
            .collect();
        Some((partitions, marks))
    }

    /// Whether `hour` still has staging files.
    pub fn has_files(&self, type_name: &str, hour: Hour) -> bool {
        std::fs::read_dir(self.hour_dir(type_name, hour))
            .map(|d| {
                d.flatten()
                    .any(|e| e.path().extension().is_some_and(|x| x == "ndjson"))
            })
            .unwrap_or(false)
    }

    /// Removes the staging files of a closed hour (after its marker is written).
    pub fn remove_hour(&self, type_name: &str, hour: Hour) -> std::io::Result<()> {
        let dir = self.hour_dir(type_name, hour);
        for e in std::fs::read_dir(&dir)?.flatten() {
            if e.path().extension().is_some_and(|x| x == "ndjson") {
                std::fs::remove_file(e.path())?;
            }
        }
        Ok(())
    }
}

/// Cuts a staging file back to its last complete line. A writer killed during `write_all`
/// leaves part of a line at the end; its offsets were never committed, so Kafka delivers those
/// records again, and the next append would otherwise glue them onto the torn bytes.
/// Called under the hour's lock. Reads only the file's last bytes in the common case.
fn drop_torn_tail(f: &File) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let len = f.metadata()?.len();
    let mut end = len;
    let mut buf = [0u8; 4096];
    while end > 0 {
        let start = end.saturating_sub(buf.len() as u64);
        let chunk = &mut buf[..(end - start) as usize];
        f.read_exact_at(chunk, start)?;
        if let Some(i) = chunk.iter().rposition(|&b| b == b'\n') {
            let keep = start + i as u64 + 1;
            if keep != len {
                f.set_len(keep)?;
            }
            return Ok(());
        }
        end = start;
    }
    if len > 0 {
        f.set_len(0)?; // no newline at all: the file's only line is torn
    }
    Ok(())
}

fn read_time(path: &Path) -> Option<DateTime<Utc>> {
    let s = std::fs::read_to_string(path).ok()?;
    DateTime::parse_from_rfc3339(s.trim())
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_data()?;
    }
    std::fs::rename(tmp, path)
}

/// An exclusive `flock` on an hour's `.lock` file, released on drop (when the file closes).
struct HourLock(#[allow(dead_code)] File);

impl HourLock {
    fn take(dir: &Path) -> std::io::Result<Self> {
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(".lock"))?;
        flock(&f, FlockOperation::LockExclusive)?;
        Ok(Self(f))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_until_fenced_then_reports_closed() {
        let tmp = tempfile::tempdir().unwrap();
        let s = Staging::open(tmp.path()).unwrap();
        let h: Hour = "2026-11-29T14".parse().unwrap();
        assert_eq!(s.append("t", h, 0, b"a\n").unwrap(), Appended::Staged);
        assert_eq!(s.append("t", h, 1, b"b\n").unwrap(), Appended::Staged);
        assert_eq!(s.hours("t").unwrap(), vec![(h, false)]);
        let files = s.close("t", h).unwrap();
        assert_eq!(files.len(), 2);
        assert_eq!(s.append("t", h, 0, b"c\n").unwrap(), Appended::Closed);
        assert_eq!(std::fs::read_to_string(&files[0]).unwrap(), "a\n");
        assert_eq!(s.hours("t").unwrap(), vec![(h, true)]);
    }

    #[test]
    fn a_torn_line_from_a_killed_writer_is_cut_before_the_next_append_and_at_close() {
        let tmp = tempfile::tempdir().unwrap();
        let s = Staging::open(tmp.path()).unwrap();
        let h: Hour = "2026-11-29T14".parse().unwrap();
        s.append("t", h, 0, b"{\"id\":\"a\"}\n").unwrap();
        let file = s.hour_dir("t", h).join("p0.ndjson");
        // The writer died in the middle of its next write.
        let mut f = OpenOptions::new().append(true).open(&file).unwrap();
        f.write_all(b"{\"id\":\"b").unwrap();
        s.append("t", h, 0, b"{\"id\":\"b\"}\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(&file).unwrap(),
            "{\"id\":\"a\"}\n{\"id\":\"b\"}\n"
        );
        f.write_all(b"{\"id\":\"c").unwrap();
        let only = s.hour_dir("t", h).join("p1.ndjson");
        std::fs::write(&only, b"{\"id\"").unwrap();
        s.close("t", h).unwrap();
        assert_eq!(
            std::fs::read_to_string(&file).unwrap(),
            "{\"id\":\"a\"}\n{\"id\":\"b\"}\n"
        );
        assert_eq!(std::fs::read_to_string(&only).unwrap(), "");
    }

    #[test]
    fn watermarks_never_move_back() {
        let tmp = tempfile::tempdir().unwrap();
        let s = Staging::open(tmp.path()).unwrap();
        assert!(s.watermarks("t").is_none());
        let t1 = Utc::now();
        let t0 = t1 - chrono::Duration::hours(1);
        s.set_watermark("t", 2, 1, t1).unwrap();
        s.set_watermark("t", 2, 1, t0).unwrap();
        let (n, marks) = s.watermarks("t").unwrap();
        assert_eq!(n, 2);
        assert_eq!(marks.len(), 1);
        assert_eq!(marks[0].partition, 1);
        assert_eq!(marks[0].reached.timestamp(), t1.timestamp());
    }
}
