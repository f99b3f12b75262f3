//! Acceptance tests of the simulated channel: Monte-Carlo against the analytic model, calibration
//! against the reference experiment, eavesdropping, drift with and without feedback, and cost.

use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

use super::math::successes;
use super::*;

/// Index of a measurement in a 4-cell outcome table: Z early, Z late, X plus, X minus.
fn cell(m: Measurement) -> usize {
    match m {
        Measurement::Z { late } => usize::from(late),
        Measurement::X { minus } => 2 + usize::from(minus),
    }
}

/// Monte-Carlo counts `[state E, L, +][Z early, Z late, X plus, X minus]` over `frames` frames,
/// with the receiver's phase offset first moved by `phase_rad`.
fn run_counts(
    p: &LinkParams,
    frames: u64,
    n_pulses: u64,
    eve: Option<InterceptResend>,
    phase_rad: f64,
    seed: u64,
) -> [[u64; 4]; 3] {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let src = Source::new(p);
    let mut rx = Receiver::new(p);
    rx.add_phase_offset(phase_rad);
    let mut counts = [[0u64; 4]; 3];
    for _ in 0..frames {
        let secret = FrameSecret::random(&mut rng);
        let mut photons = src.emit_frame(&secret, n_pulses, &mut rng);
        if let Some(e) = eve {
            e.attack(&mut photons, &mut rng);
        }
        for d in rx.detect_frame(&photons, n_pulses, &mut rng) {
            let s = alice_state(&secret, d.pulse_idx, p.p_z) as usize;
            counts[s][cell(d.measurement)] += 1;
        }
    }
    counts
}

fn qber_z(c: &[[u64; 4]; 3]) -> f64 {
    (c[0][1] + c[1][0]) as f64 / (c[0][0] + c[0][1] + c[1][0] + c[1][1]) as f64
}

fn qber_x(c: &[[u64; 4]; 3]) -> f64 {
    c[2][3] as f64 / (c[2][2] + c[2][3]) as f64
}

/// Checks every (state sent, basis, outcome) count against the analytic expectation within
/// 3 standard deviations (Poisson), with drift and feedback off and the interferometer held at a
/// phase error of `phase_rad`, and returns the expected number of detections.
fn check_against_analytic(p: &LinkParams, frames: u64, n_pulses: u64, phase_rad: f64, seed: u64) -> f64 {
    let mut p = p.clone();
    p.feedback_enabled = false;
    p.phase_drift_rad_per_sqrt_s = 0.0;
    p.slow_drift_amplitude_rad = 0.0;
    let counts = run_counts(&p, frames, n_pulses, None, phase_rad, seed);
    let e = expected_with_phase(&p, phase_rad);
    let n = (frames * n_pulses) as f64;
    let mut total = 0.0;
    for (s, row) in counts.iter().enumerate() {
        for (w, &got) in row.iter().enumerate() {
            let mean = n * e.joint[s][w / 2][w % 2];
            let got = got as f64;
            total += mean;
            assert!(
                (got - mean).abs() <= 3.0 * mean.sqrt(),
                "seed {seed}, {} km: state {s} cell {w}: {got} counts vs {mean:.1} expected ({:.1} sd)",
                p.distance_km,
                (got - mean) / mean.sqrt()
            );
        }
    }
    total
}

#[test]
fn monte_carlo_matches_analytic_at_several_distances() {
    let base = LinkParams::preset("wang2026-120km").unwrap();
    // (distance, frames, pulses per frame): about 1e5 detections each.
    for (km, frames, n_pulses, seed) in
        [(0.0, 25, 1u64 << 22, 101), (50.0, 40, 1 << 24, 102), (120.0, 80, 1 << 28, 103)]
    {
        let mut p = base.clone();
        p.distance_km = km;
        let total = check_against_analytic(&p, frames, n_pulses, 0.0, seed);
        assert!(total > 50_000.0, "{km} km: {total} detections expected");
    }
}

#[test]
fn monte_carlo_matches_analytic_with_afterpulses_and_dead_time() {
    let mut p = LinkParams::preset("lab-10km").unwrap();
    p.afterpulse_probability = 0.05;
    p.dead_time_ns = 100.0;
    p.distance_km = 0.0;
    check_against_analytic(&p, 25, 1 << 22, 0.0, 104);
}

#[test]
fn monte_carlo_matches_analytic_with_a_phase_error() {
    let p = LinkParams::preset("lab-10km").unwrap();
    check_against_analytic(&p, 25, 1 << 22, 1.0, 112);
}

#[test]
fn calibration_matches_the_paper_at_120_km() {
    let p = LinkParams::preset("wang2026-120km").unwrap();
    let e = expected(&p);
    assert!((e.qber_z - 0.0685).abs() < 0.01, "analytic QBER Z {}", e.qber_z);
    assert!((e.qber_x - 0.0960).abs() < 0.01, "analytic QBER X {}", e.qber_x);
    let seed = 105;
    let (frames, n_pulses) = (120u64, 1u64 << 28);
    let c = run_counts(&p, frames, n_pulses, None, 0.0, seed);
    let (qz, qx) = (qber_z(&c), qber_x(&c));
    let det: u64 = c.iter().flatten().sum();
    let per_s = det as f64 / (frames * n_pulses) as f64 * p.clock_hz;
    assert!((qz - 0.0685).abs() < 0.01, "seed {seed}: Monte-Carlo QBER Z {qz}");
    assert!((qx - 0.0960).abs() < 0.01, "seed {seed}: Monte-Carlo QBER X {qx}");
    assert!((per_s / e.detections_per_second - 1.0).abs() < 0.02, "seed {seed}: {per_s} det/s");
    // The asymptotic key (the finite-key analysis's limit for infinite blocks, error correction
    // at the Shannon limit) lies above the paper's finite-key 2e-7 bit/pulse and vanishes a few
    // km beyond its 127 km maximum distance.
    let key = e.asymptotic_key_per_pulse;
    assert!(key > 2e-7 && key < 6e-7, "key {key} bit/pulse");
    let cutoff = (1200..1500)
        .map(|d| f64::from(d) / 10.0)
        .find(|&d| {
            let mut far = p.clone();
            far.distance_km = d;
            expected(&far).asymptotic_key_per_pulse == 0.0
        })
        .unwrap_or(150.0);
    assert!((127.0..135.0).contains(&cutoff), "asymptotic cutoff {cutoff} km");
    println!("asymptotic key {key:.3e} bit/pulse (f = 1), zero from {cutoff} km");
    println!(
        "120 km: analytic QBER Z {:.4} X {:.4} det/s {:.1}; Monte-Carlo QBER Z {qz:.4} X {qx:.4} det/s {per_s:.1}",
        e.qber_z, e.qber_x, e.detections_per_second
    );
}

#[test]
fn intercept_resend_raises_qber_z_to_a_quarter() {
    let seed = 106;
    let eve = Some(InterceptResend { fraction: 1.0 });
    // Ideal timing: the attack alone gives 25 %.
    let mut p = LinkParams::preset("lab-10km").unwrap();
    p.t1_ps = 1.0;
    p.jitter_ps = 0.0;
    let c = run_counts(&p, 20, 1 << 22, eve, 0.0, seed);
    let q = qber_z(&c);
    assert!((q - 0.25).abs() < 0.02, "seed {seed}: QBER Z under attack {q}");
    // The preset: 25 % plus half of the honest link's Z error (intrinsic error and dark counts,
    // analytic), which applies when Eve chose Z; within 3 sd of the binomial count.
    let p = LinkParams::preset("lab-10km").unwrap();
    let c = run_counts(&p, 20, 1 << 22, eve, 0.0, seed);
    let q = qber_z(&c);
    let honest = expected(&p).qber_z;
    let want = 0.25 + honest / 2.0;
    let n_z = (c[0][0] + c[0][1] + c[1][0] + c[1][1]) as f64;
    let sd = (want * (1.0 - want) / n_z).sqrt();
    assert!(
        (q - want).abs() < 3.0 * sd,
        "seed {seed}: QBER Z {q} vs {want} (honest {honest}, e_Z0 {}; sd {sd})",
        p.intrinsic_z_error()
    );
    // X basis: Eve in Z randomises |+> half of the time.
    let qx = qber_x(&c);
    assert!(qx > 0.2, "seed {seed}: QBER X under attack {qx}");
}

/// Whether Alice sent |+> in pulse `idx` of a synthetic stream: a cheap keyed hash (SplitMix64,
/// Steele et al., OOPSLA 2014) below `p_x`, so the drift tests need no AES block per photon.
fn synthetic_plus(key: u64, idx: u64, p_x: f64) -> bool {
    let mut z = (idx ^ key).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    ((z >> 11) as f64 / (1u64 << 53) as f64) < p_x
}

/// Runs `seconds` of simulated time with frames of `n_pulses`, keeping only Alice's |+> pulses
/// (the feedback's input, chosen by [`synthetic_plus`]; her Z pulses do not affect the X test
/// statistics) and feeding the test outcomes back after every frame. Returns the measured X error
/// of the |+> pulses per `block_s` block and the largest |phase error| seen.
fn drift_run(
    p: &LinkParams,
    rx: &mut Receiver,
    seconds: f64,
    n_pulses: u64,
    block_s: f64,
    seed: u64,
) -> (Vec<f64>, f64) {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let frame_s = n_pulses as f64 * p.pulse_period_s();
    let p_arrive = Source::new(p).arrival_probability();
    let p_x = 1.0 - p.p_z;
    let mut blocks = Vec::new();
    let (mut n, mut err) = (0u64, 0u64);
    let mut worst: f64 = 0.0;
    let start = rx.simulated_time_s();
    while rx.simulated_time_s() - start < seconds - 0.5 * frame_s {
        let key = rand::Rng::random::<u64>(&mut rng);
        let photons: Vec<Photon> = successes(&mut rng, n_pulses, p_arrive)
            .filter(|&i| synthetic_plus(key, i, p_x))
            .map(|pulse_idx| Photon { pulse_idx, state: State::Plus, two_photons: false })
            .collect();
        let (mut frame_n, mut frame_err) = (0u64, 0u64);
        for d in rx.detect_frame(&photons, n_pulses, &mut rng) {
            if let Measurement::X { minus } = d.measurement
                && synthetic_plus(key, d.pulse_idx, p_x)
            {
                frame_n += 1;
                frame_err += u64::from(minus);
            }
        }
        rx.feedback(frame_n, frame_err);
        n += frame_n;
        err += frame_err;
        worst = worst.max(rx.phase_error_rad().abs());
        let t = rx.simulated_time_s() - start;
        if (t / block_s).floor() > ((t - frame_s) / block_s).floor() || t >= seconds - 0.5 * frame_s {
            blocks.push(err as f64 / n.max(1) as f64);
            (n, err) = (0, 0);
        }
    }
    (blocks, worst)
}

/// Six simulated hours of the 120 km preset in 30-minute blocks, feedback on or off.
fn six_hours(feedback: bool, seed: u64) -> (Vec<f64>, f64) {
    let mut p = LinkParams::preset("wang2026-120km").unwrap();
    p.feedback_enabled = feedback;
    let mut rx = Receiver::new(&p);
    drift_run(&p, &mut rx, 6.0 * 3600.0, 1 << 26, 1800.0, seed)
}

#[test]
fn without_feedback_the_x_error_drifts_past_15_percent() {
    let seed = 107;
    let (blocks, worst) = six_hours(false, seed);
    let first = blocks.iter().position(|&q| q > 0.15);
    assert!(first.is_some_and(|i| i < 6), "seed {seed}: X error per 30 min {blocks:.3?} (worst phase {worst:.2} rad)");
}

#[test]
fn with_feedback_the_x_error_stays_near_its_floor_for_six_hours() {
    let seed = 108;
    let p = LinkParams::preset("wang2026-120km").unwrap();
    let floor = expected(&p).qber_x;
    let (blocks, worst) = six_hours(true, seed);
    assert_eq!(blocks.len(), 12);
    let mean = blocks.iter().sum::<f64>() / blocks.len() as f64;
    println!("feedback on: floor {floor:.4}, mean {mean:.4}, blocks {blocks:.4?}, worst phase {worst:.3} rad");
    assert!(blocks.iter().all(|&q| q < floor + 0.02), "seed {seed}: floor {floor:.4}, X error per 30 min {blocks:.4?}");
    assert!(mean < floor + 0.012, "seed {seed}: floor {floor:.4}, mean {mean:.4}");
    assert!(worst < 0.8, "seed {seed}: phase error reached {worst} rad");
}

#[test]
fn feedback_finds_the_fringe_despite_sifting_lag() {
    // The interferometer starts 1 rad off and does not drift; the daemon feeds frames back five
    // frames late. The loop must still remove the offset.
    let seed = 109;
    let mut p = LinkParams::preset("lab-10km").unwrap();
    p.slow_drift_amplitude_rad = 0.0;
    p.phase_drift_rad_per_sqrt_s = 0.0;
    let mut rx = Receiver::new(&p);
    rx.add_phase_offset(1.0);
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let src = Source::new(&p);
    let n_pulses = 1u64 << 22;
    let mut backlog = std::collections::VecDeque::new();
    for _ in 0..400 {
        let secret = FrameSecret::random(&mut rng);
        let photons = src.emit_frame(&secret, n_pulses, &mut rng);
        let (mut n, mut e) = (0u64, 0u64);
        for d in rx.detect_frame(&photons, n_pulses, &mut rng) {
            if let Measurement::X { minus } = d.measurement
                && alice_state(&secret, d.pulse_idx, p.p_z) == State::Plus
            {
                n += 1;
                e += u64::from(minus);
            }
        }
        backlog.push_back((n, e));
        if backlog.len() > 5 {
            let (n, e) = backlog.pop_front().unwrap();
            rx.feedback(n, e);
        }
    }
    assert!(rx.feedback_steps() > 20, "seed {seed}: {} steps", rx.feedback_steps());
    assert!(rx.phase_error_rad().abs() < 0.2, "seed {seed}: phase error {}", rx.phase_error_rad());
}

#[test]
fn frame_cost_scales_with_photons_not_pulses() {
    let p = LinkParams::preset("wang2026-120km").unwrap();
    let seed = 111;
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let src = Source::new(&p);
    let mut rx = Receiver::new(&p);
    let secret = FrameSecret::random(&mut rng);
    let frames = 200;
    let start = std::time::Instant::now();
    let mut det = 0;
    for _ in 0..frames {
        let ph = src.emit_frame(&secret, 1 << 22, &mut rng);
        det += rx.detect_frame(&ph, 1 << 22, &mut rng).len();
    }
    let per_frame = start.elapsed() / frames;
    assert!(det > 0);
    // About 57 photons and 17 detections per 2^22-pulse frame: tens of microseconds. A loop over
    // the 4 million pulses would take milliseconds even optimised.
    assert!(per_frame < std::time::Duration::from_micros(1000), "{per_frame:?} per frame");
    // 2^40 pulses (four hours of pulses) with the same number of photons cost about the same.
    let mut dim = p.clone();
    dim.mu /= (1u64 << 18) as f64;
    dim.dark_count_rate_hz = 0.0; // dark counts are clicks: they do scale with pulses
    let src = Source::new(&dim);
    let mut rx = Receiver::new(&dim);
    let start = std::time::Instant::now();
    for _ in 0..20 {
        let ph = src.emit_frame(&secret, 1 << 40, &mut rng);
        rx.detect_frame(&ph, 1 << 40, &mut rng);
    }
    let huge = start.elapsed() / 20;
    assert!(huge < 5 * per_frame + std::time::Duration::from_micros(500), "{huge:?} per 2^40-pulse frame");
    println!("2^22-pulse frame at 120 km: {per_frame:?}; 2^40-pulse frame: {huge:?}");
}
