//! The admin port's routes, parsed once (sans-I/O): the request target becomes an
//! [`AdminRoute`], and who may call it ([`Access`]) is a property of that route, never of the
//! raw string. A path that is not in canonical form (an empty segment as in `//v1/push/x`, a
//! `.` or `..` segment, bad percent-encoding) is refused before any routing, so no spelling
//! of a protected route can reach it under another name.

/// A parsed admin route. User IDs are percent-decoded; `+` stays a literal `+` (paths are not
/// form-encoded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminRoute {
    /// `/healthz`: liveness probe.
    Healthz,
    /// `/readyz`: readiness probe.
    Readyz,
    /// `/metrics`: Prometheus text.
    Metrics,
    /// `/v1/push`: a batch.
    PushBatch,
    /// `/v1/push/{user}`.
    PushOne(String),
    /// `/v1/users/{user}`.
    Users(String),
    /// `/v1/history/{user}`.
    History(String),
    /// `/internal/v1/deliver`: the message processor's and the other nodes' deliveries.
    Deliver,
    /// `/demo` (the page) and `/demo/{asset}` (its scripts): served only with `--demo`.
    Demo(String),
}

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone who reaches the port: kubelets and scrapers carry no secret.
    Open,
    /// The admin token (`--admin-token`), when one is set.
    Admin,
    /// The internal secret (`--internal-secret`) or, without one, the admin token.
    Internal,
}

/// Why a request target was not routed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// Not in canonical form: answered 400 so that no other spelling of a route exists.
    #[error("path is not canonical: {0}")]
    NotCanonical(&'static str),
    /// A user segment that is not 1 to [`crate::auth::MAX_ID_LEN`] bytes of UTF-8.
    #[error(
        "user ID must be 1 to {} bytes of percent-encoded UTF-8",
        crate::auth::MAX_ID_LEN
    )]
    BadUser,
    /// A known path with an unknown tail, or an unknown path: 404.
    #[error("no admin route")]
    NotFound,
}

impl AdminRoute {
    /// Parses the path part of a request target (no query).
    pub fn parse(path: &str) -> Result<Self, RouteError> {
        let rest = path
            .strip_prefix('/')
            .ok_or(RouteError::NotCanonical("must start with `/`"))?;
        if rest.is_empty() {
            return Err(RouteError::NotFound);
        }
        let segments: Vec<&str> = rest.split('/').collect();
        for s in &segments {
            match *s {
                "" => {
                    return Err(RouteError::NotCanonical(
                        "empty segment (`//` or trailing `/`)",
                    ))
                }
                "." | ".." => return Err(RouteError::NotCanonical("`.` or `..` segment")),
                _ => {}
            }
            // A segment that decodes to a dot segment or holds a `/` would be another path
            // to a proxy that decodes first.
            match decode_segment(s) {
                Some(d) if d == "." || d == ".." || d.contains('/') => {
                    return Err(RouteError::NotCanonical("encoded `.`, `..` or `/`"))
                }
                Some(_) => {}
                None => return Err(RouteError::NotCanonical("bad percent-encoding")),
            }
        }
        let user = |raw: &str| -> Result<String, RouteError> {
            match decode_segment(raw) {
                Some(u) if !u.is_empty() && u.len() <= crate::auth::MAX_ID_LEN => Ok(u),
                _ => Err(RouteError::BadUser),
            }
        };
        Ok(match segments.as_slice() {
            ["healthz"] => Self::Healthz,
            ["readyz"] => Self::Readyz,
            ["metrics"] => Self::Metrics,
            ["v1", "push"] => Self::PushBatch,
            ["v1", "push", u] => Self::PushOne(user(u)?),
            ["v1", "users", u] => Self::Users(user(u)?),
            ["v1", "history", u] => Self::History(user(u)?),
            ["internal", "v1", "deliver"] => Self::Deliver,
            ["demo"] => Self::Demo(String::new()),
            ["demo", asset] => Self::Demo((*asset).to_owned()),
            _ => return Err(RouteError::NotFound),
        })
    }

    /// Who may call this route.
    pub fn access(&self) -> Access {
        match self {
            Self::Healthz | Self::Readyz | Self::Metrics | Self::Demo(_) => Access::Open,
            Self::PushBatch | Self::PushOne(_) | Self::Users(_) | Self::History(_) => Access::Admin,
            Self::Deliver => Access::Internal,
        }
    }

    /// The route's label in metrics (bounded: user IDs never appear).
    pub fn label(&self) -> &'static str {
        match self {
            Self::Healthz => "healthz",
            Self::Readyz => "readyz",
            Self::Metrics => "metrics",
            Self::PushBatch => "push_batch",
            Self::PushOne(_) => "push",
            Self::Users(_) => "users",
            Self::History(_) => "history",
            Self::Deliver => "deliver",
            Self::Demo(_) => "demo",
        }
    }
}

/// Percent-decodes one path segment into UTF-8. `+` is a literal `+`: only form-encoded query
/// strings use it for a space.
pub fn decode_segment(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hi = (hex[0] as char).to_digit(16)?;
            let lo = (hex[1] as char).to_digit(16)?;
            out.push((hi * 16 + lo) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_and_their_access() {
        assert_eq!(AdminRoute::parse("/healthz"), Ok(AdminRoute::Healthz));
        assert_eq!(
            AdminRoute::parse("/metrics").unwrap().access(),
            Access::Open
        );
        let r = AdminRoute::parse("/v1/push/alice").unwrap();
        assert_eq!(r, AdminRoute::PushOne("alice".into()));
        assert_eq!(r.access(), Access::Admin);
        assert_eq!(
            AdminRoute::parse("/internal/v1/deliver").unwrap().access(),
            Access::Internal
        );
    }

    #[test]
    fn non_canonical_paths_are_refused() {
        for p in [
            "//v1/push/x",
            "///v1/push/x",
            "//internal/v1/deliver",
            "//v1/history/x",
            "//v1/users/x",
            "/v1/./push/x",
            "/v1/../v1/push/x",
            "/v1/push/x/",
            "/v1//push/x",
            "/v1/push/%2e%2e",
            "/v1/push/a%2fb",
            "/v1/push/%zz",
            "/v1/push/%c3",
            "v1/push/x",
        ] {
            assert!(
                matches!(AdminRoute::parse(p), Err(RouteError::NotCanonical(_))),
                "{p}: {:?}",
                AdminRoute::parse(p)
            );
        }
    }

    #[test]
    fn plus_is_literal_and_percent_decodes() {
        assert_eq!(
            AdminRoute::parse("/v1/push/a+b"),
            Ok(AdminRoute::PushOne("a+b".into()))
        );
        assert_eq!(
            AdminRoute::parse("/v1/users/a%20b%2Bc"),
            Ok(AdminRoute::Users("a b+c".into()))
        );
    }

    #[test]
    fn unknown_paths_are_not_found() {
        assert_eq!(AdminRoute::parse("/"), Err(RouteError::NotFound));
        assert_eq!(AdminRoute::parse("/v2/x"), Err(RouteError::NotFound));
        assert_eq!(AdminRoute::parse("/v1/push/a/b"), Err(RouteError::NotFound));
    }
}
