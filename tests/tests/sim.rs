//! The simulated link against the reference experiment (J. Wang et al., Light Sci. Appl. 2026,
//! 120 km with a quantum-dot source), through the planner: the same source, fibre, receiver and
//! post-processing code as the daemons, in simulated time (`qkd_sim::planner`, what
//! `qkdctl simulate` runs).
//!
//! Each test runs one seeded scenario; the figures it asserts are the paper's published ones
//! (QBER Z 6.85 % and X 9.60 %, about 15 bit/s of finite key at 120 km, 127 km maximum distance,
//! six hours of stable operation).

use qkd_core::link::ProtocolParams;
use qkd_core::postproc::finite_key::SecurityParams;
use qkd_sim::planner::{Eavesdropper, Scenario, SimulationReport, simulate};
use qkd_sim::{InterceptResend, LinkParams, expected};

/// The planning tool's finite-key block (`qkdctl simulate --block-bits` default), sifted bits.
const PLANNING_BLOCK_BITS: u64 = 2_000_000;

/// The reference preset at `distance_km`, with its phase loop on or off.
fn reference_link(distance_km: f64, feedback: bool) -> LinkParams {
    let mut link = LinkParams::preset("wang2026-120km").expect("built-in preset");
    link.distance_km = distance_km;
    link.feedback_enabled = feedback;
    link
}

/// The calibration both presets ship (`[security]`): what the key length assumes.
fn calibration(link: &LinkParams) -> SecurityParams {
    let (_, bounds) = LinkParams::preset_with_bounds("wang2026-120km").expect("built-in preset");
    let bounds = bounds.expect("the preset ships its calibration");
    SecurityParams::with_bounds(bounds.mu_max, bounds.g2_max, link.p_z)
}

fn run(link: LinkParams, block_bits: u64, duration_s: f64, eavesdropper: Eavesdropper, seed: u64) -> SimulationReport {
    let security = calibration(&link);
    run_with(link, security, block_bits, duration_s, eavesdropper, seed)
}

fn run_with(
    link: LinkParams,
    security: SecurityParams,
    block_bits: u64,
    duration_s: f64,
    eavesdropper: Eavesdropper,
    seed: u64,
) -> SimulationReport {
    let protocol = ProtocolParams { block_bits, ..ProtocolParams::default() };
    let scenario = Scenario { link, protocol, security, duration_s, eavesdropper, seed };
    simulate(&scenario, |_| {}).expect("simulation runs")
}

/// A source brighter than its calibration: the simulated source emits mu = 0.02 while the
/// analysis is configured with mu_max = 3.89e-3. The transmitter's monitor reports the true
/// brightness, so every block is aborted at both ends with the reason, and no key is stored
/// (the key length would otherwise assume about 5 times fewer multi-photon pulses than sent).
#[test]
fn a_source_brighter_than_its_calibration_aborts_every_block() {
    let seed = 205;
    let mut link = LinkParams::preset("lab-10km").expect("built-in preset");
    link.mu = 0.02;
    let security = SecurityParams { mu_max: 3.89e-3, ..calibration(&link) };
    let r = run_with(link.clone(), security.clone(), 100_000, 8.0, Eavesdropper::None, seed);
    assert!(r.blocks >= 3, "seed {seed}: {r:?}");
    assert_eq!(r.aborted_blocks, r.blocks, "seed {seed}: {r:?}");
    assert_eq!(r.secret_bits, 0);
    for b in &r.block_reports {
        let reason = b.abort_reason.as_ref().map(ToString::to_string).unwrap_or_default();
        assert!(reason.contains("source monitor: measured mean photon number"), "{reason}");
        assert!(reason.contains("exceeds mu_max 3.8900e-3"), "{reason}");
        assert!((b.monitor_mu / 0.02 - 1.0).abs() < 0.02, "{b:?}");
    }
    // The same source with an honest calibration distils key.
    let calibrated = SecurityParams { mu_max: 0.0205, ..security };
    let honest = run_with(link, calibrated, 100_000, 8.0, Eavesdropper::None, seed);
    assert!(honest.blocks >= 3 && honest.aborted_blocks == 0 && honest.secret_bits > 0, "seed {seed}: {honest:?}");
}

/// A detection-efficiency mismatch in time: the X detectors see the interferometer's side slots
/// with 80 % of the central slot's efficiency (what a detector gated unevenly, or light an
/// eavesdropper shifts in time, looks like). Bob's side-slot monitor, calibrated on the receiver's
/// timing model, sees the side slots fall short and every block is aborted at both ends, before
/// error correction.
#[test]
fn a_detection_efficiency_mismatch_is_caught_by_the_side_slot_monitor() {
    let seed = 206;
    let mut link = LinkParams::preset("lab-10km").expect("built-in preset");
    link.x_side_slot_efficiency = 0.8;
    let r = run(link, 100_000, 12.0, Eavesdropper::None, seed);
    assert!(r.blocks >= 3, "seed {seed}: {r:?}");
    assert_eq!(r.aborted_blocks, r.blocks, "seed {seed}: {r:?}");
    for b in &r.block_reports {
        let reason = b.abort_reason.as_ref().map(ToString::to_string).unwrap_or_default();
        assert!(reason.starts_with("detector side-slot monitor"), "{reason}");
        assert_eq!(b.leak_bits, 0, "aborted before error correction: {b:?}");
    }
}

/// Acceptance of the reference link: six hours at 120 km with drift and the phase loop. QBERs as
/// published within 1 percentage point, a finite-key rate of 10 to 23 bit/s (paper: about
/// 15 bit/s), every block yields key, and the X error stays near its floor (the analytic QBER X
/// at zero phase error) throughout.
#[test]
fn six_hours_at_120_km_reproduce_the_paper_and_every_block_yields_key() {
    let seed = 201;
    let link = reference_link(120.0, true);
    let floor = expected(&link).qber_x;
    let mut r = run(link, PLANNING_BLOCK_BITS, 6.0 * 3600.0, Eavesdropper::None, seed);
    let blocks = std::mem::take(&mut r.block_reports);
    let summary = format!("seed {seed}: {r:?}");
    assert!((r.qber_z - 0.0685).abs() < 0.01, "QBER Z, {summary}");
    assert!((r.qber_x - 0.0960).abs() < 0.01, "QBER X, {summary}");
    assert!((10.0..=23.0).contains(&r.secret_key_rate_bps), "finite-key rate, {summary}");
    assert!(r.blocks >= 2, "blocks in six hours, {summary}");
    assert_eq!(r.aborted_blocks, 0, "{summary}");
    for b in &blocks {
        assert!(b.final_bits > 0 && b.abort_reason.is_none(), "seed {seed}: block without key: {b:?}");
        assert!(b.qber_x < floor + 0.015, "seed {seed}: floor {floor:.4}, block {b:?}");
    }
    assert!(r.qber_x < floor + 0.01, "floor {floor:.4}, {summary}");
    println!("{summary}");
}

/// Without the phase loop the interferometer drifts (a 1 rad, 12 h temperature swing plus a
/// random walk): the X error walks away from its floor and blocks abort, as the phase-error bound
/// leaves no key (with the loop on every block yields key: see the six-hour test above).
#[test]
fn without_feedback_the_x_error_walks_past_the_abort_threshold() {
    let seed = 202;
    let duration_s = 3.0 * 3600.0;
    let floor = expected(&reference_link(120.0, false)).qber_x;
    // Blocks of 10^6 bits (about an hour each) show the drift block by block.
    let off = run(reference_link(120.0, false), 1_000_000, duration_s, Eavesdropper::None, seed);
    let x_errors: Vec<f64> = off.block_reports.iter().map(|b| b.qber_x).collect();
    let aborted: Vec<String> =
        off.block_reports.iter().filter_map(|b| b.abort_reason.as_ref().map(ToString::to_string)).collect();
    let summary = format!("seed {seed}: floor {floor:.4}, X error per block {x_errors:.4?}, aborts {aborted:?}");
    assert!(off.blocks >= 2, "{summary}");
    assert!(x_errors.windows(2).all(|w| w[1] > w[0]), "the X error should grow block by block: {summary}");
    let last = off.block_reports.last().expect("blocks");
    assert!(last.qber_x > floor + 0.05, "{summary}");
    assert!(last.abort_reason.is_some() && last.final_bits == 0, "the last block should abort: {summary}");
    assert!(
        aborted.iter().all(|reason| ["phase error", "no key left", "below one key unit"]
            .iter()
            .any(|cause| reason.contains(cause))),
        "aborts should come from the phase-error bound: {summary}"
    );
}

/// Intercept-resend on every photon is caught by the error rates: QBER Z near 25 % and no key.
/// On a tenth of the photons it adds about 2.5 points of QBER and the finite-key analysis charges
/// for them: every block yields less key than without the attack.
#[test]
fn intercept_resend_is_caught_by_the_error_rate() {
    let seed = 203;
    let lab = LinkParams::preset("lab-10km").expect("built-in preset");
    let (block_bits, duration_s) = (100_000, 12.0);
    let attack = |fraction| Eavesdropper::InterceptResend(InterceptResend { fraction });
    let full = run(lab.clone(), block_bits, duration_s, attack(1.0), seed);
    assert!(full.blocks >= 2, "seed {seed}: {full:?}");
    assert_eq!(full.aborted_blocks, full.blocks, "seed {seed}: {full:?}");
    assert_eq!(full.secret_bits, 0);
    assert!(full.qber_z > 0.2, "seed {seed}: QBER Z {}", full.qber_z);

    let honest = run(lab.clone(), block_bits, duration_s, Eavesdropper::None, seed);
    let partial = run(lab, block_bits, duration_s, attack(0.1), seed);
    assert!(partial.qber_z > honest.qber_z + 0.015, "seed {seed}: {partial:?} vs {honest:?}");
    let per_block = |r: &SimulationReport| r.secret_bits as f64 / r.blocks.max(1) as f64;
    assert!(honest.aborted_blocks == 0 && honest.blocks >= 2, "seed {seed}: {honest:?}");
    assert!(
        per_block(&partial) < 0.9 * per_block(&honest),
        "seed {seed}: {} bits per block under attack vs {} without",
        per_block(&partial),
        per_block(&honest)
    );
}

/// Photon-number splitting at 120 km: Eve keeps one photon of every two-photon pulse and hides in
/// the fibre loss, so the error and count rates do not change; only the finite-key analysis's
/// multi-photon tagging (g2(0)) bounds her. In every block the analysis tags at least as many
/// multi-photon Z pulses as Eve split, the key length it allows is no more than the formula gives
/// at the split of those pulses between key and test sample that Eve actually realised, and the
/// final key plus the disclosed bits never exceed the key bits she does not know.
#[test]
fn photon_number_splitting_is_bounded_by_the_g2_tagging() {
    let seed = 204;
    let link = reference_link(120.0, true);
    let honest = expected(&link);
    let r = run(link, PLANNING_BLOCK_BITS, 15_600.0, Eavesdropper::PhotonNumberSplitting, seed);
    let summary = format!("seed {seed}: {:?}", r.block_security);
    assert!(r.blocks >= 2 && r.aborted_blocks == 0, "{summary}");
    // Invisible to the error and count rates.
    assert!((r.qber_z - honest.qber_z).abs() < 0.005, "QBER Z {}, {summary}", r.qber_z);
    assert!((r.detections_per_s / honest.detections_per_second - 1.0).abs() < 0.02, "{summary}");
    // She learns key bits...
    assert!(r.eve_known_key_bits > 0, "{summary}");
    for b in &r.block_security {
        // ...but the tag covers every pulse she split: a martingale bound over the mean
        // N p_Z mu_max^2 g2_max / 2, which the calibration keeps above the simulator's
        // two-photon emission...
        assert!(b.eve_split_z_pulses as f64 <= b.n_multi_photon_upper, "{summary}");
        assert!(b.eve_known_key_bits + b.eve_split_test_clicks <= b.eve_split_z_pulses, "{summary}");
        // ...tagging every multi-photon pulse leaves no more key than the actual split...
        let at_actual = b.key_length_at_actual_split.expect("estimate succeeded");
        assert!(b.final_bits as f64 <= at_actual, "{summary}");
        // ...and privacy amplification leaves her no more than the bits she cannot know.
        assert!(b.final_bits + b.leak_bits <= b.n_key_bits - b.eve_known_key_bits, "{summary}");
    }
    println!("{summary}");
}
