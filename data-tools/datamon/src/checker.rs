//! One checker pass: every dataset × its window of partitions → markers read → classified →
//! state saved → alert transitions recorded and their notifications queued.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use serde::Serialize;

use crate::alert::{self, AlertState, Notice, Transition};
use crate::classify::{self, Status};
use crate::decl::{DeclSet, Declarations};
use crate::partition::Partition;
use crate::state::{Key, Seen, State, StateError};
use crate::store::Stores;

/// Default number of partitions looked back per dataset: two days of hours.
pub const DEFAULT_WINDOW: usize = 48;

/// Markers read at once. Enough to keep the blocking pool busy on a local disk (and requests
/// in flight on an object store) without opening thousands of files at a time: the machine
/// allows 20,000 open files per process.
pub const READ_CONCURRENCY: usize = 64;

/// One partition in a pass's result.
#[derive(Clone, Debug, Serialize)]
pub struct Cell {
    /// Partition name.
    pub partition: String,
    /// Its status (`status` plus `by_seconds`/`overdue_seconds`).
    #[serde(flatten)]
    pub status: Status,
    /// When it landed.
    pub landed_at: Option<DateTime<Utc>>,
    /// When it was due.
    pub deadline: DateTime<Utc>,
}

/// One dataset's row.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// Dataset id.
    pub dataset: String,
    /// Owner team.
    pub team: String,
    /// Cells, oldest first.
    pub cells: Vec<Cell>,
}

/// The result of a pass: what the views show.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Snapshot {
    /// `now` of the pass.
    pub checked_at: Option<DateTime<Utc>>,
    /// Rows by dataset id.
    pub rows: BTreeMap<String, Row>,
    /// Markers that could not be read (the partition is classified as not landed).
    pub errors: Vec<String>,
    /// Wall time of the pass.
    pub run_seconds: f64,
}

impl Snapshot {
    /// Counts per status name over all cells.
    pub fn counts(&self) -> BTreeMap<&'static str, usize> {
        let mut c = BTreeMap::new();
        for row in self.rows.values() {
            for cell in &row.cells {
                *c.entry(cell.status.name()).or_default() += 1;
            }
        }
        c
    }

    /// Whether any partition is late or missing.
    pub fn any_bad(&self) -> bool {
        self.rows
            .values()
            .any(|r| r.cells.iter().any(|c| c.status.is_bad()))
    }
}

/// Runs passes; keeps what was seen in memory and in SQLite.
#[derive(Debug)]
pub struct Checker {
    decls: Declarations,
    stores: Stores,
    state: Arc<State>,
    window: usize,
    alerts_enabled: bool,
    fallback_webhook: Option<String>,
    seen: Mutex<HashMap<Key, Seen>>,
    fired: Mutex<HashMap<Key, AlertState>>,
    latest: RwLock<Arc<Snapshot>>,
}

impl Checker {
    /// A checker over `decls`, restoring what `state` has seen. With `alerts_enabled` false
    /// (`datamon status`), passes neither save nor alert.
    pub fn new(
        decls: Declarations,
        stores: Stores,
        state: Arc<State>,
        window: usize,
        alerts_enabled: bool,
    ) -> Result<Checker, StateError> {
        let seen = state.partitions()?;
        let fired = state.alerts()?;
        Ok(Checker {
            decls,
            stores,
            state,
            window: window.max(1),
            alerts_enabled,
            fallback_webhook: None,
            seen: Mutex::new(seen),
            fired: Mutex::new(fired),
            latest: RwLock::new(Arc::new(Snapshot::default())),
        })
    }

    /// Sends alerts of owners without a webhook to `url`.
    pub fn with_fallback_webhook(mut self, url: Option<String>) -> Checker {
        self.fallback_webhook = url;
        self
    }

    /// The declarations it checks.
    pub fn declarations(&self) -> &Declarations {
        &self.decls
    }

    /// The marker reader.
    pub fn stores(&self) -> &Stores {
        &self.stores
    }

    /// The state database.
    pub fn state(&self) -> &Arc<State> {
        &self.state
    }

    /// The last pass's result.
    pub fn latest(&self) -> Arc<Snapshot> {
        self.latest.read().expect("lock poisoned").clone()
    }

    /// One pass at `now`. Returns the snapshot and how many notifications it queued.
    pub async fn pass(&self, now: DateTime<Utc>) -> Result<(Arc<Snapshot>, usize), StateError> {
        let started = Instant::now();
        let set: Arc<DeclSet> = self.decls.current();

        // What to look at, and which markers to read: a landed partition's marker is final
        // and is not read again (most of a steady-state pass is skipped this way).
        let mut plan: Vec<(usize, Partition, Option<DateTime<Utc>>)> = Vec::new();
        let datasets: Vec<_> = set.datasets.values().collect();
        {
            let seen = self.seen.lock().expect("lock poisoned");
            for (i, d) in datasets.iter().enumerate() {
                for p in d.partitioning.window(now, self.window) {
                    let known = seen
                        .get(&(d.id.clone(), p.name()))
                        .filter(|s| s.status.is_landed())
                        .and_then(|s| s.landed);
                    plan.push((i, p, known));
                }
            }
        }
        let stores = &self.stores;
        let read = futures_util::stream::iter(plan.into_iter().map(|(i, p, known)| {
            let d = datasets[i];
            async move {
                let landed = match known {
                    Some(at) => Ok(Some(at)),
                    None => stores.landed(&p.render(&d.location), &d.marker).await,
                };
                (i, p, landed)
            }
        }))
        .buffered(READ_CONCURRENCY)
        .collect::<Vec<_>>()
        .await;

        let mut snapshot = Snapshot {
            checked_at: Some(now),
            ..Snapshot::default()
        };
        let mut changed: Vec<(Key, Seen)> = Vec::new();
        let mut transitions: Vec<(Key, AlertState, String)> = Vec::new();
        let mut notices: Vec<Notice> = Vec::new();
        {
            let mut seen = self.seen.lock().expect("lock poisoned");
            let fired = self.fired.lock().expect("lock poisoned");
            // Only the window is kept in memory: partitions that left it are forgotten here
            // (SQLite keeps them as history), so memory stays datasets × window.
            let mut next_seen = HashMap::with_capacity(read.len());
            for (i, p, landed) in read {
                let d = datasets[i];
                let landed = landed.unwrap_or_else(|e| {
                    snapshot.errors.push(format!("{} {}: {e}", d.id, p.name()));
                    None
                });
                let status = classify::classify(&p, d.sla, landed, now);
                let deadline = classify::deadline(&p, d.sla);
                let key = (d.id.clone(), p.name());
                let new = Seen {
                    status,
                    landed,
                    checked_at: now,
                };
                if seen
                    .get(&key)
                    .is_none_or(|s| s.status != status || s.landed != landed)
                {
                    changed.push((key.clone(), new));
                }
                next_seen.insert(key.clone(), new);
                let t = alert::transition(fired.get(&key).copied(), &status);
                if t != Transition::None {
                    let last = if t == Transition::Fire {
                        AlertState::Firing
                    } else {
                        AlertState::Resolved
                    };
                    transitions.push((key.clone(), last, status.name().to_string()));
                    notices.extend(Notice::for_transition(
                        t,
                        self.fallback_webhook.as_deref(),
                        d,
                        &key.1,
                        &status,
                        deadline,
                        landed,
                    ));
                }
                snapshot
                    .rows
                    .entry(d.id.clone())
                    .or_insert_with(|| Row {
                        dataset: d.id.clone(),
                        team: d.owner.team.clone(),
                        cells: Vec::new(),
                    })
                    .cells
                    .push(Cell {
                        partition: key.1,
                        status,
                        landed_at: landed,
                        deadline,
                    });
            }
            *seen = next_seen;
        }
        let queued = if self.alerts_enabled {
            self.state
                .save_partitions(changed.iter().map(|(k, s)| (k, s)))?;
            self.state.record_alerts(&transitions, &notices, now)?;
            let mut fired = self.fired.lock().expect("lock poisoned");
            for (k, s, _) in transitions {
                fired.insert(k, s);
            }
            notices.len()
        } else {
            0
        };
        for e in &snapshot.errors {
            tracing::warn!(error = %e, "marker could not be read");
        }
        snapshot.run_seconds = started.elapsed().as_secs_f64();
        crate::metrics::record_pass(&snapshot);
        let snapshot = Arc::new(snapshot);
        *self.latest.write().expect("lock poisoned") = snapshot.clone();
        Ok((snapshot, queued))
    }
}
