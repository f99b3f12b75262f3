//! Closed-form expectations of the simulated link: detection probabilities, QBERs, the phase error
//! and the asymptotic key rate, per pulse.
//!
//! The model is the one the Monte-Carlo implements (see [`receiver`](super::receiver)), to first
//! order: with K = mu T eta_B eta_d, s_own = `p_own` etc. from
//! [`TimingModel`](super::params::TimingModel), q_X = 1 - q_Z, and a per-window dark probability
//! p_dc, the photon part of Bob's click probabilities given Alice's state is
//!
//! | state | Z early | Z late | X plus (D+) | X minus (D-) |
//! |---|---|---|---|---|
//! | E | K q_Z s_own | K q_Z s_EL | K q_X (s_own + s_EL) / 4 | same |
//! | L | K q_Z s_LE | K q_Z s_own | K q_X (s_own + s_LE) / 4 | same |
//! | + | K q_Z (s_own + s_LE) / 2 | K q_Z (s_own + s_EL) / 2 | K q_X [s_own (1 + V cos dphi) / 4 + (s_EL + s_LE) / 8] | with 1 - V cos dphi |
//!
//! (eq. A1; for s_EL = s_LE = 0 and s_own folded into s these are the formulas of
//! the model of the reference experiment, Wang et al. 2026, except that dark counts are not scaled by the basis
//! probability: Bob's basis choice is a passive splitter, so every detector counts in its windows
//! whatever the photon did). Each window then clicks with probability
//! L_d (photon + p_dc) + a_w (eq. A2), where L_d = 1 / (1 + r_d n_dead / (1 - p_ap)) is the live
//! fraction of detector d under non-paralysable dead time (r_d = its raw click rate per pulse
//! including clicks outside the windows, n_dead = dead time in periods) and a_w the after-pulse
//! rate landing in window w, p_ap R_d / (windows of d), with R_d = L_d r_d / (1 - p_ap) the
//! detector's accepted click rate. Neglected: two clicks in one pulse (relative order p_dc or
//! mu g2) and the nonlinearity of two-photon pulses (relative order mu g2, about 1e-5).

use super::math::binary_entropy;
use super::params::LinkParams;
use super::receiver::Measurement;
use super::source::State;

/// Expected per-pulse statistics of a link (see the module docs for the model).
#[derive(Clone, Debug, PartialEq)]
pub struct Expected {
    /// Probability per pulse that Bob records a Z-basis detection (all states Alice sends).
    pub p_click_z: f64,
    /// Z-basis QBER: errors among the detections where Alice sent Z and Bob measured Z.
    pub qber_z: f64,
    /// Probability per pulse that Bob records an X-basis detection (all states Alice sends).
    pub p_click_x: f64,
    /// X-basis QBER: fraction of D- among the X detections where Alice sent |+>.
    pub qber_x: f64,
    /// `joint[s][b][o]`: probability per pulse that Alice sends state s (0 = |E>, 1 = |L>,
    /// 2 = |+>) and Bob records basis b (0 = Z, 1 = X) with outcome o (Z: 0 early, 1 late;
    /// X: 0 plus, 1 minus).
    pub joint: [[[f64; 2]; 2]; 3],
    /// Alice's probabilities of sending |E>, |L>, |+>.
    pub state_probs: [f64; 3],
    /// Intrinsic Z error e_Z0 from the timing model.
    pub e_z0: f64,
    /// Phase error of the Z key from linearity, e_ph = [Y(-|+) + Y(+|E) + Y(+|L) - Y(+|+)] /
    /// [Y(.|E) + Y(.|L)], with Y(b|s) the X-basis yields given the state sent
    /// (the model of the reference experiment, Wang et al. 2026).
    pub e_ph: f64,
    /// Upper bound on the phase error of the Z key's pulses with at most one photon, as the
    /// finite-key analysis computes it in the limit of infinite blocks
    /// ([`qkd_core::postproc::finite_key`], steps 1 and 3), with every multi-photon Z pulse in the
    /// test sample: [Y(-|+) + Y(+|E) + Y(+|L) - Y(+|+) + p_multi] / [Y(.|E) + Y(.|L) - 2 p_multi].
    pub e_ph_single_upper: f64,
    /// Probability per pulse of a multi-photon pulse, p_multi = mu^2 g2 / 2.
    pub p_multi: f64,
    /// Fraction D of the Z key detections that may come from multi-photon pulses when every
    /// multi-photon Z pulse is counted as detected in the key basis (GLLP tagging, as the
    /// finite-key analysis does): p_multi / P(Z detection | Z sent).
    pub multi_fraction: f64,
    /// Probability per pulse of a sifted key event (Alice Z, Bob Z).
    pub p_sifted: f64,
    /// Asymptotic secret key per pulse with error-correction efficiency f = 1 (the Shannon
    /// limit), by [`Expected::asymptotic_key_per_pulse_with`].
    pub asymptotic_key_per_pulse: f64,
    /// Asymptotic secret key per pulse with f = 1.16, a typical Cascade/LDPC efficiency.
    pub asymptotic_key_per_pulse_f116: f64,
    /// Bob's detections per second (both bases), at the configured clock rate.
    pub detections_per_second: f64,
}

impl Expected {
    /// Index of a state sent by Alice in [`Expected::joint`]; `None` for |->, never sent.
    fn state_index(state: State) -> Option<usize> {
        match state {
            State::Early => Some(0),
            State::Late => Some(1),
            State::Plus => Some(2),
            State::Minus => None,
        }
    }

    /// Basis and outcome indices of a measurement in [`Expected::joint`].
    fn measurement_index(m: Measurement) -> (usize, usize) {
        match m {
            Measurement::Z { late } => (0, usize::from(late)),
            Measurement::X { minus } => (1, usize::from(minus)),
        }
    }

    /// Yield Y(m|sent): probability that Bob records `m` given that Alice sent `sent`
    /// (0 for |->, never sent, or a state sent with probability 0).
    pub fn yield_of(&self, sent: State, m: Measurement) -> f64 {
        let (b, o) = Self::measurement_index(m);
        match Self::state_index(sent) {
            Some(s) if self.state_probs[s] > 0.0 => self.joint[s][b][o] / self.state_probs[s],
            _ => 0.0,
        }
    }

    /// Asymptotic secret key per pulse for error-correction efficiency `f`: the limit of the
    /// finite-key length of [`qkd_core::postproc::finite_key`] for infinite blocks, at least 0.
    /// Per Z-sent pulse, with y_key = P(Z click | Z sent), y_test = P(X click | Z sent),
    /// errors e = [Y(-|+) + Y(+|E) + Y(+|L) - Y(+|+) + p_multi] / 2 (linearity with the
    /// multi-photon |+> term, step 1) and the multi-photon Z pulses split as
    /// m_key + m_test = p_multi (step 3):
    /// p_Z min over the split of (y_key - m_key)(1 - h(e / (y_test - m_test))) - p_sifted f h(E_Z)
    /// (the model of the reference experiment, Wang et al. 2026, with the tagging of GLLP, QIC 4, 325
    /// (2004)); the minimum is taken over 65 evenly spaced splits.
    pub fn asymptotic_key_per_pulse_with(&self, f: f64) -> f64 {
        let p_z = self.state_probs[0] + self.state_probs[1];
        if p_z <= 0.0 || self.state_probs[2] <= 0.0 {
            return 0.0;
        }
        let y_key = self.p_sifted / p_z;
        let y_test = (self.joint[0][1][0] + self.joint[0][1][1] + self.joint[1][1][0] + self.joint[1][1][1]) / p_z;
        let errors = 0.5 * (self.e_ph * 2.0 * y_test + self.p_multi);
        let mut secret = f64::INFINITY;
        for k in 0..=64 {
            let m_key = self.p_multi * f64::from(k) / 64.0;
            let (key, test) = (y_key - m_key, y_test - (self.p_multi - m_key));
            let s = if key <= 0.0 || test <= 0.0 || errors / test >= 0.5 {
                0.0
            } else {
                key * (1.0 - binary_entropy(errors / test))
            };
            secret = secret.min(s);
        }
        (p_z * secret - self.p_sifted * f * binary_entropy(self.qber_z)).max(0.0)
    }
}

/// Expected statistics of `params` with Bob's interferometer perfectly aligned (dphi = 0).
pub fn expected(params: &LinkParams) -> Expected {
    expected_with_phase(params, 0.0)
}

/// Expected statistics of `params` with an interferometer phase error of `dphi` rad (eqs. A1, A2 of
/// the module docs).
pub fn expected_with_phase(params: &LinkParams, dphi: f64) -> Expected {
    let k = params.mu * params.fibre_transmission() * params.bob_transmission() * params.detector_efficiency;
    let (qz, qx) = (params.q_z, 1.0 - params.q_z);
    let tm = params.timing();
    let (own, el, le) = (tm.p_own, tm.p_e_to_l, tm.p_l_to_e);
    let vc = params.visibility * dphi.cos();
    let p_dc = params.dark_probability();
    let p_ap = params.afterpulse_probability;
    let state_probs = [params.p_z / 2.0, params.p_z / 2.0, 1.0 - params.p_z];

    // Photon part per window [Z early, Z late, X plus, X minus], given the state (eq. A1).
    let photon: [[f64; 4]; 3] = [
        [k * qz * own, k * qz * el, k * qx * (own + el) / 4.0, k * qx * (own + el) / 4.0],
        [k * qz * le, k * qz * own, k * qx * (own + le) / 4.0, k * qx * (own + le) / 4.0],
        [
            k * qz * (own + le) / 2.0,
            k * qz * (own + el) / 2.0,
            k * qx * (own * (1.0 + vc) / 4.0 + (el + le) / 8.0),
            k * qx * (own * (1.0 - vc) / 4.0 + (el + le) / 8.0),
        ],
    ];
    // Raw click rate per detector [Z, D+, D-], every photon that reaches it counting (in a window
    // or not). D+ gets half of the side slots and a share of the central slot.
    let p_plus_total = |s: usize| -> f64 {
        match s {
            2 => 0.5 * (1.0 + vc) / 2.0 + 0.5 * 0.5,
            _ => 0.5,
        }
    };
    let mut raw = [2.0 * p_dc, p_dc, p_dc];
    for (s, ps) in state_probs.iter().enumerate() {
        raw[0] += ps * k * qz;
        raw[1] += ps * k * qx * p_plus_total(s);
        raw[2] += ps * k * qx * (1.0 - p_plus_total(s));
    }
    let n_dead = params.dead_time_periods();
    let live = raw.map(|r| 1.0 / (1.0 + r * n_dead / (1.0 - p_ap)));
    let accepted: Vec<f64> = (0..3).map(|d| live[d] * raw[d] / (1.0 - p_ap)).collect();
    // After-pulse rate into each window (eq. A2): the Z detector spreads its after-pulses over its
    // two windows.
    let after = [p_ap * accepted[0] / 2.0, p_ap * accepted[0] / 2.0, p_ap * accepted[1], p_ap * accepted[2]];
    let det_of_window = [0usize, 0, 1, 2];

    let mut joint = [[[0.0; 2]; 2]; 3];
    for s in 0..3 {
        for w in 0..4 {
            let c = live[det_of_window[w]] * (photon[s][w] + p_dc) + after[w];
            joint[s][w / 2][w % 2] = state_probs[s] * c;
        }
    }
    let sum2 = |a: [f64; 2]| a[0] + a[1];
    let p_click_z: f64 = joint.iter().map(|s| sum2(s[0])).sum();
    let p_click_x: f64 = joint.iter().map(|s| sum2(s[1])).sum();
    let p_sifted = sum2(joint[0][0]) + sum2(joint[1][0]);
    let qber_z = ratio(joint[0][0][1] + joint[1][0][0], p_sifted);
    let qber_x = ratio(joint[2][1][1], sum2(joint[2][1]));

    // Yields given the state, for the phase error (the model of the reference experiment, Wang et al. 2026).
    let y = |s: usize, b: usize, o: usize| joint[s][b][o] / state_probs[s].max(f64::MIN_POSITIVE);
    let e_ph_num = y(2, 1, 1) + y(0, 1, 0) + y(1, 1, 0) - y(2, 1, 0);
    let e_ph_den = sum2([y(0, 1, 0), y(0, 1, 1)]) + sum2([y(1, 1, 0), y(1, 1, 1)]);
    let e_ph = ratio(e_ph_num, e_ph_den).max(0.0);

    let p_multi = params.p_two_photons();
    let y_zz = ratio(p_sifted, params.p_z);
    let multi_fraction = ratio(p_multi, y_zz);
    let e_ph_single_upper = ratio(e_ph_num + p_multi, e_ph_den - 2.0 * p_multi).max(0.0);
    let mut out = Expected {
        p_click_z,
        qber_z,
        p_click_x,
        qber_x,
        joint,
        state_probs,
        e_z0: tm.intrinsic_z_error(),
        e_ph,
        e_ph_single_upper,
        p_multi,
        multi_fraction,
        p_sifted,
        asymptotic_key_per_pulse_f116: 0.0,
        asymptotic_key_per_pulse: 0.0,
        detections_per_second: (p_click_z + p_click_x) * params.clock_hz,
    };
    out.asymptotic_key_per_pulse_f116 = out.asymptotic_key_per_pulse_with(1.16);
    out.asymptotic_key_per_pulse = out.asymptotic_key_per_pulse_with(1.0);
    out
}

/// `a / b`, or 0 when `b` is 0.
fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { 0.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An ideal channel: no dark counts, perfect visibility and timing.
    fn ideal() -> LinkParams {
        let mut p = LinkParams::preset("wang2026-120km").unwrap();
        p.dark_count_rate_hz = 0.0;
        p.visibility = 1.0;
        p.t1_ps = 1.0;
        p.jitter_ps = 0.0;
        p.afterpulse_probability = 0.0;
        p.dead_time_ns = 0.0;
        p
    }

    #[test]
    fn phase_error_is_zero_for_ideal_channel_and_half_one_minus_v() {
        let e = expected(&ideal());
        assert!(e.e_ph.abs() < 1e-12 && e.qber_x.abs() < 1e-12 && e.qber_z < 1e-12, "{e:?}");
        let mut p = ideal();
        p.visibility = 0.9;
        let e = expected(&p);
        assert!((e.e_ph - 0.05).abs() < 1e-9, "e_ph {}", e.e_ph);
        assert!((e.qber_x - 0.05).abs() < 1e-9, "qber_x {}", e.qber_x);
    }

    #[test]
    fn matches_seed_formulas_without_timing_leaks() {
        // With s_EL = s_LE = 0 and no dead time, the seed's closed forms hold with the dark
        // counts unscaled by the basis probability.
        let mut p = LinkParams::preset("wang2026-120km").unwrap();
        p.t1_ps = 1.0;
        p.jitter_ps = 0.0;
        p.dead_time_ns = 0.0;
        p.afterpulse_probability = 0.0;
        let e = expected(&p);
        let s = p.mu * p.fibre_transmission() * p.bob_transmission() * p.detector_efficiency * p.timing().p_own;
        let pdc = p.dark_probability();
        let (qz, qx) = (p.q_z, 1.0 - p.q_z);
        let ex = ((1.0 - p.visibility) / 2.0 * qx * s / 2.0 + pdc) / (qx * s / 2.0 + 2.0 * pdc);
        let ez = pdc / (qz * s + 2.0 * pdc);
        assert!((e.qber_x - ex).abs() < 1e-12 && (e.qber_z - ez).abs() < 1e-12, "{e:?}");
        assert!((e.p_click_z - (qz * s + 2.0 * pdc)).abs() < 1e-15);
        assert!((e.p_click_x - (qx * s * (p.p_z / 2.0 + (1.0 - p.p_z) / 2.0) + 2.0 * pdc)).abs() < 1e-15);
    }

    #[test]
    fn key_decreases_with_distance() {
        let mut p = LinkParams::preset("wang2026-120km").unwrap();
        let mut last = f64::INFINITY;
        for d in [0.0, 50.0, 100.0, 120.0, 140.0] {
            p.distance_km = d;
            let k = expected(&p).asymptotic_key_per_pulse_f116;
            assert!(k <= last, "key at {d} km");
            last = k;
        }
        assert_eq!(last, 0.0, "key at 140 km");
    }
}
