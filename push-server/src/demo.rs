//! The demo page (`--demo`): `GET /demo` on the admin port, built on the JavaScript client of
//! `clients/js`, whose compiled module is bundled into the binary.
//!
//! It is on the admin port because it sends pushes through the admin API, which a page can
//! only call from the same origin (the admin port sends no CORS headers); it reaches the
//! client port by WebSocket, which browsers allow across origins. Off by default: an exposed
//! admin port must not serve pages (docs/operations.md).

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Response, StatusCode};

/// The page; `__CLIENT_PORT__` becomes the client port, the page's default WebSocket address.
const PAGE: &str = include_str!("../demo/index.html");
const SCRIPT: &str = include_str!("../demo/demo.js");
/// The client as `npm run build` compiles it (scripts/test checks that it is up to date).
const CLIENT: &str = include_str!("../../clients/js/dist/index.js");
/// The client's SharedWorker (one connection for all tabs, `share=1`); it imports the client
/// as `./index.js`, so the client is served under that name too.
const WORKER: &str = include_str!("../../clients/js/dist/shared-worker.js");

/// Scripts only from this origin; connections to any WebSocket (the client port is another
/// origin); no inline scripts, so a message's data can never run as code.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; connect-src 'self' ws: wss:; img-src 'self'; base-uri 'none'; form-action 'none'";

/// Answers `GET /demo/{rest}`: `rest` is empty for the page, or one of its scripts.
pub(crate) fn serve(rest: &[&str], client_port: u16) -> Response<Full<Bytes>> {
    let (body, content_type) = match rest {
        [] | [""] => (
            Bytes::from(PAGE.replace("__CLIENT_PORT__", &client_port.to_string())),
            "text/html; charset=utf-8",
        ),
        ["demo.js"] => (Bytes::from_static(SCRIPT.as_bytes()), "text/javascript"),
        ["push-client.js" | "index.js"] => {
            (Bytes::from_static(CLIENT.as_bytes()), "text/javascript")
        }
        ["shared-worker.js"] => (Bytes::from_static(WORKER.as_bytes()), "text/javascript"),
        _ => {
            let mut r = Response::new(Full::new(Bytes::from_static(b"not found\n")));
            *r.status_mut() = StatusCode::NOT_FOUND;
            return r;
        }
    };
    let mut r = Response::new(Full::new(body));
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert("Content-Security-Policy", HeaderValue::from_static(CSP));
    h.insert(
        "X-Content-Type-Options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_names_the_client_port_and_loads_the_bundled_client() {
        let r = serve(&[], 8123);
        assert_eq!(r.status(), StatusCode::OK);
        let page = PAGE.replace("__CLIENT_PORT__", "8123");
        assert!(page.contains("8123"));
        assert!(!page.contains("__CLIENT_PORT__"));
        assert!(SCRIPT.contains("./push-client.js"));
        assert!(CLIENT.contains("export class PushClient"));
        assert_eq!(serve(&["nope.js"], 1).status(), StatusCode::NOT_FOUND);
        // The SharedWorker and the name it imports the client by.
        assert!(WORKER.contains("./index.js"));
        for asset in ["shared-worker.js", "index.js"] {
            assert_eq!(serve(&[asset], 1).status(), StatusCode::OK, "{asset}");
        }
        assert_eq!(
            serve(&["push-client.js"], 1).headers()[CONTENT_TYPE],
            "text/javascript"
        );
    }
}
