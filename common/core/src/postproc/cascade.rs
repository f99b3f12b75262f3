//! Interactive error correction: the optimized Cascade protocol.
//!
//! Bob drives; Alice is a parity oracle that answers [`ParityQuery`]s about her key and counts
//! every answered parity as disclosed. Both ends derive the same per-pass shuffles from a shared
//! 32-byte seed, so the only traffic is queries (Bob to Alice) and one parity bit per query back.
//! Alice answers any valid range, so everything below about *which* ranges Bob asks for is Bob's
//! business alone and can change without touching the protocol.
//!
//! # Schedule
//! The optimized Cascade of Martinez-Mateo, Pacher, Peev, Ciurana, Pedersen, "Demystifying the
//! information reconciliation protocol Cascade", Quantum Inf. Comput. 15, 453 (2015),
//! arXiv:1407.3257 (as summarised in the project's post-processing notes): with
//! alpha = ceil(log2(1/Q) - 0.5), pass 1 uses blocks of k1 = 2^alpha bits, pass 2 of
//! k2 = 2^ceil((alpha + 12) / 2), pass 3 of k3 = 4096, and the remaining passes of n/2 bits; every
//! block size is clamped to [1, n]. Q is Bob's QBER estimate, floored at [`QBER_FLOOR`] (and capped
//! at 0.5) so that a zero, negative or NaN estimate still gives a sane schedule.
//!
//! Two changes, both measured with the simulation of the benchmark (`common::postproc::bench`):
//! * k2 = 2^floor((alpha + 12) / 2), rounded down instead of up: half the published value for
//!   odd alpha (Q around 1, 3 and 10 %), the published one for even alpha. With the weighted
//!   splits below, pass-2 searches are cheaper and, for odd alpha, the smaller k2 leaks as little
//!   or less (f = 1.044 instead of 1.048 at Q = 1 %, equal within 0.001 at 3 and 11 %, n = 2^14)
//!   and halves the round trips (from 19 000 to 4 500 at Q = 11 %, n = 10^6). For alpha = 4
//!   (Q from 4.4 to 8.8 %) the published k2 = 256 is best up to about 6 %, and 128 from 7 %
//!   (f 1.0507 instead of 1.0519 at 8 %, round trips 740 instead of 1300 at n = 2^14, 3 000
//!   instead of 18 000 at n = 10^6), so k2 is halved there from Q = 7 %.
//! * The published schedule was tuned for n = 2^14; for longer keys passes 4 and 5 use
//!   intermediate blocks of 2^14 and 2^16 bits before the n/2 passes, because residual errors
//!   found in a block of n/2 bits cost log2(n/2) parities each and are found one at a time.
//!
//! # Shuffles
//! Every pass, the first included, works on a shuffled copy of the key: position i of pass p holds
//! original bit `perm_p[i]` (see [`pass_permutation`]). Each pass draws from its own generator,
//! xoshiro256++ (Blackman and Vigna) whose 256-bit state is the first four 64-bit words of
//! `ChaCha20Rng::from_seed(seed)` with `set_stream(p)`. The shuffles are public (the seed is sent
//! in the clear), so a fast non-cryptographic generator costs no secrecy; seeding it from ChaCha20
//! keeps distinct passes and seeds independent.
//! * The first passes ([`first_split_pass`]: 3, or 5 for keys over 2^16 bits) use a Fisher-Yates
//!   shuffle, swap indices drawn by Lemire's multiply-and-reject on 64-bit words. Shuffling pass 1
//!   too protects against bursts of errors.
//! * The later passes, whose blocks are n/2 bits, only need a random half of the key in each
//!   block: their order is the bits selected by a uniformly random mask (one generator word per 64
//!   bits) in increasing index order, followed by the unselected bits in increasing index order.
//!   That costs a linear scan instead of n random swaps (these passes rarely find anything, so
//!   their shuffles were most of Cascade's work), and their binary searches split the halves
//!   into runs of original indices, which the random shuffles of the earlier passes make as good
//!   as random subsets.
//!
//! [`CascadeShuffles`] computes each pass's permutation once and can be shared by many frames
//! (see [`MultiCascadeBob`]): the error patterns of different frames are independent, so each
//! frame still sees a uniformly random shuffle. Frames of a multi-frame exchange are padded with
//! zeros to the longest frame's length, so that one set of shuffles serves them all.
//!
//! # Parity reuse
//! Alice's key never changes, so every parity she discloses stays valid. Bob keeps, per pass, the
//! binary tree of every block he has searched, with Alice's parity at each node he knows. He never
//! asks for a parity he can deduce:
//! * the second child of a node: parity(right) = parity(node) xor parity(left) (and the left
//!   child from the right one), for every node of every search, including searches of blocks that
//!   become odd again later through the cascade effect, which mostly replay known parities;
//! * the last top-level block of every pass after the first: Alice's parity of the whole key is
//!   known once pass 1's block parities are, so the last block's parity is the xor of that total
//!   and of the other blocks' parities (a pass whose single block is the whole key costs nothing);
//! * a child whose bits were all corrected: a binary search ends on a bit where Bob's key differs
//!   from Alice's, so a corrected bit is known to be right, and Alice's parity of a range of
//!   corrected bits is Bob's own (ranges up to [`KNOWN_CORRECT_MAX_BITS`] bits are checked; longer
//!   ones are practically never all corrected). This matters in the searches that the cascade
//!   effect restarts: a pass-1 block made odd by a correction found in a later pass holds the
//!   corrected bit, and the last split beside it used to ask a parity whose answer was certain.
//!   Measured with the benchmark's simulation (4 frames of 10^6 bits): f fell from 1.044 / 1.048 /
//!   1.051 to 1.034 / 1.034 / 1.034 at Q = 8 / 10 / 11 %, and at n = 2^14 (100 frames) from
//!   1.051 / 1.054 / 1.056 to 1.040 / 1.039 / 1.039.
//!
//! # Weighted splits
//! A binary search costs one parity per level, so it pays to split a range where the odd error is
//! equally likely to lie on either side rather than in the middle of its positions. After pass 1
//! Bob knows much about where errors are: a bit he corrected is now right, and the bits of a
//! pass-1 block that had c corrections and is even again hold on average
//! E[T - c | T >= c, T = c mod 2] / (k1 - c) errors each, T ~ Binomial(k1, Q) being the block's
//! initial number of errors (the remaining errors of a block that was even from the start come in
//! pairs, and are about three times denser at high QBER than those of a block that was odd and
//! had its error fixed). New tree nodes are split at the weighted median of these probabilities
//! (ranges up to [`WEIGHTED_SPLIT_MAX_BITS`] bits; longer ranges mix the classes evenly and are
//! halved, and pass-1 blocks without corrections are uniform). At n = 2^14 this lowered f from
//! 1.045 to 1.040 at Q = 3 % and from 1.066 to 1.056 at Q = 11 %.
//!
//! # Frame errors
//! With 14 passes a frame keeps residual errors with probability of the order of 10^-3 at high
//! QBER (the passes after the third find an error pair left by the earlier ones with probability
//! 1/2 each): such frames are caught by verification, like any Cascade failure.
//!
//! # Cascade effect and batching
//! Correcting a bit flips the parity of the block holding it in every pass started so far; each
//! block that becomes odd is searched again (in the earliest such pass first, like the sequential
//! protocol, so that two passes do not hunt the same error in parallel). All searches that may run
//! at the same time advance in lockstep, one level per round trip, and their queries go out as one
//! batch. A search whose range stops being odd (another search fixed its error) is dropped and its
//! block checked again. [`MultiCascadeBob`] merges the batches of many frames into one exchange,
//! so that the round-trip latency is paid once for all of them.

use std::sync::{Arc, OnceLock};

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use thiserror::Error;

use crate::bits::BitVec;

/// Number of Cascade passes (the optimized schedule uses 14).
pub const N_PASSES: u32 = 14;

/// Smallest QBER estimate (dimensionless) used to choose the block sizes.
pub const QBER_FLOOR: f64 = 0.001;

/// Block size of the third pass, in bits (Martinez-Mateo et al., optimized schedule).
const K3_BITS: usize = 4096;

/// Keys longer than this (bits) get the intermediate passes of 2^14 and 2^16 bits.
const LONG_KEY_BITS: usize = 1 << 16;

/// Longest range (bits) whose split point is chosen by weight rather than halved.
pub const WEIGHTED_SPLIT_MAX_BITS: u32 = 256;

/// Longest range (bits) that Bob checks for being all corrected before asking its parity.
const KNOWN_CORRECT_MAX_BITS: u32 = 8;

/// Smallest error probability of the density table (positive: 0 marks corrected bits).
const MIN_DENSITY: f32 = 1e-12;

/// Largest number of corrections per pass-1 block that the error-density table distinguishes.
const MAX_TABLE_CORRECTIONS: usize = 24;

/// A request for the parity of Alice's bits at positions `start..end` (half-open) of the shuffled
/// key of pass `pass` (see the module documentation for the shuffle).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParityQuery {
    /// Pass index, 0-based, below [`N_PASSES`].
    pub pass: u32,
    /// First position of the range in the pass's shuffled order (inclusive).
    pub start: u32,
    /// End of the range in the pass's shuffled order (exclusive).
    pub end: u32,
}

/// A parity query about one frame of a multi-frame exchange ([`MultiCascadeBob`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameParityQuery {
    /// Index of the frame in the exchange, 0-based.
    pub frame: u32,
    /// Pass index, 0-based, below [`N_PASSES`].
    pub pass: u32,
    /// First position of the range in the pass's shuffled order (inclusive).
    pub start: u32,
    /// End of the range in the pass's shuffled order (exclusive).
    pub end: u32,
}

impl FrameParityQuery {
    /// The single-frame query this one carries.
    pub fn query(&self) -> ParityQuery {
        ParityQuery { pass: self.pass, start: self.start, end: self.end }
    }
}

/// Why a Cascade message was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CascadeError {
    /// A query names a pass past the last one.
    #[error("parity query for pass {pass}, but cascade has only {n_passes} passes")]
    PassOutOfRange {
        /// The pass named by the query.
        pass: u32,
        /// Number of passes of the protocol.
        n_passes: u32,
    },
    /// A query's range is empty or runs past the end of the key.
    #[error("parity query range {start}..{end} is empty or outside the {n_bits}-bit key")]
    BadRange {
        /// Start of the range (inclusive).
        start: u32,
        /// End of the range (exclusive).
        end: u32,
        /// Length of the key, in bits.
        n_bits: usize,
    },
    /// The number of parities does not match the number of queries of the outstanding batch.
    #[error("expected {expected} parities for the outstanding batch of queries, got {got}")]
    AnswerCountMismatch {
        /// Number of queries in the outstanding batch.
        expected: usize,
        /// Number of parities received.
        got: usize,
    },
    /// Parities arrived while no batch of queries was outstanding.
    #[error("parities received but no batch of queries is outstanding")]
    NoOutstandingQueries,
    /// A multi-frame query names a frame that the exchange does not have.
    #[error("parity query for frame {frame}, but the exchange has only {n_frames} frames")]
    FrameOutOfRange {
        /// The frame named by the query.
        frame: u32,
        /// Number of frames of the exchange.
        n_frames: usize,
    },
}

/// The result of a reconciliation at Bob's end.
#[derive(Debug, Clone)]
pub struct CascadeOutcome {
    /// Bob's corrected key (equal to Alice's unless Cascade failed, which verification catches).
    pub key: BitVec,
    /// Number of parity bits Alice disclosed (one per answered query), in bits.
    pub leak_bits: u64,
    /// Number of bits Bob flipped.
    pub n_corrected: u64,
    /// Number of query batches, i.e. round trips between Bob and Alice.
    pub round_trips: u32,
}

/// Block sizes (bits) of the [`N_PASSES`] passes for a QBER estimate and a key of `n_bits` bits,
/// following the optimized schedule described in the module documentation.
pub fn block_sizes(qber_estimate: f64, n_bits: usize) -> Vec<usize> {
    let q = clamped_qber(qber_estimate);
    // Martinez-Mateo et al. (arXiv:1407.3257), optimized Cascade: alpha = ceil(log2(1/Q) - 1/2),
    // k1 = 2^alpha, k2 = 2^ceil((alpha + 12) / 2) (rounded down here, see the module
    // documentation), k3 = 4096, then n/2.
    let alpha = ((1.0 / q).log2() - 0.5).ceil().max(1.0) as u32;
    let k1 = 1usize << alpha;
    let mut k2_log = (alpha + 12) / 2;
    if alpha == 4 && q >= 0.07 {
        k2_log -= 1;
    }
    let k2 = 1usize << k2_log;
    let long = n_bits > LONG_KEY_BITS;
    let max_size = n_bits.max(1);
    (0..N_PASSES)
        .map(|pass| match pass {
            0 => k1,
            1 => k2,
            2 => K3_BITS,
            3 if long => 1 << 14,
            4 if long => 1 << 16,
            _ => n_bits / 2,
        })
        .map(|k| k.clamp(1, max_size))
        .collect()
}

/// The QBER estimate used for the schedule: NaN becomes [`QBER_FLOOR`], the rest is clamped to
/// [`QBER_FLOOR`, 0.5].
fn clamped_qber(qber_estimate: f64) -> f64 {
    if qber_estimate.is_nan() { QBER_FLOOR } else { qber_estimate.clamp(QBER_FLOOR, 0.5) }
}

/// The shuffle of pass `pass` for an `n_bits`-bit key: element i is the original index of the bit
/// at position i of the pass's order (see the module documentation for the two kinds of shuffle).
///
/// Panics when `n_bits` does not fit in a `u32` (Cascade positions are 32-bit).
pub fn pass_permutation(seed: &[u8; 32], pass: u32, n_bits: usize) -> Vec<u32> {
    match PassOrder::new(seed, pass, n_bits) {
        PassOrder::Shuffled { perm, .. } => perm,
        PassOrder::Split(split) => {
            let mut perm = Vec::with_capacity(n_bits);
            split.originals(0, n_bits as u32, &mut perm);
            perm
        }
    }
}

/// The first pass (0-based) whose shuffle is a random split rather than a Fisher-Yates shuffle:
/// the first pass of [`block_sizes`] whose blocks are n/2 bits (3, or 5 for keys of more than
/// 2^16 bits). It depends only on the key length, which Alice knows, not on Bob's QBER estimate.
pub fn first_split_pass(n_bits: usize) -> u32 {
    if n_bits > LONG_KEY_BITS { 5 } else { 3 }
}

/// xoshiro256++ (Blackman and Vigna, "Scrambled linear pseudorandom number generators", ACM TOMS
/// 47, 36 (2021)), written out so that the shuffles cannot change with a dependency upgrade.
struct ShuffleRng {
    state: [u64; 4],
}

impl ShuffleRng {
    /// The generator of pass `pass`: its state is the first 32 bytes of ChaCha20 keyed by `seed`
    /// on stream `pass`.
    fn new(seed: &[u8; 32], pass: u32) -> Self {
        let mut chacha = ChaCha20Rng::from_seed(*seed);
        chacha.set_stream(u64::from(pass));
        let mut state = [0u64; 4];
        for word in &mut state {
            *word = chacha.next_u64();
        }
        if state == [0; 4] {
            // The all-zero state is xoshiro's only fixed point (probability 2^-256).
            state[0] = 1;
        }
        Self { state }
    }

    #[inline]
    fn next_u64(&mut self) -> u64 {
        let s = &mut self.state;
        let result = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// A uniform integer in `0..bound` (bound > 0), by Lemire's multiply-and-reject ("Fast random
    /// integer generation in an interval", ACM TOMACS 29, 3 (2019)) on 64-bit draws.
    #[inline]
    fn below(&mut self, bound: u64) -> u64 {
        debug_assert!(bound > 0);
        let mut product = u128::from(self.next_u64()) * u128::from(bound);
        if (product as u64) < bound {
            let threshold = bound.wrapping_neg() % bound;
            while (product as u64) < threshold {
                product = u128::from(self.next_u64()) * u128::from(bound);
            }
        }
        (product >> 64) as u64
    }
}

/// `key` reordered by `perm`: bit i of the result is bit `perm[i]` of `key`. The key is first
/// unpacked to one byte per bit, so that the gather is a byte load per bit.
fn permute_bits(key: &BitVec, perm: &[u32]) -> BitVec {
    let mut unpacked = vec![0u8; key.words().len() * 64];
    for (chunk, &word) in unpacked.chunks_exact_mut(64).zip(key.words()) {
        for (k, byte) in chunk.iter_mut().enumerate() {
            *byte = ((word >> k) & 1) as u8;
        }
    }
    let mut words = vec![0u64; perm.len().div_ceil(64)];
    for (chunk, word) in perm.chunks(64).zip(words.iter_mut()) {
        let mut acc = 0u64;
        for (k, &src) in chunk.iter().enumerate() {
            acc |= u64::from(unpacked[src as usize]) << k;
        }
        *word = acc;
    }
    unpacked.fill(0);
    BitVec::from_words(words, perm.len())
}

/// The order of one pass (see "Shuffles" in the module documentation).
enum PassOrder {
    /// A Fisher-Yates shuffle: position -> original index, and (built on first use, only Bob
    /// needs it) original index -> position.
    Shuffled { perm: Vec<u32>, inverse: OnceLock<Vec<u32>> },
    /// A random split: the selected bits, then the others, each in index order.
    Split(SplitOrder),
}

impl PassOrder {
    /// The order of pass `pass` for `n_bits` bits (fewer than 2^32).
    fn new(seed: &[u8; 32], pass: u32, n_bits: usize) -> Self {
        let n = u32::try_from(n_bits).expect("cascade keys are shorter than 2^32 bits");
        let mut rng = ShuffleRng::new(seed, pass);
        if pass >= first_split_pass(n_bits) {
            return PassOrder::Split(SplitOrder::new(&mut rng, n));
        }
        let mut perm: Vec<u32> = (0..n).collect();
        for i in (1..perm.len()).rev() {
            let j = rng.below(i as u64 + 1);
            perm.swap(i, j as usize);
        }
        PassOrder::Shuffled { perm, inverse: OnceLock::new() }
    }

    /// The original index of the bit at `position`.
    #[inline]
    fn original(&self, position: u32) -> u32 {
        match self {
            PassOrder::Shuffled { perm, .. } => perm[position as usize],
            PassOrder::Split(split) => split.original(position),
        }
    }

    /// The position of original bit `original`.
    #[inline]
    fn position(&self, original: u32) -> u32 {
        match self {
            PassOrder::Shuffled { perm, inverse } => {
                let inverse = inverse.get_or_init(|| {
                    let mut inverse = vec![0u32; perm.len()];
                    for (position, &original) in perm.iter().enumerate() {
                        inverse[original as usize] = position as u32;
                    }
                    inverse
                });
                inverse[original as usize]
            }
            PassOrder::Split(split) => split.position(original),
        }
    }

    /// Appends the original indices of positions `lo..hi` to `out`, in order.
    fn originals(&self, lo: u32, hi: u32, out: &mut Vec<u32>) {
        match self {
            PassOrder::Shuffled { perm, .. } => out.extend_from_slice(&perm[lo as usize..hi as usize]),
            PassOrder::Split(split) => split.originals(lo, hi, out),
        }
    }
}

/// A random split of `n_bits` bits: positions 0..W hold the W bits selected by `mask` in index
/// order, positions W..n the others in index order. Ranks and selects go through per-word counts,
/// so no permutation is stored and a range's parity costs a word operation per 64 bits.
struct SplitOrder {
    n_bits: u32,
    /// The selection, one bit per original index; bits past `n_bits` are zero.
    mask: Vec<u64>,
    /// `ones_before[w]`: number of selected bits in words 0..w (one entry per word, plus the
    /// total).
    ones_before: Vec<u32>,
}

impl SplitOrder {
    fn new(rng: &mut ShuffleRng, n_bits: u32) -> Self {
        let n_words = (n_bits as usize).div_ceil(64);
        let mut mask: Vec<u64> = (0..n_words).map(|_| rng.next_u64()).collect();
        if let Some(last) = mask.last_mut().filter(|_| !n_bits.is_multiple_of(64)) {
            *last &= (1u64 << (n_bits % 64)) - 1;
        }
        let mut ones_before = Vec::with_capacity(n_words + 1);
        let mut count = 0u32;
        for &word in &mask {
            ones_before.push(count);
            count += word.count_ones();
        }
        ones_before.push(count);
        Self { n_bits, mask, ones_before }
    }

    /// Number of selected bits (W).
    fn n_selected(&self) -> u32 {
        self.ones_before[self.mask.len()]
    }

    /// The mask word `w` for the selected (`selected`) or the other bits, bits past n cleared.
    #[inline]
    fn word(&self, w: usize, selected: bool) -> u64 {
        if selected {
            return self.mask[w];
        }
        let valid = if (w + 1) * 64 <= self.n_bits as usize { u64::MAX } else { (1u64 << (self.n_bits % 64)) - 1 };
        !self.mask[w] & valid
    }

    /// Number of selected (or other) bits in words 0..w.
    #[inline]
    fn count_before(&self, w: usize, selected: bool) -> u32 {
        if selected { self.ones_before[w] } else { 64 * w as u32 - self.ones_before[w] }
    }

    #[inline]
    fn position(&self, original: u32) -> u32 {
        let (w, b) = (original as usize / 64, original % 64);
        let ones_below = self.ones_before[w] + (self.mask[w] & ((1u64 << b) - 1)).count_ones();
        if (self.mask[w] >> b) & 1 == 1 { ones_below } else { self.n_selected() + (original - ones_below) }
    }

    #[inline]
    fn original(&self, position: u32) -> u32 {
        let n_selected = self.n_selected();
        if position < n_selected { self.select(position, true) } else { self.select(position - n_selected, false) }
    }

    /// The original index of the `rank`-th (0-based) selected (or other) bit.
    fn select(&self, rank: u32, selected: bool) -> u32 {
        // The last word whose preceding count is at most rank.
        let (mut lo, mut hi) = (0usize, self.mask.len());
        while hi - lo > 1 {
            let mid = (lo + hi) / 2;
            if self.count_before(mid, selected) <= rank { lo = mid } else { hi = mid }
        }
        let mut word = self.word(lo, selected);
        for _ in 0..rank - self.count_before(lo, selected) {
            word &= word - 1;
        }
        64 * lo as u32 + word.trailing_zeros()
    }

    /// Parity of `key` (original order, packed) at positions `lo..hi` (lo < hi) of this order.
    fn parity(&self, key: &[u64], lo: u32, hi: u32) -> bool {
        let n_selected = self.n_selected();
        let mut parity = false;
        if lo < n_selected {
            let last = hi.min(n_selected) - 1;
            parity ^= self.masked_parity(key, self.select(lo, true), self.select(last, true), true);
        }
        if hi > n_selected {
            let first = lo.max(n_selected) - n_selected;
            let last = hi - 1 - n_selected;
            parity ^= self.masked_parity(key, self.select(first, false), self.select(last, false), false);
        }
        parity
    }

    /// Parity of `key` at the selected (or other) original indices in `first..=last`.
    fn masked_parity(&self, key: &[u64], first: u32, last: u32, selected: bool) -> bool {
        let (w0, w1) = (first as usize / 64, last as usize / 64);
        let mut acc = 0u64;
        for (w, &key_word) in key.iter().enumerate().take(w1 + 1).skip(w0) {
            let mut m = self.word(w, selected);
            if w == w0 {
                m &= u64::MAX << (first % 64);
            }
            if w == w1 && last % 64 != 63 {
                m &= (1u64 << (last % 64 + 1)) - 1;
            }
            acc ^= key_word & m;
        }
        acc.count_ones() % 2 == 1
    }

    /// Appends the original indices of positions `lo..hi` to `out`, in order.
    fn originals(&self, lo: u32, hi: u32, out: &mut Vec<u32>) {
        let n_selected = self.n_selected();
        for (selected, from, to) in [(true, lo, hi.min(n_selected)), (false, lo.max(n_selected), hi)] {
            if from >= to {
                continue;
            }
            let base = if selected { 0 } else { n_selected };
            let mut remaining = (to - from) as usize;
            let start = self.select(from - base, selected);
            let mut w = start as usize / 64;
            let mut word = self.word(w, selected) & (u64::MAX << (start % 64));
            while remaining > 0 {
                while word == 0 {
                    w += 1;
                    word = self.word(w, selected);
                }
                out.push(64 * w as u32 + word.trailing_zeros());
                word &= word - 1;
                remaining -= 1;
            }
        }
    }
}

/// The pass orders for one seed and key length, each computed once on first use and shareable
/// (through an `Arc`, across threads) by every frame reconciled with that seed.
pub struct CascadeShuffles {
    seed: [u8; 32],
    n_bits: usize,
    orders: Vec<OnceLock<PassOrder>>,
}

impl CascadeShuffles {
    /// The shuffles of `seed` for keys of `n_bits` bits.
    ///
    /// Panics when `n_bits` does not fit in a `u32` (Cascade positions are 32-bit).
    pub fn new(seed: [u8; 32], n_bits: usize) -> Self {
        assert!(u32::try_from(n_bits).is_ok(), "cascade keys are shorter than 2^32 bits");
        Self { seed, n_bits, orders: (0..N_PASSES).map(|_| OnceLock::new()).collect() }
    }

    /// Length of the keys these shuffles are for, in bits.
    pub fn n_bits(&self) -> usize {
        self.n_bits
    }

    /// The order of pass `pass` (below [`N_PASSES`]).
    fn order(&self, pass: u32) -> &PassOrder {
        self.orders[pass as usize].get_or_init(|| PassOrder::new(&self.seed, pass, self.n_bits))
    }

    /// `key` in the order of pass `pass` (a Fisher-Yates pass; None for a split pass, which
    /// reads the key in place).
    fn shuffled_key(&self, key: &BitVec, pass: u32) -> Option<BitVec> {
        match self.order(pass) {
            PassOrder::Shuffled { perm, .. } => Some(permute_bits(key, perm)),
            PassOrder::Split(_) => None,
        }
    }

    /// Parity of `key` at positions `lo..hi` of pass `pass`, given `shuffled`, the key in the
    /// pass's order for a Fisher-Yates pass.
    fn parity(&self, key: &BitVec, shuffled: Option<&BitVec>, pass: u32, lo: u32, hi: u32) -> bool {
        match (self.order(pass), shuffled) {
            (PassOrder::Split(split), _) => split.parity(key.words(), lo, hi),
            (PassOrder::Shuffled { .. }, Some(bits)) => bits.parity_range(lo as usize, hi as usize),
            (PassOrder::Shuffled { perm, .. }, None) => {
                perm[lo as usize..hi as usize].iter().fold(false, |acc, &i| acc ^ key.get(i as usize))
            }
        }
    }
}

/// Alice's end: answers parity queries about her key and counts what she disclosed.
pub struct CascadeAlice {
    key: BitVec,
    shuffles: Arc<CascadeShuffles>,
    /// Her key in each Fisher-Yates pass's order, built when the pass is first queried.
    shuffled: Vec<Option<BitVec>>,
    leak_bits: u64,
}

impl CascadeAlice {
    /// Alice's end for `key`, with the shuffle seed shared with Bob.
    pub fn new(key: &BitVec, seed: [u8; 32]) -> Self {
        Self::with_shuffles(key, Arc::new(CascadeShuffles::new(seed, key.len())))
    }

    /// Alice's end for `key` with shuffles shared with other frames of the same seed.
    ///
    /// Panics when the shuffles are for another key length (a programming error).
    pub fn with_shuffles(key: &BitVec, shuffles: Arc<CascadeShuffles>) -> Self {
        assert_eq!(shuffles.n_bits(), key.len(), "cascade shuffles are for another key length");
        Self { key: key.clone(), shuffles, shuffled: vec![None; N_PASSES as usize], leak_bits: 0 }
    }

    /// Answers a batch of queries, one parity per query in order; every answered bit counts as
    /// disclosed (leak). A batch with any invalid query is refused whole and discloses nothing.
    pub fn answer(&mut self, queries: &[ParityQuery]) -> Result<Vec<bool>, CascadeError> {
        for q in queries {
            self.check(q)?;
        }
        let parities = queries.iter().map(|q| self.parity(q)).collect();
        self.leak_bits += queries.len() as u64;
        Ok(parities)
    }

    /// Number of parities answered so far, in bits.
    pub fn leak_bits(&self) -> u64 {
        self.leak_bits
    }

    fn check(&self, q: &ParityQuery) -> Result<(), CascadeError> {
        let n_bits = self.key.len();
        if q.pass >= N_PASSES {
            return Err(CascadeError::PassOutOfRange { pass: q.pass, n_passes: N_PASSES });
        }
        if q.start >= q.end || q.end as usize > n_bits {
            return Err(CascadeError::BadRange { start: q.start, end: q.end, n_bits });
        }
        Ok(())
    }

    /// Alice's parity for a checked query (not counted).
    fn parity(&mut self, q: &ParityQuery) -> bool {
        let (key, shuffles) = (&self.key, &self.shuffles);
        let pass = q.pass as usize;
        if self.shuffled[pass].is_none() {
            self.shuffled[pass] = shuffles.shuffled_key(key, q.pass);
        }
        shuffles.parity(key, self.shuffled[pass].as_ref(), q.pass, q.start, q.end)
    }
}

/// "No child yet" marker of a tree node.
const NO_CHILD: u32 = u32::MAX;

/// One node of a block's search tree: a range of a pass's order and what Bob knows of Alice's
/// parity of it. The children, once created, are the two nodes at `left` and `left + 1`.
#[derive(Debug, Clone, Copy)]
struct Node {
    lo: u32,
    hi: u32,
    left: u32,
    /// Alice's parity, when known.
    alice: Option<bool>,
}

impl Node {
    fn new(lo: u32, hi: u32) -> Self {
        Self { lo, hi, left: NO_CHILD, alice: None }
    }
}

/// Bob's state for one started pass.
struct PassState {
    block_size: usize,
    n_blocks: usize,
    n_bits: usize,
    /// Bob's current key in this pass's order (Fisher-Yates passes; a split pass reads Bob's key
    /// in place).
    bits: Option<BitVec>,
    /// The search trees; node i < n_blocks is the root (whole range) of block i.
    nodes: Vec<Node>,
    /// Per block: Bob's current parity.
    bob_block_parity: Vec<bool>,
    /// Per block: a search is running on it.
    searching: Vec<bool>,
    /// Blocks whose parity may have changed since they were last checked.
    dirty: Vec<u32>,
}

impl PassState {
    fn block_range(&self, block: usize) -> (u32, u32) {
        let start = block * self.block_size;
        let end = (start + self.block_size).min(self.n_bits);
        (start as u32, end as u32)
    }

    /// True when block `block`'s parity is known to differ between Alice and Bob.
    fn block_is_odd(&self, block: usize) -> bool {
        self.nodes[block].alice.is_some_and(|a| a != self.bob_block_parity[block])
    }
}

/// A binary search in progress on `node` of pass `pass`, whose range is known to hold an odd
/// number of errors (as of when the search last advanced).
#[derive(Debug, Clone, Copy)]
struct Search {
    pass: u32,
    block: u32,
    node: u32,
}

/// What one search does next.
enum Advance {
    /// It needs Alice's parity of this node of its pass.
    Ask(u32),
    /// It narrowed its range to the single erroneous position given.
    Found(u32),
    /// Its range is no longer odd; its block must be checked again.
    Dropped,
}

/// Bob's estimate of where the remaining errors are (see "Weighted splits" in the module docs).
struct ErrorDensity {
    /// Per class: the error probability of a bit of that class. Classes 0 to
    /// [`MAX_TABLE_CORRECTIONS`] are the uncorrected bits of a pass-1 block with that many
    /// corrections (floored at a tiny positive number); [`CORRECTED`] weighs exactly 0.
    per_class: [f32; 256],
    /// Per pass-1 block: the number of corrections made in it.
    corrections: Vec<u32>,
    /// Per original bit: its class (one byte a bit, so that the table costs a quarter of a
    /// per-bit probability).
    class: Vec<u8>,
}

/// The class of a corrected bit (see [`ErrorDensity`]).
const CORRECTED: u8 = u8::MAX;
const _: () = assert!(MAX_TABLE_CORRECTIONS < CORRECTED as usize);

impl ErrorDensity {
    fn new(qber: f64, k1: usize, n_bits: usize) -> Self {
        let mut per_class = [0.0f32; 256];
        for (c, density) in residual_error_density(qber, k1).into_iter().enumerate() {
            per_class[c] = density;
        }
        Self { per_class, corrections: vec![0; n_bits.div_ceil(k1.max(1))], class: vec![0; n_bits] }
    }

    /// The current error probability of original bit `i`.
    #[inline]
    fn weight(&self, i: u32) -> f32 {
        self.per_class[usize::from(self.class[i as usize])]
    }
}

/// Per number of corrections c (0 to [`MAX_TABLE_CORRECTIONS`]): the probability that an
/// uncorrected bit of a `k`-bit block with c corrections and even parity (as Alice's) is wrong,
/// E[T - c | T >= c, T = c mod 2] / (k - c) with T ~ Binomial(k, q).
fn residual_error_density(q: f64, k: usize) -> Vec<f32> {
    let q = q.clamp(1e-6, 0.5);
    // Binomial pmf by the ratio recurrence, in logs to survive k up to thousands.
    let mut ln_pmf = Vec::with_capacity(k + 1);
    let mut ln = k as f64 * (1.0 - q).ln();
    ln_pmf.push(ln);
    for t in 0..k {
        ln += ((k - t) as f64 / (t + 1) as f64).ln() + (q / (1.0 - q)).ln();
        ln_pmf.push(ln);
    }
    let max_ln = ln_pmf.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let pmf: Vec<f64> = ln_pmf.iter().map(|l| (l - max_ln).exp()).collect();
    (0..=MAX_TABLE_CORRECTIONS)
        .map(|c| {
            if c >= k {
                return MIN_DENSITY;
            }
            let (mut mass, mut residual) = (0.0, 0.0);
            for t in (c..=k).step_by(2) {
                mass += pmf[t];
                residual += (t - c) as f64 * pmf[t];
            }
            let density = if mass > 0.0 { residual / mass / (k - c) as f64 } else { 0.0 };
            (density as f32).max(MIN_DENSITY)
        })
        .collect()
}

/// Bob's end: drives the protocol over his noisy key.
pub struct CascadeBob {
    key: BitVec,
    shuffles: Arc<CascadeShuffles>,
    block_sizes: Vec<usize>,
    passes: Vec<PassState>,
    searches: Vec<Search>,
    /// The batch last returned by `next_queries` and not yet answered.
    outstanding: Option<Vec<ParityQuery>>,
    /// For each query of the outstanding batch: (pass, node) its answer belongs to.
    outstanding_nodes: Vec<(u32, u32)>,
    /// Pass whose top-level block parities the outstanding batch asks for.
    initialising_pass: Option<usize>,
    /// Alice's parity of her whole key, known after the first pass's block parities.
    total_parity: Option<bool>,
    density: ErrorDensity,
    finished: bool,
    leak_bits: u64,
    leak_by_pass: Vec<u64>,
    n_corrected: u64,
    round_trips: u32,
    /// Reused buffer for the original indices of a range being split.
    scratch: Vec<u32>,
}

impl CascadeBob {
    /// Bob's end for his `noisy_key`, with his QBER estimate (fraction, used only to pick block
    /// sizes and split points) and the shuffle seed shared with Alice.
    ///
    /// Panics when the key has 2^32 bits or more.
    pub fn new(noisy_key: BitVec, qber_estimate: f64, seed: [u8; 32]) -> Self {
        let shuffles = Arc::new(CascadeShuffles::new(seed, noisy_key.len()));
        Self::with_shuffles(noisy_key, qber_estimate, shuffles)
    }

    /// Bob's end with shuffles shared with other frames of the same seed (see
    /// [`MultiCascadeBob`]).
    ///
    /// Panics when the shuffles are for another key length (a programming error).
    pub fn with_shuffles(noisy_key: BitVec, qber_estimate: f64, shuffles: Arc<CascadeShuffles>) -> Self {
        let sizes = block_sizes(qber_estimate, noisy_key.len());
        Self::with_schedule(noisy_key, qber_estimate, shuffles, sizes)
    }

    /// Bob's end with an explicit block size per pass (one to [`N_PASSES`] sizes, each clamped
    /// to [1, n]), for schedule studies; [`CascadeBob::new`] uses [`block_sizes`].
    pub fn with_schedule(
        noisy_key: BitVec,
        qber_estimate: f64,
        shuffles: Arc<CascadeShuffles>,
        block_sizes: Vec<usize>,
    ) -> Self {
        let n_bits = noisy_key.len();
        assert_eq!(shuffles.n_bits(), n_bits, "cascade shuffles are for another key length");
        assert!(!block_sizes.is_empty() && block_sizes.len() <= N_PASSES as usize, "1 to 14 passes");
        let block_sizes: Vec<usize> = block_sizes.into_iter().map(|k| k.clamp(1, n_bits.max(1))).collect();
        Self {
            density: ErrorDensity::new(clamped_qber(qber_estimate), block_sizes[0], n_bits),
            block_sizes,
            finished: n_bits == 0,
            key: noisy_key,
            shuffles,
            passes: Vec::new(),
            searches: Vec::new(),
            outstanding: None,
            outstanding_nodes: Vec::new(),
            initialising_pass: None,
            total_parity: None,
            leak_bits: 0,
            leak_by_pass: Vec::new(),
            n_corrected: 0,
            round_trips: 0,
            scratch: Vec::new(),
        }
    }

    /// The next batch of queries (all binary searches that can run at the same time are batched
    /// together, to minimise round trips), or None when reconciliation is finished. Until the
    /// batch is answered through [`CascadeBob::receive`], calling this again returns the same
    /// batch.
    pub fn next_queries(&mut self) -> Option<Vec<ParityQuery>> {
        if let Some(batch) = &self.outstanding {
            return Some(batch.clone());
        }
        loop {
            if self.finished {
                return None;
            }
            let nodes = self.run_searches();
            if !nodes.is_empty() {
                return Some(self.send(nodes));
            }
            // Nothing left to search in the started passes: start the next pass.
            if self.passes.len() == self.block_sizes.len() {
                self.finished = true;
                return None;
            }
            let nodes = self.begin_pass();
            if !nodes.is_empty() {
                self.initialising_pass = Some(self.passes.len() - 1);
                return Some(self.send(nodes));
            }
            self.end_pass_initialisation(self.passes.len() - 1);
        }
    }

    /// Feeds Alice's answers to the batch last returned by [`CascadeBob::next_queries`], in the
    /// same order. A batch of the wrong size is refused and stays outstanding.
    pub fn receive(&mut self, parities: &[bool]) -> Result<(), CascadeError> {
        let Some(queries) = self.outstanding.take() else {
            return Err(CascadeError::NoOutstandingQueries);
        };
        if queries.len() != parities.len() {
            let expected = queries.len();
            self.outstanding = Some(queries);
            return Err(CascadeError::AnswerCountMismatch { expected, got: parities.len() });
        }
        for (&(pass, node), &parity) in self.outstanding_nodes.iter().zip(parities) {
            self.passes[pass as usize].nodes[node as usize].alice = Some(parity);
            self.leak_by_pass[pass as usize] += 1;
        }
        self.outstanding_nodes.clear();
        self.leak_bits += parities.len() as u64;
        if let Some(pass) = self.initialising_pass.take() {
            self.end_pass_initialisation(pass);
        }
        Ok(())
    }

    /// Number of parities received from Alice so far, in bits.
    pub fn leak_bits(&self) -> u64 {
        self.leak_bits
    }

    /// Parities received so far per started pass, in bits (for schedule studies).
    pub fn leak_by_pass(&self) -> &[u64] {
        &self.leak_by_pass
    }

    /// True once [`CascadeBob::next_queries`] has returned None.
    pub fn is_finished(&self) -> bool {
        self.finished && self.outstanding.is_none()
    }

    /// Bob's key and counters; call it once [`CascadeBob::next_queries`] has returned None.
    pub fn finish(self) -> CascadeOutcome {
        CascadeOutcome {
            key: self.key,
            leak_bits: self.leak_bits,
            n_corrected: self.n_corrected,
            round_trips: self.round_trips,
        }
    }

    /// Records `nodes` as the outstanding batch and returns its queries.
    fn send(&mut self, nodes: Vec<(u32, u32)>) -> Vec<ParityQuery> {
        self.round_trips += 1;
        let queries: Vec<ParityQuery> = nodes
            .iter()
            .map(|&(pass, node)| {
                let n = self.passes[pass as usize].nodes[node as usize];
                ParityQuery { pass, start: n.lo, end: n.hi }
            })
            .collect();
        self.outstanding_nodes = nodes;
        self.outstanding = Some(queries.clone());
        queries
    }

    /// Starts the next pass; returns the (pass, node) of the top-level block parities that cannot
    /// be deduced.
    fn begin_pass(&mut self) -> Vec<(u32, u32)> {
        let pass = self.passes.len();
        let n_bits = self.key.len();
        let block_size = self.block_sizes[pass];
        let bits = self.shuffles.shuffled_key(&self.key, pass as u32);
        let n_blocks = n_bits.div_ceil(block_size);
        let mut state = PassState {
            block_size,
            n_blocks,
            n_bits,
            bob_block_parity: Vec::with_capacity(n_blocks),
            bits,
            nodes: Vec::with_capacity(2 * n_blocks),
            searching: vec![false; n_blocks],
            dirty: Vec::new(),
        };
        for block in 0..n_blocks {
            let (start, end) = state.block_range(block);
            state.nodes.push(Node::new(start, end));
            let parity = self.shuffles.parity(&self.key, state.bits.as_ref(), pass as u32, start, end);
            state.bob_block_parity.push(parity);
        }
        self.passes.push(state);
        self.leak_by_pass.push(0);
        // After the first pass the total parity is known: the last block's parity is deduced.
        let n_asked = if self.total_parity.is_some() { n_blocks - 1 } else { n_blocks };
        (0..n_asked as u32).map(|block| (pass as u32, block)).collect()
    }

    /// Once a pass's block parities are known: deduces the missing one (or records the total
    /// parity after the first pass) and marks every block for checking.
    fn end_pass_initialisation(&mut self, pass: usize) {
        let state = &mut self.passes[pass];
        let mut xor_known = false;
        for block in 0..state.n_blocks {
            if let Some(parity) = state.nodes[block].alice {
                xor_known ^= parity;
            }
        }
        match self.total_parity {
            None => self.total_parity = Some(xor_known),
            Some(total) => {
                let last = state.n_blocks - 1;
                if state.nodes[last].alice.is_none() {
                    state.nodes[last].alice = Some(total ^ xor_known);
                }
            }
        }
        state.dirty = (0..state.n_blocks as u32).collect();
    }

    /// Advances every search as far as known parities allow, applies the corrections found and
    /// starts the searches that became possible, until all running searches wait for Alice.
    /// Returns the (pass, node) they need (empty when no search is left).
    fn run_searches(&mut self) -> Vec<(u32, u32)> {
        loop {
            self.start_searches();
            let mut asks = Vec::new();
            let mut found = Vec::new();
            let mut changed = false;
            let mut idx = 0;
            while idx < self.searches.len() {
                let mut search = self.searches[idx];
                match self.advance(&mut search) {
                    Advance::Ask(node) => {
                        self.searches[idx] = search;
                        asks.push((search.pass, node));
                        idx += 1;
                    }
                    outcome => {
                        changed = true;
                        self.searches.swap_remove(idx);
                        let state = &mut self.passes[search.pass as usize];
                        state.searching[search.block as usize] = false;
                        match outcome {
                            Advance::Found(position) => found.push((search.pass, search.node, position)),
                            _ => state.dirty.push(search.block),
                        }
                    }
                }
            }
            for (pass, node, position) in found {
                // Another search of this round may have fixed the same bit already.
                let alice = self.passes[pass as usize].nodes[node as usize].alice;
                let original = self.shuffles.order(pass).original(position) as usize;
                if alice.is_some_and(|a| a != self.key.get(original)) {
                    self.flip(original);
                }
            }
            if !changed {
                return asks;
            }
        }
    }

    /// Starts searches on the odd dirty blocks of the earliest pass that has any, as in the
    /// sequential protocol where the smaller blocks of earlier passes are searched first: never in
    /// a pass after the earliest pass with a running search (a cheap search there may be about
    /// to correct the very error that makes the later block odd, or its partner). Blocks of
    /// later passes stay dirty; dirty blocks found even are forgotten (a later flip inside them
    /// marks them again). Letting unrelated blocks of later passes start early would save round
    /// trips on long keys but costs 0.3 to 0.5 % of leak: their searches then hunt errors that
    /// the cascade effect would have handed to a cheaper, earlier pass.
    fn start_searches(&mut self) {
        let limit = self.searches.iter().map(|s| s.pass as usize).min().unwrap_or(self.passes.len().saturating_sub(1));
        for pass in 0..self.passes.len().min(limit + 1) {
            let state = &mut self.passes[pass];
            let mut started = false;
            for block in std::mem::take(&mut state.dirty) {
                let b = block as usize;
                if state.searching[b] || !state.block_is_odd(b) {
                    continue;
                }
                state.searching[b] = true;
                self.searches.push(Search { pass: pass as u32, block, node: block });
                started = true;
            }
            if started {
                return;
            }
        }
    }

    /// Moves one search down its binary tree while the parities it needs are known.
    fn advance(&mut self, search: &mut Search) -> Advance {
        let pass = search.pass as usize;
        let node = self.passes[pass].nodes[search.node as usize];
        // Invariant: a search's node always has a known Alice parity.
        match node.alice {
            Some(alice) if alice != self.bob_parity(pass, &node) => {}
            _ => return Advance::Dropped,
        }
        loop {
            let id = search.node as usize;
            let node = self.passes[pass].nodes[id];
            if node.hi - node.lo == 1 {
                return Advance::Found(node.lo);
            }
            let left = if node.left == NO_CHILD { self.split(pass, id) } else { node.left as usize };
            let alice_node = node.alice.expect("a searched node has a known alice parity");
            let (l, r) = (self.passes[pass].nodes[left], self.passes[pass].nodes[left + 1]);
            let alice_left = match (l.alice, r.alice) {
                (Some(a), _) => a,
                (None, Some(a)) => alice_node ^ a,
                // A side whose bits were all corrected holds no error: Alice's parity there is
                // Bob's, so nothing is asked (and nothing disclosed).
                (None, None) if self.known_correct(pass, l.lo, l.hi) => self.bob_parity(pass, &l),
                (None, None) if self.known_correct(pass, r.lo, r.hi) => alice_node ^ self.bob_parity(pass, &r),
                (None, None) => return Advance::Ask(left as u32),
            };
            let state = &mut self.passes[pass];
            state.nodes[left].alice = Some(alice_left);
            state.nodes[left + 1].alice = Some(alice_node ^ alice_left);
            search.node = if self.bob_parity(pass, &l) != alice_left { left as u32 } else { left as u32 + 1 };
        }
    }

    /// True when every bit of positions `lo..hi` of pass `pass` is known to be right: each was
    /// corrected (a binary search ends on a bit that differs from Alice's, so the flipped bit
    /// now equals hers). Only short ranges are checked.
    fn known_correct(&self, pass: usize, lo: u32, hi: u32) -> bool {
        if hi - lo > KNOWN_CORRECT_MAX_BITS {
            return false;
        }
        let order = self.shuffles.order(pass as u32);
        (lo..hi).all(|position| self.density.class[order.original(position) as usize] == CORRECTED)
    }

    /// Bob's current parity of `node`'s range of pass `pass`.
    fn bob_parity(&self, pass: usize, node: &Node) -> bool {
        self.shuffles.parity(&self.key, self.passes[pass].bits.as_ref(), pass as u32, node.lo, node.hi)
    }

    /// Creates the two children of node `id` of pass `pass` and returns the left one's index.
    fn split(&mut self, pass: usize, id: usize) -> usize {
        let node = self.passes[pass].nodes[id];
        let mid = self.split_point(pass, node.lo, node.hi);
        let state = &mut self.passes[pass];
        let left = state.nodes.len();
        state.nodes.push(Node::new(node.lo, mid));
        state.nodes.push(Node::new(mid, node.hi));
        state.nodes[id].left = left as u32;
        left
    }

    /// Where to split `lo..hi` (at least 2 bits) of pass `pass`: at the weighted median of the
    /// error probabilities for short ranges (see the module documentation), in the middle
    /// otherwise or when the weights say nothing.
    fn split_point(&mut self, pass: usize, lo: u32, hi: u32) -> u32 {
        /// Weights summed per chunk first, so that the sums run in parallel.
        const CHUNK: usize = 16;
        let half = lo + (hi - lo) / 2;
        let weighted = pass > 0 || self.density.corrections[lo as usize / self.block_sizes[0]] > 0;
        if !weighted || hi - lo > WEIGHTED_SPLIT_MAX_BITS {
            return half;
        }
        let mut originals = std::mem::take(&mut self.scratch);
        originals.clear();
        self.shuffles.order(pass as u32).originals(lo, hi, &mut originals);
        let density = &self.density;
        let chunk_sums: Vec<f32> =
            originals.chunks(CHUNK).map(|chunk| chunk.iter().map(|&i| density.weight(i)).sum()).collect();
        let total: f32 = chunk_sums.iter().sum();
        let mut cut = (half - lo) as usize;
        if total > 0.0 {
            let mut acc = 0.0f32;
            let mut chunk = 0;
            while chunk + 1 < chunk_sums.len() && 2.0 * (acc + chunk_sums[chunk]) < total {
                acc += chunk_sums[chunk];
                chunk += 1;
            }
            // The first cut where the left mass reaches half, or the one before it if closer.
            for (j, &i) in originals.iter().enumerate().skip(chunk * CHUNK) {
                let before = acc;
                acc += density.weight(i);
                if 2.0 * acc >= total || j + 1 == originals.len() {
                    let take_before = j > 0 && total - 2.0 * before < 2.0 * acc - total;
                    cut = if take_before { j } else { j + 1 };
                    break;
                }
            }
        }
        self.scratch = originals;
        lo + (cut as u32).clamp(1, hi - lo - 1)
    }

    /// Flips original bit `original` in Bob's key and in every started pass, marking the block
    /// that holds it in each pass for checking (the cascade effect), and updates the error
    /// density of its pass-1 block.
    fn flip(&mut self, original: usize) {
        self.key.flip(original);
        self.n_corrected += 1;
        for (pass, state) in self.passes.iter_mut().enumerate() {
            let position = self.shuffles.order(pass as u32).position(original as u32) as usize;
            if let Some(bits) = &mut state.bits {
                bits.flip(position);
            }
            let block = position / state.block_size;
            state.bob_block_parity[block] ^= true;
            state.dirty.push(block as u32);
        }
        // Pass 1 has started: a flip happens only after a search, which needs pass 1's parities.
        let k1 = self.block_sizes[0];
        let block = self.shuffles.order(0).position(original as u32) as usize / k1;
        let density = &mut self.density;
        density.corrections[block] += 1;
        let c = (density.corrections[block] as usize).min(MAX_TABLE_CORRECTIONS) as u8;
        density.class[original] = CORRECTED;
        let (start, end) = (block * k1, ((block + 1) * k1).min(self.key.len()));
        let PassOrder::Shuffled { perm, .. } = self.shuffles.order(0) else {
            unreachable!("pass 1 is always a Fisher-Yates pass (first_split_pass >= 3)")
        };
        for &i in &perm[start..end] {
            let class = &mut density.class[i as usize];
            if *class != CORRECTED {
                *class = c;
            }
        }
    }
}

/// Runs both ends in memory (for tests, simulation and benches) and returns Bob's outcome; its
/// `leak_bits` equals what Alice counted.
pub fn reconcile_in_memory(alice_key: &BitVec, bob_key: BitVec, qber_estimate: f64, seed: [u8; 32]) -> CascadeOutcome {
    let mut alice = CascadeAlice::new(alice_key, seed);
    let mut bob = CascadeBob::new(bob_key, qber_estimate, seed);
    while let Some(queries) = bob.next_queries() {
        // Bob only asks valid ranges of passes below N_PASSES, so Alice always answers.
        let parities = alice.answer(&queries).expect("bob's queries are always valid");
        bob.receive(&parities).expect("alice answers every query of the batch");
    }
    debug_assert_eq!(bob.leak_bits(), alice.leak_bits());
    bob.finish()
}

/// Bob's end of a multi-frame exchange: several frames reconciled at once, their query batches
/// merged so that each round trip serves every frame that still has questions.
///
/// All frames use one shuffle seed (the shuffles are computed once per key length and shared);
/// the batch is the concatenation, in frame order, of each unfinished frame's batch, every query
/// tagged with its frame index.
pub struct MultiCascadeBob {
    frames: Vec<CascadeBob>,
    /// Per frame: its length before padding, in bits.
    lengths: Vec<usize>,
    /// Per frame: the number of queries it has in the outstanding batch.
    outstanding_counts: Option<Vec<usize>>,
    round_trips: u32,
}

impl MultiCascadeBob {
    /// Bob's end for `noisy_keys` (any lengths), one QBER estimate for all, and the shuffle seed
    /// shared with Alice. Every frame is reconciled at the length of the longest one, shorter
    /// frames padded with zeros (see [`pad_frames`]).
    ///
    /// Panics when a key has 2^32 bits or more, or when there are 2^32 frames or more.
    pub fn new(noisy_keys: Vec<BitVec>, qber_estimate: f64, seed: [u8; 32]) -> Self {
        assert!(u32::try_from(noisy_keys.len()).is_ok(), "fewer than 2^32 frames");
        let lengths: Vec<usize> = noisy_keys.iter().map(BitVec::len).collect();
        let (padded, shuffles) = pad_frames(noisy_keys, seed);
        let frames =
            padded.into_iter().map(|key| CascadeBob::with_shuffles(key, qber_estimate, shuffles.clone())).collect();
        Self { frames, lengths, outstanding_counts: None, round_trips: 0 }
    }

    /// Number of frames.
    pub fn n_frames(&self) -> usize {
        self.frames.len()
    }

    /// The next merged batch, or None when every frame is finished. Until the batch is answered
    /// through [`MultiCascadeBob::receive`], calling this again returns the same batch.
    pub fn next_queries(&mut self) -> Option<Vec<FrameParityQuery>> {
        let mut batch = Vec::new();
        let mut counts = Vec::with_capacity(self.frames.len());
        for (frame, bob) in self.frames.iter_mut().enumerate() {
            let queries = bob.next_queries().unwrap_or_default();
            counts.push(queries.len());
            batch.extend(queries.iter().map(|q| FrameParityQuery {
                frame: frame as u32,
                pass: q.pass,
                start: q.start,
                end: q.end,
            }));
        }
        if batch.is_empty() {
            return None;
        }
        if self.outstanding_counts.is_none() {
            self.round_trips += 1;
        }
        self.outstanding_counts = Some(counts);
        Some(batch)
    }

    /// Feeds Alice's answers to the batch last returned by [`MultiCascadeBob::next_queries`], in
    /// the same order. A batch of the wrong size is refused and stays outstanding.
    pub fn receive(&mut self, parities: &[bool]) -> Result<(), CascadeError> {
        let Some(counts) = self.outstanding_counts.take() else {
            return Err(CascadeError::NoOutstandingQueries);
        };
        let expected: usize = counts.iter().sum();
        if expected != parities.len() {
            self.outstanding_counts = Some(counts);
            return Err(CascadeError::AnswerCountMismatch { expected, got: parities.len() });
        }
        let mut offset = 0;
        for (bob, &count) in self.frames.iter_mut().zip(&counts) {
            if count > 0 {
                bob.receive(&parities[offset..offset + count])?;
                offset += count;
            }
        }
        Ok(())
    }

    /// Parities received so far over all frames, in bits.
    pub fn leak_bits(&self) -> u64 {
        self.frames.iter().map(CascadeBob::leak_bits).sum()
    }

    /// Number of merged batches sent so far, i.e. round trips of the exchange.
    pub fn round_trips(&self) -> u32 {
        self.round_trips
    }

    /// Each frame's outcome, in frame order; call it once [`MultiCascadeBob::next_queries`] has
    /// returned None. A frame's `round_trips` counts the batches it took part in.
    pub fn finish(self) -> Vec<CascadeOutcome> {
        self.frames
            .into_iter()
            .zip(self.lengths)
            .map(|(bob, len)| {
                let mut outcome = bob.finish();
                if outcome.key.len() != len {
                    outcome.key = outcome.key.slice(0, len);
                }
                outcome
            })
            .collect()
    }
}

/// The frames of a multi-frame exchange, each padded with zero bits at its end to the length of
/// the longest, and the one set of shuffles they share.
///
/// Both ends pad alike, so the padding bits agree and never hold an error; a parity over them
/// discloses nothing more than one over the frame's own bits. Sharing one length matters for
/// memory: a block cut into frames of two lengths (n and n + 1 bits, see the link's
/// `cascade_frames`) would otherwise build two sets of shuffles, about 40 bytes per bit each.
fn pad_frames(keys: Vec<BitVec>, seed: [u8; 32]) -> (Vec<BitVec>, Arc<CascadeShuffles>) {
    let n_bits = keys.iter().map(BitVec::len).max().unwrap_or(0);
    let shuffles = Arc::new(CascadeShuffles::new(seed, n_bits));
    let padded = keys
        .into_iter()
        .map(|mut key| {
            while key.len() < n_bits {
                key.push(false);
            }
            key
        })
        .collect();
    (padded, shuffles)
}

/// Alice's end of a multi-frame exchange: answers [`FrameParityQuery`]s about her frames.
pub struct MultiCascadeAlice {
    frames: Vec<CascadeAlice>,
}

impl MultiCascadeAlice {
    /// Alice's end for `keys` (in the frame order Bob uses) and the shuffle seed shared with Bob.
    /// Frames shorter than the longest are padded with zeros, as Bob's (see [`pad_frames`]).
    pub fn new(keys: &[BitVec], seed: [u8; 32]) -> Self {
        let (padded, shuffles) = pad_frames(keys.to_vec(), seed);
        let frames = padded.iter().map(|key| CascadeAlice::with_shuffles(key, shuffles.clone())).collect();
        Self { frames }
    }

    /// Answers a merged batch, one parity per query in order; every answered bit counts as
    /// disclosed for its frame. A batch with any invalid query is refused whole and discloses
    /// nothing.
    pub fn answer(&mut self, queries: &[FrameParityQuery]) -> Result<Vec<bool>, CascadeError> {
        for q in queries {
            let frame = self
                .frames
                .get(q.frame as usize)
                .ok_or(CascadeError::FrameOutOfRange { frame: q.frame, n_frames: self.frames.len() })?;
            frame.check(&q.query())?;
        }
        let parities = queries
            .iter()
            .map(|q| {
                let frame = &mut self.frames[q.frame as usize];
                frame.leak_bits += 1;
                frame.parity(&q.query())
            })
            .collect();
        Ok(parities)
    }

    /// Parities answered so far for frame `frame`, in bits (None for an unknown frame).
    pub fn frame_leak_bits(&self, frame: usize) -> Option<u64> {
        self.frames.get(frame).map(CascadeAlice::leak_bits)
    }

    /// Parities answered so far over all frames, in bits.
    pub fn leak_bits(&self) -> u64 {
        self.frames.iter().map(CascadeAlice::leak_bits).sum()
    }
}

#[cfg(test)]
mod tests;
