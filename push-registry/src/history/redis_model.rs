//! The Redis data model of message history, shared by the `redis`, `redis-cluster` and `ring`
//! stores: the key, the member encoding, the Lua scripts, building their commands and decoding
//! their replies. No I/O here (the I/O is in `redis.rs`).
//!
//! One sorted set per user, `ph:{<user>}` (the braces are a Redis Cluster hash tag, as for the
//! registry's `pr:{<user>}`):
//! - every kept message is one member, scored by its ID. The member is the message as JSON
//!   with its fields in a fixed order, `{"id":N,"at_ms":T,"mid":…,"device":…,"json":…,
//!   "traceparent":…,"data":…}` (`mid`, `device` and `traceparent` only when set), so a script can read `at_ms` and find a
//!   `mid` with plain string matching instead of decoding every member;
//! - one reserved member, `~last` (the scripts' `COUNTER`), scored by the last ID given out. Keeping the counter in
//!   the same key is what lets one single-key EVAL allocate the ID, deduplicate and trim
//!   atomically: a second key (an `INCR` counter) would need a second command or a multi-key
//!   script, and Dynomite routes a script by its one key.
//!
//! - one index member per kept message that has a `mid`: `~mid:<mid as JSON>`, scored by
//!   the message's ID *negated*. Negative scores sort before every message, so the index
//!   never interleaves with the messages' ranks (scripts skip the `ZCOUNT -inf (0` index
//!   members at the front), and an append finds a duplicate `mid` with one `ZSCORE`
//!   instead of scanning the kept history. The index is trimmed with the messages, so it
//!   is bounded by the history's own limits.
//!
//! The counter's member is `~last`. It sorts after every message even when its score ties
//! with the newest message's (same score: members compare as bytes, and `~` is above the `{`
//! that every JSON member starts with), so "the first `n` ranks" are always the `n` oldest
//! messages and rank-based trims never touch the counter.
//!
//! Scores are doubles: IDs (microseconds since the epoch, about 1.7e15) are exact integers in
//! a double below 2^53 ≈ 9e15, i.e. until the year 2255. Lua numbers are doubles too; the
//! scripts format IDs with `%.0f` (exact), never with `tostring` (14 significant digits), and
//! never re-encode a member with `cjson` (it too rounds to 14 digits).
//!
//! The key expires `2 × max_age` after its last append (`PEXPIRE`, see [`key_ttl`]): by then
//! every message in it has aged out, and a user who gets nothing for a while costs nothing. The counter goes with
//! it; the next append seeds it again from the caller's clock in microseconds, which is above
//! every ID given before (see [`crate::buffer::first_id_now`]).
//!
//! Only commands Dynomite proxies are used, and only inside single-key EVALSHA or EVAL calls
//! (`script.rs` says which goes out): ZSCORE, ZCARD, ZCOUNT, ZRANGE, ZRANGEBYSCORE, ZADD,
//! ZREMRANGEBYRANK, ZREMRANGEBYSCORE, PEXPIRE.

use std::sync::LazyLock;
use std::time::Duration;

use bytes::Bytes;
use redis::Value;
use serde::{Deserialize, Serialize};

use crate::buffer::{BufferLimits, Buffered, NewMessage, Resume};
use crate::script::Lua;
use crate::{Error, Result};

/// The Redis key holding `user`'s history.
pub(crate) fn key(user: &str) -> String {
    format!("ph:{{{user}}}")
}

/// Helpers prepended to every script. ARGV positions shared by all scripts: 1 = now (ms),
/// 2 = max_age (ms), 3 = max_messages, 4 = the key's TTL after a write (ms, see [`key_ttl`]).
///
/// `first_kept(key)`: the rank of the oldest message still kept and the number of messages.
/// Kept means what [`crate::buffer::UserBuffer::trim`] keeps: at most `max_messages`, and,
/// from the oldest, none older than `max_age` (the walk stops at the first young one, as the
/// buffer's does). Reads use it to skip what an append has not trimmed yet.
const LUA_HELPERS: &str = r#"
local COUNTER = '~last'
local now, max_age, max_n = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local function at_ms(m) return tonumber(string.match(m, '^{"id":%d+,"at_ms":(%d+)')) end
local function first_kept(key)
  -- The mid index (negative scores) comes first; message ranks start after it.
  local skip = redis.call('ZCOUNT', key, '-inf', '(0')
  local n = redis.call('ZCARD', key) - skip
  if redis.call('ZSCORE', key, COUNTER) then n = n - 1 end
  local first = 0
  if n > max_n then first = n - max_n end
  while first < n do
    local t = at_ms(redis.call('ZRANGE', key, skip + first, skip + first)[1])
    -- A member we cannot read is kept, so a reader reports it rather than hiding it.
    if not t or now - t <= max_age then break end
    first = first + 1
  end
  return first, n, skip
end
local function trim(key)
  local first, _, skip = first_kept(key)
  if first > 0 then
    local gone = redis.call('ZRANGE', key, skip + first - 1, skip + first - 1, 'WITHSCORES')
    redis.call('ZREMRANGEBYRANK', key, skip, skip + first - 1)
    -- The trimmed messages' index entries: IDs up to the newest trimmed one.
    redis.call('ZREMRANGEBYSCORE', key, -tonumber(gone[2]), '(0')
  end
end
local function last_id(key)
  local s = redis.call('ZSCORE', key, COUNTER)
  if s then return tonumber(s) end
  return nil
end
"#;

/// ARGV 5: seed (µs, used when the counter is missing), 6: floor (the counter is raised to at
/// least this first; 0 normally, see the ring), 7: the `mid` index member or '', 8: the
/// member's tail (`,"mid":…` up to the closing brace).
/// Returns `{id, duplicate (0/1), member}`: the member lets the ring copy it to other racks,
/// a duplicate's too (so a retry after a partial copy completes it).
const APPEND: &str = r#"
local key = KEYS[1]
local last = last_id(key) or tonumber(ARGV[5])
local floor = tonumber(ARGV[6])
if floor > last then last = floor end
trim(key)
if ARGV[7] ~= '' then
  -- One lookup in the mid index (trimmed with the messages, so a hit is still kept).
  local s = redis.call('ZSCORE', key, ARGV[7])
  if s then
    local had = -tonumber(s)
    for _, m in ipairs(redis.call('ZRANGEBYSCORE', key, had, had)) do
      if m ~= COUNTER then return {had, 1, m} end
    end
  end
end
local id = last + 1
local member = '{"id":' .. string.format('%.0f', id) .. ',"at_ms":' .. ARGV[1] .. ARGV[8]
redis.call('ZADD', key, id, member)
redis.call('ZADD', key, id, COUNTER)
if ARGV[7] ~= '' then redis.call('ZADD', key, -id, ARGV[7]) end
trim(key)
redis.call('PEXPIRE', key, ARGV[4])
return {id, 0, member}
"#;

/// Ring copy. ARGV 5: id, 6: member, 7: its `mid` index member or ''. Idempotent: a message already kept under this ID is left
/// alone; the counter only moves up. Returns 1 if the member was added, 0 if it was there.
const APPLY: &str = r#"
local key = KEYS[1]
local id = tonumber(ARGV[5])
local have = redis.call('ZRANGEBYSCORE', key, id, id)
for _, m in ipairs(have) do
  if m ~= COUNTER then return 0 end
end
local last = last_id(key)
redis.call('ZADD', key, id, ARGV[6])
if ARGV[7] ~= '' then redis.call('ZADD', key, -id, ARGV[7]) end
if not last or last < id then redis.call('ZADD', key, id, COUNTER) end
trim(key)
redis.call('PEXPIRE', key, ARGV[4])
return 1
"#;

/// Read only. ARGV 5: after. Returns `{}` for an unknown user, else `{last, oldest kept ID or
/// 0, members with an ID above after…}`. One script, so the three parts are from one instant.
const SINCE: &str = r#"
local key = KEYS[1]
local last = last_id(key)
if not last then return {} end
local after = tonumber(ARGV[5])
if after >= last then return {last, 0} end
local first, n, skip = first_kept(key)
if first >= n then return {last, 0} end
local oldest = tonumber(redis.call('ZRANGE', key, skip + first, skip + first, 'WITHSCORES')[2])
local from = oldest
if after + 1 > from then from = after + 1 end
local out = {last, oldest}
for _, m in ipairs(redis.call('ZRANGEBYSCORE', key, from, last)) do
  if m ~= COUNTER then out[#out + 1] = m end
end
return out
"#;

/// Read only. ARGV 5…: IDs. Returns the kept members among them.
const GET: &str = r#"
local key = KEYS[1]
local first, n, skip = first_kept(key)
if first >= n then return {} end
local oldest = tonumber(redis.call('ZRANGE', key, skip + first, skip + first, 'WITHSCORES')[2])
local out = {}
for i = 5, #ARGV do
  local id = tonumber(ARGV[i])
  if id and id >= oldest then
    for _, m in ipairs(redis.call('ZRANGEBYSCORE', key, id, id)) do
      if m ~= COUNTER then out[#out + 1] = m end
    end
  end
end
return out
"#;

/// Read only: the last ID, or nothing (the ring reads it before appending on a fallback rack).
const LAST: &str = r#"
return last_id(KEYS[1])
"#;

/// `max_age` in ms, capped at 2^53: scripts hold it in a double, and PEXPIRE refuses
/// expiries that overflow (2^53 ms is about 285,000 years, so the cap never bites).
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis())
        .unwrap_or(u64::MAX)
        .min(1 << 53)
}

/// How long a user's key lives after a write: twice the age limit.
///
/// Why longer than the messages: the counter goes with the key. While it is there, a client
/// that saw everything and comes back after the messages aged out is told "nothing missed",
/// and IDs continue by one; once it is gone, the store can only answer with a cautious gap and
/// seed new IDs from the clock. One more `max_age` of a small key per idle user buys exact
/// answers for the common "phone was off for a while" case.
pub(crate) fn key_ttl(limits: BufferLimits) -> u64 {
    millis(limits.max_age).saturating_mul(2).min(1 << 53)
}

/// A script: the helpers, then `body`.
fn script(body: &str) -> Lua {
    Lua::new(format!("{LUA_HELPERS}{body}"))
}

static APPEND_LUA: LazyLock<Lua> = LazyLock::new(|| script(APPEND));
static APPLY_LUA: LazyLock<Lua> = LazyLock::new(|| script(APPLY));
static SINCE_LUA: LazyLock<Lua> = LazyLock::new(|| script(SINCE));
static GET_LUA: LazyLock<Lua> = LazyLock::new(|| script(GET));
static LAST_LUA: LazyLock<Lua> = LazyLock::new(|| script(LAST));

/// `EVALSHA <hash of helpers + body> 1 <key> now max_age max_messages ttl`, more ARGV to follow.
fn call(lua: &Lua, user: &str, now_ms: u64, limits: BufferLimits) -> redis::Cmd {
    let mut cmd = lua.call(&key(user));
    cmd.arg(now_ms)
        .arg(millis(limits.max_age))
        .arg(limits.max_messages)
        .arg(key_ttl(limits));
    cmd
}

/// The member's fields after `id` and `at_ms`, in the member's order.
#[derive(Serialize)]
struct Tail<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    mid: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    device: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    traceparent: Option<&'a str>,
    json: bool,
    data: &'a str,
}

/// A member as stored.
#[derive(Deserialize)]
struct Member {
    id: u64,
    at_ms: u64,
    #[serde(default)]
    mid: Option<String>,
    #[serde(default)]
    device: Option<String>,
    /// Absent from members written before it was kept.
    #[serde(default)]
    traceparent: Option<String>,
    json: bool,
    data: String,
}

/// Appends one message. `seed` is the caller's clock in µs (the first ID of a user the node
/// does not know is `seed + 1`); `floor` raises the counter first (0: no floor).
pub(crate) fn append_cmd(
    msg: &NewMessage<'_>,
    now_ms: u64,
    seed: u64,
    floor: u64,
    limits: BufferLimits,
) -> redis::Cmd {
    // Payloads are UTF-8 by contract (`NewMessage::data`); a stray invalid byte becomes U+FFFD
    // rather than failing the whole batch.
    let data = String::from_utf8_lossy(msg.data);
    let tail = Tail {
        mid: msg.mid,
        device: msg.device,
        traceparent: msg.traceparent,
        json: msg.json,
        data: &data,
    };
    let tail = serde_json::to_string(&tail).expect("strings and bools always serialize");
    // `{"mid":…}` → `,"mid":…}`: the script puts id and at_ms in front.
    let tail = format!(",{}", &tail[1..]);
    let needle = msg.mid.map_or(String::new(), mid_index);
    let mut cmd = call(&APPEND_LUA, msg.user, now_ms, limits);
    cmd.arg(seed).arg(floor).arg(needle).arg(tail);
    cmd
}

/// The mid index member of a message with this `mid` (see the module docs).
fn mid_index(mid: &str) -> String {
    format!(
        "~mid:{}",
        serde_json::to_string(mid).expect("a string always serializes")
    )
}

/// Copies a member appended elsewhere (ring).
pub(crate) fn apply_cmd(
    user: &str,
    id: u64,
    member: &str,
    now_ms: u64,
    limits: BufferLimits,
) -> redis::Cmd {
    // The copy gets its index entry too, so a retry on this rack finds the duplicate. A
    // member that does not decode is copied as it is (readers report it).
    let index = serde_json::from_str::<Member>(member)
        .ok()
        .and_then(|m| m.mid)
        .map_or(String::new(), |mid| mid_index(&mid));
    let mut cmd = call(&APPLY_LUA, user, now_ms, limits);
    cmd.arg(id).arg(member).arg(index);
    cmd
}

/// What a client that last saw `after` is owed (decode with [`decode_since`]).
pub(crate) fn since_cmd(user: &str, after: u64, now_ms: u64, limits: BufferLimits) -> redis::Cmd {
    let mut cmd = call(&SINCE_LUA, user, now_ms, limits);
    cmd.arg(after);
    cmd
}

/// The kept messages with these IDs (decode with [`decode_members`]).
pub(crate) fn get_cmd(user: &str, ids: &[u64], now_ms: u64, limits: BufferLimits) -> redis::Cmd {
    let mut cmd = call(&GET_LUA, user, now_ms, limits);
    for id in ids {
        cmd.arg(*id);
    }
    cmd
}

/// The user's last ID (decode with [`decode_last`]).
pub(crate) fn last_cmd(user: &str, now_ms: u64, limits: BufferLimits) -> redis::Cmd {
    call(&LAST_LUA, user, now_ms, limits)
}

/// An append's outcome as the script answered it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AppendReply {
    pub id: u64,
    pub duplicate: bool,
    /// The stored member (the earlier one for a duplicate).
    pub member: String,
}

fn corrupt(node: &str, user: &str, reason: impl Into<String>) -> Error {
    Error::Corrupt {
        node: node.to_owned(),
        user: user.to_owned(),
        reason: reason.into(),
    }
}

fn int(v: &Value) -> Option<u64> {
    match v {
        Value::Int(i) => u64::try_from(*i).ok(),
        _ => None,
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

/// Decodes [`append_cmd`]'s reply.
pub(crate) fn decode_append(node: &str, user: &str, v: &Value) -> Result<AppendReply> {
    let bad = || corrupt(node, user, format!("unexpected append reply {v:?}"));
    let Value::Array(parts) = v else {
        return Err(bad());
    };
    match parts.as_slice() {
        [id, dup, member] => Ok(AppendReply {
            id: int(id).ok_or_else(bad)?,
            duplicate: int(dup).ok_or_else(bad)? == 1,
            member: text(member).ok_or_else(bad)?,
        }),
        _ => Err(bad()),
    }
}

/// Decodes [`last_cmd`]'s reply: `None` when the node holds no counter for the user.
pub(crate) fn decode_last(node: &str, user: &str, v: &Value) -> Result<Option<u64>> {
    match v {
        Value::Nil => Ok(None),
        other => int(other)
            .map(Some)
            .ok_or_else(|| corrupt(node, user, format!("unexpected counter {other:?}"))),
    }
}

/// Decodes one member.
pub(crate) fn decode_member(node: &str, user: &str, member: &str) -> Result<Buffered> {
    let m: Member = serde_json::from_str(member)
        .map_err(|e| corrupt(node, user, format!("member {member:?}: {e}")))?;
    Ok(Buffered {
        id: m.id,
        at_ms: m.at_ms,
        mid: m.mid,
        device: m.device,
        traceparent: m.traceparent,
        json: m.json,
        data: Bytes::from(m.data),
    })
}

/// Decodes a list of members (`get`), in ID order, each ID once.
pub(crate) fn decode_members(node: &str, user: &str, v: &Value) -> Result<Vec<Buffered>> {
    let Value::Array(parts) = v else {
        return Err(corrupt(node, user, format!("unexpected reply {v:?}")));
    };
    let mut out = parts
        .iter()
        .map(|p| {
            let m = text(p).ok_or_else(|| corrupt(node, user, format!("member {p:?}")))?;
            decode_member(node, user, &m)
        })
        .collect::<Result<Vec<_>>>()?;
    out.sort_by_key(|m| m.id);
    out.dedup_by_key(|m| m.id);
    Ok(out)
}

/// Turns [`since_cmd`]'s reply into what the client is owed, by the rule of
/// [`crate::buffer::UserBuffer::since`]; `now_us` stands in for the next ID of a user the node
/// does not know (as [`crate::MemoryStore`] does).
pub(crate) fn decode_since(
    node: &str,
    user: &str,
    after: u64,
    now_us: u64,
    v: &Value,
) -> Result<Resume> {
    let bad = || corrupt(node, user, format!("unexpected since reply {v:?}"));
    let Value::Array(parts) = v else {
        return Err(bad());
    };
    let Some((last, rest)) = parts.split_first() else {
        // Unknown user: nothing kept. A client that saw something was served by a node that
        // has since forgotten the user (expiry, a restart): say so.
        return Ok(Resume {
            messages: Vec::new(),
            gap: (after != 0).then(|| now_us.max(after.saturating_add(1))),
        });
    };
    let last = int(last).ok_or_else(bad)?;
    let (oldest, members) = rest.split_first().ok_or_else(bad)?;
    let oldest = int(oldest).ok_or_else(bad)?;
    if after >= last {
        return Ok(Resume {
            messages: Vec::new(),
            gap: None,
        });
    }
    let oldest = if oldest == 0 {
        last.saturating_add(1)
    } else {
        oldest
    };
    let messages = members
        .iter()
        .map(|m| {
            let m = text(m).ok_or_else(bad)?;
            decode_member(node, user, &m)
        })
        .collect::<Result<Vec<_>>>()?;
    let gap = (after != 0 && after.saturating_add(1) < oldest).then_some(oldest);
    Ok(Resume { messages, gap })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arr(parts: Vec<Value>) -> Value {
        Value::Array(parts)
    }

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn the_member_tail_and_mid_needle_are_in_the_scripts_order() {
        let msg = NewMessage {
            user: "u",
            mid: Some("m\"1"),
            device: None,
            traceparent: None,
            json: true,
            data: b"{\"a\":1}",
        };
        let cmd = append_cmd(&msg, 5, 7, 0, BufferLimits::default());
        let args: Vec<String> = cmd
            .args_iter()
            .map(|a| match a {
                redis::Arg::Simple(b) => String::from_utf8_lossy(b).into_owned(),
                _ => String::new(),
            })
            .collect();
        assert_eq!(args[3], "ph:{u}");
        assert_eq!(args[10], r#"~mid:"m\"1""#);
        assert_eq!(args[11], r#","mid":"m\"1","json":true,"data":"{\"a\":1}"}"#);
        // What the script builds decodes back.
        let member = format!(r#"{{"id":1700000000000001,"at_ms":5{}"#, args[11]);
        let m = decode_member("n", "u", &member).unwrap();
        assert_eq!(
            (m.id, m.at_ms, m.mid.as_deref()),
            (1700000000000001, 5, Some("m\"1"))
        );
        assert_eq!(&m.data[..], b"{\"a\":1}");
    }

    #[test]
    fn since_replies_follow_the_buffer_rule() {
        let m = |id: u64| {
            bulk(&format!(
                r#"{{"id":{id},"at_ms":1,"json":false,"data":"x"}}"#
            ))
        };
        let ids = |r: &Resume| r.messages.iter().map(|m| m.id).collect::<Vec<_>>();
        // Kept 3..=5.
        let reply = |after: u64| {
            let from = (after + 1).max(3);
            let mut v = vec![Value::Int(5), Value::Int(3)];
            v.extend((from..=5).map(m));
            arr(v)
        };
        let r = decode_since("n", "u", 1, 0, &reply(1)).unwrap();
        assert_eq!((ids(&r), r.gap), (vec![3, 4, 5], Some(3)));
        let r = decode_since("n", "u", 2, 0, &reply(2)).unwrap();
        assert_eq!((ids(&r), r.gap), (vec![3, 4, 5], None));
        let r = decode_since("n", "u", 0, 0, &reply(0)).unwrap();
        assert_eq!((ids(&r), r.gap), (vec![3, 4, 5], None));
        // Nothing kept any more: the gap names the next ID.
        let none = arr(vec![Value::Int(5), Value::Int(0)]);
        let r = decode_since("n", "u", 2, 0, &none).unwrap();
        assert_eq!((ids(&r), r.gap), (vec![], Some(6)));
        let r = decode_since("n", "u", 5, 0, &none).unwrap();
        assert_eq!((ids(&r), r.gap), (vec![], None));
        // Unknown user.
        let r = decode_since("n", "u", 9, 100, &arr(vec![])).unwrap();
        assert_eq!(r.gap, Some(100));
        assert_eq!(
            decode_since("n", "u", 0, 100, &arr(vec![])).unwrap().gap,
            None
        );
    }

    #[test]
    fn foreign_members_are_reported_as_corrupt() {
        let err = decode_members("node-1", "mallory", &arr(vec![bulk("not json")])).unwrap_err();
        assert!(matches!(err, Error::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("node-1") && err.to_string().contains("mallory"));
    }
}
