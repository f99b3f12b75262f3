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
