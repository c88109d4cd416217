//! push-lib: what backend services link to push to a user knowing only the user ID.
//!
//! ```no_run
//! # async fn demo() -> Result<(), push_lib::Error> {
//! use push_lib::{KafkaConfig, PushClient, SendOptions};
//! let client = PushClient::kafka(&KafkaConfig::new("127.0.0.1:9092", "push"))?;
//! let receipt = client.send("alice", "your download is ready", &SendOptions::default()).await?;
//! println!("queued as {}", receipt.id);
//! # Ok(()) }
//! ```
//!
//! Layers, lowest first; a layer never uses one above it:
//!
//! | module | role |
//! |---|---|
//! | [`envelope`] | the versioned message envelope (wire format, `docs/envelope.md`), no I/O |
//! | [`error`] | [`Error`]: what failed and whether a retry can help |
//! | [`kafka`] | Kafka transport: idempotent producer, key = user ID, ack = broker ack |
//! | [`direct`] | HTTP to a node's `/internal/v1/deliver`: [`DeliverClient`] (also the message processor's) and [`DirectTransport`] |
//! | [`receipt`] | [`DeliveryReceipt`]s: what push-server publishes when a client acknowledges |
//! | [`client`] | [`PushClient`]: `send`, `enqueue`, `send_batch`, `send_and_wait_receipt` over either transport |
//!
//! The `push-send` binary (`src/bin/push-send.rs`) is the operator and load CLI on top.

pub mod client;
pub mod direct;
pub mod envelope;
pub mod error;
pub mod kafka;
pub mod receipt;

pub use client::{Accepted, PendingSend, PushClient, Receipt, SendOptions};
pub use direct::{DeliverClient, DeliverConfig, DirectTransport, Outcome};
pub use envelope::{Envelope, EnvelopeError, MessageId};
pub use error::{Error, Result};
pub use kafka::{KafkaAck, KafkaConfig, KafkaTransport};
pub use receipt::DeliveryReceipt;
