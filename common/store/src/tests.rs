use super::*;

/// Metadata of a block of `n` 256-bit units.
pub(crate) fn meta(block_id: Uuid, n: usize) -> BlockMeta {
    BlockMeta {
        block_id,
        created_unix_ms: 1,
        n_sifted_bits: 1000,
        qber_z: 0.02,
        qber_x: 0.03,
        phase_error_upper: 0.05,
        leak_bits: 300,
        final_bits: 256 * n as u64,
        simulated: false,
    }
}

fn units(n: usize, fill: u8) -> Vec<KeyUnit> {
    (0..n)
        .map(|i| KeyUnit { key_id: Uuid::new_v4(), key: Zeroizing::new(vec![fill.wrapping_add(i as u8); 32]) })
        .collect()
}

#[test]
fn pending_keys_are_not_summarised_until_ready() {
    let dir = tempdir();
    let store = SledStore::open(&dir, &crate::custody::test_kek()).unwrap();
    let block = Uuid::new_v4();
    store.put_pending(&meta(block, 2), &units(2, 7)).unwrap();
    assert_eq!(store.summary().unwrap().n_keys, 0);
    assert_eq!(store.pending_blocks().unwrap(), vec![block]);
    store.mark_ready(block).unwrap();
    let summary = store.summary().unwrap();
    assert_eq!((summary.n_keys, summary.n_key_bits, summary.n_pending_blocks), (2, 512, 0));
    assert_eq!(store.block_state(block).unwrap(), Some(BlockState::Ready));
}

#[test]
fn same_keys_give_same_digest_whatever_the_path() {
    let (dir_a, dir_b) = (tempdir(), tempdir());
    let (a, b) = (
        SledStore::open(&dir_a, &crate::custody::test_kek()).unwrap(),
        SledStore::open(&dir_b, &crate::custody::test_kek()).unwrap(),
    );
    let block = Uuid::new_v4();
    let keys = units(3, 1);
    a.put_ready(&meta(block, 3), &keys).unwrap();
    b.put_pending(&meta(block, 3), &keys).unwrap();
    b.mark_ready(block).unwrap();
    assert_eq!(a.summary().unwrap(), b.summary().unwrap());
    // A different key byte changes the digest.
    let c_dir = tempdir();
    let c = SledStore::open(&c_dir, &crate::custody::test_kek()).unwrap();
    let mut other = keys.clone();
    other[1].key[0] ^= 1;
    c.put_ready(&meta(block, 3), &other).unwrap();
    assert_ne!(a.summary().unwrap().digest, c.summary().unwrap().digest);
}

#[test]
fn dropped_pending_block_leaves_nothing_and_survives_reopen() {
    let dir = tempdir();
    let block = Uuid::new_v4();
    {
        let store = SledStore::open(&dir, &crate::custody::test_kek()).unwrap();
        store.put_pending(&meta(block, 2), &units(2, 0)).unwrap();
        assert!(matches!(store.put_pending(&meta(block, 1), &units(1, 0)), Err(StoreError::DuplicateBlock(_))));
    }
    let store = SledStore::open(&dir, &crate::custody::test_kek()).unwrap();
    assert_eq!(store.pending_blocks().unwrap(), vec![block]);
    store.drop_pending(block).unwrap();
    assert_eq!(store.block_state(block).unwrap(), None);
    assert_eq!(store.summary().unwrap().n_keys, 0);
    assert_eq!(count(&store.trees().pending), 0);
}

/// Entries of a tree (read to its end; these tests' stores never fail).
fn count(tree: &sled::Tree) -> usize {
    count_entries(tree).unwrap() as usize
}

fn tempdir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("qkd-store-test-{}", Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn concurrent_writers_sharing_flushes_all_find_their_blocks_after_a_reopen() {
    // Group commit: eight threads store blocks at once, each waiting for a flush that started
    // after its write; every block is on disk when the store is opened again.
    let dir = tempdir();
    let store = std::sync::Arc::new(SledStore::open(&dir, &crate::custody::test_kek()).unwrap());
    let threads: Vec<_> = (0..8u8)
        .map(|t| {
            let store = store.clone();
            std::thread::spawn(move || {
                (0..20u8)
                    .map(|i| {
                        let block = Uuid::new_v4();
                        store.put_ready(&meta(block, 1), &units(1, t.wrapping_mul(20).wrapping_add(i))).unwrap();
                        block
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let blocks: Vec<Uuid> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
    let before = store.summary().unwrap();
    drop(store);
    let reopened = SledStore::open(&dir, &crate::custody::test_kek()).unwrap();
    assert_eq!(reopened.summary().unwrap(), before);
    assert_eq!(before.n_keys, 160);
    for block in blocks {
        assert_eq!(reopened.block_state(block).unwrap(), Some(BlockState::Ready));
    }
}

/// Writes what a crash can leave behind between two steps of a block write: units in `pending`
/// and, optionally, a record in `state`, with nothing published.
fn interrupted_write(store: &SledStore, block: Uuid, keys: &[KeyUnit], state: Option<BlockState>) {
    for key in keys {
        store
            .trees()
            .pending
            .insert(key.key_id.as_bytes(), store.trees().sealed_unit(key.key_id, block, &key.key).as_slice())
            .unwrap();
    }
    if let Some(state) = state {
        store
            .trees()
            .blocks
            .insert(block.as_bytes(), encode_block(&meta(block, keys.len()), state, keys.iter().map(|k| k.key_id)))
            .unwrap();
    }
    store.trees().db.flush().unwrap();
}

#[test]
fn opening_the_store_finishes_block_writes_a_crash_interrupted() {
    let dir = tempdir();
    let (unrecorded, ready, pending) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let (unrecorded_keys, ready_keys, pending_keys) = (units(3, 10), units(4, 20), units(2, 30));
    {
        let store = SledStore::open(&dir, &crate::custody::test_kek()).unwrap();
        // Crash after the units, before the record: the block never existed.
        interrupted_write(&store, unrecorded, &unrecorded_keys, None);
        // Crash after a ready record, before publishing: the units must become servable.
        interrupted_write(&store, ready, &ready_keys, Some(BlockState::Ready));
        // A pending block is left as it is.
        interrupted_write(&store, pending, &pending_keys, Some(BlockState::Pending));
        assert_eq!(store.summary().unwrap().n_keys, 0, "nothing is servable before the reopen");
    }
    let store = SledStore::open(&dir, &crate::custody::test_kek()).unwrap();
    let summary = store.summary().unwrap();
    assert_eq!((summary.n_keys, summary.n_ready_blocks, summary.n_pending_blocks), (4, 1, 1));
    for key in &ready_keys {
        assert!(store.trees().ready.contains_key(key.key_id.as_bytes()).unwrap());
    }
    assert_eq!(count(&store.trees().pending), 2, "only the pending block's units stay pending");
    assert_eq!(store.block_state(unrecorded).unwrap(), None);
    // The pending block still completes normally.
    store.mark_ready(pending).unwrap();
    assert_eq!(store.summary().unwrap().n_keys, 6);
    assert_eq!(count(&store.trees().pending), 0);
}

#[test]
fn a_ready_record_with_unpublished_units_is_finished_by_mark_ready() {
    // Bob's mark_ready crashed after writing the record: the Hello that settles the block calls
    // mark_ready again, which publishes the units (here without a reopen).
    let dir = tempdir();
    let store = SledStore::open(&dir, &crate::custody::test_kek()).unwrap();
    let block = Uuid::new_v4();
    interrupted_write(&store, block, &units(5, 40), Some(BlockState::Ready));
    store.mark_ready(block).unwrap();
    assert_eq!(store.summary().unwrap().n_keys, 5);
    assert_eq!(count(&store.trees().pending), 0);
    assert!(matches!(store.drop_pending(block), Err(StoreError::NotPending(_))));
}

#[test]
fn a_block_of_twenty_thousand_units_is_stored_and_published_whole() {
    // 20 000 units are the keys of a 10^7-bit block (the size the daemons' memory bound is for).
    let dir = tempdir();
    let store = SledStore::open(&dir, &crate::custody::test_kek()).unwrap();
    let block = Uuid::new_v4();
    let keys = units(20_000, 0);
    store.put_pending(&meta(block, keys.len()), &keys).unwrap();
    store.mark_ready(block).unwrap();
    let summary = store.summary().unwrap();
    assert_eq!((summary.n_keys, summary.n_ready_blocks), (20_000, 1));
    assert_eq!(count(&store.trees().pending), 0);
}

/// How a simulated crash point fails (see [`crash_point`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Crash {
    /// As a crash: the write stops there (an error that leaves the store in service).
    Stop,
    /// As a full disk there (an I/O error: the store goes out of service).
    DiskFull,
}

thread_local! {
    /// Publishing transactions this thread may still run before a simulated crash, and how it
    /// fails (`None`: no crash).
    static STEPS_BEFORE_CRASH: std::cell::Cell<Option<(usize, Crash)>> = const { std::cell::Cell::new(None) };
}

/// Whether the crash point reached now is the one the test chose, and how it fails (see
/// [`crash_point`]).
pub(super) fn crash_now() -> Option<Crash> {
    STEPS_BEFORE_CRASH.with(|steps| match steps.get() {
        Some((0, crash)) => {
            steps.set(None);
            Some(crash)
        }
        Some((n, crash)) => {
            steps.set(Some((n - 1, crash)));
            None
        }
        None => None,
    })
}

/// Makes the crash point before publishing transaction `step` (counted from 0) on this thread
/// fail, as a crash there would stop the write; `None`: no crash.
fn crash_before_step(step: Option<usize>) {
    fail_before_step(step, Crash::Stop);
}

/// Makes the crash point before publishing transaction `step` on this thread fail as `crash`.
pub(super) fn fail_before_step(step: Option<usize>, crash: Crash) {
    STEPS_BEFORE_CRASH.with(|steps| steps.set(step.map(|step| (step, crash))));
}

/// Number of units in both `pending` and `ready`.
fn n_in_both(pending: &sled::Tree, ready: &sled::Tree) -> usize {
    pending.iter().keys().filter(|key| ready.contains_key(key.as_ref().unwrap()).unwrap()).count()
}

#[test]
fn a_unit_reserved_between_two_crashes_is_never_deliverable_twice() {
    // Crash 1 stops publishing before one of its transactions, while the KME goes on and
    // reserves every unit then ready; crash 2 comes once the reservations are on disk. Reopening
    // recovers, itself crashing before each of its transactions in turn, and the store is then
    // reopened once more. The block spans two transactions, so there is a crash point between
    // them. No unit may be both reserved and ready (or pending) at the end.
    let n_units = PUBLISH_BATCH + 2;
    for publish_crash in 0.. {
        let dir = tempdir();
        let block = Uuid::new_v4();
        let store = SledStore::open(&dir, &crate::custody::test_kek()).unwrap();
        store.put_pending(&meta(block, n_units), &units(n_units, 0)).unwrap();
        crash_before_step(Some(publish_crash));
        let finished = store.mark_ready(block).is_ok();
        crash_before_step(None);
        assert_eq!(
            n_in_both(&store.trees().pending, &store.trees().ready),
            0,
            "publish crash {publish_crash}: units in both trees"
        );

        let reserved: Vec<Uuid> =
            store.select_ready_units(usize::MAX, |_| true).unwrap().iter().map(|u| u.key_id).collect();
        let reservation = |unit_id: Uuid| kme::KeyReservation {
            key_id: Uuid::new_v4(),
            unit_ids: vec![unit_id],
            size_bits: 256,
            master: "m".into(),
            slaves: vec!["s".into()],
            created_unix_ms: 1,
        };
        let reservations: Vec<_> = reserved.iter().map(|id| reservation(*id)).collect();
        store.reserve_keys(&reservations).unwrap();
        // Crash 2: closing keeps every write made so far, as reserve_keys' flush does anyway.
        drop(store);

        for recover_crash in 0.. {
            crash_before_step(Some(recover_crash));
            let opened = SledStore::open(&dir, &crate::custody::test_kek());
            crash_before_step(None);
            if opened.is_ok() {
                break;
            }
            let db = open_db(&dir, &mut Vec::new()).unwrap();
            let (pending, ready) = (db.open_tree("pending").unwrap(), db.open_tree("ready").unwrap());
            assert_eq!(n_in_both(&pending, &ready), 0, "recovery crash {recover_crash}: units in both trees");
        }

        let store = SledStore::open(&dir, &crate::custody::test_kek()).unwrap();
        let context = format!("publish crash {publish_crash}, {} units reserved", reserved.len());
        for unit_id in &reserved {
            let id = unit_id.as_bytes();
            assert!(!store.trees().ready.contains_key(id).unwrap(), "{context}: a reserved unit is ready again");
            assert!(!store.trees().pending.contains_key(id).unwrap(), "{context}: a reserved unit is pending again");
        }
        assert_eq!(count(&store.trees().ready), n_units - reserved.len(), "{context}: every other unit is ready");
        assert_eq!(count(&store.trees().pending), 0, "{context}");
        if let Some(unit_id) = reserved.first() {
            assert!(matches!(store.reserve_keys(&[reservation(*unit_id)]), Err(kme::KmeStoreError::MissingUnits(_))));
            let key_ids: Vec<Uuid> = reservations.iter().map(|r| r.key_id).collect();
            assert_eq!(store.deliver_reserved_keys(&key_ids, "m", "s").unwrap().len(), key_ids.len());
            assert!(matches!(
                store.deliver_reserved_keys(&key_ids[..1], "m", "s"),
                Err(kme::KmeStoreError::NotFound(_))
            ));
        }
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
        if finished {
            assert!(publish_crash >= 2, "a block of two batches is published in two transactions");
            break;
        }
    }
}

#[test]
fn recovery_drops_the_pending_copy_of_a_unit_found_in_both_trees() {
    // Only a crash of a version that moved units in two writes leaves a unit in both trees. The
    // `ready` copy is the published one, which the key pool may have handed out already: recovery
    // removes the pending copy instead of publishing it again (which, with other bytes here,
    // would overwrite the published ones).
    let dir = tempdir();
    let block = Uuid::new_v4();
    let keys = units(2, 50);
    {
        let store = SledStore::open(&dir, &crate::custody::test_kek()).unwrap();
        interrupted_write(&store, block, &keys, Some(BlockState::Ready));
        store
            .trees()
            .ready
            .insert(keys[0].key_id.as_bytes(), store.trees().sealed_unit(keys[0].key_id, block, &[0xAA; 32]).as_slice())
            .unwrap();
        store.trees().db.flush().unwrap();
    }
    let store = SledStore::open(&dir, &crate::custody::test_kek()).unwrap();
    assert_eq!((count(&store.trees().ready), count(&store.trees().pending)), (2, 0));
    let value = store.trees().ready.get(keys[0].key_id.as_bytes()).unwrap().unwrap();
    let (_, published) = store.trees().unseal_unit(keys[0].key_id, &value).unwrap();
    assert_eq!(published.as_slice(), &[0xAA; 32], "the published copy is kept");
}

#[test]
fn the_memory_store_gives_the_same_summary_as_sled_for_the_same_blocks() {
    let dir = tempdir();
    let (sled, memory) = (SledStore::open(&dir, &crate::custody::test_kek()).unwrap(), MemoryStore::new());
    let (ready, pending, promoted) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let (ready_keys, pending_keys, promoted_keys) = (units(3, 1), units(2, 2), units(4, 3));
    for store in [&sled as &dyn KeyStore, &memory] {
        store.put_ready(&meta(ready, 3), &ready_keys).unwrap();
        store.put_pending(&meta(pending, 2), &pending_keys).unwrap();
        store.put_pending(&meta(promoted, 4), &promoted_keys).unwrap();
        store.mark_ready(promoted).unwrap();
    }
    assert_eq!(sled.summary().unwrap(), memory.summary().unwrap());
    assert_eq!(sled.pending_blocks().unwrap(), memory.pending_blocks().unwrap());
    assert_eq!(sled.n_units().unwrap(), memory.n_units().unwrap());
    assert_eq!(sled.blocks().unwrap(), memory.blocks().unwrap());
}

#[test]
fn sled_failures_are_backend_errors_with_the_sled_error_as_source() {
    let error = db_error(sled::Error::Io(std::io::Error::other("disk on fire")));
    assert_eq!(error.to_string(), "key store database error: IO error: disk on fire");
    let source = std::error::Error::source(&error).expect("the sled error is the source");
    assert!(source.downcast_ref::<sled::Error>().is_some());
}
