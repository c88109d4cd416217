//! The grid page in a real headless Chromium (Debian's `chromium`), driven over the DevTools
//! protocol: seeded markers → the right class and computed colour per cell, the owner filter
//! and owner page, links to explanations; a screenshot is kept under
//! `target/test-artifacts/datamon-grid.png`.

mod support;

use support::{Served, Tree};
use testkit::browser::Browser;

/// (dataset, partition, class, computed background colour, link) of every cell.
async fn read_cells(browser: &mut Browser) -> Vec<(String, String, String, String, String)> {
    let v = browser
        .eval(
            "JSON.stringify(Array.from(document.querySelectorAll('td.cell')).map(td => [\
               td.closest('tr').dataset.dataset, td.dataset.partition, \
               td.className.replace('cell ', ''), getComputedStyle(td).backgroundColor, \
               td.querySelector('a').getAttribute('href')]))",
        )
        .await;
    serde_json::from_str(v.as_str().unwrap()).unwrap()
}

const GREEN: &str = "rgb(46, 160, 67)";
const AMBER: &str = "rgb(230, 160, 0)";
const RED: &str = "rgb(207, 34, 46)";
const GREY: &str = "rgb(200, 200, 200)";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grid_shows_the_right_colours_in_chromium() {
    let tree = Tree::new("page");
    tree.declare(
        r#"
datasets:
  - id: a.steady
    owner: { team: alpha, contact: a@example.com }
    location: "file://{root}/a/{date}/{hour}/"
    partitioning: hourly
    sla: PT1H
  - id: b.slow
    owner: { team: alpha, contact: a@example.com }
    location: "file://{root}/b/{date}/{hour}/"
    partitioning: hourly
    sla: PT1H
  - id: c.broken
    owner: { team: beta, contact: b@example.com }
    location: "file://{root}/c/{date}/{hour}/"
    partitioning: hourly
    sla: PT1H
"#,
    );
    // At 14:30 with a window of 4: hours 11, 12 are due (13:00, 14:00); 13, 14 are pending.
    tree.land("a", "2026-11-29T11", "2026-11-29T12:05:00Z");
    tree.land("a", "2026-11-29T12", "2026-11-29T13:05:00Z");
    tree.land("b", "2026-11-29T11", "2026-11-29T13:30:00Z"); // 30 min late
    let served = Served::start(tree.cmd("2026-11-29T14:30:00Z"), &["--window", "4"]);

    let mut browser = Browser::start(1000, 400).await;
    browser.open(&format!("{}/", served.url)).await;
    let cells = read_cells(&mut browser).await;
    let expect = [
        ("a.steady", "2026-11-29T11", "on_time", GREEN),
        ("a.steady", "2026-11-29T12", "on_time", GREEN),
        ("a.steady", "2026-11-29T13", "pending", GREY),
        ("a.steady", "2026-11-29T14", "pending", GREY),
        ("b.slow", "2026-11-29T11", "late", AMBER),
        ("b.slow", "2026-11-29T12", "missing", RED),
        ("b.slow", "2026-11-29T13", "pending", GREY),
        ("b.slow", "2026-11-29T14", "pending", GREY),
        ("c.broken", "2026-11-29T11", "missing", RED),
        ("c.broken", "2026-11-29T12", "missing", RED),
        ("c.broken", "2026-11-29T13", "pending", GREY),
        ("c.broken", "2026-11-29T14", "pending", GREY),
    ];
    assert_eq!(cells.len(), expect.len(), "{cells:?}");
    for (got, want) in cells.iter().zip(expect) {
        assert_eq!(
            (
                got.0.as_str(),
                got.1.as_str(),
                got.2.as_str(),
                got.3.as_str()
            ),
            want,
            "{cells:?}"
        );
        assert_eq!(got.4, format!("/explain/{}/{}", want.0, want.1));
    }
    let png = browser.screenshot().await;
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 1000);
    let artifacts = std::path::Path::new(env!("CARGO_BIN_EXE_datamon"))
        .parent()
        .and_then(|p| p.parent())
        .unwrap()
        .join("test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    std::fs::write(artifacts.join("datamon-grid.png"), &png).unwrap();

    // The owner filter and the owner page show only that team's rows.
    browser.open(&format!("{}/?owner=alpha", served.url)).await;
    let rows: std::collections::BTreeSet<String> = read_cells(&mut browser)
        .await
        .into_iter()
        .map(|c| c.0)
        .collect();
    assert_eq!(rows.into_iter().collect::<Vec<_>>(), ["a.steady", "b.slow"]);
    browser.open(&format!("{}/owner/beta", served.url)).await;
    let cells = read_cells(&mut browser).await;
    assert_eq!(cells.len(), 4);
    assert!(cells.iter().all(|c| c.0 == "c.broken"));
    let title = browser
        .eval("document.querySelector('h1').textContent")
        .await;
    assert_eq!(title, "Datasets of beta");

    // A cell's link leads to its explanation.
    browser
        .open(&format!("{}/explain/b.slow/2026-11-29T12", served.url))
        .await;
    let why = browser
        .eval("document.getElementById('why').textContent")
        .await;
    assert!(
        why.as_str()
            .unwrap()
            .contains("b.slow 2026-11-29T12 is missing"),
        "{why}"
    );
}
