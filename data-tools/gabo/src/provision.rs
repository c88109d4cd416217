//! Provisioning: what each declared type needs (its topic, its writer's consumer group, its
//! output location) compared with what exists, as a plan ([`plan`], pure) that `gabo apply`
//! prints first and then carries out with rdkafka's admin client and the output store.
//! Applying the same file twice finds nothing to change.
//!
//! The consumer group needs no creation: it exists from the writer's first commit, and `gabo
//! delete` removes it. The output location is the `{type}/` prefix; its `_type.json` holds the
//! applied declaration, which `gabo serve` reads.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use rdkafka::admin::{
    AdminClient, AdminOptions, AlterConfig, NewPartitions, NewTopic, ResourceSpecifier,
    TopicReplication,
};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;

use crate::store::Store;
use crate::types::{EventType, RawType};

/// A topic as it exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopicState {
    /// Its partitions.
    pub partitions: i32,
    /// Its `retention.ms`, when the broker told it.
    pub retention_ms: Option<i64>,
}

/// One step of a plan.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// Create the type's topic.
    CreateTopic {
        /// Topic.
        topic: String,
        /// Partitions.
        partitions: i32,
        /// `retention.ms`.
        retention_ms: i64,
    },
    /// Grow the topic.
    AddPartitions {
        /// Topic.
        topic: String,
        /// Now.
        from: i32,
        /// Declared.
        to: i32,
    },
    /// Change the topic's retention.
    SetRetention {
        /// Topic.
        topic: String,
        /// Now.
        from: i64,
        /// Declared.
        to: i64,
    },
    /// Write the declaration to `{type}/_type.json` (the output location).
    WriteDeclaration {
        /// The declaration.
        raw: RawType,
        /// First time (creates the location) or a change (owner, schema, …).
        first: bool,
    },
    /// Cannot be applied; nothing in the plan is applied.
    Refuse {
        /// Type.
        name: String,
        /// Why.
        why: String,
    },
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::CreateTopic {
                topic,
                partitions,
                retention_ms,
            } => write!(
                f,
                "+ topic {topic}: {partitions} partitions, retention {}",
                humantime::format_duration(Duration::from_millis(*retention_ms as u64))
            ),
            Change::AddPartitions { topic, from, to } => {
                write!(f, "~ topic {topic}: partitions {from} -> {to}")
            }
            Change::SetRetention { topic, from, to } => write!(
                f,
                "~ topic {topic}: retention {} -> {}",
                humantime::format_duration(Duration::from_millis(*from as u64)),
                humantime::format_duration(Duration::from_millis(*to as u64))
            ),
            Change::WriteDeclaration { raw, first: true } => write!(
                f,
                "+ type {}: output location {}/, consumer group gabo-writer.{} (owner {})",
                raw.name, raw.name, raw.name, raw.owner
            ),
            Change::WriteDeclaration { raw, first: false } => {
                write!(
                    f,
                    "~ type {}: declaration changed (owner, schema or limits)",
                    raw.name
                )
            }
            Change::Refuse { name, why } => write!(f, "! type {name}: {why}"),
        }
    }
}

/// What must change so that `types` exist as declared.
pub fn plan(
    types: &[EventType],
    topics: &HashMap<String, TopicState>,
    applied: &HashMap<String, RawType>,
) -> Vec<Change> {
    let mut out = Vec::new();
    for t in types {
        let topic = t.topic();
        let retention_ms = t.retention.as_millis() as i64;
        match (topics.get(&topic), &t.source_topic) {
            (None, Some(_)) => out.push(Change::Refuse {
                name: t.name.clone(),
                why: format!("source topic {topic} does not exist (GABO never creates it)"),
            }),
            (Some(_), Some(_)) => {} // not ours: never changed
            (None, None) => out.push(Change::CreateTopic {
                topic,
                partitions: t.partitions,
                retention_ms,
            }),
            (Some(s), None) => {
                if s.partitions > t.partitions {
                    out.push(Change::Refuse {
                        name: t.name.clone(),
                        why: format!(
                            "topic {topic} has {} partitions; Kafka cannot reduce them to {}",
                            s.partitions, t.partitions
                        ),
                    });
                } else if s.partitions < t.partitions {
                    out.push(Change::AddPartitions {
                        topic: topic.clone(),
                        from: s.partitions,
                        to: t.partitions,
                    });
                }
                if let Some(from) = s.retention_ms {
                    if from != retention_ms {
                        out.push(Change::SetRetention {
                            topic,
                            from,
                            to: retention_ms,
                        });
                    }
                }
            }
        }
        let raw = t.raw();
        match applied.get(&t.name) {
            Some(old) if *old == raw => {}
            old => out.push(Change::WriteDeclaration {
                raw,
                first: old.is_none(),
            }),
        }
    }
    out
}

/// A Kafka admin connection.
pub struct Admin {
    client: AdminClient<DefaultClientContext>,
    /// Replication of created topics (-1: the broker's default).
    pub replication: i32,
    /// How long one admin request (create, describe, alter, delete) may take: see
    /// [`ADMIN_TIMEOUT`].
    pub timeout: Duration,
}

impl fmt::Debug for Admin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admin").finish_non_exhaustive()
    }
}

/// How long one admin request may take by default (`--admin-timeout`), and the metadata
/// request always: a broker busy creating topics answers within seconds. A broker that lacks
/// a request (librdkafka's mock has no DescribeConfigs or DeleteTopics) never answers it, and
/// each such request waits this long.
pub const ADMIN_TIMEOUT: Duration = Duration::from_secs(15);

impl Admin {
    /// Connects to `brokers` with extra librdkafka settings.
    pub fn connect(brokers: &str, extra: &[(String, String)]) -> anyhow::Result<Self> {
        let mut cc = ClientConfig::new();
        cc.set("bootstrap.servers", brokers);
        for (k, v) in extra {
            cc.set(k, v);
        }
        Ok(Self {
            client: cc.create()?,
            replication: -1,
            timeout: ADMIN_TIMEOUT,
        })
    }

    fn opts(&self) -> AdminOptions {
        AdminOptions::new().request_timeout(Some(self.timeout))
    }

    /// The topics of `types` that exist, with partitions and, when `retention` is asked for
    /// and the broker answers DescribeConfigs, the retention of the topics GABO owns (an
    /// ingested topic's retention is never compared: it is not GABO's to change).
    pub async fn topics(
        &self,
        types: &[EventType],
        retention: bool,
    ) -> anyhow::Result<HashMap<String, TopicState>> {
        let md = tokio::task::block_in_place(|| {
            self.client.inner().fetch_metadata(None, ADMIN_TIMEOUT)
        })?;
        let mut out = HashMap::new();
        for t in types {
            let topic = t.topic();
            let Some(m) = md
                .topics()
                .iter()
                .find(|m| m.name() == topic && m.error().is_none())
            else {
                continue;
            };
            let retention_ms = if retention && t.source_topic.is_none() {
                self.retention(&topic).await
            } else {
                None
            };
            out.insert(
                topic,
                TopicState {
                    partitions: m.partitions().len() as i32,
                    retention_ms,
                },
            );
        }
        Ok(out)
    }

    async fn retention(&self, topic: &str) -> Option<i64> {
        let r = self
            .client
            .describe_configs(&[ResourceSpecifier::Topic(topic)], &self.opts())
            .await;
        match r {
            Ok(v) => v
                .into_iter()
                .next()?
                .ok()?
                .get("retention.ms")?
                .value
                .as_ref()?
                .parse()
                .ok(),
            Err(e) => {
                // librdkafka's mock cluster does not answer DescribeConfigs: retention is then
                // left as it is rather than guessed.
                tracing::warn!(%e, topic, "retention unknown; not compared");
                None
            }
        }
    }

    /// Carries out `changes` (none when any is a refusal).
    pub async fn apply(&self, changes: &[Change], store: &Store) -> anyhow::Result<()> {
        if let Some(r) = changes.iter().find(|c| matches!(c, Change::Refuse { .. })) {
            anyhow::bail!("nothing applied: {r}");
        }
        for c in changes {
            match c {
                Change::CreateTopic {
                    topic,
                    partitions,
                    retention_ms,
                } => {
                    let ms = retention_ms.to_string();
                    let nt = NewTopic::new(
                        topic,
                        *partitions,
                        TopicReplication::Fixed(self.replication),
                    )
                    .set("retention.ms", &ms);
                    for r in self.client.create_topics(&[nt], &self.opts()).await? {
                        r.map_err(|(t, e)| anyhow::anyhow!("creating topic {t}: {e}"))?;
                    }
                }
                Change::AddPartitions { topic, to, .. } => {
                    let np = NewPartitions::new(topic, *to as usize);
                    for r in self.client.create_partitions(&[np], &self.opts()).await? {
                        r.map_err(|(t, e)| anyhow::anyhow!("adding partitions to {t}: {e}"))?;
                    }
                }
                Change::SetRetention { topic, to, .. } => {
                    let ms = to.to_string();
                    let ac =
                        AlterConfig::new(ResourceSpecifier::Topic(topic)).set("retention.ms", &ms);
                    for r in self.client.alter_configs(&[ac], &self.opts()).await? {
                        r.map_err(|(_, e)| anyhow::anyhow!("setting retention of {topic}: {e}"))?;
                    }
                }
                Change::WriteDeclaration { raw, .. } => {
                    store
                        .put(
                            &format!("{}/_type.json", raw.name),
                            serde_json::to_vec_pretty(raw)?,
                        )
                        .await?;
                }
                Change::Refuse { .. } => unreachable!("refusals stop the apply above"),
            }
        }
        Ok(())
    }

    /// Deletes the type's topic (unless ingested) and its writer's consumer group; returns
    /// what was done. A topic that cannot be deleted stops here with an error (the caller
    /// then keeps the output location, so the type stays whole and the delete can be
    /// retried); a consumer group that cannot be deleted is reported and skipped (a group
    /// left behind holds only offsets, and a type created again under the name starts from
    /// its topic's beginning).
    pub async fn delete(&self, t: &EventType) -> anyhow::Result<Vec<String>> {
        use rdkafka::types::RDKafkaErrorCode;
        let mut done = Vec::new();
        if t.source_topic.is_none() {
            let topic = t.topic();
            let results = self
                .client
                .delete_topics(&[topic.as_str()], &self.opts())
                .await
                .map_err(|e| anyhow::anyhow!("deleting topic {topic}: {e}; nothing deleted"))?;
            for r in results {
                match r {
                    Ok(_) => done.push(format!("deleted topic {topic}")),
                    Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {
                        done.push(format!("topic {topic} was already gone"))
                    }
                    Err((_, e)) => {
                        anyhow::bail!("deleting topic {topic}: {e}; nothing deleted")
                    }
                }
            }
        }
        let group = t.group();
        match self
            .client
            .delete_groups(&[group.as_str()], &self.opts())
            .await
        {
            Ok(rs) => {
                for r in rs {
                    match r {
                        Ok(_) => done.push(format!("deleted consumer group {group}")),
                        Err((_, e)) => {
                            done.push(format!("consumer group {group} not deleted: {e}"))
                        }
                    }
                }
            }
            Err(e) => done.push(format!("consumer group {group} not deleted: {e}")),
        }
        Ok(done)
    }
}

/// The declarations applied to `store` (each `{type}/_type.json`), validated again.
pub async fn applied(store: &Store) -> anyhow::Result<Vec<EventType>> {
    let mut out = Vec::new();
    for dir in store.top_level().await? {
        let p = format!("{dir}/_type.json");
        let Some(b) = store.get(&p).await? else {
            continue; // not a type's location
        };
        let raw: RawType = serde_json::from_slice(&b).map_err(|e| anyhow::anyhow!("{p}: {e}"))?;
        out.push(crate::types::validate(&p, "", raw)?);
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn types() -> Vec<EventType> {
        crate::types::parse(
            "t.yaml",
            r#"
types:
  - name: a
    owner: o
    retention: 1d
    partitions: 2
    schema: {type: object}
  - name: r
    owner: o
    retention: 1d
    partitions: 1
    source_topic: push-receipts
    schema: {type: object}
"#,
        )
        .unwrap()
    }

    #[test]
    fn first_apply_creates_second_changes_nothing() {
        let t = types();
        let mut topics = HashMap::new();
        topics.insert(
            "push-receipts".to_string(),
            TopicState {
                partitions: 3,
                retention_ms: None,
            },
        );
        let p = plan(&t, &topics, &HashMap::new());
        assert_eq!(p.len(), 3, "{p:?}");
        assert_eq!(
            p[0],
            Change::CreateTopic {
                topic: "gabo.a".into(),
                partitions: 2,
                retention_ms: 86_400_000
            }
        );
        assert!(p[0]
            .to_string()
            .starts_with("+ topic gabo.a: 2 partitions, retention 1day"));
        topics.insert(
            "gabo.a".into(),
            TopicState {
                partitions: 2,
                retention_ms: Some(86_400_000),
            },
        );
        let applied = t.iter().map(|t| (t.name.clone(), t.raw())).collect();
        assert_eq!(plan(&t, &topics, &applied), vec![]);
    }

    #[test]
    fn changes_and_refusals() {
        let t = types();
        let mut topics = HashMap::new();
        topics.insert(
            "gabo.a".to_string(),
            TopicState {
                partitions: 1,
                retention_ms: Some(1000),
            },
        );
        let applied: HashMap<_, _> = t.iter().map(|t| (t.name.clone(), t.raw())).collect();
        let p = plan(&t, &topics, &applied);
        assert!(matches!(p[0], Change::AddPartitions { from: 1, to: 2, .. }));
        assert!(matches!(p[1], Change::SetRetention { from: 1000, .. }));
        assert!(
            matches!(&p[2], Change::Refuse { name, .. } if name == "r"),
            "{p:?}"
        );
        topics.get_mut("gabo.a").unwrap().partitions = 5;
        let p = plan(&t, &topics, &applied);
        assert!(p[0].to_string().contains("cannot reduce"), "{}", p[0]);
    }
}
