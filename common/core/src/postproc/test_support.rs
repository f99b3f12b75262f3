//! Helpers shared by the post-processing tests.

use rand::{Rng, RngCore};
use rand_chacha::ChaCha20Rng;

use crate::bits::BitVec;

/// A uniformly random key of `n_bits` bits.
pub(crate) fn random_key(rng: &mut ChaCha20Rng, n_bits: usize) -> BitVec {
    let words: Vec<u64> = (0..n_bits.div_ceil(64)).map(|_| rng.next_u64()).collect();
    BitVec::from_words(words, n_bits)
}

/// A copy of `key` with exactly `n_errors` bits flipped at distinct random positions.
pub(crate) fn with_errors(rng: &mut ChaCha20Rng, key: &BitVec, n_errors: usize) -> BitVec {
    let mut noisy = key.clone();
    let mut flipped = 0;
    while flipped < n_errors {
        let i = rng.random_range(0..key.len());
        if noisy.get(i) == key.get(i) {
            noisy.flip(i);
            flipped += 1;
        }
    }
    noisy
}
