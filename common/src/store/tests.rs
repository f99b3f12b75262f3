use super::*;

fn meta(block_id: Uuid) -> BlockMeta {
    BlockMeta {
        block_id,
        created_unix_ms: 1,
        n_sifted_bits: 1000,
        qber_z: 0.02,
        qber_x: 0.03,
        phase_error_upper: 0.05,
        leak_bits: 300,
        final_bits: 512,
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
    let store = SledStore::open(&dir).unwrap();
    let block = Uuid::new_v4();
    store.put_pending(&meta(block), &units(2, 7)).unwrap();
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
    let (a, b) = (SledStore::open(&dir_a).unwrap(), SledStore::open(&dir_b).unwrap());
    let block = Uuid::new_v4();
    let keys = units(3, 1);
    a.put_ready(&meta(block), &keys).unwrap();
    b.put_pending(&meta(block), &keys).unwrap();
    b.mark_ready(block).unwrap();
    assert_eq!(a.summary().unwrap(), b.summary().unwrap());
    // A different key byte changes the digest.
    let c_dir = tempdir();
    let c = SledStore::open(&c_dir).unwrap();
    let mut other = keys.clone();
    other[1].key[0] ^= 1;
    c.put_ready(&meta(block), &other).unwrap();
    assert_ne!(a.summary().unwrap().digest, c.summary().unwrap().digest);
}

#[test]
fn dropped_pending_block_leaves_nothing_and_survives_reopen() {
    let dir = tempdir();
    let block = Uuid::new_v4();
    {
        let store = SledStore::open(&dir).unwrap();
        store.put_pending(&meta(block), &units(2, 0)).unwrap();
        assert!(matches!(store.put_pending(&meta(block), &units(1, 0)), Err(StoreError::DuplicateBlock(_))));
    }
    let store = SledStore::open(&dir).unwrap();
    assert_eq!(store.pending_blocks().unwrap(), vec![block]);
    store.drop_pending(block).unwrap();
    assert_eq!(store.block_state(block).unwrap(), None);
    assert_eq!(store.summary().unwrap().n_keys, 0);
    assert_eq!(store.pending.len(), 0);
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
    let store = std::sync::Arc::new(SledStore::open(&dir).unwrap());
    let threads: Vec<_> = (0..8u8)
        .map(|t| {
            let store = store.clone();
            std::thread::spawn(move || {
                (0..20u8)
                    .map(|i| {
                        let block = Uuid::new_v4();
                        store.put_ready(&meta(block), &units(1, t.wrapping_mul(20).wrapping_add(i))).unwrap();
                        block
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let blocks: Vec<Uuid> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
    let before = store.summary().unwrap();
    drop(store);
    let reopened = SledStore::open(&dir).unwrap();
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
        store.pending.insert(key.key_id.as_bytes(), encode_key(block, &key.key).as_slice()).unwrap();
    }
    if let Some(state) = state {
        store
            .blocks
            .insert(block.as_bytes(), encode_block(&meta(block), state, keys.iter().map(|k| k.key_id)))
            .unwrap();
    }
    store.db.flush().unwrap();
}

#[test]
fn opening_the_store_finishes_block_writes_a_crash_interrupted() {
    let dir = tempdir();
    let (unrecorded, ready, pending) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let (unrecorded_keys, ready_keys, pending_keys) = (units(3, 10), units(4, 20), units(2, 30));
    {
        let store = SledStore::open(&dir).unwrap();
        // Crash after the units, before the record: the block never existed.
        interrupted_write(&store, unrecorded, &unrecorded_keys, None);
        // Crash after a ready record, before publishing: the units must become servable.
        interrupted_write(&store, ready, &ready_keys, Some(BlockState::Ready));
        // A pending block is left as it is.
        interrupted_write(&store, pending, &pending_keys, Some(BlockState::Pending));
        assert_eq!(store.summary().unwrap().n_keys, 0, "nothing is servable before the reopen");
    }
    let store = SledStore::open(&dir).unwrap();
    let summary = store.summary().unwrap();
    assert_eq!((summary.n_keys, summary.n_ready_blocks, summary.n_pending_blocks), (4, 1, 1));
    for key in &ready_keys {
        assert!(store.ready.contains_key(key.key_id.as_bytes()).unwrap());
    }
    assert_eq!(store.pending.len(), 2, "only the pending block's units stay pending");
    assert_eq!(store.block_state(unrecorded).unwrap(), None);
    // The pending block still completes normally.
    store.mark_ready(pending).unwrap();
    assert_eq!(store.summary().unwrap().n_keys, 6);
    assert_eq!(store.pending.len(), 0);
}

#[test]
fn a_ready_record_with_unpublished_units_is_finished_by_mark_ready() {
    // Bob's mark_ready crashed after writing the record: the Hello that settles the block calls
    // mark_ready again, which publishes the units (here without a reopen).
    let dir = tempdir();
    let store = SledStore::open(&dir).unwrap();
    let block = Uuid::new_v4();
    interrupted_write(&store, block, &units(5, 40), Some(BlockState::Ready));
    store.mark_ready(block).unwrap();
    assert_eq!(store.summary().unwrap().n_keys, 5);
    assert_eq!(store.pending.len(), 0);
    assert!(matches!(store.drop_pending(block), Err(StoreError::NotPending(_))));
}

#[test]
fn a_block_of_twenty_thousand_units_is_stored_and_published_whole() {
    // 20 000 units are the keys of a 10^7-bit block (the size the daemons' memory bound is for).
    let dir = tempdir();
    let store = SledStore::open(&dir).unwrap();
    let block = Uuid::new_v4();
    let keys = units(20_000, 0);
    store.put_pending(&meta(block), &keys).unwrap();
    store.mark_ready(block).unwrap();
    let summary = store.summary().unwrap();
    assert_eq!((summary.n_keys, summary.n_ready_blocks), (20_000, 1));
    assert_eq!(store.pending.len(), 0);
}
