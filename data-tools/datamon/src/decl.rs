//! The metadata language: dataset declarations in YAML, validated into a [`DeclSet`].
//!
//! ```yaml
//! datasets:
//!   - id: gabo.receipt
//!     description: Delivery receipts, deduplicated, one Parquet bucket per hour
//!     owner: { team: push-data, contact: push-data@example.com, webhook: http://127.0.0.1:9093/hook }
//!     location: "file://{root}/gabo/receipt/{date}/{hour}/"
//!     partitioning: hourly
//!     marker: _SUCCESS
//!     sla: PT2H
//!     producer: gabo/dedup-receipt
//!     upstream: []
//! ```
//!
//! Every error names the file, the line, the dataset and the field. Loading is all or nothing:
//! [`Declarations::reload`] keeps the previous set live when the new one is invalid.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use chrono::Duration;
use serde::Deserialize;

use crate::partition::Partitioning;

/// One declared dataset, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    /// Unique id, `[A-Za-z0-9._-]+`.
    pub id: String,
    /// What it is, in a sentence.
    pub description: String,
    /// Who answers for it.
    pub owner: Owner,
    /// Location template with `{date}` and (hourly) `{hour}`; `{root}` already filled.
    pub location: String,
    /// Hourly or daily.
    pub partitioning: Partitioning,
    /// Name of the object that says a partition is complete.
    pub marker: String,
    /// Deadline after the end of the period.
    pub sla: Duration,
    /// The SLA as written (`PT2H`), for display.
    pub sla_text: String,
    /// The Styx workflow that produces it, `component/workflow`.
    pub producer: Option<String>,
    /// Ids of the datasets it is computed from.
    pub upstream: Vec<String>,
}

/// The owner of a dataset.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Owner {
    /// Team name, `[A-Za-z0-9._-]+` (it appears in URLs: `/owner/{team}`).
    pub team: String,
    /// A person or list to ask.
    pub contact: String,
    /// Escalation webhook: Alertmanager webhook receiver JSON is POSTed here. A URL ending in
    /// `/api/v2/alerts` is taken as an Alertmanager and gets its alert list instead.
    #[serde(default)]
    pub webhook: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    datasets: Vec<RawDataset>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDataset {
    id: String,
    #[serde(default)]
    description: String,
    owner: Owner,
    location: String,
    partitioning: Partitioning,
    #[serde(default = "default_marker")]
    marker: String,
    sla: String,
    #[serde(default)]
    producer: Option<String>,
    #[serde(default)]
    upstream: Vec<String>,
}

fn default_marker() -> String {
    "_SUCCESS".to_string()
}

/// A declaration that cannot be used. Its `Display` names file, line, dataset and field.
#[derive(Debug, thiserror::Error)]
pub enum DeclError {
    /// The file or directory could not be read.
    #[error("{path}: {source}")]
    Io {
        /// What was read.
        path: PathBuf,
        /// Why it failed.
        source: std::io::Error,
    },
    /// Not YAML, or not the shape of a declaration file (unknown or missing field, wrong type).
    #[error("{path}:{line}: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// 1-based line (0 when the parser gave none).
        line: usize,
        /// The parser's words, with the field path.
        message: String,
    },
    /// Parsed, but a value is not acceptable.
    #[error("{path}:{line}: dataset {dataset:?}: field `{field}`: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// 1-based line of the field (or of the dataset when the field is absent).
        line: usize,
        /// The dataset's id.
        dataset: String,
        /// The field, e.g. `owner.webhook`.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// No declaration files were found.
    #[error("{0}: no *.yaml or *.yml declaration files")]
    Empty(PathBuf),
}

/// A validated set of datasets, keyed by id (sorted, so every view lists them the same way).
#[derive(Clone, Debug, Default)]
pub struct DeclSet {
    /// Datasets by id.
    pub datasets: BTreeMap<String, Dataset>,
}

impl DeclSet {
    /// Loads one file, or every `*.yaml`/`*.yml` file of a directory (sorted by name).
    /// `root` fills `{root}` in location templates.
    pub fn load(path: &Path, root: &str) -> Result<DeclSet, DeclError> {
        let io = |source| DeclError::Io {
            path: path.to_path_buf(),
            source,
        };
        let files = if path.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(io)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
                .collect();
            files.sort();
            if files.is_empty() {
                return Err(DeclError::Empty(path.to_path_buf()));
            }
            files
        } else {
            vec![path.to_path_buf()]
        };
        let mut sources = Vec::new();
        for file in files {
            let text = std::fs::read_to_string(&file).map_err(|source| DeclError::Io {
                path: file.clone(),
                source,
            })?;
            sources.push((file, text));
        }
        let refs: Vec<(&Path, &str)> = sources
            .iter()
            .map(|(p, t)| (p.as_path(), t.as_str()))
            .collect();
        DeclSet::parse(&refs, root)
    }

    /// Parses and validates declaration texts (file name, contents) as one set.
    pub fn parse(sources: &[(&Path, &str)], root: &str) -> Result<DeclSet, DeclError> {
        let mut set = DeclSet::default();
        // (dataset id) → (file, text) for upstream errors, which need every file read first.
        let mut origin: BTreeMap<String, (PathBuf, &str)> = BTreeMap::new();
        for (path, text) in sources {
            let raw: RawFile = serde_yaml_ng::from_str(text).map_err(|e| DeclError::Syntax {
                path: path.to_path_buf(),
                line: e.location().map(|l| l.line()).unwrap_or(0),
                message: e.to_string(),
            })?;
            for raw in raw.datasets {
                let id = raw.id.clone();
                let invalid = |field: &str, message: String| DeclError::Invalid {
                    path: path.to_path_buf(),
                    line: find_line(text, &id, field),
                    dataset: id.clone(),
                    field: field.to_string(),
                    message,
                };
                let dataset = validate(raw, root).map_err(|(f, m)| invalid(f, m))?;
                if set.datasets.contains_key(&dataset.id) {
                    return Err(invalid("id", "declared twice".to_string()));
                }
                origin.insert(dataset.id.clone(), (path.to_path_buf(), text));
                set.datasets.insert(dataset.id.clone(), dataset);
            }
        }
        for d in set.datasets.values() {
            let mut seen = HashSet::new();
            for up in &d.upstream {
                let problem = if up == &d.id {
                    Some("a dataset cannot be its own upstream")
                } else if !set.datasets.contains_key(up) {
                    Some("names no declared dataset")
                } else if !seen.insert(up) {
                    Some("listed twice")
                } else {
                    None
                };
                if let Some(problem) = problem {
                    let (path, text) = &origin[&d.id];
                    return Err(DeclError::Invalid {
                        path: path.clone(),
                        line: find_line(text, &d.id, "upstream"),
                        dataset: d.id.clone(),
                        field: "upstream".to_string(),
                        message: format!("{up:?} {problem}"),
                    });
                }
            }
        }
        Ok(set)
    }

    /// Datasets of one team, or all when `owner` is `None`.
    pub fn by_owner<'a>(&'a self, owner: Option<&'a str>) -> impl Iterator<Item = &'a Dataset> {
        self.datasets
            .values()
            .filter(move |d| owner.is_none_or(|o| d.owner.team == o))
    }

    /// Team names, sorted, once each.
    pub fn teams(&self) -> Vec<String> {
        let mut t: Vec<String> = self
            .datasets
            .values()
            .map(|d| d.owner.team.clone())
            .collect();
        t.sort();
        t.dedup();
        t
    }
}

fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// Validates one dataset; the error is (field, message).
fn validate(raw: RawDataset, root: &str) -> Result<Dataset, (&'static str, String)> {
    if !is_name(&raw.id) {
        return Err((
            "id",
            "must be non-empty letters, digits, '.', '_' or '-'".into(),
        ));
    }
    if !is_name(&raw.owner.team) {
        return Err((
            "owner.team",
            "must be non-empty letters, digits, '.', '_' or '-'".into(),
        ));
    }
    if raw.owner.contact.trim().is_empty() {
        return Err(("owner.contact", "must not be empty".into()));
    }
    if let Some(hook) = &raw.owner.webhook {
        match url::Url::parse(hook) {
            Ok(u) if matches!(u.scheme(), "http" | "https") => {}
            Ok(u) => {
                return Err((
                    "owner.webhook",
                    format!("scheme {:?} is not http or https", u.scheme()),
                ))
            }
            Err(e) => return Err(("owner.webhook", format!("{hook:?} is not a URL: {e}"))),
        }
    }
    let location = raw.location.replace("{root}", root);
    if !location.contains("{date}") {
        return Err(("location", "the template must contain {date}".into()));
    }
    match raw.partitioning {
        Partitioning::Hourly if !location.contains("{hour}") => {
            return Err((
                "location",
                "an hourly dataset's template must contain {hour}".into(),
            ))
        }
        Partitioning::Daily if location.contains("{hour}") => {
            return Err((
                "location",
                "a daily dataset's template cannot contain {hour}".into(),
            ))
        }
        _ => {}
    }
    let sample = location
        .replace("{date}", "2026-01-01")
        .replace("{hour}", "00");
    crate::store::parse_location(&sample).map_err(|e| ("location", e.to_string()))?;
    if raw.marker.is_empty() || raw.marker.contains('/') {
        return Err((
            "marker",
            "must be a non-empty object name without '/'".into(),
        ));
    }
    let sla = parse_iso_duration(&raw.sla).map_err(|m| ("sla", m))?;
    if let Some(p) = &raw.producer {
        let parts: Vec<&str> = p.split('/').collect();
        if parts.len() != 2 || parts.iter().any(|s| s.is_empty()) {
            return Err((
                "producer",
                format!("{p:?} is not a Styx workflow id `component/workflow`"),
            ));
        }
    }
    Ok(Dataset {
        id: raw.id,
        description: raw.description,
        owner: raw.owner,
        location,
        partitioning: raw.partitioning,
        marker: raw.marker,
        sla,
        sla_text: raw.sla,
        producer: raw.producer,
        upstream: raw.upstream,
    })
}

/// Parses an ISO-8601 duration of fixed length: `PnW`, `PnDTnHnMnS` (any part may be left
/// out). Years and months are refused: their length depends on the calendar, a deadline must not.
pub fn parse_iso_duration(s: &str) -> Result<Duration, String> {
    let bad =
        |why: &str| format!("{s:?} is not an ISO-8601 duration like PT2H, PT90M or P1DT6H: {why}");
    let rest = s
        .strip_prefix('P')
        .ok_or_else(|| bad("it must start with P"))?;
    if rest.is_empty() {
        return Err(bad("no amount"));
    }
    let (date, time) = match rest.split_once('T') {
        Some((_, "")) => return Err(bad("nothing after T")),
        Some((d, t)) => (d, t),
        None => (rest, ""),
    };
    let mut total = Duration::zero();
    for (part, units) in [(date, "WD"), (time, "HMS")] {
        let mut num = String::new();
        let mut last_unit = 0;
        for c in part.chars() {
            if c.is_ascii_digit() {
                num.push(c);
                continue;
            }
            let idx = match units.find(c) {
                Some(i) => i + 1,
                None if matches!(c, 'Y') || (c == 'M' && units == "WD") => {
                    return Err(bad("years and months have no fixed length"))
                }
                None => return Err(bad(&format!("unexpected {c:?}"))),
            };
            if num.is_empty() || idx <= last_unit {
                return Err(bad("units must each have a number and come in order"));
            }
            last_unit = idx;
            let n: i64 = num.parse().map_err(|_| bad("number too large"))?;
            num.clear();
            let unit = match c {
                'W' => Duration::weeks(1),
                'D' => Duration::days(1),
                'H' => Duration::hours(1),
                'M' => Duration::minutes(1),
                _ => Duration::seconds(1),
            };
            total += unit * i32::try_from(n).map_err(|_| bad("number too large"))?;
        }
        if !num.is_empty() {
            return Err(bad("a number without a unit"));
        }
    }
    Ok(total)
}

/// The 1-based line of `field` in the block of dataset `id`, or of its `id:` line, or 0.
fn find_line(text: &str, id: &str, field: &str) -> usize {
    let leaf = field.rsplit('.').next().unwrap_or(field);
    let key = |line: &str| -> Option<(String, String)> {
        let l = line.trim_start().trim_start_matches("- ").trim_start();
        let (k, v) = l.split_once(':')?;
        Some((
            k.trim().to_string(),
            v.trim().trim_matches(['"', '\'']).to_string(),
        ))
    };
    let lines: Vec<&str> = text.lines().collect();
    let Some(start) = lines
        .iter()
        .position(|l| key(l).is_some_and(|(k, v)| k == "id" && v == id))
    else {
        return 0;
    };
    for (i, line) in lines.iter().enumerate().skip(start) {
        if i > start
            && key(line).is_some_and(|(k, _)| k == "id")
            && line.trim_start().starts_with("- ")
        {
            break;
        }
        if key(line).is_some_and(|(k, _)| k == leaf) {
            return i + 1;
        }
        // flow mappings: `owner: { team: x, webhook: y }`
        if line.contains(&format!("{leaf}:")) && line.contains('{') {
            return i + 1;
        }
    }
    start + 1
}

/// The live declaration set, replaced only by a valid one.
#[derive(Clone, Debug)]
pub struct Declarations {
    path: PathBuf,
    root: String,
    current: Arc<RwLock<Arc<DeclSet>>>,
}

impl Declarations {
    /// Loads the first set; an invalid first set is an error (there is nothing to keep).
    pub fn open(path: &Path, root: &str) -> Result<Declarations, DeclError> {
        let set = DeclSet::load(path, root)?;
        Ok(Declarations {
            path: path.to_path_buf(),
            root: root.to_string(),
            current: Arc::new(RwLock::new(Arc::new(set))),
        })
    }

    /// The live set.
    pub fn current(&self) -> Arc<DeclSet> {
        self.current.read().expect("lock poisoned").clone()
    }

    /// Reads the files again. When they are invalid, the error is returned and the previous
    /// set stays live.
    pub fn reload(&self) -> Result<Arc<DeclSet>, DeclError> {
        let set = Arc::new(DeclSet::load(&self.path, &self.root)?);
        *self.current.write().expect("lock poisoned") = set.clone();
        Ok(set)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
datasets:
  - id: gabo.receipt
    description: receipts
    owner: { team: push-data, contact: a@b.c, webhook: "http://127.0.0.1:1/hook" }
    location: "file://{root}/gabo/receipt/{date}/{hour}/"
    partitioning: hourly
    sla: PT2H
    producer: gabo/dedup-receipt
  - id: daily.report
    owner:
      team: analytics
      contact: c@d.e
    location: "/data/report/{date}/"
    partitioning: daily
    marker: DONE
    sla: P1DT6H
    upstream: [gabo.receipt]
"#;

    fn parse(text: &str) -> Result<DeclSet, DeclError> {
        DeclSet::parse(&[(Path::new("decl/test.yaml"), text)], "/srv")
    }

    #[test]
    fn good_file_loads_with_defaults() {
        let set = parse(GOOD).unwrap();
        let r = &set.datasets["gabo.receipt"];
        assert_eq!(r.location, "file:///srv/gabo/receipt/{date}/{hour}/");
        assert_eq!(r.marker, "_SUCCESS");
        assert_eq!(r.sla, Duration::hours(2));
        let d = &set.datasets["daily.report"];
        assert_eq!(d.sla, Duration::hours(30));
        assert_eq!(d.upstream, ["gabo.receipt"]);
        assert_eq!(set.teams(), ["analytics", "push-data"]);
        assert_eq!(set.by_owner(Some("analytics")).count(), 1);
    }

    fn err(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_file_line_dataset_and_field() {
        let e = err(&GOOD.replace("sla: PT2H", "sla: 2 hours"));
        assert!(
            e.starts_with("decl/test.yaml:8: dataset \"gabo.receipt\": field `sla`"),
            "{e}"
        );

        let e = err(&GOOD.replace("http://127.0.0.1:1/hook", "ftp://x/"));
        assert!(
            e.starts_with("decl/test.yaml:5: dataset \"gabo.receipt\": field `owner.webhook`"),
            "{e}"
        );

        let e = err(&GOOD.replace("[gabo.receipt]", "[nope]"));
        assert!(
            e.starts_with("decl/test.yaml:18: dataset \"daily.report\": field `upstream`"),
            "{e}"
        );
        assert!(e.contains("\"nope\" names no declared dataset"), "{e}");

        let e = err(&GOOD.replace("/data/report/{date}/", "/data/report/{date}/{hour}/"));
        assert!(
            e.contains("dataset \"daily.report\": field `location`"),
            "{e}"
        );

        let e = err(&GOOD.replace("producer: gabo/dedup-receipt", "producer: gabo"));
        assert!(e.contains("field `producer`"), "{e}");

        let e = err(&GOOD.replace("id: daily.report", "id: gabo.receipt"));
        assert!(e.contains("field `id`: declared twice"), "{e}");
    }

    #[test]
    fn syntax_errors_name_file_line_and_field() {
        let e = err(&GOOD.replace("partitioning: daily", "partitioning: weekly"));
        assert!(e.starts_with("decl/test.yaml:15:"), "{e}");
        assert!(e.contains("partitioning"), "{e}");

        let e = err(&GOOD.replace("marker: DONE", "markr: DONE"));
        assert!(e.contains("unknown field `markr`"), "{e}");

        let e = err(&GOOD.replace("      contact: c@d.e\n", ""));
        assert!(e.contains("missing field `contact`"), "{e}");
    }

    #[test]
    fn iso_durations() {
        for (s, secs) in [
            ("PT2H", 7200),
            ("PT90M", 5400),
            ("P1D", 86400),
            ("P1W", 604_800),
            ("PT1H30M15S", 5415),
            ("P1DT1S", 86401),
        ] {
            assert_eq!(parse_iso_duration(s).unwrap().num_seconds(), secs, "{s}");
        }
        for s in [
            "", "P", "PT", "2H", "PT2", "P1M", "P1Y", "PTH", "PT1M1H", "P1H",
        ] {
            assert!(parse_iso_duration(s).is_err(), "{s:?}");
        }
    }

    #[test]
    fn reload_keeps_the_previous_set_when_the_new_one_is_invalid() {
        let dir = std::env::temp_dir().join(format!("datamon-decl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("a.yaml");
        std::fs::write(&file, GOOD).unwrap();
        let decls = Declarations::open(&dir, "/srv").unwrap();
        assert_eq!(decls.current().datasets.len(), 2);

        std::fs::write(&file, GOOD.replace("sla: PT2H", "sla: soon")).unwrap();
        let e = decls.reload().unwrap_err().to_string();
        assert!(
            e.contains("a.yaml:8: dataset \"gabo.receipt\": field `sla`"),
            "{e}"
        );
        assert_eq!(decls.current().datasets.len(), 2, "previous set stays live");
        assert_eq!(
            decls.current().datasets["gabo.receipt"].sla,
            Duration::hours(2)
        );

        std::fs::write(&file, GOOD.replace("sla: PT2H", "sla: PT3H")).unwrap();
        decls.reload().unwrap();
        assert_eq!(
            decls.current().datasets["gabo.receipt"].sla,
            Duration::hours(3)
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
