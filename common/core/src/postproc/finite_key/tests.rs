use super::*;

/// Expected-value counts for `clicks_plus` X-measured clicks from |+> and as many from the Z
/// states together (p_Z = 1/2 makes N_E + N_L = N_+), with interferometer visibility `v`.
fn counts_with_visibility(clicks_plus: u64, v: f64) -> XCounts {
    let plus_minus = (clicks_plus as f64 * (1.0 - v) / 2.0).round() as u64;
    let quarter = clicks_plus / 4;
    XCounts {
        e_plus: quarter,
        e_minus: quarter,
        l_plus: quarter,
        l_minus: quarter,
        plus_plus: clicks_plus - plus_minus,
        plus_minus,
    }
}

fn stats(n_key_bits: u64, x_counts: XCounts, leak_ec_bits: u64) -> BlockStats {
    BlockStats { n_key_bits, n_pulses: 10_000_000_000, x_counts, leak_ec_bits }
}

fn worked_example() -> BlockStats {
    let x_counts = XCounts {
        e_plus: 50_000,
        e_minus: 50_000,
        l_plus: 50_000,
        l_minus: 50_000,
        plus_plus: 190_000,
        plus_minus: 10_000,
    };
    stats(1_000_000, x_counts, 300_000)
}

fn no_multi() -> SecurityParams {
    SecurityParams { g2_max: 0.0, ..SecurityParams::default() }
}

#[test]
fn the_eps_terms_add_up_to_eps_qkd() {
    for eps_qkd in [1e-6, 1e-9, 1e-12] {
        let budget = EpsBudget::from_total(eps_qkd);
        assert!((budget.composed() - eps_qkd).abs() <= 1e-12 * eps_qkd, "{budget:?}");
        assert!((budget.eps_auth + budget.eps_cor + budget.eps_sec - eps_qkd).abs() <= 1e-12 * eps_qkd, "{budget:?}");
        assert!(
            (budget.eps_pe_each * f64::from(N_PE_BOUNDS) - budget.eps_pe_total).abs() <= 1e-12 * budget.eps_pe_total
        );
    }
    // The default: eps_cor 1e-11, eps_PA 4.95e-10, all statistical bounds (9.9e-10 / 4)^2 =
    // 6.125625e-20, each a sixth of that.
    let budget = EpsBudget::from_total(DEFAULT_EPS_QKD);
    assert!((budget.eps_cor - 1e-11).abs() < 1e-25 && (budget.eps_pa - 4.95e-10).abs() < 1e-22, "{budget:?}");
    assert!((budget.eps_pe_each - 1.020_937_5e-20).abs() < 1e-30, "{budget:?}");
    // PA cost 2 log2(1 / 9.9e-10) = 59.83 bits.
    assert!((budget.pa_cost_bits() - 59.8237).abs() < 1e-3, "{}", budget.pa_cost_bits());
}

#[test]
fn verification_tags_grow_with_the_block() {
    // One 64-bit tag collides with at most (L + 1) / 2^64: 8.5e-15 at 10^7 bits.
    assert_eq!(n_tags_for(10_000_000, 1e-11), 1);
    assert_eq!(n_tags_for(10_000_000, 1e-15), 2);
    assert_eq!(n_tags_for(1_000, 1e-30), 2);
    assert_eq!(n_tags_for(1_000, 1e-40), 3);
    for n_bits in [1_000u64, 100_000, 10_000_000, 1_000_000_000] {
        for eps_cor in [1e-11, 1e-20, 1e-35] {
            let tags = n_tags_for(n_bits, eps_cor);
            let per_tag = crate::postproc::verify::eps_cor_for(n_bits as usize);
            assert!(per_tag.powi(tags as i32) <= eps_cor, "{n_bits} {eps_cor}: {tags}");
            assert!(
                tags == 1 || per_tag.powi(tags as i32 - 1) > eps_cor,
                "{n_bits} {eps_cor}: {tags} is not the least"
            );
        }
    }
}

#[test]
fn ideal_channel_phase_error_vanishes_with_statistics() {
    let mut previous = f64::INFINITY;
    for clicks in [10_000u64, 1_000_000, 100_000_000, 10_000_000_000] {
        let bounds =
            phase_error_bounds(&stats(10 * clicks, counts_with_visibility(clicks, 1.0), 0), &no_multi()).unwrap();
        assert!(
            bounds.single_photon_rate_upper > 0.0 && bounds.single_photon_rate_upper < previous,
            "{clicks}: {bounds:?}"
        );
        previous = bounds.single_photon_rate_upper;
    }
    // It falls as 1/sqrt(clicks): about 1.2e-4 at 1e10 clicks.
    assert!(previous < 2e-4, "{previous}");
}

#[test]
fn phase_error_tends_to_half_one_minus_visibility() {
    for v in [0.8, 0.9, 0.97] {
        let target = (1.0 - v) / 2.0;
        let bounds =
            phase_error_bounds(&stats(1_000_000_000_000, counts_with_visibility(10_000_000_000, v), 0), &no_multi())
                .unwrap();
        assert!(bounds.single_photon_rate_upper >= target, "v={v}: {bounds:?}");
        assert!(bounds.single_photon_rate_upper - target < 5e-4, "v={v}: {bounds:?}");
    }
}

#[test]
fn each_step_is_the_bound_it_claims() {
    // Recompute the chain by hand from the primitives, for a source with multi-photon pulses.
    let params = SecurityParams::default();
    let s = worked_example();
    let b = phase_error_bounds(&s, &params).unwrap();
    let eps = EpsBudget::from_total(params.eps_qkd).eps_pe_each;
    let (r, n, p_multi) = (0.5, 1e10, 0.01f64 * 0.01 * 0.0085 / 2.0);
    assert_eq!(b.plus_weight, r);
    assert_eq!(b.score, 0.5 * (10_000.0 - 190_000.0) + 100_000.0);
    assert_eq!(b.plus_expected_upper, expectation_upper(200_000.0, eps));
    assert_eq!(b.z_plus_expected_upper, expectation_upper(100_000.0, eps));
    assert_eq!(b.score_variance_upper, r * r * b.plus_expected_upper + b.z_plus_expected_upper);
    // Differences at most max(r, 1) + r = 1.5.
    assert_eq!(b.score_deviation, freedman_deviation(b.score_variance_upper, 1.5, eps));
    let expected = b.score + b.score_deviation + r * n * 0.5 * p_multi;
    assert!((b.test_errors_expected_upper - expected).abs() < 1e-6, "{b:?}");
    assert_eq!(b.test_errors_upper, count_upper(expected, eps));
    assert_eq!(b.n_multi_photon_upper, count_upper(n * 0.5 * p_multi, eps));
    // The sampling step.
    assert_eq!(b.key_bad_upper, key_errors_upper(1_000_000, 200_000, b.test_bad_upper, eps));
    assert!(b.single_photon_rate_upper * b.n_single_photon_lower <= b.key_bad_upper as f64 + 1e-9);
    // The key length is the formula.
    let length = secret_key_length(&s, &params).unwrap();
    let tags = 64 * u64::from(n_tags_for(1_000_000, EpsBudget::from_total(params.eps_qkd).eps_cor));
    let formula = b.entropy_bits() - 300_000.0 - tags as f64 - EpsBudget::from_total(params.eps_qkd).pa_cost_bits();
    assert_eq!(length.final_bits, formula.floor() as u64);
    assert_eq!(length.leak_verification_bits, 64);
    assert_eq!(phase_error_upper(&s, &params).unwrap(), length.phase_error_upper());
}

#[test]
fn multi_photon_pulses_cost_key_through_both_tagging_and_linearity() {
    let multi = SecurityParams { g2_max: 0.02, ..SecurityParams::default() };
    let a = phase_error_bounds(&worked_example(), &no_multi()).unwrap();
    let b = phase_error_bounds(&worked_example(), &multi).unwrap();
    let correction = 1e10 * 0.5 / 2.0 * (0.01 * 0.01 * 0.02 / 2.0);
    assert_eq!(a.multi_photon_correction, 0.0);
    assert!((b.multi_photon_correction - correction).abs() < 1e-6, "{b:?}");
    assert!((b.test_errors_expected_upper - a.test_errors_expected_upper - correction).abs() < 1e-6, "{a:?} {b:?}");
    assert!(b.n_multi_photon_upper >= 1e10 * 0.5 * (0.01 * 0.01 * 0.02 / 2.0), "{b:?}");
    assert_eq!(b.n_single_photon_lower, 1e6 - b.n_multi_photon_upper.floor());
    assert!(b.single_photon_rate_upper > a.single_photon_rate_upper);
    let (ka, kb) = (
        secret_key_length(&worked_example(), &no_multi()).unwrap().final_bits,
        secret_key_length(&worked_example(), &multi).unwrap().final_bits,
    );
    assert!(kb < ka, "{kb} vs {ka}");
}

#[test]
fn tagging_every_multi_photon_pulse_is_no_better_than_any_actual_split() {
    let params = SecurityParams { mu_max: 0.02, ..SecurityParams::default() };
    let s = worked_example();
    let worst = phase_error_bounds(&s, &params).unwrap();
    let m = worst.n_multi_photon_upper.floor();
    assert!(m > 100.0, "{worst:?}");
    for m_key in [0.0, (m / 3.0).floor(), m] {
        let at = phase_error_bounds_at_split(&s, &params, m_key).unwrap();
        assert!(worst.entropy_bits() <= at.entropy_bits() + 1e-6, "{m_key}: {worst:?} vs {at:?}");
    }
}

#[test]
fn more_leak_or_more_phase_error_means_less_key() {
    let params = SecurityParams::default();
    let base = secret_key_length(&worked_example(), &params).unwrap().final_bits;
    let mut leakier = worked_example();
    leakier.leak_ec_bits += 1000;
    let leakier = secret_key_length(&leakier, &params).unwrap().final_bits;
    assert!(leakier < base && base - leakier >= 999 && base - leakier <= 1001);
    let mut noisier = worked_example();
    noisier.x_counts.plus_minus += 2000;
    noisier.x_counts.plus_plus -= 2000;
    assert!(secret_key_length(&noisier, &params).unwrap().final_bits < base);
    let brighter = SecurityParams { mu_max: 0.03, ..params.clone() };
    assert!(secret_key_length(&worked_example(), &brighter).unwrap().final_bits < base);
    let stricter = SecurityParams { eps_qkd: 1e-15, ..params.clone() };
    assert!(secret_key_length(&worked_example(), &stricter).unwrap().final_bits < base);
    let mut fewer_tests = worked_example();
    fewer_tests.x_counts = XCounts {
        e_plus: 12_500,
        e_minus: 12_500,
        l_plus: 12_500,
        l_minus: 12_500,
        plus_plus: 47_500,
        plus_minus: 2_500,
    };
    assert!(secret_key_length(&fewer_tests, &params).unwrap().final_bits < base);
}

#[test]
fn source_monitor_refuses_readings_above_the_bounds() {
    let params = SecurityParams { mu_max: 3.89e-3, g2_max: 0.01, ..SecurityParams::default() };
    let mut monitor = SourceMonitor::default();
    assert!(monitor.check(&params).is_err(), "a block without readings is refused");
    monitor.add_frame(SourceReading { mu: 3.85e-3, g2: 0.0085 });
    monitor.add_frame(SourceReading { mu: 3.87e-3, g2: 0.0086 });
    assert!(monitor.check(&params).is_ok());
    let mut bright = SourceMonitor::default();
    bright.add_frame(SourceReading { mu: 0.02, g2: 0.0085 });
    let err = bright.check(&params).unwrap_err();
    assert!(err.to_string().contains("mean photon number 2.0000e-2 exceeds mu_max 3.8900e-3"), "{err}");
    let mut bunched = SourceMonitor::default();
    bunched.add_frame(SourceReading { mu: 3.8e-3, g2: 0.02 });
    assert!(bunched.check(&params).unwrap_err().to_string().contains("g2(0)"));
}

#[test]
fn abort_reasons() {
    let params = SecurityParams::default();
    let mut no_tests = worked_example();
    no_tests.x_counts = XCounts { plus_plus: 10, ..XCounts::default() };
    assert!(matches!(secret_key_length(&no_tests, &params), Err(KeyLengthError::NotEnoughTestData { .. })));
    let mut no_plus = worked_example();
    no_plus.x_counts.plus_plus = 0;
    no_plus.x_counts.plus_minus = 0;
    assert!(matches!(secret_key_length(&no_plus, &params), Err(KeyLengthError::NotEnoughTestData { .. })));
    let mut random_phase = worked_example();
    random_phase.x_counts.plus_plus = 100_000;
    random_phase.x_counts.plus_minus = 100_000;
    let err = secret_key_length(&random_phase, &params).unwrap_err();
    assert!(matches!(err, KeyLengthError::PhaseErrorTooHigh { .. }), "{err}");
    assert!(err.to_string().starts_with("phase error upper bound"), "{err}");
    let mut leaky = worked_example();
    leaky.leak_ec_bits = 700_000;
    let err = secret_key_length(&leaky, &params).unwrap_err();
    assert!(matches!(err, KeyLengthError::NoKeyLeft { .. }), "{err}");
    let multi = SecurityParams { mu_max: 10.0, g2_max: 1.0, ..params.clone() };
    assert!(matches!(secret_key_length(&worked_example(), &multi), Err(KeyLengthError::NoSinglePhotons { .. })));
    let bad = SecurityParams { p_z: 1.0, ..params };
    assert!(matches!(secret_key_length(&worked_example(), &bad), Err(KeyLengthError::InvalidParams { .. })));
}

#[test]
fn x_counts_accumulate() {
    let mut total = XCounts::default();
    let frame = XCounts { e_plus: 1, e_minus: 2, l_plus: 3, l_minus: 4, plus_plus: 90, plus_minus: 10 };
    total.add(&frame);
    total.add(&frame);
    assert_eq!(total.n_z_sent(), 20);
    assert_eq!(total.n_plus_sent(), 200);
    assert!((total.qber_x() - 0.1).abs() < 1e-15);
    assert_eq!(XCounts::default().qber_x(), 0.0);
}

#[test]
fn side_slot_monitor_accepts_the_calibrated_ratio_and_refuses_a_mismatch() {
    let calibration = SideSlotCalibration { ratio_low: 0.85, ratio_high: 0.95, p_dark: 1e-7, tolerance: 0.05 };
    let n_pulses = 1_000_000_000; // dark counts: 200 central, 400 side
    // 100 000 central signal clicks: the side signal is 85 000 to 95 000, plus 400 dark counts.
    let central = 100_200;
    let ok = XSlotCounts { side: 90_400, central };
    assert!(calibration.check(&ok, n_pulses).is_ok());
    let mismatched = XSlotCounts { side: 72_000, central };
    let err = calibration.check(&mismatched, n_pulses).unwrap_err();
    assert!(err.starts_with("detector side-slot monitor: 72000 side-slot clicks against 100200 central"), "{err}");
    let flooded = XSlotCounts { side: 120_000, central };
    assert!(calibration.check(&flooded, n_pulses).is_err());
    // Dark counts alone: four side windows against two central ones.
    let dark = XSlotCounts { side: 400, central: 200 };
    assert!(calibration.check(&dark, n_pulses).is_ok());
}
