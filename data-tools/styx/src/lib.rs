//! Styx: a better cron. Workflows declared in YAML run on a schedule; every run is a state
//! machine whose events are appended to a log, so a run's state is the replay of its events
//! and a restart loses nothing; each run executes isolated (a bubblewrap sandbox locally, a
//! Kubernetes Job at scale).
//!
//! Layers, lowest first; a layer never uses one above it:
//!
//! | module | role |
//! |---|---|
//! | [`duration`] | ISO-8601 durations (`PT1H`) |
//! | [`state`] | pure: states, events, [`state::transition`] |
//! | [`retry`] | pure: the retry policy (exit code → success, retry after, stop) |
//! | [`workflow`] | workflow YAML, schedules, periods and partition names |
//! | [`store`] | the [`store::Storage`] trait and the SQLite event log |
//! | [`metrics`] | metric names and the Prometheus recorder |
//! | [`engine`] | the scheduler core: apply events, tick (triggers, backfills, timeouts, queue) |
//! | [`runner`] | the `Runner` trait: local bubblewrap sandbox, Kubernetes Job generation, a stub |
//! | [`service`] | the driver: ticks the engine, hands actions to the runner, feeds reports back |
//! | [`api`] | REST API (hyper) in the shape of Styx's `/api/v3` |
//! | [`client`] | the HTTP client the `styx` CLI uses |
//!
//! See `docs/styx.md` for workflows, states, the retry policy, runners and the API.

pub mod api;
pub mod client;
pub mod duration;
pub mod engine;
pub mod metrics;
pub mod retry;
pub mod runner;
pub mod service;
pub mod state;
pub mod store;
pub mod workflow;
