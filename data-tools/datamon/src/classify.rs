//! The classifier: one partition, its deadline, when (if ever) it landed, and `now` → a status.
//!
//! Pure and clock-free: the checker passes `now`, tests pass any instant they like.

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};

use crate::partition::Partition;

/// What a partition is, seen at one instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "status")]
pub enum Status {
    /// Landed no later than its deadline.
    OnTime,
    /// Landed after its deadline, by `by_seconds`.
    Late {
        /// How long after the deadline it landed.
        by_seconds: i64,
    },
    /// Deadline passed, not landed; `overdue_seconds` since the deadline.
    Missing {
        /// How long past the deadline it is now.
        overdue_seconds: i64,
    },
    /// Not landed, and not yet due.
    Pending,
}

impl Status {
    /// The short name used in the API, metrics, CSS classes and the SQLite state.
    pub fn name(&self) -> &'static str {
        match self {
            Status::OnTime => "on_time",
            Status::Late { .. } => "late",
            Status::Missing { .. } => "missing",
            Status::Pending => "pending",
        }
    }

    /// Lateness in seconds: how late it landed, or how overdue it is; 0 otherwise.
    pub fn lateness_seconds(&self) -> i64 {
        match *self {
            Status::Late { by_seconds } => by_seconds,
            Status::Missing { overdue_seconds } => overdue_seconds,
            _ => 0,
        }
    }

    /// Late or missing: what an owner is warned about and `datamon check` fails on.
    pub fn is_bad(&self) -> bool {
        matches!(self, Status::Late { .. } | Status::Missing { .. })
    }

    /// Landed (on time or late): the marker is final, it is not read again.
    pub fn is_landed(&self) -> bool {
        matches!(self, Status::OnTime | Status::Late { .. })
    }
}

/// The instant a partition must have landed by: the end of its period plus the SLA.
pub fn deadline(partition: &Partition, sla: Duration) -> DateTime<Utc> {
    partition.end() + sla
}

/// Classifies one partition. `landed` is the marker's landed time when the marker exists.
pub fn classify(
    partition: &Partition,
    sla: Duration,
    landed: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Status {
    let due = deadline(partition, sla);
    match landed {
        Some(at) if at <= due => Status::OnTime,
        Some(at) => Status::Late {
            by_seconds: (at - due).num_seconds(),
        },
        None if now <= due => Status::Pending,
        None => Status::Missing {
            overdue_seconds: (now - due).num_seconds(),
        },
    }
}

/// The landed time a marker says: its JSON `completed_at` (RFC 3339) when it is a JSON object
/// with one, else the object's last-modified time (an empty `_SUCCESS` file, Hadoop style).
pub fn marker_landed(contents: &[u8], last_modified: DateTime<Utc>) -> DateTime<Utc> {
    #[derive(Deserialize)]
    struct Marker {
        completed_at: String,
    }
    serde_json::from_slice::<Marker>(contents)
        .ok()
        .and_then(|m| DateTime::parse_from_rfc3339(&m.completed_at).ok())
        .map(|t| t.to_utc())
        .unwrap_or(last_modified)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::partition::Partitioning;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().to_utc()
    }

    /// Hour 14 of 2026-11-29, SLA two hours: the deadline is 17:00.
    fn p14() -> Partition {
        Partitioning::Hourly.parse("2026-11-29T14").unwrap()
    }

    #[test]
    fn table() {
        let sla = Duration::hours(2);
        let cases: &[(&str, Option<&str>, &str, Status)] = &[
            // (case, landed, now, expected)
            (
                "not landed, period running",
                None,
                "2026-11-29T14:30:00Z",
                Status::Pending,
            ),
            (
                "not landed, exactly at the deadline",
                None,
                "2026-11-29T17:00:00Z",
                Status::Pending,
            ),
            (
                "not landed, one second past the deadline",
                None,
                "2026-11-29T17:00:01Z",
                Status::Missing { overdue_seconds: 1 },
            ),
            (
                "not landed, a day later",
                None,
                "2026-11-30T17:00:00Z",
                Status::Missing {
                    overdue_seconds: 86_400,
                },
            ),
            (
                "landed before the period ended",
                Some("2026-11-29T14:59:00Z"),
                "2026-11-29T15:00:00Z",
                Status::OnTime,
            ),
            (
                "landed exactly at the deadline",
                Some("2026-11-29T17:00:00Z"),
                "2026-11-29T18:00:00Z",
                Status::OnTime,
            ),
            (
                "landed 90 s after the deadline",
                Some("2026-11-29T17:01:30Z"),
                "2026-11-29T18:00:00Z",
                Status::Late { by_seconds: 90 },
            ),
            (
                // a clock skew between writer and checker: the marker still counts as landed
                "landed, checker clock behind the writer",
                Some("2026-11-29T16:00:00Z"),
                "2026-11-29T15:30:00Z",
                Status::OnTime,
            ),
        ];
        for (case, landed, now, want) in cases {
            let got = classify(&p14(), sla, landed.map(t), t(now));
            assert_eq!(got, *want, "{case}");
        }
    }

    #[test]
    fn marker_that_appears_late_turns_missing_into_late() {
        let sla = Duration::minutes(30);
        let p = p14();
        assert_eq!(
            classify(&p, sla, None, t("2026-11-29T16:00:00Z")),
            Status::Missing {
                overdue_seconds: 1800
            }
        );
        // The marker is written at 16:10; the next pass sees it.
        assert_eq!(
            classify(
                &p,
                sla,
                Some(t("2026-11-29T16:10:00Z")),
                t("2026-11-29T16:15:00Z")
            ),
            Status::Late { by_seconds: 2400 }
        );
    }

    #[test]
    fn daily_deadline_counts_from_the_end_of_the_day() {
        let p = Partitioning::Daily.parse("2026-11-29").unwrap();
        assert_eq!(deadline(&p, Duration::hours(6)), t("2026-11-30T06:00:00Z"));
        assert_eq!(
            classify(&p, Duration::hours(6), None, t("2026-11-30T05:59:59Z")),
            Status::Pending
        );
    }

    #[test]
    fn landed_time_from_json_marker_else_last_modified() {
        let mtime = t("2026-11-29T18:00:00Z");
        let json = br#"{"type":"receipt","hour":"2026-11-29T14","completed_at":"2026-11-29T15:04:05+01:00","accepted":3}"#;
        assert_eq!(marker_landed(json, mtime), t("2026-11-29T14:04:05Z"));
        assert_eq!(marker_landed(b"", mtime), mtime);
        assert_eq!(
            marker_landed(br#"{"completed_at":"yesterday"}"#, mtime),
            mtime
        );
        assert_eq!(marker_landed(br#"{"hour":"x"}"#, mtime), mtime);
    }
}
