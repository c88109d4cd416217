//! traces: distributed tracing for the push platform. A push crosses push-lib, Kafka,
//! msg-processor, the registry, a push-server node and a client; this crate collects each
//! service's spans (OTLP), keeps them, decides sampling, and answers questions about them.
//!
//! Layers, lowest first; a layer never uses one above it:
//!
//! | module | role |
//! |---|---|
//! | [`propagation`] | W3C `traceparent`/`tracestate` and B3 headers ↔ [`propagation::TraceContext`] (pure) |
//! | [`sampling`] | Jaeger strategies file → head-based decisions and remote-sampling answers (pure) |
//! | [`model`] | one span as a flat row; its Arrow schema |
//! | [`otlp`] | OTLP/HTTP bodies (protobuf, JSON) → rows (pure) |
//! | [`store`] | Parquet files by hour through `object_store`, an index per file |
//! | [`kafka`] | at scale: collector → Kafka topic → store writers in one consumer group |
//! | [`query`] | the SQL query runner (DataFusion) over the store |
//! | [`jaeger`] | Jaeger's query API: search, trace JSON; the critical path |
//! | [`page`] | the waterfall page for one trace |
//! | [`server`] | `traces serve`: ingest queue, writer, rules reload, retention, HTTP routes |
//!
//! docs/tracing.md is the operator's guide.

pub mod jaeger;
pub mod kafka;
pub mod model;
pub mod otlp;
pub mod page;
pub use telemetry::propagation;
pub mod query;
pub mod sampling;
pub mod server;
pub mod store;
