//! Alice's side: her per-frame secret, the state of each pulse, and the photons that leave her lab
//! and survive the fibre.

use rand::Rng;
use zeroize::{Zeroize, ZeroizeOnDrop};

use super::math::{successes, uniform};
use super::params::LinkParams;

/// One of the four time-bin states; the `u8` codes are the ones sent on the wire.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum State {
    /// |E>, photon in the early time bin (Z basis, bit 0).
    Early = 0,
    /// |L>, photon in the late time bin (Z basis, bit 1).
    Late = 1,
    /// |+> = (|E> + |L>) / sqrt 2 (X basis, outcome "plus").
    Plus = 2,
    /// |-> = (|E> - |L>) / sqrt 2 (X basis, outcome "minus"). Alice never sends it; an
    /// eavesdropper may.
    Minus = 3,
}

/// A measurement basis.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Basis {
    /// Arrival time: early or late.
    Z,
    /// Relative phase of the two time bins: plus or minus.
    X,
}

impl State {
    /// The basis this state belongs to.
    pub fn basis(self) -> Basis {
        match self {
            State::Early | State::Late => Basis::Z,
            State::Plus | State::Minus => Basis::X,
        }
    }

    /// The state with wire code `code`, or `None` for a code above 3.
    pub fn from_code(code: u8) -> Option<State> {
        match code {
            0 => Some(State::Early),
            1 => Some(State::Late),
            2 => Some(State::Plus),
            3 => Some(State::Minus),
            _ => None,
        }
    }

    /// The wire code of this state.
    pub fn code(self) -> u8 {
        self as u8
    }
}

/// Alice's per-frame secret: her states are a pure function of it and the pulse index.
///
/// Its bytes are wiped when it is dropped; `Debug` never shows them.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct FrameSecret([u8; 32]);

impl std::fmt::Debug for FrameSecret {
    /// Prints no secret bytes.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FrameSecret(..)")
    }
}

impl FrameSecret {
    /// A fresh secret of 32 bytes from `rng` (use a cryptographic generator outside tests).
    pub fn random(rng: &mut impl Rng) -> Self {
        let mut bytes = [0u8; 32];
        rng.fill_bytes(&mut bytes);
        let s = Self(bytes);
        bytes.zeroize();
        s
    }

    /// The secret with these bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The secret's bytes, for a caller that must persist or hand them to a device.
    pub fn expose_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

/// Alice's state for pulse `pulse_idx`: ChaCha20 keyed with the secret, stream position set from
/// the pulse index, so nothing is stored per pulse and any index can be answered in O(1).
///
/// Pulse i uses the 64-bit word at ChaCha20 word position 2i: its top 53 bits, as a uniform number
/// u in [0, 1), choose Z when u < `p_z`; its lowest bit then chooses |E> (0) or |L> (1). The X basis
/// always gives |+> (three-state protocol, seed-experiment.md "The protocol"): never |->.
///
/// The word is the one `rand_chacha::ChaCha20Rng` (seeded with the secret, stream 0) returns after
/// `set_word_pos(2 i)`; it is computed here from the single 64-byte block that holds it
/// (`chacha20_block`) because the generator would compute four blocks per call, and this
/// function runs for every photon and every detection.
pub fn alice_state(secret: &FrameSecret, pulse_idx: u64, p_z: f64) -> State {
    // Word position 2 i lies in block 2 i / 16 = i / 8, at word 2 (i mod 8) of it.
    let block = chacha20_block(&secret.0, pulse_idx / 8);
    let k = 2 * (pulse_idx % 8) as usize;
    let word = u64::from(block[k]) | (u64::from(block[k + 1]) << 32);
    let u = (word >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
    if u < p_z { if word & 1 == 0 { State::Early } else { State::Late } } else { State::Plus }
}

/// The ChaCha20 block function (D. J. Bernstein, "ChaCha, a variant of Salsa20", 2008; the 20-round
/// block function of RFC 8439, section 2.3, with the original layout: a 64-bit block counter in
/// words 12-13 and a 64-bit nonce, here 0, in words 14-15, as rand_chacha uses it): the 16 output
/// words of block `counter` under `key`.
fn chacha20_block(key: &[u8; 32], counter: u64) -> [u32; 16] {
    let k = |i: usize| u32::from_le_bytes([key[4 * i], key[4 * i + 1], key[4 * i + 2], key[4 * i + 3]]);
    let input: [u32; 16] = [
        0x6170_7865,
        0x3320_646e,
        0x7962_2d32,
        0x6b20_6574,
        k(0),
        k(1),
        k(2),
        k(3),
        k(4),
        k(5),
        k(6),
        k(7),
        counter as u32,
        (counter >> 32) as u32,
        0,
        0,
    ];
    let [mut x0, mut x1, mut x2, mut x3, mut x4, mut x5, mut x6, mut x7] =
        [input[0], input[1], input[2], input[3], input[4], input[5], input[6], input[7]];
    let [mut x8, mut x9, mut x10, mut x11, mut x12, mut x13, mut x14, mut x15] =
        [input[8], input[9], input[10], input[11], input[12], input[13], input[14], input[15]];
    // The quarter round on words a, b, c, d (RFC 8439, section 2.1).
    macro_rules! quarter_round {
        ($a:ident, $b:ident, $c:ident, $d:ident) => {
            $a = $a.wrapping_add($b);
            $d = ($d ^ $a).rotate_left(16);
            $c = $c.wrapping_add($d);
            $b = ($b ^ $c).rotate_left(12);
            $a = $a.wrapping_add($b);
            $d = ($d ^ $a).rotate_left(8);
            $c = $c.wrapping_add($d);
            $b = ($b ^ $c).rotate_left(7);
        };
    }
    for _ in 0..10 {
        quarter_round!(x0, x4, x8, x12);
        quarter_round!(x1, x5, x9, x13);
        quarter_round!(x2, x6, x10, x14);
        quarter_round!(x3, x7, x11, x15);
        quarter_round!(x0, x5, x10, x15);
        quarter_round!(x1, x6, x11, x12);
        quarter_round!(x2, x7, x8, x13);
        quarter_round!(x3, x4, x9, x14);
    }
    let mut out = [x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15];
    for (word, inp) in out.iter_mut().zip(input) {
        *word = word.wrapping_add(inp);
    }
    out
}

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
}

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
        Self { p_arrive, p_two_given_arrive: if p_arrive > 0.0 { p_two / p_arrive } else { 0.0 }, p_z: params.p_z }
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
        for pulse_idx in indices {
            let two_photons = self.p_two_given_arrive > 0.0 && uniform(rng) < self.p_two_given_arrive;
            out.push(Photon { pulse_idx, state: alice_state(secret, pulse_idx, self.p_z), two_photons });
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

    /// The reference definition: rand_chacha's generator positioned at word 2 i.
    fn reference_state(secret: &FrameSecret, pulse_idx: u64, p_z: f64) -> State {
        use rand::RngCore;
        let mut rng = ChaCha20Rng::from_seed(*secret.expose_bytes());
        rng.set_word_pos(2 * u128::from(pulse_idx));
        let word = rng.next_u64();
        let u = (word >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
        if u < p_z { if word & 1 == 0 { State::Early } else { State::Late } } else { State::Plus }
    }

    #[test]
    fn single_block_chacha_matches_rand_chacha() {
        let seed = 14;
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        for _ in 0..20 {
            let s = FrameSecret::random(&mut rng);
            let far = [u64::MAX / 3, (1 << 40) + 5, (1 << 32) * 8 + 7, u64::MAX / 8 * 8 - 1];
            for i in (0..200).chain(far) {
                for p_z in [0.5, 0.8, 0.9] {
                    assert_eq!(alice_state(&s, i, p_z), reference_state(&s, i, p_z), "seed {seed}, pulse {i}");
                }
            }
        }
        // RFC 8439, appendix A.1, test vectors 1 and 2 (all-zero key and nonce, block counters 0
        // and 1): the key streams start 76 b8 e0 ad a0 f1 3d 90 and 9f 07 e7 be 55 51 38 7a.
        let zero = [0u8; 32];
        assert_eq!(chacha20_block(&zero, 0)[..2], [0xade0_b876, 0x903d_f1a0]);
        assert_eq!(chacha20_block(&zero, 1)[..2], [0xbee7_079f, 0x7a38_5155]);
    }

    #[test]
    fn codes_round_trip() {
        for s in [State::Early, State::Late, State::Plus, State::Minus] {
            assert_eq!(State::from_code(s.code()), Some(s));
        }
        assert_eq!(State::from_code(4), None);
        assert_eq!(State::Late.basis(), Basis::Z);
        assert_eq!(State::Minus.basis(), Basis::X);
    }

    #[test]
    fn debug_hides_secret() {
        let s = FrameSecret::from_bytes([0xab; 32]);
        assert_eq!(format!("{s:?}"), "FrameSecret(..)");
    }

    #[test]
    fn alice_state_is_deterministic_and_matches_p_z() {
        let seed = 11;
        let (s, p_z) = (secret(seed), 0.8);
        let n = 40_000u64;
        let mut counts = [0u64; 4];
        for i in 0..n {
            let st = alice_state(&s, i, p_z);
            assert_eq!(st, alice_state(&s, i, p_z), "seed {seed}, pulse {i}");
            counts[st as usize] += 1;
        }
        assert_eq!(counts[State::Minus as usize], 0, "seed {seed}: |-> sent");
        for (k, p) in [(0, p_z / 2.0), (1, p_z / 2.0), (2, 1.0 - p_z)] {
            let sd = (n as f64 * p * (1.0 - p)).sqrt();
            let dev = (counts[k] as f64 - n as f64 * p).abs();
            assert!(dev < 4.0 * sd, "seed {seed}: state {k} count {} vs {}", counts[k], n as f64 * p);
        }
        // Far pulse indices are answered directly and depend on the secret.
        let far = u64::MAX / 3;
        assert_eq!(alice_state(&s, far, p_z), alice_state(&s.clone(), far, p_z));
        let other = secret(seed + 1);
        let differ = (0..200).filter(|&i| alice_state(&s, i, 0.5) != alice_state(&other, i, 0.5)).count();
        assert!(differ > 50, "seed {seed}: secrets give the same states");
        // p_z = 1 and 0 are respected.
        assert!((0..1000).all(|i| alice_state(&s, i, 1.0).basis() == Basis::Z));
        assert!((0..1000).all(|i| alice_state(&s, i, 0.0) == State::Plus));
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
