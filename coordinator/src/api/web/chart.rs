//! Trend charts as SVG (plotters' SVG backend), inlined in the console's pages.
//!
//! The y-axis is fitted to the data, not started at 0: a fall from 2,468 to 2,408 must be seen.
//! The x-axis is time, labelled with dates in the schedule's time zone.

use jiff::tz::TimeZone;
use plotters::prelude::*;

use crate::report::format_with;

/// The y range shown for values `lo..=hi`: the data with a margin of a tenth of its spread on
/// each side (5 % of the value when all values are equal), rounded outwards to a round step.
pub fn fitted_range(lo: f64, hi: f64) -> (f64, f64) {
    let (a, b, _) = fitted_axis(lo, hi);
    (a, b)
}

/// [`fitted_range`] and its step (1, 2 or 5 times a power of ten; about five steps).
pub fn fitted_axis(lo: f64, hi: f64) -> (f64, f64, f64) {
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
    // Counts and rates are never negative: do not show negative ticks for them.
    let a = if lo >= 0.0 && a < 0.0 { 0.0 } else { a };
    (a, b, step)
}

/// 1, 2 or 5 times a power of ten, at least `raw`.
fn round_step(raw: f64) -> f64 {
    if raw <= 0.0 || !raw.is_finite() {
        return 1.0;
    }
    let power = 10f64.powf(raw.log10().floor());
    for m in [1.0, 2.0, 5.0, 10.0] {
        if m * power >= raw {
            return m * power;
        }
    }
    10.0 * power
}

/// `v` with thousands separators (`2,468`), or as a percentage with one decimal.
pub fn format_value(v: f64, percent: bool) -> String {
    if percent {
        return format!("{v:.1} %");
    }
    let n = v.round() as i64;
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

/// A line chart of `points` ((Unix ms, value), in time order) as an SVG document, `percent`
/// saying whether the values are percentages. `None` without points.
pub fn trend_svg(points: &[(i64, f64)], tz: &TimeZone, percent: bool) -> Option<String> {
    let first = points.first()?.0;
    let last = points.last()?.0;
    let (x0, x1) = if last > first {
        let pad = (last - first) / 20;
        (first - pad, last + pad)
    } else {
        (first - 43_200_000, first + 43_200_000)
    };
    let lo = points.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let hi = points.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    let (y0, y1) = fitted_range(lo, hi);
    let date_format = if x1 - x0 < 3_600_000 {
        "%H:%M:%S"
    } else if x1 - x0 < 2 * 86_400_000 {
        "%m-%d %H:%M"
    } else {
        "%Y-%m-%d"
    };
    let mut svg = String::new();
    let drawn = (|| -> Result<(), Box<dyn std::error::Error + '_>> {
        let root = SVGBackend::with_string(&mut svg, (760, 280)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .margin(14)
            .x_label_area_size(34)
            .y_label_area_size(80)
            .build_cartesian_2d(x0..x1, y0..y1)?;
        let x_fmt = |ms: &i64| format_with(*ms, tz, date_format);
        let y_fmt = |v: &f64| format_value(*v, percent);
        chart
            .configure_mesh()
            .x_labels(6)
            .y_labels(6)
            .x_label_formatter(&x_fmt)
            .y_label_formatter(&y_fmt)
            .light_line_style(RGBColor(236, 236, 236))
            .bold_line_style(RGBColor(210, 210, 210))
            .label_style(("sans-serif", 13))
            .draw()?;
        let colour = RGBColor(37, 99, 235);
        chart.draw_series(LineSeries::new(
            points.iter().copied(),
            colour.stroke_width(2),
        ))?;
        chart.draw_series(points.iter().map(|p| Circle::new(*p, 4, colour.filled())))?;
        root.present()?;
        Ok(())
    })();
    match drawn {
        Ok(()) => Some(svg),
        Err(e) => {
            tracing::warn!(error = %e, "could not draw a chart");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_axis_is_fitted_to_the_data() {
        let (lo, hi) = fitted_range(2408.0, 2468.0);
        assert!(lo > 2300.0 && lo <= 2408.0, "{lo}");
        assert!((2468.0..2600.0).contains(&hi), "{hi}");
        assert_eq!(fitted_range(0.0, 0.0), (0.0, 1.0));
        let (lo, hi) = fitted_range(50.0, 50.0);
        assert!(lo < 50.0 && hi > 50.0 && lo >= 0.0);
    }

    #[test]
    fn values_are_readable() {
        assert_eq!(format_value(2468.0, false), "2,468");
        assert_eq!(format_value(1_234_567.0, false), "1,234,567");
        assert_eq!(format_value(24.68, true), "24.7 %");
    }

    #[test]
    fn the_chart_has_dates_and_fitted_ticks() {
        let tz = TimeZone::UTC;
        // 2026-03-01 and 2026-03-08.
        let points = [(1_772_323_200_000, 2468.0), (1_772_928_000_000, 2408.0)];
        let svg = trend_svg(&points, &tz, false).unwrap();
        assert!(svg.starts_with("<svg"), "{svg}");
        assert!(svg.contains("2026-03-0"), "no date label");
        assert!(svg.contains("2,4"), "no fitted y tick");
        assert!(!svg.contains(">0<"), "the y-axis starts at 0");
        assert_eq!(svg.matches("<circle").count(), 2);
    }
}
