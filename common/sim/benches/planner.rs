//! Planner throughput: simulated seconds of link operation per wall-clock second, at 0, 60 and
//! 120 km of the reference preset (`presets/wang2026-120km.toml`), with the full post-processing
//! and the planning tool's blocks of 10^6 sifted bits.
//!
//! `cargo bench -p qkd-sim --bench planner` (release profile). A plain `harness = false` binary
//! timed with `std::time::Instant`: the workspace carries no benchmark framework. The cost is
//! dominated by the work per photon and per detection (Alice's AES state of each pulse,
//! Bob's optics), so the throughput falls roughly as the detection rate rises.
//!
//! Each distance runs a fixed simulated duration, long enough for at least one finite-key block;
//! `QKD_BENCH_SCALE` (default 1) multiplies the durations.

use std::time::Instant;

use qkd_core::link::ProtocolParams;
use qkd_core::postproc::finite_key::SecurityParams;
use qkd_sim::LinkParams;
use qkd_sim::planner::{Eavesdropper, Scenario, simulate};

/// (distance in km, simulated duration in s): about the same wall time each.
const POINTS: [(f64, f64); 3] = [(0.0, 30.0), (60.0, 900.0), (120.0, 7200.0)];

fn main() {
    let scale: f64 = std::env::var("QKD_BENCH_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1.0);
    println!(
        "{:>8} {:>12} {:>9} {:>16} {:>13} {:>7}",
        "km", "simulated s", "wall s", "simulated s / s", "detections/s", "blocks"
    );
    for (distance_km, duration_s) in POINTS {
        let (mut link, bounds) = LinkParams::preset_with_bounds("wang2026-120km").expect("built-in preset");
        link.distance_km = distance_km;
        let bounds = bounds.expect("the preset ships its calibration");
        let security = SecurityParams::with_bounds(bounds.mu_max, bounds.g2_max, link.p_z);
        let scenario = Scenario {
            link,
            security,
            protocol: ProtocolParams { block_bits: 1_000_000, ..ProtocolParams::default() },
            duration_s: duration_s * scale,
            eavesdropper: Eavesdropper::None,
            seed: 1,
        };
        let started = Instant::now();
        let report = simulate(&scenario, |_| {}).expect("simulation runs");
        let wall = started.elapsed().as_secs_f64();
        println!(
            "{:>8.0} {:>12.0} {:>9.2} {:>16.0} {:>13.0} {:>7}",
            distance_km,
            report.duration_s,
            wall,
            report.duration_s / wall,
            report.detections_per_s,
            report.blocks
        );
    }
}
