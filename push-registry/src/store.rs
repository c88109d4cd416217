//! The Redis data model shared by the `redis`, `redis-cluster` and `ring` backends: key
//! names, the Lua scripts, and building and decoding their commands. No I/O here.
//!
//! One hash per user, `pr:{<user>}`: field `d:<device>` (or `c:<conn_id>` for device-less
//! connections) → the JSON-encoded [`Entry`] with its absolute expiry. The braces are a Redis
//! Cluster hash tag, so everything about a user lives in one slot. The key itself carries a
//! PEXPIRE at least as long as its longest-lived field, so an abandoned user disappears by
//! itself; expired fields inside a live key are skipped by readers and pruned by writers,
//! but only once the hash holds [`PRUNE_AT`] fields (see there).
//!
//! Only commands that Dynomite proxies are used: HGETALL, EVALSHA and EVAL with exactly one
//! key (whose scripts call HGET, HGETALL, HSET, HDEL, PTTL and PEXPIRE on that key), SCAN and
//! PING. Script calls are built by hash (`EVALSHA`); `script.rs` says when the text goes
//! instead. Batches are plain pipelines, never MULTI/EXEC.

use std::collections::HashMap;
use std::sync::LazyLock;
use std::time::Duration;

use crate::record::Entry;
use crate::script::Lua;
use crate::{Error, Record, Result};

/// The Redis key holding `user`'s entries.
pub(crate) fn key(user: &str) -> String {
    format!("pr:{{{user}}}")
}

/// The SCAN pattern that matches every registry key.
pub(crate) const KEY_PATTERN: &str = "pr:{*";

/// The user a registry key belongs to, if it is one.
pub(crate) fn user_of_key(key: &str) -> Option<&str> {
    key.strip_prefix("pr:{")?.strip_suffix('}')
}

/// Fields a user's hash may hold before a write that adds a field prunes the expired ones.
///
/// Pruning reads and decodes the whole hash (HGETALL): doing it on every register and
/// refresh made each write O(fields) on the shared Redis, and a user with many connections
/// made every one of their refreshes pay for all of them. Now a refresh of an existing field
/// never prunes, and a write that adds a field prunes only when the hash already holds this
/// many. Expired fields are left behind only by connections whose node died without
/// unregistering; readers skip them, the key's own PEXPIRE removes them with an abandoned
/// user, and this bound keeps an active user's hash from collecting them without end.
/// 64 is four times the default `--max-connections-per-user` of one node: a normal user's
/// hash never reaches it, so a normal user's writes never prune.
pub const PRUNE_AT: usize = 64;

/// Lua helpers prepended to the write scripts (after `PRUNE_AT`, see [`script`]).
/// `expired(e, now)`: decoded entry `e` is past its expiry. `prune`: drops expired fields of
/// the key when `field` is new and the hash holds `PRUNE_AT` fields or more (see
/// [`PRUNE_AT`]). `keep`: makes the key live at least `ttl` ms more, never shortening it.
const LUA_HELPERS: &str = r#"
local function decode(v)
  local ok, e = pcall(cjson.decode, v)
  if ok and type(e) == 'table' then return e end
  return nil
end
local function expired(e, now) return (tonumber(e.exp) or 0) <= now end
local function prune(key, now, field)
  if redis.call('HEXISTS', key, field) == 1 then return end
  if redis.call('HLEN', key) < PRUNE_AT then return end
  local all = redis.call('HGETALL', key)
  for i = 1, #all, 2 do
    local e = decode(all[i + 1])
    if e and expired(e, now) then redis.call('HDEL', key, all[i]) end
  end
end
local function keep(key, ttl)
  if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl) end
end
"#;

/// ARGV: field, value, now, ttl. Overwrites the slot: the newest registration wins.
const REGISTER: &str = r#"
local now, ttl = tonumber(ARGV[3]), tonumber(ARGV[4])
prune(KEYS[1], now, ARGV[1])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
keep(KEYS[1], ttl)
return 1
"#;

/// ARGV: field, value, now, ttl, conn_id. Writes unless a live entry (or a tombstone) of
/// another connection holds the slot; returns 1 if written (owned), 0 if superseded.
const REFRESH: &str = r#"
local now, ttl = tonumber(ARGV[3]), tonumber(ARGV[4])
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur then
  local e = decode(cur)
  if e and not expired(e, now) and (e.conn_id ~= ARGV[5] or e.del) then return 0 end
end
prune(KEYS[1], now, ARGV[1])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
keep(KEYS[1], ttl)
return 1
"#;

/// ARGV: field, conn_id, now, mode. Compare-and-delete: only if the live entry belongs to
/// conn_id. Mode `del` removes the field; `tomb` (ring) marks it deleted, keeping its expiry,
/// so read repair sees the delete as newer than a stale replica's live copy.
const UNREGISTER: &str = r#"
local now = tonumber(ARGV[3])
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if not cur then return 0 end
local e = decode(cur)
if not e or expired(e, now) or e.del or e.conn_id ~= ARGV[2] then return 0 end
if ARGV[4] == 'tomb' then
  e.del = true
  redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(e))
else
  redis.call('HDEL', KEYS[1], ARGV[1])
end
return 1
"#;

/// ARGV: field, value, now, ttl, connected_at, conn_id, del (0/1), exp. Read repair: writes
/// the value unless the slot holds a live version at least as new (see `Entry::version`).
const REPAIR: &str = r#"
local now, ttl = tonumber(ARGV[3]), tonumber(ARGV[4])
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur then
  local e = decode(cur)
  if e and not expired(e, now) then
    local have = {tonumber(e.connected_at) or 0, tostring(e.conn_id), e.del and 1 or 0, tonumber(e.exp) or 0}
    local want = {tonumber(ARGV[5]), ARGV[6], tonumber(ARGV[7]), tonumber(ARGV[8])}
    local newer = false
    for i = 1, 4 do
      if have[i] ~= want[i] then newer = have[i] < want[i]; break end
    end
    if not newer then return 0 end
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
keep(KEYS[1], ttl)
return 1
"#;

/// A write script: `PRUNE_AT`, the helpers, then `body`.
fn script(body: &str) -> Lua {
    Lua::new(format!("local PRUNE_AT = {PRUNE_AT}\n{LUA_HELPERS}{body}"))
}

static REGISTER_LUA: LazyLock<Lua> = LazyLock::new(|| script(REGISTER));
static REFRESH_LUA: LazyLock<Lua> = LazyLock::new(|| script(REFRESH));
static UNREGISTER_LUA: LazyLock<Lua> = LazyLock::new(|| script(UNREGISTER));
static REPAIR_LUA: LazyLock<Lua> = LazyLock::new(|| script(REPAIR));

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// `register` for one record.
pub(crate) fn register_cmd(record: &Record, ttl: Duration, now: u64) -> redis::Cmd {
    let mut cmd = REGISTER_LUA.call(&key(&record.user));
    cmd.arg(record.field())
        .arg(Entry::new(record, ttl, now).encode())
        .arg(now)
        .arg(millis(ttl));
    cmd
}

/// `refresh` for one record; answers 1 (owned) or 0 (superseded).
pub(crate) fn refresh_cmd(record: &Record, ttl: Duration, now: u64) -> redis::Cmd {
    let mut cmd = REFRESH_LUA.call(&key(&record.user));
    cmd.arg(record.field())
        .arg(Entry::new(record, ttl, now).encode())
        .arg(now)
        .arg(millis(ttl))
        .arg(&record.conn_id);
    cmd
}

/// How [`unregister_cmd`] removes an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Removal {
    /// HDEL the field (single copy: nothing can resurrect it).
    Delete,
    /// Leave a tombstone until the entry would have expired (replicated copies).
    Tombstone,
}

/// Compare-and-delete; answers 1 if removed.
pub(crate) fn unregister_cmd(
    user: &str,
    field: &str,
    conn_id: &str,
    now: u64,
    removal: Removal,
) -> redis::Cmd {
    let mut cmd = UNREGISTER_LUA.call(&key(user));
    cmd.arg(field).arg(conn_id).arg(now).arg(match removal {
        Removal::Delete => "del",
        Removal::Tombstone => "tomb",
    });
    cmd
}

/// Read repair: writes `entry` unless the replica holds something at least as new.
pub(crate) fn repair_cmd(field: &str, entry: &Entry, now: u64) -> redis::Cmd {
    let mut cmd = REPAIR_LUA.call(&key(&entry.record.user));
    cmd.arg(field)
        .arg(entry.encode())
        .arg(now)
        .arg(entry.exp.saturating_sub(now).max(1))
        .arg(entry.record.connected_at)
        .arg(&entry.record.conn_id)
        .arg(u8::from(entry.del))
        .arg(entry.exp);
    cmd
}

/// `HGETALL` of a user's hash.
pub(crate) fn lookup_cmd(user: &str) -> redis::Cmd {
    let mut cmd = redis::cmd("HGETALL");
    cmd.arg(key(user));
    cmd
}

/// A user's hash as HGETALL returned it.
pub(crate) type RawSlots = HashMap<String, String>;

/// Decodes a user's slots, dropping expired entries (tombstones are kept: the ring needs them).
pub(crate) fn decode_slots(
    node: &str,
    user: &str,
    raw: RawSlots,
    now: u64,
) -> Result<HashMap<String, Entry>> {
    let mut out = HashMap::with_capacity(raw.len());
    for (field, value) in raw {
        let entry: Entry = serde_json::from_str(&value).map_err(|e| Error::Corrupt {
            node: node.to_string(),
            user: user.to_string(),
            reason: format!("field {field:?}: {e}"),
        })?;
        if entry.exp > now {
            out.insert(field, entry);
        }
    }
    Ok(out)
}

/// The live records among decoded slots, in a stable order (by connection ID).
pub(crate) fn live_records(slots: &HashMap<String, Entry>, now: u64) -> Vec<Record> {
    let mut out: Vec<Record> = slots
        .values()
        .filter(|e| e.is_live(now))
        .map(|e| e.record.clone())
        .collect();
    out.sort_by(|a, b| a.conn_id.cmp(&b.conn_id));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_round_trips_to_user() {
        assert_eq!(key("alice"), "pr:{alice}");
        assert_eq!(user_of_key(&key("al{i}ce")), Some("al{i}ce"));
        assert_eq!(user_of_key("other"), None);
    }
}
