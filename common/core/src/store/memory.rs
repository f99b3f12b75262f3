//! [`MemoryStore`]: the key store in memory, for the planning tool and the tests.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use sha2::{Digest, Sha256};
use uuid::Uuid;
use zeroize::Zeroizing;

use super::{BlockMeta, BlockState, HeldUnits, KeyStore, KeyUnit, StoreError, StoreSummary, UnitHoldings};

/// A [`KeyStore`] held in memory: nothing survives the process, so "durably" means "before
/// returning". It keeps the layout and the answers of the durable store (`qkd_store::SledStore`):
/// block records by block ID, pending and ready units by key ID, duplicate blocks refused, only
/// ready units summarised, and the same [`StoreSummary::digest`] for the same ready keys, so the
/// summaries of two implementations can be compared. Key bytes are wiped when dropped.
#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

#[derive(Clone, Default)]
struct Inner {
    /// Block ID -> (metadata, state, key IDs), in block-ID order.
    blocks: BTreeMap<Uuid, (BlockMeta, BlockState, Vec<Uuid>)>,
    /// Units of pending blocks, by key ID.
    pending: BTreeMap<Uuid, Zeroizing<Vec<u8>>>,
    /// Units of ready blocks, by key ID (UUID order is byte order, as in the digest).
    ready: BTreeMap<Uuid, Zeroizing<Vec<u8>>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// A copy of the store as it is now, as a backup taken now would hold it (for tests that
    /// restore a store from an older copy).
    pub fn snapshot(&self) -> MemoryStore {
        MemoryStore { inner: Mutex::new(self.lock().clone()) }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Invariant: nothing panics while holding this lock, so it is never poisoned.
        self.inner.lock().expect("memory store lock poisoned")
    }

    fn put(&self, meta: &BlockMeta, keys: &[KeyUnit], state: BlockState) -> Result<(), StoreError> {
        let mut inner = self.lock();
        if inner.blocks.contains_key(&meta.block_id) {
            return Err(StoreError::DuplicateBlock(meta.block_id));
        }
        let units = match state {
            BlockState::Pending => &mut inner.pending,
            BlockState::Ready => &mut inner.ready,
        };
        for key in keys {
            units.insert(key.key_id, key.key.clone());
        }
        let key_ids = keys.iter().map(|k| k.key_id).collect();
        inner.blocks.insert(meta.block_id, (meta.clone(), state, key_ids));
        Ok(())
    }
}

impl KeyStore for MemoryStore {
    fn put_pending(&self, meta: &BlockMeta, keys: &[KeyUnit]) -> Result<(), StoreError> {
        self.put(meta, keys, BlockState::Pending)
    }

    fn put_ready(&self, meta: &BlockMeta, keys: &[KeyUnit]) -> Result<(), StoreError> {
        self.put(meta, keys, BlockState::Ready)
    }

    fn mark_ready(&self, block_id: Uuid) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let Inner { blocks, pending, ready } = &mut *inner;
        let Some((_, state, key_ids)) = blocks.get_mut(&block_id) else {
            return Err(StoreError::NotPending(block_id));
        };
        if *state == BlockState::Pending {
            if let Some(missing) = key_ids.iter().find(|id| !pending.contains_key(id)) {
                return Err(StoreError::Corrupt(format!("pending key {missing} of block {block_id} is missing")));
            }
            *state = BlockState::Ready;
            for key_id in key_ids.iter() {
                if let Some(key) = pending.remove(key_id) {
                    ready.insert(*key_id, key);
                }
            }
        }
        Ok(())
    }

    fn drop_pending(&self, block_id: Uuid) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let Some((_, state, _)) = inner.blocks.get(&block_id) else {
            return Ok(());
        };
        if *state != BlockState::Pending {
            return Err(StoreError::NotPending(block_id));
        }
        if let Some((_, _, key_ids)) = inner.blocks.remove(&block_id) {
            for key_id in &key_ids {
                inner.pending.remove(key_id);
            }
        }
        Ok(())
    }

    fn block_state(&self, block_id: Uuid) -> Result<Option<BlockState>, StoreError> {
        Ok(self.lock().blocks.get(&block_id).map(|(_, state, _)| *state))
    }

    fn pending_blocks(&self) -> Result<Vec<Uuid>, StoreError> {
        let inner = self.lock();
        Ok(inner.blocks.iter().filter(|(_, (_, state, _))| *state == BlockState::Pending).map(|(id, _)| *id).collect())
    }

    fn summary(&self) -> Result<StoreSummary, StoreError> {
        let inner = self.lock();
        let mut hasher = Sha256::new();
        let (mut n_keys, mut n_key_bits) = (0u64, 0u64);
        for (key_id, key) in &inner.ready {
            hasher.update(key_id.as_bytes());
            hasher.update(key.as_slice());
            n_keys += 1;
            n_key_bits += 8 * key.len() as u64;
        }
        let n_ready_blocks = inner.blocks.values().filter(|(_, state, _)| *state == BlockState::Ready).count() as u64;
        Ok(StoreSummary {
            n_keys,
            n_key_bits,
            n_ready_blocks,
            n_pending_blocks: inner.blocks.len() as u64 - n_ready_blocks,
            digest: hex::encode(hasher.finalize()),
        })
    }

    fn blocks(&self) -> Result<Vec<(BlockMeta, BlockState)>, StoreError> {
        Ok(self.lock().blocks.values().map(|(meta, state, _)| (meta.clone(), *state)).collect())
    }

    fn n_units(&self) -> Result<u64, StoreError> {
        let inner = self.lock();
        Ok((inner.ready.len() + inner.pending.len()) as u64)
    }

    fn holdings(&self) -> Result<UnitHoldings, StoreError> {
        let inner = self.lock();
        let mut holdings = UnitHoldings::default();
        for (block_id, (_, state, key_ids)) in &inner.blocks {
            let units = match state {
                BlockState::Pending => &inner.pending,
                BlockState::Ready => &inner.ready,
            };
            let held: Vec<bool> = key_ids.iter().map(|id| units.contains_key(id)).collect();
            if held.contains(&true) {
                holdings.blocks.push(HeldUnits { block_id: *block_id, state: *state, key_ids: key_ids.clone(), held });
            }
        }
        Ok(holdings)
    }

    fn discard_units(&self, unit_ids: &[Uuid]) -> Result<u64, StoreError> {
        let mut inner = self.lock();
        Ok(unit_ids.iter().filter(|id| inner.ready.remove(id).is_some()).count() as u64)
    }
}

#[cfg(test)]
mod tests {
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
        let store = MemoryStore::new();
        let block = Uuid::new_v4();
        store.put_pending(&meta(block), &units(2, 7)).unwrap();
        assert_eq!(store.summary().unwrap().n_keys, 0);
        assert_eq!(store.summary().unwrap().n_pending_blocks, 1);
        assert_eq!(store.pending_blocks().unwrap(), vec![block]);
        assert_eq!(store.n_units().unwrap(), 2);
        store.mark_ready(block).unwrap();
        let summary = store.summary().unwrap();
        assert_eq!(
            (summary.n_keys, summary.n_key_bits, summary.n_ready_blocks, summary.n_pending_blocks),
            (2, 512, 1, 0)
        );
        assert_eq!(store.block_state(block).unwrap(), Some(BlockState::Ready));
        assert_eq!(store.n_units().unwrap(), 2);
        // Marking a ready block ready again changes nothing.
        store.mark_ready(block).unwrap();
        assert_eq!(store.summary().unwrap(), summary);
    }

    #[test]
    fn same_keys_give_same_digest_whatever_the_path() {
        let (a, b, c) = (MemoryStore::new(), MemoryStore::new(), MemoryStore::new());
        let block = Uuid::new_v4();
        let keys = units(3, 1);
        a.put_ready(&meta(block), &keys).unwrap();
        b.put_pending(&meta(block), &keys).unwrap();
        b.mark_ready(block).unwrap();
        assert_eq!(a.summary().unwrap(), b.summary().unwrap());
        // A different key byte changes the digest.
        let mut other = keys.clone();
        other[1].key[0] ^= 1;
        c.put_ready(&meta(block), &other).unwrap();
        assert_ne!(a.summary().unwrap().digest, c.summary().unwrap().digest);
    }

    #[test]
    fn the_digest_is_sha256_over_ready_units_in_key_id_order() {
        let store = MemoryStore::new();
        let keys = units(5, 3);
        store.put_ready(&meta(Uuid::new_v4()), &keys).unwrap();
        store.put_pending(&meta(Uuid::new_v4()), &units(2, 9)).unwrap();
        let mut sorted = keys.clone();
        sorted.sort_by_key(|k| k.key_id);
        let mut hasher = Sha256::new();
        for k in &sorted {
            hasher.update(k.key_id.as_bytes());
            hasher.update(k.key.as_slice());
        }
        assert_eq!(store.summary().unwrap().digest, hex::encode(hasher.finalize()));
    }

    #[test]
    fn duplicate_blocks_are_refused_and_dropping_a_pending_block_leaves_nothing() {
        let store = MemoryStore::new();
        let block = Uuid::new_v4();
        store.put_pending(&meta(block), &units(2, 0)).unwrap();
        assert!(matches!(store.put_pending(&meta(block), &units(1, 0)), Err(StoreError::DuplicateBlock(_))));
        assert!(matches!(store.put_ready(&meta(block), &units(1, 0)), Err(StoreError::DuplicateBlock(_))));
        store.drop_pending(block).unwrap();
        assert_eq!(store.block_state(block).unwrap(), None);
        assert_eq!(store.summary().unwrap().n_keys, 0);
        assert_eq!(store.n_units().unwrap(), 0);
        assert!(store.blocks().unwrap().is_empty());
        // Dropping an unknown block is not an error; marking it ready is.
        store.drop_pending(block).unwrap();
        assert!(matches!(store.mark_ready(block), Err(StoreError::NotPending(_))));
    }

    #[test]
    fn holdings_list_held_units_by_block_and_discarding_removes_ready_units_only() {
        let store = MemoryStore::new();
        let (ready, pending, served) = (Uuid::from_u128(1), Uuid::from_u128(2), Uuid::from_u128(3));
        let ready_keys = units(3, 0);
        let pending_keys = units(2, 0);
        let served_keys = units(1, 0);
        store.put_ready(&meta(ready), &ready_keys).unwrap();
        store.put_pending(&meta(pending), &pending_keys).unwrap();
        store.put_ready(&meta(served), &served_keys).unwrap();
        // A pending unit is not discarded; ready ones are, once.
        let discard = [ready_keys[1].key_id, pending_keys[0].key_id, served_keys[0].key_id];
        assert_eq!(store.discard_units(&discard).unwrap(), 2);
        assert_eq!(store.discard_units(&discard).unwrap(), 0);
        let holdings = store.holdings().unwrap();
        // The served block's record stays, but it is not listed: nothing of it is held.
        assert_eq!(store.blocks().unwrap().len(), 3);
        assert_eq!(
            holdings.blocks,
            vec![
                HeldUnits {
                    block_id: ready,
                    state: BlockState::Ready,
                    key_ids: ready_keys.iter().map(|k| k.key_id).collect(),
                    held: vec![true, false, true],
                },
                HeldUnits {
                    block_id: pending,
                    state: BlockState::Pending,
                    key_ids: pending_keys.iter().map(|k| k.key_id).collect(),
                    held: vec![true, true],
                },
            ]
        );
        assert_eq!(store.n_units().unwrap(), 4);
        assert_eq!(store.summary().unwrap().n_keys, 2);
    }

    #[test]
    fn a_ready_block_is_never_dropped() {
        let store = MemoryStore::new();
        let block = Uuid::new_v4();
        store.put_ready(&meta(block), &units(2, 0)).unwrap();
        assert!(matches!(store.drop_pending(block), Err(StoreError::NotPending(_))));
        assert_eq!(store.summary().unwrap().n_keys, 2);
        assert_eq!(store.blocks().unwrap(), vec![(meta(block), BlockState::Ready)]);
    }
}
