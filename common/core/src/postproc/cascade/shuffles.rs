//! The per-pass orders of the key, which both ends derive from the shared seed (see "Shuffles"
//! in the parent module's documentation): the generator, the Fisher-Yates shuffles of the first
//! passes, the random splits of the later ones, and the parities of ranges in each order.

use std::sync::OnceLock;

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

use super::schedule::{N_PASSES, first_split_pass};
use crate::bits::BitVec;

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

/// The order of one pass (see "Shuffles" in the parent module's documentation).
pub(super) enum PassOrder {
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
    pub(super) fn original(&self, position: u32) -> u32 {
        match self {
            PassOrder::Shuffled { perm, .. } => perm[position as usize],
            PassOrder::Split(split) => split.original(position),
        }
    }

    /// The position of original bit `original`.
    #[inline]
    pub(super) fn position(&self, original: u32) -> u32 {
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
    pub(super) fn originals(&self, lo: u32, hi: u32, out: &mut Vec<u32>) {
        match self {
            PassOrder::Shuffled { perm, .. } => out.extend_from_slice(&perm[lo as usize..hi as usize]),
            PassOrder::Split(split) => split.originals(lo, hi, out),
        }
    }
}

/// A random split of `n_bits` bits: positions 0..W hold the W bits selected by `mask` in index
/// order, positions W..n the others in index order. Ranks and selects go through per-word counts,
/// so no permutation is stored and a range's parity costs a word operation per 64 bits.
pub(super) struct SplitOrder {
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
    pub(super) fn order(&self, pass: u32) -> &PassOrder {
        self.orders[pass as usize].get_or_init(|| PassOrder::new(&self.seed, pass, self.n_bits))
    }

    /// `key` in the order of pass `pass` (a Fisher-Yates pass; None for a split pass, which
    /// reads the key in place).
    pub(super) fn shuffled_key(&self, key: &BitVec, pass: u32) -> Option<BitVec> {
        match self.order(pass) {
            PassOrder::Shuffled { perm, .. } => Some(permute_bits(key, perm)),
            PassOrder::Split(_) => None,
        }
    }

    /// Parity of `key` at positions `lo..hi` of pass `pass`, given `shuffled`, the key in the
    /// pass's order for a Fisher-Yates pass.
    pub(super) fn parity(&self, key: &BitVec, shuffled: Option<&BitVec>, pass: u32, lo: u32, hi: u32) -> bool {
        match (self.order(pass), shuffled) {
            (PassOrder::Split(split), _) => split.parity(key.words(), lo, hi),
            (PassOrder::Shuffled { .. }, Some(bits)) => bits.parity_range(lo as usize, hi as usize),
            (PassOrder::Shuffled { perm, .. }, None) => {
                perm[lo as usize..hi as usize].iter().fold(false, |acc, &i| acc ^ key.get(i as usize))
            }
        }
    }
}
