//! Process facts from `/proc`, the open-files limit, and free local ports.

use std::net::{Ipv4Addr, TcpListener};

use anyhow::{bail, Context as _};
use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

/// Raises this process's soft open-files limit to its hard limit; returns the new soft limit.
pub fn raise_nofile_limit() -> std::io::Result<u64> {
    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: limit.maximum,
                maximum: limit.maximum,
            },
        )?;
    }
    Ok(nofile_limit())
}

/// This process's soft open-files limit (`u64::MAX` for unlimited).
pub fn nofile_limit() -> u64 {
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// The soft open-files limit of another process, from `/proc/<pid>/limits`.
pub fn nofile_limit_of(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/limits");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    let line = text
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .with_context(|| format!("no `Max open files` line in {path}"))?;
    let soft = line["Max open files".len()..]
        .split_whitespace()
        .next()
        .context("empty `Max open files` line")?;
    if soft == "unlimited" {
        return Ok(u64::MAX);
    }
    soft.parse()
        .with_context(|| format!("bad `Max open files` value `{soft}`"))
}

/// Resident memory of a process, KiB, from `/proc/<pid>/status`.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Memory {
    /// `VmRSS`: all resident pages.
    pub rss_kib: u64,
    /// `RssAnon`: heap, stacks and other anonymous pages (what connections add).
    pub anon_kib: u64,
    /// `RssFile`: resident pages of the binary and other mapped files.
    pub file_kib: u64,
}

/// Reads `VmRSS`, `RssAnon` and `RssFile` of `pid`.
pub fn memory(pid: u32) -> anyhow::Result<Memory> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {path} (has the process exited?)"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        let line = text
            .lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(':'))
            .with_context(|| format!("no `{name}` in {path}"))?;
        let value = line[name.len() + 1..].trim();
        let Some(kib) = value.strip_suffix("kB") else {
            bail!("`{name}` in {path} is not in kB: `{value}`");
        };
        kib.trim()
            .parse()
            .with_context(|| format!("bad `{name}` value `{value}`"))
    };
    Ok(Memory {
        rss_kib: field("VmRSS")?,
        anon_kib: field("RssAnon")?,
        file_kib: field("RssFile")?,
    })
}

/// A port on 127.0.0.1 that was free a moment ago (the kernel picks it; we release it for
/// the server to bind). Another process could take it in between; the server then fails
/// to start and says so.
pub fn free_port() -> anyhow::Result<u16> {
    let listener =
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("cannot bind 127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// The machine's CPU model and count, for the report.
pub fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!("{cpus} × {model}")
}
