//! Event type declarations (`types.yaml`): name, owner, JSON Schema of the payload, retention,
//! partitions. Parsing validates everything before anything is applied, and every error names
//! the file, the type, the field and (where known) the line.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Longest type name: it becomes part of a topic name (Kafka allows 249 characters) and of
/// object-store paths; 64 keeps both readable.
pub const MAX_NAME_LEN: usize = 64;
/// Most partitions one type may ask for: each partition is one staging file per hour and one
/// watermark the completionist waits on; beyond this, split the type.
pub const MAX_PARTITIONS: i32 = 256;

/// A declaration error; `Display` names file, line, type and field.
#[derive(Debug, thiserror::Error)]
pub enum TypesError {
    /// The file could not be read.
    #[error("{file}: {source}")]
    Read {
        /// The file.
        file: String,
        /// Why.
        source: std::io::Error,
    },
    /// YAML syntax or shape (unknown field, wrong type).
    #[error("{file}:{line}:{column}: {message}")]
    Syntax {
        /// The file.
        file: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// The parser's message (names the field).
        message: String,
    },
    /// A declaration that parses but is not valid.
    #[error("{file}:{line}: type `{name}`: field `{field}`: {message}")]
    Invalid {
        /// The file.
        file: String,
        /// 1-based line of the type's `name:` (0 when not found).
        line: usize,
        /// The type's name.
        name: String,
        /// The field at fault.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// One declared event type, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct EventType {
    /// Unique name: `[a-z0-9_-]`, starts with a letter.
    pub name: String,
    /// Owning team (free text, required: someone answers for the data).
    pub owner: String,
    /// JSON Schema every event's payload must satisfy.
    pub schema: serde_json::Value,
    /// How long Kafka keeps the type's records (`retention.ms`).
    pub retention: Duration,
    /// Partitions of the type's topic: the writer scales up to this many consumers.
    pub partitions: i32,
    /// An existing topic to read instead of the type's own (the platform's receipts): GABO then
    /// ingests it and never creates, changes or deletes it.
    pub source_topic: Option<String>,
    /// For an ingested topic: the payload fields whose values, joined by `:`, make the event
    /// ID (the dedup key). Without them the ID is the record's topic position, which removes
    /// redelivered copies only.
    pub id_fields: Vec<String>,
}

impl EventType {
    /// The Kafka topic the type's events travel on.
    pub fn topic(&self) -> String {
        self.source_topic
            .clone()
            .unwrap_or_else(|| format!("gabo.{}", self.name))
    }

    /// The writer's consumer group.
    pub fn group(&self) -> String {
        format!("gabo-writer.{}", self.name)
    }

    /// The declaration as written, for the store's `{type}/_type.json`.
    pub fn raw(&self) -> RawType {
        RawType {
            name: self.name.clone(),
            owner: self.owner.clone(),
            schema: self.schema.clone(),
            retention: humantime::format_duration(self.retention).to_string(),
            partitions: self.partitions,
            source_topic: self.source_topic.clone(),
            id_fields: self.id_fields.clone(),
        }
    }

    /// Compiles the schema (validated at parse time, so this does not fail for a parsed type).
    pub fn validator(&self) -> jsonschema::Validator {
        jsonschema::validator_for(&self.schema).expect("schema validated when the file was read")
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    types: Vec<RawType>,
}

/// A declaration as written (YAML in `types.yaml`, JSON in the store's `{type}/_type.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawType {
    /// See [`EventType::name`].
    pub name: String,
    /// See [`EventType::owner`].
    pub owner: String,
    /// See [`EventType::schema`].
    pub schema: serde_json::Value,
    /// A duration as written (`7d`).
    pub retention: String,
    /// See [`EventType::partitions`].
    pub partitions: i32,
    /// See [`EventType::source_topic`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_topic: Option<String>,
    /// See [`EventType::id_fields`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub id_fields: Vec<String>,
}

/// Reads and validates a types file.
pub fn load(path: &Path) -> Result<Vec<EventType>, TypesError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| TypesError::Read {
        file: file.clone(),
        source,
    })?;
    parse(&file, &text)
}

/// Parses and validates the text of a types file named `file` (for messages).
pub fn parse(file: &str, text: &str) -> Result<Vec<EventType>, TypesError> {
    let raw: RawFile = serde_yaml_ng::from_str(text).map_err(|e| {
        let (line, column) = e
            .location()
            .map(|l| (l.line(), l.column()))
            .unwrap_or((0, 0));
        TypesError::Syntax {
            file: file.into(),
            line,
            column,
            message: e.to_string(),
        }
    })?;
    let mut out: Vec<EventType> = Vec::with_capacity(raw.types.len());
    for t in raw.types {
        if out.iter().any(|o| o.name == t.name) {
            return Err(TypesError::Invalid {
                file: file.into(),
                line: line_of_name(text, &t.name),
                name: t.name.clone(),
                field: "name",
                message: "declared twice".into(),
            });
        }
        out.push(validate(file, text, t)?);
    }
    Ok(out)
}

/// Validates one declaration; `text` (the file's text) locates its line for messages.
pub fn validate(file: &str, text: &str, t: RawType) -> Result<EventType, TypesError> {
    {
        let invalid = |field: &'static str, message: String| TypesError::Invalid {
            file: file.into(),
            line: line_of_name(text, &t.name),
            name: t.name.clone(),
            field,
            message,
        };
        if let Err(m) = check_name(&t.name) {
            return Err(invalid("name", m));
        }
        if t.owner.trim().is_empty() {
            return Err(invalid("owner", "must not be empty".into()));
        }
        let retention = humantime::parse_duration(&t.retention)
            .map_err(|e| invalid("retention", format!("`{}`: {e}", t.retention)))?;
        if retention < Duration::from_secs(3600) {
            // Shorter than an hour would drop records before their hour can close.
            return Err(invalid("retention", "must be at least 1h".into()));
        }
        if !(1..=MAX_PARTITIONS).contains(&t.partitions) {
            return Err(invalid(
                "partitions",
                format!("{} is not in 1..={MAX_PARTITIONS}", t.partitions),
            ));
        }
        if !t.schema.is_object() {
            return Err(invalid("schema", "must be a JSON Schema object".into()));
        }
        if let Err(e) = jsonschema::validator_for(&t.schema) {
            return Err(invalid("schema", e.to_string()));
        }
        if let Some(s) = &t.source_topic {
            if s.is_empty() || s.len() > 249 {
                return Err(invalid("source_topic", "must be 1..=249 characters".into()));
            }
        }
        if !t.id_fields.is_empty() && t.source_topic.is_none() {
            return Err(invalid(
                "id_fields",
                "only for a type with `source_topic` (gateway events carry `id`)".into(),
            ));
        }
        Ok(EventType {
            name: t.name,
            owner: t.owner,
            schema: t.schema,
            retention,
            partitions: t.partitions,
            source_topic: t.source_topic,
            id_fields: t.id_fields,
        })
    }
}

fn check_name(name: &str) -> Result<(), String> {
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    let starts = name.chars().next().is_some_and(|c| c.is_ascii_lowercase());
    if name.is_empty() || name.len() > MAX_NAME_LEN || !ok_chars || !starts {
        return Err(format!(
            "`{name}` must be 1..={MAX_NAME_LEN} of [a-z0-9_-], starting with a letter \
             (it names a topic and a storage path)"
        ));
    }
    Ok(())
}

/// The 1-based line of `name: <name>` in the file, 0 when not found: good enough to point a
/// reader at the right declaration without a span-tracking YAML parser.
fn line_of_name(text: &str, name: &str) -> usize {
    text.lines()
        .position(|l| {
            let l = l.trim_start().trim_start_matches("- ").trim();
            l.strip_prefix("name:")
                .map(|v| v.trim().trim_matches(['"', '\'']) == name)
                .unwrap_or(false)
        })
        .map(|i| i + 1)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
types:
  - name: clicks
    owner: growth
    retention: 7d
    partitions: 3
    schema:
      type: object
      required: [user]
      properties:
        user: { type: string }
"#;

    #[test]
    fn parses_a_valid_file() {
        let t = parse("t.yaml", GOOD).unwrap();
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].name, "clicks");
        assert_eq!(t[0].topic(), "gabo.clicks");
        assert_eq!(t[0].group(), "gabo-writer.clicks");
        assert_eq!(t[0].retention, Duration::from_secs(7 * 86400));
        assert!(t[0].validator().is_valid(&serde_json::json!({"user": "u"})));
        assert!(!t[0].validator().is_valid(&serde_json::json!({"user": 1})));
    }

    #[test]
    fn bad_schema_names_type_field_and_line() {
        let text = GOOD.replace("type: string", "type: strung");
        let e = parse("t.yaml", &text).unwrap_err().to_string();
        assert!(
            e.starts_with("t.yaml:3: type `clicks`: field `schema`"),
            "{e}"
        );
    }

    #[test]
    fn bad_fields_are_named() {
        let cases = [
            ("partitions: 3", "partitions: 0", "field `partitions`"),
            ("retention: 7d", "retention: 10m", "field `retention`"),
            ("retention: 7d", "retention: soon", "field `retention`"),
            ("name: clicks", "name: Clicks!", "field `name`"),
            ("owner: growth", "owner: ''", "field `owner`"),
        ];
        for (from, to, want) in cases {
            let e = parse("t.yaml", &GOOD.replace(from, to))
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{to}: {e}");
        }
    }

    #[test]
    fn unknown_or_missing_fields_name_line_and_field() {
        let e = parse("t.yaml", &GOOD.replace("owner: growth", "ownr: growth"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("t.yaml:4:"), "{e}");
        assert!(e.contains("ownr"), "{e}");
    }

    #[test]
    fn duplicate_names_are_refused() {
        let two = format!("{GOOD}{}", GOOD.replace("types:\n", ""));
        let e = parse("t.yaml", &two).unwrap_err().to_string();
        assert!(e.contains("declared twice"), "{e}");
    }
}
