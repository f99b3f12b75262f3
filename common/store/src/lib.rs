//! The durable key store: distilled keys, in fixed-size units, each with a UUID, in sled.
//!
//! The [`KeyStore`] trait and its records ([`BlockMeta`], [`KeyUnit`], [`StoreError`], ...) are
//! the protocol core's (`qkd_core::store`, re-exported here, with its in-memory
//! [`MemoryStore`]); [`SledStore`] implements the trait on disk.
//!
//! A block's keys go through two states (the two-ended commit of ARCHITECTURE.md):
//! *pending* (stored durably at Bob, not servable) and *ready* (servable). Only ready keys are
//! ever listed or served.
//!
//! # Block writes: the record is the commit point
//! A block brings tens of thousands of 256-bit units (20 000 for 10^7 sifted bits). Writing them
//! in one sled transaction or batch costs kilobytes of memory per unit, many times what plain
//! inserts cost (figures: docs/store.md), so block writes are plain inserts ordered by flushes,
//! and the block record is the commit point:
//! * a block's units are first written to the `pending` tree, which nothing serves, and flushed;
//! * then its record is written (with `compare_and_swap`, so a block is stored once) and flushed:
//!   from then on the block exists, pending or ready;
//! * units reach the `ready` tree, where the key pool finds them, only once their block's record
//!   says ready and is on disk ("publishing": [`SledStore::mark_ready`], or [`KeyStore::put_ready`]
//!   right after its record). Each unit moves from `pending` to `ready` in a sled transaction
//!   over both trees, `PUBLISH_BATCH` units per transaction (bounded memory), which sled
//!   applies, and recovers after a crash, all or nothing;
//! * a pending block is dropped by removing its record first, then its units.
//!
//! A crash (kill -9 included) can stop any of these between two steps. Opening the store
//! finishes the job from the `pending` tree alone: units whose block has no record are
//! removed (the block never existed, or was dropped), units of a ready block are published,
//! units of a pending block stay. So, seen through the store's operations, a block's keys are
//! in one state or the other, all of them, never half-written; and a unit is in `ready` only
//! after its block's record says ready durably.
//!
//! A unit is never in both trees, at any moment or after any crash: a unit in `pending` has never
//! been in `ready`, so it has never been reserved or served (the key pool takes units from
//! `ready` only), and publishing it, then or after a crash, can never deliver it twice. (Moved
//! as two writes, a unit could be reserved between the insert into `ready` and the removal from
//! `pending`, and a crash that lost the removal had recovery publish it a second time.)

use std::path::Path;

use sha2::{Digest, Sha256};
use uuid::Uuid;
use zeroize::Zeroizing;

pub use qkd_core::store::{BlockMeta, BlockState, KeyStore, KeyUnit, MemoryStore, StoreError, StoreSummary};

/// A sled failure as a key-store error ([`StoreError::Backend`], with the sled error as its
/// source). `StoreError` is the core's and `sled::Error` sled's, so this cannot be a `From`.
pub(crate) fn db_error(e: sled::Error) -> StoreError {
    StoreError::backend(e)
}

/// `.db()?` on sled results: a `sled::Error` becomes [`StoreError::Backend`].
pub(crate) trait DbResult<T> {
    /// The result with a sled error turned into [`StoreError::Backend`].
    fn db(self) -> Result<T, StoreError>;
}

impl<T> DbResult<T> for Result<T, sled::Error> {
    fn db(self) -> Result<T, StoreError> {
        self.map_err(db_error)
    }
}

/// How long [`SledStore::open`] waits for sled's lock on the store directory.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Units moved from `pending` to `ready` per sled transaction (see "Block writes" in the module
/// documentation). A transaction keeps every write in memory until it commits, about 8 KB per
/// unit moved (a removal and an insert): 1024 units bound that to about 8 MB, and still move a
/// block of 20 000 units in 20 transactions. Measured on the 20 000-unit test: a peak of 165 MB
/// in one transaction, 23 to 34 MB in batches of 1024. Atomicity per unit is all the invariant
/// needs, so a block may be split.
const PUBLISH_BATCH: usize = 1024;

/// A point where a crash can stop a block write: before each transaction of publishing. Tests
/// make a chosen one fail, leaving the store as a crash there would (see `tests.rs`).
fn crash_point() -> Result<(), StoreError> {
    #[cfg(test)]
    if tests::crash_now() {
        return Err(db_error(sled::Error::Io(std::io::Error::other("simulated crash"))));
    }
    Ok(())
}

/// The sled-backed key store kept in a daemon's data directory.
///
/// Trees: `blocks` (block ID -> state byte + JSON metadata + key IDs), `ready` (key ID -> key
/// bytes + block ID) and `pending` (key ID -> key bytes + block ID); the KME's reservations and
/// cancellation tombstones (see [`kme`]).
pub struct SledStore {
    db: sled::Db,
    blocks: sled::Tree,
    ready: sled::Tree,
    pending: sled::Tree,
    reserved: sled::Tree,
    cancelled: sled::Tree,
    group_flush: GroupFlush,
}

/// Group commit: callers that need their writes on disk share flushes. A flush (an fsync,
/// milliseconds on a virtual disk) persists everything written before it started, so a caller
/// needs one flush that *started* after its write; while one runs, the callers that arrive wait
/// for it and then one of them runs the next flush for all of them. Under concurrent requests
/// this turns one fsync per request into one per batch, without weakening anyone's guarantee.
#[derive(Default)]
struct GroupFlush {
    state: std::sync::Mutex<FlushState>,
    finished: std::sync::Condvar,
}

#[derive(Default)]
struct FlushState {
    /// Number of the last flush started (flushes are numbered from 1).
    started: u64,
    /// Number of the last flush finished.
    finished: u64,
    /// Number of the last flush that succeeded.
    succeeded: u64,
    /// Whether a flush runs now.
    running: bool,
    /// The error of the last failed flush.
    last_error: Option<String>,
}

impl GroupFlush {
    /// Returns once a flush that started after this call has succeeded, running it if no other
    /// caller does; the error of that flush otherwise.
    fn flush(&self, db: &sled::Db) -> Result<(), StoreError> {
        // Invariant: nothing panics while holding this lock, so it is never poisoned.
        let mut state = self.state.lock().expect("flush lock poisoned");
        // Any flush numbered `needed` or later started after this caller's writes.
        let needed = state.started + 1;
        loop {
            if state.succeeded >= needed {
                return Ok(());
            }
            if state.finished >= needed {
                let message = state.last_error.clone().unwrap_or_else(|| "flush failed".into());
                return Err(db_error(sled::Error::Io(std::io::Error::other(message))));
            }
            if !state.running {
                state.running = true;
                state.started += 1;
                let number = state.started;
                drop(state);
                let result = db.flush();
                state = self.state.lock().expect("flush lock poisoned");
                state.running = false;
                state.finished = number;
                match &result {
                    Ok(_) => state.succeeded = number,
                    Err(e) => state.last_error = Some(e.to_string()),
                }
                self.finished.notify_all();
                if number >= needed {
                    return result.map(|_| ()).map_err(db_error);
                }
                continue;
            }
            state = self.finished.wait(state).expect("flush lock poisoned");
        }
    }
}

impl SledStore {
    /// Opens (or creates) the store in `dir`.
    ///
    /// sled locks the directory for as long as any of its threads uses it, and finishes some log
    /// writes on a thread pool after the last handle is dropped; so a store closed and reopened
    /// in the same process (the tests, `qkdctl`) can find the lock still held for a moment. The
    /// lock is retried for up to [`LOCK_WAIT`]; a store held by another process still fails,
    /// with sled's error naming the directory.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::with_db(open_db(dir)?)
    }

    /// A store in a temporary location, deleted when dropped (simulations and tests).
    pub fn temporary() -> Result<Self, StoreError> {
        Self::with_db(sled::Config::new().temporary(true).open().db()?)
    }

    /// Opens every tree once and finishes the block writes a crash interrupted.
    fn with_db(db: sled::Db) -> Result<Self, StoreError> {
        let store = Self {
            blocks: db.open_tree("blocks").db()?,
            ready: db.open_tree("ready").db()?,
            pending: db.open_tree("pending").db()?,
            reserved: db.open_tree(kme::RESERVATIONS_TREE).db()?,
            cancelled: db.open_tree(kme::CANCELLED_TREE).db()?,
            db,
            group_flush: GroupFlush::default(),
        };
        store.recover()?;
        Ok(store)
    }

    /// Settles every unit of the `pending` tree by its block's record (see "Block writes" in
    /// the module documentation): removed without a record, published for a ready block, kept
    /// for a pending one.
    fn recover(&self) -> Result<(), StoreError> {
        let mut states: std::collections::HashMap<Uuid, Option<BlockState>> = std::collections::HashMap::new();
        let (mut removed, mut published) = (0u64, 0u64);
        let mut to_publish = Vec::new();
        for item in self.pending.iter() {
            let (key_id, value) = item.db()?;
            let (block_id, _) = decode_key(&value)?;
            let state = match states.get(&block_id) {
                Some(state) => *state,
                None => {
                    let state = self.load_block(block_id)?.map(|(_, state, _)| state);
                    states.insert(block_id, state);
                    state
                }
            };
            match state {
                None => {
                    self.pending.remove(&key_id).db()?;
                    removed += 1;
                }
                Some(BlockState::Ready) => {
                    to_publish.push(Uuid::from_slice(&key_id).map_err(|e| StoreError::Corrupt(e.to_string()))?);
                    if to_publish.len() == PUBLISH_BATCH {
                        published += self.publish_batch(&to_publish)?;
                        to_publish.clear();
                    }
                }
                Some(BlockState::Pending) => {}
            }
        }
        published += self.publish_batch(&to_publish)?;
        if removed + published > 0 {
            tracing::warn!(
                removed,
                published,
                "key store: finished block writes interrupted by a crash (units of unrecorded blocks removed, units of \
                 ready blocks published)"
            );
            self.flush()?;
        }
        Ok(())
    }

    /// Moves the units of a block whose record says ready (durably) from `pending` to `ready`,
    /// [`PUBLISH_BATCH`] at a time; units already moved, or already served, are skipped.
    fn publish(&self, key_ids: impl IntoIterator<Item = Uuid>) -> Result<(), StoreError> {
        let mut key_ids = key_ids.into_iter();
        let mut batch = Vec::with_capacity(PUBLISH_BATCH);
        loop {
            batch.clear();
            batch.extend(key_ids.by_ref().take(PUBLISH_BATCH));
            if batch.is_empty() {
                return Ok(());
            }
            self.publish_batch(&batch)?;
        }
    }

    /// Moves whichever of `key_ids` are in `pending` to `ready`, in one transaction over both
    /// trees, so that no reader and no crash ever finds a unit in both (see "Block writes" in
    /// the module documentation). Returns how many units were moved.
    fn publish_batch(&self, key_ids: &[Uuid]) -> Result<u64, StoreError> {
        use sled::Transactional;
        use sled::transaction::{ConflictableTransactionError, TransactionError};
        if key_ids.is_empty() {
            return Ok(0);
        }
        crash_point()?;
        let result = (&self.pending, &self.ready).transaction(|(pending, ready)| {
            let (mut moved, mut duplicates) = (0u64, 0u64);
            for key_id in key_ids {
                let id = key_id.as_bytes();
                // Not in `pending`: moved already, so possibly reserved or served since; never
                // put back.
                let Some(value) = pending.remove(id)? else {
                    continue;
                };
                // In both trees: never left by this code, only by a crash of a version that moved
                // units in two writes. The `ready` copy is the published one (perhaps already
                // handed out by the key pool): keep it as it is, drop the pending copy.
                if ready.get(id)?.is_some() {
                    duplicates += 1;
                    continue;
                }
                ready.insert(id, value)?;
                moved += 1;
            }
            Ok::<_, ConflictableTransactionError<StoreError>>((moved, duplicates))
        });
        let (moved, duplicates) = match result {
            Ok(counts) => counts,
            Err(TransactionError::Abort(e)) => return Err(e),
            Err(TransactionError::Storage(e)) => return Err(db_error(e)),
        };
        if duplicates > 0 {
            tracing::warn!(duplicates, "key store: removed the pending copy of units already published");
        }
        Ok(moved)
    }

    /// Makes every write made before this call durable (group commit: concurrent callers share
    /// one fsync, see [`GroupFlush`]).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.group_flush.flush(&self.db)
    }

    /// Stores a block (see "Block writes" in the module documentation): units to `pending`,
    /// the record, then, for a ready block, the units published.
    fn put(&self, meta: &BlockMeta, keys: &[KeyUnit], state: BlockState) -> Result<(), StoreError> {
        let block_key = meta.block_id.as_bytes();
        if self.blocks.contains_key(block_key).db()? {
            return Err(StoreError::DuplicateBlock(meta.block_id));
        }
        for key in keys {
            self.pending.insert(key.key_id.as_bytes(), encode_key(meta.block_id, &key.key).as_slice()).db()?;
        }
        self.flush()?;
        let record = encode_block(meta, state, keys.iter().map(|k| k.key_id));
        if self.blocks.compare_and_swap(block_key, None as Option<&[u8]>, Some(record)).db()?.is_err() {
            return Err(StoreError::DuplicateBlock(meta.block_id));
        }
        self.flush()?;
        if state == BlockState::Ready {
            self.publish(keys.iter().map(|k| k.key_id))?;
            self.flush()?;
        }
        Ok(())
    }

    fn load_block(&self, block_id: Uuid) -> Result<Option<(BlockMeta, BlockState, Vec<Uuid>)>, StoreError> {
        match self.blocks.get(block_id.as_bytes()).db()? {
            Some(v) => decode_block(&v).map(Some),
            None => Ok(None),
        }
    }
}

impl KeyStore for SledStore {
    fn put_pending(&self, meta: &BlockMeta, keys: &[KeyUnit]) -> Result<(), StoreError> {
        self.put(meta, keys, BlockState::Pending)
    }

    fn put_ready(&self, meta: &BlockMeta, keys: &[KeyUnit]) -> Result<(), StoreError> {
        self.put(meta, keys, BlockState::Ready)
    }

    fn mark_ready(&self, block_id: Uuid) -> Result<(), StoreError> {
        let Some(old) = self.blocks.get(block_id.as_bytes()).db()? else {
            return Err(StoreError::NotPending(block_id));
        };
        let (meta, state, key_ids) = decode_block(&old)?;
        if state == BlockState::Pending {
            for key_id in &key_ids {
                if !self.pending.contains_key(key_id.as_bytes()).db()? {
                    return Err(StoreError::Corrupt(format!("pending key {key_id} of block {block_id} is missing")));
                }
            }
            let record = encode_block(&meta, BlockState::Ready, key_ids.iter().copied());
            if self.blocks.compare_and_swap(block_id.as_bytes(), Some(old), Some(record)).db()?.is_err() {
                return Err(StoreError::NotPending(block_id));
            }
            self.flush()?;
        }
        // Ready already: publish what a crash may have left behind (normally nothing).
        self.publish(key_ids)?;
        self.flush()
    }

    fn drop_pending(&self, block_id: Uuid) -> Result<(), StoreError> {
        let Some(old) = self.blocks.get(block_id.as_bytes()).db()? else {
            return Ok(());
        };
        let (_, state, key_ids) = decode_block(&old)?;
        if state != BlockState::Pending {
            return Err(StoreError::NotPending(block_id));
        }
        if self.blocks.compare_and_swap(block_id.as_bytes(), Some(old), None as Option<&[u8]>).db()?.is_err() {
            return Err(StoreError::NotPending(block_id));
        }
        self.flush()?;
        for key_id in &key_ids {
            self.pending.remove(key_id.as_bytes()).db()?;
        }
        self.flush()
    }

    fn block_state(&self, block_id: Uuid) -> Result<Option<BlockState>, StoreError> {
        Ok(self.load_block(block_id)?.map(|(_, state, _)| state))
    }

    fn pending_blocks(&self) -> Result<Vec<Uuid>, StoreError> {
        let mut out = Vec::new();
        for (meta, state) in self.blocks()? {
            if state == BlockState::Pending {
                out.push(meta.block_id);
            }
        }
        Ok(out)
    }

    fn summary(&self) -> Result<StoreSummary, StoreError> {
        let mut hasher = Sha256::new();
        let (mut n_keys, mut n_key_bits) = (0u64, 0u64);
        // sled iterates in key order; UUID bytes order is key-ID order.
        for item in self.ready.iter() {
            let (key_id, value) = item.db()?;
            let (_, key) = decode_key(&value)?;
            hasher.update(&key_id);
            hasher.update(key.as_slice());
            n_keys += 1;
            n_key_bits += 8 * key.len() as u64;
        }
        let (mut n_ready_blocks, mut n_pending_blocks) = (0, 0);
        for (_, state) in self.blocks()? {
            match state {
                BlockState::Ready => n_ready_blocks += 1,
                BlockState::Pending => n_pending_blocks += 1,
            }
        }
        Ok(StoreSummary {
            n_keys,
            n_key_bits,
            n_ready_blocks,
            n_pending_blocks,
            digest: hex::encode(hasher.finalize()),
        })
    }

    fn n_units(&self) -> Result<u64, StoreError> {
        // sled counts by iterating (docs/store.md), once per block.
        Ok((self.ready.len() + self.pending.len()) as u64)
    }

    fn blocks(&self) -> Result<Vec<(BlockMeta, BlockState)>, StoreError> {
        let mut out = Vec::new();
        for item in self.blocks.iter() {
            let (_, value) = item.db()?;
            let (meta, state, _) = decode_block(&value)?;
            out.push((meta, state));
        }
        Ok(out)
    }
}

/// Opens sled's database in `dir`, retrying its directory lock for up to [`LOCK_WAIT`] (see
/// [`SledStore::open`]).
fn open_db(dir: &Path) -> Result<sled::Db, StoreError> {
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match sled::Config::new().path(dir).open() {
            Ok(db) => return Ok(db),
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock") && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(e) => return Err(db_error(e)),
        }
    }
}

/// Block record: state byte, number of key IDs (u32 LE), the key IDs, then JSON metadata.
fn encode_block(meta: &BlockMeta, state: BlockState, key_ids: impl ExactSizeIterator<Item = Uuid>) -> Vec<u8> {
    let mut out = vec![match state {
        BlockState::Pending => 0u8,
        BlockState::Ready => 1u8,
    }];
    out.extend_from_slice(&(key_ids.len() as u32).to_le_bytes());
    for key_id in key_ids {
        out.extend_from_slice(key_id.as_bytes());
    }
    // Invariant: BlockMeta holds only numbers and a UUID, which always serialise.
    out.extend(serde_json::to_vec(meta).expect("block metadata serialises"));
    out
}

fn decode_block(value: &[u8]) -> Result<(BlockMeta, BlockState, Vec<Uuid>), StoreError> {
    let corrupt = || StoreError::Corrupt("truncated block record".into());
    let state = match value.first().ok_or_else(corrupt)? {
        0 => BlockState::Pending,
        1 => BlockState::Ready,
        other => return Err(StoreError::Corrupt(format!("unknown block state {other}"))),
    };
    let n = u32::from_le_bytes(value.get(1..5).ok_or_else(corrupt)?.try_into().map_err(|_| corrupt())?) as usize;
    let ids_end = 5 + 16 * n;
    let ids = value.get(5..ids_end).ok_or_else(corrupt)?;
    let key_ids = ids
        .chunks_exact(16)
        .map(|c| Uuid::from_slice(c).map_err(|e| StoreError::Corrupt(e.to_string())))
        .collect::<Result<Vec<_>, _>>()?;
    let meta = serde_json::from_slice(&value[ids_end..]).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    Ok((meta, state, key_ids))
}

/// Key record: block ID (16 bytes) then the key bytes.
fn encode_key(block_id: Uuid, key: &[u8]) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::with_capacity(16 + key.len()));
    out.extend_from_slice(block_id.as_bytes());
    out.extend_from_slice(key);
    out
}

fn decode_key(value: &[u8]) -> Result<(Uuid, Zeroizing<Vec<u8>>), StoreError> {
    if value.len() < 16 {
        return Err(StoreError::Corrupt("truncated key record".into()));
    }
    let block_id = Uuid::from_slice(&value[..16]).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    Ok((block_id, Zeroizing::new(value[16..].to_vec())))
}

pub mod kme;

#[cfg(test)]
mod tests;
