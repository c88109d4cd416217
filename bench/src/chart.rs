//! The PNG chart of `peers-push`: message latency (p99 solid, p50 dashed) against the
//! target rate, one colour per system, both axes logarithmic.
//!
//! plotters' bitmap backend with its `ab_glyph` text: no fontconfig, no system font
//! library. The font is a TTF read at run time from the usual Debian places (DejaVu, from
//! `fonts-dejavu-core`); if none is there the chart is drawn without text and a line says so.

use std::path::Path;

use crate::peers_push::Push;
use crate::side::PeerResult;
use anyhow::Context as _;
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

/// TTF files tried, in order, for the chart's text.
const FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

/// Registers the first font found as `sans-serif`; false if there is none.
fn load_font() -> bool {
    for path in FONTS {
        if let Ok(bytes) = std::fs::read(path) {
            // Registered once per process and kept for its life: plotters wants 'static.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                return true;
            }
        }
    }
    false
}

/// One step: target rate, p50 ms, p99 ms.
type Point = (f64, f64, f64);

/// The points of every step of a result.
fn points(r: &Push) -> Vec<Point> {
    r.steps
        .iter()
        .map(|s| (f64::from(s.rate), s.p50_ms.max(0.01), s.p99_ms.max(0.01)))
        .collect()
}

/// Draws the chart of `results` (the `peers-push` JSON) into `path`.
pub fn latency_against_rate(path: &Path, results: &[PeerResult<Push>]) -> anyhow::Result<()> {
    let text = load_font();
    if !text {
        eprintln!(
            "chart: no TTF font found ({}); drawing without text",
            FONTS.join(", ")
        );
    }
    let series: Vec<(String, Vec<Point>)> = results
        .iter()
        .filter_map(|r| Some((r.peer.clone(), points(r.ran()?))))
        .filter(|(_, p)| !p.is_empty())
        .collect();
    let all = series.iter().flat_map(|(_, p)| p.iter());
    let (mut x_max, mut y_min, mut y_max) = (1_000.0f64, 1.0f64, 10.0f64);
    let mut x_min = f64::MAX;
    for &(x, p50, p99) in all {
        x_min = x_min.min(x);
        x_max = x_max.max(x);
        y_min = y_min.min(p50);
        y_max = y_max.max(p99);
    }
    if x_min == f64::MAX {
        x_min = 100.0;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).ok();
    }
    let root = BitMapBackend::new(path, (960, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut builder = ChartBuilder::on(&root);
    builder.margin(20);
    if text {
        builder
            .caption(
                "push by user: latency against rate (p99 solid, p50 dashed)",
                ("sans-serif", 22),
            )
            .x_label_area_size(45)
            .y_label_area_size(60);
    }
    let mut chart = builder
        .build_cartesian_2d(
            (x_min * 0.8..x_max * 1.25).log_scale(),
            (y_min * 0.5..y_max * 2.0).log_scale(),
        )
        .context("cannot lay out the chart")?;
    let mut mesh = chart.configure_mesh();
    if text {
        mesh.x_desc("target rate, messages per second")
            .y_desc("latency, ms (send to receive)")
            .x_label_formatter(&|x| format!("{:.0}", x))
            .y_label_formatter(&|y| format!("{y}"));
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw()?;
    let colours = [
        RGBColor(200, 30, 30),
        RGBColor(30, 90, 200),
        RGBColor(20, 140, 60),
    ];
    for (i, (name, pts)) in series.iter().enumerate() {
        let colour = colours[i % colours.len()];
        let p99 = chart.draw_series(LineSeries::new(
            pts.iter().map(|&(x, _, p99)| (x, p99)),
            colour.stroke_width(3),
        ))?;
        if text {
            p99.label(name.clone()).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(3))
            });
        }
        chart.draw_series(
            pts.iter()
                .map(|&(x, _, p99)| Circle::new((x, p99), 4, colour.filled())),
        )?;
        chart.draw_series(DashedLineSeries::new(
            pts.iter().map(|&(x, p50, _)| (x, p50)),
            8,
            6,
            colour.stroke_width(2),
        ))?;
    }
    if text {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}
