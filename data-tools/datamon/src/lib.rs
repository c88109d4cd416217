//! Datamon: early warning for late and missing data, with clear owners.
//!
//! Teams declare their datasets in YAML (owner, location template, partitioning, success
//! marker, SLA, producer, upstream). A checker classifies every expected partition in a
//! look-back window as on time, late, missing or pending, keeps what it saw in SQLite, and
//! warns the owner through an Alertmanager-compatible webhook. `docs/datamon.md` defines the
//! terms.
//!
//! Layers, lowest first; a layer never uses one above it:
//!
//! | module | role |
//! |---|---|
//! | [`partition`] | pure: hourly/daily UTC periods, names, windows, location templates |
//! | [`classify`] | pure: partition + SLA + landed time + `now` → status; marker → landed time |
//! | [`alert`] | pure: when to fire and resolve; the Alertmanager JSON; retry backoff |
//! | [`decl`] | the YAML metadata language, validation, reload that keeps the last good set |
//! | [`store`] | success markers read through `object_store` |
//! | [`state`] | SQLite: partitions seen, alerts fired, the notification queue |
//! | [`http`] | small hyper client with deadlines |
//! | [`explain`] | why a partition is late: upstream statuses and the Styx run, in words |
//! | [`checker`] | one pass: read, classify, save, queue alerts |
//! | [`deliver`] | the sender task: queue → owners' webhooks, with backoff |
//! | [`metrics`] | metric names and the Prometheus recorder |
//! | [`web`] | `datamon serve`: grid page, owner pages, JSON API, metrics |

pub mod alert;
pub mod checker;
pub mod classify;
pub mod decl;
pub mod deliver;
pub mod explain;
pub mod http;
pub mod metrics;
pub mod partition;
pub mod state;
pub mod store;
pub mod web;
