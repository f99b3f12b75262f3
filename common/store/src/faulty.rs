//! [`FaultyStore`]: a key store that fails on demand, for tests of what the daemons do when
//! their disk fills up and is freed again ("disk full, then space freed: the link resumes
//! without a restart").
//!
//! It wraps any [`KeyStore`] and, while its disk is "full" ([`FaultyStore::set_disk_full`]),
//! fails every write with the error a full disk gives ([`FaultyStore::disk_full_error`]:
//! [`crate::is_disk_full`] says yes); reads go on working, as sled's do. It counts the calls it
//! sees. Two ways of coming back, as with the real store:
//! * by default the store works again as soon as the fault is cleared: what a caller of
//!   [`crate::SledStore`] sees, since that store reopens itself at the next call;
//! * with [`FaultyStore::set_sticky`], a failed write puts the store out of service, as sled
//!   does: every call fails (writes and reads) until [`KeyStore::reopen_if_failed`] is called
//!   once the fault is cleared. This checks that a daemon asks for the reopen.
//!
//! [`FaultyStore::set_fail_after_write`] makes a failing write reach the inner store first, and
//! fail afterwards: the worst case the store's semantics allow (a block stored although the
//! call that stored it failed, as when the disk fills after its record reached the disk).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use uuid::Uuid;

use crate::{BlockMeta, BlockState, KeyStore, KeyUnit, StoreError, StoreFault, StoreSummary, UnitHoldings};

/// A [`KeyStore`] that fails writes with a disk-full error on demand (see the module
/// documentation).
pub struct FaultyStore<S: ?Sized> {
    inner: Arc<S>,
    disk_full: AtomicBool,
    sticky: AtomicBool,
    fail_after_write: AtomicBool,
    /// A write failed while sticky: out of service until reopened.
    stuck: AtomicBool,
    reads: AtomicU64,
    writes: AtomicU64,
    failed: AtomicU64,
    reopens: AtomicU64,
}

/// The calls a [`FaultyStore`] has seen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultCounts {
    /// Read calls (`block_state`, `pending_blocks`, `summary`, `blocks`, `n_units`).
    pub reads: u64,
    /// Write calls (`put_pending`, `put_ready`, `mark_ready`, `drop_pending`).
    pub writes: u64,
    /// Calls that failed because of an injected fault (or of the out-of-service state it left).
    pub failed: u64,
    /// Calls of [`KeyStore::reopen_if_failed`] that found the store out of service.
    pub reopens: u64,
}

/// The path a [`FaultyStore`]'s errors name.
const FAULTY_PATH: &str = "(disk fault injected by FaultyStore)";

impl<S: KeyStore + ?Sized> FaultyStore<S> {
    /// Wraps `inner`, with no fault.
    pub fn new(inner: Arc<S>) -> Self {
        Self {
            inner,
            disk_full: AtomicBool::new(false),
            sticky: AtomicBool::new(false),
            fail_after_write: AtomicBool::new(false),
            stuck: AtomicBool::new(false),
            reads: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            reopens: AtomicU64::new(0),
        }
    }

    /// The wrapped store.
    pub fn inner(&self) -> &Arc<S> {
        &self.inner
    }

    /// Makes writes fail with [`FaultyStore::disk_full_error`] (`true`) or frees the "disk"
    /// (`false`).
    pub fn set_disk_full(&self, full: bool) {
        self.disk_full.store(full, Ordering::SeqCst);
    }

    /// Whether writes fail now.
    pub fn disk_full(&self) -> bool {
        self.disk_full.load(Ordering::SeqCst)
    }

    /// Whether a failed write puts the store out of service until
    /// [`KeyStore::reopen_if_failed`] (see the module documentation). Off by default.
    pub fn set_sticky(&self, sticky: bool) {
        self.sticky.store(sticky, Ordering::SeqCst);
    }

    /// Whether a failing write is made in the inner store before it fails (see the module
    /// documentation). Off by default.
    pub fn set_fail_after_write(&self, after: bool) {
        self.fail_after_write.store(after, Ordering::SeqCst);
    }

    /// The calls seen so far.
    pub fn counts(&self) -> FaultCounts {
        FaultCounts {
            reads: self.reads.load(Ordering::SeqCst),
            writes: self.writes.load(Ordering::SeqCst),
            failed: self.failed.load(Ordering::SeqCst),
            reopens: self.reopens.load(Ordering::SeqCst),
        }
    }

    /// The error of a write on a full disk: a [`StoreFault::DiskFull`] whose source is an I/O
    /// error of kind [`std::io::ErrorKind::StorageFull`], as the real store gives.
    pub fn disk_full_error() -> StoreError {
        StoreError::backend(StoreFault::DiskFull {
            path: PathBuf::from(FAULTY_PATH),
            source: std::io::Error::new(std::io::ErrorKind::StorageFull, "no space left on device (injected)"),
        })
    }

    fn out_of_service() -> StoreError {
        StoreError::backend(StoreFault::OutOfService {
            path: PathBuf::from(FAULTY_PATH),
            cause: "no space left on device (injected); not reopened yet".into(),
            disk_full: true,
        })
    }

    fn fail(&self, error: StoreError) -> StoreError {
        self.failed.fetch_add(1, Ordering::SeqCst);
        error
    }

    fn read<T>(&self, call: impl FnOnce(&S) -> Result<T, StoreError>) -> Result<T, StoreError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        if self.stuck.load(Ordering::SeqCst) {
            return Err(self.fail(Self::out_of_service()));
        }
        call(&self.inner)
    }

    fn write<T>(&self, call: impl FnOnce(&S) -> Result<T, StoreError>) -> Result<T, StoreError> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        if self.disk_full() {
            if self.fail_after_write.load(Ordering::SeqCst) {
                // Whatever the inner store answers, the caller sees the fault.
                let _ = call(&self.inner);
            }
            if self.sticky.load(Ordering::SeqCst) {
                self.stuck.store(true, Ordering::SeqCst);
            }
            return Err(self.fail(Self::disk_full_error()));
        }
        if self.stuck.load(Ordering::SeqCst) {
            return Err(self.fail(Self::out_of_service()));
        }
        call(&self.inner)
    }
}

impl<S: KeyStore + ?Sized> KeyStore for FaultyStore<S> {
    fn put_pending(&self, meta: &BlockMeta, keys: &[KeyUnit]) -> Result<(), StoreError> {
        self.write(|s| s.put_pending(meta, keys))
    }

    fn put_ready(&self, meta: &BlockMeta, keys: &[KeyUnit]) -> Result<(), StoreError> {
        self.write(|s| s.put_ready(meta, keys))
    }

    fn mark_ready(&self, block_id: Uuid) -> Result<(), StoreError> {
        self.write(|s| s.mark_ready(block_id))
    }

    fn drop_pending(&self, block_id: Uuid) -> Result<(), StoreError> {
        self.write(|s| s.drop_pending(block_id))
    }

    fn block_state(&self, block_id: Uuid) -> Result<Option<BlockState>, StoreError> {
        self.read(|s| s.block_state(block_id))
    }

    fn pending_blocks(&self) -> Result<Vec<Uuid>, StoreError> {
        self.read(|s| s.pending_blocks())
    }

    fn summary(&self) -> Result<StoreSummary, StoreError> {
        self.read(|s| s.summary())
    }

    fn blocks(&self) -> Result<Vec<(BlockMeta, BlockState)>, StoreError> {
        self.read(|s| s.blocks())
    }

    fn n_units(&self) -> Result<u64, StoreError> {
        self.read(|s| s.n_units())
    }

    fn holdings(&self) -> Result<UnitHoldings, StoreError> {
        self.read(|s| s.holdings())
    }

    fn discard_units(&self, unit_ids: &[Uuid]) -> Result<u64, StoreError> {
        self.write(|s| s.discard_units(unit_ids))
    }

    fn drop_reservations(&self) -> Result<u64, StoreError> {
        self.write(|s| s.drop_reservations())
    }

    fn reagreed(&self) {
        self.inner.reagreed();
    }

    fn is_healthy(&self) -> bool {
        !self.stuck.load(Ordering::SeqCst) && self.inner.is_healthy()
    }

    /// Out of service (sticky mode): still failing while the disk is "full"; otherwise back in
    /// service (`Ok(true)`), after the inner store's own reopen if it needs one.
    fn reopen_if_failed(&self) -> Result<bool, StoreError> {
        if !self.stuck.load(Ordering::SeqCst) {
            return self.inner.reopen_if_failed();
        }
        self.reopens.fetch_add(1, Ordering::SeqCst);
        if self.disk_full() {
            return Err(Self::disk_full_error());
        }
        self.inner.reopen_if_failed()?;
        self.stuck.store(false, Ordering::SeqCst);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use zeroize::Zeroizing;

    use super::*;
    use crate::{MemoryStore, SledStore, is_disk_full};

    fn block(n: usize) -> (BlockMeta, Vec<KeyUnit>) {
        let meta = BlockMeta {
            block_id: Uuid::new_v4(),
            created_unix_ms: 1,
            n_sifted_bits: 1000,
            qber_z: 0.02,
            qber_x: 0.03,
            phase_error_upper: 0.05,
            leak_bits: 300,
            final_bits: 256 * n as u64,
            simulated: false,
        };
        let keys = (0..n).map(|i| KeyUnit { key_id: Uuid::new_v4(), key: Zeroizing::new(vec![i as u8; 32]) }).collect();
        (meta, keys)
    }

    #[test]
    fn writes_fail_as_on_a_full_disk_until_it_is_freed() {
        let store = FaultyStore::new(Arc::new(MemoryStore::new()));
        let (meta, keys) = block(2);
        store.put_pending(&meta, &keys).unwrap();
        store.set_disk_full(true);
        let (other, other_keys) = block(3);
        let error = store.put_ready(&other, &other_keys).unwrap_err();
        assert!(is_disk_full(&error), "{error}");
        assert!(error.to_string().contains("no space left on device"), "{error}");
        assert!(store.mark_ready(meta.block_id).is_err());
        // Reads go on; nothing of the failed writes is stored.
        assert_eq!(store.n_units().unwrap(), 2);
        assert_eq!(store.block_state(other.block_id).unwrap(), None);
        assert_eq!(store.block_state(meta.block_id).unwrap(), Some(BlockState::Pending));
        assert!(store.is_healthy());
        store.set_disk_full(false);
        store.mark_ready(meta.block_id).unwrap();
        store.put_ready(&other, &other_keys).unwrap();
        assert_eq!(store.summary().unwrap().n_keys, 5);
        assert_eq!(store.counts(), FaultCounts { reads: 4, writes: 5, failed: 2, reopens: 0 });
    }

    #[test]
    fn a_sticky_fault_holds_until_the_store_is_reopened() {
        let store = FaultyStore::new(Arc::new(MemoryStore::new()));
        store.set_sticky(true);
        store.set_disk_full(true);
        let (meta, keys) = block(1);
        assert!(is_disk_full(&store.put_pending(&meta, &keys).unwrap_err()));
        assert!(!store.is_healthy());
        // Out of service: reads fail too, and say why; a reopen fails while the disk is full.
        assert!(is_disk_full(&store.n_units().unwrap_err()));
        assert!(is_disk_full(&store.reopen_if_failed().unwrap_err()));
        store.set_disk_full(false);
        assert!(store.put_pending(&meta, &keys).is_err(), "freeing space is not enough");
        assert!(store.reopen_if_failed().unwrap());
        assert!(store.is_healthy());
        assert!(!store.reopen_if_failed().unwrap(), "in service: nothing to do");
        store.put_pending(&meta, &keys).unwrap();
        let counts = store.counts();
        assert_eq!((counts.failed, counts.reopens), (3, 2));
    }

    #[test]
    fn a_write_that_fails_after_it_was_made_leaves_a_block_a_crash_could_leave() {
        // Over a real store: the block is stored (pending), as when the disk fills up after its
        // record reached the disk; the caller saw a failure and settles it like a crash's.
        let sled = Arc::new(SledStore::temporary().unwrap());
        let store = FaultyStore::new(sled.clone());
        store.set_fail_after_write(true);
        store.set_disk_full(true);
        let (meta, keys) = block(2);
        assert!(store.put_pending(&meta, &keys).is_err());
        assert_eq!(sled.block_state(meta.block_id).unwrap(), Some(BlockState::Pending));
        store.set_disk_full(false);
        store.drop_pending(meta.block_id).unwrap();
        assert_eq!(sled.n_units().unwrap(), 0);
    }
}
