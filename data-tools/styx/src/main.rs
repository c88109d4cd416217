//! `styx`: the server (`styx serve`) and the CLI that talks to it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use hyper::Method;
use serde_json::{json, Value};

use styx::client::{timeline, Client};
use styx::engine::{Engine, EngineConfig};
use styx::runner::k8s_http::K8sRunner;
use styx::runner::local::LocalRunner;
use styx::runner::{Runner, StubRunner};
use styx::service::{self, Handle};
use styx::store::SqliteStore;
use styx::workflow::Workflow;

mod bench;

#[derive(Parser)]
#[command(
    name = "styx",
    about = "Workflows on a schedule, runs you can read, isolated execution"
)]
struct Cli {
    /// The server's base URL (for every command but serve and bench).
    #[arg(
        long,
        env = "STYX_URL",
        default_value = "http://127.0.0.1:8990",
        global = true
    )]
    url: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Runs the scheduler and its API.
    Serve(ServeArgs),
    /// Workflows.
    #[command(subcommand)]
    Workflow(WorkflowCmd),
    /// Active runs.
    Ls {
        /// Only this component's.
        #[arg(long)]
        component: Option<String>,
    },
    /// The timeline of one instance: time, event, state, exit code, message.
    Events {
        component: String,
        workflow: String,
        parameter: String,
    },
    /// Triggers one instance now.
    Trigger {
        component: String,
        workflow: String,
        parameter: String,
    },
    /// Retries a queued instance now (skips its retry delay).
    Retry {
        component: String,
        workflow: String,
        parameter: String,
    },
    /// Halts an active instance (kills its execution).
    Halt {
        component: String,
        workflow: String,
        parameter: String,
    },
    /// Backfills.
    #[command(subcommand)]
    Backfill(BackfillCmd),
    /// Resources (named concurrency limits).
    #[command(subcommand)]
    Resource(ResourceCmd),
    /// Measures the scheduler with the runner stubbed out (see docs/BENCHMARKS.md).
    Bench(bench::BenchArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// API address.
    #[arg(long, default_value = "127.0.0.1:8990")]
    listen: String,
    /// Holds styx.db (the event log) and runs/ (work dirs, logs).
    #[arg(long, default_value = "styx-state")]
    state_dir: PathBuf,
    /// Workflow files or directories of *.yaml to load at start (create or replace).
    #[arg(long = "workflows")]
    workflows: Vec<PathBuf>,
    /// `local` (bubblewrap sandboxes), `k8s` (a Kubernetes Job per run, through --k8s-api) or
    /// `stub` (every run succeeds at once).
    #[arg(long, default_value = "local")]
    runner: String,
    /// The Kubernetes API for `--runner k8s`: `kubectl proxy`'s address, which holds the
    /// cluster's credentials and TLS.
    #[arg(long, default_value = "http://127.0.0.1:8001")]
    k8s_api: String,
    /// The namespace of the Jobs.
    #[arg(long, default_value = "styx")]
    k8s_namespace: String,
    /// How often the scheduler looks for due triggers, timeouts and free slots.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    tick: Duration,
}

#[derive(Subcommand)]
enum WorkflowCmd {
    /// Lists workflows.
    Ls { component: Option<String> },
    /// Shows one workflow and its state.
    Get { component: String, workflow: String },
    /// Creates or replaces a workflow from a YAML file.
    Create {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// Deletes a workflow (its active runs are halted).
    Delete { component: String, workflow: String },
    /// Enables natural triggers.
    Enable { component: String, workflow: String },
    /// Disables natural triggers.
    Disable { component: String, workflow: String },
}

#[derive(Subcommand)]
enum BackfillCmd {
    /// Starts a backfill of [START, END).
    Create {
        component: String,
        workflow: String,
        start: String,
        end: String,
        #[arg(long, default_value_t = 1)]
        concurrency: u32,
        #[arg(long)]
        reverse: bool,
    },
    /// Lists backfills.
    Ls,
    /// Shows one backfill.
    Get { id: String },
    /// Halts a backfill and its active runs.
    Halt { id: String },
}

#[derive(Subcommand)]
enum ResourceCmd {
    /// Lists resources, limits and usage.
    Ls,
    /// Creates or updates a resource.
    Create { id: String, concurrency: u32 },
}

fn print(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn instance(component: &str, workflow: &str, parameter: &str) -> Value {
    json!({"component": component, "workflow": workflow, "parameter": parameter})
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let c = Client::new(&cli.url);
    match cli.cmd {
        Cmd::Serve(args) => return serve(args).await,
        Cmd::Bench(args) => return bench::run(args),
        Cmd::Workflow(w) => match w {
            WorkflowCmd::Ls { component } => {
                let path = component.map_or("/api/v3/workflows".to_string(), |c| {
                    format!("/api/v3/workflows/{c}")
                });
                for w in c.get(&path).await?.as_array().into_iter().flatten() {
                    let cfg = &w["configuration"];
                    println!(
                        "{}/{}  {}  {}",
                        w["component_id"].as_str().unwrap_or(""),
                        w["workflow_id"].as_str().unwrap_or(""),
                        cfg["schedule"].as_str().unwrap_or(""),
                        if cfg["enabled"] == true {
                            "enabled"
                        } else {
                            "disabled"
                        }
                    );
                }
            }
            WorkflowCmd::Get {
                component,
                workflow,
            } => {
                let mut v = c
                    .get(&format!("/api/v3/workflows/{component}/{workflow}"))
                    .await?;
                v["state"] = c
                    .get(&format!("/api/v3/workflows/{component}/{workflow}/state"))
                    .await?;
                print(&v);
            }
            WorkflowCmd::Create { file } => {
                // Checked here first, so the error names the local file and its line; sent as
                // JSON (a subset of YAML) with relative mount sources resolved.
                let wf = Workflow::from_file(&file)?;
                let path = format!("/api/v3/workflows/{}", wf.component);
                let body = Bytes::from(serde_json::to_string(&wf)?);
                print(
                    &c.call(Method::POST, &path, Some((body, "application/json")))
                        .await?,
                );
            }
            WorkflowCmd::Delete {
                component,
                workflow,
            } => print(
                &c.call(
                    Method::DELETE,
                    &format!("/api/v3/workflows/{component}/{workflow}"),
                    None,
                )
                .await?,
            ),
            WorkflowCmd::Enable {
                component,
                workflow,
            } => set_enabled(&c, &component, &workflow, true).await?,
            WorkflowCmd::Disable {
                component,
                workflow,
            } => set_enabled(&c, &component, &workflow, false).await?,
        },
        Cmd::Ls { component } => {
            let path = component.map_or("/api/v3/status/activeStates".into(), |c| {
                format!("/api/v3/status/activeStates?component={c}")
            });
            let v = c.get(&path).await?;
            println!(
                "{:<50}  {:<10}  {:<5}  {:<24}  MESSAGE",
                "INSTANCE", "STATE", "TRIES", "SINCE"
            );
            for r in v["active_states"].as_array().into_iter().flatten() {
                println!(
                    "{:<50}  {:<10}  {:<5}  {:<24}  {}",
                    r["workflow_instance"].as_str().unwrap_or(""),
                    r["state"].as_str().unwrap_or(""),
                    r["tries"],
                    r["since"].as_str().unwrap_or(""),
                    r["message"].as_str().unwrap_or("")
                );
            }
        }
        Cmd::Events {
            component,
            workflow,
            parameter,
        } => {
            let v = c
                .get(&format!(
                    "/api/v3/status/events/{component}/{workflow}/{parameter}"
                ))
                .await?;
            print!("{}", timeline(&v));
        }
        Cmd::Trigger {
            component,
            workflow,
            parameter,
        } => print(
            &c.post_json(
                "/api/v3/scheduler/trigger",
                &instance(&component, &workflow, &parameter),
            )
            .await?,
        ),
        Cmd::Retry {
            component,
            workflow,
            parameter,
        } => print(
            &c.post_json(
                "/api/v3/scheduler/retry",
                &instance(&component, &workflow, &parameter),
            )
            .await?,
        ),
        Cmd::Halt {
            component,
            workflow,
            parameter,
        } => print(
            &c.post_json(
                "/api/v3/scheduler/halt",
                &instance(&component, &workflow, &parameter),
            )
            .await?,
        ),
        Cmd::Backfill(b) => match b {
            BackfillCmd::Create {
                component,
                workflow,
                start,
                end,
                concurrency,
                reverse,
            } => {
                let body = json!({"component": component, "workflow": workflow, "start": start, "end": end,
                    "concurrency": concurrency, "reverse": reverse});
                print(&c.post_json("/api/v3/backfills", &body).await?)
            }
            BackfillCmd::Ls => print(&c.get("/api/v3/backfills").await?),
            BackfillCmd::Get { id } => print(&c.get(&format!("/api/v3/backfills/{id}")).await?),
            BackfillCmd::Halt { id } => print(
                &c.call(Method::DELETE, &format!("/api/v3/backfills/{id}"), None)
                    .await?,
            ),
        },
        Cmd::Resource(r) => match r {
            ResourceCmd::Ls => print(&c.get("/api/v3/resources").await?),
            ResourceCmd::Create { id, concurrency } => print(
                &c.post_json(
                    "/api/v3/resources",
                    &json!({"id": id, "concurrency": concurrency}),
                )
                .await?,
            ),
        },
    }
    Ok(())
}

async fn set_enabled(c: &Client, component: &str, workflow: &str, enabled: bool) -> Result<()> {
    let body = Bytes::from(json!({ "enabled": enabled }).to_string());
    let path = format!("/api/v3/workflows/{component}/{workflow}/state");
    print(
        &c.call(Method::PATCH, &path, Some((body, "application/json")))
            .await?,
    );
    Ok(())
}

fn workflow_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut inside: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("reading {}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.extension().is_some_and(|x| x == "yaml" || x == "yml"))
                .collect();
            inside.sort();
            files.extend(inside);
        } else {
            files.push(p.clone());
        }
    }
    Ok(files)
}

async fn serve(args: ServeArgs) -> Result<()> {
    // Logs on stderr: stdout carries only the "listening" line (scripts and tests read it).
    telemetry::init_logging(telemetry::LogFormat::Json, "info");
    // All files are read before anything changes: one bad file and nothing is loaded.
    let workflows: Vec<Workflow> = workflow_files(&args.workflows)?
        .iter()
        .map(|f| Workflow::from_file(f))
        .collect::<Result<_, _>>()?;
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("creating {}", args.state_dir.display()))?;
    let state_dir = std::fs::canonicalize(&args.state_dir)?;
    let runner: Arc<dyn Runner> = match args.runner.as_str() {
        "local" => Arc::new(LocalRunner::new(&state_dir.join("runs")).map_err(anyhow::Error::msg)?),
        "k8s" => Arc::new(K8sRunner::new(&args.k8s_api, &args.k8s_namespace)?),
        "stub" => Arc::new(StubRunner::default()),
        other => bail!("unknown runner {other:?}: use local, k8s or stub"),
    };
    let store = SqliteStore::open(&state_dir.join("styx.db"))?;
    let mut engine = Engine::open(Box::new(store), EngineConfig::default())?;
    let now = chrono::Utc::now();
    for wf in workflows {
        tracing::info!(workflow = %wf.key(), "workflow loaded");
        engine.put_workflow(wf, now)?;
    }
    engine.recover(now)?;
    let metrics = styx::metrics::install();
    let handle = Handle::new(engine, service::system_clock());
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr()?;
    // Tests and scripts read this line to find the port when --listen ends in :0.
    println!("styx listening on http://{addr}");
    tracing::info!(%addr, state_dir = %state_dir.display(), "styx serving");
    let driver = service::spawn(handle.clone(), runner, args.tick);
    tokio::select! {
        _ = styx::api::serve(listener, handle, metrics) => {}
        r = driver => r.context("scheduler driver stopped")?,
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted"),
    }
    Ok(())
}
