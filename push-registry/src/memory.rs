//! `memory`: the embedded default, one process's registry in a hash map.
//!
//! Expiry is lazy plus a periodic sweep rather than a timer per entry: reads skip expired
//! entries, writes prune the user they touch, and every `SWEEP_EVERY` writes (or when the
//! map is full) one pass drops every expired entry. That keeps memory bounded by live entries
//! plus at most a sweep interval's worth of garbage, with no background task to own or stop.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::record::{field_name, now_ms, Entry};
use crate::{Error, NodePing, Record, RefreshOutcome, Registry, Result, Stats};

/// Writes between full sweeps. A sweep is O(entries); at 4096 writes apart its cost per write
/// stays small for registries of a few million entries.
const SWEEP_EVERY: usize = 4096;

/// Default bound on entries, about 1 GiB at a few hundred bytes per entry: far above one
/// push-server's connections, small enough to stop a runaway before the machine does.
pub const DEFAULT_MAX_ENTRIES: usize = 4_000_000;

/// The in-process registry. A `std` mutex, not a tokio one: it is never held across an
/// `.await`, and every critical section is a few map operations.
#[derive(Debug)]
pub struct MemoryRegistry {
    inner: Mutex<Inner>,
    max_entries: usize,
}

#[derive(Debug, Default)]
struct Inner {
    /// user → slot → entry.
    users: HashMap<String, HashMap<String, Entry>>,
    /// Entries stored, expired ones included until swept.
    entries: usize,
    writes_since_sweep: usize,
}

impl Inner {
    fn sweep(&mut self, now: u64) {
        let mut entries = 0;
        self.users.retain(|_, slots| {
            slots.retain(|_, e| e.is_live(now));
            entries += slots.len();
            !slots.is_empty()
        });
        self.entries = entries;
        self.writes_since_sweep = 0;
    }

    /// Makes room for one more entry, or says the map is full of live entries.
    fn reserve(&mut self, now: u64, max: usize) -> Result<()> {
        self.writes_since_sweep += 1;
        if self.writes_since_sweep >= SWEEP_EVERY || self.entries >= max {
            self.sweep(now);
        }
        if self.entries >= max {
            return Err(Error::Full { limit: max });
        }
        Ok(())
    }

    fn put(&mut self, user: &str, field: String, entry: Entry) {
        let slots = self.users.entry(user.to_string()).or_default();
        if slots.insert(field, entry).is_none() {
            self.entries += 1;
        }
    }
}

impl MemoryRegistry {
    /// An empty registry holding at most `max_entries` live entries.
    pub fn new(max_entries: usize) -> Self {
        MemoryRegistry {
            inner: Mutex::new(Inner::default()),
            max_entries,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain maps behind, still consistent enough to
        // serve: recover rather than poison every later call.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn live(inner: &Inner, user: &str, now: u64) -> Vec<Record> {
        let mut out: Vec<Record> = inner
            .users
            .get(user)
            .map(|slots| {
                slots
                    .values()
                    .filter(|e| e.is_live(now))
                    .map(|e| e.record.clone())
                    .collect()
            })
            .unwrap_or_default();
        out.sort_by(|a, b| a.conn_id.cmp(&b.conn_id));
        out
    }
}

impl Default for MemoryRegistry {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_ENTRIES)
    }
}

#[async_trait]
impl Registry for MemoryRegistry {
    async fn register(&self, record: &Record, ttl: Duration) -> Result<()> {
        let now = now_ms();
        let mut inner = self.lock();
        inner.reserve(now, self.max_entries)?;
        inner.put(&record.user, record.field(), Entry::new(record, ttl, now));
        Ok(())
    }

    async fn refresh(&self, records: &[Record], ttl: Duration) -> Result<Vec<RefreshOutcome>> {
        let now = now_ms();
        let mut inner = self.lock();
        let mut out = Vec::with_capacity(records.len());
        for record in records {
            let field = record.field();
            let current = inner.users.get(&record.user).and_then(|s| s.get(&field));
            match current {
                Some(e) if e.is_live(now) && e.record.conn_id != record.conn_id => {
                    out.push(RefreshOutcome::Superseded);
                }
                _ => {
                    inner.reserve(now, self.max_entries)?;
                    inner.put(&record.user, field, Entry::new(record, ttl, now));
                    out.push(RefreshOutcome::Owned);
                }
            }
        }
        Ok(out)
    }

    async fn lookup(&self, user: &str) -> Result<Vec<Record>> {
        Ok(Self::live(&self.lock(), user, now_ms()))
    }

    async fn lookup_many(&self, users: &[String]) -> Result<Vec<Vec<Record>>> {
        let now = now_ms();
        let inner = self.lock();
        Ok(users.iter().map(|u| Self::live(&inner, u, now)).collect())
    }

    async fn unregister(&self, user: &str, device: Option<&str>, conn_id: &str) -> Result<bool> {
        let now = now_ms();
        let mut inner = self.lock();
        let Some(slots) = inner.users.get_mut(user) else {
            return Ok(false);
        };
        let field = field_name(device, conn_id);
        let owned = slots
            .get(&field)
            .is_some_and(|e| e.is_live(now) && e.record.conn_id == conn_id);
        if owned {
            slots.remove(&field);
            if slots.is_empty() {
                inner.users.remove(user);
            }
            inner.entries -= 1;
        }
        Ok(owned)
    }

    async fn stats(&self) -> Result<Stats> {
        let now = now_ms();
        let inner = self.lock();
        let mut stats = Stats::default();
        for user in inner.users.keys() {
            stats.add(&Self::live(&inner, user, now));
        }
        Ok(stats)
    }

    async fn ping(&self) -> Vec<NodePing> {
        let start = Instant::now();
        drop(self.lock());
        vec![NodePing {
            node: "memory".into(),
            result: Ok(u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX)),
        }]
    }
}
