//! Alice's side: the photons that leave her lab and survive the fibre, and her source monitor.
//! Her states ([`State`], [`FrameSecret`], [`FrameStates`], [`alice_state`]) are defined in
//! [`qkd_core::quantum`] and re-exported here.

use rand::Rng;

use super::math::{standard_normal, successes, uniform};
use super::params::LinkParams;
use qkd_core::postproc::finite_key::SourceReading;
pub use qkd_core::quantum::{Basis, FrameSecret, FrameStates, State, alice_state};

/// A pulse that reached the end of the fibre with at least one photon in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Photon {
    /// Index of the pulse within its frame.
    pub pulse_idx: u64,
    /// The state the photon carries (Alice's state, unless an eavesdropper replaced it).
    pub state: State,
    /// Whether two photons of a two-photon pulse both arrived (each is then detected
    /// independently).
    pub two_photons: bool,
}

/// Alice's source and the fibre: samples the photons that arrive at Bob.
#[derive(Clone, Debug)]
pub struct Source {
    /// Per-pulse probability that at least one photon arrives at the end of the fibre.
    p_arrive: f64,
    /// Probability that an arriving pulse holds two photons (both survived).
    p_two_given_arrive: f64,
    /// Alice's probability of sending a Z state.
    p_z: f64,
    /// The model's true mean photon number (what the monitor measures, with noise).
    mu: f64,
    /// The model's true g2(0).
    g2: f64,
}

/// Relative standard deviation of one frame's mean-photon-number reading: a calibrated optical
/// power meter behind a tap coupler reads the source's power to about 1 % over 55 ms.
pub const MONITOR_MU_RELATIVE_NOISE: f64 = 0.01;

/// Relative standard deviation of one frame's g2(0) reading: a Hanbury Brown-Twiss monitor on a
/// tap sees few coincidences per frame, so its reading scatters by about 10 %.
pub const MONITOR_G2_RELATIVE_NOISE: f64 = 0.1;

impl Source {
    /// The source and fibre described by `params`.
    ///
    /// With p_1 = mu - 2 p_2 and p_2 = mu^2 g2 / 2 ([`LinkParams::p_one_photon`],
    /// [`LinkParams::p_two_photons`]) and fibre transmission T, a pulse delivers at least one
    /// photon with probability p_1 T + p_2 (1 - (1 - T)^2), and two with probability p_2 T^2
    /// (independent loss of each photon).
    pub fn new(params: &LinkParams) -> Self {
        let t = params.fibre_transmission();
        let (p1, p2) = (params.p_one_photon(), params.p_two_photons());
        let p_arrive = p1 * t + p2 * (1.0 - (1.0 - t) * (1.0 - t));
        let p_two = p2 * t * t;
        Self {
            p_arrive,
            p_two_given_arrive: if p_arrive > 0.0 { p_two / p_arrive } else { 0.0 },
            p_z: params.p_z,
            mu: params.mu,
            g2: params.g2,
        }
    }

    /// What the transmitter's monitors report for one frame: the true mean photon number and
    /// g2(0) with the relative Gaussian noise of [`MONITOR_MU_RELATIVE_NOISE`] and
    /// [`MONITOR_G2_RELATIVE_NOISE`] (readings are never negative).
    pub fn monitor_reading(&self, rng: &mut impl Rng) -> SourceReading {
        let mu = self.mu * (1.0 + MONITOR_MU_RELATIVE_NOISE * standard_normal(rng));
        let g2 = self.g2 * (1.0 + MONITOR_G2_RELATIVE_NOISE * standard_normal(rng));
        SourceReading { mu: mu.max(0.0), g2: g2.max(0.0) }
    }

    /// Per-pulse probability that at least one photon of the pulse arrives at Bob.
    pub fn arrival_probability(&self) -> f64 {
        self.p_arrive
    }

    /// Photons of one frame of `n_pulses` pulses that leave Alice's lab and survive the fibre,
    /// sampled by geometric skipping over pulse indices (one- and two-photon emission, mu and g2;
    /// a two-photon pulse survives if at least one photon does, and `two_photons` records whether
    /// both arrive), ascending by `pulse_idx`. The work is proportional to the photons returned.
    pub fn emit_frame(&self, secret: &FrameSecret, n_pulses: u64, rng: &mut impl Rng) -> Vec<Photon> {
        let expected = (n_pulses as f64 * self.p_arrive).min(1e6) as usize;
        let mut out = Vec::with_capacity(expected + expected / 8 + 16);
        let indices: Vec<u64> = successes(rng, n_pulses, self.p_arrive).collect();
        let states = FrameStates::new(secret).states(&indices, self.p_z);
        for (pulse_idx, state) in indices.into_iter().zip(states) {
            let two_photons = self.p_two_given_arrive > 0.0 && uniform(rng) < self.p_two_given_arrive;
            out.push(Photon { pulse_idx, state, two_photons });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    fn secret(seed: u64) -> FrameSecret {
        FrameSecret::random(&mut ChaCha20Rng::seed_from_u64(seed))
    }

    #[test]
    fn emitted_photons_are_sorted_and_carry_alice_states() {
        let seed = 12;
        let mut p = LinkParams::preset("lab-10km").unwrap();
        p.distance_km = 0.0;
        let src = Source::new(&p);
        let s = secret(seed);
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let n = 1u64 << 22;
        let ph = src.emit_frame(&s, n, &mut rng);
        let mean = n as f64 * src.arrival_probability();
        assert!((ph.len() as f64 - mean).abs() < 4.0 * mean.sqrt(), "seed {seed}: {} photons vs {mean}", ph.len());
        assert!(ph.windows(2).all(|w| w[0].pulse_idx < w[1].pulse_idx));
        assert!(ph.iter().all(|x| x.state == alice_state(&s, x.pulse_idx, p.p_z)));
    }

    #[test]
    fn two_photon_fraction() {
        let seed = 13;
        let mut p = LinkParams::preset("lab-10km").unwrap();
        p.distance_km = 0.0;
        p.mu = 0.5;
        p.g2 = 0.5;
        let src = Source::new(&p);
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let ph = src.emit_frame(&secret(seed), 100_000, &mut rng);
        let twos = ph.iter().filter(|x| x.two_photons).count() as f64;
        let expect = 100_000.0 * p.p_two_photons();
        assert!((twos - expect).abs() < 4.0 * expect.sqrt(), "seed {seed}: {twos} vs {expect}");
    }
}
