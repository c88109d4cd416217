//! Lua scripts called by their SHA-1 (`EVALSHA`), with the text sent (`EVAL`) only when a node
//! does not hold the script yet, or always where the endpoint may be a Dynomite proxy. No I/O
//! here: [`crate::node`] and the cluster backends decide which form goes out.
//!
//! Why both forms. A registry script with its helpers is 0.8–1.3 KB (refresh: 1.0 KB), and a node's
//! refresh pass sends one per connection: with the text every time, a pass over 17,000 connections
//! puts ~19 MB on the wire to one Redis and its parser, against ~1.7 MB by hash. Redis keeps every
//! script it has run in its cache, so after a restart or a `SCRIPT FLUSH` a hash call answers
//! `NOSCRIPT`; the caller then sends the same command with the text ([`with_text`]), which both
//! answers and caches it again. Every script here may run twice (see `Node`), so a pipeline that
//! met `NOSCRIPT` is sent again whole.
//!
//! Behind Dynomite a write goes on to the other racks' replicas, whose answers the client
//! never sees (with Dynomite's default `DC_ONE`): a replica that restarted would answer
//! `NOSCRIPT` to every hash call, unseen, and miss every write until this side's node
//! restarted too. So `redis://` (which may be Dynomite) sends the text unless its URL says
//! `scripts=hash`; Redis Cluster and the ring talk to each node directly and see every
//! `NOSCRIPT`, so they go by hash.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use redis::{Arg, ErrorKind, RedisError, ServerErrorKind};

/// How a backend's scripts are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scripts {
    /// `EVALSHA` by the script's SHA-1, falling back to `EVAL` on `NOSCRIPT`.
    Hash,
    /// `EVAL` with the script's text every time (safe behind a replicating proxy).
    Text,
}

impl std::str::FromStr for Scripts {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "hash" => Ok(Scripts::Hash),
            "text" => Ok(Scripts::Text),
            _ => Err(()),
        }
    }
}

/// A Lua script, built once; its text is kept for the life of the process (see [`texts`]).
#[derive(Debug)]
pub(crate) struct Lua {
    /// Lowercase hex SHA-1 of the text, as `EVALSHA` and `SCRIPT LOAD` spell it.
    hash: String,
}

/// Every script's text by its hash: how [`with_text`] turns a hash call back into a text
/// call. Filled by [`Lua::new`], so no `EVALSHA` can be built whose text is not here.
fn texts() -> &'static Mutex<HashMap<String, &'static str>> {
    static TEXTS: OnceLock<Mutex<HashMap<String, &'static str>>> = OnceLock::new();
    TEXTS.get_or_init(Mutex::default)
}

impl Lua {
    /// Registers `text` (kept for the life of the process: the scripts are a fixed few,
    /// each built once in a `LazyLock`).
    pub(crate) fn new(text: String) -> Lua {
        let hash = redis::Script::new(&text).get_hash().to_string();
        let text: &'static str = Box::leak(text.into_boxed_str());
        texts()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(hash.clone(), text);
        Lua { hash }
    }

    /// `EVALSHA <hash> 1 <key>`; the caller adds ARGV.
    pub(crate) fn call(&self, key: &str) -> redis::Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(&self.hash).arg(1).arg(key);
        cmd
    }
}

/// `cmd` with the script's text in place of its hash (`EVALSHA h …` → `EVAL text …`); any
/// other command unchanged.
pub(crate) fn with_text(cmd: &redis::Cmd) -> redis::Cmd {
    let mut args = cmd.args_iter();
    let (Some(Arg::Simple(name)), Some(Arg::Simple(hash))) = (args.next(), args.next()) else {
        return cmd.clone();
    };
    if !name.eq_ignore_ascii_case(b"EVALSHA") {
        return cmd.clone();
    }
    let text = std::str::from_utf8(hash).ok().and_then(|h| {
        texts()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(h)
            .copied()
    });
    let Some(text) = text else {
        // Not one of ours: leave it as built, and let the node's answer say so.
        return cmd.clone();
    };
    let mut out = redis::cmd("EVAL");
    out.arg(text);
    for arg in args {
        match arg {
            Arg::Simple(a) => out.arg(a),
            // A cursor (SCAN's) is never a script's argument.
            _ => return cmd.clone(),
        };
    }
    out
}

/// `pipe` with every script call in its text form (see [`with_text`]).
pub(crate) fn pipeline_with_text(pipe: &redis::Pipeline) -> redis::Pipeline {
    let mut out = redis::pipe();
    for cmd in pipe.cmd_iter() {
        out.add_command(with_text(cmd));
    }
    out
}

/// The node does not hold a script called by hash (for a pipeline: its first failed command
/// did not, and the commands of one pipeline are calls of the same few scripts).
pub(crate) fn is_no_script(e: &RedisError) -> bool {
    e.kind() == ErrorKind::Server(ServerErrorKind::NoScript)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hash_call_turns_into_the_same_call_with_the_text() {
        let source = "return ARGV[1]";
        let lua = Lua::new(source.to_string());
        let mut cmd = lua.call("pr:{u}");
        cmd.arg("x").arg(7);
        let args = |c: &redis::Cmd| -> Vec<Vec<u8>> {
            c.args_iter()
                .map(|a| match a {
                    Arg::Simple(b) => b.to_vec(),
                    _ => panic!("a cursor in {c:?}"),
                })
                .collect()
        };
        // The SHA-1 Redis gives the text (`redis-cli SCRIPT LOAD 'return ARGV[1]'`).
        assert_eq!(
            args(&cmd)[..2],
            [
                b"EVALSHA".to_vec(),
                b"098e0f0d1448c0a81dafe820f66d460eb09263da".to_vec()
            ]
        );
        let text = with_text(&cmd);
        assert_eq!(
            args(&text),
            [&b"EVAL"[..], source.as_bytes(), b"1", b"pr:{u}", b"x", b"7"].map(<[u8]>::to_vec)
        );
        // Anything else goes out as it was.
        let mut get = redis::cmd("HGETALL");
        get.arg("pr:{u}");
        assert_eq!(args(&with_text(&get)), args(&get));
        let mut pipe = redis::pipe();
        pipe.add_command(cmd.clone()).add_command(get);
        let texts: Vec<_> = pipeline_with_text(&pipe).cmd_iter().map(args).collect();
        assert_eq!(texts[0], args(&text));
        assert_eq!(texts[1][0], b"HGETALL");
    }

    #[test]
    fn the_url_spells_the_two_forms() {
        assert_eq!("hash".parse(), Ok(Scripts::Hash));
        assert_eq!("text".parse(), Ok(Scripts::Text));
        assert_eq!("sha".parse::<Scripts>(), Err(()));
    }
}
