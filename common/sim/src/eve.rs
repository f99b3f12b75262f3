//! Eavesdroppers on the fibre connection. An attack sees exactly what a physical Eve could
//! measure: each pulse, one photon at a time.
//!
//! * [`InterceptResend`] measures photons at the end of the fibre and resends what she found; the
//!   errors it causes are what the link's error rates catch.
//! * [`PhotonNumberSplitting`] sits at the exit of Alice's lab, replaces the lossy fibre by a
//!   lossless one and keeps one photon of every two-photon pulse, causing no error at all; only
//!   the finite-key analysis's multi-photon tagging (g2(0)) bounds what she learns.

use rand::Rng;

use super::math::{successes, uniform};
use super::params::LinkParams;
use super::source::{FrameSecret, FrameStates, Photon, State};

/// Intercept-resend: Eve measures a fraction of the photons in a random basis and resends the
/// state she found.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct InterceptResend {
    /// Fraction of the arriving pulses Eve measures, in [0, 1]; the others pass untouched.
    pub fraction: f64,
}

impl InterceptResend {
    /// Measures `fraction` of the photons in a random basis (Z or X, each with probability 1/2)
    /// with an ideal detector and resends the state found (|E>/|L> in Z, |+>/|-> in X): a state of
    /// her basis is found exactly, a state of the other basis gives a random result (Bennett &
    /// Brassard 1984; with `fraction` = 1 this causes a Z QBER of 25 %). A two-photon pulse becomes
    /// one photon: Eve measures one photon and resends one. Takes the `Vec` so that other attacks
    /// of the same shape may drop or add pulses.
    #[allow(clippy::ptr_arg)]
    pub fn attack(&self, photons: &mut Vec<Photon>, rng: &mut impl Rng) {
        for ph in photons.iter_mut() {
            if uniform(rng) >= self.fraction {
                continue;
            }
            let z_basis = uniform(rng) < 0.5;
            let coin = uniform(rng) < 0.5;
            ph.state = match (z_basis, ph.state) {
                (true, State::Early) => State::Early,
                (true, State::Late) => State::Late,
                (true, _) => {
                    if coin {
                        State::Late
                    } else {
                        State::Early
                    }
                }
                (false, State::Plus) => State::Plus,
                (false, State::Minus) => State::Minus,
                (false, _) => {
                    if coin {
                        State::Minus
                    } else {
                        State::Plus
                    }
                }
            };
            ph.two_photons = false;
        }
    }
}

/// Photon-number splitting (Brassard, Lütkenhaus, Mor & Sanders, PRL 85, 1330 (2000)) against
/// the quantum-dot source: Eve measures the photon number of every pulse at the exit of Alice's
/// lab without disturbing its state, keeps one photon of each two-photon pulse in a quantum
/// memory and sends the other to Bob over a lossless fibre, and lets through just enough
/// single-photon pulses (blocking the rest) that Bob sees the arrival rate of the real fibre. No
/// state is changed, so the error rates stay exactly those of the honest link; after sifting Eve
/// learns the basis of each pulse and measures her photon in it, so she knows the bit of every
/// split Z pulse that ends up in the key.
///
/// Of the honest link's per-pulse arrival probability p_arr = p_1 T + p_2 (1 - (1 - T)^2)
/// (see [`Source::new`](super::Source::new)), Eve fills p_2 with her split pulses and the rest
/// with single photons passed with probability (p_arr - p_2) / p_1. If p_2 alone exceeds p_arr
/// (long fibres) she forwards only a fraction p_arr / p_2 of the split pulses and no single
/// photon.
#[derive(Clone, Debug)]
pub struct PhotonNumberSplitting {
    /// Per-pulse probability that Eve forwards a pulse (split or single photon).
    p_forward: f64,
    /// Probability that a forwarded pulse is a split two-photon pulse.
    p_split_given_forward: f64,
    /// Alice's probability of sending a Z state.
    p_z: f64,
}

/// One frame as Eve delivers it: the photons Bob receives and the pulses whose second photon Eve
/// holds.
#[derive(Clone, Debug, Default)]
pub struct PnsFrame {
    /// The photons that reach Bob, ascending by `pulse_idx`, one photon each.
    pub photons: Vec<Photon>,
    /// Pulse indices (ascending) of the forwarded two-photon pulses whose other photon Eve keeps.
    pub split_pulses: Vec<u64>,
}

impl PhotonNumberSplitting {
    /// The attack against the source and fibre described by `params`.
    pub fn new(params: &LinkParams) -> Self {
        let t = params.fibre_transmission();
        let (p1, p2) = (params.p_one_photon(), params.p_two_photons());
        let p_arrive = p1 * t + p2 * (1.0 - (1.0 - t) * (1.0 - t));
        let (p_split, p_single) = if p2 >= p_arrive { (p_arrive, 0.0) } else { (p2, p_arrive - p2) };
        let p_forward = p_split + p_single;
        Self {
            p_forward,
            p_split_given_forward: if p_forward > 0.0 { p_split / p_forward } else { 0.0 },
            p_z: params.p_z,
        }
    }

    /// Per-pulse probability that a photon reaches Bob; equal to the honest link's
    /// [`Source::arrival_probability`](super::Source::arrival_probability), so the attack does not
    /// show in Bob's count rate.
    pub fn arrival_probability(&self) -> f64 {
        self.p_forward
    }

    /// Alice's emission of one frame of `n_pulses` pulses under the attack, replacing
    /// [`Source::emit_frame`](super::Source::emit_frame): forwarded pulses are placed by geometric
    /// skipping, so the work is proportional to the photons Bob receives.
    pub fn emit_frame(&self, secret: &FrameSecret, n_pulses: u64, rng: &mut impl Rng) -> PnsFrame {
        let indices: Vec<u64> = successes(rng, n_pulses, self.p_forward).collect();
        let mut frame = PnsFrame { photons: Vec::with_capacity(indices.len()), split_pulses: Vec::new() };
        let states = FrameStates::new(secret).states(&indices, self.p_z);
        for (pulse_idx, state) in indices.into_iter().zip(states) {
            if uniform(rng) < self.p_split_given_forward {
                frame.split_pulses.push(pulse_idx);
            }
            frame.photons.push(Photon { pulse_idx, state, two_photons: false });
        }
        frame
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alice_state;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    #[test]
    fn full_attack_randomises_half_of_the_other_basis() {
        let seed = 21;
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let n = 20_000u64;
        let mut ph: Vec<Photon> =
            (0..n).map(|i| Photon { pulse_idx: i, state: State::Early, two_photons: true }).collect();
        InterceptResend { fraction: 1.0 }.attack(&mut ph, &mut rng);
        let late = ph.iter().filter(|p| p.state == State::Late).count() as f64 / n as f64;
        let x = ph.iter().filter(|p| matches!(p.state, State::Plus | State::Minus)).count() as f64 / n as f64;
        assert!((late - 0.0).abs() < 1e-12, "seed {seed}: Z basis measurement of |E> gives |L>");
        assert!((x - 0.5).abs() < 0.02, "seed {seed}: X fraction {x}");
        assert!(ph.iter().all(|p| !p.two_photons));
        let mut none: Vec<Photon> =
            (0..100).map(|i| Photon { pulse_idx: i, state: State::Plus, two_photons: true }).collect();
        InterceptResend { fraction: 0.0 }.attack(&mut none, &mut rng);
        assert!(none.iter().all(|p| p.state == State::Plus && p.two_photons));
    }

    #[test]
    fn pns_hides_in_the_arrival_rate_and_splits_every_two_photon_pulse() {
        let seed = 22;
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let mut p = LinkParams::preset("wang2026-120km").unwrap();
        // A bright, poor source so that the counts are large, over 50 km so that the honest
        // arrivals (p_1 T = 5e-3) exceed the two-photon pulses (p_2 = 6e-4).
        p.mu = 0.05;
        p.g2 = 0.5;
        p.distance_km = 50.0;
        let eve = PhotonNumberSplitting::new(&p);
        let honest = super::super::Source::new(&p);
        assert!((eve.arrival_probability() / honest.arrival_probability() - 1.0).abs() < 1e-12);
        let secret = FrameSecret::random(&mut rng);
        let n = 1u64 << 26;
        let frame = eve.emit_frame(&secret, n, &mut rng);
        let mean = n as f64 * honest.arrival_probability();
        let got = frame.photons.len() as f64;
        assert!((got - mean).abs() < 4.0 * mean.sqrt(), "seed {seed}: {got} photons vs {mean}");
        // Every two-photon pulse Alice emits is split (p_2 < p_arr here).
        let split_mean = n as f64 * p.p_two_photons();
        let split = frame.split_pulses.len() as f64;
        assert!((split - split_mean).abs() < 4.0 * split_mean.sqrt(), "seed {seed}: {split} split vs {split_mean}");
        assert!(frame.split_pulses.windows(2).all(|w| w[0] < w[1]));
        assert!(
            frame.photons.iter().all(|ph| !ph.two_photons && ph.state == alice_state(&secret, ph.pulse_idx, p.p_z))
        );
        // Beyond the distance where two-photon pulses alone exceed the honest arrivals, Eve can
        // only forward split pulses.
        p.distance_km = 400.0;
        let far = PhotonNumberSplitting::new(&p);
        assert!((far.p_split_given_forward - 1.0).abs() < 1e-12);
        assert!((far.arrival_probability() / super::super::Source::new(&p).arrival_probability() - 1.0).abs() < 1e-12);
    }
}
