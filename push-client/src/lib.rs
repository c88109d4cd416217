//! push-client: a small async client for push-server, for apps, services and tools.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use push_client::{Options, Session, Transport, Update};
//! let server = "127.0.0.1:8080".parse()?;
//! // The token source is called before every connection, so it can refresh an expiring token.
//! let mut session = Session::connect(Options::new(server, Transport::Ws), || {
//!     std::env::var("PUSH_TOKEN").unwrap_or_default()
//! })
//! .await?;
//! loop {
//!     match session.next().await? {
//!         Update::Message(m) => println!("{}: {}", m.id, m.data), // acknowledged already
//!         Update::Gap { after, .. } => println!("messages after {after} were lost: refresh"),
//!         other => println!("{other:?}"),
//!     }
//! }
//! # }
//! ```
//!
//! Layers, lowest first; a module uses only those above it:
//!
//! | module | role |
//! |---|---|
//! | [`conn`] | one connection: handshake, `hello`, events; lean enough for a load generator's ~20,000 per process (loadtest and bench use it) |
//! | [`session`] | [`Session`]: one user's messages across connections: resume by ID, acks, rotation and drain handled new connection first, reconnects with jittered backoff |
//!
//! The wire itself is `push-proto`'s; the protocol is documented in `docs/protocol.md`.

pub mod conn;
pub mod session;

pub use conn::{Conn, ConnectError, Event};
pub use push_proto::message::Hello;
pub use push_proto::Transport;
pub use session::{Backoff, Message, Options, Session, SessionError, Update};
