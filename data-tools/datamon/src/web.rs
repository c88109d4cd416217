//! `datamon serve`'s HTTP side (hyper): the grid page, a page per owner, explanations, the
//! JSON API and Prometheus metrics. Routes are matched on parsed path segments.
//!
//! | route | answer |
//! |---|---|
//! | `GET /` (`?owner=TEAM`) | HTML grid: datasets × the last partitions |
//! | `GET /owner/{team}` | the grid of one team |
//! | `GET /explain/{dataset}/{partition}` | HTML explanation |
//! | `GET /api/v1/status` (`?owner=TEAM`) | the last pass as JSON |
//! | `GET /api/v1/explain/{dataset}/{partition}` | explanation as JSON |
//! | `GET /metrics` | Prometheus text |
//! | `GET /healthz` | `ok` |

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;

use crate::checker::{Checker, Snapshot};
use crate::explain::{self, Explanation};
use crate::http::HttpClient;

/// What the handlers share.
#[derive(Debug)]
pub struct App {
    /// The checker (its last snapshot, declarations, stores).
    pub checker: Arc<Checker>,
    /// For Styx.
    pub client: HttpClient,
    /// Styx base URL.
    pub styx: Option<String>,
    /// Metrics.
    pub metrics: PrometheusHandle,
}

type Resp = Response<Full<Bytes>>;

fn respond(code: StatusCode, ctype: &str, body: impl Into<Bytes>) -> Resp {
    Response::builder()
        .status(code)
        .header("content-type", ctype)
        .body(Full::new(body.into()))
        .expect("valid response")
}

fn html(code: StatusCode, body: String) -> Resp {
    respond(code, "text/html; charset=utf-8", body)
}

fn json(code: StatusCode, v: &impl serde::Serialize) -> Resp {
    respond(
        code,
        "application/json",
        serde_json::to_vec(v).unwrap_or_default(),
    )
}

fn not_found(what: &str) -> Resp {
    respond(
        StatusCode::NOT_FOUND,
        "text/plain; charset=utf-8",
        format!("not found: {what}\n"),
    )
}

/// Escapes text for HTML.
pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

/// Team names are `[A-Za-z0-9._-]+` (checked at load), so a query value needs no decoding.
fn query_owner(req: &Request<hyper::body::Incoming>) -> Option<String> {
    req.uri().query().and_then(|q| {
        q.split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, v)| *k == "owner" && !v.is_empty())
            .map(|(_, v)| v.to_string())
    })
}

/// Handles one request.
pub async fn handle(app: Arc<App>, req: Request<hyper::body::Incoming>) -> Resp {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return respond(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n");
    }
    let path = req.uri().path().to_string();
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let snapshot = app.checker.latest();
    match segs.as_slice() {
        [] => html(
            StatusCode::OK,
            grid_page(&app, &snapshot, query_owner(&req).as_deref()),
        ),
        ["owner", team] => {
            if !app
                .checker
                .declarations()
                .current()
                .teams()
                .iter()
                .any(|t| t == *team)
            {
                return not_found("no such owner");
            }
            html(StatusCode::OK, grid_page(&app, &snapshot, Some(*team)))
        }
        ["explain", dataset, partition] => match run_explain(&app, dataset, partition).await {
            Ok(e) => html(StatusCode::OK, explain_page(&e)),
            Err(e) => html(
                StatusCode::NOT_FOUND,
                page("Not found", &format!("<p>{}</p>", esc(&e.to_string()))),
            ),
        },
        ["api", "v1", "status"] => {
            let owner = query_owner(&req);
            let mut s: Snapshot = (*snapshot).clone();
            if let Some(o) = &owner {
                s.rows.retain(|_, r| &r.team == o);
            }
            json(StatusCode::OK, &s)
        }
        ["api", "v1", "explain", dataset, partition] => {
            match run_explain(&app, dataset, partition).await {
                Ok(e) => json(StatusCode::OK, &e),
                Err(e) => json(
                    StatusCode::NOT_FOUND,
                    &serde_json::json!({"error": e.to_string()}),
                ),
            }
        }
        ["metrics"] => respond(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            app.metrics.render(),
        ),
        ["healthz"] => respond(StatusCode::OK, "text/plain", "ok\n"),
        _ => not_found(&path),
    }
}

async fn run_explain(
    app: &App,
    dataset: &str,
    partition: &str,
) -> Result<Explanation, explain::ExplainError> {
    let set = app.checker.declarations().current();
    explain::explain(
        &set,
        app.checker.stores(),
        &app.client,
        app.styx.as_deref(),
        dataset,
        partition,
        chrono::Utc::now(),
    )
    .await
}

const STYLE: &str = "
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse}
td,th{padding:0;border:1px solid #fff}
th.ds{text-align:left;padding:0 .6em;font-weight:normal;white-space:nowrap}
td.cell a{display:block;width:14px;height:22px}
td.on_time{background:rgb(46, 160, 67)}
td.late{background:rgb(230, 160, 0)}
td.missing{background:rgb(207, 34, 46)}
td.pending{background:rgb(200, 200, 200)}
.legend span{display:inline-block;padding:.1em .5em;margin-right:.5em;color:#fff}
.legend .on_time{background:rgb(46, 160, 67)}.legend .late{background:rgb(230, 160, 0)}
.legend .missing{background:rgb(207, 34, 46)}.legend .pending{background:rgb(200, 200, 200);color:#222}
nav a{margin-right:.8em}
";

fn page(title: &str, body: &str) -> String {
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{t} · datamon</title>\
         <style>{STYLE}</style></head><body><h1>{t}</h1>{body}</body></html>",
        t = esc(title)
    )
}

/// The grid: one row per dataset, one cell per partition, oldest left.
pub fn grid_page(app: &App, s: &Snapshot, owner: Option<&str>) -> String {
    let set = app.checker.declarations().current();
    let mut body = String::new();
    body.push_str("<nav>Owners: <a href=\"/\">all</a>");
    for t in set.teams() {
        let _ = write!(body, "<a href=\"/owner/{0}\">{0}</a>", esc(&t));
    }
    body.push_str("</nav>");
    let _ = write!(
        body,
        "<p class=\"legend\"><span class=\"on_time\">on time</span><span class=\"late\">late</span>\
         <span class=\"missing\">missing</span><span class=\"pending\">pending</span> \
         checked at {}</p>",
        s.checked_at.map(|t| t.to_rfc3339()).unwrap_or_else(|| "never".into())
    );
    body.push_str("<table id=\"grid\">");
    for row in s
        .rows
        .values()
        .filter(|r| owner.is_none_or(|o| r.team == o))
    {
        let _ = write!(
            body,
            "<tr data-dataset=\"{d}\"><th class=\"ds\"><a href=\"/owner/{t}\">{t}</a> {d}</th>",
            d = esc(&row.dataset),
            t = esc(&row.team)
        );
        for c in &row.cells {
            let title = match c.status.lateness_seconds() {
                0 => format!("{} {}: {}", row.dataset, c.partition, c.status.name()),
                n => format!(
                    "{} {}: {} ({n} s)",
                    row.dataset,
                    c.partition,
                    c.status.name()
                ),
            };
            let _ = write!(
                body,
                "<td class=\"cell {s}\" data-partition=\"{p}\"><a href=\"/explain/{d}/{p}\" title=\"{title}\"></a></td>",
                s = c.status.name(),
                p = esc(&c.partition),
                d = esc(&row.dataset),
                title = esc(&title)
            );
        }
        body.push_str("</tr>");
    }
    body.push_str("</table>");
    if !s.errors.is_empty() {
        let _ = write!(
            body,
            "<p>{} markers could not be read; see the log.</p>",
            s.errors.len()
        );
    }
    let title = match owner {
        Some(o) => format!("Datasets of {o}"),
        None => "Datasets".to_string(),
    };
    page(&title, &body)
}

fn explain_page(e: &Explanation) -> String {
    let mut body = format!(
        "<p>Owner: {}. Status: <b class=\"status {s}\">{s}</b>.</p><ul id=\"why\">",
        esc(&e.owner),
        s = e.status.name()
    );
    for l in &e.lines {
        let _ = write!(body, "<li>{}</li>", esc(l));
    }
    body.push_str("</ul><p><a href=\"/\">back to the grid</a></p>");
    page(&format!("{} {}", e.dataset, e.partition), &body)
}

/// Accepts connections until the task is dropped.
pub async fn serve(listener: TcpListener, app: Arc<App>) {
    loop {
        let (stream, _peer): (_, SocketAddr) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: wait a little rather than spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let app = app.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let app = app.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(app, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                // Slow header senders do not hold a connection forever.
                .header_read_timeout(std::time::Duration::from_secs(10))
                .timer(hyper_util::rt::TokioTimer::new())
                .serve_connection(TokioIo::new(stream), svc);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended");
            }
        });
    }
}
