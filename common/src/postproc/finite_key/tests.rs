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

#[test]
fn ideal_channel_phase_error_vanishes_with_statistics() {
    let params = SecurityParams { g2: 0.0, ..SecurityParams::default() };
    let mut previous = f64::INFINITY;
    for clicks in [10_000u64, 1_000_000, 100_000_000, 10_000_000_000] {
        let bounds = phase_error_bounds(&stats(10 * clicks, counts_with_visibility(clicks, 1.0), 0), &params).unwrap();
        assert!(bounds.test_rate_upper > 0.0 && bounds.test_rate_upper < previous, "{clicks}: {bounds:?}");
        previous = bounds.test_rate_upper;
    }
    // At 1e10 clicks the bound is a few 1e-5 (it falls as 1/sqrt(clicks)).
    assert!(previous < 1e-4, "{previous}");
}

#[test]
fn phase_error_tends_to_half_one_minus_visibility() {
    let params = SecurityParams { g2: 0.0, ..SecurityParams::default() };
    for v in [0.8, 0.9, 0.97] {
        let target = (1.0 - v) / 2.0;
        let bounds =
            phase_error_bounds(&stats(1_000_000_000_000, counts_with_visibility(10_000_000_000, v), 0), &params)
                .unwrap();
        assert!(bounds.test_rate_upper >= target, "v={v}: {bounds:?}");
        assert!(bounds.test_rate_upper - target < 2e-4, "v={v}: {bounds:?}");
    }
}

#[test]
fn gamma_matches_hand_computation() {
    // n = 1e6, k = 1e5, lambda = 0.05, eps = 1e-10:
    // lambda (1 - lambda) = 0.0475;
    // (n + k) lambda (1 - lambda) / (n k) = 1.1e6 * 0.0475 / 1e11 = 5.225e-7;
    // (n + k) / (2 pi n k lambda (1 - lambda) eps^2) = 1.1e6 / (2 pi * 1e11 * 0.0475 * 1e-20)
    //   = 1.1e6 / 2.98451e-10 = 3.685693e15, whose ln is 35.843235;
    // gamma = sqrt(5.225e-7 * 35.843235) = sqrt(1.872809e-5) = 0.00432760.
    let gamma = sampling_gamma(1e6, 1e5, 0.05, 1e-10);
    assert!((gamma - 0.004_327_60).abs() < 1e-8, "{gamma}");
    // More test data, smaller correction; a higher error rate, larger correction.
    assert!(sampling_gamma(1e6, 2e5, 0.05, 1e-10) < gamma);
    assert!(sampling_gamma(1e6, 1e5, 0.10, 1e-10) > gamma);
}

#[test]
fn chernoff_bounds_hand_values() {
    // beta = ln(1e11) = 25.328436.
    let beta = (1e11f64).ln();
    // x = 0: E[x] <= 2 beta.
    assert!((chernoff_expected_upper(0.0, beta) - 2.0 * beta).abs() < 1e-12);
    assert_eq!(chernoff_expected_lower(10.0, beta), 0.0);
    // x = 10000: upper = 10000 + 25.3284 + sqrt(506568.72 + 641.53) = 10737.515,
    // lower = 10000 - 12.6642 - sqrt(506568.72 + 160.38) = 9275.489.
    assert!((chernoff_expected_upper(10_000.0, beta) - 10_737.515).abs() < 1e-2);
    assert!((chernoff_expected_lower(10_000.0, beta) - 9_275.489).abs() < 1e-2);
    // mu = 2125: observed <= 2125 + 12.6642 + sqrt(107645.85 + 160.38) = 2466.003.
    assert!((chernoff_observed_upper(2125.0, beta) - 2466.003).abs() < 1e-2);
}

#[test]
fn key_length_worked_example() {
    // Block: n_key = 1e6, n_pulses = 1e10, p_Z = 1/2, mu = 0.01, g2 = 0.0085, eps_pe = 1e-11
    // (beta = ln 1e11 = 25.328436), eps_sec = 1e-10, eps_cor = 1e-15, leak = 300000 bits.
    // X counts: e+ = e- = l+ = l- = 50000 (n_test = 200000), ++ = 190000, +- = 10000.
    // 1. r = p_Z / (2 p_X) = 0.5; score S = 0.5 (10000 - 190000) + 100000 = 10000.
    // 2. U(++ + +-) = U(200000) = 200000 + 25.328 + sqrt(2 beta 2e5 + beta^2) = 203208.41;
    //    U(e+ + l+) = U(100000) = 102276.18; v = 0.25 * 203208.41 + 102276.18 = 153078.28;
    //    Bernstein: S + sqrt(2 beta v) + r beta / 3 = 10000 + 2784.684 + 4.221 = 12788.906;
    //    multi-photon correction N p_Z / 2 p_multi = 1e10 * 0.25 * 4.25e-7 = 1062.5;
    //    expected errors <= 13851.406; observed <= 13851.406 + 12.664 +
    //    sqrt(2 beta 13851.406 + beta^2 / 4) = 14701.822.
    // 3. M = upper(1e10 * 0.5 * 4.25e-7 = 2125) = 2466.003.
    // 4. The worst split is the first grid cell: m_key = M / 64 = 38.531, m_test = M, so
    //    n_Z1 = 999961.469, n_test1 = 197533.997, e_test = 14701.822 / 197533.997 = 0.0744268,
    //    gamma(999961.469, 197533.997, 0.0744268, 1e-11) = 0.0040606, phi_1 = 0.0784874,
    //    h(phi_1) = 0.3968268.
    // 5. security cost = 6 log2(19e10) + log2(2e15) = 6 * 37.4672 + 50.8288 = 275.632;
    //    l = 999961.469 (1 - 0.3968268) - 300000 - 275.632 = 302874.32 -> 302874.
    let length = secret_key_length(&worked_example(), &SecurityParams::default()).unwrap();
    assert!((length.final_bits as i64 - 302_874).abs() <= 1, "{length:?}");
    assert!((length.phase_error_test_upper - 0.074_426_8).abs() < 1e-6, "{length:?}");
    assert!((length.phase_error_upper - 0.078_487_4).abs() < 1e-6, "{length:?}");
    assert!((length.n_single_photon_lower - 999_961.469).abs() < 0.01, "{length:?}");
    assert!((length.n_multi_photon_upper - 2_466.003).abs() < 0.01, "{length:?}");
    assert!((length.security_cost_bits - 275.632).abs() < 1e-3, "{length:?}");
    let bounds = phase_error_bounds(&worked_example(), &SecurityParams::default()).unwrap();
    assert!((bounds.score - 10_000.0).abs() < 1e-9, "{bounds:?}");
    assert!((bounds.score_second_moment_upper - 153_078.28).abs() < 0.01, "{bounds:?}");
    assert!((bounds.multi_photon_correction - 1_062.5).abs() < 1e-9, "{bounds:?}");
    assert!((bounds.test_errors_upper - 14_701.822).abs() < 0.01, "{bounds:?}");
    let phase = phase_error_upper(&worked_example(), &SecurityParams::default()).unwrap();
    assert_eq!(phase, length.phase_error_upper);
}

#[test]
fn bernstein_hand_value_and_weighting() {
    // S = 100, v = 1000, range 4.5, beta = 25.328436: 100 + sqrt(50656.87) + 37.99 = 363.06.
    let beta = (1e11f64).ln();
    let upper = bernstein_expected_upper(100.0, 1000.0, 4.5, beta);
    assert!((upper - 363.062).abs() < 1e-2, "{upper}");
    // Bounding the weighted sum once is tighter than adding the three count bounds: with
    // p_Z = 0.9 (r = 4.5) the colleague's per-count bound would give
    // r (U(+-) - L(++)) + U(e+ + l+), the Bernstein bound is smaller.
    let counts = XCounts {
        e_plus: 270_000,
        e_minus: 270_000,
        l_plus: 270_000,
        l_minus: 270_000,
        plus_plus: 54_000,
        plus_minus: 6_000,
    };
    let params = SecurityParams { p_z: 0.9, g2: 0.0, ..SecurityParams::default() };
    let bounds = phase_error_bounds(&stats(2_000_000, counts, 0), &params).unwrap();
    let r = 4.5;
    let per_count = r * (chernoff_expected_upper(6_000.0, beta) - chernoff_expected_lower(54_000.0, beta))
        + chernoff_expected_upper(540_000.0, beta);
    assert!((bounds.plus_weight - r).abs() < 1e-12);
    assert!(bounds.test_errors_expected_upper < per_count, "{bounds:?} vs {per_count}");
    // ... and still above the observed score, by at least sqrt(2 beta v).
    let v = r * r * 60_000.0 + 540_000.0;
    assert!(bounds.test_errors_expected_upper >= bounds.score + (2.0 * beta * v).sqrt());
}

#[test]
fn bernstein_bound_covers_the_mean_at_a_loose_epsilon() {
    // The bound must hold with probability at least 1 - eps. At eps = 0.05 this is testable:
    // simulate the score of 20000 independent pulses (|+> w.p. 0.1 with error 0.1, Z w.p. 0.9,
    // clicks w.p. 0.2) many times and count how often E[S] exceeds the bound.
    use rand::{Rng, SeedableRng};
    let seed = 31;
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed);
    let (n, p_click, p_x, e_x) = (20_000u32, 0.2, 0.1, 0.1);
    let r = (1.0 - p_x) / (2.0 * p_x);
    // Per pulse: + sent and - seen (score r), + sent and + seen (-r), Z sent and + seen (1).
    let (p_pm, p_pp, p_zp) = (p_x * p_click * e_x, p_x * p_click * (1.0 - e_x), (1.0 - p_x) * p_click * 0.5);
    let mean = f64::from(n) * (r * p_pm - r * p_pp + p_zp);
    let beta = (1.0f64 / 0.05).ln();
    let trials = 2000;
    let mut failures = 0;
    for _ in 0..trials {
        let (mut pm, mut pp, mut zp) = (0u32, 0u32, 0u32);
        for _ in 0..n {
            let u: f64 = rng.random();
            if u < p_pm {
                pm += 1;
            } else if u < p_pm + p_pp {
                pp += 1;
            } else if u < p_pm + p_pp + p_zp {
                zp += 1;
            }
        }
        let score = r * (f64::from(pm) - f64::from(pp)) + f64::from(zp);
        // The second moment at its true value, so only Bernstein's bound is tested here.
        let v = f64::from(n) * (r * r * (p_pm + p_pp) + p_zp);
        if mean > bernstein_expected_upper(score, v, r, beta) {
            failures += 1;
        }
    }
    // At most 5 % may fail; Bernstein is loose, so far fewer do. Allow the binomial spread.
    assert!(failures <= trials / 20, "seed {seed}: {failures} of {trials} trials exceed the bound");
}

#[test]
fn multi_photon_pulses_cost_key_through_both_tagging_and_linearity() {
    // Same block, source with and without two-photon emission: the |+> correction raises the
    // test-sample error bound by exactly N p_Z / 2 p_multi before the observed-value bound, and
    // the tagged pulses lower the single-photon key.
    let no_multi = SecurityParams { g2: 0.0, ..SecurityParams::default() };
    let multi = SecurityParams { g2: 0.05, ..SecurityParams::default() };
    let a = phase_error_bounds(&worked_example(), &no_multi).unwrap();
    let b = phase_error_bounds(&worked_example(), &multi).unwrap();
    let p_multi = 0.01 * 0.01 * 0.05 / 2.0;
    let correction = 1e10 * 0.5 / 2.0 * p_multi;
    assert_eq!(a.multi_photon_correction, 0.0);
    assert!((b.multi_photon_correction - correction).abs() < 1e-6, "{b:?}");
    assert!((b.test_errors_expected_upper - a.test_errors_expected_upper - correction).abs() < 1e-6, "{a:?} {b:?}");
    assert!(b.n_multi_photon_upper >= 1e10 * 0.5 * p_multi, "{b:?}");
    assert!(b.n_single_photon_lower <= 1e6 - b.n_multi_photon_upper / f64::from(SPLIT_GRID_CELLS));
    assert!(b.single_photon_rate_upper > a.single_photon_rate_upper);
    let (ka, kb) = (
        secret_key_length(&worked_example(), &no_multi).unwrap().final_bits,
        secret_key_length(&worked_example(), &multi).unwrap().final_bits,
    );
    assert!(kb < ka, "{kb} vs {ka}");
}

#[test]
fn worst_split_is_no_better_than_either_extreme() {
    // The grid minimum is a lower bound on the secret length at every split, in particular at
    // both extremes (all multi-photon pulses in the key, or all in the test sample).
    let params = SecurityParams { mu: 0.05, ..SecurityParams::default() };
    let stats = worked_example();
    let b = phase_error_bounds(&stats, &params).unwrap();
    let m = b.n_multi_photon_upper;
    let secret_at = |m_key: f64, m_test: f64| {
        let n1 = 1e6 - m_key;
        let t1 = 200_000.0 - m_test;
        let rate = b.test_errors_upper / t1;
        let phi = rate + sampling_gamma(n1, t1, rate, params.eps_pe);
        n1 * (1.0 - binary_entropy(phi))
    };
    let grid = b.n_single_photon_lower * (1.0 - binary_entropy(b.single_photon_rate_upper));
    for (m_key, m_test) in [(m, 0.0), (0.0, m), (m / 2.0, m / 2.0), (m / 3.0, 2.0 * m / 3.0)] {
        assert!(grid <= secret_at(m_key, m_test) + 1e-6, "{m_key} {m_test}: {b:?}");
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
    let noisier_len = secret_key_length(&noisier, &params).unwrap();
    assert!(noisier_len.final_bits < base, "{noisier_len:?}");
    // Brighter multi-photon emission costs key too.
    let brighter = SecurityParams { mu: 0.03, ..params.clone() };
    assert!(secret_key_length(&worked_example(), &brighter).unwrap().final_bits < base);
    // And so does a smaller test sample.
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
fn abort_reasons() {
    let params = SecurityParams::default();
    let mut no_tests = worked_example();
    no_tests.x_counts = XCounts { plus_plus: 10, ..XCounts::default() };
    assert!(matches!(secret_key_length(&no_tests, &params), Err(KeyLengthError::NotEnoughTestData { .. })));
    let mut no_plus = worked_example();
    no_plus.x_counts.plus_plus = 0;
    no_plus.x_counts.plus_minus = 0;
    assert!(matches!(secret_key_length(&no_plus, &params), Err(KeyLengthError::NotEnoughTestData { .. })));
    // Visibility 0: e_ph = 1/2.
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
    let multi = SecurityParams { mu: 10.0, g2: 1.0, ..params.clone() };
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
