//! `memory`: the embedded default, one process's registry in a hash map.
//!
//! Expiry is lazy plus a periodic sweep rather than a timer per entry: reads skip expired
//! entries, writes prune the user they touch, and every `SWEEP_EVERY` writes (or when the
//! map is full) one pass drops every expired entry. That keeps memory bounded by live entries
//! plus at most a sweep interval's worth of garbage, with no background task to own or stop.
//!
//! Stored compactly, because a push-server node on the embedded default holds one entry per
//! open connection: a user's slots are a `Vec` (most users have one or two devices; a
//! `HashMap` per user cost about 800 bytes even for one slot), node IDs and addresses are
//! shared `Arc<str>`s (every connection of a node has the same ones), and the slot name is
//! derived from the device instead of stored. About 250 bytes per entry instead of 1 KiB,
//! measured with `bench idle-memory` (docs/BENCHMARKS.md).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::record::now_ms;
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

/// One (user, device) slot, or one device-less connection.
#[derive(Debug)]
struct Slot {
    device: Option<Box<str>>,
    node_id: Arc<str>,
    node_addr: Arc<str>,
    conn_id: Box<str>,
    connected_at: u64,
    /// Expiry, milliseconds since the Unix epoch.
    exp: u64,
}

impl Slot {
    fn is_live(&self, now: u64) -> bool {
        self.exp > now
    }

    /// Whether `record` belongs in this slot: same device, or for device-less connections,
    /// the same connection.
    fn holds(&self, device: Option<&str>, conn_id: &str) -> bool {
        match (&self.device, device) {
            (Some(a), Some(b)) => **a == *b,
            (None, None) => *self.conn_id == *conn_id,
            _ => false,
        }
    }

    fn record(&self, user: &str) -> Record {
        Record {
            user: user.to_owned(),
            device: self.device.as_deref().map(str::to_owned),
            node_id: self.node_id.to_string(),
            node_addr: self.node_addr.to_string(),
            conn_id: self.conn_id.to_string(),
            connected_at: self.connected_at,
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    /// user → slots.
    users: HashMap<Box<str>, Vec<Slot>>,
    /// Node IDs and addresses, shared by all the slots that name them.
    names: HashSet<Arc<str>>,
    /// Entries stored, expired ones included until swept.
    entries: usize,
    writes_since_sweep: usize,
}

impl Inner {
    fn sweep(&mut self, now: u64) {
        let mut entries = 0;
        self.users.retain(|_, slots| {
            slots.retain(|e| e.is_live(now));
            entries += slots.len();
            !slots.is_empty()
        });
        // Forget names no slot uses any more (a node that went away).
        self.names.retain(|n| Arc::strong_count(n) > 1);
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

    fn intern(&mut self, name: &str) -> Arc<str> {
        if let Some(n) = self.names.get(name) {
            return n.clone();
        }
        let n: Arc<str> = name.into();
        self.names.insert(n.clone());
        n
    }

    fn slot(&self, user: &str, device: Option<&str>, conn_id: &str) -> Option<&Slot> {
        self.users
            .get(user)?
            .iter()
            .find(|s| s.holds(device, conn_id))
    }

    fn put(&mut self, record: &Record, exp: u64) {
        let slot = Slot {
            device: record.device.as_deref().map(Into::into),
            node_id: self.intern(&record.node_id),
            node_addr: self.intern(&record.node_addr),
            conn_id: record.conn_id.as_str().into(),
            connected_at: record.connected_at,
            exp,
        };
        let slots = match self.users.get_mut(record.user.as_str()) {
            Some(slots) => slots,
            None => self
                .users
                .entry(record.user.as_str().into())
                .or_insert_with(|| Vec::with_capacity(1)),
        };
        match slots
            .iter_mut()
            .find(|s| s.holds(record.device.as_deref(), &record.conn_id))
        {
            Some(existing) => *existing = slot,
            None => {
                slots.push(slot);
                self.entries += 1;
            }
        }
    }
}

fn expiry(now: u64, ttl: Duration) -> u64 {
    now.saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX))
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
                    .iter()
                    .filter(|e| e.is_live(now))
                    .map(|e| e.record(user))
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
        inner.put(record, expiry(now, ttl));
        Ok(())
    }

    async fn refresh(&self, records: &[Record], ttl: Duration) -> Result<Vec<RefreshOutcome>> {
        let now = now_ms();
        let mut inner = self.lock();
        let mut out = Vec::with_capacity(records.len());
        for record in records {
            let current = inner.slot(&record.user, record.device.as_deref(), &record.conn_id);
            match current {
                Some(e) if e.is_live(now) && *e.conn_id != *record.conn_id => {
                    out.push(RefreshOutcome::Superseded);
                }
                _ => {
                    inner.reserve(now, self.max_entries)?;
                    inner.put(record, expiry(now, ttl));
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
        let Some(i) = slots.iter().position(|s| s.holds(device, conn_id)) else {
            return Ok(false);
        };
        let owned = slots[i].is_live(now) && *slots[i].conn_id == *conn_id;
        if owned {
            slots.swap_remove(i);
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
