use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

use super::*;
use crate::postproc::binary_entropy;

use crate::postproc::test_support::{random_key, with_errors};

#[test]
fn construction_is_deterministic_untainted_and_sized() {
    for (n_bits, rate) in [(3000, 0.5), (3000, 0.9), (20_000, 0.7)] {
        let code = LdpcCode::new(n_bits, rate, 0.1);
        let again = LdpcCode::new(n_bits, rate, 0.1);
        assert_eq!(code.rows, again.rows, "n={n_bits} rate={rate}: construction not deterministic");
        assert!(code.adaptation_is_untainted(), "n={n_bits} rate={rate}");
        assert!(code.n_adaptation() > 0);
        assert_eq!(code.n_bits(), BASE_COLUMNS * code.lifting());
        assert!(code.key_cols.len() * code.lifting() >= n_bits);
        let nominal = (1.0 - rate) * BASE_COLUMNS as f64;
        assert!((code.n_checks() as f64 / code.lifting() as f64 - nominal).abs() <= 1.0);
    }
    // With a lifting size this large, the shift search finds a 4-cycle-free lifting.
    assert_eq!(LdpcCode::new(20_000, 0.7, 0.1).count_four_cycles(), 0);
}

#[test]
fn syndrome_matches_the_dense_parity_check_matrix() {
    let seed = 41;
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let code = LdpcCode::new(1500, 0.6, 0.1);
    let z = code.lifting();
    let word: Vec<u8> = (0..code.n_bits()).map(|_| u8::from(rng.random::<bool>())).collect();
    let syndrome = code.syndrome_of(&word);
    // Check r z + i involves bit c z + (i + shift) mod z for each base entry (c, shift) of row r.
    for (r, entries) in code.rows.iter().enumerate() {
        for i in 0..z {
            let parity =
                entries.iter().fold(0u8, |acc, &(c, shift)| acc ^ word[c as usize * z + (i + shift as usize) % z]);
            assert_eq!(syndrome.get(r * z + i), parity == 1, "seed {seed}: check {r}/{i}");
        }
    }
}

#[test]
fn corrects_every_frame_below_threshold_and_counts_the_leak() {
    // Rate-0.5 and rate-0.75 codes far below their thresholds (f about 2): every frame decodes to
    // Alice's key, at the first attempt, with leak m - p as Alice counts it.
    let seed = 42;
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    for (rate, qber) in [(0.5, 0.05), (0.75, 0.02)] {
        let n_bits = 4000;
        let code = LdpcCode::new(n_bits, rate, 0.1);
        let n_punctured = code.n_adaptation() / 2;
        for frame in 0..8 {
            let alice_key = random_key(&mut rng, n_bits);
            let bob_key = with_errors(&mut rng, &alice_key, (qber * n_bits as f64) as usize);
            let mut alice = LdpcAlice::new(&code, &alice_key, n_punctured, &mut rng).unwrap();
            assert_eq!(alice.syndrome().len(), code.n_checks());
            let mut bob = LdpcBob::new(&code, &bob_key, qber, alice.syndrome().clone(), n_punctured, 4).unwrap();
            assert_eq!(bob.decode(), LdpcStep::Decoded, "seed {seed}: rate {rate} frame {frame}");
            assert!(alice.reveal(0).unwrap().is_empty());
            let outcome = bob.finish();
            assert!(outcome.key == alice_key, "seed {seed}: rate {rate} frame {frame}");
            assert!(outcome.decoded);
            assert_eq!(outcome.messages, 1);
            assert_eq!(outcome.leak_bits, alice.leak_bits());
            assert_eq!(outcome.leak_bits, (code.n_checks() - n_punctured) as u64);
        }
    }
}

#[test]
fn blind_reveals_are_counted_exactly_and_failures_are_flagged() {
    let seed = 43;
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let n_bits = 3000;
    let code = LdpcCode::new(n_bits, 0.7, 0.1);
    let d = code.n_adaptation();
    // Far above the threshold even with every bit revealed (Q = 20 %, rate 0.7): Bob asks for
    // every punctured bit in turn, the leak grows by exactly what Alice reveals, and the frame
    // ends flagged as failed, never silently "decoded".
    let alice_key = random_key(&mut rng, n_bits);
    let bob_key = with_errors(&mut rng, &alice_key, n_bits / 5);
    let mut alice = LdpcAlice::new(&code, &alice_key, d, &mut rng).unwrap();
    let mut bob = LdpcBob::new(&code, &bob_key, 0.2, alice.syndrome().clone(), d, 3).unwrap();
    let mut revealed = 0;
    loop {
        match bob.decode() {
            LdpcStep::NeedReveal(count) => {
                let values = alice.reveal(count).unwrap();
                bob.receive_revealed(&values).unwrap();
                revealed += count;
                assert_eq!(bob.leak_bits(), alice.leak_bits());
                assert_eq!(bob.leak_bits(), (code.n_checks() - d + revealed) as u64);
            }
            LdpcStep::Failed => break,
            LdpcStep::Decoded => panic!("seed {seed}: a 20 % QBER frame cannot decode at rate 0.7"),
        }
    }
    assert_eq!(revealed, d);
    let outcome = bob.finish();
    assert!(!outcome.decoded);
    assert_eq!(outcome.leak_bits, code.n_checks() as u64);
    assert_eq!(outcome.messages, 4);
    assert!(alice.reveal(1).is_err(), "nothing left to reveal");
}

#[test]
fn blind_protocol_decodes_near_threshold_frames() {
    // Start below the threshold (all adaptation bits punctured): the reveals bring every frame
    // home, and the in-memory driver reports the leak Alice counted.
    let seed = 44;
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let family = LdpcFamily::new(4000);
    for qber in [0.03, 0.08] {
        let (rate_index, n_punctured) = family.select(qber, default_start_efficiency(qber));
        let code = family.code(rate_index);
        assert!(n_punctured <= code.n_adaptation());
        for frame in 0..4 {
            let alice_key = random_key(&mut rng, 4000);
            let bob_key = with_errors(&mut rng, &alice_key, (qber * 4000.0) as usize);
            let outcome = reconcile_in_memory(code, &alice_key, &bob_key, qber, n_punctured, 6, &mut rng).unwrap();
            assert!(outcome.decoded && outcome.key == alice_key, "seed {seed}: qber {qber} frame {frame}");
            let f = outcome.leak_bits as f64 / (4000.0 * binary_entropy(qber));
            assert!((1.0..2.0).contains(&f), "seed {seed}: qber {qber}: f = {f}");
        }
    }
}

#[test]
fn refuses_malformed_messages() {
    let mut rng = ChaCha20Rng::seed_from_u64(45);
    let code = LdpcCode::new(1000, 0.6, 0.1);
    let key = random_key(&mut rng, 1000);
    assert_eq!(
        LdpcAlice::new(&code, &random_key(&mut rng, 1001), 0, &mut rng).err(),
        Some(LdpcError::KeyLength { expected: 1000, got: 1001 })
    );
    assert!(matches!(
        LdpcBob::new(&code, &random_key(&mut rng, 1001), 0.05, BitVec::zeros(code.n_checks()), 0, 1),
        Err(LdpcError::KeyLength { .. })
    ));
    let alice = LdpcAlice::new(&code, &key, 10, &mut rng).unwrap();
    let short = BitVec::zeros(code.n_checks() - 1);
    assert!(matches!(LdpcBob::new(&code, &key, 0.05, short, 10, 1), Err(LdpcError::SyndromeLength { .. })));
    let mut bob = LdpcBob::new(&code, &key, 0.05, alice.syndrome().clone(), 10, 1).unwrap();
    assert!(matches!(bob.receive_revealed(&[true]), Err(LdpcError::RevealCount { .. })));
}

#[test]
fn start_efficiency_is_monotone_and_selection_fits() {
    let mut previous = f64::INFINITY;
    for q in [0.005, 0.01, 0.02, 0.03, 0.05, 0.08, 0.11, 0.2] {
        let f = default_start_efficiency(q);
        assert!(f <= previous && f >= 1.0, "q={q}: {f}");
        previous = f;
    }
    let family = LdpcFamily::new(2000);
    for q in [0.01, 0.05, 0.11] {
        let (index, punctured) = family.select(q, 1.1);
        let code = family.code(index);
        let start_leak = code.leak_with_punctured(punctured) as f64;
        let target = 1.1 * 2000.0 * binary_entropy(q);
        assert!(start_leak >= target - 1.0 || punctured == code.n_adaptation(), "q={q}");
    }
}

#[test]
fn a_short_last_frame_is_shortened_and_pays_only_for_its_bits() {
    // A 3000-bit frame under the code of 10 000-bit frames: the 7000 missing bits are known
    // zeros, so the start leak follows the frame's own length and decoding succeeds.
    let mut rng = ChaCha20Rng::seed_from_u64(46);
    let family = LdpcFamily::new(10_000);
    let q = 0.05;
    let alice_key = random_key(&mut rng, 3000);
    let bob_key = with_errors(&mut rng, &alice_key, 150);
    let (index, punctured) = family.select_for_length(q, default_start_efficiency(q), 3000);
    let code = family.code(index);
    let outcome = reconcile_in_memory(code, &alice_key, &bob_key, q, punctured, 10, &mut rng).unwrap();
    assert!(outcome.decoded);
    assert_eq!(outcome.key, alice_key);
    let h = binary_entropy(q);
    let f = outcome.leak_bits as f64 / (3000.0 * h);
    assert!(f < 2.0, "efficiency {f} of a shortened frame");
    assert!(outcome.leak_bits < code.n_checks() as u64, "leak below the full syndrome");
}
