//! Client authentication: HS256 JSON Web Tokens (RFC 7519).
//!
//! Claims: `sub` is the user ID (required), `did` an optional device or client ID, `exp` the
//! expiry (required unless the server is started with `--allow-tokens-without-exp`: a token
//! without one would be valid for ever), `nbf` (checked when present), and `iss` / `aud` when
//! the server is started with `--token-issuer` / `--token-audience`.
//! Any HS256 JWT library given the same secret makes tokens this accepts.
//!
//! The claims, the ID limit and where a request carries its token are always here; minting
//! and verifying ([`Authenticator`]) need the `jwt` feature, which pulls in `jsonwebtoken`:
//! a crate that only parses messages does not pay for it.

#[cfg(feature = "jwt")]
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[cfg(feature = "jwt")]
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// Longest user or device ID accepted, in bytes. IDs become registry keys and log fields.
pub const MAX_ID_LEN: usize = 256;

/// The claims the server reads from a token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// User ID.
    pub sub: String,
    /// Device or client ID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub did: Option<String>,
    /// Expiry, seconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<u64>,
    /// Issued at, seconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// Not before, seconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
}

/// Why a token was refused. Each is answered with 401 (WebSocket close 4001 once open).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    /// No token in the header, the query, or the WebSocket subprotocol.
    #[error("no token: send `Authorization: Bearer <jwt>`, `?token=<jwt>` or a Sec-WebSocket-Protocol entry")]
    Missing,
    /// The token has expired.
    #[error("token expired")]
    Expired,
    /// Malformed, wrong algorithm, bad signature, or missing claims.
    #[error("invalid token: {0}")]
    Invalid(String),
}

/// Verifies and mints tokens with one shared secret.
#[cfg(feature = "jwt")]
#[derive(Clone)]
pub struct Authenticator {
    decoding: DecodingKey,
    encoding: EncodingKey,
    validation: Validation,
}

#[cfg(feature = "jwt")]
impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator").finish_non_exhaustive()
    }
}

#[cfg(feature = "jwt")]
impl Authenticator {
    /// An authenticator for `secret`. With `require_exp`, tokens without `exp` are refused.
    pub fn new(secret: &[u8], require_exp: bool) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.required_spec_claims.clear();
        validation.required_spec_claims.insert("sub".into());
        if require_exp {
            validation.required_spec_claims.insert("exp".into());
        }
        // Clock skew between the token issuer and this node.
        validation.leeway = 30;
        validation.validate_nbf = true;
        validation.validate_aud = false;
        Self {
            decoding: DecodingKey::from_secret(secret),
            encoding: EncodingKey::from_secret(secret),
            validation,
        }
    }

    /// Requires `iss` to be `issuer` and `aud` to contain `audience` (each when `Some`).
    pub fn with_issuer_audience(mut self, issuer: Option<&str>, audience: Option<&str>) -> Self {
        if let Some(iss) = issuer {
            self.validation.set_issuer(&[iss]);
            self.validation.required_spec_claims.insert("iss".into());
        }
        if let Some(aud) = audience {
            self.validation.set_audience(&[aud]);
            self.validation.validate_aud = true;
            self.validation.required_spec_claims.insert("aud".into());
        }
        self
    }

    /// Verifies `token` and returns its claims.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        use jsonwebtoken::errors::ErrorKind;
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::ImmatureSignature => {
                    AuthError::Invalid("token not valid yet (nbf)".into())
                }
                _ => AuthError::Invalid(e.to_string()),
            })?;
        let claims = data.claims;
        if claims.sub.is_empty() || claims.sub.len() > MAX_ID_LEN {
            return Err(AuthError::Invalid(format!(
                "`sub` must be 1 to {MAX_ID_LEN} bytes"
            )));
        }
        if claims
            .did
            .as_ref()
            .is_some_and(|d| d.is_empty() || d.len() > MAX_ID_LEN)
        {
            return Err(AuthError::Invalid(format!(
                "`did` must be 1 to {MAX_ID_LEN} bytes"
            )));
        }
        Ok(claims)
    }

    /// Mints a token for `user` (and `device`) valid for `ttl`.
    pub fn mint(&self, user: &str, device: Option<&str>, ttl: Duration) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let claims = Claims {
            sub: user.to_owned(),
            did: device.map(str::to_owned),
            exp: Some(now + ttl.as_secs()),
            iat: Some(now),
            nbf: None,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .expect("HS256 signing cannot fail")
    }
}

/// Finds the token in a request: `Authorization: Bearer`, then `?token=`, then a
/// `Sec-WebSocket-Protocol` entry that has the shape of a JWT (three dot-separated parts).
pub fn token_from_request(
    authorization: Option<&str>,
    query_token: Option<String>,
    ws_protocols: Option<&str>,
) -> Option<String> {
    if let Some(auth) = authorization {
        let mut parts = auth.splitn(2, ' ');
        if parts
            .next()
            .is_some_and(|s| s.eq_ignore_ascii_case("bearer"))
        {
            if let Some(t) = parts.next() {
                return Some(t.trim().to_owned());
            }
        }
    }
    if let Some(t) = query_token.filter(|t| !t.is_empty()) {
        return Some(t);
    }
    ws_protocols?
        .split(',')
        .map(str::trim)
        .find(|p| p.split('.').count() == 3)
        .map(str::to_owned)
}

#[cfg(all(test, feature = "jwt"))]
mod tests {
    use super::*;

    #[test]
    fn mint_then_verify() {
        let a = Authenticator::new(b"s3cret", true);
        let t = a.mint("alice", Some("phone"), Duration::from_secs(60));
        let c = a.verify(&t).unwrap();
        assert_eq!(c.sub, "alice");
        assert_eq!(c.did.as_deref(), Some("phone"));
    }

    #[test]
    fn wrong_secret_and_garbage_are_refused() {
        let t = Authenticator::new(b"one", false).mint("u", None, Duration::from_secs(60));
        assert!(matches!(
            Authenticator::new(b"two", false).verify(&t),
            Err(AuthError::Invalid(_))
        ));
        assert!(matches!(
            Authenticator::new(b"one", false).verify("a.b.c"),
            Err(AuthError::Invalid(_))
        ));
    }

    #[test]
    fn expired_tokens_are_refused() {
        let a = Authenticator::new(b"k", false);
        let claims = Claims {
            sub: "u".into(),
            did: None,
            exp: Some(1_000_000),
            iat: None,
            nbf: None,
        };
        let t = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(b"k"),
        )
        .unwrap();
        assert_eq!(a.verify(&t), Err(AuthError::Expired));
    }

    #[test]
    fn exp_is_optional_unless_required() {
        let claims = Claims {
            sub: "u".into(),
            did: None,
            exp: None,
            iat: None,
            nbf: None,
        };
        let t = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(b"k"),
        )
        .unwrap();
        assert!(Authenticator::new(b"k", false).verify(&t).is_ok());
        assert!(Authenticator::new(b"k", true).verify(&t).is_err());
    }

    fn sign(claims: &serde_json::Value, secret: &[u8]) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            claims,
            &EncodingKey::from_secret(secret),
        )
        .unwrap()
    }

    fn unix_now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    #[test]
    fn nbf_in_the_future_is_refused() {
        let a = Authenticator::new(b"k", true);
        let now = unix_now();
        let early = sign(
            &serde_json::json!({"sub": "u", "exp": now + 3600, "nbf": now + 600}),
            b"k",
        );
        assert!(matches!(a.verify(&early), Err(AuthError::Invalid(m)) if m.contains("nbf")));
        let ok = sign(
            &serde_json::json!({"sub": "u", "exp": now + 3600, "nbf": now - 10}),
            b"k",
        );
        assert!(a.verify(&ok).is_ok());
    }

    #[test]
    fn issuer_and_audience_when_configured() {
        let a =
            Authenticator::new(b"k", true).with_issuer_audience(Some("auth.example"), Some("push"));
        let exp = unix_now() + 3600;
        let good = sign(
            &serde_json::json!({"sub": "u", "exp": exp, "iss": "auth.example", "aud": "push"}),
            b"k",
        );
        assert!(a.verify(&good).is_ok());
        for bad in [
            serde_json::json!({"sub": "u", "exp": exp}),
            serde_json::json!({"sub": "u", "exp": exp, "iss": "evil", "aud": "push"}),
            serde_json::json!({"sub": "u", "exp": exp, "iss": "auth.example", "aud": "other"}),
        ] {
            assert!(a.verify(&sign(&bad, b"k")).is_err(), "{bad}");
        }
        // Without the settings, iss and aud are not looked at.
        assert!(Authenticator::new(b"k", true)
            .verify(&sign(
                &serde_json::json!({"sub": "u", "exp": exp, "aud": "x"}),
                b"k"
            ))
            .is_ok());
    }

    #[test]
    fn token_sources_in_order() {
        assert_eq!(
            token_from_request(Some("Bearer a.b.c"), Some("q".into()), None).as_deref(),
            Some("a.b.c")
        );
        assert_eq!(
            token_from_request(None, Some("q.q.q".into()), None).as_deref(),
            Some("q.q.q")
        );
        assert_eq!(
            token_from_request(None, None, Some("push.v1, x.y.z")).as_deref(),
            Some("x.y.z")
        );
        assert_eq!(
            token_from_request(Some("Basic abc"), None, Some("push.v1")),
            None
        );
    }
}
