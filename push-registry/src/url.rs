//! Registry URLs → validated backend settings (parsing only; [`crate::open`] builds them).
//!
//! | URL | backend |
//! |---|---|
//! | `memory` or `memory://?max_entries=N` | [`crate::MemoryRegistry`] |
//! | `redis://[user:pass@]host:port[/db][?timeout_ms=T][&scripts=hash]` | [`crate::RedisRegistry`] |
//! | `redis-cluster://h1:p1,h2:p2,…[?timeout_ms=T]` | [`crate::ClusterRegistry`] |
//! | `ring://h1:p1,…?racks=R&read=C&write=C[&timeout_ms=T]` | [`crate::RingRegistry`] |
//!
//! `racks` is either a count (nodes are split into that many racks in the order given, so
//! `ring://a,b,c,d,e,f?racks=3` makes racks `[a,b] [c,d] [e,f]`) or one rack name per node
//! (`racks=r1,r1,r2,r2,r3,r3`). `C` is `one`, `quorum` or `safe_quorum` (default `quorum`).
//!
//! `scripts` (`redis://` only) is `text` (default: every Lua script call carries its text,
//! which a Dynomite proxy needs) or `hash` (scripts called by SHA-1, ~1.2 KB less per call; for
//! a plain Redis). Redis Cluster and the ring always call by hash; see `script.rs`.

use std::time::Duration;

use crate::node::Timeouts;
use crate::ring::Consistency;
use crate::script::Scripts;
use crate::{Error, Result};

/// A parsed registry URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendUrl {
    /// The in-process map.
    Memory {
        /// Bound on live entries.
        max_entries: usize,
    },
    /// One Redis or Dynomite endpoint.
    Redis {
        /// The URL handed to the Redis client, without our query parameters.
        url: String,
        /// Timeout per connect and per reply, in milliseconds.
        timeout_ms: Option<u64>,
        /// How its Lua scripts are sent.
        scripts: Scripts,
    },
    /// A Redis Cluster, from any of its nodes.
    Cluster {
        /// Seed nodes, `host:port`.
        nodes: Vec<String>,
        /// Timeout per connect and per reply, in milliseconds.
        timeout_ms: Option<u64>,
    },
    /// The client-side replicated ring.
    Ring {
        /// Racks in order; each is its nodes (`host:port`) in token order.
        racks: Vec<(String, Vec<String>)>,
        /// Consistency of reads.
        read: Consistency,
        /// Consistency of writes.
        write: Consistency,
        /// Timeout per connect and per reply, in milliseconds.
        timeout_ms: Option<u64>,
    },
}

/// Timeouts from an optional `timeout_ms` (both connect and response).
pub(crate) fn timeouts(timeout_ms: Option<u64>) -> Timeouts {
    match timeout_ms {
        Some(ms) => Timeouts {
            connect: Duration::from_millis(ms),
            response: Duration::from_millis(ms),
        },
        None => Timeouts::default(),
    }
}

/// `url` (or a node name, or a list of them) with every `user:pass@` replaced by `***@`, for
/// logs and error messages: a registry password must not end up in either.
pub fn redact(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((s, r)) => (Some(s), r),
        None => (None, url),
    };
    let (authority, tail) = match rest.find(['/', '?']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let nodes: Vec<String> = authority
        .split(',')
        .map(|n| match n.rsplit_once('@') {
            Some((_, host)) => format!("***@{host}"),
            None => n.to_owned(),
        })
        .collect();
    let prefix = scheme.map(|s| format!("{s}://")).unwrap_or_default();
    format!("{prefix}{}{tail}", nodes.join(","))
}

/// Parses a registry URL.
pub fn parse(url: &str) -> Result<BackendUrl> {
    let invalid = |reason: &str| Error::InvalidUrl {
        url: redact(url),
        reason: reason.to_string(),
    };
    let (scheme, rest) = match url.split_once("://") {
        Some((s, r)) => (s, r),
        None if url == "memory" => ("memory", ""),
        None => {
            return Err(invalid(
                "expected memory, redis://, redis-cluster:// or ring://",
            ))
        }
    };
    let (authority, query) = rest.split_once('?').unwrap_or((rest, ""));
    let mut params = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| invalid(&format!("query parameter {pair:?} has no value")))?;
        params.push((k, v));
    }
    let mut take = |name: &str| -> Option<&str> {
        let i = params.iter().position(|(k, _)| *k == name)?;
        Some(params.remove(i).1)
    };
    let number = |name: &str, v: Option<&str>| -> Result<Option<u64>> {
        v.map(|v| {
            v.parse::<u64>()
                .map_err(|_| invalid(&format!("{name} must be a number, got {v:?}")))
        })
        .transpose()
    };
    let timeout_ms = number("timeout_ms", take("timeout_ms"))?;
    let nodes = || -> Result<Vec<String>> {
        let nodes: Vec<String> = authority
            .split(',')
            .filter(|n| !n.is_empty())
            .map(str::to_string)
            .collect();
        if nodes.is_empty() {
            return Err(invalid("no nodes given"));
        }
        if let Some(bad) = nodes.iter().find(|n| !n.contains(':')) {
            return Err(invalid(&format!("node {bad:?} is not host:port")));
        }
        Ok(nodes)
    };
    let parsed = match scheme {
        "memory" => BackendUrl::Memory {
            max_entries: number("max_entries", take("max_entries"))?
                .map(|n| usize::try_from(n).unwrap_or(usize::MAX))
                .unwrap_or(crate::memory::DEFAULT_MAX_ENTRIES),
        },
        "redis" => {
            if authority.is_empty() {
                return Err(invalid("no host:port given"));
            }
            let scripts = match take("scripts") {
                None => Scripts::Text,
                Some(v) => v
                    .parse()
                    .map_err(|()| invalid(&format!("scripts must be hash or text, got {v:?}")))?,
            };
            BackendUrl::Redis {
                url: format!("redis://{authority}"),
                timeout_ms,
                scripts,
            }
        }
        "redis-cluster" => BackendUrl::Cluster {
            nodes: nodes()?,
            timeout_ms,
        },
        "ring" => {
            let nodes = nodes()?;
            let consistency = |v: Option<&str>| -> Result<Consistency> {
                v.map_or(Ok(Consistency::Quorum), |v| {
                    v.parse()
                        .map_err(|_| invalid(&format!("unknown consistency {v:?}")))
                })
            };
            let read = consistency(take("read"))?;
            let write = consistency(take("write"))?;
            let racks = racks(&nodes, take("racks").unwrap_or("1")).map_err(|r| invalid(&r))?;
            BackendUrl::Ring {
                racks,
                read,
                write,
                timeout_ms,
            }
        }
        other => return Err(invalid(&format!("unknown scheme {other:?}"))),
    };
    if let Some((k, _)) = params.first() {
        return Err(invalid(&format!("unknown query parameter {k:?}")));
    }
    Ok(parsed)
}

/// Splits nodes into racks by a count or by one rack name per node.
fn racks(nodes: &[String], spec: &str) -> std::result::Result<Vec<(String, Vec<String>)>, String> {
    if let Ok(count) = spec.parse::<usize>() {
        if count == 0 || nodes.len() % count != 0 {
            return Err(format!(
                "{} nodes cannot be split into {count} equal racks",
                nodes.len()
            ));
        }
        let per = nodes.len() / count;
        return Ok(nodes
            .chunks(per)
            .enumerate()
            .map(|(i, n)| (format!("rack{}", i + 1), n.to_vec()))
            .collect());
    }
    let names: Vec<&str> = spec.split(',').collect();
    if names.len() != nodes.len() {
        return Err(format!(
            "racks names {} racks for {} nodes; give a count or one name per node",
            names.len(),
            nodes.len()
        ));
    }
    let mut racks: Vec<(String, Vec<String>)> = Vec::new();
    for (name, node) in names.iter().zip(nodes) {
        match racks.iter_mut().find(|(n, _)| n == name) {
            Some((_, members)) => members.push(node.clone()),
            None => racks.push((name.to_string(), vec![node.clone()])),
        }
    }
    Ok(racks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted_from_urls_and_errors() {
        assert_eq!(
            redact("redis://user:hunter2@h:6379/0?timeout_ms=5"),
            "redis://***@h:6379/0?timeout_ms=5"
        );
        assert_eq!(
            redact("ring://:pw@a:1,b:2,u:pw@c:3?racks=3"),
            "ring://***@a:1,b:2,***@c:3?racks=3"
        );
        assert_eq!(redact("a:pw@h:1"), "***@h:1");
        assert_eq!(redact("redis://h:6379"), "redis://h:6379");
        let err = parse("redis://user:hunter2@h:6379?timeout_ms=x").unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
        let err = crate::Error::Corrupt {
            node: "u:hunter2@h:1".into(),
            user: "x".into(),
            reason: "r".into(),
        };
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    #[test]
    fn parses_each_scheme() {
        assert_eq!(
            parse("memory").unwrap(),
            BackendUrl::Memory {
                max_entries: crate::memory::DEFAULT_MAX_ENTRIES
            }
        );
        assert_eq!(
            parse("redis://127.0.0.1:6379?timeout_ms=50").unwrap(),
            BackendUrl::Redis {
                url: "redis://127.0.0.1:6379".into(),
                timeout_ms: Some(50),
                scripts: Scripts::Text
            }
        );
        assert_eq!(
            parse("redis://127.0.0.1:6379?scripts=hash").unwrap(),
            BackendUrl::Redis {
                url: "redis://127.0.0.1:6379".into(),
                timeout_ms: None,
                scripts: Scripts::Hash
            }
        );
        let BackendUrl::Ring {
            racks, read, write, ..
        } = parse("ring://a:1,b:2,c:3,d:4?racks=2&read=one&write=safe_quorum").unwrap()
        else {
            panic!("not a ring");
        };
        assert_eq!(racks.len(), 2);
        assert_eq!(racks[1].1, vec!["c:3".to_string(), "d:4".to_string()]);
        assert_eq!((read, write), (Consistency::One, Consistency::SafeQuorum));
        let BackendUrl::Ring { racks, .. } = parse("ring://a:1,b:2,c:3?racks=x,y,x").unwrap()
        else {
            panic!("not a ring");
        };
        assert_eq!(
            racks[0],
            ("x".to_string(), vec!["a:1".into(), "c:3".into()])
        );
    }

    #[test]
    fn rejects_nonsense_clearly() {
        for bad in [
            "mongodb://x",
            "redis://",
            "ring://a:1,b:2?racks=3",
            "ring://a:1?read=most",
            "redis://h:1?colour=red",
            "redis-cluster://nohost",
            "redis://h:1?scripts=sha",
            // Redis Cluster and the ring always call scripts by hash.
            "redis-cluster://h:1?scripts=text",
        ] {
            let err = parse(bad).unwrap_err().to_string();
            assert!(err.contains(bad), "{err}");
        }
        let err = parse("redis://h:1?scripts=sha").unwrap_err().to_string();
        assert!(err.contains("scripts must be hash or text"), "{err}");
    }
}
