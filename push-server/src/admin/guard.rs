//! Who is calling, read from the request head before any handler runs (pure over the
//! headers): the `Host` check against DNS rebinding, requests from browser pages, and the
//! bearer secret, compared in constant time. Which secret a route needs is decided on the
//! parsed route (mod.rs, `authorize`).

use hyper::header::{HeaderMap, AUTHORIZATION, HOST, ORIGIN};
use hyper::StatusCode;

use super::http::{refuse, ApiError};

/// Whether a browser sent the request from a page: browsers add `Origin` to every cross-
/// origin POST (a `text/plain` form or `fetch(…, {mode: "no-cors"})` needs no preflight), and
/// `Sec-Fetch-Site` to every request, `none` only when a person typed the address.
pub(super) fn from_browser(h: &HeaderMap) -> bool {
    h.contains_key(ORIGIN)
        || h.get("sec-fetch-site")
            .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"none"))
}

/// A browser request from a page of this same origin (the demo page).
pub(super) fn same_origin(h: &HeaderMap) -> bool {
    h.get("sec-fetch-site")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"same-origin"))
}

/// DNS rebinding: a page on `evil.example` whose name now resolves to 127.0.0.1 reaches the
/// admin port as its own origin, but its requests carry `Host: evil.example`. Callers that
/// mean this node use an address, `localhost`, the advertised name (`advertised`, a
/// `host:port`), or an allowed name.
pub(super) fn check_host(
    h: &HeaderMap,
    advertised: Option<&str>,
    allowed: &[String],
) -> Result<(), ApiError> {
    let Some(host) = h.get(HOST).and_then(|v| v.to_str().ok()) else {
        return Err(refuse(
            "bad_host",
            StatusCode::BAD_REQUEST,
            "a Host header is required (HTTP/1.1)",
        ));
    };
    let name = host_name(host);
    let advertised = advertised.map(host_name);
    let ok = name.parse::<std::net::IpAddr>().is_ok()
        || name.eq_ignore_ascii_case("localhost")
        || advertised.is_some_and(|a| a.eq_ignore_ascii_case(name))
        || allowed.iter().any(|a| a.eq_ignore_ascii_case(name));
    if ok {
        Ok(())
    } else {
        Err(refuse(
            "bad_host",
            StatusCode::FORBIDDEN,
            format!("Host `{name}` is not this node's (add it to --admin-allowed-hosts)"),
        ))
    }
}

/// The host part of a `Host` header or `host:port` (brackets of an IPv6 literal removed).
fn host_name(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

/// Whether `Authorization: Bearer …` carries `expected`.
pub(super) fn bearer_matches(h: &HeaderMap, expected: &str) -> bool {
    let Some(value) = h.get(AUTHORIZATION).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let Some(token) = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
    else {
        return false;
    };
    // `subtle` compares without an early exit the optimiser could add back, so response time
    // does not reveal a matching prefix (a hand-written fold gives no such promise).
    use subtle::ConstantTimeEq as _;
    bool::from(token.trim().as_bytes().ct_eq(expected.as_bytes()))
}

#[cfg(test)]
mod tests {
    use hyper::header::HeaderValue;

    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    hyper::header::HeaderName::from_static(k),
                    HeaderValue::from_static(v),
                )
            })
            .collect()
    }

    #[test]
    fn host_names() {
        assert_eq!(host_name("node-1:9091"), "node-1");
        assert_eq!(host_name("[::1]:9091"), "::1");
        assert_eq!(host_name("[::1]"), "::1");
        assert_eq!(host_name("localhost"), "localhost");
    }

    #[test]
    fn hosts_that_mean_this_node() {
        let allowed = ["push.internal".to_owned()];
        let check = |host| check_host(&headers(&[("host", host)]), Some("node-1:9091"), &allowed);
        for ok in [
            "127.0.0.1:9091",
            "[::1]:9091",
            "LOCALHOST",
            "node-1",
            "Push.Internal:80",
        ] {
            assert!(check(ok).is_ok(), "{ok}");
        }
        let e = check("evil.example").unwrap_err().into_response();
        assert_eq!(e.status(), StatusCode::FORBIDDEN);
        let e = check_host(&HeaderMap::new(), None, &[]).unwrap_err();
        assert_eq!(e.into_response().status(), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn browser_pages_are_recognised() {
        assert!(!from_browser(&headers(&[])));
        assert!(!from_browser(&headers(&[("sec-fetch-site", "none")])));
        assert!(from_browser(&headers(&[("origin", "http://x")])));
        let same = headers(&[("sec-fetch-site", "same-origin")]);
        assert!(from_browser(&same) && same_origin(&same));
        assert!(!same_origin(&headers(&[("sec-fetch-site", "cross-site")])));
    }

    #[test]
    fn bearer_secrets() {
        assert!(bearer_matches(
            &headers(&[("authorization", "Bearer s3cret")]),
            "s3cret"
        ));
        assert!(bearer_matches(
            &headers(&[("authorization", "bearer s3cret ")]),
            "s3cret"
        ));
        for wrong in ["Bearer s3cre", "Bearer s3cret2", "Basic s3cret", "s3cret"] {
            assert!(
                !bearer_matches(&headers(&[("authorization", wrong)]), "s3cret"),
                "{wrong}"
            );
        }
        assert!(!bearer_matches(&headers(&[]), "s3cret"));
    }
}
