use proptest::prelude::*;
use rand::{Rng, SeedableRng};

use super::*;
use crate::quantum::{FrameSecret, alice_state};

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
        let (answer, alice) = alice_sift(&TxStates::derived(secret.clone(), p_z), n_pulses, &deltas, &codes).unwrap();
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
    let (answer, alice) = alice_sift(&TxStates::derived(secret.clone(), 0.9), n_pulses, &deltas, &codes).unwrap();
    let bob = bob_sift(&dets, &answer).unwrap();
    assert!(flipped > 0);
    // Every flipped Z click Alice sent in Z is a key-bit error; those she sent in X are sifted out.
    assert!(alice.key_bits.hamming_distance(&bob.key_bits) <= flipped);
    assert!(alice.key_bits.hamming_distance(&bob.key_bits) > 0);
}

#[test]
fn malformed_announcements_are_errors_not_panics() {
    let secret = FrameSecret::from_bytes([1; 32]);
    assert!(
        alice_sift(&TxStates::derived(secret.clone(), 0.5), 10, &crate::wire::encode_deltas([3, 4]), &[0]).is_err()
    );
    assert!(alice_sift(&TxStates::derived(secret.clone(), 0.5), 10, &crate::wire::encode_deltas([3]), &[9]).is_err());
    assert!(alice_sift(&TxStates::derived(secret.clone(), 0.5), 4, &crate::wire::encode_deltas([4]), &[0]).is_err());
    assert!(bob_sift(&[], &[0]).is_err());
}

/// The sifting rules written out per detection (the table-driven code must agree): Alice's
/// answer, key bits and counts, or the first invalid code.
fn reference_alice(secret: &FrameSecret, p_z: f64, indices: &[u64], codes: &[u8]) -> Result<(Vec<u8>, FrameSift), u8> {
    let mut answer = Vec::new();
    let mut sift = FrameSift::default();
    for (&idx, &code) in indices.iter().zip(codes) {
        let state = alice_state(secret, idx, p_z);
        match (code, state) {
            (BOB_Z, State::Early | State::Late) => {
                answer.push(ALICE_Z);
                sift.key_bits.push(state == State::Late);
            }
            (BOB_Z, _) => answer.push(ALICE_X),
            (BOB_X_PLUS | BOB_X_MINUS, _) => {
                answer.push(match state {
                    State::Early => ALICE_REVEAL_E,
                    State::Late => ALICE_REVEAL_L,
                    _ => ALICE_REVEAL_PLUS,
                });
                reference_count(&mut sift.x_counts, state, code == BOB_X_MINUS);
            }
            (code, _) => return Err(code),
        }
    }
    Ok((answer, sift))
}

/// Bob's side of [`reference_alice`].
fn reference_bob(detections: &[Detection], answer: &[u8]) -> Result<FrameSift, u8> {
    let mut sift = FrameSift::default();
    for (d, &code) in detections.iter().zip(answer) {
        match (d.measurement, code) {
            (Measurement::Z { late }, ALICE_Z) => sift.key_bits.push(late),
            (Measurement::Z { .. }, ALICE_X) => {}
            (Measurement::X { minus }, ALICE_REVEAL_E) => reference_count(&mut sift.x_counts, State::Early, minus),
            (Measurement::X { minus }, ALICE_REVEAL_L) => reference_count(&mut sift.x_counts, State::Late, minus),
            (Measurement::X { minus }, ALICE_REVEAL_PLUS) => reference_count(&mut sift.x_counts, State::Plus, minus),
            (_, code) => return Err(code),
        }
    }
    Ok(sift)
}

fn reference_count(c: &mut XCounts, state: State, minus: bool) {
    *match (state, minus) {
        (State::Early, false) => &mut c.e_plus,
        (State::Early, true) => &mut c.e_minus,
        (State::Late, false) => &mut c.l_plus,
        (State::Late, true) => &mut c.l_minus,
        (_, false) => &mut c.plus_plus,
        (_, true) => &mut c.plus_minus,
    } += 1;
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// `alice_sift` and `bob_sift` (batched, table-driven) agree with the per-detection rules,
    /// on valid messages and on messages with a stray code anywhere (even across a batch).
    #[test]
    fn sifting_matches_the_per_detection_rules(
        seed in any::<u64>(),
        n in 0usize..700,
        p_z in 0.0f64..1.0,
        bad in proptest::option::of((any::<prop::sample::Index>(), 3u8..=255)),
    ) {
        let secret = FrameSecret::from_bytes([seed as u8 ^ 0x5a; 32]);
        let n_pulses = 1u64 << 12;
        let dets = detections(&secret, p_z, seed, n, n_pulses);
        let indices: Vec<u64> = dets.iter().map(|d| d.pulse_idx).collect();
        let (deltas, mut codes) = announce(&dets);
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed);
        // Alice's answer as it should be; Bob then also gets one with stray codes.
        let (mut answer, want) = reference_alice(&secret, p_z, &indices, &codes).unwrap();
        let (got_answer, got) = alice_sift(&TxStates::derived(secret.clone(), p_z), n_pulses, &deltas, &codes).unwrap();
        prop_assert_eq!(&got_answer, &answer);
        prop_assert_eq!(&got.key_bits, &want.key_bits);
        prop_assert_eq!(got.x_counts, want.x_counts);
        let bob_want = reference_bob(&dets, &answer).unwrap();
        let bob_got = bob_sift(&dets, &answer).unwrap();
        prop_assert_eq!(&bob_got.key_bits, &bob_want.key_bits);
        prop_assert_eq!(bob_got.x_counts, bob_want.x_counts);
        if let Some((at, code)) = bad && !dets.is_empty() {
            let k = at.index(dets.len());
            codes[k] = code;
            let err = alice_sift(&TxStates::derived(secret.clone(), p_z), n_pulses, &deltas, &codes).unwrap_err();
            prop_assert_eq!(err, WireError::Code { what: "bob_measurements", code });
            // Any answer code wrong for Bob's basis (or meaningless) is refused.
            answer[k] = rng.random_range(0..=u8::MAX);
            match reference_bob(&dets, &answer) {
                Ok(_) => prop_assert!(bob_sift(&dets, &answer).is_ok()),
                Err(code) => prop_assert_eq!(bob_sift(&dets, &answer).unwrap_err(), WireError::Code { what: "alice_info", code }),
            }
        }
    }
}

/// Sifting against a device's explicit (packed) states gives what the simulator's derived states
/// give, answer and counts alike.
#[test]
fn packed_states_sift_like_derived_states() {
    let seed = 31;
    let secret = FrameSecret::random(&mut rand_chacha::ChaCha20Rng::seed_from_u64(seed));
    let (p_z, n_pulses) = (0.8, 50_000u64);
    let dets = detections(&secret, p_z, seed, 4000, n_pulses);
    let (deltas, codes) = announce(&dets);
    let derived = TxStates::derived(secret.clone(), p_z);
    let packed = TxStates::Packed(derived.to_packed(n_pulses));
    let (a1, s1) = alice_sift(&derived, n_pulses, &deltas, &codes).unwrap();
    let (a2, s2) = alice_sift(&packed, n_pulses, &deltas, &codes).unwrap();
    assert_eq!(a1, a2, "seed {seed}");
    assert_eq!(s1.key_bits, s2.key_bits, "seed {seed}");
    assert_eq!(s1.x_counts, s2.x_counts, "seed {seed}");
    assert!(s1.key_bits.len() > 1000, "seed {seed}: the frame sifts to key");
}
