//! Alerts: when to fire and resolve (pure), and the Alertmanager-compatible JSON.
//!
//! One firing per partition, when it is first seen late or missing, and one resolve, when it
//! has landed after having fired. A partition first seen already landed late gets both at
//! once, so its owner still hears of it. After the resolve, nothing more for that partition.

use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use crate::classify::Status;
use crate::decl::Dataset;

/// Where a partition's alert stands (kept in SQLite).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AlertState {
    /// Fired, not yet resolved.
    Firing,
    /// Fired and resolved: final.
    Resolved,
}

impl AlertState {
    /// Stored name.
    pub fn name(self) -> &'static str {
        match self {
            AlertState::Firing => "firing",
            AlertState::Resolved => "resolved",
        }
    }

    /// From the stored name.
    pub fn from_name(s: &str) -> Option<AlertState> {
        match s {
            "firing" => Some(AlertState::Firing),
            "resolved" => Some(AlertState::Resolved),
            _ => None,
        }
    }
}

/// What to send for a partition after a check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    /// Nothing.
    None,
    /// Send a firing alert.
    Fire,
    /// Send a resolve.
    Resolve,
    /// First seen already landed late: send a firing, then its resolve.
    FireAndResolve,
}

/// The alert decision: previous alert state and the new status → what to send.
pub fn transition(previous: Option<AlertState>, status: &Status) -> Transition {
    match (previous, status) {
        (None, Status::Missing { .. }) => Transition::Fire,
        (None, Status::Late { .. }) => Transition::FireAndResolve,
        (Some(AlertState::Firing), s) if s.is_landed() => Transition::Resolve,
        _ => Transition::None,
    }
}

/// One notification, as queued and stored.
#[derive(Clone, Debug, PartialEq)]
pub struct Notice {
    /// Dataset id.
    pub dataset: String,
    /// Partition name.
    pub partition: String,
    /// Firing or resolved.
    pub state: AlertState,
    /// `missing` or `late` (what made it fire; for a resolve, what it landed as).
    pub status: String,
    /// Seconds late or overdue.
    pub lateness_seconds: i64,
    /// The partition's deadline: when the problem started.
    pub starts_at: DateTime<Utc>,
    /// When it landed (resolves only).
    pub ends_at: Option<DateTime<Utc>>,
    /// Owner's team.
    pub team: String,
    /// Where to POST.
    pub url: String,
}

impl Notice {
    /// The notices for a transition, to the owner's webhook, else to `fallback`; none when
    /// neither is set.
    pub fn for_transition(
        t: Transition,
        fallback: Option<&str>,
        dataset: &Dataset,
        partition: &str,
        status: &Status,
        deadline: DateTime<Utc>,
        landed: Option<DateTime<Utc>>,
    ) -> Vec<Notice> {
        let Some(url) = dataset
            .owner
            .webhook
            .as_deref()
            .or(fallback)
            .map(str::to_string)
        else {
            return Vec::new();
        };
        let lateness = status.lateness_seconds();
        let notice = |state, status: &str| Notice {
            dataset: dataset.id.clone(),
            partition: partition.to_string(),
            state,
            status: status.to_string(),
            lateness_seconds: lateness,
            starts_at: deadline,
            ends_at: if state == AlertState::Resolved {
                landed
            } else {
                None
            },
            team: dataset.owner.team.clone(),
            url: url.clone(),
        };
        match t {
            Transition::None => vec![],
            Transition::Fire => vec![notice(AlertState::Firing, status.name())],
            Transition::Resolve => vec![notice(AlertState::Resolved, status.name())],
            Transition::FireAndResolve => vec![
                notice(AlertState::Firing, status.name()),
                notice(AlertState::Resolved, status.name()),
            ],
        }
    }

    fn labels(&self) -> Value {
        json!({
            "alertname": if self.status == "missing" { "DatasetMissing" } else { "DatasetLate" },
            "dataset": self.dataset,
            "partition": self.partition,
            "team": self.team,
            "severity": "warning",
            "source": "datamon",
        })
    }

    fn alert(&self, base_url: &str) -> Value {
        let summary = match (self.state, self.status.as_str()) {
            (AlertState::Firing, "missing") => format!(
                "{} {} is missing: past its deadline, no success marker",
                self.dataset, self.partition
            ),
            (AlertState::Firing, _) => format!(
                "{} {} landed late, {} s after its deadline",
                self.dataset, self.partition, self.lateness_seconds
            ),
            (AlertState::Resolved, _) => format!(
                "{} {} has landed ({} s after its deadline)",
                self.dataset, self.partition, self.lateness_seconds
            ),
        };
        json!({
            "status": self.state.name(),
            "labels": self.labels(),
            "annotations": {
                "summary": summary,
                "lateness_seconds": self.lateness_seconds.to_string(),
            },
            "startsAt": self.starts_at.to_rfc3339(),
            // Alertmanager's "no end" is the zero time.
            "endsAt": self.ends_at.map(|t| t.to_rfc3339()).unwrap_or_else(|| "0001-01-01T00:00:00Z".to_string()),
            "generatorURL": format!("{base_url}/explain/{}/{}", self.dataset, self.partition),
            "fingerprint": format!("{}/{}", self.dataset, self.partition),
        })
    }

    /// The request body: Alertmanager's webhook receiver JSON (`version: "4"`), or, for a URL
    /// ending in `/api/v2/alerts`, the alert list Alertmanager itself accepts.
    pub fn body(&self, base_url: &str) -> Value {
        let alert = self.alert(base_url);
        if self.url.trim_end_matches('/').ends_with("/api/v2/alerts") {
            let mut a = alert;
            let obj = a.as_object_mut().expect("object");
            obj.remove("status");
            obj.remove("fingerprint");
            return json!([a]);
        }
        json!({
            "version": "4",
            "groupKey": format!("{{}}:{{dataset=\"{}\",partition=\"{}\"}}", self.dataset, self.partition),
            "truncatedAlerts": 0,
            "status": self.state.name(),
            "receiver": self.team,
            "groupLabels": { "dataset": self.dataset, "partition": self.partition },
            "commonLabels": self.labels(),
            "commonAnnotations": alert["annotations"].clone(),
            "externalURL": base_url,
            "alerts": [alert],
        })
    }
}

/// Delay before retry number `attempt` (1-based): 1 s doubling to at most 5 minutes, so a
/// receiver that is down for an hour gets about a dozen tries, not thousands.
pub fn backoff(attempt: u32) -> std::time::Duration {
    let secs = 1u64 << attempt.saturating_sub(1).min(9);
    std::time::Duration::from_secs(secs.min(300))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_firing_and_one_resolve() {
        let missing = Status::Missing { overdue_seconds: 5 };
        let late = Status::Late { by_seconds: 5 };
        assert_eq!(transition(None, &Status::Pending), Transition::None);
        assert_eq!(transition(None, &Status::OnTime), Transition::None);
        assert_eq!(transition(None, &missing), Transition::Fire);
        assert_eq!(
            transition(Some(AlertState::Firing), &missing),
            Transition::None
        );
        assert_eq!(
            transition(Some(AlertState::Firing), &late),
            Transition::Resolve
        );
        assert_eq!(
            transition(Some(AlertState::Firing), &Status::OnTime),
            Transition::Resolve
        );
        assert_eq!(
            transition(Some(AlertState::Resolved), &late),
            Transition::None
        );
        assert_eq!(
            transition(Some(AlertState::Resolved), &missing),
            Transition::None
        );
        assert_eq!(transition(None, &late), Transition::FireAndResolve);
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let s: Vec<u64> = (1..=12).map(|a| backoff(a).as_secs()).collect();
        assert_eq!(s, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
    }
}
