use std::sync::Arc;

use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

use super::*;

/// POLYVAL's field, computed directly: an element is a u128 whose bit i is the coefficient of
/// x^i (RFC 8452 reads the 16 bytes little endian); the modulus is
/// x^128 + x^127 + x^126 + x^121 + 1.
mod reference {
    /// The carry-less (GF(2)[x]) product of `a` and `b`, 256 bits as (low, high).
    pub fn clmul(a: u128, b: u128) -> (u128, u128) {
        let (mut lo, mut hi) = (0u128, 0u128);
        for i in 0..128 {
            if (b >> i) & 1 == 1 {
                lo ^= a << i;
                if i > 0 {
                    hi ^= a >> (128 - i);
                }
            }
        }
        (lo, hi)
    }

    /// dot(a, b) = a b x^-128 mod P (RFC 8452, section 3): the product, then 128 times: add P
    /// when the constant term is 1 (P's is), divide by x.
    pub fn dot(a: u128, b: u128) -> u128 {
        let (mut lo, mut hi) = clmul(a, b);
        // P without its x^128 term; the x^128 term is bit 0 of `hi`.
        let p_low: u128 = 1 | (1 << 121) | (1 << 126) | (1 << 127);
        for _ in 0..128 {
            if lo & 1 == 1 {
                lo ^= p_low;
                hi ^= 1;
            }
            lo = (lo >> 1) | ((hi & 1) << 127);
            hi >>= 1;
        }
        assert_eq!(hi, 0, "the quotient step leaves a reduced element");
        lo
    }

    /// POLYVAL(H, X_1, ..., X_s): S_j = dot(S_{j-1} + X_j, H).
    pub fn polyval(h: &[u8; 16], blocks: &[[u8; 16]]) -> [u8; 16] {
        let h = u128::from_le_bytes(*h);
        let mut s = 0u128;
        for x in blocks {
            s = dot(s ^ u128::from_le_bytes(*x), h);
        }
        s.to_le_bytes()
    }
}

fn hex16(s: &str) -> [u8; 16] {
    hex::decode(s).unwrap().try_into().unwrap()
}

#[test]
fn the_reference_field_arithmetic_matches_rfc_8452() {
    // RFC 8452, Appendix A: POLYVAL(H, X_1, X_2).
    let h = hex16("25629347589242761d31f826ba4b757b");
    let x1 = hex16("4f4f95668c83dfb6401762bb2d01a262");
    let x2 = hex16("d1a24ddd2721d006bbe45f20d3c9f362");
    assert_eq!(reference::polyval(&h, &[x1, x2]), hex16("f7a3b47b846119fae5b7866cf5e5b77e"));
    // x^128 x^-128 = 1 and the field's identity for dot is x^128 mod P.
    let x128_mod_p = 1u128 | (1 << 121) | (1 << 126) | (1 << 127);
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    for _ in 0..100 {
        let a: u128 = rng.random();
        assert_eq!(reference::dot(a, x128_mod_p), a);
    }
}

#[test]
fn the_hash_is_polyval_over_label_padded_message_and_length_exactly() {
    let mut rng = ChaCha20Rng::seed_from_u64(2);
    for len in (0..70).chain([255, 256, 257, 1000, 4096 + 3]) {
        let mut key = [0u8; 16];
        rng.fill_bytes(&mut key);
        let mut transcript = vec![0u8; len];
        rng.fill_bytes(&mut transcript);
        for direction in [Direction::AliceToBob, Direction::BobToAlice] {
            let (hash, blocks) = uh_hash(&key, direction, &transcript);
            // The message as the reference hashes it: label, the transcript zero-padded to whole
            // blocks, the length block (the message's length in bits).
            let mut expected_blocks = vec![*direction.label()];
            for chunk in transcript.chunks(16) {
                let mut block = [0u8; 16];
                block[..chunk.len()].copy_from_slice(chunk);
                expected_blocks.push(block);
            }
            let mut length = [0u8; 16];
            length[..8].copy_from_slice(&(((16 + len) * 8) as u64).to_le_bytes());
            expected_blocks.push(length);
            assert_eq!(hash, reference::polyval(&key, &expected_blocks), "length {len}");
            // The bound's L is the number of blocks hashed.
            assert_eq!(blocks, expected_blocks.len() as u64);
            assert_eq!(blocks, hash_blocks(16 + len as u64));
            assert_eq!(eps_per_tag(16 + len as u64), blocks as f64 / 2f64.powi(128));
        }
    }
}

#[test]
fn the_budget_charges_two_tags_of_the_longest_transcript_per_block() {
    let per_tag = eps_per_tag(16 + MAX_TRANSCRIPT_BYTES);
    assert_eq!(per_tag, (hash_blocks(16 + MAX_TRANSCRIPT_BYTES)) as f64 / 2f64.powi(128));
    assert_eq!(eps_auth_per_block(), 2.0 * per_tag);
    // About 2^-101 per block.
    assert!(eps_auth_per_block() < 1e-30 && eps_auth_per_block() > 1e-31, "{}", eps_auth_per_block());
    let budget = crate::postproc::finite_key::EpsBudget::from_total(1e-9);
    assert_eq!(budget.eps_auth, eps_auth_per_block());
}

#[test]
fn tags_separate_directions_messages_lengths_and_pads() {
    let key = [7u8; 16];
    let pad = [9u8; 16];
    let transcript = b"some transcript bytes".to_vec();
    let t = tag(&key, &pad, Direction::AliceToBob, &transcript);
    assert!(tag_matches(&key, &pad, Direction::AliceToBob, &transcript, &t));
    assert!(!tag_matches(&key, &pad, Direction::BobToAlice, &transcript, &t));
    assert!(!tag_matches(&key, &[8u8; 16], Direction::AliceToBob, &transcript, &t));
    assert!(!tag_matches(&key, &pad, Direction::AliceToBob, &transcript, &t[..15]));
    // Trailing zeros change the length block.
    let mut longer = transcript.clone();
    longer.push(0);
    assert!(!tag_matches(&key, &pad, Direction::AliceToBob, &longer, &t));
    for bit in 0..transcript.len() * 8 {
        let mut flipped = transcript.clone();
        flipped[bit / 8] ^= 1 << (bit % 8);
        assert!(!tag_matches(&key, &pad, Direction::AliceToBob, &flipped, &t), "bit {bit}");
    }
}

#[test]
fn positions_are_taken_once_at_each_end_and_keys_are_replaced_after_a_failure() {
    let secret: Vec<u8> = (0..200u8).collect();
    let (alice, bob) = (Arc::new(MemoryAuthPool::new(&secret)), Arc::new(MemoryAuthPool::new(&secret)));
    let first = alice_allocate(alice.as_ref()).unwrap().unwrap();
    assert_eq!((first.key_offset, first.pad_offset, first.spent_bits), (0, 128, 384));
    assert_eq!(alice.watermark().unwrap(), 384);
    let at_bob = bob_accept(bob.as_ref(), first.key_offset, first.pad_offset).unwrap().unwrap();
    assert_eq!(bob.watermark().unwrap(), 384);
    let t = first.tag(Direction::AliceToBob, b"x");
    assert!(at_bob.verify(Direction::AliceToBob, b"x", &t));
    // A replay of the same positions is refused at Bob, and spends nothing.
    let replay = bob_accept(bob.as_ref(), first.key_offset, first.pad_offset).unwrap().unwrap_err();
    assert_eq!(replay.reason, AbortReason::AuthenticationFailed);
    assert_eq!(bob.watermark().unwrap(), 384);
    // The key is recycled.
    let second = alice_allocate(alice.as_ref()).unwrap().unwrap();
    assert_eq!((second.key_offset, second.pad_offset, second.spent_bits), (0, 384, 256));
    bob_accept(bob.as_ref(), 0, 384).unwrap().unwrap();
    // After a failure at Bob, Alice's recycled key is refused until she replaces it too.
    retire_hash_key(bob.as_ref(), 0).unwrap();
    let third = alice_allocate(alice.as_ref()).unwrap().unwrap();
    let refused = bob_accept(bob.as_ref(), third.key_offset, third.pad_offset).unwrap().unwrap_err();
    assert_eq!(refused.reason, AbortReason::AuthenticationFailed);
    retire_hash_key(alice.as_ref(), 0).unwrap();
    let fourth = alice_allocate(alice.as_ref()).unwrap().unwrap();
    assert_eq!((fourth.key_offset, fourth.pad_offset), (896, 1024));
    bob_accept(bob.as_ref(), fourth.key_offset, fourth.pad_offset).unwrap().unwrap();
    // 1600 bits in the pool, 1280 spent: the next block needs 256 and finds 320.
    assert_eq!(alice.available_bits().unwrap(), 1600 - 1280);
    alice_allocate(alice.as_ref()).unwrap().unwrap();
    let exhausted = alice_allocate(alice.as_ref()).unwrap().unwrap_err();
    assert_eq!(exhausted.reason, AbortReason::AuthPoolExhausted);
    assert!(exhausted.to_string().contains("64 unused bits"), "{exhausted}");
    let more = Uuid::from_u128(9);
    alice.stage_secret(more, &[0u8; 32]).unwrap();
    alice.apply_secret(more).unwrap();
    alice_allocate(alice.as_ref()).unwrap().unwrap();
    // The watermark never moves back.
    assert!(alice.advance_watermark(0).is_err());
}

#[test]
fn refills_join_the_stream_only_when_settled_ready() {
    let pool = MemoryAuthPool::new(&[1u8; 16]);
    let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
    pool.stage_refill(a, &[2u8; 16]).unwrap();
    pool.stage_refill(b, &[3u8; 16]).unwrap();
    assert_eq!(pool.total_bits().unwrap(), 128);
    pool.settle_all(&mut |id| Ok(id == a)).unwrap();
    assert_eq!(pool.total_bits().unwrap(), 256);
    assert!(pool.staged_refills().unwrap().is_empty());
    assert_eq!(*pool.hash_key(128).unwrap(), [2u8; 16]);
}

#[test]
fn secrets_are_applied_at_both_ends_at_the_same_position_or_the_block_is_refused() {
    let (alice, bob) = (MemoryAuthPool::new(&[1u8; 16]), MemoryAuthPool::new(&[1u8; 16]));
    let (s1, s2, s3) = (Uuid::from_u128(1), Uuid::from_u128(2), Uuid::from_u128(3));
    let ids = |pool: &MemoryAuthPool| pool.staged_secrets().unwrap().iter().map(Uuid::to_string).collect::<Vec<_>>();
    // Nothing staged: nothing to apply.
    assert_eq!(alice_sync_secrets(&alice, 128, &ids(&bob)).unwrap().unwrap(), Vec::<Uuid>::new());
    // s2 at both ends, s1 at Alice only, s3 at Bob only: s2 alone is applied, at both.
    alice.stage_secret(s2, &[2u8; 16]).unwrap();
    alice.stage_secret(s1, &[1u8; 16]).unwrap();
    bob.stage_secret(s2, &[2u8; 16]).unwrap();
    bob.stage_secret(s3, &[3u8; 16]).unwrap();
    let apply = alice_sync_secrets(&alice, bob.total_bits().unwrap(), &ids(&bob)).unwrap().unwrap();
    assert_eq!(apply, vec![s2]);
    let names: Vec<String> = apply.iter().map(Uuid::to_string).collect();
    bob_apply_secrets(&bob, &names).unwrap().unwrap();
    assert_eq!(alice.applied_secrets().unwrap(), bob.applied_secrets().unwrap());
    assert_eq!(alice.applied_secrets().unwrap(), vec![AppliedSecret { id: s2, position: 128, bits: 128 }]);
    assert_eq!((alice.total_bits().unwrap(), bob.total_bits().unwrap()), (256, 256));
    // Bob lost Alice's answer (a crash) after she applied s1 (now installed at Bob too): his
    // shorter stream is hers without s1, which he applies on the next StartBlock.
    bob.stage_secret(s1, &[1u8; 16]).unwrap();
    let apply = alice_sync_secrets(&alice, 256, &ids(&bob)).unwrap().unwrap();
    assert_eq!(apply, vec![s1]);
    let again = alice_sync_secrets(&alice, 256, &[]).unwrap().unwrap();
    assert_eq!(again, vec![s1], "what Bob lacks is named until he has it");
    bob_apply_secrets(&bob, &[s1.to_string()]).unwrap().unwrap();
    bob_apply_secrets(&bob, &[s1.to_string()]).unwrap().unwrap();
    assert_eq!(bob.total_bits().unwrap(), alice.total_bits().unwrap());
    assert_eq!(*bob.pad(256, 128).unwrap(), *alice.pad(256, 128).unwrap());
    // Streams no applied secret explains: refused, nothing applied.
    let differ = alice_sync_secrets(&alice, 128 + 8, &ids(&bob)).unwrap().unwrap_err();
    assert_eq!(differ.reason, AbortReason::AuthPoolsDiffer);
    assert!(differ.to_string().contains("holds 384 bits and Bob's 136"), "{differ}");
    let longer = alice_sync_secrets(&alice, 1024, &[]).unwrap().unwrap_err();
    assert_eq!(longer.reason, AbortReason::AuthPoolsDiffer);
    // A secret Alice names that Bob does not hold: refused, naming it.
    let missing = bob_apply_secrets(&bob, &[s3.to_string(), Uuid::from_u128(4).to_string()]).unwrap().unwrap_err();
    assert_eq!(missing.reason, AbortReason::AuthPoolsDiffer);
    assert!(missing.to_string().contains(&Uuid::from_u128(4).to_string()), "{missing}");
}
