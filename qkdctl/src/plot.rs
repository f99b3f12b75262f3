//! SVG plots of sweeps (plotters, SVG backend): secret key rate (log scale) and QBER against
//! the swept parameter; analytic curves, simulated points and the reference experiment's
//! published points together.

use std::path::Path;

use common::planner::SimulationReport;
use plotters::prelude::*;

use crate::simulate::{PAPER_MAX_DISTANCE_KM, PAPER_QBER_120KM, PAPER_RATE_POINTS};

/// Writes the two-panel sweep plot.
pub fn sweep_svg(
    path: &Path,
    param: &str,
    values: &[f64],
    reports: &[SimulationReport],
    analytic: &[(f64, f64, f64, f64)],
) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (1000, 820)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(440);
    let (x_min, x_max) = (values.first().copied().unwrap_or(0.0), values.last().copied().unwrap_or(1.0).max(1e-9));
    let is_distance = param == "distance_km";

    // Key rate panel.
    let positive = |v: f64| v > 0.0;
    let y_max = analytic.iter().map(|a| a.1).chain(reports.iter().map(|r| r.secret_key_rate_bps)).filter(|v| positive(*v)).fold(1.0, f64::max) * 3.0;
    let y_min = 0.1f64;
    let mut chart = ChartBuilder::on(&top)
        .caption("Secret key rate", ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(x_min..x_max, (y_min..y_max).log_scale())?;
    chart.configure_mesh().x_desc(param).y_desc("bit/s").draw()?;
    chart
        .draw_series(LineSeries::new(analytic.iter().filter(|a| a.1 > y_min).map(|a| (a.0, a.1)), BLUE.stroke_width(2)))?
        .label("analytic, asymptotic (f = 1)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    chart
        .draw_series(values.iter().zip(reports).filter(|(_, r)| r.secret_key_rate_bps > y_min).map(|(v, r)| Circle::new((*v, r.secret_key_rate_bps), 5, RED.filled())))?
        .label("simulated, finite key (full post-processing)")
        .legend(|(x, y)| Circle::new((x + 10, y), 5, RED.filled()));
    if is_distance {
        chart
            .draw_series(PAPER_RATE_POINTS.iter().map(|&(d, r)| TriangleMarker::new((d, r), 8, BLACK.filled())))?
            .label("Wang et al. 2026: 15 bit/s at 120 km")
            .legend(|(x, y)| TriangleMarker::new((x + 10, y), 8, BLACK.filled()));
        if PAPER_MAX_DISTANCE_KM <= x_max {
            chart
                .draw_series(LineSeries::new(vec![(PAPER_MAX_DISTANCE_KM, y_min), (PAPER_MAX_DISTANCE_KM, y_max)], BLACK.stroke_width(1)))?
                .label("Wang et al. 2026: maximum distance 127 km")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.stroke_width(1)));
        }
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.85)).border_style(BLACK).position(SeriesLabelPosition::LowerLeft).draw()?;

    // QBER panel.
    let q_max = analytic.iter().flat_map(|a| [a.2, a.3]).chain(reports.iter().flat_map(|r| [r.qber_z, r.qber_x])).fold(0.12f64, f64::max) * 100.0 * 1.15;
    let mut chart = ChartBuilder::on(&bottom)
        .caption("QBER", ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(x_min..x_max, 0.0..q_max)?;
    chart.configure_mesh().x_desc(param).y_desc("%").draw()?;
    chart
        .draw_series(LineSeries::new(analytic.iter().map(|a| (a.0, 100.0 * a.2)), BLUE.stroke_width(2)))?
        .label("analytic Z")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    chart
        .draw_series(LineSeries::new(analytic.iter().map(|a| (a.0, 100.0 * a.3)), GREEN.stroke_width(2)))?
        .label("analytic X")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], GREEN.stroke_width(2)));
    chart
        .draw_series(values.iter().zip(reports).filter(|(_, r)| r.qber_z > 0.0).map(|(v, r)| Circle::new((*v, 100.0 * r.qber_z), 5, BLUE.filled())))?
        .label("simulated Z")
        .legend(|(x, y)| Circle::new((x + 10, y), 5, BLUE.filled()));
    chart
        .draw_series(values.iter().zip(reports).map(|(v, r)| Circle::new((*v, 100.0 * r.qber_x), 5, GREEN.filled())))?
        .label("simulated X")
        .legend(|(x, y)| Circle::new((x + 10, y), 5, GREEN.filled()));
    if is_distance {
        chart
            .draw_series([(120.0, 100.0 * PAPER_QBER_120KM.0), (120.0, 100.0 * PAPER_QBER_120KM.1)].map(|p| TriangleMarker::new(p, 8, BLACK.filled())))?
            .label("Wang et al. 2026 at 120 km: Z 6.85 %, X 9.60 %")
            .legend(|(x, y)| TriangleMarker::new((x + 10, y), 8, BLACK.filled()));
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.85)).border_style(BLACK).position(SeriesLabelPosition::UpperLeft).draw()?;
    root.present()?;
    Ok(())
}
