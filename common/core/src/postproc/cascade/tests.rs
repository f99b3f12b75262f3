use proptest::prelude::*;
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

use super::density::{MAX_TABLE_CORRECTIONS, residual_error_density};
use super::*;
use crate::postproc::binary_entropy;

use crate::postproc::test_support::{random_key, with_errors};

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
    // Cascade leaves a residual error in a small fraction of frames (even-weight patterns no pass
    // splits; verification catches them), so the cases are drawn from a fixed seed: random
    // seeds would fail now and then (an example: docs/postprocessing.md). The frame error rate
    // itself is measured by `qkdctl bench-postproc`.
    #![proptest_config(ProptestConfig {
        cases: 24,
        rng_seed: proptest::test_runner::RngSeed::Fixed(20261206),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

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
        let ceiling = if qber < 0.05 { 1.045 } else { 1.048 };
        assert!(f < ceiling, "seed {seed}: f = {f} at QBER {qber}");
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
    // Q = 3 %: alpha = ceil(log2(33.3) - 0.5) = ceil(4.56) = 5, k1 = 32, k2 = 2^floor(17/2) = 256
    // (the published 2^ceil(17/2) = 512, rounded down: see the module documentation).
    let sizes = block_sizes(0.03, 16_384);
    assert_eq!(&sizes[..4], &[32, 256, 4096, 8192]);
    assert_eq!(sizes.len(), N_PASSES as usize);
    // Q = 5 %: alpha = ceil(4.32 - 0.5) = 4, k1 = 16, k2 = 2^(16/2) = 256 (as published); from
    // Q = 7 % (same alpha) k2 = 128.
    assert_eq!(&block_sizes(0.05, 16_384)[..2], &[16, 256]);
    assert_eq!(&block_sizes(0.08, 16_384)[..2], &[16, 128]);
    // Q = 10 %: alpha = ceil(3.32 - 0.5) = 3, k1 = 8, k2 = 2^floor(7.5) = 128; a key over 2^16
    // bits gets the intermediate passes of 2^14 and 2^16 bits before the n/2 passes.
    assert_eq!(&block_sizes(0.10, 100_000)[..6], &[8, 128, 4096, 16_384, 65_536, 50_000]);
    // Q = 1 %: alpha = ceil(6.64 - 0.5) = 7, k1 = 128, k2 = 2^floor(9.5) = 512.
    assert_eq!(&block_sizes(0.01, 100_000)[..2], &[128, 512]);
    // Degenerate estimates fall back to the floor; sizes are clamped to the key length.
    assert_eq!(block_sizes(-1.0, 100_000), block_sizes(QBER_FLOOR, 100_000));
    assert_eq!(block_sizes(f64::NAN, 100_000), block_sizes(QBER_FLOOR, 100_000));
    assert!(block_sizes(0.05, 100).iter().all(|&k| (1..=100).contains(&k)));
}

#[test]
fn permutations_are_deterministic_bijections() {
    let seed = seed_bytes(35);
    for n in [1000usize, 100_003] {
        for pass in [0, 1, 2, 3, 5, 13] {
            let perm = pass_permutation(&seed, pass, n);
            assert_eq!(perm, pass_permutation(&seed, pass, n));
            let mut sorted = perm.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..n as u32).collect::<Vec<u32>>());
            let half = &perm[..n / 2];
            if pass < first_split_pass(n) {
                // Fisher-Yates: no long runs of consecutive indices.
                let runs = perm.windows(2).filter(|w| w[1] == w[0] + 1).count();
                assert!(runs < n / 100, "n={n} pass={pass}: {runs} consecutive pairs");
            } else {
                // Random split: selected then unselected bits, each in increasing index order (so
                // at most one descent in the whole order), the first half a random half (about a
                // quarter of the key lies in both it and the key's first half).
                let descents = perm.windows(2).filter(|w| w[0] > w[1]).count();
                assert!(descents <= 1, "n={n} pass={pass}: {descents} descents");
                let low = half.iter().filter(|&&i| (i as usize) < n / 2).count();
                assert!(low.abs_diff(n / 4) < n / 20, "n={n} pass={pass}: {low} low indices");
            }
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
    assert_eq!(bob.receive(&[true]), Err(CascadeError::AnswerCountMismatch { expected: batch.len(), got: 1 }));
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

#[test]
fn split_orders_agree_with_their_permutation() {
    // Position/original maps and range parities of a split pass, against the materialised
    // permutation, on key lengths around word boundaries.
    let seed_u64 = 38;
    let seed = seed_bytes(seed_u64);
    let mut rng = ChaCha20Rng::seed_from_u64(seed_u64);
    for n in [1usize, 63, 64, 65, 1000, 4097] {
        let pass = first_split_pass(n);
        let shuffles = CascadeShuffles::new(seed, n);
        let order = shuffles.order(pass);
        let perm = pass_permutation(&seed, pass, n);
        for (position, &original) in perm.iter().enumerate() {
            assert_eq!(order.original(position as u32), original, "n={n}");
            assert_eq!(order.position(original), position as u32, "n={n}");
        }
        let key = random_key(&mut rng, n);
        for _ in 0..50 {
            let a = rng.random_range(0..n as u32);
            let b = rng.random_range(0..n as u32);
            let (start, end) = (a.min(b), a.max(b) + 1);
            let expect = (start..end).fold(false, |acc, i| acc ^ key.get(perm[i as usize] as usize));
            assert_eq!(shuffles.parity(&key, None, pass, start, end), expect, "seed {seed_u64}: n={n} {start}..{end}");
        }
    }
}

#[test]
fn residual_density_is_a_probability_and_falls_with_corrections() {
    for (q, k) in [(0.01, 128), (0.03, 32), (0.11, 8), (0.001, 1024)] {
        let table = residual_error_density(q, k);
        assert_eq!(table.len(), MAX_TABLE_CORRECTIONS + 1);
        assert!(table.iter().all(|&p| p > 0.0 && p < 0.5), "q={q} k={k}: {table:?}");
        // A block that was even from the start holds its remaining errors in pairs: denser than
        // after one correction (at these block sizes, about one error per block).
        assert!(table[0] > table[1], "q={q} k={k}: {table:?}");
    }
}

/// Runs a multi-frame exchange, checking that both ends count the same disclosed bits per frame.
fn run_multi(
    alice_keys: &[BitVec],
    bob_keys: Vec<BitVec>,
    qber: f64,
    seed: [u8; 32],
) -> (Vec<CascadeOutcome>, u32, MultiCascadeAlice) {
    let mut alice = MultiCascadeAlice::new(alice_keys, seed);
    let mut bob = MultiCascadeBob::new(bob_keys, qber, seed);
    let mut batches = 0;
    while let Some(queries) = bob.next_queries() {
        assert_eq!(bob.next_queries().as_deref(), Some(&queries[..]), "a repeated call returns the batch");
        let parities = alice.answer(&queries).unwrap();
        bob.receive(&parities).unwrap();
        assert_eq!(bob.leak_bits(), alice.leak_bits());
        batches += 1;
    }
    assert_eq!(bob.round_trips(), batches);
    (bob.finish(), batches, alice)
}

#[test]
fn multi_frame_exchange_matches_single_frames() {
    let seed_u64 = 39;
    let seed = seed_bytes(seed_u64);
    let mut rng = ChaCha20Rng::seed_from_u64(seed_u64);
    // Frames of different lengths and error counts, one of them error-free and one empty.
    let lengths = [4000usize, 4000, 2500, 0, 7000];
    let alice_keys: Vec<BitVec> = lengths.iter().map(|&n| random_key(&mut rng, n)).collect();
    let bob_keys: Vec<BitVec> = alice_keys
        .iter()
        .enumerate()
        .map(|(i, key)| if i == 1 { key.clone() } else { with_errors(&mut rng, key, key.len() / 25) })
        .collect();
    let (outcomes, batches, alice) = run_multi(&alice_keys, bob_keys.clone(), 0.04, seed);
    assert_eq!(outcomes.len(), lengths.len());
    for (frame, outcome) in outcomes.iter().enumerate() {
        assert!(outcome.key == alice_keys[frame], "seed {seed_u64}: frame {frame} not corrected");
        assert_eq!(Some(outcome.leak_bits), alice.frame_leak_bits(frame), "frame {frame}");
        assert_eq!(outcome.key.len(), lengths[frame], "frame {frame}: padding removed");
        // The same frame alone, padded like the exchange pads it, asks exactly the same questions.
        let pad = |key: &BitVec| {
            let mut key = key.clone();
            while key.len() < 7000 {
                key.push(false);
            }
            key
        };
        let single = reconcile_in_memory(&pad(&alice_keys[frame]), pad(&bob_keys[frame]), 0.04, seed);
        assert_eq!(single.leak_bits, outcome.leak_bits, "frame {frame}");
        assert_eq!(single.round_trips, outcome.round_trips, "frame {frame}");
    }
    let max_round_trips = outcomes.iter().map(|o| o.round_trips).max().unwrap();
    assert_eq!(batches, max_round_trips, "one exchange round serves every frame");
    assert_eq!(alice.frame_leak_bits(lengths.len()), None);
}

#[test]
fn multi_frame_alice_refuses_bad_queries_without_leaking() {
    let keys = vec![BitVec::zeros(100), BitVec::zeros(50)];
    let mut alice = MultiCascadeAlice::new(&keys, [3; 32]);
    let good = FrameParityQuery { frame: 1, pass: 0, start: 0, end: 50 };
    let bad_frame = FrameParityQuery { frame: 2, pass: 0, start: 0, end: 10 };
    // Frame 1 is padded to the longest frame's 100 bits.
    let bad_range = FrameParityQuery { frame: 1, pass: 0, start: 0, end: 101 };
    assert_eq!(alice.answer(&[good, bad_frame]), Err(CascadeError::FrameOutOfRange { frame: 2, n_frames: 2 }));
    assert_eq!(alice.answer(&[good, bad_range]), Err(CascadeError::BadRange { start: 0, end: 101, n_bits: 100 }));
    assert_eq!(alice.leak_bits(), 0);
    assert_eq!(alice.answer(&[good]).unwrap(), vec![false]);
    assert_eq!(alice.frame_leak_bits(1), Some(1));
    assert_eq!(alice.frame_leak_bits(0), Some(0));
    let mut bob = MultiCascadeBob::new(keys.clone(), 0.05, [3; 32]);
    assert_eq!(bob.receive(&[true]), Err(CascadeError::NoOutstandingQueries));
    let batch = bob.next_queries().unwrap();
    assert_eq!(bob.receive(&[]), Err(CascadeError::AnswerCountMismatch { expected: batch.len(), got: 0 }));
    assert_eq!(bob.next_queries().unwrap(), batch);
}

#[test]
fn bob_never_asks_the_parity_of_corrected_bits_only() {
    // At 10 % QBER the cascade effect restarts many pass-1 searches next to corrected bits.
    let seed = 41;
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let alice_key = random_key(&mut rng, 16_384);
    let bob_key = with_errors(&mut rng, &alice_key, 1638);
    let mut alice = CascadeAlice::new(&alice_key, seed_bytes(seed));
    let mut bob = CascadeBob::new(bob_key, 0.10, seed_bytes(seed));
    let mut restarted_next_to_corrections = 0;
    while let Some(queries) = bob.next_queries() {
        for q in &queries {
            assert!(!bob.known_correct(q.pass as usize, q.start, q.end), "asked {q:?}, all corrected");
            // The sibling of a short range asked in a pass-1 block that already had corrections.
            let block = q.start as usize / bob.block_sizes[0];
            if q.pass == 0 && bob.density.corrections[block] > 0 {
                restarted_next_to_corrections += 1;
            }
        }
        let parities = alice.answer(&queries).unwrap();
        bob.receive(&parities).unwrap();
    }
    assert!(restarted_next_to_corrections > 100, "the case is exercised: {restarted_next_to_corrections}");
    assert!(bob.finish().key == alice_key);
}
