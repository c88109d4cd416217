//! Hourly partitions (`2026-11-29T14`, UTC) and where each one lives: the bucket layout shared
//! with Datamon and Styx (`{root}/{type}/{date}/{hour}/part-0.parquet` + `_SUCCESS`) and the
//! late bucket (`{root}/{type}/_late/{date}/{hour}/`).

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, NaiveDate, TimeZone, Timelike, Utc};

/// Name of the success marker, written last.
pub const MARKER: &str = "_SUCCESS";
/// Name of the (first) Parquet part of a bucket.
pub const PART0: &str = "part-0.parquet";

/// One UTC hour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Hour {
    start: DateTime<Utc>,
}

/// A string that is not an hour partition name.
#[derive(Debug, thiserror::Error)]
#[error("`{0}` is not an hour: expected YYYY-MM-DDTHH (UTC), e.g. 2026-11-29T14")]
pub struct BadHour(pub String);

impl Hour {
    /// The hour that contains `t`.
    pub fn containing(t: DateTime<Utc>) -> Self {
        let start = t
            .with_minute(0)
            .and_then(|t| t.with_second(0))
            .and_then(|t| t.with_nanosecond(0))
            .expect("an hour start always exists in UTC");
        Self { start }
    }

    /// First instant of the hour.
    pub fn start(self) -> DateTime<Utc> {
        self.start
    }

    /// First instant after the hour.
    pub fn end(self) -> DateTime<Utc> {
        self.start + chrono::Duration::hours(1)
    }

    /// `2026-11-29`.
    pub fn date(self) -> String {
        self.start.format("%Y-%m-%d").to_string()
    }

    /// `14`.
    pub fn hh(self) -> String {
        self.start.format("%H").to_string()
    }

    /// `{type}/{date}/{hour}`: the bucket's path under the output root.
    pub fn bucket_path(self, type_name: &str) -> String {
        format!("{type_name}/{}/{}", self.date(), self.hh())
    }

    /// `{type}/_late/{date}/{hour}`: where events that arrive after the hour closed go.
    pub fn late_path(self, type_name: &str) -> String {
        format!("{type_name}/_late/{}/{}", self.date(), self.hh())
    }
}

impl fmt::Display for Hour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.start.format("%Y-%m-%dT%H"))
    }
}

impl FromStr for Hour {
    type Err = BadHour;

    fn from_str(s: &str) -> Result<Self, BadHour> {
        let bad = || BadHour(s.to_string());
        let (d, h) = s.split_once('T').ok_or_else(bad)?;
        if h.len() != 2 || d.len() != 10 {
            return Err(bad());
        }
        let date = NaiveDate::parse_from_str(d, "%Y-%m-%d").map_err(|_| bad())?;
        let hour: u32 = h.parse().map_err(|_| bad())?;
        let naive = date.and_hms_opt(hour, 0, 0).ok_or_else(bad)?;
        Ok(Self {
            start: Utc.from_utc_datetime(&naive),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_paths_follow_the_contract() {
        let t = DateTime::parse_from_rfc3339("2026-11-29T14:59:59.999Z")
            .unwrap()
            .with_timezone(&Utc);
        let h = Hour::containing(t);
        assert_eq!(h.to_string(), "2026-11-29T14");
        assert_eq!(h.bucket_path("clicks"), "clicks/2026-11-29/14");
        assert_eq!(h.late_path("clicks"), "clicks/_late/2026-11-29/14");
        assert_eq!(h.end().to_rfc3339(), "2026-11-29T15:00:00+00:00");
        assert_eq!("2026-11-29T14".parse::<Hour>().unwrap(), h);
    }

    #[test]
    fn bad_names_are_refused() {
        for s in [
            "2026-11-29",
            "2026-11-29T24",
            "2026-11-29T4",
            "x",
            "2026-13-01T00",
        ] {
            assert!(s.parse::<Hour>().is_err(), "{s}");
        }
    }
}
