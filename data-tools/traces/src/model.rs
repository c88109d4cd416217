//! One span as the store keeps it: a flat row, the same in memory, in Parquet and in SQL.
//!
//! Attributes, resource attributes and events are kept as JSON text columns: scripts read
//! them with string functions, and the Jaeger API turns them back into tags.

use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, Int64Array, Int64Builder, RecordBatch, StringArray, StringBuilder,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};

/// A span, flattened.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SpanRow {
    /// 32 lower-case hex digits.
    pub trace_id: String,
    /// 16 lower-case hex digits.
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    /// `service.name` of the span's resource (`unknown_service` when absent, as OTel says).
    pub service: String,
    /// The span's name: the operation.
    pub name: String,
    /// `server`, `client`, `producer`, `consumer`, `internal` or `unspecified`.
    pub kind: String,
    /// Start, nanoseconds since the Unix epoch.
    pub start_ns: i64,
    /// End, nanoseconds since the Unix epoch.
    pub end_ns: i64,
    /// `end_ns - start_ns` (never negative).
    pub duration_ns: i64,
    /// `unset`, `ok` or `error`.
    pub status: String,
    /// The status message (errors).
    pub status_message: String,
    /// Span attributes as a JSON object.
    pub attributes: String,
    /// Resource attributes as a JSON object.
    pub resource: String,
    /// Span events as a JSON array of `{"time_ns", "name", "attributes"}`.
    pub events: String,
}

const STRING_COLUMNS: [&str; 7] = [
    "trace_id",
    "span_id",
    "parent_span_id",
    "service",
    "name",
    "kind",
    "status",
];

/// The table's schema; column names are what SQL scripts use.
pub fn schema() -> SchemaRef {
    let mut fields: Vec<Field> = STRING_COLUMNS
        .iter()
        .map(|n| Field::new(*n, DataType::Utf8, false))
        .collect();
    fields.extend([
        Field::new("start_ns", DataType::Int64, false),
        Field::new("end_ns", DataType::Int64, false),
        Field::new("duration_ns", DataType::Int64, false),
        Field::new("status_message", DataType::Utf8, false),
        Field::new("attributes", DataType::Utf8, false),
        Field::new("resource", DataType::Utf8, false),
        Field::new("events", DataType::Utf8, false),
    ]);
    Arc::new(Schema::new(fields))
}

/// Rows → one Arrow batch in [`schema`]'s column order.
pub fn to_batch(rows: &[SpanRow]) -> RecordBatch {
    let strings = |f: fn(&SpanRow) -> &str| -> ArrayRef {
        let mut b = StringBuilder::with_capacity(rows.len(), rows.len() * 16);
        for r in rows {
            b.append_value(f(r));
        }
        Arc::new(b.finish())
    };
    let ints = |f: fn(&SpanRow) -> i64| -> ArrayRef {
        let mut b = Int64Builder::with_capacity(rows.len());
        for r in rows {
            b.append_value(f(r));
        }
        Arc::new(b.finish())
    };
    let columns = vec![
        strings(|r| &r.trace_id),
        strings(|r| &r.span_id),
        strings(|r| &r.parent_span_id),
        strings(|r| &r.service),
        strings(|r| &r.name),
        strings(|r| &r.kind),
        strings(|r| &r.status),
        ints(|r| r.start_ns),
        ints(|r| r.end_ns),
        ints(|r| r.duration_ns),
        strings(|r| &r.status_message),
        strings(|r| &r.attributes),
        strings(|r| &r.resource),
        strings(|r| &r.events),
    ];
    RecordBatch::try_new(schema(), columns).expect("columns follow the schema")
}

/// A batch in [`schema`] (from a Parquet file or a query) → rows. Columns are found by name,
/// so a projection that keeps all of them in any order works.
pub fn from_batch(batch: &RecordBatch) -> Result<Vec<SpanRow>, String> {
    let s = |name: &str| -> Result<&StringArray, String> {
        batch
            .column_by_name(name)
            .and_then(|c| c.as_any().downcast_ref::<StringArray>())
            .ok_or_else(|| format!("column {name} missing or not text"))
    };
    let i = |name: &str| -> Result<&Int64Array, String> {
        batch
            .column_by_name(name)
            .and_then(|c| c.as_any().downcast_ref::<Int64Array>())
            .ok_or_else(|| format!("column {name} missing or not int64"))
    };
    let (trace_id, span_id, parent, service, name, kind, status) = (
        s("trace_id")?,
        s("span_id")?,
        s("parent_span_id")?,
        s("service")?,
        s("name")?,
        s("kind")?,
        s("status")?,
    );
    let (start, end, duration) = (i("start_ns")?, i("end_ns")?, i("duration_ns")?);
    let (message, attributes, resource, events) = (
        s("status_message")?,
        s("attributes")?,
        s("resource")?,
        s("events")?,
    );
    Ok((0..batch.num_rows())
        .map(|r| SpanRow {
            trace_id: trace_id.value(r).to_owned(),
            span_id: span_id.value(r).to_owned(),
            parent_span_id: parent.value(r).to_owned(),
            service: service.value(r).to_owned(),
            name: name.value(r).to_owned(),
            kind: kind.value(r).to_owned(),
            start_ns: start.value(r),
            end_ns: end.value(r),
            duration_ns: duration.value(r),
            status: status.value(r).to_owned(),
            status_message: message.value(r).to_owned(),
            attributes: attributes.value(r).to_owned(),
            resource: resource.value(r).to_owned(),
            events: events.value(r).to_owned(),
        })
        .collect())
}

/// Nanoseconds in an hour: the store's partition.
pub const HOUR_NS: i64 = 3_600_000_000_000;

/// The hour (nanoseconds since the epoch, rounded down) a span is stored under: its start.
pub fn hour_of(start_ns: i64) -> i64 {
    start_ns.div_euclid(HOUR_NS) * HOUR_NS
}

#[cfg(test)]
pub(crate) fn sample(
    trace: &str,
    span: &str,
    parent: &str,
    service: &str,
    name: &str,
    start_ns: i64,
    duration_ns: i64,
) -> SpanRow {
    SpanRow {
        trace_id: trace.to_owned(),
        span_id: span.to_owned(),
        parent_span_id: parent.to_owned(),
        service: service.to_owned(),
        name: name.to_owned(),
        kind: "internal".into(),
        start_ns,
        end_ns: start_ns + duration_ns,
        duration_ns,
        status: "unset".into(),
        status_message: String::new(),
        attributes: "{}".into(),
        resource: "{}".into(),
        events: "[]".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_survive_a_batch_round_trip() {
        let rows = vec![
            sample(
                &"a".repeat(32),
                &"1".repeat(16),
                "",
                "push-server",
                "deliver",
                10,
                5,
            ),
            sample(
                &"a".repeat(32),
                &"2".repeat(16),
                &"1".repeat(16),
                "push-server",
                "write",
                11,
                2,
            ),
        ];
        let batch = to_batch(&rows);
        assert_eq!(batch.num_rows(), 2);
        assert_eq!(from_batch(&batch).unwrap(), rows);
    }

    #[test]
    fn hours_round_down_also_before_the_epoch() {
        assert_eq!(hour_of(HOUR_NS + 5), HOUR_NS);
        assert_eq!(hour_of(-1), -HOUR_NS);
    }
}
