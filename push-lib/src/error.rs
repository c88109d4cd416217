//! Typed errors of the client: what failed, and whether trying again can help.

use crate::envelope::EnvelopeError;

/// Why a send failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The message itself is unacceptable (empty user, oversized ID, ...): do not retry.
    #[error("invalid message: {0}")]
    Envelope(#[from] EnvelopeError),
    /// The Kafka producer could not be created from its configuration.
    #[error("Kafka producer configuration: {0}")]
    KafkaConfig(#[source] rdkafka::error::KafkaError),
    /// The broker did not acknowledge the message (after librdkafka's own retries, within
    /// `message.timeout.ms`), or the local queue stayed full.
    #[error("Kafka did not accept the message for topic {topic:?}: {source}")]
    Kafka {
        /// The topic written to.
        topic: String,
        /// librdkafka's error.
        #[source]
        source: rdkafka::error::KafkaError,
    },
    /// The producer was dropped before the broker answered.
    #[error("Kafka producer shut down before the broker acknowledged the message")]
    Canceled,
    /// The direct transport's URL is not usable.
    #[error("invalid push-server URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The push-server could not be reached (connect, I/O or timeout).
    #[error("push-server {addr} unreachable: {reason}")]
    Unreachable {
        /// The server's address.
        addr: String,
        /// What failed.
        reason: String,
    },
    /// The push-server answered with an error status.
    #[error("push-server answered {status}: {body}")]
    Http {
        /// HTTP status code (401: wrong admin token; 413: batch too large).
        status: u16,
        /// The answer's body, which names the problem.
        body: String,
    },
    /// The message was not sent because of another one in the same batch.
    #[error("not sent: {0}")]
    NotSent(String),
    /// The push-server's answer could not be understood.
    #[error("unexpected answer from push-server: {0}")]
    BadResponse(String),
    /// The message was accepted but no client acknowledged it in time. It may still be
    /// delivered (it is kept in the user's history for their next resume).
    #[error("no delivery receipt for message {id} within {waited:?}")]
    ReceiptTimeout {
        /// The message's ID.
        id: crate::envelope::MessageId,
        /// How long the caller waited.
        waited: std::time::Duration,
    },
}

impl Error {
    /// Whether sending the same message again may succeed (a transient failure), as opposed
    /// to a message or configuration that will fail every time.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Kafka { .. } | Error::Canceled | Error::Unreachable { .. } => true,
            Error::Http { status, .. } => *status >= 500,
            Error::Envelope(_)
            | Error::KafkaConfig(_)
            | Error::InvalidUrl { .. }
            | Error::NotSent(_)
            | Error::BadResponse(_)
            | Error::ReceiptTimeout { .. } => false,
        }
    }

    /// A copy for each message of a failed batch request. The variants a request can fail
    /// with are copied exactly; the others (never produced by a request) become `NotSent`.
    pub(crate) fn replicate(&self) -> Error {
        match self {
            Error::Unreachable { addr, reason } => Error::Unreachable {
                addr: addr.clone(),
                reason: reason.clone(),
            },
            Error::Http { status, body } => Error::Http {
                status: *status,
                body: body.clone(),
            },
            Error::BadResponse(m) => Error::BadResponse(m.clone()),
            other => Error::NotSent(other.to_string()),
        }
    }
}

/// `Result` with the client's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
