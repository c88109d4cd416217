//! Per-partition contiguous completion: which offset may be committed. No I/O.
//!
//! At-least-once means a committed offset N promises that every message below N has an
//! outcome. Messages can finish out of order (a batch waits on a slow node while a later one
//! does not), so the commit point is the start of the oldest message still unfinished, never
//! simply the last one finished.

use std::collections::BTreeMap;

/// The messages of one partition that were started and not yet committable.
#[derive(Debug, Default)]
pub struct PartitionOffsets {
    /// Offset → finished. Only offsets at or above the commit point are kept.
    open: BTreeMap<i64, bool>,
    /// The next offset to commit (Kafka's convention: the first message not yet done).
    committable: Option<i64>,
}

impl PartitionOffsets {
    /// Records that the message at `offset` is being processed.
    pub fn start(&mut self, offset: i64) {
        self.open.entry(offset).or_insert(false);
    }

    /// Records that the message at `offset` has an outcome. Returns the new commit point
    /// (the offset to commit: one past the last of the contiguous finished run) if it moved.
    pub fn finish(&mut self, offset: i64) -> Option<i64> {
        if let Some(done) = self.open.get_mut(&offset) {
            *done = true;
        }
        let mut moved = None;
        while let Some(entry) = self.open.first_entry() {
            if !*entry.get() {
                break;
            }
            moved = Some(*entry.key() + 1);
            entry.remove();
        }
        if moved.is_some() {
            self.committable = moved;
        }
        moved
    }

    /// The offset that may be committed now, if any message finished.
    pub fn committable(&self) -> Option<i64> {
        self.committable
    }

    /// Messages started and not yet below the commit point.
    pub fn open(&self) -> usize {
        self.open.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_only_contiguous_completions() {
        let mut p = PartitionOffsets::default();
        for o in 10..15 {
            p.start(o);
        }
        assert_eq!(p.finish(12), None, "10 and 11 are still open");
        assert_eq!(p.finish(11), None);
        assert_eq!(p.committable(), None);
        assert_eq!(p.finish(10), Some(13), "10..=12 done: commit 13");
        assert_eq!(p.open(), 2);
        assert_eq!(p.finish(14), None);
        assert_eq!(p.finish(13), Some(15));
        assert_eq!(p.open(), 0);
        assert_eq!(p.committable(), Some(15));
    }

    #[test]
    fn gaps_in_offsets_are_fine() {
        // Compacted topics and transaction markers leave holes: only started offsets count.
        let mut p = PartitionOffsets::default();
        p.start(3);
        p.start(7);
        assert_eq!(p.finish(7), None);
        assert_eq!(p.finish(3), Some(8));
    }

    #[test]
    fn finishing_an_unknown_offset_changes_nothing() {
        let mut p = PartitionOffsets::default();
        p.start(1);
        assert_eq!(p.finish(5), None);
        assert_eq!(p.open(), 1);
    }
}
