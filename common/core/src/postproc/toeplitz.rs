//! Privacy amplification by Toeplitz hashing.
//!
//! The m x n Toeplitz matrix with seed s (n + m - 1 bits) is T[i][j] = s[i - j + n - 1]; random
//! Toeplitz matrices form a 2-universal family (Krawczyk, CRYPTO '94, LNCS 839, p. 129), which the
//! leftover hash lemma turns into a secret key of m bits. Output bit i is
//! y_i = XOR_j s[i - j + n - 1] x_j, that is the coefficient of z^(i + n - 1) in the GF(2)
//! polynomial product S(z) X(z) with S(z) = sum_t s_t z^t and X(z) = sum_j x_j z^j (every pair
//! (t, j) with t + j = i + n - 1 and j < n has 0 <= t < n + m - 1). So the fast paths multiply two
//! bit-packed polynomials and keep m bits of the product, instead of the O(n m) matrix-vector
//! product:
//! * up to [`FFT_THRESHOLD_BITS`] input bits, Karatsuba down to operands of
//!   10 words, multiplied by a 4-bit comb (a software carry-less
//!   multiply), O(n^1.585) word operations;
//! * above, Schönhage's ternary FFT over GF(2)[x] / (x^(2L) + x^L + 1) ([`ternary`]), whose
//!   transforms are only shifts and XORs, O(n log n) word operations for the transforms plus
//!   about n^1.3 for the pointwise products. It computes only the m-bit window, with a cyclic
//!   convolution as short as the seed (the wrap-around lands below the window).
//!
//! Throughput and the measurements behind the thresholds: docs/postprocessing.md.
//!
//! Both are exact GF(2) arithmetic, so the output is bit for bit that of
//! [`toeplitz_hash_reference`] (checked on random inputs by the tests). No `unsafe` and no
//! architecture intrinsics (the workspace forbids them): a number-theoretic transform over a prime
//! field was the other candidate, but exact 0/1 convolutions of 10^6 bits fit at most two bits per
//! 64-bit coefficient, which makes it slower than the ternary FFT's XOR-only butterflies.

use crate::bits::BitVec;

mod ternary;

/// Operand length (64-bit words) at or below which Karatsuba hands over to the schoolbook product
/// (the comb of [`comb_fixed`]), chosen by measurement (docs/postprocessing.md).
const KARATSUBA_THRESHOLD_WORDS: usize = 10;

/// Input length (bits) above which [`toeplitz_hash`] switches from Karatsuba to the ternary FFT
/// (near the measured crossover, docs/postprocessing.md).
pub const FFT_THRESHOLD_BITS: usize = 1 << 13;

/// Multiplies the n-bit `input` by the m x n Toeplitz matrix defined by `seed` (n + m - 1 bits,
/// m = `out_bits`), returning m bits.
///
/// Seed bit convention: T[i][j] = seed[i - j + n - 1], so seed bit 0 is the top-right corner
/// T[0][n - 1]; row 0 reads seed bits n - 1 (column 0) down to 0 (column n - 1), and row m - 1
/// reads seed bits n + m - 2 down to m - 1. Output bit i is
/// XOR_j T[i][j] input[j]. Panics when `seed.len() != n + m - 1` (for n, m > 0): the seed comes
/// from the local shared-randomness source, so a wrong length is a programming error.
pub fn toeplitz_hash(input: &BitVec, seed: &BitVec, out_bits: usize) -> BitVec {
    let n = input.len();
    let m = out_bits;
    if m == 0 {
        return BitVec::new();
    }
    if n == 0 {
        return BitVec::zeros(m);
    }
    assert_eq!(seed.len(), n + m - 1, "toeplitz seed must have n + m - 1 = {} bits", n + m - 1);
    if n > FFT_THRESHOLD_BITS {
        return toeplitz_hash_fft(input, seed, out_bits);
    }
    toeplitz_hash_karatsuba(input, seed, out_bits)
}

/// [`toeplitz_hash`] by Karatsuba, whatever the size (n, m > 0, seed of n + m - 1 bits).
pub fn toeplitz_hash_karatsuba(input: &BitVec, seed: &BitVec, out_bits: usize) -> BitVec {
    let (n, m) = (input.len(), out_bits);
    let product = poly_mul(seed.words(), input.words());
    let n_product_bits = 64 * product.len();
    BitVec::from_words(product, n_product_bits).slice(n - 1, n - 1 + m)
}

/// [`toeplitz_hash`] by the ternary FFT, whatever the size (n, m > 0, seed of n + m - 1 bits).
pub fn toeplitz_hash_fft(input: &BitVec, seed: &BitVec, out_bits: usize) -> BitVec {
    let (n, m) = (input.len(), out_bits);
    let Some(plan) = ternary::Plan::for_window(n + m - 1, n) else {
        return toeplitz_hash_karatsuba(input, seed, out_bits);
    };
    let window = ternary::product_window(seed.words(), n + m - 1, input.words(), n, &plan);
    BitVec::from_words(window, m)
}

/// Bit-by-bit reference implementation for tests (O(n m)): output bit i is the XOR over j of
/// seed[i - j + n - 1] AND input[j]. Same conventions and panics as [`toeplitz_hash`].
pub fn toeplitz_hash_reference(input: &BitVec, seed: &BitVec, out_bits: usize) -> BitVec {
    let n = input.len();
    let m = out_bits;
    if m == 0 {
        return BitVec::new();
    }
    if n == 0 {
        return BitVec::zeros(m);
    }
    assert_eq!(seed.len(), n + m - 1, "toeplitz seed must have n + m - 1 = {} bits", n + m - 1);
    let mut out = BitVec::zeros(m);
    for i in 0..m {
        let mut bit = false;
        for j in 0..n {
            bit ^= seed.get(i + n - 1 - j) & input.get(j);
        }
        out.set(i, bit);
    }
    out
}

/// Carry-less (GF(2)[z]) product of two bit-packed polynomials, word i bit k being the
/// coefficient of z^(64 i + k). The result has `a.len() + b.len()` words.
pub(crate) fn poly_mul(a: &[u64], b: &[u64]) -> Vec<u64> {
    let mut out = vec![0u64; a.len() + b.len()];
    let mut scratch = Vec::new();
    mul_acc(a, b, &mut out, &mut scratch);
    out
}

/// `out[..a.len() + b.len()] ^= a * b` for operands of any lengths: the longer operand is cut
/// into chunks of the shorter one's length, each chunk multiplied by balanced Karatsuba.
fn mul_acc(a: &[u64], b: &[u64], out: &mut [u64], scratch: &mut Vec<u64>) {
    let (long, short) = if a.len() >= b.len() { (a, b) } else { (b, a) };
    if short.is_empty() {
        return;
    }
    let k = short.len();
    let mut product = vec![0u64; 2 * k];
    for (chunk_idx, chunk) in long.chunks(k).enumerate() {
        let offset = chunk_idx * k;
        if chunk.len() == k {
            scratch.resize(scratch_words(k), 0);
            karatsuba(chunk, short, &mut product, scratch);
            for (o, p) in out[offset..offset + 2 * k].iter_mut().zip(&product) {
                *o ^= p;
            }
        } else {
            // The last, shorter chunk: recurse with the roles swapped.
            mul_acc(short, chunk, &mut out[offset..], scratch);
        }
    }
}

/// `out = a * b` (out has 2 n words) for two operands of the same length n, growing `scratch` as
/// [`karatsuba`] needs.
pub(crate) fn karatsuba_equal(a: &[u64], b: &[u64], out: &mut [u64], scratch: &mut Vec<u64>) {
    let need = scratch_words(a.len());
    if scratch.len() < need {
        scratch.resize(need, 0);
    }
    karatsuba(a, b, out, scratch);
}

/// Scratch words [`karatsuba`] needs for operands of `n` words.
fn scratch_words(n: usize) -> usize {
    if n <= KARATSUBA_THRESHOLD_WORDS {
        return 0;
    }
    let half = n.div_ceil(2);
    4 * half + scratch_words(half)
}

/// `out = a * b` (out has 2 n words) for two operands of the same length n, by Karatsuba over
/// GF(2): with a = a0 + z^h a1 and b = b0 + z^h b1,
/// a b = a0 b0 + z^h ((a0 + a1)(b0 + b1) + a0 b0 + a1 b1) + z^(2h) a1 b1.
fn karatsuba(a: &[u64], b: &[u64], out: &mut [u64], scratch: &mut [u64]) {
    let n = a.len();
    debug_assert_eq!(b.len(), n);
    debug_assert_eq!(out.len(), 2 * n);
    if n <= KARATSUBA_THRESHOLD_WORDS {
        schoolbook(a, b, out);
        return;
    }
    let h = n.div_ceil(2);
    let l = n - h;
    let (a0, a1) = a.split_at(h);
    let (b0, b1) = b.split_at(h);
    {
        let (low, high) = out.split_at_mut(2 * h);
        karatsuba(a0, b0, low, scratch);
        karatsuba(a1, b1, high, scratch);
    }
    let (sum_a, rest) = scratch.split_at_mut(h);
    let (sum_b, rest) = rest.split_at_mut(h);
    let (middle, rest) = rest.split_at_mut(2 * h);
    sum_a.copy_from_slice(a0);
    sum_b.copy_from_slice(b0);
    for i in 0..l {
        sum_a[i] ^= a1[i];
        sum_b[i] ^= b1[i];
    }
    karatsuba(sum_a, sum_b, middle, rest);
    for i in 0..2 * h {
        middle[i] ^= out[i];
    }
    for i in 0..2 * l {
        middle[i] ^= out[2 * h + i];
    }
    // middle has degree < 128 h - 1, and h + 2 h <= 2 n because h <= l + 1 <= 2 l for n >= 2.
    for i in 0..2 * h {
        out[h + i] ^= middle[i];
    }
}

/// `out = a * b` for two operands of the same length, at most [`KARATSUBA_THRESHOLD_WORDS`]
/// words (`out` has twice as many), by [`comb_fixed`] instantiated for that length.
fn schoolbook(a: &[u64], b: &[u64], out: &mut [u64]) {
    macro_rules! fixed {
        ($($n:literal)*) => {
            match a.len() {
                $($n => comb_fixed::<$n, { $n + 1 }, { 2 * $n }>(a, b, out),)*
                n => unreachable!("schoolbook of {n} words"),
            }
        };
    }
    const _: () = assert!(KARATSUBA_THRESHOLD_WORDS == 10, "instantiate comb_fixed for every length");
    fixed!(1 2 3 4 5 6 7 8 9 10);
}

/// `out = a * b` for two operands of exactly `N` words (`R` = N + 1, `D` = 2 N; a, b and out
/// panic on other lengths) by the left-to-right comb method (López and Dahab, "High-speed
/// software multiplication in F_2^m", INDOCRYPT 2000, LNCS 1977, p. 203) with 4-bit windows: a
/// table of the 16 products `a * t` (t of degree < 4) is built once; then for each nibble
/// position of the words of `b`, from the most significant, every word of `b` XORs the row its
/// nibble selects into the product, which is shifted by 4 bits between positions. Every loop has
/// a length known at compile time (unrolled and vectorized without remainder loops), and the
/// product is accumulated in a local array.
fn comb_fixed<const N: usize, const R: usize, const D: usize>(a: &[u64], b: &[u64], out: &mut [u64]) {
    let a: &[u64; N] = a.try_into().expect("N words");
    let b: &[u64; N] = b.try_into().expect("N words");
    let out: &mut [u64; D] = out.try_into().expect("2 N words");
    let mut table = [[0u64; R]; 16];
    table[1][..N].copy_from_slice(a);
    for bit in 1..4 {
        let mut carry = 0u64;
        for k in 0..N {
            table[1 << bit][k] = (a[k] << bit) | carry;
            carry = a[k] >> (64 - bit);
        }
        table[1 << bit][N] = carry;
    }
    for t in [3usize, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15] {
        let low = t & t.wrapping_neg();
        let (x, y) = (table[t ^ low], table[low]);
        for k in 0..R {
            table[t][k] = x[k] ^ y[k];
        }
    }
    let mut acc = [0u64; D];
    for nibble_offset in (0..16).rev() {
        let shift = 4 * nibble_offset;
        // Even j first, then odd j: consecutive rows then overlap at a whole 16-byte offset, so
        // that vectorized loads find their data in the previous stores (rows one word apart make
        // store-to-load forwarding fail, and took twice as long).
        for parity in 0..2 {
            for j in (parity..N).step_by(2) {
                let row = &table[((b[j] >> shift) & 0xF) as usize];
                let dst: &mut [u64; R] = (&mut acc[j..j + R]).try_into().expect("R words");
                for k in 0..R {
                    dst[k] ^= row[k];
                }
            }
        }
        if nibble_offset > 0 {
            // The product so far has degree below 64 D - 4 nibble_offset: no bit leaves the top
            // word.
            let mut carry = 0u64;
            for w in acc.iter_mut() {
                let next = *w >> 60;
                *w = (*w << 4) | carry;
                carry = next;
            }
        }
    }
    *out = acc;
}

#[cfg(test)]
mod tests;
