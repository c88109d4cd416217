//! Client authentication: HS256 JSON Web Tokens, from [`push_proto::auth`] (feature `jwt`).
//! Kept under `crate::auth::…` so the server's paths read as before the move.

pub use push_proto::auth::*;
