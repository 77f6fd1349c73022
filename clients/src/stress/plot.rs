//! `--plot FILE.svg`: latency over the run, so a person can see the knee.
//!
//! Every request is a dot at (send time, latency): successes in blue,
//! error replies in red, lost requests as black crosses along the top
//! edge. Lines show the per-second median and 99th percentile of the
//! successes; where they bend up while the send rate stays flat, the
//! deployment is past its knee.

use std::path::Path;
use std::time::Duration;

use plotters::prelude::*;

use super::outcome::Outcome;
use super::report::{Latency, Record};

/// Draws `records` to an SVG file at `path`.
pub fn draw(path: &Path, records: &[Record], title: &str) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| format!("cannot draw {}: {e}", path.display());
    let secs = |d: Duration| d.as_secs_f64();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;

    let x_max = records
        .iter()
        .map(|r| secs(r.sent))
        .fold(1.0_f64, f64::max)
        .ceil();
    let highest = records
        .iter()
        .filter_map(|r| r.latency.map(ms))
        .fold(1.0_f64, f64::max);
    let y_max = highest * 1.1;

    let root = SVGBackend::new(path, (1100, 650)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("time since start (s)")
        .y_desc("latency (ms)")
        .draw()
        .map_err(|e| err(&e))?;

    let ok: Vec<(f64, f64)> = records
        .iter()
        .filter(|r| r.outcome == Outcome::Ok)
        .filter_map(|r| r.latency.map(|l| (secs(r.sent), ms(l))))
        .collect();
    let errors: Vec<(f64, f64)> = records
        .iter()
        .filter(|r| r.outcome != Outcome::Ok)
        .filter_map(|r| r.latency.map(|l| (secs(r.sent), ms(l))))
        .collect();
    let lost: Vec<f64> = records
        .iter()
        .filter(|r| r.outcome == Outcome::Lost)
        .map(|r| secs(r.sent))
        .collect();

    chart
        .draw_series(
            ok.iter()
                .map(|&p| Circle::new(p, 2, BLUE.mix(0.45).filled())),
        )
        .map_err(|e| err(&e))?
        .label(format!("ok ({})", ok.len()))
        .legend(|(x, y)| Circle::new((x + 10, y), 3, BLUE.filled()));
    chart
        .draw_series(
            errors
                .iter()
                .map(|&p| Circle::new(p, 2, RED.mix(0.6).filled())),
        )
        .map_err(|e| err(&e))?
        .label(format!("error reply ({})", errors.len()))
        .legend(|(x, y)| Circle::new((x + 10, y), 3, RED.filled()));
    chart
        .draw_series(
            lost.iter()
                .map(|&x| Cross::new((x, y_max * 0.98), 4, BLACK.stroke_width(1))),
        )
        .map_err(|e| err(&e))?
        .label(format!("lost ({})", lost.len()))
        .legend(|(x, y)| Cross::new((x + 10, y), 4, BLACK.stroke_width(1)));

    let (p50, p99) = per_second(records);
    chart
        .draw_series(LineSeries::new(p50, GREEN.stroke_width(2)))
        .map_err(|e| err(&e))?
        .label("ok p50 per second")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], GREEN.stroke_width(2)));
    chart
        .draw_series(LineSeries::new(p99, MAGENTA.stroke_width(2)))
        .map_err(|e| err(&e))?
        .label("ok p99 per second")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], MAGENTA.stroke_width(2)));

    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// Points of a line: (seconds since start, milliseconds).
pub type Line = Vec<(f64, f64)>;

/// Median and p99 latency (ms) of the successes sent in each second,
/// plotted at the middle of their second.
pub fn per_second(records: &[Record]) -> (Line, Line) {
    let mut buckets: std::collections::BTreeMap<u64, Vec<Duration>> = Default::default();
    for r in records {
        if let (Outcome::Ok, Some(l)) = (r.outcome, r.latency) {
            buckets.entry(r.sent.as_secs()).or_default().push(l);
        }
    }
    buckets
        .into_iter()
        .map(|(s, ls)| {
            let l = Latency::of(ls);
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
}
