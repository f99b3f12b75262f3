use super::*;
use crate::{BlockMeta, KeyStore};

fn meta() -> BlockMeta {
    BlockMeta {
        block_id: Uuid::new_v4(),
        created_unix_ms: 1,
        n_sifted_bits: 1000,
        qber_z: 0.02,
        qber_x: 0.03,
        phase_error_upper: 0.05,
        leak_bits: 300,
        final_bits: 256,
        simulated: false,
    }
}

/// A temporary store with `n` ready units; unit `i` is filled with byte `i`.
fn store_with_units(n: usize) -> (SledStore, Vec<KeyUnit>) {
    let store = SledStore::temporary().unwrap();
    let units: Vec<KeyUnit> =
        (0..n).map(|i| KeyUnit { key_id: Uuid::new_v4(), key: Zeroizing::new(vec![i as u8; UNIT_BYTES]) }).collect();
    store.put_ready(&meta(), &units).unwrap();
    (store, units)
}

fn reservation(units: &[&KeyUnit], size_bits: u32, slaves: &[&str]) -> KeyReservation {
    KeyReservation {
        key_id: Uuid::new_v4(),
        unit_ids: units.iter().map(|u| u.key_id).collect(),
        size_bits,
        master: "m".into(),
        slaves: slaves.iter().map(|s| s.to_string()).collect(),
        created_unix_ms: 1000,
    }
}

fn ready_count(store: &SledStore) -> usize {
    store.count_ready_units(usize::MAX, |_| true).unwrap()
}

#[test]
fn combine_units_concatenates_and_truncates() {
    let (a, b) = ([1u8; UNIT_BYTES], [2u8; UNIT_BYTES]);
    let key = combine_units([a.as_slice(), b.as_slice()], 320);
    assert_eq!(key.len(), 40);
    assert_eq!(&key[..32], &a);
    assert_eq!(&key[32..], &[2u8; 8]);
    assert_eq!(combine_units([a.as_slice()], 64).as_slice(), &[1u8; 8]);
}

#[test]
fn reserved_key_is_delivered_once_to_its_slave() {
    let (store, units) = store_with_units(4);
    let r = reservation(&[&units[0], &units[1]], 512, &["s"]);
    store.reserve_keys(std::slice::from_ref(&r)).unwrap();
    assert_eq!(ready_count(&store), 2);
    assert_eq!(store.reserved_key_count().unwrap(), 1);

    // Another SAE: refused, nothing changes.
    assert!(matches!(store.deliver_reserved_keys(&[r.key_id], "m", "x"), Err(KmeStoreError::NotSlave(_))));
    // The slave with the wrong master: not found.
    assert!(matches!(store.deliver_reserved_keys(&[r.key_id], "x", "s"), Err(KmeStoreError::NotFound(_))));
    let keys = store.deliver_reserved_keys(&[r.key_id], "m", "s").unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0].key_id, r.key_id);
    let mut expected = vec![0u8; 32];
    expected.extend_from_slice(&[1u8; 32]);
    assert_eq!(keys[0].key.as_slice(), expected.as_slice());
    assert_eq!(store.reserved_key_count().unwrap(), 0);
    assert!(matches!(store.deliver_reserved_keys(&[r.key_id], "m", "s"), Err(KmeStoreError::NotFound(_))));
}

#[test]
fn reservation_with_a_missing_unit_changes_nothing() {
    let (store, units) = store_with_units(3);
    store.take_ready_units(&[units[2].key_id]).unwrap();
    let ok = reservation(&[&units[0]], 256, &["s"]);
    let bad = reservation(&[&units[1], &units[2]], 512, &["s"]);
    match store.reserve_keys(&[ok.clone(), bad]) {
        Err(KmeStoreError::MissingUnits(missing)) => assert_eq!(missing, vec![units[2].key_id]),
        other => panic!("expected missing units, got {other:?}"),
    }
    assert_eq!(ready_count(&store), 2);
    assert_eq!(store.reserved_key_count().unwrap(), 0);
    // A duplicate key ID is refused too.
    store.reserve_keys(std::slice::from_ref(&ok)).unwrap();
    let mut again = reservation(&[&units[1]], 256, &["s"]);
    again.key_id = ok.key_id;
    assert!(matches!(store.reserve_keys(&[again]), Err(KmeStoreError::DuplicateReservation(_))));
    assert_eq!(ready_count(&store), 1);
}

#[test]
fn delivery_of_a_batch_is_all_or_nothing() {
    let (store, units) = store_with_units(2);
    let r = reservation(&[&units[0]], 256, &["s"]);
    store.reserve_keys(std::slice::from_ref(&r)).unwrap();
    let unknown = Uuid::new_v4();
    assert!(
        matches!(store.deliver_reserved_keys(&[r.key_id, unknown], "m", "s"), Err(KmeStoreError::NotFound(id)) if id == unknown)
    );
    assert_eq!(store.deliver_reserved_keys(&[r.key_id], "m", "s").unwrap().len(), 1);
}

#[test]
fn multicast_key_is_erased_after_every_slave_fetched_it() {
    let (store, units) = store_with_units(1);
    let r = reservation(&[&units[0]], 128, &["s1", "s2"]);
    store.reserve_keys(std::slice::from_ref(&r)).unwrap();
    let first = store.deliver_reserved_keys(&[r.key_id], "m", "s1").unwrap();
    assert!(matches!(store.deliver_reserved_keys(&[r.key_id], "m", "s1"), Err(KmeStoreError::NotFound(_))));
    assert_eq!(store.reserved_key_count().unwrap(), 1);
    let second = store.deliver_reserved_keys(&[r.key_id], "m", "s2").unwrap();
    assert_eq!(first[0].key.as_slice(), second[0].key.as_slice());
    assert_eq!(second[0].key.len(), 16);
    assert_eq!(store.reserved_key_count().unwrap(), 0);
}

#[test]
fn take_is_all_or_nothing_and_discard_ignores_missing_units() {
    let (store, units) = store_with_units(3);
    let stranger = Uuid::new_v4();
    assert!(
        matches!(store.take_ready_units(&[units[0].key_id, stranger]), Err(KmeStoreError::MissingUnits(m)) if m == vec![stranger])
    );
    assert_eq!(ready_count(&store), 3);
    store.take_ready_units(&[units[0].key_id]).unwrap();
    assert_eq!(store.discard_ready_units(&[units[0].key_id, units[1].key_id, stranger]).unwrap(), 1);
    assert_eq!(ready_count(&store), 1);
    let selected = store.select_ready_units(5, |_| true).unwrap();
    assert_eq!(selected.len(), 1);
    assert_eq!(selected[0].key_id, units[2].key_id);
}

#[test]
fn old_reservations_are_purged() {
    let (store, units) = store_with_units(2);
    let old = reservation(&[&units[0]], 256, &["s"]);
    let mut new = reservation(&[&units[1]], 256, &["s"]);
    new.created_unix_ms = 5000;
    store.reserve_keys(&[old.clone(), new.clone()]).unwrap();
    assert_eq!(store.purge_reservations(2000).unwrap(), 1);
    assert!(matches!(store.deliver_reserved_keys(&[old.key_id], "m", "s"), Err(KmeStoreError::NotFound(_))));
    assert_eq!(store.deliver_reserved_keys(&[new.key_id], "m", "s").unwrap().len(), 1);
}

#[test]
fn cancelling_a_recorded_reservation_erases_it_and_gives_no_unit_back() {
    let (store, units) = store_with_units(4);
    let r = reservation(&[&units[0], &units[1]], 512, &["s"]);
    store.reserve_keys(std::slice::from_ref(&r)).unwrap();
    assert_eq!(store.cancel_reservations(&[r.key_id], 2000).unwrap(), vec![true]);
    assert_eq!(store.reserved_key_count().unwrap(), 0);
    // The units are lost here as at the asking KME, which discards them.
    assert_eq!(ready_count(&store), 2);
    assert!(matches!(store.deliver_reserved_keys(&[r.key_id], "m", "s"), Err(KmeStoreError::NotFound(_))));
    // Asking again (the first answer was lost) gives the same answer.
    assert_eq!(store.cancel_reservations(&[r.key_id], 3000).unwrap(), vec![true]);
    // The key ID can never be reserved again, even with units that are ready.
    let mut again = reservation(&[&units[2]], 256, &["s"]);
    again.key_id = r.key_id;
    assert!(matches!(store.reserve_keys(&[again]), Err(KmeStoreError::Cancelled(id)) if id == r.key_id));
    assert_eq!(ready_count(&store), 2);
    assert_eq!(store.reserved_key_count().unwrap(), 0);
}

#[test]
fn cancelling_an_unknown_key_refuses_its_late_reservation() {
    let (store, units) = store_with_units(3);
    let late = reservation(&[&units[0]], 256, &["s"]);
    let recorded = reservation(&[&units[1]], 256, &["s"]);
    store.reserve_keys(std::slice::from_ref(&recorded)).unwrap();
    assert_eq!(store.cancel_reservations(&[late.key_id, recorded.key_id], 2000).unwrap(), vec![false, true]);
    assert_eq!(store.reserved_key_count().unwrap(), 0);
    // The request that was cancelled before it arrived is refused as a whole: nothing changes.
    let other = reservation(&[&units[2]], 256, &["s"]);
    assert!(
        matches!(store.reserve_keys(&[other.clone(), late.clone()]), Err(KmeStoreError::Cancelled(id)) if id == late.key_id)
    );
    assert_eq!(ready_count(&store), 2);
    assert_eq!(store.reserved_key_count().unwrap(), 0);
    assert_eq!(store.cancel_reservations(&[late.key_id], 3000).unwrap(), vec![false]);
    // Other key IDs are unaffected.
    store.reserve_keys(&[other]).unwrap();
    assert_eq!(ready_count(&store), 1);
}

#[test]
fn a_reservation_already_delivered_is_not_cancelled() {
    let (store, units) = store_with_units(1);
    let r = reservation(&[&units[0]], 256, &["s1", "s2"]);
    store.reserve_keys(std::slice::from_ref(&r)).unwrap();
    let first = store.deliver_reserved_keys(&[r.key_id], "m", "s1").unwrap();
    assert_eq!(store.cancel_reservations(&[r.key_id], 2000).unwrap(), vec![false]);
    assert_eq!(store.reserved_key_count().unwrap(), 1);
    let second = store.deliver_reserved_keys(&[r.key_id], "m", "s2").unwrap();
    assert_eq!(first[0].key.as_slice(), second[0].key.as_slice());
}

#[test]
fn cancellation_tombstones_expire_with_reservations() {
    let (store, units) = store_with_units(2);
    let (old, new) = (reservation(&[&units[0]], 256, &["s"]), reservation(&[&units[1]], 256, &["s"]));
    assert_eq!(store.cancel_reservations(&[old.key_id], 1000).unwrap(), vec![false]);
    assert_eq!(store.cancel_reservations(&[new.key_id], 5000).unwrap(), vec![false]);
    assert_eq!(store.purge_reservations(2000).unwrap(), 0);
    assert!(matches!(store.reserve_keys(std::slice::from_ref(&new)), Err(KmeStoreError::Cancelled(_))));
    store.reserve_keys(std::slice::from_ref(&old)).unwrap();
    assert_eq!(store.reserved_key_count().unwrap(), 1);
}

#[test]
fn cancellation_tombstones_survive_a_reopen() {
    let dir = std::env::temp_dir().join(format!("qkd-kme-store-test-{}", Uuid::new_v4()));
    let unit = KeyUnit { key_id: Uuid::new_v4(), key: Zeroizing::new(vec![9u8; UNIT_BYTES]) };
    let r = reservation(&[&unit], 256, &["s"]);
    {
        let store = SledStore::open(&dir, &crate::custody::test_kek()).unwrap();
        store.put_ready(&meta(), std::slice::from_ref(&unit)).unwrap();
        assert_eq!(store.cancel_reservations(&[r.key_id], 2000).unwrap(), vec![false]);
    }
    {
        let store = SledStore::open(&dir, &crate::custody::test_kek()).unwrap();
        assert!(matches!(store.reserve_keys(std::slice::from_ref(&r)), Err(KmeStoreError::Cancelled(_))));
        assert_eq!(ready_count(&store), 1);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn reservations_survive_a_reopen() {
    let dir = std::env::temp_dir().join(format!("qkd-kme-store-test-{}", Uuid::new_v4()));
    let unit = KeyUnit { key_id: Uuid::new_v4(), key: Zeroizing::new(vec![9u8; UNIT_BYTES]) };
    let r = reservation(&[&unit], 256, &["s"]);
    {
        let store = SledStore::open(&dir, &crate::custody::test_kek()).unwrap();
        store.put_ready(&meta(), std::slice::from_ref(&unit)).unwrap();
        store.reserve_keys(std::slice::from_ref(&r)).unwrap();
    }
    {
        let store = SledStore::open(&dir, &crate::custody::test_kek()).unwrap();
        assert_eq!(ready_count(&store), 0);
        assert_eq!(store.deliver_reserved_keys(&[r.key_id], "m", "s").unwrap()[0].key.as_slice(), &[9u8; 32]);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn selection_after_a_cursor_wraps_around_and_sees_every_unit_once() {
    let (store, _) = store_with_units(10);
    let all: Vec<Uuid> = store.select_ready_units(100, |_| true).unwrap().iter().map(|u| u.key_id).collect();
    assert_eq!(all.len(), 10);
    assert!(all.windows(2).all(|w| w[0] < w[1]), "key-ID order");
    // After the fourth unit: the six later ones, then the first four, the cursor's unit last.
    let wrapped: Vec<Uuid> =
        store.select_ready_units_after(Some(&all[3]), 100, |_| true).unwrap().iter().map(|u| u.key_id).collect();
    let expected: Vec<Uuid> = all[4..].iter().chain(&all[..4]).copied().collect();
    assert_eq!(wrapped, expected);
    // A cursor that is no longer in the store (taken) works the same way.
    store.take_ready_units(&[all[3]]).unwrap();
    let picked = store.select_ready_units_after(Some(&all[3]), 2, |id| *id != all[4]).unwrap();
    assert_eq!(picked.iter().map(|u| u.key_id).collect::<Vec<_>>(), vec![all[5], all[6]]);
    assert_eq!(store.select_ready_units_after(Some(&all[9]), 3, |_| true).unwrap()[0].key_id, all[0]);
}

#[test]
fn units_of_a_block_not_committed_here_are_not_yet_ready_rather_than_missing() {
    // The block is ready at the peer KME (Alice commits first) and still pending here (Bob).
    let store = SledStore::temporary().unwrap();
    let block = meta();
    let units: Vec<KeyUnit> =
        (0..2).map(|i| KeyUnit { key_id: Uuid::new_v4(), key: Zeroizing::new(vec![i as u8; UNIT_BYTES]) }).collect();
    store.put_pending(&block, &units).unwrap();
    let r = reservation(&[&units[0]], 256, &["s"]);
    match store.reserve_keys(std::slice::from_ref(&r)) {
        Err(KmeStoreError::NotYetReady(ids)) => assert_eq!(ids, vec![units[0].key_id]),
        other => panic!("expected not yet ready, got {other:?}"),
    }
    assert_eq!(store.reserved_key_count().unwrap(), 0);
    // Once committed here, the same reservation succeeds.
    store.mark_ready(block.block_id).unwrap();
    store.reserve_keys(std::slice::from_ref(&r)).unwrap();
    assert_eq!(ready_count(&store), 1);
    // A unit this store never had is still missing.
    let stranger = KeyUnit { key_id: Uuid::new_v4(), key: Zeroizing::new(vec![9; UNIT_BYTES]) };
    assert!(matches!(
        store.reserve_keys(&[reservation(&[&stranger], 256, &["s"])]),
        Err(KmeStoreError::MissingUnits(_))
    ));
}

/// The re-agreement's operations on sled (`KeyStore::holdings`, `discard_units`,
/// `drop_reservations`): holdings list the units still held per block (a reserved unit is no
/// longer held), discarding removes ready units only and erases them, durably; dropping
/// reservations erases them all (a slave can no longer fetch them) and keeps the tombstones.
#[test]
fn holdings_discards_and_dropped_reservations_after_a_reopen() {
    let dir = std::env::temp_dir().join(format!("qkd-store-reagree-{}", Uuid::new_v4()));
    let kek = crate::custody::test_kek();
    let pending_block = Uuid::new_v4();
    let (ready_block, units) = {
        let store = SledStore::open(&dir, &kek).unwrap();
        let units: Vec<KeyUnit> = (0..5)
            .map(|i| KeyUnit { key_id: Uuid::new_v4(), key: Zeroizing::new(vec![i as u8; UNIT_BYTES]) })
            .collect();
        let m = BlockMeta { final_bits: 5 * 256, ..meta() };
        store.put_ready(&m, &units).unwrap();
        let mut pending_meta = meta();
        pending_meta.block_id = pending_block;
        let pending_units = [KeyUnit { key_id: Uuid::new_v4(), key: Zeroizing::new(vec![9; UNIT_BYTES]) }];
        store.put_pending(&pending_meta, &pending_units).unwrap();
        let r = reservation(&[&units[0]], 256, &["s"]);
        store.reserve_keys(std::slice::from_ref(&r)).unwrap();
        store.cancel_reservations(&[Uuid::new_v4()], 1000).unwrap();
        // Units 1 and 3 discarded; the pending unit is not.
        assert_eq!(store.discard_units(&[units[1].key_id, units[3].key_id, pending_units[0].key_id]).unwrap(), 2);
        assert_eq!(store.drop_reservations().unwrap(), 1);
        assert!(matches!(store.deliver_reserved_keys(&[r.key_id], "m", "s"), Err(KmeStoreError::NotFound(_))));
        (m.block_id, units)
    };
    let store = SledStore::open(&dir, &kek).unwrap();
    assert!(store.verify().unwrap().is_healthy());
    let holdings = store.holdings().unwrap();
    assert_eq!(holdings.blocks.len(), 2);
    let ready = holdings.blocks.iter().find(|b| b.block_id == ready_block).unwrap();
    assert_eq!(ready.key_ids, units.iter().map(|u| u.key_id).collect::<Vec<_>>());
    assert_eq!(ready.held, vec![false, false, true, false, true]);
    let pending = holdings.blocks.iter().find(|b| b.block_id == pending_block).unwrap();
    assert_eq!((pending.state, pending.held.as_slice()), (crate::BlockState::Pending, &[true][..]));
    assert_eq!(store.reserved_key_count().unwrap(), 0);
    assert_eq!(store.n_units().unwrap(), 3);
    assert_eq!(store.drop_reservations().unwrap(), 0);
}

/// A daemon's store holds its reservations back until the re-agreement at Hello: a slave's
/// fetch is refused, nothing changes, and after `KeyStore::reagreed` the key is handed out once.
#[test]
fn reservations_held_until_reagreed_are_then_delivered_once() {
    let (store, units) = store_with_units(2);
    let r = reservation(&[&units[0]], 256, &["s"]);
    store.reserve_keys(std::slice::from_ref(&r)).unwrap();
    store.hold_reservations_until_reagreed();
    assert!(matches!(store.deliver_reserved_keys(&[r.key_id], "m", "s"), Err(KmeStoreError::AwaitingReagreement)));
    assert_eq!(store.reserved_key_count().unwrap(), 1);
    store.reagreed();
    assert!(!store.reservations_held());
    assert_eq!(store.deliver_reserved_keys(&[r.key_id], "m", "s").unwrap().len(), 1);
    assert!(matches!(store.deliver_reserved_keys(&[r.key_id], "m", "s"), Err(KmeStoreError::NotFound(_))));
}
