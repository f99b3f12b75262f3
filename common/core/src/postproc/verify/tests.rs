use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

use super::*;

/// Bit-by-bit reference multiplication in GF(2^64): shift-and-add with a reduction per step.
fn gf64_mul_reference(a: u64, b: u64) -> u64 {
    let mut result = 0u64;
    let mut a = a;
    for i in 0..64 {
        if (b >> i) & 1 == 1 {
            result ^= a;
        }
        let carry = a >> 63;
        a <<= 1;
        if carry == 1 {
            a ^= REDUCTION;
        }
    }
    result
}

fn random_bits(rng: &mut ChaCha20Rng, n_bits: usize) -> BitVec {
    let words: Vec<u64> = (0..n_bits.div_ceil(64)).map(|_| rng.next_u64()).collect();
    BitVec::from_words(words, n_bits)
}

#[test]
fn gf64_mul_matches_reference() {
    let seed = 11;
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    for _ in 0..2000 {
        let (a, b) = (rng.next_u64(), rng.next_u64());
        assert_eq!(gf64_mul(a, b), gf64_mul_reference(a, b), "seed {seed}, a={a:#x} b={b:#x}");
    }
    // Edge values.
    for &(a, b) in &[(0, 0), (1, u64::MAX), (u64::MAX, u64::MAX), (1 << 63, 1 << 63)] {
        assert_eq!(gf64_mul(a, b), gf64_mul_reference(a, b));
    }
}

#[test]
fn gf64_known_products() {
    // x * x^63 = x^64 = x^4 + x^3 + x + 1.
    assert_eq!(gf64_mul(2, 1 << 63), 0x1B);
    // x^63 * x^63 = x^126 = x^62 * x^64 = x^62 (x^4 + x^3 + x + 1) = x^66 + x^65 + x^63 + x^62;
    // x^66 = x^2 * x^64 = x^6 + x^5 + x^3 + x^2 and x^65 = x^5 + x^4 + x^2 + x, so
    // x^66 + x^65 = x^6 + x^4 + x^3 + x; total x^63 + x^62 + x^6 + x^4 + x^3 + x.
    assert_eq!(gf64_mul(1 << 63, 1 << 63), (1 << 63) | (1 << 62) | 0b101_1010);
    // 1 is the identity; multiplication commutes.
    assert_eq!(gf64_mul(1, 0xDEAD_BEEF), 0xDEAD_BEEF);
    assert_eq!(gf64_mul(0x1234, 0x5678), gf64_mul(0x5678, 0x1234));
    // (x + 1)^2 = x^2 + 1 in characteristic 2.
    assert_eq!(gf64_mul(3, 3), 5);
}

#[test]
fn tag_known_values() {
    // One word m_1 = x^63, length 64: tag = m_1 * k + 64. With k = x: x^64 + 64 = 0x1B ^ 0x40.
    let key = BitVec::from_words(vec![1 << 63], 64);
    assert_eq!(poly_hash_tag(&key, 2), 0x1B ^ 0x40);
    // k = 1: tag = m_1 ^ len.
    let key = BitVec::from_words(vec![0xABCD], 64);
    assert_eq!(poly_hash_tag(&key, 1), 0xABCD ^ 64);
    // Two words, k = x: m_1 x^2 + m_2 x + len, with m_1 = 1, m_2 = 1, len = 70: 4 ^ 2 ^ 70.
    let key = BitVec::from_words(vec![1, 1], 70);
    assert_eq!(poly_hash_tag(&key, 2), 4 ^ 2 ^ 70);
    // Empty key: tag = len = 0.
    assert_eq!(poly_hash_tag(&BitVec::new(), 12345), 0);
}

#[test]
fn tag_is_affine_in_the_key() {
    // For equal lengths the tag is a linear function of the words plus a constant (the length
    // term): tag(a ^ b) = tag(a) ^ tag(b) ^ tag(0).
    let seed = 12;
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    for n_bits in [1usize, 63, 64, 65, 1000, 4097] {
        let a = random_bits(&mut rng, n_bits);
        let b = random_bits(&mut rng, n_bits);
        let xor: Vec<u64> = a.words().iter().zip(b.words()).map(|(x, y)| x ^ y).collect();
        let a_xor_b = BitVec::from_words(xor, n_bits);
        let zero = BitVec::zeros(n_bits);
        let k = rng.next_u64();
        assert_eq!(
            poly_hash_tag(&a_xor_b, k),
            poly_hash_tag(&a, k) ^ poly_hash_tag(&b, k) ^ poly_hash_tag(&zero, k),
            "seed {seed}, n_bits {n_bits}"
        );
    }
}

#[test]
fn different_keys_rarely_collide() {
    let seed = 13;
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let n_bits = 10_000;
    let key = random_bits(&mut rng, n_bits);
    for trial in 0..500 {
        let mut other = key.clone();
        // One to three flipped bits: the typical residual error after Cascade.
        for _ in 0..rng.random_range(1..=3) {
            other.flip(rng.random_range(0..n_bits));
        }
        if other == key {
            continue;
        }
        let k = rng.next_u64();
        assert!(!tags_match(poly_hash_tag(&key, k), poly_hash_tag(&other, k)), "seed {seed}, trial {trial}: collision");
        assert!(tags_match(poly_hash_tag(&key, k), poly_hash_tag(&key.clone(), k)));
    }
    // Same words, different lengths: the length word separates them.
    let short = BitVec::from_words(vec![5], 10);
    let long = BitVec::from_words(vec![5], 11);
    assert_ne!(poly_hash_tag(&short, 7), poly_hash_tag(&long, 7));
}

#[test]
fn eps_cor_values() {
    // 1e6 bits = 15625 words: (15625 + 1) / 2^64 = 8.47e-16.
    let eps = eps_cor_for(1_000_000);
    assert!((eps - 15_626.0 / 18_446_744_073_709_551_616.0).abs() < 1e-25, "{eps}");
    assert!(eps < 1e-15);
    assert_eq!(eps_cor_for(0), 1.0 / 2f64.powi(64));
    assert!(eps_cor_for(65) > eps_cor_for(64));
}

/// x^e in GF(2^64), by square-and-multiply: every step is a product of two general elements.
fn gf64_pow_x(e: u64) -> u64 {
    let (mut result, mut base, mut e) = (1u64, 2u64, e);
    while e > 0 {
        if e & 1 == 1 {
            result = gf64_mul(result, base);
        }
        base = gf64_mul(base, base);
        e >>= 1;
    }
    result
}

/// Cross-check of the field arithmetic against a published value. There are no official test
/// vectors for a polynomial hash over GF(2^64), but this field's modulus x^64 + x^4 + x^3 + x + 1
/// is the generator of CRC-64/GO-ISO (ISO 3309; poly 0x1B, init and xorout all ones, reflected
/// in and out), whose catalogued check value for the ASCII string "123456789" is
/// 0xB90956C775A41001 (Greg Cook's CRC catalogue, "reveng"; also in the test suites of CRC
/// libraries). That CRC is the reflection of R = (x^L I(x) + x^64 M(x)) mod P, with L = 72 message
/// bits, I the all-ones initial register and M the message bits in transmission order (each
/// byte least significant bit first) as coefficients of x^(L-1) down to x^0. R is computed here
/// twice with `gf64_mul`: bit-serially (multiplications by x and the fold x^64 = 0x1B) and as a
/// sum of powers of x obtained by square-and-multiply (products of general elements).
#[test]
fn gf64_matches_the_published_crc64_go_iso_check_value() {
    let message = b"123456789";
    let bits: Vec<bool> = message.iter().flat_map(|&byte| (0..8).map(move |k| (byte >> k) & 1 == 1)).collect();
    let n_bits = bits.len() as u64;
    let all_ones = u64::MAX;

    // Bit-serial: R <- R x + b x^64 per message bit, starting from I.
    let mut serial = all_ones;
    for &b in &bits {
        serial = gf64_mul(serial, 2) ^ if b { 0x1B } else { 0 };
    }

    // Sum of powers: I x^L + sum_t m_t x^(64 + L - 1 - t).
    let mut powers = gf64_mul(all_ones, gf64_pow_x(n_bits));
    for (t, &b) in bits.iter().enumerate() {
        if b {
            powers ^= gf64_pow_x(64 + n_bits - 1 - t as u64);
        }
    }

    assert_eq!(serial, powers);
    let crc = serial.reverse_bits() ^ all_ones;
    assert_eq!(crc, 0xB909_56C7_75A4_1001, "CRC-64/GO-ISO check value");
}

/// Square-and-multiply agrees with repeated multiplication by x, and x^(2^64 - 1) = 1 as in any
/// field of 2^64 elements (a consequence of the modulus being irreducible).
#[test]
fn gf64_power_identities() {
    let mut by_x = 1u64;
    for e in 0..300u64 {
        assert_eq!(gf64_pow_x(e), by_x, "x^{e}");
        by_x = gf64_mul(by_x, 2);
    }
    assert_eq!(gf64_pow_x(u64::MAX), 1, "x^(2^64 - 1) = 1 in a field of 2^64 elements");
}
