//! Partitions: the periods a dataset is cut into, their names and the location template.
//!
//! Pure: UTC only. A partition is named after the start of its period (`2026-11-29T14` for the
//! hour 14:00–15:00 UTC, `2026-11-29` for the day), the names every data tool shares.
//! UTC periods have no daylight-saving gaps or repeats: every hour exists once.

use chrono::{DateTime, Duration, NaiveDate, NaiveDateTime, NaiveTime, Timelike, Utc};
use serde::{Deserialize, Serialize};

/// How a dataset is cut into partitions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Partitioning {
    /// One partition per UTC hour.
    Hourly,
    /// One partition per UTC day.
    Daily,
}

impl Partitioning {
    /// Length of one period.
    pub fn period(self) -> Duration {
        match self {
            Partitioning::Hourly => Duration::hours(1),
            Partitioning::Daily => Duration::days(1),
        }
    }

    /// Start of the period that contains `t`.
    pub fn floor(self, t: DateTime<Utc>) -> DateTime<Utc> {
        let date = t.date_naive();
        let time = match self {
            Partitioning::Hourly => NaiveTime::from_hms_opt(t.hour(), 0, 0).expect("valid hour"),
            Partitioning::Daily => NaiveTime::MIN,
        };
        NaiveDateTime::new(date, time).and_utc()
    }

    /// The `count` most recent partitions whose period has started at `now`, oldest first.
    /// The partition that contains `now` is the last one (it is `pending` until its deadline).
    pub fn window(self, now: DateTime<Utc>, count: usize) -> Vec<Partition> {
        let last = self.floor(now);
        (0..count)
            .rev()
            .map(|back| Partition {
                partitioning: self,
                start: last - self.period() * back as i32,
            })
            .collect()
    }

    /// Parses a partition name of this partitioning.
    pub fn parse(self, name: &str) -> Result<Partition, PartitionError> {
        let bad = || PartitionError {
            name: name.to_string(),
            partitioning: self,
        };
        let start = match self {
            Partitioning::Hourly => {
                let (d, h) = name.split_once('T').ok_or_else(bad)?;
                let date = NaiveDate::parse_from_str(d, "%Y-%m-%d").map_err(|_| bad())?;
                if h.len() != 2 {
                    return Err(bad());
                }
                let hour: u32 = h.parse().map_err(|_| bad())?;
                let time = NaiveTime::from_hms_opt(hour, 0, 0).ok_or_else(bad)?;
                NaiveDateTime::new(date, time).and_utc()
            }
            Partitioning::Daily => NaiveDate::parse_from_str(name, "%Y-%m-%d")
                .map_err(|_| bad())?
                .and_time(NaiveTime::MIN)
                .and_utc(),
        };
        Ok(Partition {
            partitioning: self,
            start,
        })
    }
}

/// A partition name that does not fit the dataset's partitioning.
#[derive(Debug, thiserror::Error)]
#[error("partition {name:?} is not a {partitioning:?} partition name (hourly: 2026-11-29T14, daily: 2026-11-29)")]
pub struct PartitionError {
    /// The name given.
    pub name: String,
    /// The partitioning it was read as.
    pub partitioning: Partitioning,
}

/// One period of a dataset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Partition {
    /// Hourly or daily.
    pub partitioning: Partitioning,
    /// Start of the period (UTC).
    pub start: DateTime<Utc>,
}

impl Partition {
    /// End of the period: the SLA counts from here.
    pub fn end(&self) -> DateTime<Utc> {
        self.start + self.partitioning.period()
    }

    /// The shared name: `2026-11-29T14` or `2026-11-29`.
    pub fn name(&self) -> String {
        match self.partitioning {
            Partitioning::Hourly => self.start.format("%Y-%m-%dT%H").to_string(),
            Partitioning::Daily => self.start.format("%Y-%m-%d").to_string(),
        }
    }

    /// Fills a location template: `{date}` → `2026-11-29`, `{hour}` → `14` (daily
    /// partitions have no hour; a daily template that names `{hour}` is refused at load time).
    pub fn render(&self, template: &str) -> String {
        template
            .replace("{date}", &self.start.format("%Y-%m-%d").to_string())
            .replace("{hour}", &self.start.format("%H").to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().to_utc()
    }

    #[test]
    fn hourly_window_ends_with_the_current_hour_and_crosses_midnight() {
        let w = Partitioning::Hourly.window(t("2026-11-30T01:59:59Z"), 3);
        let names: Vec<_> = w.iter().map(Partition::name).collect();
        assert_eq!(names, ["2026-11-29T23", "2026-11-30T00", "2026-11-30T01"]);
    }

    #[test]
    fn window_edge_exactly_on_the_hour_starts_a_new_partition() {
        let w = Partitioning::Hourly.window(t("2026-11-30T02:00:00Z"), 1);
        assert_eq!(w[0].name(), "2026-11-30T02");
        assert_eq!(w[0].end(), t("2026-11-30T03:00:00Z"));
    }

    #[test]
    fn daily_window_and_month_edge() {
        let w = Partitioning::Daily.window(t("2026-12-01T00:30:00Z"), 2);
        let names: Vec<_> = w.iter().map(Partition::name).collect();
        assert_eq!(names, ["2026-11-30", "2026-12-01"]);
    }

    #[test]
    fn utc_periods_are_24_hours_across_european_dst_change() {
        // 2026-10-25 is the day Europe leaves summer time; in UTC it still has 24 hours.
        let w = Partitioning::Hourly.window(t("2026-10-26T00:00:00Z"), 25);
        assert_eq!(w[0].name(), "2026-10-25T00");
        assert_eq!(w.len(), 25);
        let unique: std::collections::HashSet<_> = w.iter().map(Partition::name).collect();
        assert_eq!(unique.len(), 25);
    }

    #[test]
    fn names_parse_back_and_bad_names_are_refused() {
        let p = Partitioning::Hourly.parse("2026-11-29T14").unwrap();
        assert_eq!(p.name(), "2026-11-29T14");
        assert_eq!(
            Partitioning::Daily.parse("2026-11-29").unwrap().name(),
            "2026-11-29"
        );
        for bad in ["2026-11-29T24", "2026-11-29", "2026-11-29T1", "x"] {
            assert!(Partitioning::Hourly.parse(bad).is_err(), "{bad}");
        }
        assert!(Partitioning::Daily.parse("2026-11-29T14").is_err());
    }

    #[test]
    fn template_is_filled() {
        let p = Partitioning::Hourly.parse("2026-11-29T04").unwrap();
        assert_eq!(
            p.render("file:///d/gabo/receipt/{date}/{hour}/"),
            "file:///d/gabo/receipt/2026-11-29/04/"
        );
    }
}
