//! The query runner: SQL over the span store with Apache DataFusion.
//!
//! A script sees one table, `spans` ([`crate::model::schema`]), holding the spans that
//! started in `[from, to)`. Only the hours of that range are read. DataFusion runs under a
//! memory limit; sorts and aggregations spill to disk past it, so they end over more spans
//! than fit in memory. Hash joins do not spill: a script joins on a small side (see
//! `queries/late_messages.sql`, which picks the late traces' spans before its self-time join).

use std::sync::Arc;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::util::pretty::pretty_format_batches;
use datafusion::datasource::MemTable;
use datafusion::execution::memory_pool::FairSpillPool;
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::prelude::{col, lit, ParquetReadOptions, SessionConfig, SessionContext};

use crate::model;
use crate::store::{SpanStore, StoreError};

/// Default memory DataFusion may use for one script before it spills.
pub const DEFAULT_MEMORY_LIMIT: usize = 256 << 20;

/// Where the query runner finds the span store's objects (a URL only DataFusion sees).
const STORE_URL: &str = "traces://store";

/// A script that did not run.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The store could not be listed or read.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// DataFusion refused the script or failed running it (the message names the problem).
    #[error("query: {0}")]
    DataFusion(#[from] datafusion::error::DataFusionError),
    /// The result could not be written out.
    #[error("query: output: {0}")]
    Output(String),
}

/// How results are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// An aligned text table.
    Table,
    /// Comma-separated values with a header line.
    Csv,
    /// One JSON object per row, in a JSON array.
    Json,
}

/// Runs `sql` over the spans that started in `[from_ns, to_ns)`.
pub async fn run(
    store: &SpanStore,
    sql: &str,
    from_ns: i64,
    to_ns: i64,
    memory_limit: usize,
) -> Result<Vec<RecordBatch>, QueryError> {
    let runtime = RuntimeEnvBuilder::new()
        .with_memory_pool(Arc::new(FairSpillPool::new(memory_limit)))
        .build_arc()?;
    // Two partitions: this machine class has two cores, and a script is one of many jobs.
    let config = SessionConfig::new()
        .with_target_partitions(2)
        .with_information_schema(true);
    let ctx = SessionContext::new_with_config_rt(config, runtime);
    // The store is registered under a scheme of its own, so DataFusion reads the same paths the
    // store writes, relative to its root, whatever the store is (a prefixed local directory
    // registered as `file://` would see every path twice).
    let url = ObjectStoreUrl::parse(STORE_URL)?;
    ctx.register_object_store(url.as_ref(), store.objects());

    let files: Vec<String> = store
        .files(from_ns, to_ns)
        .await?
        .into_iter()
        .map(|(path, _)| format!("{STORE_URL}/{path}"))
        .collect();
    if files.is_empty() {
        let empty = MemTable::try_new(model::schema(), vec![vec![]])?;
        ctx.register_table("spans", Arc::new(empty))?;
    } else {
        let df = ctx
            .read_parquet(
                files,
                ParquetReadOptions::default().schema(&model::schema()),
            )
            .await?
            .filter(
                col("start_ns")
                    .gt_eq(lit(from_ns))
                    .and(col("start_ns").lt(lit(to_ns))),
            )?;
        ctx.register_table("spans", df.into_view())?;
    }
    let mut batches = Vec::new();
    // A script may hold several statements (e.g. a CREATE VIEW then a SELECT): run them in
    // order and keep the last one's result.
    for statement in split_statements(sql) {
        batches = ctx.sql(statement).await?.collect().await?;
    }
    Ok(batches)
}

/// The statements of a script, split at `;` outside quotes and `--` comments.
pub fn split_statements(sql: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut quote, mut comment) = (0, None::<u8>, false);
    let bytes = sql.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if comment {
            comment = b != b'\n';
        } else if let Some(q) = quote {
            if b == q {
                quote = None;
            }
        } else if b == b'\'' || b == b'"' {
            quote = Some(b);
        } else if b == b'-' && bytes.get(i + 1) == Some(&b'-') {
            comment = true;
        } else if b == b';' {
            out.push(&sql[start..i]);
            start = i + 1;
        }
        i += 1;
    }
    out.push(&sql[start..]);
    out.into_iter().filter(|s| has_code(s)).collect()
}

fn has_code(statement: &str) -> bool {
    statement.lines().any(|l| {
        let l = l.trim();
        !l.is_empty() && !l.starts_with("--")
    })
}

/// Writes batches in `format`.
pub fn render(batches: &[RecordBatch], format: Format) -> Result<String, QueryError> {
    match format {
        Format::Table => pretty_format_batches(batches)
            .map(|t| t.to_string())
            .map_err(|e| QueryError::Output(e.to_string())),
        Format::Csv | Format::Json => {
            let rows = to_json_rows(batches)?;
            if format == Format::Json {
                return serde_json::to_string_pretty(&rows)
                    .map_err(|e| QueryError::Output(e.to_string()));
            }
            let Some(schema) = batches.first().map(|b| b.schema()) else {
                return Ok(String::new());
            };
            let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
            let mut out = names
                .iter()
                .map(|n| csv_field(n))
                .collect::<Vec<_>>()
                .join(",");
            out.push('\n');
            for row in rows {
                let line: Vec<String> = names
                    .iter()
                    .map(|n| match &row[*n] {
                        serde_json::Value::Null => String::new(),
                        serde_json::Value::String(s) => csv_field(s),
                        other => other.to_string(),
                    })
                    .collect();
                out.push_str(&line.join(","));
                out.push('\n');
            }
            Ok(out)
        }
    }
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

/// Batches → JSON objects, one per row (numbers stay numbers).
pub fn to_json_rows(
    batches: &[RecordBatch],
) -> Result<Vec<serde_json::Map<String, serde_json::Value>>, QueryError> {
    use datafusion::arrow::array::Array;
    use datafusion::arrow::datatypes::DataType;
    use datafusion::arrow::util::display::ArrayFormatter;
    let mut out = Vec::new();
    for batch in batches {
        let schema = batch.schema();
        let options = Default::default();
        let formatters: Vec<_> = batch
            .columns()
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &options))
            .collect::<Result<_, _>>()
            .map_err(|e| QueryError::Output(e.to_string()))?;
        for row in 0..batch.num_rows() {
            let mut obj = serde_json::Map::new();
            for (i, field) in schema.fields().iter().enumerate() {
                let column = batch.column(i);
                let value = if column.is_null(row) {
                    serde_json::Value::Null
                } else {
                    let text = formatters[i].value(row).to_string();
                    match field.data_type() {
                        DataType::Int8
                        | DataType::Int16
                        | DataType::Int32
                        | DataType::Int64
                        | DataType::UInt8
                        | DataType::UInt16
                        | DataType::UInt32
                        | DataType::UInt64
                        | DataType::Float32
                        | DataType::Float64
                        | DataType::Boolean => {
                            serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text))
                        }
                        _ => serde_json::Value::String(text),
                    }
                };
                obj.insert(field.name().clone(), value);
            }
            out.push(obj);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{sample, HOUR_NS};

    const T0: i64 = 1_764_424_800_000_000_000;

    #[test]
    fn statements_split_outside_quotes_and_comments() {
        let s = "-- a comment; not a split\nCREATE VIEW v AS SELECT ';' AS x;\n\nSELECT * FROM v; -- done";
        let parts = split_statements(s);
        assert_eq!(parts.len(), 2, "{parts:?}");
        assert!(parts[0].contains("';'"));
        assert!(parts[1].trim_start().starts_with("SELECT * FROM v"));
    }

    async fn store_with(rows: Vec<crate::model::SpanRow>) -> (tempfile::TempDir, SpanStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SpanStore::open(dir.path().to_str().unwrap()).unwrap();
        store.write(rows, chrono::Utc::now()).await.unwrap();
        (dir, store)
    }

    #[tokio::test]
    async fn sql_sees_only_the_range_and_gives_known_answers() {
        let mut rows = Vec::new();
        for i in 0..10i64 {
            let trace = format!("{:032x}", i + 1);
            rows.push(sample(
                &trace,
                &format!("{:016x}", 1),
                "",
                "push-server",
                "push",
                T0 + i,
                (i + 1) * 1000,
            ));
        }
        // Outside the range: the next hour.
        rows.push(sample(
            &"f".repeat(32),
            &"2".repeat(16),
            "",
            "push-server",
            "push",
            T0 + HOUR_NS,
            99,
        ));
        let (_dir, store) = store_with(rows).await;
        let batches = run(
            &store,
            "SELECT name, count(*) AS n, max(duration_ns) AS slowest FROM spans GROUP BY name",
            T0,
            T0 + HOUR_NS,
            DEFAULT_MEMORY_LIMIT,
        )
        .await
        .unwrap();
        let rows = to_json_rows(&batches).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0]["n"], 10);
        assert_eq!(rows[0]["slowest"], 10_000);
        let csv = render(&batches, Format::Csv).unwrap();
        assert_eq!(csv, "name,n,slowest\npush,10,10000\n");
        assert!(render(&batches, Format::Table).unwrap().contains("| push"));
    }

    #[tokio::test]
    async fn an_empty_range_is_an_empty_table_and_bad_sql_says_why() {
        let (_dir, store) = store_with(vec![]).await;
        let batches = run(
            &store,
            "SELECT count(*) AS n FROM spans",
            0,
            1,
            DEFAULT_MEMORY_LIMIT,
        )
        .await
        .unwrap();
        assert_eq!(to_json_rows(&batches).unwrap()[0]["n"], 0);
        let err = run(&store, "SELECT nope FROM spans", 0, 1, DEFAULT_MEMORY_LIMIT)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
    }
}
