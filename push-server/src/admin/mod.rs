//! The admin port (hyper): push API, metrics, health and inspection.
//!
//! | route | what |
//! |---|---|
//! | `POST /v1/push/{user}` | body = payload; answers `{"id":…,"delivered":…}`; `?wait_receipt=5s` waits for the receipt |
//! | `POST /v1/push` | JSON array of `{"user":…,"data":…}` |
//! | `GET /v1/history/{user}` | that user's kept messages (`?since=ID`) |
//! | `GET /v1/users/{user}` | that user's connections on this node |
//! | `POST /internal/v1/deliver` | the message processor's batch, an outcome per item |
//! | `GET /metrics` | Prometheus text format |
//! | `GET /healthz` | 200 while the process serves |
//! | `GET /readyz` | 200, or 503 when at capacity or draining |
//! | `GET /demo` | with `--demo` only: the demo page (`demo`) |
//!
//! Every request target is parsed once into an [`AdminRoute`] (a non-canonical path such as
//! `//v1/push/x` is refused with 400), and who may call it is a property of that route: the
//! probes and `/metrics` are open for kubelets and scrapers; `/v1/*` needs `--admin-token`
//! when one is set; `/internal/v1/deliver` needs `--internal-secret` when one is set (else the
//! admin token). Only a caller with the internal secret may set a message's `id`; other
//! callers' ids must name a message the history keeps with the same content.
//!
//! Before routing: the `Host` header must be an IP literal, `localhost`, the advertised host
//! or an `--admin-allowed-hosts` name (a DNS-rebinding page sends its own name), and requests
//! from a browser page (`Origin`, or `Sec-Fetch-Site` other than `none`) are refused on every
//! route that needs a secret. The port holds at most `--admin-max-connections`, and times out
//! slow heads and bodies. See docs/security.md.
//!
//! One module per route group, each handed only the handles it needs (the [`Pusher`], the
//! history, the hub), lowest first; a module uses only those above it:
//!
//! | module | role |
//! |---|---|
//! | [`route`] | request target → `AdminRoute` and who may call it (`Access`), pure |
//! | `http` | shared: JSON answers, `ApiError`, body reads bounded in size and time |
//! | `guard` | the request head: `Host` check, browser pages, bearer secrets (pure) |
//! | `batch` | shared by push and deliver: batch items and bounds, outcomes, receipt waits |
//! | `probes` | `/healthz`, `/readyz`, `/metrics` |
//! | `push` | `/v1/push/{user}`, `/v1/push` |
//! | `deliver` | `/internal/v1/deliver` |
//! | `history` | `/v1/history/{user}` |
//! | `users` | `/v1/users/{user}` |
//! | this file | the router: `Host` check, parse, authorize on the parsed route, dispatch |
//! | `port` | the accept loop, the connection limit, hyper |
//!
//! [`Pusher`]: crate::push::Pusher

use hyper::body::Incoming;
use hyper::header::HeaderMap;
use hyper::{Method, Request, StatusCode};

use crate::state::Shared;
use batch::PushPath;
use http::{error, refuse, ApiError, BodyLimits, Resp};
use probes::Readiness;
use route::{Access, AdminRoute, RouteError};

mod batch;
mod deliver;
mod guard;
mod history;
mod http;
mod port;
mod probes;
mod push;
pub mod route;
mod users;

pub(crate) use port::serve;

/// Routes one request: the `Host` check, then the parsed route, who may call it, and the
/// handler of its group with the handles it needs.
async fn handle(req: Request<Incoming>, shared: &Shared) -> Resp {
    let config = &shared.config;
    let allowed = &config.admin_security.admin_allowed_hosts;
    if let Err(e) = guard::check_host(req.headers(), config.advertise_addr.as_deref(), allowed) {
        return e.into_response();
    }
    let route = match AdminRoute::parse(req.uri().path()) {
        Ok(r) => r,
        Err(e @ RouteError::NotCanonical(_)) => {
            return refuse("not_canonical", StatusCode::BAD_REQUEST, e).into_response()
        }
        Err(e @ RouteError::BadUser) => return error(StatusCode::BAD_REQUEST, "bad_user", e),
        Err(RouteError::NotFound) => {
            return error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no admin route `{}`", req.uri().path()),
            )
        }
    };
    let secrets = Secrets {
        admin: config.admin_token.as_deref(),
        internal: config.admin_security.internal_secret.as_deref(),
        demo: config.demo,
    };
    let trusted_ids = match authorize(req.headers(), route.access(), secrets) {
        Ok(t) => t,
        Err(e) => return e.into_response(),
    };
    let limits = BodyLimits {
        max_message_bytes: config.max_message_bytes,
        timeout: config.admin_security.admin_body_timeout,
    };
    let path = PushPath {
        pusher: &shared.pusher,
        receipts: &shared.receipts,
    };
    let method = req.method().clone();
    match (method, route) {
        (Method::GET, AdminRoute::Healthz) => probes::healthz(),
        (Method::GET, AdminRoute::Readyz) => probes::readyz(Readiness {
            open: shared.hub.open_total(),
            capacity: config.max_connections,
            at_capacity: shared.at_capacity(),
            draining: shared.draining().is_some(),
        }),
        (Method::GET, AdminRoute::Metrics) => probes::metrics(&shared.prometheus),
        (Method::POST, AdminRoute::PushBatch) => push::batch(req, path.pusher, limits).await,
        (Method::POST, AdminRoute::Deliver) => {
            deliver::deliver(req, path, &*shared.store, limits, trusted_ids).await
        }
        (Method::POST, AdminRoute::PushOne(user)) => push::one(req, &user, path, limits).await,
        (Method::GET, AdminRoute::Users(user)) => {
            users::connections(&user, &shared.hub, &config.node_id)
        }
        (Method::GET, AdminRoute::History(user)) => {
            history::history(req.uri().query(), &user, &*shared.store).await
        }
        (Method::GET, AdminRoute::Demo(asset)) if config.demo => {
            crate::demo::serve(&[asset.as_str()], config.listen.port())
        }
        (_, AdminRoute::Demo(_)) => error(
            StatusCode::NOT_FOUND,
            "not_found",
            "the demo page is off (start the node with --demo)",
        ),
        _ => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "see docs/protocol.md for the admin routes",
        ),
    }
}

/// The secrets the admin port checks, from the node's settings.
#[derive(Debug, Clone, Copy)]
struct Secrets<'a> {
    /// `--admin-token`: needed on `/v1/*` (and on the deliver route without an internal secret).
    admin: Option<&'a str>,
    /// `--internal-secret`: needed on the deliver route when set.
    internal: Option<&'a str>,
    /// `--demo`: its page may call the API from its own origin.
    demo: bool,
}

/// Checks the caller's secret for a route of `access`. `Ok(true)`: the caller holds the
/// internal secret, so the message IDs it sends are taken as they are.
fn authorize(h: &HeaderMap, access: Access, secrets: Secrets<'_>) -> Result<bool, ApiError> {
    if access == Access::Open {
        return Ok(false);
    }
    // The one browser page the admin port serves is its own demo (`--demo`, off by default);
    // it may push from its own origin. A cross-site page still gets 403, and a rebinding
    // page is stopped by the Host check before routing.
    if guard::from_browser(h) && !(secrets.demo && guard::same_origin(h)) {
        return Err(refuse(
            "browser",
            StatusCode::FORBIDDEN,
            "the admin API does not serve browser pages (Origin or Sec-Fetch-Site present)",
        ));
    }
    let (expected, what, trusted) = match (access, secrets.internal) {
        (Access::Internal, Some(secret)) => (Some(secret), "internal secret", true),
        _ => (secrets.admin, "admin token", false),
    };
    match expected {
        Some(expected) if !guard::bearer_matches(h, expected) => Err(refuse(
            "unauthorized",
            StatusCode::UNAUTHORIZED,
            format!("this route requires `Authorization: Bearer <{what}>`"),
        )),
        _ => Ok(trusted),
    }
}

#[cfg(test)]
mod tests {
    use hyper::header::{HeaderValue, AUTHORIZATION, ORIGIN};

    use super::*;

    const BOTH: Secrets<'static> = Secrets {
        admin: Some("adm"),
        internal: Some("int"),
        demo: false,
    };

    fn bearer(token: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, HeaderValue::from_static(token));
        h
    }

    fn status(r: Result<bool, ApiError>) -> StatusCode {
        r.map_or_else(|e| e.into_response().status(), |_| StatusCode::OK)
    }

    #[test]
    fn each_access_needs_its_secret() {
        let none = HeaderMap::new();
        assert!(!authorize(&none, Access::Open, BOTH).unwrap());
        assert_eq!(
            status(authorize(&none, Access::Admin, BOTH)),
            StatusCode::UNAUTHORIZED
        );
        let admin = bearer("Bearer adm");
        let internal = bearer("Bearer int");
        assert!(!authorize(&admin, Access::Admin, BOTH).unwrap());
        assert_eq!(
            status(authorize(&internal, Access::Admin, BOTH)),
            StatusCode::UNAUTHORIZED
        );
        // Only the internal secret opens the deliver route, and only it makes ids trusted.
        assert_eq!(
            status(authorize(&admin, Access::Internal, BOTH)),
            StatusCode::UNAUTHORIZED
        );
        assert!(authorize(&internal, Access::Internal, BOTH).unwrap());
        let admin_only = Secrets {
            internal: None,
            ..BOTH
        };
        assert!(!authorize(&admin, Access::Internal, admin_only).unwrap());
        let open = Secrets {
            admin: None,
            internal: None,
            demo: false,
        };
        assert!(!authorize(&none, Access::Admin, open).unwrap());
    }

    #[test]
    fn browser_pages_are_refused_but_the_demo_page() {
        let mut page = bearer("Bearer adm");
        page.insert(ORIGIN, HeaderValue::from_static("http://127.0.0.1:9091"));
        page.insert("sec-fetch-site", HeaderValue::from_static("same-origin"));
        assert_eq!(
            status(authorize(&page, Access::Admin, BOTH)),
            StatusCode::FORBIDDEN
        );
        let demo = Secrets { demo: true, ..BOTH };
        assert!(!authorize(&page, Access::Admin, demo).unwrap());
        page.insert("sec-fetch-site", HeaderValue::from_static("cross-site"));
        assert_eq!(
            status(authorize(&page, Access::Admin, demo)),
            StatusCode::FORBIDDEN
        );
        // Probes stay open to anyone.
        assert!(!authorize(&page, Access::Open, BOTH).unwrap());
    }
}
