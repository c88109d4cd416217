//! Typed errors: each says which storage node failed and why.

/// What went wrong in a registry operation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The registry URL could not be understood.
    #[error("invalid registry URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as given, with any password redacted.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A storage node refused, timed out or answered with an error.
    #[error("storage node {} failed: {source}", crate::url::redact(.node))]
    Node {
        /// `host:port` (or the cluster's seed list) of the node.
        node: String,
        /// The client library's error.
        #[source]
        source: redis::RedisError,
    },
    /// A stored value could not be decoded: written by something else, or corrupted.
    #[error("storage node {} holds an undecodable value for user {user:?}: {reason}", crate::url::redact(.node))]
    Corrupt {
        /// The node that returned it.
        node: String,
        /// The user whose entry it is.
        user: String,
        /// The decoder's complaint.
        reason: String,
    },
    /// Too few replicas answered for the requested consistency level (ring backend).
    #[error("{op} needs {needed} of {total} replicas, {succeeded} answered; failed: {}", fmt_failures(.failures))]
    Quorum {
        /// The operation, e.g. `lookup`.
        op: &'static str,
        /// Replicas needed.
        needed: usize,
        /// Replicas that exist for the key.
        total: usize,
        /// Replicas that answered.
        succeeded: usize,
        /// Each failed replica: node and reason.
        failures: Vec<(String, String)>,
    },
    /// `safe_quorum`: enough replicas answered but not enough of them agreed (ring backend).
    /// Read repair has been attempted, so a retry normally succeeds.
    #[error("{op} with safe_quorum: only {agreeing} of the replicas that answered agree, {needed} needed (replicas: {})", crate::url::redact(&.nodes.join(",")))]
    Disagreement {
        /// The operation.
        op: &'static str,
        /// Replicas that agreed with the winning answer.
        agreeing: usize,
        /// Replicas needed.
        needed: usize,
        /// The replicas that answered.
        nodes: Vec<String>,
    },
    /// The memory backend holds as many entries as it was allowed to.
    #[error("memory registry is full ({limit} live entries)")]
    Full {
        /// The configured bound.
        limit: usize,
    },
}

fn fmt_failures(failures: &[(String, String)]) -> String {
    failures
        .iter()
        .map(|(node, why)| format!("{} ({why})", crate::url::redact(node)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `Result` with the registry's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
