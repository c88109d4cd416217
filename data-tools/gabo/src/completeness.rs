//! The completeness rule, without I/O: an hour is complete when every partition of the type's
//! topic has been consumed past the hour's end plus a grace period.
//!
//! A partition's *watermark* is how far its consumption is known to have reached in receive
//! time: the receive time of the newest event consumed from it, or, when the writer has read
//! to the partition's end, the time at which it saw that end (nothing older can still be
//! waiting in it). The gateway stamps the receive time *before* it produces, so an event
//! stamped inside the hour can reach Kafka up to the producer's delivery timeout later; the
//! grace period must be at least that timeout (the defaults are 2 min and 30 s), and then a
//! watermark past `end + grace` proves nothing of the hour is still on its way.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::hour::Hour;

/// What the completionist knows about one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Watermark {
    /// The partition.
    pub partition: i32,
    /// How far its consumption has reached in receive time.
    pub reached: DateTime<Utc>,
}

/// Why an hour is not complete yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incomplete {
    /// These partitions have no watermark at all (never consumed or never reported); empty
    /// when the topic's partition count is not known.
    Unknown(Vec<i32>),
    /// The slowest partition and how far it has reached; the hour needs `needed`.
    Behind {
        /// The slowest partition.
        partition: i32,
        /// Its watermark.
        reached: DateTime<Utc>,
        /// `end + grace`.
        needed: DateTime<Utc>,
    },
}

impl std::fmt::Display for Incomplete {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Incomplete::Unknown(p) if p.is_empty() => {
                write!(f, "the topic's partition count is not known yet")
            }
            Incomplete::Unknown(p) => write!(f, "no watermark yet for partitions {p:?}"),
            Incomplete::Behind {
                partition,
                reached,
                needed,
            } => write!(
                f,
                "partition {partition} has reached {} and must pass {}",
                reached.to_rfc3339(),
                needed.to_rfc3339()
            ),
        }
    }
}

/// Whether `hour` is complete for a topic of `partitions` partitions given `marks`.
pub fn is_complete(
    hour: Hour,
    grace: Duration,
    partitions: i32,
    marks: &[Watermark],
) -> Result<(), Incomplete> {
    let needed = hour.end() + chrono::Duration::from_std(grace).unwrap_or(chrono::Duration::MAX);
    if partitions < 1 {
        // A topic without partitions proves nothing (its metadata was not read yet).
        return Err(Incomplete::Unknown(Vec::new()));
    }
    let missing: Vec<i32> = (0..partitions)
        .filter(|p| !marks.iter().any(|m| m.partition == *p))
        .collect();
    if !missing.is_empty() {
        return Err(Incomplete::Unknown(missing));
    }
    let slowest = marks
        .iter()
        .filter(|m| m.partition < partitions)
        .min_by_key(|m| m.reached)
        .expect("partitions >= 1 and none missing, so partition 0 has a mark");
    if slowest.reached < needed {
        return Err(Incomplete::Behind {
            partition: slowest.partition,
            reached: slowest.reached,
            needed,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn mark(partition: i32, s: &str) -> Watermark {
        Watermark {
            partition,
            reached: at(s),
        }
    }

    const GRACE: Duration = Duration::from_secs(120);

    #[test]
    fn complete_when_every_partition_passed_end_plus_grace() {
        let h: Hour = "2026-11-29T14".parse().unwrap();
        let marks = [
            mark(0, "2026-11-29T15:02:00Z"),
            mark(1, "2026-11-29T16:00:00Z"),
        ];
        assert_eq!(is_complete(h, GRACE, 2, &marks), Ok(()));
    }

    #[test]
    fn one_slow_partition_holds_the_hour_open() {
        let h: Hour = "2026-11-29T14".parse().unwrap();
        let marks = [
            mark(0, "2026-11-29T16:00:00Z"),
            mark(1, "2026-11-29T15:01:59Z"),
        ];
        assert_eq!(
            is_complete(h, GRACE, 2, &marks),
            Err(Incomplete::Behind {
                partition: 1,
                reached: at("2026-11-29T15:01:59Z"),
                needed: at("2026-11-29T15:02:00Z"),
            })
        );
    }

    #[test]
    fn a_partition_never_seen_holds_the_hour_open() {
        let h: Hour = "2026-11-29T14".parse().unwrap();
        let marks = [mark(0, "2026-11-29T18:00:00Z")];
        assert_eq!(
            is_complete(h, GRACE, 3, &marks),
            Err(Incomplete::Unknown(vec![1, 2]))
        );
    }

    #[test]
    fn a_topic_of_unknown_size_holds_the_hour_open() {
        let h: Hour = "2026-11-29T14".parse().unwrap();
        let marks = [mark(0, "2026-11-29T18:00:00Z")];
        assert_eq!(
            is_complete(h, GRACE, 0, &marks),
            Err(Incomplete::Unknown(vec![]))
        );
    }
}
