//! `datamon explain DATASET PARTITION`: why a partition is late, in words.
//!
//! The words are built by a pure function ([`Explanation::build`]) from what was gathered:
//! the partition's own status, its upstream partitions' statuses, and the producing Styx
//! run's events (`GET /api/v3/status/events/{component}/{workflow}/{partition}`).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::classify::{self, Status};
use crate::decl::{Dataset, DeclSet};
use crate::http::HttpClient;
use crate::partition::{Partition, Partitioning};
use crate::store::Stores;

/// One event of a Styx workflow instance, as its status API returns it.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct StyxEvent {
    /// When it happened.
    pub timestamp: String,
    /// The event.
    pub event: StyxEventBody,
    /// The instance's state after it.
    pub state: String,
}

/// The event's body.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct StyxEventBody {
    /// `triggerExecution`, `submit`, `started`, `terminate`, `runError`, `success`, …
    #[serde(rename = "@type")]
    pub kind: String,
    /// Exit code (terminate only).
    #[serde(default)]
    pub exit_code: Option<i64>,
    /// Message (runError, info).
    #[serde(default)]
    pub message: Option<String>,
}

/// What Styx said about the producing run.
#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Producer {
    /// The dataset declares no producer.
    Undeclared,
    /// datamon was started without `--styx`.
    NotConfigured {
        /// The workflow.
        workflow: String,
    },
    /// Styx could not be reached or answered something unreadable.
    Unreachable {
        /// The workflow.
        workflow: String,
        /// Why.
        error: String,
    },
    /// Styx does not know the workflow (404).
    Unknown {
        /// The workflow.
        workflow: String,
        /// Styx's reason.
        reason: String,
    },
    /// The run's events (possibly none yet).
    Events {
        /// The workflow.
        workflow: String,
        /// Oldest first.
        events: Vec<StyxEvent>,
    },
}

/// The status of one upstream partition.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Upstream {
    /// Upstream dataset id.
    pub dataset: String,
    /// Its partition.
    pub partition: String,
    /// Its status.
    #[serde(flatten)]
    pub status: Status,
}

/// An explanation: the facts and the sentences.
#[derive(Clone, Debug, Serialize)]
pub struct Explanation {
    /// Dataset id.
    pub dataset: String,
    /// Partition name.
    pub partition: String,
    /// Owner team and contact.
    pub owner: String,
    /// Its status now.
    #[serde(flatten)]
    pub status: Status,
    /// Its deadline.
    pub deadline: DateTime<Utc>,
    /// When it landed.
    pub landed_at: Option<DateTime<Utc>>,
    /// Upstream partitions and their status.
    pub upstream: Vec<Upstream>,
    /// What Styx says.
    pub producer: Producer,
    /// The explanation, one sentence a line.
    pub lines: Vec<String>,
}

fn human(secs: i64) -> String {
    let (h, m, s) = (secs / 3600, (secs % 3600) / 60, secs % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m{s:02}s"),
        _ => format!("{h}h{m:02}m"),
    }
}

impl Explanation {
    /// Puts the facts into words. Pure.
    pub fn build(
        dataset: &Dataset,
        partition: &Partition,
        status: Status,
        landed_at: Option<DateTime<Utc>>,
        upstream: Vec<Upstream>,
        producer: Producer,
    ) -> Explanation {
        let deadline = classify::deadline(partition, dataset.sla);
        let name = partition.name();
        let mut lines = vec![match status {
            Status::OnTime => format!(
                "{} {name} landed on time at {} (deadline {}).",
                dataset.id,
                landed_at.map(|t| t.to_rfc3339()).unwrap_or_default(),
                deadline.to_rfc3339()
            ),
            Status::Late { by_seconds } => format!(
                "{} {name} landed late at {}, {} after its deadline {} (SLA {} after the period).",
                dataset.id,
                landed_at.map(|t| t.to_rfc3339()).unwrap_or_default(),
                human(by_seconds),
                deadline.to_rfc3339(),
                dataset.sla_text
            ),
            Status::Missing { overdue_seconds } => format!(
                "{} {name} is missing: no {} marker, {} past its deadline {} (SLA {} after the period).",
                dataset.id,
                dataset.marker,
                human(overdue_seconds),
                deadline.to_rfc3339(),
                dataset.sla_text
            ),
            Status::Pending => format!(
                "{} {name} is pending: not landed, due by {}.",
                dataset.id,
                deadline.to_rfc3339()
            ),
        }];
        let bad: Vec<&Upstream> = upstream
            .iter()
            .filter(|u| u.status.is_bad() || u.status == Status::Pending)
            .collect();
        if dataset.upstream.is_empty() {
            lines.push("It has no declared upstream datasets.".to_string());
        } else if bad.is_empty() {
            lines.push(format!(
                "Its upstream datasets ({}) all landed on time.",
                dataset.upstream.join(", ")
            ));
        } else {
            for u in bad {
                lines.push(match u.status {
                    Status::Late { by_seconds } => format!(
                        "Upstream {} {} landed late itself, by {}.",
                        u.dataset,
                        u.partition,
                        human(by_seconds)
                    ),
                    Status::Missing { overdue_seconds } => format!(
                        "Upstream {} {} is missing itself, {} past its deadline.",
                        u.dataset,
                        u.partition,
                        human(overdue_seconds)
                    ),
                    _ => format!("Upstream {} {} has not landed yet.", u.dataset, u.partition),
                });
            }
        }
        lines.push(match &producer {
            Producer::Undeclared => "No producer is declared, so there is no Styx run to look at.".to_string(),
            Producer::NotConfigured { workflow } => format!(
                "Styx is not configured (--styx URL), so the state of {workflow} for {name} is not known."
            ),
            Producer::Unreachable { workflow, error } => format!(
                "Styx could not be asked about {workflow} {name}: {error}."
            ),
            Producer::Unknown { workflow, reason } => format!(
                "Styx does not know the workflow {workflow}: {reason}."
            ),
            Producer::Events { workflow, events } => match events.last() {
                None => format!("Styx has no run of {workflow} for {name} yet: it was never triggered."),
                Some(last) => {
                    let mut s = format!(
                        "Styx run {workflow}/{name} is {} after its last event `{}` at {}",
                        last.state, last.event.kind, last.timestamp
                    );
                    if let Some(code) = events.iter().rev().find_map(|e| e.event.exit_code) {
                        s.push_str(&format!("; last exit code {code}"));
                    }
                    if let Some(msg) = events.iter().rev().find_map(|e| {
                        (e.event.kind == "runError").then(|| e.event.message.clone()).flatten()
                    }) {
                        s.push_str(&format!("; last error: {msg}"));
                    }
                    let tries = events.iter().filter(|e| e.event.kind == "submit").count();
                    if tries > 1 {
                        s.push_str(&format!("; {tries} attempts"));
                    }
                    s.push('.');
                    s
                }
            },
        });
        Explanation {
            dataset: dataset.id.clone(),
            partition: name,
            owner: format!("{} ({})", dataset.owner.team, dataset.owner.contact),
            status,
            deadline,
            landed_at,
            upstream,
            producer,
            lines,
        }
    }
}

/// The upstream partitions a partition depends on: the same period, cut the upstream's way
/// (a daily partition depends on its day's 24 hours; an hourly one on its day).
pub fn upstream_partitions(of: &Partition, upstream: Partitioning) -> Vec<Partition> {
    match (of.partitioning, upstream) {
        (Partitioning::Daily, Partitioning::Hourly) => (0..24)
            .map(|h| Partition {
                partitioning: upstream,
                start: of.start + chrono::Duration::hours(h),
            })
            .collect(),
        _ => vec![Partition {
            partitioning: upstream,
            start: upstream.floor(of.start),
        }],
    }
}

/// Asks Styx for a workflow instance's events.
pub async fn ask_styx(
    client: &HttpClient,
    styx: Option<&str>,
    workflow: Option<&str>,
    partition: &str,
) -> Producer {
    let Some(workflow) = workflow.map(str::to_string) else {
        return Producer::Undeclared;
    };
    let Some(base) = styx else {
        return Producer::NotConfigured { workflow };
    };
    let url = format!(
        "{}/api/v3/status/events/{workflow}/{partition}",
        base.trim_end_matches('/')
    );
    #[derive(Deserialize)]
    struct Events {
        events: Vec<StyxEvent>,
    }
    #[derive(Deserialize)]
    struct Reason {
        reason: String,
    }
    match client.get(&url).await {
        Err(error) => Producer::Unreachable {
            workflow,
            error: format!("{url}: {error}"),
        },
        Ok((200, body)) => match serde_json::from_slice::<Events>(&body) {
            Ok(e) => Producer::Events {
                workflow,
                events: e.events,
            },
            Err(e) => Producer::Unreachable {
                workflow,
                error: format!("{url}: unreadable answer: {e}"),
            },
        },
        Ok((404, body)) => Producer::Unknown {
            workflow,
            reason: serde_json::from_slice::<Reason>(&body)
                .map(|r| r.reason)
                .unwrap_or_else(|_| "404".to_string()),
        },
        Ok((code, _)) => Producer::Unreachable {
            workflow,
            error: format!("{url}: HTTP {code}"),
        },
    }
}

/// Why `explain` could not start.
#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    /// No such dataset.
    #[error("no dataset {0:?} is declared")]
    UnknownDataset(String),
    /// Bad partition name.
    #[error(transparent)]
    Partition(#[from] crate::partition::PartitionError),
}

async fn status_of(
    stores: &Stores,
    d: &Dataset,
    p: &Partition,
    now: DateTime<Utc>,
) -> (Status, Option<DateTime<Utc>>) {
    // An unreadable marker counts as not landed, like in a pass.
    let landed = stores
        .landed(&p.render(&d.location), &d.marker)
        .await
        .unwrap_or(None);
    (classify::classify(p, d.sla, landed, now), landed)
}

/// Gathers the facts (markers, upstream markers, Styx) and builds the explanation.
pub async fn explain(
    set: &DeclSet,
    stores: &Stores,
    client: &HttpClient,
    styx: Option<&str>,
    dataset: &str,
    partition: &str,
    now: DateTime<Utc>,
) -> Result<Explanation, ExplainError> {
    let d = set
        .datasets
        .get(dataset)
        .ok_or_else(|| ExplainError::UnknownDataset(dataset.to_string()))?;
    let p = d.partitioning.parse(partition)?;
    let (status, landed) = status_of(stores, d, &p, now).await;
    let mut upstream = Vec::new();
    for id in &d.upstream {
        let Some(u) = set.datasets.get(id) else {
            continue;
        };
        for up in upstream_partitions(&p, u.partitioning) {
            let (s, _) = status_of(stores, u, &up, now).await;
            upstream.push(Upstream {
                dataset: u.id.clone(),
                partition: up.name(),
                status: s,
            });
        }
    }
    let producer = ask_styx(client, styx, d.producer.as_deref(), partition).await;
    Ok(Explanation::build(
        d, &p, status, landed, upstream, producer,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decl::Owner;

    fn dataset() -> Dataset {
        Dataset {
            id: "report.delivered".into(),
            description: String::new(),
            owner: Owner {
                team: "analytics".into(),
                contact: "a@b".into(),
                webhook: None,
            },
            location: "/x/{date}/{hour}/".into(),
            partitioning: Partitioning::Hourly,
            marker: "_SUCCESS".into(),
            sla: chrono::Duration::hours(1),
            sla_text: "PT1H".into(),
            producer: Some("styx/report-delivered".into()),
            upstream: vec!["gabo.receipt".into()],
        }
    }

    #[test]
    fn missing_with_late_upstream_and_failed_run() {
        let p = Partitioning::Hourly.parse("2026-11-29T14").unwrap();
        let ev = |kind: &str, state: &str, exit: Option<i64>, msg: Option<&str>| StyxEvent {
            timestamp: "2026-11-29T15:10:00Z".into(),
            event: StyxEventBody {
                kind: kind.into(),
                exit_code: exit,
                message: msg.map(Into::into),
            },
            state: state.into(),
        };
        let e = Explanation::build(
            &dataset(),
            &p,
            Status::Missing {
                overdue_seconds: 5400,
            },
            None,
            vec![Upstream {
                dataset: "gabo.receipt".into(),
                partition: "2026-11-29T14".into(),
                status: Status::Late { by_seconds: 600 },
            }],
            Producer::Events {
                workflow: "styx/report-delivered".into(),
                events: vec![
                    ev("triggerExecution", "QUEUED", None, None),
                    ev("submit", "SUBMITTING", None, None),
                    ev("started", "RUNNING", None, None),
                    ev("terminate", "TERMINATED", Some(3), None),
                    ev("runError", "FAILED", None, Some("input bucket empty")),
                    ev("retryAfter", "QUEUED", None, None),
                ],
            },
        );
        assert!(
            e.lines[0].contains(
                "is missing: no _SUCCESS marker, 1h30m past its deadline 2026-11-29T16:00:00+00:00"
            ),
            "{:?}",
            e.lines
        );
        assert_eq!(
            e.lines[1],
            "Upstream gabo.receipt 2026-11-29T14 landed late itself, by 10m00s."
        );
        assert!(
            e.lines[2].contains("is QUEUED after its last event `retryAfter`"),
            "{}",
            e.lines[2]
        );
        assert!(
            e.lines[2].contains("last exit code 3; last error: input bucket empty"),
            "{}",
            e.lines[2]
        );
    }

    #[test]
    fn styx_not_configured_is_said_plainly() {
        let p = Partitioning::Hourly.parse("2026-11-29T14").unwrap();
        let e = Explanation::build(
            &dataset(),
            &p,
            Status::Pending,
            None,
            vec![],
            Producer::NotConfigured {
                workflow: "styx/report-delivered".into(),
            },
        );
        assert!(
            e.lines[2].starts_with("Styx is not configured"),
            "{:?}",
            e.lines
        );
    }

    #[test]
    fn daily_depends_on_its_24_hours() {
        let d = Partitioning::Daily.parse("2026-11-29").unwrap();
        let ups = upstream_partitions(&d, Partitioning::Hourly);
        assert_eq!(ups.len(), 24);
        assert_eq!(ups[23].name(), "2026-11-29T23");
        let h = Partitioning::Hourly.parse("2026-11-29T14").unwrap();
        assert_eq!(
            upstream_partitions(&h, Partitioning::Daily)[0].name(),
            "2026-11-29"
        );
    }
}
