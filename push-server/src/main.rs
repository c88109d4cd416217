//! The `push-server` binary: `push-server [flags]` serves; `push-server token` mints a token.

/// jemalloc rather than glibc malloc: an idle node is hundreds of thousands of small, long-
/// lived allocations spread over worker threads, which jemalloc packs tighter (1.60 against
/// 1.84 KiB of RSS per idle WebSocket connection, docs/BENCHMARKS.md), with its background
/// thread on (Cargo.toml) so that freed pages go back to the kernel while the node is idle.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use push_server::auth::Authenticator;
use push_server::config::{parse_duration, ServeArgs};
use push_server::Server;

/// Push connection server: holds WebSocket and SSE clients and pushes messages to users.
#[derive(Parser, Debug)]
#[command(name = "push-server", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
    /// Span export (a flag or `OTEL_EXPORTER_OTLP_ENDPOINT`; not a config-file key).
    #[command(flatten)]
    otlp: telemetry::OtlpArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print a client token signed with the configured secret.
    Token {
        /// User ID (`sub` claim).
        #[arg(long)]
        user: String,
        /// Device ID (`did` claim).
        #[arg(long)]
        device: Option<String>,
        /// Validity, e.g. 1h, 7d.
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        ttl: Duration,
        #[command(flatten)]
        serve: ServeArgs,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("push-server: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Some(Command::Token {
            user,
            device,
            ttl,
            serve,
        }) => {
            let cfg = serve.resolve()?;
            let secret = cfg.auth_secret.context(
                "no secret configured: pass --auth-secret, set PUSH_AUTH_SECRET, or put auth_secret in the --config file",
            )?;
            let auth = Authenticator::new(secret.as_bytes(), false);
            println!("{}", auth.mint(&user, device.as_deref(), ttl));
            Ok(())
        }
        None => {
            let mut cfg = cli.serve.resolve()?;
            let traces = telemetry::TraceExport::from_args(&cli.otlp, "push-server");
            // Held until main returns: dropping it flushes the spans still queued.
            let _traces = telemetry::init_logging_with_traces(cfg.log_format, "info", &traces)?;
            cfg.max_connections = fit_open_files(cfg.max_connections);
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("cannot start the tokio runtime")?;
            runtime.block_on(serve(cfg))
        }
    }
}

/// Raises the soft open-files limit to the hard limit (each connection is a descriptor), and
/// lowers `max_connections` to what the limit allows, so that clients past it get a clear 503
/// and readiness fails, rather than accept() failing silently.
fn fit_open_files(max_connections: usize) -> usize {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let raised = Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            tracing::warn!(error = %e, "cannot raise the open-files limit");
        }
    }
    let soft = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
    // Descriptors for the listeners, admin and registry connections, logs and the runtime.
    const RESERVED: u64 = 64;
    let fits = usize::try_from(soft.saturating_sub(RESERVED)).unwrap_or(usize::MAX);
    if max_connections > fits {
        tracing::warn!(
            open_files_limit = soft,
            "max-connections lowered from {max_connections} to {fits} to fit the open-files limit; for more, run several processes with --reuse-port"
        );
        fits
    } else {
        max_connections
    }
}

async fn serve(cfg: push_server::Config) -> anyhow::Result<()> {
    // Listen for signals before the banner: scripts and orchestrators take the banner as "up",
    // and a SIGTERM that arrived before tokio's handler existed would kill the process without
    // a drain (its default action).
    let mut signals = Signals::new()?;
    let server = Server::start(cfg).await?;
    print_banner(&server);
    signals.next().await;
    tracing::info!("signal received: draining");
    server.drain();
    tokio::select! {
        () = server.drained() => tracing::info!("drain complete"),
        () = signals.next() => tracing::warn!("second signal: exiting without waiting for the drain"),
    }
    server.stop();
    Ok(())
}

/// SIGTERM and SIGINT, caught from the moment this is made.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            term: signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?,
            int: signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?,
        })
    }

    /// The next SIGTERM or SIGINT.
    async fn next(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

/// What an operator trying the server for the first time needs: where it listens, a token,
/// and commands to paste. Secrets and sample tokens are printed only to a terminal: stdout
/// sent to a file or a log collector would keep them (the generated secret signs every
/// client's token).
fn print_banner(server: &Server) {
    use std::io::IsTerminal as _;
    let client = server.client_addr();
    let admin = server.admin_addr();
    let (secret, generated) = server.secret();
    println!("push-server {} ready", env!("CARGO_PKG_VERSION"));
    println!("  clients  ws://{client}/ws   http://{client}/sse");
    println!("  admin    http://{admin}  (/v1/push/<user>, /metrics, /healthz, /readyz)");
    if !std::io::stdout().is_terminal() {
        if generated {
            println!("  secret   generated and not shown (stdout is not a terminal); set PUSH_AUTH_SECRET to choose one");
        }
        println!("  token    mint one with `push-server token --user U` and the same secret");
        return;
    }
    let token = server.mint_token("demo", None, Duration::from_secs(24 * 3600));
    if generated {
        println!("  secret   {secret}");
        println!(
            "           (generated; set PUSH_AUTH_SECRET to keep tokens valid across restarts)"
        );
    }
    println!("  token    user \"demo\", valid 24h:");
    println!("           {token}");
    println!();
    println!("  listen (SSE):   curl -N -H 'Authorization: Bearer {token}' http://{client}/sse");
    println!("  listen (WS):    websocat 'ws://{client}/ws?token={token}'");
    let auth = if server.config().admin_token.is_some() {
        " -H 'Authorization: Bearer $PUSH_ADMIN_TOKEN'"
    } else {
        ""
    };
    println!("  push:           curl -X POST{auth} http://{admin}/v1/push/demo -d 'hello'");
    println!();
}
