//! Durable state behind the [`Storage`] trait: the append-only event log (a run's state is
//! the replay of its events), workflows with their next natural trigger, backfills and
//! resources. [`SqliteStore`] is the embedded default (one SQLite file).

use std::path::Path;

use chrono::{DateTime, Utc};
use rusqlite::{params, Connection};
use serde::{Deserialize, Serialize};

use crate::state::{Event, State};
use crate::workflow::{InstanceKey, Workflow, WorkflowId};

/// A storage failure (the database, or a row it cannot read back).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite said no.
    #[error("event log: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A stored row does not parse (written by a newer version, or damaged).
    #[error("event log: unreadable row: {0}")]
    Corrupt(String),
}

/// One event as stored: where it belongs, when, and the state it led to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredEvent {
    /// Position in the log (increasing).
    pub seq: i64,
    /// The instance it moved.
    pub key: InstanceKey,
    /// When it was applied.
    pub timestamp: DateTime<Utc>,
    /// The event.
    pub event: Event,
    /// The run's state after it.
    pub state: State,
}

/// A workflow as stored: the declaration and the scheduler's cursor.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredWorkflow {
    /// The declaration.
    pub workflow: Workflow,
    /// The period start of the next natural trigger.
    pub next_natural: Option<DateTime<Utc>>,
}

/// A backfill: re-runs of a range of partitions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Backfill {
    /// `backfill-…`.
    pub id: String,
    /// The workflow.
    pub workflow: WorkflowId,
    /// First partition's period start (inclusive).
    pub start: DateTime<Utc>,
    /// End (exclusive).
    pub end: DateTime<Utc>,
    /// At most this many of its runs active at once.
    pub concurrency: u32,
    /// Newest partition first.
    pub reverse: bool,
    /// The next period start to trigger; `None` when all are triggered.
    pub next_trigger: Option<DateTime<Utc>>,
    /// Every partition has been triggered.
    pub all_triggered: bool,
    /// Halted: no new triggers, its active runs were halted.
    pub halted: bool,
    /// When it was created.
    pub created: DateTime<Utc>,
}

/// What the scheduler persists. Writes happen under the scheduler's lock, one at a time.
pub trait Storage: Send {
    /// Appends one event; returns its position.
    fn append(
        &mut self,
        key: &InstanceKey,
        at: DateTime<Utc>,
        event: &Event,
        state: State,
    ) -> Result<i64, StoreError>;
    /// All events of one instance, oldest first.
    fn events(&self, key: &InstanceKey) -> Result<Vec<StoredEvent>, StoreError>;
    /// Every event, oldest first, handed to `f` (replay).
    fn replay(&self, f: &mut dyn FnMut(StoredEvent)) -> Result<(), StoreError>;
    /// Creates or replaces a workflow.
    fn put_workflow(&mut self, wf: &StoredWorkflow) -> Result<(), StoreError>;
    /// Deletes a workflow (its events stay).
    fn delete_workflow(&mut self, id: &WorkflowId) -> Result<bool, StoreError>;
    /// All workflows.
    fn workflows(&self) -> Result<Vec<StoredWorkflow>, StoreError>;
    /// Creates or updates a backfill.
    fn put_backfill(&mut self, b: &Backfill) -> Result<(), StoreError>;
    /// All backfills.
    fn backfills(&self) -> Result<Vec<Backfill>, StoreError>;
    /// Creates or updates a resource's limit.
    fn put_resource(&mut self, id: &str, concurrency: u32) -> Result<(), StoreError>;
    /// All resources and their limits.
    fn resources(&self) -> Result<Vec<(String, u32)>, StoreError>;
    /// Starts a batch of writes (one durable commit instead of one per write).
    fn begin(&mut self) -> Result<(), StoreError> {
        Ok(())
    }
    /// Ends a batch started by [`Storage::begin`].
    fn commit(&mut self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// The SQLite event log (one file; `:memory:` for tests and benchmarks).
#[derive(Debug)]
pub struct SqliteStore {
    conn: Connection,
    in_tx: bool,
}

impl SqliteStore {
    /// Opens (or creates) the database file.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        SqliteStore::init(Connection::open(path)?)
    }

    /// A private in-memory database.
    pub fn in_memory() -> Result<SqliteStore, StoreError> {
        SqliteStore::init(Connection::open_in_memory()?)
    }

    fn init(conn: Connection) -> Result<SqliteStore, StoreError> {
        // WAL: readers never block the writer. synchronous=NORMAL: a commit survives a crash
        // of the process (what the crash test checks); a power cut may lose the last commits
        // but never corrupts the file.
        conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get::<_, String>(0))?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS events (
                seq INTEGER PRIMARY KEY AUTOINCREMENT,
                component TEXT NOT NULL, workflow TEXT NOT NULL, parameter TEXT NOT NULL,
                ts TEXT NOT NULL, event TEXT NOT NULL, state TEXT NOT NULL);
             CREATE INDEX IF NOT EXISTS events_instance ON events(component, workflow, parameter, seq);
             CREATE TABLE IF NOT EXISTS workflows (component TEXT NOT NULL, id TEXT NOT NULL, body TEXT NOT NULL,
                PRIMARY KEY (component, id));
             CREATE TABLE IF NOT EXISTS backfills (id TEXT PRIMARY KEY, body TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS resources (id TEXT PRIMARY KEY, concurrency INTEGER NOT NULL);",
        )?;
        Ok(SqliteStore { conn, in_tx: false })
    }

    fn row_to_event(row: &rusqlite::Row<'_>) -> rusqlite::Result<EventRow> {
        Ok((
            row.get(0)?,
            row.get(1)?,
            row.get(2)?,
            row.get(3)?,
            row.get(4)?,
            row.get(5)?,
            row.get(6)?,
        ))
    }

    fn decode(r: EventRow) -> Result<StoredEvent, StoreError> {
        let (seq, component, workflow, parameter, ts, event, state) = r;
        let corrupt =
            |what: &str, e: String| StoreError::Corrupt(format!("seq {seq}: {what}: {e}"));
        Ok(StoredEvent {
            seq,
            key: InstanceKey {
                workflow: WorkflowId {
                    component,
                    id: workflow,
                },
                parameter,
            },
            timestamp: DateTime::parse_from_rfc3339(&ts)
                .map_err(|e| corrupt("ts", e.to_string()))?
                .with_timezone(&Utc),
            event: serde_json::from_str(&event).map_err(|e| corrupt("event", e.to_string()))?,
            state: state.parse().map_err(|e| corrupt("state", e))?,
        })
    }
}

/// seq, component, workflow, parameter, ts, event, state.
type EventRow = (i64, String, String, String, String, String, String);

const EVENT_COLUMNS: &str = "seq, component, workflow, parameter, ts, event, state";

impl Storage for SqliteStore {
    fn append(
        &mut self,
        key: &InstanceKey,
        at: DateTime<Utc>,
        event: &Event,
        state: State,
    ) -> Result<i64, StoreError> {
        let json = serde_json::to_string(event).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let mut stmt = self.conn.prepare_cached(
            "INSERT INTO events (component, workflow, parameter, ts, event, state) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?;
        stmt.execute(params![
            key.workflow.component,
            key.workflow.id,
            key.parameter,
            at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            json,
            state.as_str()
        ])?;
        Ok(self.conn.last_insert_rowid())
    }

    fn events(&self, key: &InstanceKey) -> Result<Vec<StoredEvent>, StoreError> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE component = ?1 AND workflow = ?2 AND parameter = ?3 ORDER BY seq"
        ))?;
        let rows = stmt.query_map(
            params![key.workflow.component, key.workflow.id, key.parameter],
            Self::row_to_event,
        )?;
        rows.map(|r| Self::decode(r?)).collect()
    }

    fn replay(&self, f: &mut dyn FnMut(StoredEvent)) -> Result<(), StoreError> {
        let mut stmt = self
            .conn
            .prepare(&format!("SELECT {EVENT_COLUMNS} FROM events ORDER BY seq"))?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            f(Self::decode(Self::row_to_event(row)?)?);
        }
        Ok(())
    }

    fn put_workflow(&mut self, wf: &StoredWorkflow) -> Result<(), StoreError> {
        let body = serde_json::to_string(wf).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.conn.execute(
            "INSERT INTO workflows (component, id, body) VALUES (?1, ?2, ?3)
             ON CONFLICT (component, id) DO UPDATE SET body = excluded.body",
            params![wf.workflow.component, wf.workflow.id, body],
        )?;
        Ok(())
    }

    fn delete_workflow(&mut self, id: &WorkflowId) -> Result<bool, StoreError> {
        Ok(self.conn.execute(
            "DELETE FROM workflows WHERE component = ?1 AND id = ?2",
            params![id.component, id.id],
        )? > 0)
    }

    fn workflows(&self) -> Result<Vec<StoredWorkflow>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT body FROM workflows ORDER BY component, id")?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
        rows.map(|r| {
            serde_json::from_str(&r?).map_err(|e| StoreError::Corrupt(format!("workflow: {e}")))
        })
        .collect()
    }

    fn put_backfill(&mut self, b: &Backfill) -> Result<(), StoreError> {
        let body = serde_json::to_string(b).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.conn.execute(
            "INSERT INTO backfills (id, body) VALUES (?1, ?2) ON CONFLICT (id) DO UPDATE SET body = excluded.body",
            params![b.id, body],
        )?;
        Ok(())
    }

    fn backfills(&self) -> Result<Vec<Backfill>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT body FROM backfills ORDER BY id")?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
        rows.map(|r| {
            serde_json::from_str(&r?).map_err(|e| StoreError::Corrupt(format!("backfill: {e}")))
        })
        .collect()
    }

    fn put_resource(&mut self, id: &str, concurrency: u32) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO resources (id, concurrency) VALUES (?1, ?2)
             ON CONFLICT (id) DO UPDATE SET concurrency = excluded.concurrency",
            params![id, concurrency],
        )?;
        Ok(())
    }

    fn resources(&self) -> Result<Vec<(String, u32)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT id, concurrency FROM resources ORDER BY id")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn begin(&mut self) -> Result<(), StoreError> {
        if !self.in_tx {
            self.conn.execute_batch("BEGIN")?;
            self.in_tx = true;
        }
        Ok(())
    }

    fn commit(&mut self) -> Result<(), StoreError> {
        if self.in_tx {
            self.conn.execute_batch("COMMIT")?;
            self.in_tx = false;
        }
        Ok(())
    }
}
