//! Workflows: what to run, on which schedule, with which limits. Read from YAML, keyed by
//! (component, id).
//!
//! A workflow's runs are named by partition: the start of the period they cover, written
//! `2026-11-29T14` (hourly), `2026-11-29` (daily, weekly, monthly, yearly) or
//! `2026-11-29T14:05` (cron). The run for a period is triggered when the period ends, plus the
//! workflow's `offset`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use chrono::{
    DateTime, Datelike, Duration as ChronoDuration, NaiveDate, NaiveDateTime, TimeZone, Timelike,
    Utc,
};
use serde::{Deserialize, Serialize};

use crate::duration::iso;
use crate::retry::RetryPolicy;

/// A workflow's key: `component/id`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct WorkflowId {
    /// The owning component (team or service).
    pub component: String,
    /// The workflow's name within the component.
    pub id: String,
}

impl fmt::Display for WorkflowId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.component, self.id)
    }
}

/// One run target: a workflow and a partition (`component/workflow/parameter`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct InstanceKey {
    /// The workflow.
    pub workflow: WorkflowId,
    /// The partition.
    pub parameter: String,
}

impl fmt::Display for InstanceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.workflow, self.parameter)
    }
}

/// When a workflow runs.
#[derive(Debug, Clone)]
pub enum Schedule {
    /// Every hour; partitions `2026-11-29T14`.
    Hourly,
    /// Every day; partitions `2026-11-29`.
    Daily,
    /// Every week from Monday; partitions are the Monday's date.
    Weekly,
    /// Every month; partitions are the 1st's date.
    Monthly,
    /// Every year; partitions are 1 January's date.
    Yearly,
    /// A 5-field cron expression (UTC); partitions `2026-11-29T14:05`.
    Cron(String, Box<croner::Cron>),
}

impl FromStr for Schedule {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "hourly" | "@hourly" => Schedule::Hourly,
            "daily" | "@daily" => Schedule::Daily,
            "weekly" | "@weekly" => Schedule::Weekly,
            "monthly" | "@monthly" => Schedule::Monthly,
            "yearly" | "@yearly" | "annually" => Schedule::Yearly,
            _ => {
                if s.split_whitespace().count() != 5 {
                    return Err(format!(
                        "invalid schedule {s:?}: use hourly, daily, weekly, monthly, yearly or a 5-field cron expression"
                    ));
                }
                let cron = croner::Cron::from_str(s)
                    .map_err(|e| format!("invalid cron expression {s:?}: {e}"))?;
                Schedule::Cron(s.trim().to_string(), Box::new(cron))
            }
        })
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Schedule::Hourly => "hourly",
            Schedule::Daily => "daily",
            Schedule::Weekly => "weekly",
            Schedule::Monthly => "monthly",
            Schedule::Yearly => "yearly",
            Schedule::Cron(s, _) => s,
        })
    }
}

impl Serialize for Schedule {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Schedule {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        crate::duration::parsed_str(
            d,
            "a schedule such as hourly or a cron expression",
            str::parse,
        )
    }
}

fn midnight(d: NaiveDate) -> DateTime<Utc> {
    Utc.from_utc_datetime(&d.and_hms_opt(0, 0, 0).expect("midnight exists"))
}

impl Schedule {
    /// The start of the period that contains `t`.
    pub fn floor(&self, t: DateTime<Utc>) -> DateTime<Utc> {
        let d = t.date_naive();
        match self {
            Schedule::Hourly => t
                .with_minute(0)
                .and_then(|t| t.with_second(0))
                .and_then(|t| t.with_nanosecond(0))
                .expect("an hour start exists in UTC"),
            Schedule::Daily => midnight(d),
            Schedule::Weekly => {
                midnight(d - ChronoDuration::days(d.weekday().num_days_from_monday() as i64))
            }
            Schedule::Monthly => midnight(d.with_day(1).expect("day 1 exists")),
            Schedule::Yearly => {
                midnight(NaiveDate::from_ymd_opt(d.year(), 1, 1).expect("1 January exists"))
            }
            Schedule::Cron(_, cron) => cron.find_previous_occurrence(&t, true).unwrap_or(t),
        }
    }

    /// The start of the period after the one starting at `start`.
    pub fn next(&self, start: DateTime<Utc>) -> DateTime<Utc> {
        match self {
            Schedule::Hourly => start + ChronoDuration::hours(1),
            Schedule::Daily => start + ChronoDuration::days(1),
            Schedule::Weekly => start + ChronoDuration::days(7),
            Schedule::Monthly => {
                let d = start.date_naive();
                let (y, m) = if d.month() == 12 {
                    (d.year() + 1, 1)
                } else {
                    (d.year(), d.month() + 1)
                };
                midnight(NaiveDate::from_ymd_opt(y, m, 1).expect("day 1 exists"))
            }
            Schedule::Yearly => {
                midnight(NaiveDate::from_ymd_opt(start.year() + 1, 1, 1).expect("1 January exists"))
            }
            // An expression that never fires again leaves the period open forever.
            Schedule::Cron(_, cron) => cron
                .find_next_occurrence(&start, false)
                .unwrap_or(DateTime::<Utc>::MAX_UTC),
        }
    }

    /// The partition name of the period starting at `start`.
    pub fn partition(&self, start: DateTime<Utc>) -> String {
        match self {
            Schedule::Hourly => start.format("%Y-%m-%dT%H").to_string(),
            Schedule::Cron(..) => start.format("%Y-%m-%dT%H:%M").to_string(),
            _ => start.format("%Y-%m-%d").to_string(),
        }
    }

    /// Reads a partition name back into its period start; refuses names that are not the
    /// start of one of this schedule's periods.
    pub fn parse_partition(&self, p: &str) -> Result<DateTime<Utc>, String> {
        let t = match self {
            Schedule::Hourly => NaiveDateTime::parse_from_str(&format!("{p}:00"), "%Y-%m-%dT%H:%M")
                .map(|t| Utc.from_utc_datetime(&t)),
            Schedule::Cron(..) => NaiveDateTime::parse_from_str(p, "%Y-%m-%dT%H:%M")
                .map(|t| Utc.from_utc_datetime(&t)),
            _ => NaiveDate::parse_from_str(p, "%Y-%m-%d").map(midnight),
        }
        .map_err(|_| {
            format!(
                "partition {p:?} does not match schedule {self} (e.g. {})",
                self.partition(Utc::now())
            )
        })?;
        if self.floor(t) != t || self.partition(t) != p {
            return Err(format!(
                "partition {p:?} is not the start of a {self} period"
            ));
        }
        Ok(t)
    }
}

/// What to do with periods missed while the scheduler was down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CatchUp {
    /// Trigger every missed period (Styx's behaviour).
    #[default]
    All,
    /// Trigger only the most recent missed period.
    Latest,
}

/// A host directory made visible inside the sandbox (the only way a job sees files other
/// than its work dir and the read-only system).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mount {
    /// The host path.
    pub source: String,
    /// The path inside the sandbox.
    pub target: String,
    /// Read-write when true; read-only by default.
    #[serde(default)]
    pub writable: bool,
}

/// A workflow as declared in YAML. Unknown fields are refused.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workflow {
    /// The owning component.
    pub component: String,
    /// The workflow's ID within the component.
    pub id: String,
    /// `hourly`, `daily`, `weekly`, `monthly`, `yearly` or a 5-field cron expression (UTC).
    pub schedule: Schedule,
    /// How long past the end of a period its run waits (ISO-8601, e.g. `PT1H`).
    #[serde(default, with = "iso")]
    pub offset: Duration,
    /// The program to run (inside the sandbox: an absolute path or one on its PATH).
    pub command: String,
    /// Its arguments; `{}` is replaced by the partition.
    #[serde(default)]
    pub args: Vec<String>,
    /// Extra environment (besides `STYX_*`).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// A run still `RUNNING` after this is killed and counted as a failure.
    #[serde(default = "default_running_timeout", with = "iso")]
    pub running_timeout: Duration,
    /// Retry rules; Styx's defaults.
    #[serde(default)]
    pub retry: RetryPolicy,
    /// Named resources a run holds (each has a concurrency limit).
    #[serde(default)]
    pub resources: Vec<String>,
    /// Container image for the Kubernetes runner.
    #[serde(default)]
    pub image: Option<String>,
    /// CPU request and limit for the Kubernetes runner (e.g. `500m`).
    #[serde(default)]
    pub cpu: Option<String>,
    /// Memory request and limit for the Kubernetes runner (e.g. `256Mi`).
    #[serde(default)]
    pub memory: Option<String>,
    /// Host directories the local runner shows the job.
    #[serde(default)]
    pub mounts: Vec<Mount>,
    /// Missed periods after downtime: `all` or `latest`.
    #[serde(default)]
    pub catch_up: CatchUp,
    /// Disabled workflows get no natural triggers (manual ones still work).
    #[serde(default = "yes")]
    pub enabled: bool,
}

fn default_running_timeout() -> Duration {
    // Styx's default: a day covers the longest daily job; a stuck job is freed by the next day.
    Duration::from_secs(24 * 3600)
}

fn yes() -> bool {
    true
}

/// A workflow file that could not be read. Nothing was changed.
#[derive(Debug, thiserror::Error)]
pub enum WorkflowError {
    /// The file could not be read.
    #[error("{file}: {source}")]
    Io {
        /// The file.
        file: String,
        /// Why.
        source: std::io::Error,
    },
    /// Bad YAML, a missing or unknown field, a bad value; `message` names the field.
    #[error("{file}:{line}:{column}: {message}")]
    Invalid {
        /// The file (or `<request>` for an API body).
        file: String,
        /// 1-based line, 0 when unknown.
        line: usize,
        /// 1-based column, 0 when unknown.
        column: usize,
        /// What is wrong, with the field's path.
        message: String,
    },
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 100
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && s != "."
        && s != ".."
}

impl Workflow {
    /// The workflow's key.
    pub fn key(&self) -> WorkflowId {
        WorkflowId {
            component: self.component.clone(),
            id: self.id.clone(),
        }
    }

    /// Parses one workflow from YAML; `file` names the source in errors.
    pub fn from_yaml(file: &str, text: &str) -> Result<Workflow, WorkflowError> {
        let wf: Workflow = serde_yaml_ng::from_str(text).map_err(|e| {
            let (line, column) = e
                .location()
                .map(|l| (l.line(), l.column()))
                .unwrap_or((0, 0));
            // The position leads the message (`file:line:column: field: what`), so the
            // library's trailing copy of it goes.
            let message = e.to_string();
            let message = message
                .strip_suffix(&format!(" at line {line} column {column}"))
                .unwrap_or(&message)
                .to_string();
            WorkflowError::Invalid {
                file: file.to_string(),
                line,
                column,
                message,
            }
        })?;
        // Names become path segments (URLs, log dirs): checked here, with the field's line.
        for (field, value) in [("component", &wf.component), ("id", &wf.id)] {
            if !valid_name(value) {
                let line = text
                    .lines()
                    .position(|l| l.trim_start().starts_with(&format!("{field}:")))
                    .map_or(0, |i| i + 1);
                return Err(WorkflowError::Invalid {
                    file: file.to_string(),
                    line,
                    column: 1,
                    message: format!(
                        "{field}: {value:?} must be 1-100 characters of A-Z a-z 0-9 - _ ."
                    ),
                });
            }
        }
        Ok(wf)
    }

    /// Reads one workflow file.
    pub fn from_file(path: &Path) -> Result<Workflow, WorkflowError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| WorkflowError::Io {
            file: file.clone(),
            source,
        })?;
        let mut wf = Workflow::from_yaml(&file, &text)?;
        // Relative mount sources are relative to the file, so a checked-in example works
        // from any working directory.
        let dir = path
            .parent()
            .map(|d| {
                if d.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    d
                }
            })
            .unwrap_or(Path::new("."));
        let dir = std::fs::canonicalize(dir).map_err(|source| WorkflowError::Io {
            file: file.clone(),
            source,
        })?;
        for m in &mut wf.mounts {
            if Path::new(&m.source).is_relative() {
                let joined = dir.join(&m.source);
                m.source = std::fs::canonicalize(&joined)
                    .unwrap_or(joined)
                    .display()
                    .to_string();
            }
        }
        Ok(wf)
    }

    /// The command line for one partition: `{}` in each argument replaced by it.
    pub fn argv(&self, parameter: &str) -> Vec<String> {
        std::iter::once(self.command.clone())
            .chain(self.args.iter().map(|a| a.replace("{}", parameter)))
            .collect()
    }

    /// When the run for the period starting at `start` is due.
    pub fn trigger_time(&self, start: DateTime<Utc>) -> DateTime<Utc> {
        self.schedule.next(start)
            + ChronoDuration::from_std(self.offset).unwrap_or(ChronoDuration::zero())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    const GOOD: &str = "component: push
id: delivered-report
schedule: hourly
offset: PT5M
command: /usr/bin/sh
args: [-c, 'echo {}']
env: {A: b}
retry:
  max_cost: 3
resources: [reports]
";

    #[test]
    fn reads_a_workflow_with_defaults() {
        let wf = Workflow::from_yaml("wf.yaml", GOOD).unwrap();
        assert_eq!(wf.key().to_string(), "push/delivered-report");
        assert_eq!(wf.offset, Duration::from_secs(300));
        assert_eq!(wf.running_timeout, Duration::from_secs(86_400));
        assert_eq!(wf.retry.max_cost, 3.0);
        assert_eq!(wf.retry.missing_deps_exit_code, 20);
        assert!(wf.enabled);
        assert_eq!(wf.catch_up, CatchUp::All);
        assert_eq!(
            wf.argv("2026-11-29T14"),
            ["/usr/bin/sh", "-c", "echo 2026-11-29T14"]
        );
        assert_eq!(
            wf.trigger_time(at("2026-11-29T14:00:00Z")),
            at("2026-11-29T15:05:00Z")
        );
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let cases = [
            (
                GOOD.replace("offset: PT5M", "offset: 5 minutes"),
                4,
                "offset",
            ),
            (
                GOOD.replace("env: {A: b}", "env: {A: b}\nretires: 3"),
                8,
                "retires",
            ),
            (
                GOOD.replace("  max_cost: 3", "  max_cots: 3"),
                9,
                "max_cots",
            ),
            (
                GOOD.replace("schedule: hourly", "schedule: every hour"),
                3,
                "schedule",
            ),
            (GOOD.replace("command: /usr/bin/sh\n", ""), 0, "command"),
            (GOOD.replace("id: delivered-report", "id: ../etc"), 2, "id"),
            (
                GOOD.replace("args: [-c, 'echo {}']", "args: [-c, 'echo {}'"),
                0,
                "",
            ),
        ];
        for (text, line, field) in cases {
            let err = Workflow::from_yaml("wf.yaml", &text).unwrap_err();
            let msg = err.to_string();
            assert!(msg.starts_with("wf.yaml:"), "{msg}");
            assert!(msg.contains(field), "{field} not in {msg}");
            if line > 0 {
                assert!(
                    msg.starts_with(&format!("wf.yaml:{line}:")),
                    "line {line}: {msg}"
                );
            }
        }
    }

    #[test]
    fn periods_and_partitions() {
        let t = at("2026-11-29T14:37:12Z"); // a Sunday
        let cases: [(&str, &str, &str, &str); 6] = [
            (
                "hourly",
                "2026-11-29T14",
                "2026-11-29T15:00:00Z",
                "2026-11-29T14:00:00Z",
            ),
            (
                "daily",
                "2026-11-29",
                "2026-11-30T00:00:00Z",
                "2026-11-29T00:00:00Z",
            ),
            (
                "weekly",
                "2026-11-23",
                "2026-11-30T00:00:00Z",
                "2026-11-23T00:00:00Z",
            ),
            (
                "monthly",
                "2026-11-01",
                "2026-12-01T00:00:00Z",
                "2026-11-01T00:00:00Z",
            ),
            (
                "yearly",
                "2026-01-01",
                "2027-01-01T00:00:00Z",
                "2026-01-01T00:00:00Z",
            ),
            (
                "*/15 * * * *",
                "2026-11-29T14:30",
                "2026-11-29T14:45:00Z",
                "2026-11-29T14:30:00Z",
            ),
        ];
        for (sched, partition, next, floor) in cases {
            let s: Schedule = sched.parse().unwrap();
            let start = s.floor(t);
            assert_eq!(start, at(floor), "{sched}");
            assert_eq!(s.partition(start), partition, "{sched}");
            assert_eq!(s.next(start), at(next), "{sched}");
            assert_eq!(s.parse_partition(partition).unwrap(), start, "{sched}");
        }
        let monthly: Schedule = "monthly".parse().unwrap();
        assert_eq!(
            monthly.next(at("2026-12-01T00:00:00Z")),
            at("2027-01-01T00:00:00Z")
        );
        assert!("hourly"
            .parse::<Schedule>()
            .unwrap()
            .parse_partition("2026-11-29")
            .is_err());
        assert!(
            "weekly"
                .parse::<Schedule>()
                .unwrap()
                .parse_partition("2026-11-29")
                .is_err(),
            "not a Monday"
        );
        assert!("* * *".parse::<Schedule>().is_err());
        assert!("61 * * * *".parse::<Schedule>().is_err());
    }
}
