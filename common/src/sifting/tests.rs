use proptest::prelude::*;
use rand::{Rng, SeedableRng};

use super::*;

/// Detections at random pulses; Z outcomes copy Alice's state (a noiseless channel) except for
/// pulses in `flip` where they are inverted; X outcomes are random.
fn detections(secret: &FrameSecret, p_z: f64, seed: u64, n: usize, n_pulses: u64) -> Vec<Detection> {
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed);
    let mut idx: Vec<u64> = (0..n).map(|_| rng.random_range(0..n_pulses)).collect();
    idx.sort_unstable();
    idx.dedup();
    idx.into_iter()
        .map(|pulse_idx| {
            let measurement = if rng.random_bool(0.5) {
                Measurement::Z { late: alice_state(secret, pulse_idx, p_z) == State::Late }
            } else {
                Measurement::X { minus: rng.random_bool(0.3) }
            };
            Detection { pulse_idx, measurement }
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Sifting is symmetric: both sides derive the same key bits (on a noiseless channel) and
    /// exactly the same test counts, from the messages alone.
    #[test]
    fn sifting_is_symmetric(seed in any::<u64>(), n in 0usize..400, p_z in 0.1f64..0.95) {
        let secret = FrameSecret::from_bytes([seed as u8; 32]);
        let n_pulses = 1u64 << 22;
        let dets = detections(&secret, p_z, seed, n, n_pulses);
        let (deltas, codes) = announce(&dets);
        let (answer, alice) = alice_sift(&secret, p_z, n_pulses, &deltas, &codes).unwrap();
        let bob = bob_sift(&dets, &answer).unwrap();
        prop_assert_eq!(&alice.key_bits, &bob.key_bits);
        prop_assert_eq!(alice.x_counts, bob.x_counts);
        let n_x = dets.iter().filter(|d| matches!(d.measurement, Measurement::X { .. })).count() as u64;
        let c = alice.x_counts;
        prop_assert_eq!(c.e_plus + c.e_minus + c.l_plus + c.l_minus + c.plus_plus + c.plus_minus, n_x);
    }
}

#[test]
fn z_errors_show_up_only_in_bobs_bits() {
    let secret = FrameSecret::from_bytes([9; 32]);
    let n_pulses = 1 << 20;
    let mut dets = detections(&secret, 0.9, 1, 300, n_pulses);
    let mut flipped = 0;
    for d in dets.iter_mut().step_by(7) {
        if let Measurement::Z { late } = &mut d.measurement {
            *late = !*late;
            flipped += 1;
        }
    }
    let (deltas, codes) = announce(&dets);
    let (answer, alice) = alice_sift(&secret, 0.9, n_pulses, &deltas, &codes).unwrap();
    let bob = bob_sift(&dets, &answer).unwrap();
    assert!(flipped > 0);
    // Every flipped Z click Alice sent in Z is a key-bit error; those she sent in X are sifted out.
    assert!(alice.key_bits.hamming_distance(&bob.key_bits) <= flipped);
    assert!(alice.key_bits.hamming_distance(&bob.key_bits) > 0);
}

#[test]
fn malformed_announcements_are_errors_not_panics() {
    let secret = FrameSecret::from_bytes([1; 32]);
    assert!(alice_sift(&secret, 0.5, 10, &crate::wire::encode_deltas([3, 4]), &[0]).is_err());
    assert!(alice_sift(&secret, 0.5, 10, &crate::wire::encode_deltas([3]), &[9]).is_err());
    assert!(alice_sift(&secret, 0.5, 4, &crate::wire::encode_deltas([4]), &[0]).is_err());
    assert!(bob_sift(&[], &[0]).is_err());
}
