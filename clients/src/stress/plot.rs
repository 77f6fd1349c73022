//! `--plot FILE.svg`: latency over the run, so a person can see the knee.
//!
//! Every request is a dot at (send time, latency): successes in blue,
//! error replies in red, lost requests as black crosses along the top
//! edge. Lines show the per-second median and 99th percentile of the
//! successes; where they bend up while the send rate stays flat, the
//! deployment is past its knee.
//!
//! A streamed run (`--stream`) gets a second panel below, on the same
//! time axis: each request's time to first delta, with its per-second
//! median and 99th percentile.

use std::path::Path;
use std::time::Duration;

use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;

use super::outcome::Outcome;
use super::report::{Latency, Record};

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

/// Draws `records` to an SVG file at `path`.
pub fn draw(path: &Path, records: &[Record], title: &str) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| format!("cannot draw {}: {e}", path.display());
    let streamed = records.iter().any(|r| r.stream.is_some());
    let size = if streamed { (1100, 1000) } else { (1100, 650) };
    let root = SVGBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let root = root
        .titled(title, ("sans-serif", 20))
        .map_err(|e| err(&e))?;
    let x_max = records
        .iter()
        .map(|r| r.sent.as_secs_f64())
        .fold(1.0_f64, f64::max)
        .ceil();
    if streamed {
        let (top, bottom) = root.split_vertically(590);
        latency_panel(&top, records, x_max).map_err(|e| err(&e))?;
        ttfd_panel(&bottom, records, x_max).map_err(|e| err(&e))?;
    } else {
        latency_panel(&root, records, x_max).map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

type DrawResult = Result<(), DrawingAreaErrorKind<std::io::Error>>;

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

type Chart<'a, 'b> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// A panel's chart: time since start across, `y_desc` up to `y_max`.
fn chart<'a, 'b>(
    area: &'a Area<'b>,
    x_max: f64,
    y_max: f64,
    y_desc: &str,
) -> Result<Chart<'a, 'b>, DrawingAreaErrorKind<std::io::Error>> {
    let mut chart = ChartBuilder::on(area)
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)?;
    chart
        .configure_mesh()
        .x_desc("time since start (s)")
        .y_desc(y_desc)
        .draw()?;
    Ok(chart)
}

/// One dot per point, in `color`, with its legend entry.
fn dots(
    chart: &mut Chart<'_, '_>,
    points: &[(f64, f64)],
    color: RGBColor,
    alpha: f64,
    label: String,
) -> DrawResult {
    chart
        .draw_series(
            points
                .iter()
                .map(|&p| Circle::new(p, 2, color.mix(alpha).filled())),
        )?
        .label(label)
        .legend(move |(x, y)| Circle::new((x + 10, y), 3, color.filled()));
    Ok(())
}

/// The per-second p50 and p99 lines, then the legend.
fn percentile_lines<'a, 'b: 'a>(
    chart: &mut Chart<'a, 'b>,
    (p50, p99): (Line, Line),
    p50_label: String,
    p99_label: &str,
) -> DrawResult {
    chart
        .draw_series(LineSeries::new(p50, GREEN.stroke_width(2)))?
        .label(p50_label)
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], GREEN.stroke_width(2)));
    chart
        .draw_series(LineSeries::new(p99, MAGENTA.stroke_width(2)))?
        .label(p99_label)
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], MAGENTA.stroke_width(2)));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
}

/// Latency to the final reply of every request.
fn latency_panel(area: &Area<'_>, records: &[Record], x_max: f64) -> DrawResult {
    let highest = records
        .iter()
        .filter_map(|r| r.latency.map(ms))
        .fold(1.0_f64, f64::max);
    let y_max = highest * 1.1;
    let mut chart = chart(area, x_max, y_max, "latency (ms)")?;

    let points = |ok: bool| -> Vec<(f64, f64)> {
        records
            .iter()
            .filter(|r| (r.outcome == Outcome::Ok) == ok)
            .filter_map(|r| r.latency.map(|l| (secs(r.sent), ms(l))))
            .collect()
    };
    let (ok, errors) = (points(true), points(false));
    let lost: Vec<f64> = records
        .iter()
        .filter(|r| r.outcome == Outcome::Lost)
        .map(|r| secs(r.sent))
        .collect();
    dots(&mut chart, &ok, BLUE, 0.45, format!("ok ({})", ok.len()))?;
    dots(
        &mut chart,
        &errors,
        RED,
        0.6,
        format!("error reply ({})", errors.len()),
    )?;
    chart
        .draw_series(
            lost.iter()
                .map(|&x| Cross::new((x, y_max * 0.98), 4, BLACK.stroke_width(1))),
        )?
        .label(format!("lost ({})", lost.len()))
        .legend(|(x, y)| Cross::new((x + 10, y), 4, BLACK.stroke_width(1)));
    percentile_lines(
        &mut chart,
        per_second(records),
        "ok p50 per second".into(),
        "ok p99 per second",
    )
}

/// Time to first delta of every streamed request that got one.
fn ttfd_panel(area: &Area<'_>, records: &[Record], x_max: f64) -> DrawResult {
    let ttfd = |r: &Record| r.stream.and_then(|s| s.ttfd);
    let highest = records
        .iter()
        .filter_map(|r| ttfd(r).map(ms))
        .fold(1.0_f64, f64::max);
    let mut chart = chart(area, x_max, highest * 1.1, "time to first delta (ms)")?;

    let points = |ok: bool| -> Vec<(f64, f64)> {
        records
            .iter()
            .filter(|r| (r.outcome == Outcome::Ok) == ok)
            .filter_map(|r| ttfd(r).map(|t| (secs(r.sent), ms(t))))
            .collect()
    };
    let (ok, others) = (points(true), points(false));
    let without = records
        .iter()
        .filter(|r| r.stream.is_some() && ttfd(r).is_none())
        .count();
    dots(
        &mut chart,
        &ok,
        BLUE,
        0.45,
        format!("first delta, ok ({})", ok.len()),
    )?;
    dots(
        &mut chart,
        &others,
        RED,
        0.6,
        format!("first delta, then an error or lost ({})", others.len()),
    )?;
    percentile_lines(
        &mut chart,
        per_second_of(records, ttfd),
        format!("p50 per second ({without} request(s) without a delta not shown)"),
        "p99 per second",
    )
}

/// Points of a line: (seconds since start, milliseconds).
pub type Line = Vec<(f64, f64)>;

/// Median and p99 latency (ms) of the successes sent in each second,
/// plotted at the middle of their second.
pub fn per_second(records: &[Record]) -> (Line, Line) {
    per_second_of(records, |r| {
        (r.outcome == Outcome::Ok).then_some(r.latency).flatten()
    })
}

/// Median and p99 (ms) of `value` over the requests sent in each second
/// that have one, plotted at the middle of their second.
pub fn per_second_of(
    records: &[Record],
    value: impl Fn(&Record) -> Option<Duration>,
) -> (Line, Line) {
    let mut buckets: std::collections::BTreeMap<u64, Vec<Duration>> = Default::default();
    for r in records {
        if let Some(v) = value(r) {
            buckets.entry(r.sent.as_secs()).or_default().push(v);
        }
    }
    buckets
        .into_iter()
        .map(|(s, vs)| {
            let l = Latency::of(vs);
            let x = s as f64 + 0.5;
            ((x, l.p50), (x, l.p99))
        })
        .unzip()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_an_svg() {
        let records: Vec<Record> = (0..200)
            .map(|i| Record {
                sent: Duration::from_millis(i * 20),
                latency: (i % 50 != 0).then(|| Duration::from_millis(10 + i)),
                outcome: match i % 50 {
                    0 => Outcome::Lost,
                    7 => Outcome::Error(crate::protocol::ErrorCode::Overloaded),
                    _ => Outcome::Ok,
                },
                attempts: 1,
                stream: None,
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.svg");
        draw(&path, &records, "test").unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(100)]);
        assert!(svg.contains("latency (ms)"));
        let (p50, p99) = per_second(&records);
        assert_eq!(p50.len(), 4);
        assert!(p99.iter().zip(&p50).all(|(a, b)| a.1 >= b.1));
    }

    #[test]
    fn draws_an_empty_run() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("e.svg");
        draw(&path, &[], "empty").unwrap();
        assert!(path.exists());
    }

    #[test]
    fn a_streamed_run_gets_a_panel_of_time_to_first_delta() {
        let records: Vec<Record> = (0..100)
            .map(|i| Record {
                sent: Duration::from_millis(i * 30),
                latency: Some(Duration::from_millis(100 + i)),
                outcome: Outcome::Ok,
                attempts: 1,
                stream: Some(crate::stress::Streamed {
                    ttfd: (i % 10 != 0).then(|| Duration::from_millis(5 + i / 10)),
                    deltas: 3,
                    deltas_sent: Some(3),
                    max_gap: Some(Duration::from_millis(50)),
                    messages: 4,
                }),
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.svg");
        draw(&path, &records, "streamed").unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.contains("latency (ms)"));
        assert!(svg.contains("time to first delta (ms)"));
        let (p50, _) = per_second_of(&records, |r| r.stream.and_then(|s| s.ttfd));
        assert_eq!(p50.len(), 3);
        assert!(
            p50.iter().all(|&(_, y)| (5.0..15.0).contains(&y)),
            "{p50:?}"
        );
    }
}
