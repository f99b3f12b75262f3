//! The quantum states of the link and what Bob's measurements give: Alice's four time-bin states
//! and the two bases, her per-frame secret and the state of each pulse (a pure function of the
//! secret and the pulse index), and Bob's detections.
//!
//! These are the types sifting and the link speak; the simulator (`qkd_sim`) produces them
//! (Alice's photons, Bob's receiver), and a real source and receiver would do the same.

use aes::Aes256;
use aes::cipher::generic_array::GenericArray;
use aes::cipher::{BlockEncrypt, KeyInit};
use rand::Rng;
use zeroize::{Zeroize, ZeroizeOnDrop};

/// One AES block.
type Block = aes::Block;

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
}

/// Alice's states of one frame: AES-256 (FIPS 197) keyed with the frame secret, used as a
/// pseudorandom function of the pulse index in counter mode, so nothing is stored per pulse and
/// any index is answered in O(1) (random access: detections are sparse and arrive by index).
///
/// Block b (the 128-bit little-endian integer b as plaintext) gives two 64-bit words, the
/// ciphertext's bytes 0-7 and 8-15 read little-endian; pulse i owns word i mod 2 of block i / 2.
/// The word's top 53 bits, as a uniform number u in [0, 1), choose Z when u < `p_z`; its lowest
/// bit then chooses |E> (0) or |L> (1). The X basis always gives |+> (three-state protocol,
/// the model of the reference experiment, Wang et al. 2026): never |->.
///
/// Why AES in counter mode: sifting must look up Alice's state of every detection, at 50 million
/// detections per second per core, and the detections hit scattered pulses (about one in twenty
/// near the source, far fewer at distance), so a generator read in sequence would waste almost
/// all its output. A counter-mode block cipher answers each index directly; with AES-NI one
/// AES-256 block costs a few nanoseconds, and [`FrameStates::fill_states`] pipelines eight
/// blocks at a time. The key is expanded once per frame ([`FrameStates::new`]); the `aes` crate
/// uses AES-NI when the processor has it and a constant-time software implementation otherwise.
///
/// Its round keys are wiped when it is dropped; `Debug` never shows them.
#[derive(Clone)]
pub struct FrameStates {
    cipher: Aes256,
}

impl std::fmt::Debug for FrameStates {
    /// Prints no key material.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FrameStates(..)")
    }
}

/// Pulses whose states [`FrameStates::fill_states`] computes per AES batch (at most as many
/// blocks): large enough to keep the AES-NI pipeline full, small enough to stay in L1.
const BATCH: usize = 128;

impl FrameStates {
    /// The states of the frame with secret `secret` (expands the AES-256 key).
    pub fn new(secret: &FrameSecret) -> Self {
        Self { cipher: Aes256::new(GenericArray::from_slice(&secret.0)) }
    }

    /// Alice's state for pulse `pulse_idx` (one AES block; for many pulses,
    /// [`FrameStates::fill_states`] is faster).
    pub fn state(&self, pulse_idx: u64, p_z: f64) -> State {
        state_of_word(self.word(pulse_idx), z_threshold(p_z))
    }

    /// Pulse `pulse_idx`'s 64-bit word (one AES block).
    fn word(&self, pulse_idx: u64) -> u64 {
        let mut block = counter_block(pulse_idx / 2);
        self.cipher.encrypt_block(&mut block);
        word_of(&block, pulse_idx)
    }

    /// Alice's states for `pulse_indices`, into `out` (of the same length; panics otherwise).
    /// Any order is correct; in ascending order (as detections and photons come) neighbouring
    /// pulses that share a block are encrypted once.
    pub fn fill_states(&self, pulse_indices: &[u64], p_z: f64, out: &mut [State]) {
        assert_eq!(pulse_indices.len(), out.len(), "one state per pulse index");
        let threshold = z_threshold(p_z);
        let mut blocks = [Block::default(); BATCH];
        let mut slots = [0u8; BATCH];
        for (indices, states) in pulse_indices.chunks(BATCH).zip(out.chunks_mut(BATCH)) {
            // One block per run of indices in the same block (written again, unchanged, for each
            // index of a run: no branch); slots[k] is pulse k's block. Block numbers are at most
            // u64::MAX / 2, so the sentinel never matches.
            let (mut n_blocks, mut last) = (0usize, u64::MAX);
            for (slot, &idx) in slots.iter_mut().zip(indices) {
                let b = idx / 2;
                n_blocks += usize::from(b != last);
                last = b;
                blocks[n_blocks - 1] = counter_block(b);
                *slot = (n_blocks - 1) as u8;
            }
            self.cipher.encrypt_blocks(&mut blocks[..n_blocks]);
            for ((state, &slot), &idx) in states.iter_mut().zip(&slots).zip(indices) {
                *state = state_of_word(word_of(&blocks[usize::from(slot)], idx), threshold);
            }
        }
    }

    /// Alice's states for `pulse_indices`, as [`FrameStates::fill_states`].
    pub fn states(&self, pulse_indices: &[u64], p_z: f64) -> Vec<State> {
        let mut out = vec![State::Plus; pulse_indices.len()];
        self.fill_states(pulse_indices, p_z, &mut out);
        out
    }
}

/// Alice's state for pulse `pulse_idx` of the frame with secret `secret`: a convenience for one
/// pulse (it expands the key on every call); see [`FrameStates`] for the definition, and use it
/// to key once per frame.
pub fn alice_state(secret: &FrameSecret, pulse_idx: u64, p_z: f64) -> State {
    FrameStates::new(secret).state(pulse_idx, p_z)
}

/// The plaintext of counter block `b`: the 128-bit little-endian integer b.
#[inline]
fn counter_block(b: u64) -> Block {
    Block::from(u128::from(b).to_le_bytes())
}

/// Pulse `pulse_idx`'s 64-bit word of its encrypted block: bytes 0-7 for an even index, 8-15 for
/// an odd one, little-endian.
#[inline]
fn word_of(block: &Block, pulse_idx: u64) -> u64 {
    let half = 8 * (pulse_idx & 1) as usize;
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&block[half..half + 8]);
    u64::from_le_bytes(bytes)
}

/// The integer t with u = (word >> 11) 2^-53 < `p_z` exactly when (word >> 11) < t: the smallest
/// integer at least p_z 2^53 (exact, a scaling by a power of two), 0 for p_z <= 0 or NaN, at
/// most 2^53 (every word gives Z).
#[inline]
fn z_threshold(p_z: f64) -> u64 {
    let scaled = (p_z * (1u64 << 53) as f64).ceil();
    // `as` saturates: negative and NaN give 0.
    (scaled as u64).min(1 << 53)
}

/// The state a word gives (see [`FrameStates`]), with `threshold` from [`z_threshold`]; no
/// branch (the basis and the bit are unpredictable by design).
#[inline]
fn state_of_word(word: u64, threshold: u64) -> State {
    const BY_CODE: [State; 4] = [State::Early, State::Late, State::Plus, State::Minus];
    let code = if (word >> 11) < threshold { word & 1 } else { 2 };
    BY_CODE[(code & 3) as usize]
}

/// Bob's measurement result for one pulse.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Measurement {
    /// Arrival-time measurement: early (`late == false`) or late window.
    Z {
        /// Whether the click was in the late window.
        late: bool,
    },
    /// Interferometer measurement, central slot: D+ (`minus == false`) or D-.
    X {
        /// Whether detector D- clicked.
        minus: bool,
    },
}

/// One of Bob's detections: the pulse it belongs to and its (squashed) outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Detection {
    /// Index of the pulse within its frame.
    pub pulse_idx: u64,
    /// Basis and outcome.
    pub measurement: Measurement,
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    fn secret(seed: u64) -> FrameSecret {
        FrameSecret::random(&mut ChaCha20Rng::seed_from_u64(seed))
    }

    /// FIPS 197, appendix C.3 (AES-256): the key expansion and block encryption behind
    /// [`FrameStates`], fed through `FrameStates::new`.
    #[test]
    fn aes256_known_answer_fips197_c3() {
        let key: [u8; 32] = std::array::from_fn(|i| i as u8);
        let states = FrameStates::new(&FrameSecret::from_bytes(key));
        let mut block = Block::from(0x0011_2233_4455_6677_8899_aabb_ccdd_eeff_u128.to_be_bytes());
        states.cipher.encrypt_block(&mut block);
        assert_eq!(block.as_slice(), 0x8ea2_b7ca_5167_45bf_eafc_4990_4b49_6089_u128.to_be_bytes());
    }

    /// The words of pulses under the FIPS 197 C.3 key, from an independent AES-256 (ECB
    /// encryption of the counter blocks 0, 1, 2^40 + 3 and 2^63 - 1 as 16-byte little-endian
    /// integers; each ciphertext read as two little-endian u64), and the states they give.
    #[test]
    fn pulse_words_known_answer() {
        let key: [u8; 32] = std::array::from_fn(|i| i as u8);
        let states = FrameStates::new(&FrameSecret::from_bytes(key));
        let expected: [(u64, u64); 8] = [
            (0, 0xd09f_492a_b600_90f2),
            (1, 0x8077_2edd_6a9a_f3a9),
            (2, 0x1c41_116a_8419_b5c7),
            (3, 0xa801_f803_cb07_acd6),
            ((1 << 41) + 6, 0xd753_9ecf_3b17_d548),
            ((1 << 41) + 7, 0x0897_8904_3d61_66b5),
            (u64::MAX - 1, 0xce60_8b3f_28ca_3f21),
            (u64::MAX, 0x5c24_68a0_1f2f_4c1a),
        ];
        for (idx, word) in expected {
            assert_eq!(states.word(idx), word, "pulse {idx}");
            // u = top 53 bits / 2^53; Z below p_z, then the lowest bit picks E or L.
            let u = (word >> 11) as f64 / (1u64 << 53) as f64;
            for p_z in [0.0, 0.3, 0.5, 0.9, 1.0] {
                let want = if u < p_z { [State::Early, State::Late][(word & 1) as usize] } else { State::Plus };
                assert_eq!(states.state(idx, p_z), want, "pulse {idx}, p_z {p_z}");
            }
        }
    }

    /// The batch path, the single-pulse path and `alice_state` agree, sorted or not, with runs in
    /// one block, duplicates, batch boundaries and far indices.
    #[test]
    fn batch_states_match_single_states() {
        let seed = 14;
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        for round in 0..20 {
            let s = FrameSecret::random(&mut rng);
            let states = FrameStates::new(&s);
            let n = rng.random_range(0..3 * BATCH + 5);
            let mut indices: Vec<u64> = (0..n).map(|_| rng.random_range(0..4 * n as u64 + 8)).collect();
            indices.extend([u64::MAX - 1, u64::MAX, u64::MAX, 1 << 40, (1 << 40) + 1]);
            if round % 2 == 0 {
                indices.sort_unstable();
            }
            for p_z in [0.0, 0.5, 0.9, 1.0] {
                let batch = states.states(&indices, p_z);
                for (&idx, &st) in indices.iter().zip(&batch) {
                    assert_eq!(st, states.state(idx, p_z), "seed {seed}, round {round}, pulse {idx}");
                    assert_eq!(st, alice_state(&s, idx, p_z), "seed {seed}, round {round}, pulse {idx}");
                }
            }
        }
        assert!(FrameStates::new(&secret(1)).states(&[], 0.5).is_empty());
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
        assert_eq!(format!("{:?}", FrameStates::new(&s)), "FrameStates(..)");
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
}
