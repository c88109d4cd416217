//! State and history in SQLite: what each partition was last seen as, which alerts fired, and
//! the outgoing notifications (a durable queue: a restart re-sends what was not delivered).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use rusqlite::{params, Connection, OptionalExtension};

use crate::alert::{AlertState, Notice};
use crate::classify::Status;

/// SQLite failed.
#[derive(Debug, thiserror::Error)]
#[error("state database: {0}")]
pub struct StateError(#[from] rusqlite::Error);

/// What a partition was last seen as.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Seen {
    /// Its status.
    pub status: Status,
    /// When it landed, if it did.
    pub landed: Option<DateTime<Utc>>,
    /// When the checker saw this.
    pub checked_at: DateTime<Utc>,
}

/// (dataset id, partition name).
pub type Key = (String, String);

/// A queued notification.
#[derive(Clone, Debug)]
pub struct Delivery {
    /// Row id.
    pub id: i64,
    /// What to send.
    pub notice: Notice,
    /// Attempts so far.
    pub attempts: u32,
}

/// The state database.
#[derive(Debug)]
pub struct State {
    // A std Mutex: every use is a short synchronous SQLite call, never held across an await.
    conn: Mutex<Connection>,
}

const SCHEMA: &str = "
PRAGMA journal_mode = WAL;
PRAGMA synchronous = NORMAL;
CREATE TABLE IF NOT EXISTS partitions (
    dataset TEXT NOT NULL, partition TEXT NOT NULL,
    status TEXT NOT NULL, lateness_s INTEGER NOT NULL,
    landed_at TEXT, checked_at TEXT NOT NULL,
    PRIMARY KEY (dataset, partition));
CREATE TABLE IF NOT EXISTS alerts (
    dataset TEXT NOT NULL, partition TEXT NOT NULL,
    state TEXT NOT NULL, status TEXT NOT NULL,
    fired_at TEXT NOT NULL, resolved_at TEXT,
    PRIMARY KEY (dataset, partition));
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    dataset TEXT NOT NULL, partition TEXT NOT NULL, state TEXT NOT NULL, status TEXT NOT NULL,
    lateness_s INTEGER NOT NULL, starts_at TEXT NOT NULL, ends_at TEXT,
    team TEXT NOT NULL, url TEXT NOT NULL,
    queued_at TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    next_at TEXT NOT NULL, delivered_at TEXT, last_error TEXT);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (delivered_at, next_at);
";

fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn parse_ts(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.to_utc())
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

fn status_from(name: &str, lateness: i64) -> Status {
    match name {
        "on_time" => Status::OnTime,
        "late" => Status::Late {
            by_seconds: lateness,
        },
        "missing" => Status::Missing {
            overdue_seconds: lateness,
        },
        _ => Status::Pending,
    }
}

impl State {
    /// Opens (creating) the database; `:memory:` for a throwaway one.
    pub fn open(path: &Path) -> Result<State, StateError> {
        let conn = Connection::open(path)?;
        conn.execute_batch(SCHEMA)?;
        Ok(State {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().expect("state lock poisoned")
    }

    /// Everything seen so far.
    pub fn partitions(&self) -> Result<HashMap<Key, Seen>, StateError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT dataset, partition, status, lateness_s, landed_at, checked_at FROM partitions",
        )?;
        let rows = stmt.query_map([], |r| {
            let status: String = r.get(2)?;
            let landed: Option<String> = r.get(4)?;
            let checked: String = r.get(5)?;
            Ok((
                (r.get(0)?, r.get(1)?),
                Seen {
                    status: status_from(&status, r.get(3)?),
                    landed: landed.as_deref().map(parse_ts),
                    checked_at: parse_ts(&checked),
                },
            ))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Writes changed partitions in one transaction.
    pub fn save_partitions<'a>(
        &self,
        changed: impl IntoIterator<Item = (&'a Key, &'a Seen)>,
    ) -> Result<(), StateError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO partitions (dataset, partition, status, lateness_s, landed_at, checked_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (dataset, partition) DO UPDATE SET status = ?3, lateness_s = ?4,
                   landed_at = ?5, checked_at = ?6",
            )?;
            for ((d, p), s) in changed {
                stmt.execute(params![
                    d,
                    p,
                    s.status.name(),
                    s.status.lateness_seconds(),
                    s.landed.map(ts),
                    ts(s.checked_at)
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Alert state of every partition that ever fired.
    pub fn alerts(&self) -> Result<HashMap<Key, AlertState>, StateError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT dataset, partition, state FROM alerts")?;
        let rows = stmt.query_map([], |r| {
            let s: String = r.get(2)?;
            Ok(((r.get(0)?, r.get(1)?), s))
        })?;
        let mut out = HashMap::new();
        for row in rows {
            let (k, s) = row?;
            if let Some(s) = AlertState::from_name(&s) {
                out.insert(k, s);
            }
        }
        Ok(out)
    }

    /// Records alert transitions and queues their notifications, in one transaction, so a
    /// crash cannot record a firing without its notification or the reverse.
    pub fn record_alerts(
        &self,
        transitions: &[(Key, AlertState, String)],
        notices: &[Notice],
        now: DateTime<Utc>,
    ) -> Result<(), StateError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        for ((d, p), state, status) in transitions {
            match state {
                AlertState::Firing => tx.execute(
                    "INSERT INTO alerts (dataset, partition, state, status, fired_at)
                     VALUES (?1, ?2, 'firing', ?3, ?4)",
                    params![d, p, status, ts(now)],
                )?,
                AlertState::Resolved => tx.execute(
                    "INSERT INTO alerts (dataset, partition, state, status, fired_at, resolved_at)
                     VALUES (?1, ?2, 'resolved', ?3, ?4, ?4)
                     ON CONFLICT (dataset, partition) DO UPDATE SET state = 'resolved', status = ?3,
                       resolved_at = ?4",
                    params![d, p, status, ts(now)],
                )?,
            };
        }
        for n in notices {
            tx.execute(
                "INSERT INTO deliveries (dataset, partition, state, status, lateness_s, starts_at,
                   ends_at, team, url, queued_at, next_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?10)",
                params![
                    n.dataset,
                    n.partition,
                    n.state.name(),
                    n.status,
                    n.lateness_seconds,
                    ts(n.starts_at),
                    n.ends_at.map(ts),
                    n.team,
                    n.url,
                    ts(now)
                ],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Undelivered notifications due at `now`, oldest first, at most `limit`.
    pub fn due(&self, now: DateTime<Utc>, limit: usize) -> Result<Vec<Delivery>, StateError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, dataset, partition, state, status, lateness_s, starts_at, ends_at, team, url,
               attempts FROM deliveries WHERE delivered_at IS NULL AND next_at <= ?1
             ORDER BY id LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![ts(now), limit as i64], |r| {
            let state: String = r.get(3)?;
            let starts: String = r.get(6)?;
            let ends: Option<String> = r.get(7)?;
            Ok(Delivery {
                id: r.get(0)?,
                notice: Notice {
                    dataset: r.get(1)?,
                    partition: r.get(2)?,
                    state: AlertState::from_name(&state).unwrap_or(AlertState::Firing),
                    status: r.get(4)?,
                    lateness_seconds: r.get(5)?,
                    starts_at: parse_ts(&starts),
                    ends_at: ends.as_deref().map(parse_ts),
                    team: r.get(8)?,
                    url: r.get(9)?,
                },
                attempts: r.get(10)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The earliest `next_at` of an undelivered notification, if any.
    pub fn next_due(&self) -> Result<Option<DateTime<Utc>>, StateError> {
        let next: Option<String> = self
            .conn()
            .query_row(
                "SELECT MIN(next_at) FROM deliveries WHERE delivered_at IS NULL",
                [],
                |r| r.get(0),
            )
            .optional()?
            .flatten();
        Ok(next.as_deref().map(parse_ts))
    }

    /// Marks a notification delivered.
    pub fn delivered(&self, id: i64, at: DateTime<Utc>) -> Result<(), StateError> {
        self.conn().execute(
            "UPDATE deliveries SET delivered_at = ?2, attempts = attempts + 1 WHERE id = ?1",
            params![id, ts(at)],
        )?;
        Ok(())
    }

    /// Records a failed attempt and when to try again.
    pub fn failed(&self, id: i64, next: DateTime<Utc>, error: &str) -> Result<(), StateError> {
        self.conn().execute(
            "UPDATE deliveries SET attempts = attempts + 1, next_at = ?2, last_error = ?3 WHERE id = ?1",
            params![id, ts(next), error],
        )?;
        Ok(())
    }
}
