//! The states Alice prepared in a frame, as her core sifts against them: explicit (every pulse's
//! state, as a device reported it from its own random source, [`PackedStates`]) or, for the
//! in-process simulator only, derived from a frame secret ([`FrameStates`]: AES in counter mode,
//! nothing stored per pulse). A hardware frame's states are never derived from a seed.

use zeroize::Zeroize;

use crate::quantum::{FrameSecret, FrameStates, State};
use crate::wire::WireError;

/// A frame's states packed 2 bits per pulse (the codes of [`State::code`]): pulse i in bits
/// 2 (i mod 4) and 2 (i mod 4) + 1 of byte i / 4, unused high bits of the last byte zero. This
/// is the wire form of `TransmitterFrame.states` in the device API (`proto/device.proto`).
///
/// Alice's states are key material: the bytes are wiped when dropped, and `Debug` never shows
/// them.
#[derive(Clone, PartialEq, Eq)]
pub struct PackedStates {
    n_pulses: u64,
    bytes: Vec<u8>,
}

impl std::fmt::Debug for PackedStates {
    /// Prints the length only.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedStates({} pulses)", self.n_pulses)
    }
}

impl Drop for PackedStates {
    fn drop(&mut self) {
        self.bytes.zeroize();
    }
}

impl PackedStates {
    /// Bytes needed for `n_pulses` pulses.
    pub fn byte_len(n_pulses: u64) -> usize {
        n_pulses.div_ceil(4) as usize
    }

    /// The packed states of `n_pulses` pulses from their wire bytes, checking the length and
    /// that the unused bits are zero.
    pub fn from_bytes(n_pulses: u64, bytes: Vec<u8>) -> Result<Self, WireError> {
        if bytes.len() != Self::byte_len(n_pulses) {
            return Err(WireError::Length {
                what: "packed states (bytes)",
                expected: Self::byte_len(n_pulses),
                got: bytes.len(),
            });
        }
        let used = (n_pulses % 4) as u32;
        if used != 0
            && let Some(&last) = bytes.last()
            && last >> (2 * used) != 0
        {
            return Err(WireError::Code { what: "packed states' unused last bits", code: last });
        }
        Ok(Self { n_pulses, bytes })
    }

    /// Packs `states` (pulse i is `states[i]`).
    pub fn from_states(states: &[State]) -> Self {
        let mut p = Self::zeroed(states.len() as u64);
        for (i, s) in states.iter().enumerate() {
            p.bytes[i / 4] |= s.code() << (2 * (i % 4));
        }
        p
    }

    /// All pulses |E> (code 0): a buffer to fill with [`PackedStates::set_run`].
    pub fn zeroed(n_pulses: u64) -> Self {
        Self { n_pulses, bytes: vec![0; Self::byte_len(n_pulses)] }
    }

    /// Writes `states` for pulses `first..first + states.len()`, with `first` a multiple of 4
    /// (a frame filled in chunks).
    pub fn set_run(&mut self, first: u64, states: &[State]) {
        assert_eq!(first % 4, 0, "runs start at a multiple of 4");
        let base = (first / 4) as usize;
        for (j, quad) in states.chunks(4).enumerate() {
            let mut b = 0u8;
            for (k, s) in quad.iter().enumerate() {
                b |= s.code() << (2 * k);
            }
            self.bytes[base + j] = b;
        }
    }

    /// Pulses in the frame.
    pub fn n_pulses(&self) -> u64 {
        self.n_pulses
    }

    /// The state of pulse `pulse_idx` (panics beyond the frame).
    #[inline]
    pub fn state(&self, pulse_idx: u64) -> State {
        assert!(pulse_idx < self.n_pulses, "pulse {pulse_idx} beyond a frame of {}", self.n_pulses);
        let code = (self.bytes[(pulse_idx / 4) as usize] >> (2 * (pulse_idx % 4))) & 3;
        State::from_code(code).expect("two bits are a state code")
    }

    /// The wire bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The wire bytes, moved out (for a message; the caller is then responsible for them).
    pub fn into_bytes(mut self) -> Vec<u8> {
        std::mem::take(&mut self.bytes)
    }
}

/// The states of a transmitter frame: explicit (a device's, from its own random source) or, for
/// the in-process simulator only, derived from a frame secret (module docs).
#[derive(Clone, Debug)]
pub enum TxStates {
    /// Every pulse's state as the device reported it.
    Packed(PackedStates),
    /// The simulator's states: a pure function of the frame secret and the pulse index.
    Derived {
        /// The frame secret.
        secret: FrameSecret,
        /// Its expanded key (boxed: the AES round keys are large).
        states: Box<FrameStates>,
        /// Alice's probability of a Z state.
        p_z: f64,
    },
}

impl TxStates {
    /// The simulator's states of the frame with `secret`.
    pub fn derived(secret: FrameSecret, p_z: f64) -> Self {
        let states = Box::new(FrameStates::new(&secret));
        Self::Derived { secret, states, p_z }
    }

    /// True for the simulator's derived states (a simulated channel).
    pub fn is_derived(&self) -> bool {
        matches!(self, TxStates::Derived { .. })
    }

    /// The state of pulse `pulse_idx`.
    pub fn state(&self, pulse_idx: u64) -> State {
        match self {
            TxStates::Packed(p) => p.state(pulse_idx),
            TxStates::Derived { states, p_z, .. } => states.state(pulse_idx, *p_z),
        }
    }

    /// The states of `pulse_indices` into `out` (same length).
    pub fn fill_states(&self, pulse_indices: &[u64], out: &mut [State]) {
        assert_eq!(pulse_indices.len(), out.len(), "one state per pulse index");
        match self {
            TxStates::Packed(p) => {
                for (o, &i) in out.iter_mut().zip(pulse_indices) {
                    *o = p.state(i);
                }
            }
            TxStates::Derived { states, p_z, .. } => states.fill_states(pulse_indices, *p_z, out),
        }
    }

    /// The packed form of the first `n_pulses` pulses (computes every state when derived).
    pub fn to_packed(&self, n_pulses: u64) -> PackedStates {
        match self {
            TxStates::Packed(p) => p.clone(),
            TxStates::Derived { states, p_z, .. } => pack_derived(states, *p_z, n_pulses),
        }
    }
}

/// Every state of a frame from its expanded key, packed (in chunks: no per-pulse index array for
/// the whole frame).
pub fn pack_derived(states: &FrameStates, p_z: f64, n_pulses: u64) -> PackedStates {
    const CHUNK: u64 = 1 << 14;
    let mut packed = PackedStates::zeroed(n_pulses);
    let mut idx = Vec::with_capacity(CHUNK as usize);
    let mut out = vec![State::Early; CHUNK as usize];
    let mut first = 0;
    while first < n_pulses {
        let n = CHUNK.min(n_pulses - first);
        idx.clear();
        idx.extend(first..first + n);
        states.fill_states(&idx, p_z, &mut out[..n as usize]);
        packed.set_run(first, &out[..n as usize]);
        first += n;
    }
    // The scratch buffer held states: wipe it.
    out.iter_mut().for_each(|s| *s = State::Early);
    packed
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha20Rng;

    #[test]
    fn packing_round_trips_and_checks() {
        let seed = 21;
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        for n in [0usize, 1, 3, 4, 5, 1000, 1027] {
            let states: Vec<State> = (0..n).map(|_| State::from_code(rng.random_range(0..4)).unwrap()).collect();
            let p = PackedStates::from_states(&states);
            assert_eq!(p.as_bytes().len(), n.div_ceil(4));
            assert!((0..n).all(|i| p.state(i as u64) == states[i]), "seed {seed}, n {n}");
            let again = PackedStates::from_bytes(n as u64, p.as_bytes().to_vec()).unwrap();
            assert_eq!(again, p);
        }
        assert!(PackedStates::from_bytes(5, vec![0; 1]).is_err());
        assert!(PackedStates::from_bytes(5, vec![0, 0b0000_0100]).is_err());
        assert!(PackedStates::from_bytes(5, vec![0, 0b0000_0011]).is_ok());
        assert_eq!(format!("{:?}", PackedStates::from_states(&[State::Late])), "PackedStates(1 pulses)");
    }

    #[test]
    fn derived_states_pack_like_the_aes_states() {
        let seed = 22;
        let secret = FrameSecret::random(&mut ChaCha20Rng::seed_from_u64(seed));
        let tx = TxStates::derived(secret.clone(), 0.8);
        let n = 40_003u64;
        let packed = tx.to_packed(n);
        let fs = FrameStates::new(&secret);
        assert!((0..n).all(|i| packed.state(i) == fs.state(i, 0.8)), "seed {seed}");
        let p = TxStates::Packed(packed);
        let idx = [0, 5, 77, 40_002];
        let (mut a, mut b) = ([State::Plus; 4], [State::Plus; 4]);
        p.fill_states(&idx, &mut a);
        tx.fill_states(&idx, &mut b);
        assert_eq!(a, b);
    }
}
