//! The local runner: each execution in its own bubblewrap (`bwrap`) sandbox.
//!
//! The sandbox gets new PID, network, IPC, UTS, mount and cgroup namespaces
//! (`--unshare-all`), read-only system directories (`/usr`, `/etc` and the `/bin`, `/lib`
//! links), a fresh `/proc`, `/dev` and `/tmp`, and a fresh work dir at `/work`; nothing else of
//! the host is visible (no state dir, no other run's work dir) except the workflow's declared
//! `mounts`. The environment is cleared and set to `PATH`, `HOME` and `STYX_*` plus the
//! workflow's `env`. `--die-with-parent` ties the sandbox to this process: a killed scheduler
//! leaves no orphan jobs. Output (stdout and stderr) goes to a per-run log file.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::Command;
use tokio::sync::oneshot;

use super::{styx_env, KillSwitches, Report, Reports, Runner};
use crate::engine::Launch;
use crate::state::Event;

/// Runs executions in bubblewrap sandboxes.
#[derive(Debug, Clone)]
pub struct LocalRunner {
    bwrap: PathBuf,
    runs_dir: PathBuf,
    kills: KillSwitches,
}

impl LocalRunner {
    /// Work dirs go to `runs_dir/work/…`, logs to `runs_dir/logs/…`. Fails when `bwrap` is
    /// not installed.
    pub fn new(runs_dir: &Path) -> Result<LocalRunner, String> {
        let bwrap = find_in_path("bwrap").ok_or(
            "bwrap (bubblewrap) not found on PATH: install it (`apt-get install bubblewrap`) or use another runner",
        )?;
        Ok(LocalRunner {
            bwrap,
            runs_dir: runs_dir.to_path_buf(),
            kills: KillSwitches::default(),
        })
    }

    /// The log file of one execution.
    pub fn log_path(runs_dir: &Path, launch: &Launch) -> PathBuf {
        let k = &launch.key;
        runs_dir
            .join("logs")
            .join(&k.workflow.component)
            .join(&k.workflow.id)
            .join(&k.parameter)
            .join(format!("{}.log", launch.execution_id))
    }

    /// The `bwrap` arguments for one execution (without the program itself).
    pub fn sandbox_args(work: &Path, launch: &Launch) -> Vec<String> {
        let mut a: Vec<String> = [
            "--unshare-all",
            "--die-with-parent",
            "--new-session",
            "--clearenv",
        ]
        .map(String::from)
        .to_vec();
        let mut push = |xs: &[&str]| a.extend(xs.iter().map(|s| s.to_string()));
        push(&["--ro-bind", "/usr", "/usr"]);
        // Debian's merged /usr makes these links; older layouts have real directories.
        for dir in ["/bin", "/sbin", "/lib", "/lib32", "/lib64", "/etc"] {
            let p = Path::new(dir);
            if let Ok(target) = std::fs::read_link(p) {
                push(&["--symlink", &target.to_string_lossy(), dir]);
            } else if p.is_dir() {
                push(&["--ro-bind", dir, dir]);
            }
        }
        push(&[
            "--proc",
            "/proc",
            "--dev",
            "/dev",
            "--tmpfs",
            "/tmp",
            "--hostname",
            "styx",
        ]);
        push(&[
            "--bind",
            &work.to_string_lossy(),
            "/work",
            "--chdir",
            "/work",
        ]);
        for m in &launch.workflow.mounts {
            push(&[
                if m.writable { "--bind" } else { "--ro-bind" },
                &m.source,
                &m.target,
            ]);
        }
        push(&[
            "--setenv",
            "PATH",
            "/usr/local/bin:/usr/bin:/bin",
            "--setenv",
            "HOME",
            "/work",
        ]);
        for (k, v) in styx_env(launch)
            .into_iter()
            .chain(launch.workflow.env.clone())
        {
            push(&["--setenv", &k, &v]);
        }
        a.push("--".into());
        a.extend(launch.workflow.argv(&launch.key.parameter));
        a
    }

    async fn run(self, launch: Launch, reports: Reports, kill: oneshot::Receiver<()>) {
        let report = |event: Event| {
            let _ = reports.send(Report {
                key: launch.key.clone(),
                execution_id: launch.execution_id.clone(),
                event,
            });
        };
        let work = self.runs_dir.join("work").join(&launch.execution_id);
        let log = Self::log_path(&self.runs_dir, &launch);
        let prepared = (|| -> std::io::Result<(std::fs::File, std::fs::File)> {
            std::fs::create_dir_all(&work)?;
            // bwrap refuses a missing bind source; an output directory is made on first use.
            for m in launch.workflow.mounts.iter().filter(|m| m.writable) {
                std::fs::create_dir_all(&m.source)?;
            }
            std::fs::create_dir_all(log.parent().expect("log path has a parent"))?;
            let out = std::fs::File::create(&log)?;
            let err = out.try_clone()?;
            Ok((out, err))
        })();
        let (out, err) = match prepared {
            Ok(f) => f,
            Err(e) => {
                return report(Event::RunError {
                    message: format!("preparing the sandbox: {e}"),
                })
            }
        };
        let mut cmd = Command::new(&self.bwrap);
        cmd.args(Self::sandbox_args(&work, &launch))
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .kill_on_drop(true);
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                return report(Event::RunError {
                    message: format!("starting bwrap: {e}"),
                })
            }
        };
        report(Event::Submitted {
            execution_id: launch.execution_id.clone(),
        });
        report(Event::Started);
        tracing::info!(instance = %launch.key, execution_id = %launch.execution_id, log = %log.display(), "sandbox started");
        let status = tokio::select! {
            s = child.wait() => s,
            _ = kill => {
                // SIGKILL to bwrap; --die-with-parent then kills the sandbox's init, and with
                // it every process of its PID namespace.
                let _ = child.start_kill();
                child.wait().await
            }
        };
        let _ = std::fs::remove_dir_all(&work);
        match status {
            Ok(s) => {
                use std::os::unix::process::ExitStatusExt;
                let code = s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0));
                report(Event::Terminate { exit_code: code });
            }
            Err(e) => report(Event::RunError {
                message: format!("waiting for the sandbox: {e}"),
            }),
        }
        self.kills.forget(&launch.execution_id);
    }
}

impl Runner for LocalRunner {
    fn launch(&self, launch: Launch, reports: Reports) {
        let rx = self.kills.register(&launch.execution_id);
        tokio::spawn(self.clone().run(launch, reports, rx));
    }

    fn kill(&self, execution_id: &str) {
        self.kills.kill(execution_id);
    }
}

/// The first executable `name` on `PATH`.
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}
