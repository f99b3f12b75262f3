//! SVG plots of sweeps (plotters, SVG backend): secret key rate (log scale) and QBER against
//! the swept parameter; analytic curves, simulated points and the reference experiment's
//! published points together.

use std::path::Path;

use plotters::prelude::*;
use qkd_sim::planner::SimulationReport;

use crate::simulate::{PAPER_MAX_DISTANCE_KM, PAPER_QBER_120KM, PAPER_RATE_POINTS};

/// Lowest key rate shown on the log axis, in bit/s; points without key are drawn on it.
const RATE_FLOOR_BPS: f64 = 0.1;

/// Writes the two-panel sweep plot. `analytic` holds (value, asymptotic key rate in bit/s,
/// QBER Z, QBER X) on a fine grid.
pub fn sweep_svg(
    path: &Path,
    param: &str,
    values: &[f64],
    reports: &[SimulationReport],
    analytic: &[(f64, f64, f64, f64)],
) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (1000, 860)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(480);
    let x_min = values.first().copied().unwrap_or(0.0).min(analytic.first().map_or(0.0, |a| a.0));
    let x_max = values.last().copied().unwrap_or(1.0).max(analytic.last().map_or(1.0, |a| a.0)).max(x_min + 1e-9);
    let is_distance = param == "distance_km";
    let x_desc = if is_distance { "fibre length (km)" } else { param };
    let block_bits = reports.first().map_or(0, |r| r.block_size);
    let x_label = |v: &f64| if is_distance { format!("{v:.0}") } else { format!("{v}") };

    // Key rate panel.
    let y_max = analytic
        .iter()
        .map(|a| a.1)
        .chain(reports.iter().map(|r| r.secret_key_rate_bps))
        .filter(|v| *v > 0.0)
        .fold(1.0, f64::max)
        * 3.0;
    let y_min = RATE_FLOOR_BPS;
    let mut chart = ChartBuilder::on(&top)
        .caption("Secret key rate", ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(x_min..x_max, (y_min..y_max).log_scale())?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc("bit/s")
        .x_label_formatter(&x_label)
        .y_label_formatter(&|v| if *v >= 1.0 { format!("{v:.0}") } else { format!("{v}") })
        .draw()?;
    chart
        .draw_series(LineSeries::new(
            analytic.iter().filter(|a| a.1 > y_min).map(|a| (a.0, a.1)),
            BLUE.stroke_width(2),
        ))?
        .label("analytic: asymptotic limit of the finite-key bound (f = 1)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    chart
        .draw_series(
            values
                .iter()
                .zip(reports)
                .filter(|(_, r)| r.secret_key_rate_bps > y_min)
                .map(|(v, r)| Circle::new((*v, r.secret_key_rate_bps), 5, RED.filled())),
        )?
        .label(format!("simulated: finite key, full post-processing, blocks of {block_bits:e} bits"))
        .legend(|(x, y)| Circle::new((x + 10, y), 5, RED.filled()));
    if values.iter().zip(reports).any(|(_, r)| r.secret_key_rate_bps <= y_min) {
        chart
            .draw_series(
                values
                    .iter()
                    .zip(reports)
                    .filter(|(_, r)| r.secret_key_rate_bps <= y_min)
                    .map(|(v, _)| Cross::new((*v, y_min), 5, RED.stroke_width(2))),
            )?
            .label("simulated: no finite key")
            .legend(|(x, y)| Cross::new((x + 10, y), 5, RED.stroke_width(2)));
    }
    if is_distance {
        chart
            .draw_series(PAPER_RATE_POINTS.iter().map(|&(d, r)| TriangleMarker::new((d, r), 8, BLACK.filled())))?
            .label("Wang et al. 2026: about 15 bit/s at 120 km (finite key)")
            .legend(|(x, y)| TriangleMarker::new((x + 10, y), 8, BLACK.filled()));
        if (x_min..=x_max).contains(&PAPER_MAX_DISTANCE_KM) {
            chart
                .draw_series(LineSeries::new(
                    vec![(PAPER_MAX_DISTANCE_KM, y_min), (PAPER_MAX_DISTANCE_KM, y_max)],
                    BLACK.stroke_width(1),
                ))?
                .label("Wang et al. 2026: maximum distance 127 km")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.stroke_width(1)));
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerLeft)
        .draw()?;

    // QBER panel.
    let q_max = analytic
        .iter()
        .flat_map(|a| [a.2, a.3])
        .chain(reports.iter().flat_map(|r| [r.qber_z, r.qber_x]))
        .fold(0.12f64, f64::max)
        .min(0.5)
        * 100.0
        * 1.15;
    let mut chart = ChartBuilder::on(&bottom)
        .caption("QBER", ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(x_min..x_max, 0.0..q_max)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc("%")
        .x_label_formatter(&x_label)
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()?;
    chart
        .draw_series(LineSeries::new(analytic.iter().map(|a| (a.0, 100.0 * a.2)), BLUE.stroke_width(2)))?
        .label("analytic Z")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    chart
        .draw_series(LineSeries::new(analytic.iter().map(|a| (a.0, 100.0 * a.3)), GREEN.stroke_width(2)))?
        .label("analytic X (interferometer aligned)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], GREEN.stroke_width(2)));
    chart
        .draw_series(
            values
                .iter()
                .zip(reports)
                .filter(|(_, r)| r.qber_z > 0.0)
                .map(|(v, r)| Circle::new((*v, 100.0 * r.qber_z), 5, BLUE.filled())),
        )?
        .label("simulated Z (error correction)")
        .legend(|(x, y)| Circle::new((x + 10, y), 5, BLUE.filled()));
    chart
        .draw_series(
            values
                .iter()
                .zip(reports)
                .filter(|(_, r)| r.blocks > 0)
                .map(|(v, r)| Circle::new((*v, 100.0 * r.qber_x), 5, GREEN.filled())),
        )?
        .label("simulated X (with drift and phase loop)")
        .legend(|(x, y)| Circle::new((x + 10, y), 5, GREEN.filled()));
    if is_distance {
        chart
            .draw_series(
                [(120.0, 100.0 * PAPER_QBER_120KM.0), (120.0, 100.0 * PAPER_QBER_120KM.1)]
                    .map(|p| TriangleMarker::new(p, 8, BLACK.filled())),
            )?
            .label("Wang et al. 2026 at 120 km: Z 6.85 %, X 9.60 %")
            .legend(|(x, y)| TriangleMarker::new((x + 10, y), 8, BLACK.filled()));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    root.present()?;
    Ok(())
}
