use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

use super::*;

fn random_bits(rng: &mut ChaCha20Rng, n_bits: usize) -> BitVec {
    let words: Vec<u64> = (0..n_bits.div_ceil(64)).map(|_| rng.next_u64()).collect();
    BitVec::from_words(words, n_bits)
}

/// Schoolbook polynomial product, one bit at a time (reference for `poly_mul`).
fn poly_mul_reference(a: &[u64], b: &[u64]) -> Vec<u64> {
    let mut out = vec![0u64; a.len() + b.len()];
    for i in 0..64 * a.len() {
        if (a[i / 64] >> (i % 64)) & 1 == 0 {
            continue;
        }
        for j in 0..64 * b.len() {
            if (b[j / 64] >> (j % 64)) & 1 == 1 {
                out[(i + j) / 64] ^= 1 << ((i + j) % 64);
            }
        }
    }
    out
}

#[test]
fn fast_matches_reference_on_many_sizes() {
    let seed = 21;
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let sizes: &[(usize, usize)] = &[
        (1, 1),
        (1, 5),
        (5, 1),
        (64, 64),
        (63, 1),
        (65, 65),
        (100, 37),
        (127, 127),
        (128, 64),
        (200, 199),
        (513, 100),
        (1000, 500),
        (1000, 1000),
        (1500, 1),
        (3001, 1234),
        (4096, 2048),
        // The largest input Karatsuba takes.
        (FFT_THRESHOLD_BITS, 300),
    ];
    for &(n, m) in sizes {
        let input = random_bits(&mut rng, n);
        let toeplitz_seed = random_bits(&mut rng, n + m - 1);
        let fast = toeplitz_hash(&input, &toeplitz_seed, m);
        let slow = toeplitz_hash_reference(&input, &toeplitz_seed, m);
        assert_eq!(fast.len(), m);
        assert!(fast == slow, "seed {seed}: n={n} m={m} differ");
    }
}

#[test]
fn reference_follows_the_documented_convention() {
    // n = 2, m = 2: T = [[s1, s0], [s2, s1]]. With seed = (s0, s1, s2) = (1, 0, 0) and
    // input = (x0, x1) = (0, 1): y0 = s1 x0 + s0 x1 = 1, y1 = s2 x0 + s1 x1 = 0.
    let seed = BitVec::from_bools(&[true, false, false]);
    let input = BitVec::from_bools(&[false, true]);
    let expect = BitVec::from_bools(&[true, false]);
    assert_eq!(toeplitz_hash_reference(&input, &seed, 2), expect);
    assert_eq!(toeplitz_hash(&input, &seed, 2), expect);
    // Degenerate sizes.
    assert_eq!(toeplitz_hash(&BitVec::new(), &BitVec::zeros(2), 3), BitVec::zeros(3));
    assert_eq!(toeplitz_hash(&input, &BitVec::zeros(1), 0), BitVec::new());
}

#[test]
fn poly_mul_matches_reference_across_karatsuba_threshold() {
    let seed = 22;
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    // Every comb length (1 to 10 words), the first Karatsuba splits (odd and even) and unequal
    // lengths (chunked by mul_acc).
    let equal = (1..=24).map(|l| (l, l));
    let unequal = [(3, 7), (10, 11), (11, 10), (49, 49), (50, 3), (70, 101), (114, 114), (130, 130)];
    for (la, lb) in equal.chain(unequal) {
        let a: Vec<u64> = (0..la).map(|_| rng.next_u64()).collect();
        let b: Vec<u64> = (0..lb).map(|_| rng.next_u64()).collect();
        assert_eq!(poly_mul(&a, &b), poly_mul_reference(&a, &b), "seed {seed}: {la} x {lb}");
    }
}

#[test]
fn hash_is_linear_in_the_input() {
    let seed = 23;
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let (n, m) = (20_000, 9_000);
    let toeplitz_seed = random_bits(&mut rng, n + m - 1);
    let x = random_bits(&mut rng, n);
    let y = random_bits(&mut rng, n);
    let xor = |a: &BitVec, b: &BitVec| {
        let words = a.words().iter().zip(b.words()).map(|(p, q)| p ^ q).collect();
        BitVec::from_words(words, a.len())
    };
    let lhs = toeplitz_hash(&xor(&x, &y), &toeplitz_seed, m);
    let rhs = xor(&toeplitz_hash(&x, &toeplitz_seed, m), &toeplitz_hash(&y, &toeplitz_seed, m));
    assert!(lhs == rhs, "seed {seed}: not linear");
    // A single input bit j selects column j: seed bits i + n - 1 - j for i in 0..m.
    let j = rng.random_range(0..n);
    let mut unit = BitVec::zeros(n);
    unit.set(j, true);
    let column = toeplitz_hash(&unit, &toeplitz_seed, m);
    for i in (0..m).step_by(97) {
        assert_eq!(column.get(i), toeplitz_seed.get(i + n - 1 - j), "seed {seed}: i={i} j={j}");
    }
}

#[test]
fn fft_matches_reference_on_random_inputs() {
    // The ternary FFT forced on small sizes (where it would not be chosen), against the
    // bit-by-bit reference: every plan shape down to K = 9 points.
    let seed = 24;
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    for &(n, m) in
        &[(1usize, 1usize), (2, 3), (64, 64), (65, 1), (100, 37), (513, 100), (1000, 999), (2000, 3000), (4097, 1500)]
    {
        let input = random_bits(&mut rng, n);
        let toeplitz_seed = random_bits(&mut rng, n + m - 1);
        let fft = toeplitz_hash_fft(&input, &toeplitz_seed, m);
        let slow = toeplitz_hash_reference(&input, &toeplitz_seed, m);
        assert_eq!(fft.len(), m);
        assert!(fft == slow, "seed {seed}: n={n} m={m} differ");
    }
}

#[test]
fn automatic_fft_path_matches_karatsuba_and_reference_bits() {
    // Above the threshold toeplitz_hash takes the FFT path: it must agree with Karatsuba (itself
    // checked against the reference above) on the whole output, and with the reference formula on
    // a sample of output bits (each O(n) to compute).
    let seed = 25;
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    for &(n, m) in &[(FFT_THRESHOLD_BITS + 1, 1000), (100_003, 70_001), (250_000, 31)] {
        let input = random_bits(&mut rng, n);
        let toeplitz_seed = random_bits(&mut rng, n + m - 1);
        let auto = toeplitz_hash(&input, &toeplitz_seed, m);
        let karatsuba = toeplitz_hash_karatsuba(&input, &toeplitz_seed, m);
        assert!(auto == karatsuba, "seed {seed}: n={n} m={m}: fft and karatsuba differ");
        for i in (0..m).step_by((m / 7).max(1)).chain([m - 1]) {
            let bit = (0..n).fold(false, |acc, j| acc ^ (toeplitz_seed.get(i + n - 1 - j) & input.get(j)));
            assert_eq!(auto.get(i), bit, "seed {seed}: n={n} m={m} bit {i}");
        }
    }
}
