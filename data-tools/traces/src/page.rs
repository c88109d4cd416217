//! The page for one trace: its span tree as a waterfall, the critical path highlighted.
//!
//! Rendered on the server as plain HTML and CSS (no script), so it works in any browser and
//! a test can read it back from the DOM.

use std::collections::HashMap;
use std::fmt::Write;

use crate::jaeger::critical_path;
use crate::model::SpanRow;

/// The whole page for a trace (`spans` sorted by start).
pub fn trace_page(trace_id: &str, spans: &[SpanRow]) -> String {
    let mut body = String::new();
    if spans.is_empty() {
        let _ = write!(
            body,
            "<p class=\"empty\">No spans stored for trace <code>{}</code>.</p>",
            esc(trace_id)
        );
        return page(trace_id, &body);
    }
    let start = spans.iter().map(|s| s.start_ns).min().unwrap_or(0);
    let end = spans
        .iter()
        .map(|s| s.end_ns)
        .max()
        .unwrap_or(start)
        .max(start + 1);
    let total = (end - start) as f64;
    let critical = critical_path(spans);
    let services: std::collections::BTreeSet<&str> =
        spans.iter().map(|s| s.service.as_str()).collect();
    let _ = write!(
        body,
        "<p class=\"summary\">{} spans, {} services, {} end to end; <span class=\"critical-key\">critical path</span> in red.</p>",
        spans.len(),
        services.len(),
        fmt_ns(end - start)
    );
    body.push_str("<div class=\"waterfall\">");
    for (span, depth) in tree_order(spans) {
        let left = (span.start_ns - start) as f64 / total * 100.0;
        let width = ((span.duration_ns as f64 / total) * 100.0).max(0.2);
        let mut classes = String::from("span");
        if critical.contains(&span.span_id) {
            classes.push_str(" critical");
        }
        if span.status == "error" {
            classes.push_str(" error");
        }
        let _ = write!(
            body,
            "<div class=\"{classes}\" data-span-id=\"{id}\" data-service=\"{svc}\">\
             <div class=\"label\" style=\"padding-left:{pad}em\"><b>{svc}</b> {name}</div>\
             <div class=\"lane\"><div class=\"bar\" style=\"left:{left:.3}%;width:{width:.3}%\" title=\"{dur}\"></div>\
             <span class=\"dur\" style=\"left:{left:.3}%\">{dur}</span></div></div>",
            id = esc(&span.span_id),
            svc = esc(&span.service),
            name = esc(&span.name),
            pad = depth,
            dur = fmt_ns(span.duration_ns),
        );
    }
    body.push_str("</div>");
    page(trace_id, &body)
}

/// Spans in tree order (parent, then its children by start), with their depth. Spans whose
/// parent is not in the trace are shown as roots.
fn tree_order(spans: &[SpanRow]) -> Vec<(&SpanRow, usize)> {
    let ids: std::collections::HashSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
    let mut children: HashMap<&str, Vec<&SpanRow>> = HashMap::new();
    let mut roots = Vec::new();
    for s in spans {
        if s.parent_span_id.is_empty() || !ids.contains(s.parent_span_id.as_str()) {
            roots.push(s);
        } else {
            children.entry(&s.parent_span_id).or_default().push(s);
        }
    }
    let mut out = Vec::with_capacity(spans.len());
    let mut stack: Vec<(&SpanRow, usize)> = roots.into_iter().rev().map(|s| (s, 0)).collect();
    while let Some((span, depth)) = stack.pop() {
        if out.len() >= spans.len() {
            break; // a cycle in bad data
        }
        out.push((span, depth));
        if let Some(kids) = children.get(span.span_id.as_str()) {
            stack.extend(kids.iter().rev().map(|k| (*k, depth + 1)));
        }
    }
    out
}

fn page(trace_id: &str, body: &str) -> String {
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>trace {id}</title><style>{CSS}</style></head>\
         <body><h1>Trace <code>{id}</code></h1>{body}</body></html>",
        id = esc(trace_id)
    )
}

const CSS: &str = "body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}\
.waterfall{border-top:1px solid #ddd}\
.span{display:flex;border-bottom:1px solid #eee;height:1.8em;align-items:center}\
.label{width:34%;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}\
.lane{position:relative;flex:1;height:100%}\
.bar{position:absolute;top:25%;height:50%;background:#6b9bd1;border-radius:2px}\
.critical .bar{background:#d9534f}.error .label{color:#b00}\
.dur{position:absolute;top:55%;font-size:11px;color:#555;margin-left:2px}\
.critical-key{color:#d9534f;font-weight:bold}";

/// A duration for people: `850 µs`, `12.3 ms`, `1.20 s`.
pub fn fmt_ns(ns: i64) -> String {
    let ns = ns.max(0) as f64;
    if ns < 1_000.0 {
        format!("{ns} ns")
    } else if ns < 1_000_000.0 {
        format!("{:.0} µs", ns / 1e3)
    } else if ns < 1_000_000_000.0 {
        format!("{:.1} ms", ns / 1e6)
    } else {
        format!("{:.2} s", ns / 1e9)
    }
}

/// HTML-escapes text.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::sample;

    #[test]
    fn the_page_marks_the_critical_path_and_escapes_names() {
        let t = "a".repeat(32);
        let spans = [
            sample(&t, &"1".repeat(16), "", "push-lib", "send <x>", 0, 100),
            sample(
                &t,
                &"2".repeat(16),
                &"1".repeat(16),
                "push-server",
                "fast",
                0,
                10,
            ),
            sample(
                &t,
                &"3".repeat(16),
                &"1".repeat(16),
                "push-server",
                "slow",
                5,
                90,
            ),
        ];
        let html = trace_page(&t, &spans);
        assert!(html.contains("send &lt;x&gt;"));
        assert!(html.contains(&format!(
            "class=\"span critical\" data-span-id=\"{}\"",
            "3".repeat(16)
        )));
        assert!(html.contains(&format!(
            "class=\"span\" data-span-id=\"{}\"",
            "2".repeat(16)
        )));
        // Tree order: the root, then its children by start.
        let order: Vec<_> = ["1", "2", "3"]
            .iter()
            .map(|d| html.find(&d.repeat(16)).unwrap())
            .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]));
        assert!(trace_page(&t, &[]).contains("No spans stored"));
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(fmt_ns(850), "850 ns");
        assert_eq!(fmt_ns(12_300_000), "12.3 ms");
        assert_eq!(fmt_ns(1_200_000_000), "1.20 s");
    }
}
