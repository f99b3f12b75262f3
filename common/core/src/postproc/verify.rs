//! Verification of the corrected key: a polynomial universal hash over GF(2^64).
//!
//! After error correction Alice and Bob each compute [`poly_hash_tag`] of their block under a fresh
//! hash key drawn from shared randomness *after* the keys are fixed, exchange the tags and keep the
//! block only when [`tags_match`]. Two different blocks of the same length collide with probability
//! at most (L + 1) / 2^64 over the choice of the hash key, L being the number of 64-bit words
//! (the polynomial evaluation hash, Wegman & Carter, J. Comput. Syst. Sci. 22, 265 (1981); Stinson,
//! "Universal hashing and authentication codes", Des. Codes Cryptogr. 4, 369 (1994)). That
//! probability is the `eps_cor` of the key-length formula ([`eps_cor_for`]).

use subtle::ConstantTimeEq;

use crate::bits::BitVec;

/// The low 64 bits of the reduction polynomial x^64 + x^4 + x^3 + x + 1 (irreducible over GF(2)).
const REDUCTION: u64 = 0x1B;

/// Tag of `key` under the polynomial hash with key `hash_key` (an element of GF(2^64), irreducible
/// polynomial x^64 + x^4 + x^3 + x + 1, bit i of a `u64` being the coefficient of x^i).
///
/// The key is split into 64-bit words m_1..m_L (bit j of word i is key bit 64 (i - 1) + j; the last
/// word zero-padded) and the bit length is absorbed as a final word m_{L+1} = len, so that blocks
/// of different lengths never share a polynomial. The tag is
/// `sum_{i=1}^{L+1} m_i * k^(L+1-i)`, computed by Horner's rule. For two different keys of the
/// same length the tags collide for at most L + 1 values of `hash_key` (a nonzero polynomial of
/// degree at most L has at most L roots), hence with probability at most (L + 1) / 2^64.
pub fn poly_hash_tag(key: &BitVec, hash_key: u64) -> u64 {
    let mut acc = 0u64;
    for &word in key.words() {
        acc = gf64_mul(acc, hash_key) ^ word;
    }
    gf64_mul(acc, hash_key) ^ key.len() as u64
}

/// The `eps_cor` (probability that two different blocks pass the check) that the 64-bit tag gives
/// for an `n_bits`-bit block: (L + 1) / 2^64 with L = ceil(n_bits / 64), dimensionless.
pub fn eps_cor_for(n_bits: usize) -> f64 {
    let n_words = n_bits.div_ceil(64) as f64;
    (n_words + 1.0) / 2f64.powi(64)
}

/// True when the two tags are equal, compared in constant time.
///
/// The comparison does not leak through timing how many leading bits agree, so a tag mismatch
/// reveals nothing beyond the single bit "mismatch".
pub fn tags_match(a: u64, b: u64) -> bool {
    a.ct_eq(&b).into()
}

/// Product of `a` and `b` in GF(2^64) = GF(2)[x] / (x^64 + x^4 + x^3 + x + 1).
pub fn gf64_mul(a: u64, b: u64) -> u64 {
    let (lo, hi) = clmul64(a, b);
    reduce(lo, hi)
}

/// Reduces the 128-bit polynomial `hi * x^64 + lo` modulo x^64 + x^4 + x^3 + x + 1.
fn reduce(lo: u64, hi: u64) -> u64 {
    // hi * x^64 = hi * (x^4 + x^3 + x + 1) (mod P); that product has at most 68 bits, and its
    // 4 overflowing bits are folded once more the same way (they then fit in 8 bits).
    let folded = times_reduction(hi);
    let (f_lo, f_hi) = (folded as u64, (folded >> 64) as u64);
    lo ^ f_lo ^ (times_reduction(f_hi) as u64)
}

/// Carry-less product of `a` and x^4 + x^3 + x + 1 (the low part of the reduction polynomial).
#[inline]
fn times_reduction(a: u64) -> u128 {
    let a = a as u128;
    debug_assert_eq!(REDUCTION, 0b1_1011);
    a ^ (a << 1) ^ (a << 3) ^ (a << 4)
}

/// Carry-less 64 x 64 -> 128-bit product, returned as (low word, high word).
///
/// 4-bit windowed: a table of `a * t` for the 16 polynomials t of degree < 4, then one lookup per
/// nibble of `b`, most significant first.
pub(crate) fn clmul64(a: u64, b: u64) -> (u64, u64) {
    let table = nibble_table(a);
    let product = clmul64_with_table(&table, b);
    (product as u64, (product >> 64) as u64)
}

/// The 16 carry-less products `a * t`, t < 16, as 128-bit values.
#[inline]
pub(crate) fn nibble_table(a: u64) -> [u128; 16] {
    let a = a as u128;
    let mut table = [0u128; 16];
    table[1] = a;
    table[2] = a << 1;
    table[4] = a << 2;
    table[8] = a << 3;
    table[3] = table[2] ^ a;
    table[5] = table[4] ^ a;
    table[6] = table[4] ^ table[2];
    table[7] = table[6] ^ a;
    table[9] = table[8] ^ a;
    table[10] = table[8] ^ table[2];
    table[11] = table[10] ^ a;
    table[12] = table[8] ^ table[4];
    table[13] = table[12] ^ a;
    table[14] = table[12] ^ table[2];
    table[15] = table[14] ^ a;
    table
}

/// Carry-less product of the polynomial whose [`nibble_table`] is `table` by `b`, as 128 bits.
#[inline]
pub(crate) fn clmul64_with_table(table: &[u128; 16], b: u64) -> u128 {
    // Two interleaved accumulators (even and odd nibbles) shorten the dependency chain.
    let mut even = 0u128;
    let mut odd = 0u128;
    let mut k = 8;
    while k > 0 {
        k -= 1;
        even = (even << 8) ^ table[((b >> (8 * k)) & 0xF) as usize];
        odd = (odd << 8) ^ table[((b >> (8 * k + 4)) & 0xF) as usize];
    }
    even ^ (odd << 4)
}

#[cfg(test)]
mod tests;
