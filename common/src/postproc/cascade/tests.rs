use proptest::prelude::*;
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

use super::*;
use crate::postproc::binary_entropy;

fn random_key(rng: &mut ChaCha20Rng, n_bits: usize) -> BitVec {
    let words: Vec<u64> = (0..n_bits.div_ceil(64)).map(|_| rng.next_u64()).collect();
    BitVec::from_words(words, n_bits)
}

/// A copy of `key` with exactly `n_errors` bits flipped at distinct random positions.
fn with_errors(rng: &mut ChaCha20Rng, key: &BitVec, n_errors: usize) -> BitVec {
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

/// Runs both ends, checking at every batch that both sides count the same disclosed bits.
/// Returns Bob's outcome and the number of parities Alice answered.
fn run_checked(alice_key: &BitVec, bob_key: BitVec, qber: f64, seed: [u8; 32]) -> (CascadeOutcome, u64) {
    let mut alice = CascadeAlice::new(alice_key, seed);
    let mut bob = CascadeBob::new(bob_key, qber, seed);
    let mut answered = 0u64;
    let mut batches = 0u32;
    while let Some(queries) = bob.next_queries() {
        assert!(!queries.is_empty());
        // Asking again before answering returns the same batch.
        assert_eq!(bob.next_queries().as_deref(), Some(&queries[..]));
        let parities = alice.answer(&queries).unwrap();
        answered += parities.len() as u64;
        bob.receive(&parities).unwrap();
        assert_eq!(bob.leak_bits(), alice.leak_bits());
        batches += 1;
        assert!(batches < 10_000, "cascade does not terminate");
    }
    let outcome = bob.finish();
    assert_eq!(outcome.round_trips, batches);
    assert_eq!(outcome.leak_bits, alice.leak_bits());
    (outcome, answered)
}

fn seed_bytes(seed: u64) -> [u8; 32] {
    let mut bytes = [0u8; 32];
    ChaCha20Rng::seed_from_u64(seed ^ 0x5eed).fill_bytes(&mut bytes);
    bytes
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn corrects_every_frame_and_counts_exactly(
        seed in any::<u64>(),
        n_bits in 1_000usize..20_000,
        qber in 0.005f64..0.10,
    ) {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let alice_key = random_key(&mut rng, n_bits);
        let mut bob_key = alice_key.clone();
        for i in 0..n_bits {
            if rng.random_bool(qber) {
                bob_key.flip(i);
            }
        }
        let n_errors = alice_key.hamming_distance(&bob_key);
        let (outcome, answered) = run_checked(&alice_key, bob_key, qber, seed_bytes(seed));
        prop_assert!(outcome.key == alice_key, "seed {seed}: n={n_bits} q={qber}: residual errors {}",
            outcome.key.hamming_distance(&alice_key));
        prop_assert_eq!(outcome.leak_bits, answered, "seed {}", seed);
        prop_assert_eq!(outcome.n_corrected, n_errors, "seed {}", seed);
    }
}

/// Mean efficiency f = leak / (n h(Q)) over `n_frames` frames with exactly round(Q n) errors, and
/// the mean number of round trips.
fn mean_efficiency(qber: f64, n_bits: usize, n_frames: u64, seed: u64) -> (f64, f64) {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let n_errors = (qber * n_bits as f64).round() as usize;
    let mut f_sum = 0.0;
    let mut round_trips = 0.0;
    for frame in 0..n_frames {
        let alice_key = random_key(&mut rng, n_bits);
        let bob_key = with_errors(&mut rng, &alice_key, n_errors);
        let outcome = reconcile_in_memory(&alice_key, bob_key, qber, seed_bytes(seed + frame));
        assert!(outcome.key == alice_key, "seed {seed}, frame {frame}: not corrected");
        let actual_q = n_errors as f64 / n_bits as f64;
        f_sum += outcome.leak_bits as f64 / (n_bits as f64 * binary_entropy(actual_q));
        round_trips += f64::from(outcome.round_trips);
    }
    (f_sum / n_frames as f64, round_trips / n_frames as f64)
}

#[test]
fn efficiency_at_3_and_10_percent() {
    for (qber, seed) in [(0.03, 31), (0.10, 32)] {
        let (f, round_trips) = mean_efficiency(qber, 16_384, 20, seed);
        println!("QBER {qber}: mean f = {f:.4}, mean round trips = {round_trips:.1} (seed {seed})");
        assert!(f < 1.15, "seed {seed}: f = {f} at QBER {qber}");
        assert!(f > 1.0, "seed {seed}: f = {f} below the Shannon limit: leak miscounted?");
    }
}

#[test]
fn no_error_input_terminates_and_counts_leak() {
    let seed = 33;
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let key = random_key(&mut rng, 10_000);
    let (outcome, answered) = run_checked(&key, key.clone(), 0.0, seed_bytes(seed));
    assert!(outcome.key == key, "seed {seed}");
    assert_eq!(outcome.n_corrected, 0);
    assert!(outcome.leak_bits > 0, "block parities are disclosed even without errors");
    assert_eq!(outcome.leak_bits, answered);
    // With Q floored to 0.001: k1 = 1024 (10 blocks), k2 = 2048 (5 blocks, one deduced),
    // k3 = 4096 (3 blocks, one deduced), then n/2 (2 blocks, one deduced) for 11 passes.
    assert_eq!(outcome.leak_bits, 10 + 4 + 2 + 11);
}

#[test]
fn tiny_and_empty_keys() {
    let seed = 34;
    let empty = reconcile_in_memory(&BitVec::new(), BitVec::new(), 0.05, seed_bytes(seed));
    assert_eq!((empty.key.len(), empty.leak_bits, empty.round_trips), (0, 0, 0));
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    for n_bits in 1..40 {
        let key = random_key(&mut rng, n_bits);
        let noisy = with_errors(&mut rng, &key, 1);
        let (outcome, _) = run_checked(&key, noisy, 0.05, seed_bytes(seed + n_bits as u64));
        assert!(outcome.key == key, "seed {seed}, n_bits {n_bits}");
    }
}

#[test]
fn schedule_follows_the_optimized_cascade() {
    // Q = 3 %: alpha = ceil(log2(33.3) - 0.5) = ceil(4.56) = 5, k1 = 32, k2 = 2^ceil(17/2) = 512.
    let sizes = block_sizes(0.03, 16_384);
    assert_eq!(&sizes[..4], &[32, 512, 4096, 8192]);
    assert_eq!(sizes.len(), N_PASSES as usize);
    // Q = 10 %: alpha = ceil(3.32 - 0.5) = 3, k1 = 8, k2 = 2^ceil(7.5) = 256.
    assert_eq!(&block_sizes(0.10, 100_000)[..4], &[8, 256, 4096, 50_000]);
    // Q = 1 %: alpha = ceil(6.64 - 0.5) = 7, k1 = 128, k2 = 2^ceil(9.5) = 1024.
    assert_eq!(&block_sizes(0.01, 100_000)[..2], &[128, 1024]);
    // Degenerate estimates fall back to the floor; sizes are clamped to the key length.
    assert_eq!(block_sizes(-1.0, 100_000), block_sizes(QBER_FLOOR, 100_000));
    assert_eq!(block_sizes(f64::NAN, 100_000), block_sizes(QBER_FLOOR, 100_000));
    assert!(block_sizes(0.05, 100).iter().all(|&k| (1..=100).contains(&k)));
}

#[test]
fn permutations_are_deterministic_bijections() {
    let seed = seed_bytes(35);
    for n in [1000usize, 100_003] {
        for pass in [0, 1, 13] {
            let perm = pass_permutation(&seed, pass, n);
            assert_eq!(perm, pass_permutation(&seed, pass, n));
            let mut sorted = perm.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..n as u32).collect::<Vec<u32>>());
            // Not the identity, and no long runs of consecutive indices.
            let runs = perm.windows(2).filter(|w| w[1] == w[0] + 1).count();
            assert!(runs < n / 100, "n={n} pass={pass}: {runs} consecutive pairs");
        }
    }
    assert_ne!(pass_permutation(&seed, 0, 1000), pass_permutation(&seed, 1, 1000));
    assert_ne!(pass_permutation(&seed, 0, 1000), pass_permutation(&seed_bytes(36), 0, 1000));
}

#[test]
fn alice_refuses_bad_queries_without_leaking() {
    let key = BitVec::zeros(100);
    let mut alice = CascadeAlice::new(&key, [7; 32]);
    let good = ParityQuery { pass: 0, start: 0, end: 10 };
    let bad_pass = ParityQuery { pass: N_PASSES, start: 0, end: 10 };
    assert_eq!(
        alice.answer(&[good, bad_pass]),
        Err(CascadeError::PassOutOfRange { pass: N_PASSES, n_passes: N_PASSES })
    );
    for (start, end) in [(5, 5), (6, 5), (0, 101)] {
        assert_eq!(
            alice.answer(&[ParityQuery { pass: 1, start, end }]),
            Err(CascadeError::BadRange { start, end, n_bits: 100 })
        );
    }
    assert_eq!(alice.leak_bits(), 0);
    assert_eq!(alice.answer(&[good, good]).unwrap(), vec![false, false]);
    assert_eq!(alice.leak_bits(), 2);
}

#[test]
fn bob_refuses_unexpected_answers() {
    let mut bob = CascadeBob::new(BitVec::zeros(1000), 0.05, [9; 32]);
    assert_eq!(bob.receive(&[true]), Err(CascadeError::NoOutstandingQueries));
    let batch = bob.next_queries().unwrap();
    assert_eq!(
        bob.receive(&[true]),
        Err(CascadeError::AnswerCountMismatch { expected: batch.len(), got: 1 })
    );
    // The batch stays outstanding and the leak counter untouched.
    assert_eq!(bob.next_queries().unwrap(), batch);
    assert_eq!(bob.leak_bits(), 0);
}

#[test]
fn alice_parities_follow_the_pass_shuffle() {
    let seed_u64 = 37;
    let seed = seed_bytes(seed_u64);
    let mut rng = ChaCha20Rng::seed_from_u64(seed_u64);
    let key = random_key(&mut rng, 500);
    let mut alice = CascadeAlice::new(&key, seed);
    let perm = pass_permutation(&seed, 3, 500);
    let (start, end) = (17u32, 230u32);
    let expect = (start..end).fold(false, |acc, i| acc ^ key.get(perm[i as usize] as usize));
    assert_eq!(alice.answer(&[ParityQuery { pass: 3, start, end }]).unwrap(), vec![expect]);
}
