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
        let bounds = phase_error_bounds(&stats(10 * clicks, counts_with_visibility(clicks, 1.0), 0), &params)
            .unwrap();
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
    // 1. U(e+ + l+) = U(100000) = 100000 + 25.328 + sqrt(2 beta 1e5 + beta^2) = 102276.18;
    //    U(+-) = 10737.52; L(++) = 190000 - 12.664 - sqrt(2 beta 190000 + beta^2 / 4) = 186884.92.
    // 2. N_E / N_+ = (1e10 / 4) / (1e10 / 2) = 0.5; expected errors
    //    0.5 (10737.52 - 186884.92) + 102276.18 = 14202.48; observed <= 14202.48 + 12.664 +
    //    sqrt(2 beta 14202.48 + beta^2 / 4) = 15063.44; e_test = 15063.44 / 200000 = 0.0753172.
    // 3. gamma(1e6, 2e5, 0.0753172, 1e-11) = 0.0040606; phi_key = 0.0793778.
    // 4. p_multi = 0.01^2 * 0.0085 / 2 = 4.25e-7; mean multi-photon Z pulses 1e10 * 0.5 * 4.25e-7
    //    = 2125, upper 2466.00; n_Z1 = 1e6 - 2466.00 = 997534.00;
    //    phi_1 = 0.0793778 * 1e6 / 997534.00 = 0.0795741, h(phi_1) = 0.4006766.
    // 5. security cost = 6 log2(19e10) + log2(2e15) = 6 * 37.4672 + 50.8288 = 275.632;
    //    l = 997534.00 (1 - 0.4006766) - 300000 - 275.632 = 297569.79 -> 297569.
    let length = secret_key_length(&worked_example(), &SecurityParams::default()).unwrap();
    assert!((length.final_bits as i64 - 297_569).abs() <= 1, "{length:?}");
    assert!((length.phase_error_test_upper - 0.075_317_2).abs() < 1e-6, "{length:?}");
    assert!((length.phase_error_upper - 0.079_574_1).abs() < 1e-6, "{length:?}");
    assert!((length.n_single_photon_lower - 997_534.0).abs() < 0.01, "{length:?}");
    assert!((length.security_cost_bits - 275.632).abs() < 1e-3, "{length:?}");
    let phase = phase_error_upper(&worked_example(), &SecurityParams::default()).unwrap();
    assert_eq!(phase, length.phase_error_upper);
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
    let brighter = SecurityParams { mu: 0.1, ..params.clone() };
    assert!(secret_key_length(&worked_example(), &brighter).unwrap().final_bits < base);
    // And so does a smaller test sample.
    let mut fewer_tests = worked_example();
    fewer_tests.x_counts = XCounts {
        e_plus: 5_000,
        e_minus: 5_000,
        l_plus: 5_000,
        l_minus: 5_000,
        plus_plus: 19_000,
        plus_minus: 1_000,
    };
    assert!(secret_key_length(&fewer_tests, &params).unwrap().final_bits < base);
}

#[test]
fn abort_reasons() {
    let params = SecurityParams::default();
    let mut no_tests = worked_example();
    no_tests.x_counts = XCounts { plus_plus: 10, ..XCounts::default() };
    assert!(matches!(
        secret_key_length(&no_tests, &params),
        Err(KeyLengthError::NotEnoughTestData { .. })
    ));
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
    assert!(matches!(
        secret_key_length(&worked_example(), &multi),
        Err(KeyLengthError::NoSinglePhotons { .. })
    ));
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
