//! Eavesdroppers on the fibre connection. An attack sees exactly what a physical Eve could
//! measure: each arriving pulse, one photon at a time.

use rand::Rng;

use super::math::uniform;
use super::source::{Photon, State};

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

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    #[test]
    fn full_attack_randomises_half_of_the_other_basis() {
        let seed = 21;
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let n = 20_000u64;
        let mut ph: Vec<Photon> = (0..n)
            .map(|i| Photon { pulse_idx: i, state: State::Early, two_photons: true })
            .collect();
        InterceptResend { fraction: 1.0 }.attack(&mut ph, &mut rng);
        let late = ph.iter().filter(|p| p.state == State::Late).count() as f64 / n as f64;
        let x = ph.iter().filter(|p| matches!(p.state, State::Plus | State::Minus)).count() as f64
            / n as f64;
        assert!((late - 0.0).abs() < 1e-12, "seed {seed}: Z basis measurement of |E> gives |L>");
        assert!((x - 0.5).abs() < 0.02, "seed {seed}: X fraction {x}");
        assert!(ph.iter().all(|p| !p.two_photons));
        let mut none: Vec<Photon> = (0..100)
            .map(|i| Photon { pulse_idx: i, state: State::Plus, two_photons: true })
            .collect();
        InterceptResend { fraction: 0.0 }.attack(&mut none, &mut rng);
        assert!(none.iter().all(|p| p.state == State::Plus && p.two_photons));
    }
}
