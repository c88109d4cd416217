//! Writes the benchmark's tree: N hourly datasets × H hours of GABO-style buckets (a JSON
//! `_SUCCESS` marker each; every 20th partition left missing) and their declarations.
//!
//! ```sh
//! cargo run --release -p datamon --example bench_tree -- /tmp/dm-bench 10000 48 2026-11-29T14:30:00Z
//! /usr/bin/time -v target/release/datamon --declarations /tmp/dm-bench/bench.yaml --root /tmp/dm-bench/data \
//!     --state /tmp/dm-bench/state.sqlite --now 2026-11-29T14:30:00Z check
//! ```

use std::fmt::Write as _;
use std::path::PathBuf;

use chrono::{DateTime, Duration, Utc};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [out, datasets, hours, now] = args.as_slice() else {
        anyhow::bail!("usage: bench_tree OUT_DIR DATASETS HOURS NOW(RFC3339)");
    };
    let out = PathBuf::from(out);
    let datasets: usize = datasets.parse()?;
    let hours: i64 = hours.parse()?;
    let now: DateTime<Utc> = now.parse()?;
    let root = out.join("data");
    let mut yaml = String::from("datasets:\n");
    for i in 0..datasets {
        let _ = write!(
            yaml,
            "  - id: bench.d{i}\n    owner: {{ team: team{}, contact: t@example.com }}\n    \
             location: \"file://{{root}}/d{i}/{{date}}/{{hour}}/\"\n    partitioning: hourly\n    sla: PT1H\n",
            i % 50
        );
        for h in 0..hours {
            if (i as i64 + h) % 20 == 0 {
                continue; // missing
            }
            let start = datamon::partition::Partitioning::Hourly.floor(now) - Duration::hours(h);
            let dir = root
                .join(format!("d{i}"))
                .join(start.format("%Y-%m-%d").to_string())
                .join(start.format("%H").to_string());
            std::fs::create_dir_all(&dir)?;
            let landed = start + Duration::minutes(70);
            std::fs::write(
                dir.join("_SUCCESS"),
                format!(
                    r#"{{"type":"d{i}","hour":"{}","completed_at":"{}","accepted":1,"staged":1,"unique":1,"duplicates":0,"late":0}}"#,
                    start.format("%Y-%m-%dT%H"),
                    landed.to_rfc3339()
                ),
            )?;
        }
    }
    std::fs::write(out.join("bench.yaml"), yaml)?;
    println!(
        "wrote {datasets} datasets × {hours} hours under {}",
        root.display()
    );
    Ok(())
}
