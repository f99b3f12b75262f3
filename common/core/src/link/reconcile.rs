//! Error correction of one block over the link: interactive Cascade (the default) or one-way
//! blind LDPC, both on frames cut from the block, selected by `[protocol] reconciliation`.
//!
//! * Cascade ([`crate::postproc::cascade`]): the block is cut into frames of about
//!   `cascade_frame_bits` bits (0: one frame, the whole block), all reconciled at once by
//!   [`MultiCascadeBob`], so a round trip carries the queries of every frame. Alice answers
//!   [`FrameParityQuery`]s and counts each parity as leak.
//! * LDPC ([`crate::postproc::ldpc`]): frames of `ldpc_frame_bits` bits (the last one shorter; its
//!   missing bits are zeros known to both ends, shortened bits of the code). Bob names, per
//!   frame, the mother code and the number of punctured bits from his QBER estimate; Alice sends
//!   every frame's syndrome in one message, then reveals punctured bits of the frames Bob could
//!   not decode, one message per round for all of them. The leak is m - p + revealed per frame
//!   (see the module documentation of `ldpc`), counted by Alice as she sends.
//!
//! Either way the leak Alice counts is the one the key-length formula charges, and Bob's
//! corrected key is checked by the verification hash before privacy amplification.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use rand::Rng;

use super::LinkError;
use crate::bits::BitVec;
use crate::postproc::cascade::{FrameParityQuery, MultiCascadeAlice};
use crate::postproc::ldpc::{LdpcAlice, LdpcFamily, MOTHER_RATES};

/// The error-correction method of a link (both ends must use the same: it is part of the
/// protocol parameters' digest).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reconciliation {
    /// Interactive optimized Cascade: the smallest leak, many round trips (merged over frames).
    #[default]
    Cascade,
    /// One-way blind LDPC: one syndrome message plus a few reveal rounds, a larger leak.
    Ldpc,
}

/// Reveal steps of the blind LDPC protocol: the punctured bits are revealed in this many equal
/// parts at most (the benchmark's setting).
pub const LDPC_REVEAL_STEPS: usize = 10;

/// Bob chooses each frame's LDPC mother code for this many times his QBER estimate (see
/// `BobLink`): with every punctured bit revealed, the code still decodes at a QBER up to about
/// 30 % above the estimate, which is the previous block's measured QBER.
pub const LDPC_QBER_MARGIN: f64 = 1.3;

/// Cuts `key` into Cascade frames of about `frame_bits` bits: round(n / frame_bits) frames (at
/// least one) of nearly equal length, the first ones one bit longer. `frame_bits` 0 means one
/// frame.
pub fn cascade_frames(key: &BitVec, frame_bits: u64) -> Vec<BitVec> {
    let n = key.len();
    let n_frames = if frame_bits == 0 { 1 } else { ((n as f64 / frame_bits as f64).round() as usize).max(1) };
    let (base, extra) = (n / n_frames, n % n_frames);
    let mut frames = Vec::with_capacity(n_frames);
    let mut start = 0;
    for i in 0..n_frames {
        let len = base + usize::from(i < extra);
        frames.push(key.slice(start, start + len));
        start += len;
    }
    frames
}

/// Cuts `key` into LDPC frames of `frame_bits` bits, the last one shorter (at least one frame).
pub fn ldpc_frames(key: &BitVec, frame_bits: u64) -> Vec<BitVec> {
    let n = key.len();
    let f = usize::try_from(frame_bits).unwrap_or(usize::MAX).max(1);
    if n == 0 {
        return vec![BitVec::new()];
    }
    (0..n.div_ceil(f)).map(|i| key.slice(i * f, (i * f + f).min(n))).collect()
}

/// The frames back in one key, in order.
pub fn join_frames(frames: &[BitVec]) -> BitVec {
    let mut key = BitVec::new();
    for frame in frames {
        key.extend_from(frame);
    }
    key
}

/// The LDPC codes for `frame_bits`-bit frames, built once per process (a code takes up to about a
/// second to build; a daemon keeps its frame length for its lifetime).
pub fn ldpc_family(frame_bits: u64) -> Arc<LdpcFamily> {
    static FAMILIES: OnceLock<Mutex<HashMap<u64, Arc<LdpcFamily>>>> = OnceLock::new();
    let families = FAMILIES.get_or_init(Default::default);
    // Invariant: nothing panics while holding this lock, so it is never poisoned.
    let mut families = families.lock().expect("ldpc family cache poisoned");
    families.entry(frame_bits).or_insert_with(|| Arc::new(LdpcFamily::new(frame_bits as usize))).clone()
}

/// Alice's end of a block's error correction.
pub enum AliceReconciler {
    /// Cascade over the block's frames.
    Cascade(MultiCascadeAlice),
    /// Blind LDPC: the frames, their codes, and each frame's encoder once the syndromes are sent.
    Ldpc {
        /// Alice's frames.
        frames: Vec<BitVec>,
        /// The codes of the frame length.
        family: Arc<LdpcFamily>,
        /// One encoder per frame, after [`AliceReconciler::syndromes`].
        ends: Option<Vec<LdpcAlice>>,
    },
}

impl AliceReconciler {
    /// Alice's end for her block `key` with the method and frame sizes of `params`; `seed` is
    /// the block's public Cascade seed.
    pub fn new(params: &super::ProtocolParams, key: &BitVec, seed: [u8; 32]) -> Self {
        match params.reconciliation {
            Reconciliation::Cascade => {
                Self::Cascade(MultiCascadeAlice::new(&cascade_frames(key, params.cascade_frame_bits), seed))
            }
            Reconciliation::Ldpc => Self::Ldpc {
                frames: ldpc_frames(key, params.ldpc_frame_bits),
                family: ldpc_family(params.ldpc_frame_bits),
                ends: None,
            },
        }
    }

    /// Cascade: the parities of the queried ranges (each counted as leak). All or nothing.
    pub fn parities(&mut self, queries: &[FrameParityQuery]) -> Result<Vec<bool>, LinkError> {
        match self {
            Self::Cascade(cascade) => cascade.answer(queries).map_err(|e| LinkError::Malformed(e.to_string())),
            Self::Ldpc { .. } => Err(LinkError::State("this link reconciles with LDPC, not Cascade".into())),
        }
    }

    /// LDPC: encodes every frame with the code and puncturing Bob named (one (rate index,
    /// punctured bits) per frame); returns the syndromes. Once per block. The punctured bits are
    /// drawn from `rng`, Alice's CSPRNG.
    pub fn syndromes(&mut self, starts: &[(u32, u32)], rng: &mut impl Rng) -> Result<Vec<BitVec>, LinkError> {
        let Self::Ldpc { frames, family, ends } = self else {
            return Err(LinkError::State("this link reconciles with Cascade, not LDPC".into()));
        };
        if ends.is_some() {
            return Err(LinkError::State("the syndromes of this block were already sent".into()));
        }
        if starts.len() != frames.len() {
            return Err(LinkError::Malformed(format!(
                "{} frame starts for {} LDPC frames",
                starts.len(),
                frames.len()
            )));
        }
        let mut encoders = Vec::with_capacity(frames.len());
        for (frame, &(rate_index, n_punctured)) in frames.iter().zip(starts) {
            let rate_index = rate_index as usize;
            if rate_index >= MOTHER_RATES.len() {
                return Err(LinkError::Malformed(format!("LDPC rate index {rate_index} out of range")));
            }
            let code = family.code(rate_index);
            if n_punctured as usize > code.n_adaptation() {
                return Err(LinkError::Malformed(format!(
                    "{n_punctured} punctured bits exceed the code's {} adaptation bits",
                    code.n_adaptation()
                )));
            }
            let end = LdpcAlice::new(code, frame, n_punctured as usize, rng)
                .map_err(|e| LinkError::Malformed(e.to_string()))?;
            encoders.push(end);
        }
        let syndromes = encoders.iter().map(|e| e.syndrome().clone()).collect();
        *ends = Some(encoders);
        Ok(syndromes)
    }

    /// LDPC: reveals `counts[i]` more punctured bits of frame i (0: none). All or nothing.
    pub fn reveal(&mut self, counts: &[u32]) -> Result<Vec<Vec<bool>>, LinkError> {
        let Self::Ldpc { ends: Some(ends), .. } = self else {
            return Err(LinkError::State("no LDPC syndromes were sent for this block".into()));
        };
        if counts.len() != ends.len() {
            return Err(LinkError::Malformed(format!("{} reveal counts for {} LDPC frames", counts.len(), ends.len())));
        }
        // Check every count first, so that a bad request discloses nothing.
        for (end, &count) in ends.iter().zip(counts) {
            if count as usize > end.remaining_punctured() {
                return Err(LinkError::Malformed(format!(
                    "asked to reveal {count} punctured bits, {} remain",
                    end.remaining_punctured()
                )));
            }
        }
        ends.iter_mut()
            .zip(counts)
            .map(|(end, &count)| end.reveal(count as usize).map_err(|e| LinkError::Malformed(e.to_string())))
            .collect()
    }

    /// Bits disclosed so far (parities, or syndrome and revealed bits).
    pub fn leak_bits(&self) -> u64 {
        match self {
            Self::Cascade(cascade) => cascade.leak_bits(),
            Self::Ldpc { ends, .. } => ends.as_ref().map_or(0, |ends| ends.iter().map(LdpcAlice::leak_bits).sum()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: usize) -> BitVec {
        BitVec::from_bools(&(0..n).map(|i| (i * 7 + i / 3) % 5 < 2).collect::<Vec<_>>())
    }

    #[test]
    fn cascade_frames_cover_the_key_in_order_with_nearly_equal_lengths() {
        for (n, frame_bits, n_frames) in [(100_000, 16_384, 6), (100_000, 0, 1), (1000, 16_384, 1), (65_536, 16_384, 4)]
        {
            let k = key(n);
            let frames = cascade_frames(&k, frame_bits);
            assert_eq!(frames.len(), n_frames, "n = {n}, frame_bits = {frame_bits}");
            let lens: Vec<usize> = frames.iter().map(BitVec::len).collect();
            assert!(lens.iter().max().unwrap() - lens.iter().min().unwrap() <= 1, "{lens:?}");
            assert_eq!(join_frames(&frames), k);
        }
    }

    #[test]
    fn alice_refuses_bad_ldpc_requests_whole_and_discloses_nothing() {
        use rand::SeedableRng;
        let params = super::super::ProtocolParams {
            reconciliation: Reconciliation::Ldpc,
            ldpc_frame_bits: 4096,
            ..Default::default()
        };
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(9);
        let mut alice = AliceReconciler::new(&params, &key(6000), [0; 32]);
        assert!(matches!(alice.reveal(&[1, 0]), Err(LinkError::State(_))), "reveal before syndromes");
        assert!(matches!(alice.parities(&[]), Err(LinkError::State(_))), "Cascade on an LDPC link");
        let bad_rate = [(MOTHER_RATES.len() as u32, 0), (0, 0)];
        assert!(matches!(alice.syndromes(&bad_rate, &mut rng), Err(LinkError::Malformed(_))));
        assert!(
            matches!(alice.syndromes(&[(0, 0)], &mut rng), Err(LinkError::Malformed(_))),
            "one start for two frames"
        );
        assert_eq!(alice.leak_bits(), 0);
        let syndromes = alice.syndromes(&[(5, 100), (5, 100)], &mut rng).unwrap();
        assert_eq!(syndromes.len(), 2);
        let after_syndromes = alice.leak_bits();
        assert!(after_syndromes > 0);
        assert!(matches!(alice.syndromes(&[(5, 100), (5, 100)], &mut rng), Err(LinkError::State(_))), "twice");
        // Asking more than remains for one frame refuses the whole request.
        assert!(matches!(alice.reveal(&[10, 101]), Err(LinkError::Malformed(_))));
        assert_eq!(alice.leak_bits(), after_syndromes);
        let values = alice.reveal(&[10, 0]).unwrap();
        assert_eq!((values[0].len(), values[1].len()), (10, 0));
        assert_eq!(alice.leak_bits(), after_syndromes + 10);
    }

    #[test]
    fn ldpc_frames_are_full_but_the_last() {
        let k = key(100_000);
        let frames = ldpc_frames(&k, 32_768);
        let lens: Vec<usize> = frames.iter().map(BitVec::len).collect();
        assert_eq!(lens, vec![32_768, 32_768, 32_768, 1_696]);
        assert_eq!(join_frames(&frames), k);
        assert_eq!(ldpc_frames(&key(65_536), 32_768).len(), 2);
    }
}
