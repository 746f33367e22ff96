//! ε spent over time as SVG (plotters' SVG backend), inlined in the dashboard's pages.
//!
//! The y-axis is fitted to the data (with the cap drawn when it is in view) and the x-axis is
//! time labelled with UTC dates, as the coordinator's console draws its trend charts.

use plotters::prelude::*;

/// The y range shown for values `lo..=hi`: the data with a margin of a tenth of its spread on
/// each side (5 % of the value when all are equal), rounded outwards to a step of 1, 2 or 5
/// times a power of ten; never below 0 for non-negative data.
pub fn fitted_range(lo: f64, hi: f64) -> (f64, f64) {
    let spread = hi - lo;
    let margin = if spread > 0.0 {
        spread / 10.0
    } else if hi.abs() > 0.0 {
        hi.abs() / 20.0
    } else {
        1.0
    };
    let (a, b) = (lo - margin, hi + margin);
    let step = round_step((b - a) / 5.0);
    let a = (a / step).floor() * step;
    let b = (b / step).ceil() * step;
    (if lo >= 0.0 && a < 0.0 { 0.0 } else { a }, b)
}

fn round_step(raw: f64) -> f64 {
    if raw <= 0.0 || !raw.is_finite() {
        return 1.0;
    }
    let power = 10f64.powf(raw.log10().floor());
    for m in [1.0, 2.0, 5.0] {
        if m * power >= raw {
            return m * power;
        }
    }
    10.0 * power
}

fn date(ms: i64, format: &str) -> String {
    jiff::Timestamp::from_millisecond(ms)
        .map(|t| t.strftime(format).to_string())
        .unwrap_or_default()
}

/// Whether [`spend_svg`] draws `cap` for a spend reaching `max`: only when it is near the data
/// (within twice the spend), as a cap far above would flatten the curve.
pub fn cap_in_view(cap: f64, max: f64) -> bool {
    cap <= 2.0 * max.max(f64::MIN_POSITIVE)
}

/// A step chart of the spend after each charge (`points`: (Unix ms, ε so far), oldest first),
/// with the lifetime `cap` as a dashed line when given. `None` without points.
pub fn spend_svg(points: &[(i64, f64)], cap: Option<f64>) -> Option<String> {
    let first = points.first()?.0;
    let last = points.last()?.0;
    let (x0, x1) = if last > first {
        let pad = ((last - first) / 20).max(1);
        (first - pad, last + pad)
    } else {
        (first - 43_200_000, first + 43_200_000)
    };
    let lo = points.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let mut hi = points.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    let cap = cap.filter(|c| cap_in_view(*c, hi));
    if let Some(c) = cap {
        hi = hi.max(c);
    }
    let (y0, y1) = fitted_range(lo, hi);
    let format = if x1 - x0 < 60_000 {
        "%H:%M:%S%.3f"
    } else if x1 - x0 < 3_600_000 {
        "%H:%M:%S"
    } else if x1 - x0 < 2 * 86_400_000 {
        "%m-%d %H:%M"
    } else {
        "%Y-%m-%d"
    };
    let mut svg = String::new();
    let drawn = (|| -> Result<(), Box<dyn std::error::Error + '_>> {
        let root = SVGBackend::with_string(&mut svg, (720, 240)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .margin(14)
            .x_label_area_size(34)
            .y_label_area_size(64)
            .build_cartesian_2d(x0..x1, y0..y1)?;
        let x_fmt = |ms: &i64| date(*ms, format);
        let y_fmt = |v: &f64| format!("{v:.2}");
        chart
            .configure_mesh()
            .x_labels(6)
            .y_labels(6)
            .x_label_formatter(&x_fmt)
            .y_label_formatter(&y_fmt)
            .y_desc("ε spent")
            .light_line_style(RGBColor(236, 236, 236))
            .bold_line_style(RGBColor(210, 210, 210))
            .label_style(("sans-serif", 13))
            .draw()?;
        if let Some(c) = cap {
            let red = RGBColor(220, 38, 38);
            chart.draw_series(DashedLineSeries::new(
                [(x0, c), (x1, c)],
                6,
                4,
                red.stroke_width(1),
            ))?;
        }
        let colour = RGBColor(37, 99, 235);
        // A step curve: the spend holds until the next charge.
        let mut steps = Vec::with_capacity(points.len() * 2);
        for (i, p) in points.iter().enumerate() {
            if i > 0 {
                steps.push((p.0, points[i - 1].1));
            }
            steps.push(*p);
        }
        steps.push((x1, points[points.len() - 1].1));
        chart.draw_series(LineSeries::new(steps, colour.stroke_width(2)))?;
        chart.draw_series(points.iter().map(|p| Circle::new(*p, 3, colour.filled())))?;
        root.present()?;
        Ok(())
    })();
    match drawn {
        Ok(()) => Some(svg),
        Err(e) => {
            tracing::warn!(error = %e, "could not draw a dashboard chart");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_axis_is_fitted_and_dated() {
        let (lo, hi) = fitted_range(2.0, 2.5);
        assert!(
            lo > 1.0 && lo <= 2.0 && (2.5..3.0).contains(&hi),
            "{lo} {hi}"
        );
        // 2026-03-01 and 2026-03-08.
        let points = [(1_772_323_200_000, 0.5), (1_772_928_000_000, 1.0)];
        let svg = spend_svg(&points, Some(10.0)).unwrap();
        assert!(svg.starts_with("<svg"), "{svg}");
        assert!(svg.contains("2026-03-0"), "no date label");
        assert_eq!(svg.matches("<circle").count(), 2);
        assert!(spend_svg(&[], None).is_none());
    }
}
