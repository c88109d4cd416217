//! The helpers every scenario shares: process facts from `/proc`, the open-files limit,
//! free local ports and waiting for one to listen, child process trees stopped with their
//! descendants ([`Tree`]), temporary directories ([`temp_dir`]), [`which`], `redis-server`
//! children ([`start_redis`]) and a tiny HTTP/1.1 `GET` for admin ports and status pages
//! ([`http_get`], [`metric_sum`]).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use rustix::process::{getrlimit, kill_process, setrlimit, Pid, Resource, Rlimit, Signal};
use testkit::resp::Reply;
pub use testkit::RedisServer;
use tokio::io::AsyncWriteExt as _;
use tokio::process::Command;

pub use testkit::free_port;

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
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Memory {
    /// `VmRSS`: all resident pages.
    pub rss_kib: u64,
    /// `RssAnon`: heap, stacks and other anonymous pages (what connections add).
    pub anon_kib: u64,
    /// `RssFile`: resident pages of the binary and other mapped files.
    pub file_kib: u64,
    /// `RssShmem`: resident shared memory (Nchan keeps its channels there).
    pub shmem_kib: u64,
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
        shmem_kib: field("RssShmem")?,
    })
}

pub use testkit::procs::{descendants, pids_named};

/// Two distinct free ports on 127.0.0.1 (a server's client and admin ports), from testkit's
/// [`free_port`]: free a moment ago; another process could take one in between, and the
/// server then fails to start and says so.
pub fn free_addr_pair() -> (SocketAddr, SocketAddr) {
    let a = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
    loop {
        let port = free_port();
        if port != a.port() {
            return (a, SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
        }
    }
}

/// Fails unless `needed` open files fit under this process's limit; `what` says who needs them.
pub fn check_files(needed: u64, what: &str) -> anyhow::Result<()> {
    let limit = nofile_limit();
    if needed > limit {
        bail!(
            "{what} need about {needed} open files per process, above the limit of {limit}; \
             beyond that, run several server and client processes (see DESIGN.md, Measuring)"
        );
    }
    Ok(())
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

/// The first line of a command's output, or `?`.
pub fn shell(cmd: &[&str]) -> String {
    std::process::Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map_or("?".into(), |s| s.trim().to_owned())
}

/// `/proc/loadavg`'s first three fields: how busy the machine was (others' builds show here).
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Linux reports `/proc/<pid>/stat` times in USER_HZ, which is 100 on every architecture
/// this runs on (the kernel fixes it for the `/proc` ABI, whatever `CONFIG_HZ` is).
const USER_HZ: f64 = 100.0;

/// CPU time a process has used so far, seconds: (user, system). The system part includes
/// the softirq work the kernel runs in the process's context (on loopback, a `send` runs
/// the receiver's TCP input) unless the kernel accounts IRQ time apart
/// (`CONFIG_IRQ_TIME_ACCOUNTING`, off in Debian's kernels).
pub fn cpu_split_secs(pid: u32) -> anyhow::Result<(f64, f64)> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {path} (has the process exited?)"))?;
    parse_cpu_secs(&text).with_context(|| format!("bad {path}: {text}"))
}

/// `utime` and `stime` of a `/proc/<pid>/stat` line, in seconds. The command name (field 2)
/// is in parentheses and may hold spaces or parentheses, so fields are counted after the
/// last `)`.
fn parse_cpu_secs(stat: &str) -> Option<(f64, f64)> {
    let after = &stat[stat.rfind(')')? + 1..];
    // After the name: state is field 3, utime field 14, stime field 15 (1-based, man proc).
    let fields: Vec<&str> = after.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime as f64 / USER_HZ, stime as f64 / USER_HZ))
}

/// Busy CPU time of the whole machine so far (all cores, everything but idle and iowait),
/// seconds, from the first line of `/proc/stat`.
fn machine_busy_secs() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    parse_machine_busy(text.lines().next()?)
}

/// `cpu  user nice system idle iowait irq softirq steal …` (USER_HZ ticks) → busy seconds.
fn parse_machine_busy(line: &str) -> Option<f64> {
    let ticks: Vec<u64> = line
        .strip_prefix("cpu ")?
        .split_whitespace()
        .take(8)
        .map(|t| t.parse().ok())
        .collect::<Option<_>>()?;
    let total: u64 = ticks.iter().sum();
    let idle = ticks.get(3)? + ticks.get(4)?;
    Some((total - idle) as f64 / USER_HZ)
}

/// Cores used, by label.
pub type Cores = Vec<(String, f64)>;

/// CPU used by a set of processes between two readings, as a share of one core; and what
/// the rest of the machine used meanwhile (`others`), which shows a disturbed measurement:
/// another engineer's build or benchmark on the same 2 cores.
#[derive(Debug)]
pub struct CpuMeter {
    start: std::time::Instant,
    /// Label, pid, (user, system) seconds at the start.
    before: Vec<(String, u32, (f64, f64))>,
    machine_before: Option<f64>,
}

impl CpuMeter {
    /// Starts measuring `(label, pid)` pairs; a process that cannot be read counts 0.
    pub fn start(procs: &[(String, u32)]) -> Self {
        let before = procs
            .iter()
            .map(|(label, pid)| {
                let split = cpu_split_secs(*pid).unwrap_or((0.0, 0.0));
                (label.clone(), *pid, split)
            })
            .collect();
        Self {
            start: std::time::Instant::now(),
            before,
            machine_before: machine_busy_secs(),
        }
    }

    /// Per label: cores used on average since `start` (1.0 = one core busy all the time),
    /// then `others`: the machine's busy cores minus those of the labelled processes.
    pub fn stop(&self) -> Vec<(String, f64)> {
        let (out, _) = self.stop_split();
        out.into_iter().map(|(l, c)| (l, round2(c))).collect()
    }

    /// As [`CpuMeter::stop`], and per label the cores spent in the kernel (system time). Neither
    /// is rounded, so that the kernel's part never reads above the whole (at 0.01 core the
    /// rounding alone would do that) and a caller can tell its own code's cost from the
    /// kernel's.
    pub fn stop_split(&self) -> (Cores, Cores) {
        let wall = self.start.elapsed().as_secs_f64().max(1e-9);
        let mut out = Vec::with_capacity(self.before.len() + 1);
        let mut kernel = Vec::with_capacity(self.before.len());
        for (label, pid, (user0, sys0)) in &self.before {
            let (user, sys) = cpu_split_secs(*pid).unwrap_or((*user0, *sys0));
            out.push((label.clone(), (user - user0 + sys - sys0) / wall));
            kernel.push((label.clone(), (sys - sys0) / wall));
        }
        if let (Some(before), Some(now)) = (self.machine_before, machine_busy_secs()) {
            let ours: f64 = out.iter().map(|(_, c)| c).sum();
            out.push(("others".into(), ((now - before) / wall - ours).max(0.0)));
        }
        (out, kernel)
    }
}

/// Rounds to two decimals, for reports.
pub fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// The median of some figures (the mean of the middle two for an even count); NaN if empty.
pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

/// A process started here, stopped with its descendants when dropped: SIGTERM to all, a
/// short wait, then SIGKILL to whatever is left (nginx workers and Pushpin's services do not
/// die with a SIGKILLed parent, so `kill_on_drop` alone would leave them behind).
#[derive(Debug)]
pub struct Tree {
    name: &'static str,
    child: tokio::process::Child,
    /// The process's pid.
    pub pid: u32,
}

impl Tree {
    /// Starts `cmd` (stdin closed) under `name`.
    pub fn spawn(name: &'static str, cmd: &mut Command) -> anyhow::Result<Self> {
        let child = cmd
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        let pid = child
            .id()
            .with_context(|| format!("{name} exited at once"))?;
        Ok(Self { name, child, pid })
    }

    /// Its exit status, if it has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Polls `ready` every 50 ms until it says yes; fails if the process exits first or
    /// `timeout` passes. `what` names the state awaited, for the error.
    pub async fn wait_ready<F: std::future::Future<Output = bool>>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut ready: impl FnMut() -> F,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                bail!("{} exited with {status} before {what}", self.name);
            }
            if ready().await {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{} was not {what} within {timeout:?}", self.name);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until something accepts TCP on `addr`.
    pub async fn wait_listening(
        &mut self,
        addr: SocketAddr,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let what = format!("listening on {addr}");
        self.wait_ready(&what, timeout, || async move {
            tokio::net::TcpStream::connect(addr).await.is_ok()
        })
        .await
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        let mut pids: Vec<u32> = descendants(self.pid).into_iter().map(|(p, _)| p).collect();
        pids.push(self.pid);
        let signal = |pids: &[u32], sig: Signal| {
            for &p in pids {
                if let Some(pid) = Pid::from_raw(p as i32) {
                    let _ = kill_process(pid, sig);
                }
            }
        };
        signal(&pids, Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            let _ = self.child.try_wait();
            if pids
                .iter()
                .all(|p| !Path::new(&format!("/proc/{p}")).exists() || is_zombie(*p))
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        signal(&pids, Signal::KILL);
        let _ = self.child.try_wait();
        eprintln!(
            "stopped {} (pid {}) and {} descendants",
            self.name,
            self.pid,
            pids.len() - 1
        );
    }
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rfind(')')
                .map(|i| s[i + 1..].trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

/// A fresh `bench-<prefix>-…` directory under the system's temporary directory, removed
/// when dropped.
pub fn temp_dir(prefix: &str) -> anyhow::Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix(&format!("bench-{prefix}-"))
        .tempdir()
        .context("cannot create a temporary directory")
}

/// The directory of the binaries the scenarios start: `given`, or that of this `bench`.
pub fn bin_dir(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    match given {
        Some(d) => Ok(d.to_owned()),
        None => Ok(std::env::current_exe()
            .context("cannot find the bench binary")?
            .parent()
            .context("bench binary has no directory")?
            .to_owned()),
    }
}

/// The first `name` on `PATH` (or in /usr/sbin, where nginx lives).
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// A port free on every address (condure binds 0.0.0.0) and below the ephemeral range, so
/// that no client socket of an earlier run (in TIME_WAIT on 127.0.0.x) holds it.
pub fn free_port_below_ephemeral() -> anyhow::Result<u16> {
    let start = 20_000 + (std::process::id() % 5_000) as u16;
    (start..32_000)
        .chain(20_000..start)
        .find(|&p| std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, p)).is_ok())
        .context("no free port in 20000..32000")
}

/// Memory of a set of labelled processes; a process that cannot be read is left out.
pub fn memories(procs: &[(String, u32)]) -> Vec<(String, u32, Memory)> {
    procs
        .iter()
        .filter_map(|(label, pid)| memory(*pid).ok().map(|m| (label.clone(), *pid, m)))
        .collect()
}

/// Starts a `redis-server` on a free port: testkit's [`RedisServer`] (no persistence, killed
/// when dropped, also when a scenario fails half-way), started off the async runtime.
/// testkit, built for tests, panics when it cannot; the panic (its message is printed) comes
/// back here as an error.
pub async fn start_redis() -> anyhow::Result<RedisServer> {
    tokio::task::spawn_blocking(RedisServer::start)
        .await
        .context("redis-server did not start (Debian: apt-get install -y redis-server)")
}

/// The server's process ID (`process_id` of `INFO server`), for CPU readings.
pub fn redis_pid(redis: &RedisServer) -> anyhow::Result<u32> {
    let info = match redis.try_command(&["INFO", "server"])? {
        Reply::Bulk(Some(text)) => text,
        other => bail!("unexpected reply to INFO: {other:?}"),
    };
    info.lines()
        .find_map(|l| l.strip_prefix("process_id:")?.trim().parse().ok())
        .context("no process_id in INFO server")
}

/// How long one admin request may take; the admin port answers in milliseconds.
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);

/// `GET path` on `addr` (`Connection: close`, read with loadtest's response reader): the
/// status code and the body. The server's admin port and Nchan's status page answer small,
/// complete bodies with a `Content-Length`, so this is all the bench needs.
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let get = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let r = loadtest::pusher::read_response(&mut stream).await?;
        anyhow::Ok((r.status, String::from_utf8_lossy(&r.body).into_owned()))
    };
    tokio::time::timeout(HTTP_TIMEOUT, get)
        .await
        .with_context(|| format!("GET http://{addr}{path} took longer than {HTTP_TIMEOUT:?}"))?
}

/// Sum of the series `selector` selects in a Prometheus text body: a metric's name (every
/// label set of it) or one whole series, `name{labels}`; 0 when there is none (no connection
/// of that transport yet, no message dead-lettered).
pub fn metric_sum(body: &str, selector: &str) -> f64 {
    body.lines()
        .filter(|l| {
            l.strip_prefix(selector)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cpu_time_past_a_tricky_command_name() {
        // Fields 14 and 15 (utime, stime) are 250 and 50 ticks.
        let stat = "1234 (we ird) name)) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0";
        assert_eq!(parse_cpu_secs(stat), Some((2.5, 0.5)));
        assert_eq!(parse_cpu_secs("garbage"), None);
    }

    #[test]
    fn splits_a_process_cpu_into_the_kernels_part_and_the_rest() {
        let meter = CpuMeter::start(&[("me".to_owned(), std::process::id())]);
        // System calls (the kernel's time) and a loop of our own, for many clock ticks.
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < std::time::Duration::from_millis(300) {
            let _ = std::fs::metadata("/proc/self/stat");
            for i in 0..1_000 {
                x = x.wrapping_mul(31).wrapping_add(i);
            }
        }
        std::hint::black_box(x);
        let (cores, kernel) = meter.stop_split();
        assert_eq!(cores[0].0, "me");
        assert_eq!(kernel, vec![("me".to_owned(), kernel[0].1)]);
        let (total, kernel) = (cores[0].1, kernel[0].1);
        assert!(kernel > 0.0 && kernel <= total, "{kernel} of {total}");
    }

    #[test]
    fn reads_machine_busy_time() {
        // busy = user 100 + nice 0 + system 50 + irq 0 + softirq 10 + steal 0 = 160 ticks.
        let line = "cpu  100 0 50 1000 40 0 10 0 0 0";
        assert_eq!(parse_machine_busy(line), Some(1.6));
        assert_eq!(parse_machine_busy("cpu0 1 2 3 4 5 6 7 8"), None);
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn sums_the_series_selected() {
        let body = "# TYPE push_connections_open gauge\n\
                    push_connections_open{transport=\"ws\"} 15000\n\
                    push_connections_open{transport=\"sse\"} 3\n\
                    msgproc_dead_lettered_total{reason=\"malformed\"} 2\n\
                    msgproc_dead_lettered_total{reason=\"undeliverable\"} 3\n\
                    msgproc_dead_lettered_total_other 7\n\
                    msgproc_stored_total 4\n";
        let ws = "push_connections_open{transport=\"ws\"}";
        assert_eq!(metric_sum(body, ws), 15000.0);
        assert_eq!(metric_sum(body, "push_connections_open"), 15003.0);
        assert_eq!(metric_sum(body, "msgproc_dead_lettered_total"), 5.0);
        assert_eq!(metric_sum(body, "msgproc_stored_total"), 4.0);
        assert_eq!(metric_sum("", ws), 0.0);
    }

    #[tokio::test]
    async fn starts_redis_and_names_its_process() {
        let redis = start_redis().await.expect("redis-server starts");
        let pid = redis_pid(&redis).expect("pid");
        assert_eq!(
            testkit::procs::process_name(pid).as_deref(),
            Some("redis-server")
        );
    }
}
