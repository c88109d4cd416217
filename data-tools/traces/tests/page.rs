//! The waterfall page of one trace in a real headless Chromium (Debian's `chromium`): spans sent
//! over OTLP are drawn in tree order, bars placed by start and length, the critical path in
//! red and the rest in blue, read back from the live DOM over the DevTools protocol. A
//! screenshot is kept under `target/test-artifacts/traces-waterfall.png`.

mod support;

use prost::Message as _;
use support::{eventually_some, request, start};
use testkit::browser::Browser;
use traces::server::Settings;

/// `.critical .bar` and `.bar` in the page's CSS.
const RED: &str = "rgb(217, 83, 79)";
const BLUE: &str = "rgb(107, 155, 209)";

/// One drawn row, as the browser lays it out.
#[derive(Debug, serde::Deserialize)]
struct Row {
    span: String,
    critical: bool,
    colour: String,
    label: String,
    indent: f64,
    left: f64,
    width: f64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_waterfall_draws_the_tree_and_the_critical_path_in_chromium() {
    let h = start(Settings::default()).await;
    // push-lib send [0, 10 ms] → msg-processor lookup [0.5, 1.5 ms] (done early) and
    // push-server deliver [1, 9 ms] → socket write [6, 8.5 ms]. The path: send, deliver, write.
    let requests = [
        request("push-lib", 0x77, &[(1, 0, "send", 0, 10_000)]),
        request("msg-processor", 0x77, &[(4, 1, "lookup", 500, 1_000)]),
        request(
            "push-server",
            0x77,
            &[
                (2, 1, "deliver", 1_000, 8_000),
                (3, 2, "socket write", 6_000, 2_500),
            ],
        ),
    ];
    for req in requests {
        let (status, _, _) = h
            .client
            .send(
                "POST",
                "/v1/traces",
                &[("content-type", "application/x-protobuf")],
                req.encode_to_vec(),
            )
            .await;
        assert_eq!(status, 200);
    }
    let trace_id = "77".repeat(16);
    eventually_some("the stored trace", async || {
        let (_, v) = h.client.get_json(&format!("/api/traces/{trace_id}")).await;
        (v["data"][0]["spans"].as_array()?.len() == 4).then_some(())
    })
    .await;

    let url = format!("http://{}/trace/{trace_id}", h.running.addr);
    let mut page = Browser::start(1000, 500).await;
    page.open(&url).await;
    let rows = page
        .eval(
            "JSON.stringify(Array.from(document.querySelectorAll('.span')).map(row => {\
               const bar = row.querySelector('.bar').getBoundingClientRect();\
               const lane = row.querySelector('.lane').getBoundingClientRect();\
               const label = row.querySelector('.label');\
               return {span: row.dataset.spanId, critical: row.classList.contains('critical'),\
                 colour: getComputedStyle(row.querySelector('.bar')).backgroundColor,\
                 label: label.textContent, indent: parseFloat(getComputedStyle(label).paddingLeft),\
                 left: (bar.left - lane.left) / lane.width, width: bar.width / lane.width};\
             }))",
        )
        .await;
    let rows: Vec<Row> = serde_json::from_str(rows.as_str().expect("rows as JSON")).unwrap();
    let labels: Vec<&str> = rows.iter().map(|r| r.label.as_str()).collect();
    assert_eq!(
        labels,
        [
            "push-lib send",
            "msg-processor lookup",
            "push-server deliver",
            "push-server socket write"
        ],
        "tree order: the root, then its children by start, each followed by its own"
    );
    let id = |b: u8| format!("{b:02x}").repeat(8);
    assert_eq!(
        rows.iter().map(|r| r.span.clone()).collect::<Vec<_>>(),
        [id(1), id(4), id(2), id(3)]
    );
    for r in &rows {
        let on_path = r.span != id(4);
        assert_eq!(r.critical, on_path, "{r:?}");
        assert_eq!(r.colour, if on_path { RED } else { BLUE }, "{r:?}");
    }
    // Indented by depth; bars placed by start and sized by length, relative to the 10 ms trace.
    assert!(rows[0].indent < rows[1].indent && rows[1].indent == rows[2].indent);
    assert!(rows[2].indent < rows[3].indent);
    let expect = [(0.0, 1.0), (0.05, 0.1), (0.1, 0.8), (0.6, 0.25)];
    for (r, (left, width)) in rows.iter().zip(expect) {
        assert!(
            (r.left - left).abs() < 0.01 && (r.width - width).abs() < 0.01,
            "{r:?}: expected left {left}, width {width}"
        );
    }
    let summary = page
        .eval("document.querySelector('.summary').textContent")
        .await;
    assert!(
        summary
            .as_str()
            .unwrap()
            .starts_with("4 spans, 3 services, 10.0 ms end to end"),
        "{summary}"
    );

    let png = page.screenshot().await;
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 1000);
    let artifacts = std::path::Path::new(env!("CARGO_BIN_EXE_traces"))
        .parent()
        .and_then(|p| p.parent())
        .unwrap()
        .join("test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    std::fs::write(artifacts.join("traces-waterfall.png"), &png).unwrap();
    drop(page);
    h.running.shutdown().await;
}
