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

//!
//! # Counting without iterating
//! sled counts a tree by iterating it (`Tree::len` is `iter().count()`), and its iterators, once
//! they meet an error (once its disk was full, sled fails reads too), return that error again
//! for ever without moving on: such a count never ends, and a daemon
//! spun on one at 100% CPU. So [`KeyStore::n_units`] reads counters kept in memory: set by the
//! full, checked read of the trees that verification makes when the store is opened, and changed
//! by every write by exactly what sled says it changed (an insert that found no old value, a
//! removal that found one, the count a transaction returns). They are never stored, so no crash
//! can make them disagree with the trees; a reopen counts again. Every iteration in this crate
//! goes through [`until_error`], which ends after the first error, and stops there.
//!
//! # Opening: recovery, then verification
//! [`SledStore::open`] checks sled's `conf` file, removes the snapshot files sled began and never
//! finished (a full disk leaves one, which sled alone refuses as corrupted), opens the database
//! (sled checks the checksum of every log message as it replays its log), checks the marker and
//! the flush counter (which reveal a database that lost its contents or its last writes: see
//! [`verify`]), finishes the block writes a crash interrupted, then verifies the store ([`verify`]: every tree read to its end, every invariant above
//! checked) and refuses a damaged store with a [`StoreFault`] naming the damage, instead of
//! serving from it. `qkdctl store verify` runs the same checks on a stopped store
//! ([`verify::verify_dir`]).
//!
//! # Disk faults: out of service, then reopened
//! sled keeps the first I/O error of its log (a full disk, a failing one) and fails every write
//! after it, even once space is free again. So when a call fails with a disk or I/O error the
//! store goes *out of service*: the next call, or [`SledStore::reopen_if_failed`], drops the sled
//! database and opens it again from its directory, with recovery and verification, exactly as a
//! restart of the process would. While that fails (the disk is still full), calls fail at once
//! with [`StoreFault::OutOfService`] (saying whether the disk is full), and further automatic
//! attempts wait 1 s, then 2 s, 4 s, ... up to 30 s after each failed one;
//! [`SledStore::reopen_if_failed`] tries at once. No call waits for space or loops.
//! [`SledStore::is_healthy`] (also [`KeyStore::is_healthy`]) says whether the store is in
//! service, without any I/O.
//!
//! A block whose write failed is left as a crash at the same point would leave it, and the
//! reopen's recovery settles it the same way: the call returns the error (the link fails the
//! block), and afterwards the block is absent (its record never reached the disk: recovery
//! removes its units), or, if the failure came after its record was durable, stored in the state
//! being written. A pending block is then settled by `Hello` like any other; a ready record at
//! Alice whose `Commit` failed is found by Bob's `Hello` as committed, which is true (Bob holds
//! the block pending). Writes made without a flush ([`SledStore::take_ready_units`]) can be lost
//! by a reopen as by a crash, and are recovered the same way. Nothing is ever half-written.

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use uuid::Uuid;
use zeroize::Zeroizing;

pub use custody::{Kek, KekFault, SLOTS_FILE};

pub use fault::{StoreFault, describe, fault_of, is_disk_full};
pub use qkd_core::store::{
    BlockMeta, BlockState, HeldUnits, KeyStore, KeyUnit, MemoryStore, StoreError, StoreSummary, UnitHoldings,
};
pub use verify::{Problem, StoreCounts, Verification, verify_dir};

use custody::{Keys, Kind, Slots, Unseal};
use fault::{locate, sled_at};
use verify::Stage;

pub mod custody;
pub mod fault;
pub mod faulty;
pub mod kme;
pub mod verify;

/// A sled failure as a key-store error ([`StoreError::Backend`], with the sled error as its
/// source, until the store it happened in turns it into a [`StoreFault`]). `StoreError` is the
/// core's and `sled::Error` sled's, so this cannot be a `From`.
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

/// An iterator over sled results that ends after the first error (see "Counting without
/// iterating" in the crate documentation): sled's own iterators return the same error again for
/// ever without moving on.
pub struct UntilError<I> {
    inner: Option<I>,
}

impl<T, I: Iterator<Item = sled::Result<T>>> Iterator for UntilError<I> {
    type Item = sled::Result<T>;

    fn next(&mut self) -> Option<Self::Item> {
        let item = self.inner.as_mut()?.next();
        if !matches!(item, Some(Ok(_))) {
            self.inner = None;
        }
        item
    }
}

/// `iter` (a sled iterator, or any iterator of sled results) ending after its first error.
pub fn until_error<T, I: IntoIterator<Item = sled::Result<T>>>(iter: I) -> UntilError<I::IntoIter> {
    UntilError { inner: Some(iter.into_iter()) }
}

/// Number of entries of a sled tree, read to its end, or the first error: what `Tree::len`
/// would be if it stopped at an error.
pub(crate) fn count_entries(tree: &sled::Tree) -> Result<u64, sled::Error> {
    let mut n = 0;
    for key in until_error(tree.iter().keys()) {
        key?;
        n += 1;
    }
    Ok(n)
}

/// How long [`SledStore::open`] waits for sled's lock on the store directory.
const LOCK_WAIT: Duration = Duration::from_secs(2);

/// Units moved from `pending` to `ready` per sled transaction (see "Block writes" in the crate
/// documentation). A transaction keeps every write in memory until it commits, about 8 KB per
/// unit moved (a removal and an insert): 1024 units bound that to about 8 MB, and still move a
/// block of 20 000 units in 20 transactions (measurements: docs/store.md). Atomicity per unit
/// is all the invariant needs, so a block may be split.
const PUBLISH_BATCH: usize = 1024;

/// Wait before the first automatic reopen attempt that follows a failed one (see "Disk faults"
/// in the crate documentation); it doubles after each failed attempt, up to
/// [`REOPEN_BACKOFF_MAX`].
const REOPEN_BACKOFF_MIN: Duration = Duration::from_secs(1);

/// Longest wait between two automatic reopen attempts.
const REOPEN_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// A point where a crash can stop a block write: before each transaction of publishing. Tests
/// make a chosen one fail, leaving the store as a crash there would (see `tests.rs`), or fail
/// as a full disk would there.
fn crash_point() -> Result<(), StoreError> {
    #[cfg(test)]
    match tests::crash_now() {
        // Not an I/O error: the store stays in service, as the tests of crashes need.
        Some(tests::Crash::Stop) => return Err(db_error(sled::Error::ReportableBug("simulated crash".into()))),
        Some(tests::Crash::DiskFull) => {
            return Err(db_error(sled::Error::Io(std::io::Error::from(std::io::ErrorKind::StorageFull))));
        }
        None => {}
    }
    Ok(())
}

/// The sled-backed key store kept in a daemon's data directory.
///
/// Trees: `blocks` (block ID -> state byte + key IDs + JSON metadata), `ready` (key ID -> block
/// ID + key bytes) and `pending` (the same), the KME's reservations and cancellation tombstones
/// (see [`kme`]); beside them a marker record and file (see [`verify`]).
///
/// The sled database is held behind a lock so that it can be dropped and opened again without
/// the callers noticing (see "Disk faults" in the crate documentation): calls share it, a reopen
/// waits for the calls under way and holds the new ones back until it is done.
pub struct SledStore {
    /// The store's directory; `None` for a temporary store (which cannot be reopened).
    dir: Option<PathBuf>,
    /// The open database; `None` while out of service after a failed reopen.
    slot: RwLock<Option<Trees>>,
    /// Whether the store is in service.
    health: Mutex<Health>,
    /// The keys derived from the KEK (see [`custody`]).
    keys: std::sync::Arc<Keys>,
    /// Reservations are not handed out until the link's re-agreement at `Hello` has run
    /// ([`SledStore::hold_reservations_until_reagreed`]).
    reservations_held: std::sync::atomic::AtomicBool,
}

/// Why the store is out of service, if it is, and when it may reopen by itself.
#[derive(Default)]
struct Health {
    /// The failure that put the store out of service, or the last failed reopen (`None`: in
    /// service).
    failure: Option<String>,
    /// Whether that failure was a full disk.
    disk_full: bool,
    /// Reopen attempts that failed since the store went out of service.
    failed_reopens: u32,
    /// When the next automatic reopen may run (`None`: at the next call).
    next_attempt: Option<Instant>,
}

/// The error types of the store's calls: the store looks in them for the failure of its
/// backend (see [`SledStore::is_healthy`]).
pub(crate) trait CallError: From<StoreError> {
    /// The key-store error inside, if there is one.
    fn store_error(&mut self) -> Option<&mut StoreError>;
}

impl CallError for StoreError {
    fn store_error(&mut self) -> Option<&mut StoreError> {
        Some(self)
    }
}

impl SledStore {
    /// Opens (or creates) the store in `dir`: checks sled's `conf` file, opens the database,
    /// finishes the block writes a crash interrupted and verifies the store ([`verify`]). A
    /// damaged store is refused with a [`StoreFault`] (inside [`StoreError::Backend`]) that
    /// names the damage; so is a store another process holds (the only case that asks whether
    /// the daemon is still running) and a full disk.
    ///
    /// sled locks the directory for as long as any of its threads uses it, and finishes some log
    /// writes on a thread pool after the last handle is dropped; so a store closed and reopened
    /// in the same process (the tests, `qkdctl`, [`SledStore::reopen`]) can find the lock still
    /// held for a moment. The lock is retried for up to [`LOCK_WAIT`]; a store held by another
    /// process still fails, with [`StoreFault::Locked`].
    ///
    /// The key-encryption key `kek` is checked first (see [`custody`]): a wrong KEK, or a store
    /// made by an earlier version that kept its keys unsealed, is refused with a
    /// [`KekFault`] (inside [`StoreError::Backend`]) before any file of the store is opened for
    /// writing or changed.
    pub fn open(dir: &Path, kek: &Kek) -> Result<Self, StoreError> {
        let keys = std::sync::Arc::new(kek.derive());
        let trees = open_trees(dir, &keys)?;
        Ok(Self {
            dir: Some(dir.to_owned()),
            slot: RwLock::new(Some(trees)),
            health: Mutex::default(),
            keys,
            reservations_held: Default::default(),
        })
    }

    /// A store in a temporary location, deleted when dropped (simulations and tests), sealed
    /// under a random KEK with its slots in memory. It cannot be reopened, so its failures are
    /// only returned.
    pub fn temporary() -> Result<Self, StoreError> {
        let db = sled::Config::new().temporary(true).open().db()?;
        let keys = std::sync::Arc::new(Kek::generate("(random KEK of a temporary store)").derive());
        let trees = Trees::new(db, keys.clone(), Slots::memory())?;
        Ok(Self {
            dir: None,
            slot: RwLock::new(Some(trees)),
            health: Mutex::default(),
            keys,
            reservations_held: Default::default(),
        })
    }

    /// Holds the KME's reservations back ([`SledStore::deliver_reserved_keys`] refuses with
    /// [`kme::KmeStoreError::AwaitingReagreement`]) until the link's re-agreement at `Hello`
    /// ([`KeyStore::reagreed`]): a store just restored from an older copy may hold reservations
    /// that were fetched since, which the re-agreement erases. The daemons call this when they
    /// open their store.
    pub fn hold_reservations_until_reagreed(&self) {
        self.reservations_held.store(true, Ordering::SeqCst);
    }

    /// Whether reservations are held back until the re-agreement at `Hello`.
    pub fn reservations_held(&self) -> bool {
        self.reservations_held.load(Ordering::SeqCst)
    }

    /// The store's directory (`None` for a temporary store).
    pub fn path(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// Whether the store is in service: no call failed with a disk or I/O error since it was
    /// (re)opened. No I/O.
    pub fn is_healthy(&self) -> bool {
        self.health().failure.is_none()
    }

    /// The failure that put the store out of service (or the last failed reopen), if it is.
    pub fn failure(&self) -> Option<String> {
        self.health().failure.clone()
    }

    /// Brings a store that is out of service back (see "Disk faults" in the crate
    /// documentation): drops the database and opens it again now, whatever the wait between
    /// automatic attempts. `Ok(true)`: reopened; `Ok(false)`: the store was in service, nothing
    /// done; an error: still out of service (a full disk, damage found by verification), and
    /// the error says why.
    pub fn reopen_if_failed(&self) -> Result<bool, StoreError> {
        if self.is_healthy() {
            return Ok(false);
        }
        self.reopen_now(false).map(|()| true)
    }

    /// Drops the database and opens it again from the store's directory, with recovery and
    /// verification, as [`SledStore::open`] does; in service or not. Waits for the calls under
    /// way. A failure leaves the store out of service.
    pub fn reopen(&self) -> Result<(), StoreError> {
        self.reopen_now(true)
    }

    /// Verifies the open store ([`verify`]) while it is in use: a write under way, like a
    /// crash's leftovers, is a note rather than a problem. Fails only on an I/O error.
    pub fn verify(&self) -> Result<Verification, StoreError> {
        let label = self.label().to_owned();
        self.with(|trees| {
            let mut v = Verification::new(&label);
            if let Some(dir) = &self.dir {
                verify::check_marker(trees, dir, false, &mut v)?;
                verify::check_flushes(trees, dir, false, &mut v)?;
            }
            trees.check(Stage::AsFound, &mut v)?;
            Ok(v)
        })
    }

    /// Makes every write made before this call durable (group commit: concurrent callers share
    /// one fsync, see [`GroupFlush`]).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.with(|trees| trees.flush())
    }

    /// How the store is named in errors.
    fn label(&self) -> &Path {
        self.dir.as_deref().unwrap_or(Path::new("(temporary store)"))
    }

    fn health(&self) -> MutexGuard<'_, Health> {
        // The state is a few plain fields, consistent between any two statements.
        self.health.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs one call on the database: reopens it first when it is out of service and an
    /// attempt is due, fails at once when it is out of service otherwise, and notes a disk or
    /// I/O failure of the call (the store goes out of service).
    pub(crate) fn with<T, E: CallError>(&self, call: impl FnOnce(&Trees) -> Result<T, E>) -> Result<T, E> {
        if self.reopen_due() {
            self.reopen_now(false)?;
        }
        let slot = self.slot.read().unwrap_or_else(PoisonError::into_inner);
        let Some(trees) = slot.as_ref() else {
            return Err(self.out_of_service().into());
        };
        // The failure is noted while the database is still held, so that a reopen, which
        // waits for this call, cannot clear it before it is noted.
        call(trees).map_err(|mut e| {
            if let Some(error) = e.store_error() {
                self.note(error);
            }
            e
        })
    }

    fn reopen_due(&self) -> bool {
        let health = self.health();
        self.dir.is_some() && health.failure.is_some() && health.next_attempt.is_none_or(|next| Instant::now() >= next)
    }

    fn out_of_service(&self) -> StoreError {
        let health = self.health();
        StoreError::backend(StoreFault::OutOfService {
            path: self.label().to_owned(),
            cause: health.failure.clone().unwrap_or_else(|| "the database is closed".into()),
            disk_full: health.disk_full,
        })
    }

    /// Turns a raw sled error in `error` into its [`StoreFault`], and puts the store out of
    /// service when the database must be reopened.
    fn note(&self, error: &mut StoreError) {
        *error = locate(std::mem::replace(error, StoreError::Corrupt(String::new())), self.label());
        if self.dir.is_none() || !fault_of(error).is_some_and(StoreFault::needs_reopen) {
            return;
        }
        let mut health = self.health();
        if health.failure.is_none() {
            tracing::error!(%error, "key store out of service; it is reopened at the next call");
            health.failure = Some(error.to_string());
            health.disk_full = is_disk_full(error);
            health.next_attempt = None;
        }
    }

    /// Reopens the database (see [`SledStore::reopen`]); unless `force`d, only if it is still
    /// out of service once the calls under way are done (another caller may have reopened it).
    fn reopen_now(&self, force: bool) -> Result<(), StoreError> {
        let Some(dir) = &self.dir else {
            return Err(StoreError::backend(std::io::Error::other("a temporary key store cannot be reopened")));
        };
        let mut slot = self.slot.write().unwrap_or_else(PoisonError::into_inner);
        if !force && self.is_healthy() {
            return Ok(());
        }
        if let Some(old) = slot.take() {
            // sled's drop of a database it believes healthy fsyncs, and panics if that fails.
            if std::panic::catch_unwind(AssertUnwindSafe(move || drop(old))).is_err() {
                tracing::warn!(path = %dir.display(), "sled panicked closing the key store before reopening it");
            }
        }
        match open_trees(dir, &self.keys) {
            Ok(trees) => {
                *slot = Some(trees);
                let old = std::mem::take(&mut *self.health());
                if let Some(failure) = old.failure {
                    tracing::info!(path = %dir.display(), %failure, "key store reopened; back in service");
                }
                Ok(())
            }
            Err(e) => {
                let mut health = self.health();
                health.failure = Some(e.to_string());
                health.disk_full = is_disk_full(&e);
                health.failed_reopens += 1;
                let wait = REOPEN_BACKOFF_MIN.saturating_mul(1 << (health.failed_reopens - 1).min(5));
                health.next_attempt = Some(Instant::now() + wait.min(REOPEN_BACKOFF_MAX));
                tracing::warn!(error = %e, retry_in_s = wait.min(REOPEN_BACKOFF_MAX).as_secs(), "key store could not be reopened");
                Err(e)
            }
        }
    }

    /// The open database's trees, for the tests that write to sled directly.
    #[cfg(test)]
    pub(crate) fn trees(&self) -> TreesGuard<'_> {
        TreesGuard(self.slot.read().unwrap_or_else(PoisonError::into_inner))
    }
}

/// The open database's trees, held (see [`SledStore::trees`]).
#[cfg(test)]
pub(crate) struct TreesGuard<'a>(std::sync::RwLockReadGuard<'a, Option<Trees>>);

#[cfg(test)]
impl std::ops::Deref for TreesGuard<'_> {
    type Target = Trees;

    fn deref(&self) -> &Trees {
        self.0.as_ref().expect("the store is open")
    }
}

/// One open sled database and its trees: the store's operations, which [`SledStore`] runs
/// through [`SledStore::with`].
pub(crate) struct Trees {
    db: sled::Db,
    /// The keys derived from the KEK.
    keys: std::sync::Arc<Keys>,
    /// The per-unit secrets (see [`custody`]).
    slots: Slots,
    blocks: sled::Tree,
    ready: sled::Tree,
    pending: sled::Tree,
    reserved: sled::Tree,
    cancelled: sled::Tree,
    /// Units in `ready` (see "Counting without iterating" in the crate documentation).
    n_ready: AtomicU64,
    /// Units in `pending`.
    n_pending: AtomicU64,
    group_flush: GroupFlush,
}

impl Drop for Trees {
    /// A store in service is closed with a counted flush, so that the counter covers every write
    /// it made, those made without a flush included (sled's own flush when it closes does not
    /// count). A failure is the same as a crash at this point, and is left to the next open.
    fn drop(&mut self) {
        let counting = self.group_flush.state.lock().map(|state| state.counter.is_some()).unwrap_or(false);
        if counting && let Err(e) = self.flush() {
            tracing::warn!(error = %e, "key store: the flush when closing failed");
        }
    }
}

/// Subtracts `n` from a counter, stopping at zero.
fn count_down(counter: &AtomicU64, n: u64) {
    // `fetch_update` with a closure that always succeeds never fails.
    let _ = counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| Some(c.saturating_sub(n)));
}

/// Group commit: callers that need their writes on disk share flushes. A flush (an fsync,
/// milliseconds on a virtual disk) persists everything written before it started, so a caller
/// needs one flush that *started* after its write; while one runs, the callers that arrive wait
/// for it and then one of them runs the next flush for all of them. Under concurrent requests
/// this turns one fsync per request into one per batch, without weakening anyone's guarantee.
#[derive(Default)]
struct GroupFlush {
    state: Mutex<FlushState>,
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
    /// The error of the last failed flush (sled's copy keeps the I/O error's kind, so a full
    /// disk is still one for the callers that waited for that flush).
    last_error: Option<sled::Error>,
    /// The store's flush counter, once [`Trees::count_flushes`] started it (`None`: a temporary
    /// store, or one being verified or refused).
    counter: Option<FlushCounter>,
}

/// The store's count of flushes (see "the flush counter" in [`verify`]): every flush writes the
/// next number into the database, flushes, and then writes it to [`verify::FLUSHES_FILE`]. So
/// the file never says more than the database holds on disk, unless the database lost writes
/// that had reached the disk.
#[derive(Clone)]
struct FlushCounter {
    /// The counter file.
    file: PathBuf,
    /// The number of the last flush that succeeded (in the database and in the file).
    count: u64,
}

/// Flushes the database; with a counter, writes the next count into the database first and
/// into the counter file after (see [`FlushCounter`]).
fn flush_counted(db: &sled::Db, counter: Option<&FlushCounter>) -> Result<(), sled::Error> {
    let Some(counter) = counter else {
        return db.flush().map(drop);
    };
    let next = counter.count + 1;
    db.insert(verify::FLUSHES_KEY, &next.to_le_bytes())?;
    db.flush()?;
    verify::write_flushes_file(&counter.file, next).map_err(sled::Error::Io)
}

impl GroupFlush {
    /// Returns once a flush that started after this call has succeeded, running it if no other
    /// caller does; the error of that flush otherwise.
    fn flush(&self, db: &sled::Db, slots: &Slots) -> Result<(), StoreError> {
        // Invariant: nothing panics while holding this lock, so it is never poisoned.
        let mut state = self.state.lock().expect("flush lock poisoned");
        // Any flush numbered `needed` or later started after this caller's writes.
        let needed = state.started + 1;
        loop {
            if state.succeeded >= needed {
                return Ok(());
            }
            if state.finished >= needed {
                let error =
                    state.last_error.clone().unwrap_or_else(|| sled::Error::Io(std::io::Error::other("flush failed")));
                return Err(db_error(error));
            }
            if !state.running {
                state.running = true;
                state.started += 1;
                let number = state.started;
                // Only the flush that runs uses the counter: no other changes it meanwhile.
                let counter = state.counter.clone();
                drop(state);
                // Erasures made so far reach the disk with this flush (see `custody`).
                let result =
                    slots.sync_if_dirty().map_err(sled::Error::Io).and_then(|()| flush_counted(db, counter.as_ref()));
                state = self.state.lock().expect("flush lock poisoned");
                state.running = false;
                state.finished = number;
                match &result {
                    Ok(()) => {
                        state.succeeded = number;
                        if let Some(counter) = state.counter.as_mut() {
                            counter.count += 1;
                        }
                    }
                    Err(e) => state.last_error = Some(e.clone()),
                }
                self.finished.notify_all();
                if number >= needed {
                    return result.map_err(db_error);
                }
                continue;
            }
            state = self.finished.wait(state).expect("flush lock poisoned");
        }
    }
}

impl Trees {
    /// Opens every tree once; the counters start at zero (see [`Trees::set_counts`]).
    fn new(db: sled::Db, keys: std::sync::Arc<Keys>, slots: Slots) -> Result<Self, StoreError> {
        Ok(Self {
            keys,
            slots,
            blocks: db.open_tree("blocks").db()?,
            ready: db.open_tree("ready").db()?,
            pending: db.open_tree("pending").db()?,
            reserved: db.open_tree(kme::RESERVATIONS_TREE).db()?,
            cancelled: db.open_tree(kme::CANCELLED_TREE).db()?,
            db,
            n_ready: AtomicU64::new(0),
            n_pending: AtomicU64::new(0),
            group_flush: GroupFlush::default(),
        })
    }

    /// Starts the flush counter (see [`FlushCounter`]) at `count`, the database's, writing
    /// `file` at every flush from now on.
    fn count_flushes(&self, file: PathBuf, count: u64) {
        // Invariant: nothing panics while holding this lock, so it is never poisoned.
        self.group_flush.state.lock().expect("flush lock poisoned").counter = Some(FlushCounter { file, count });
    }

    /// Sets the unit counters from a verification's full read of the trees.
    fn set_counts(&self, counts: &StoreCounts) {
        self.n_ready.store(counts.ready_units, Ordering::Relaxed);
        self.n_pending.store(counts.pending_units, Ordering::Relaxed);
    }

    fn n_units(&self) -> u64 {
        self.n_ready.load(Ordering::Relaxed) + self.n_pending.load(Ordering::Relaxed)
    }

    /// Settles every unit of the `pending` tree by its block's record (see "Block writes" in
    /// the crate documentation): removed without a record, published for a ready block, kept
    /// for a pending one. A unit or record that does not decode is left alone, for verification
    /// to report.
    fn recover(&self) -> Result<(), StoreError> {
        let mut states: std::collections::HashMap<Uuid, Option<BlockState>> = std::collections::HashMap::new();
        let (mut removed, mut published) = (0u64, 0u64);
        let mut to_publish = Vec::new();
        let mut removed_slots = Vec::new();
        let mut last: Option<sled::IVec> = None;
        for item in until_error(self.pending.iter()) {
            let (key_id, value) = item.map_err(|e| {
                let after = last.as_ref().map(|k| format!(", after key 0x{}", hex::encode(k))).unwrap_or_default();
                sled_at(format!("recovery, reading tree `pending`{after}"), e)
            })?;
            last = Some(key_id.clone());
            let (Ok(block_id), Ok(unit_id)) = (decode_key(&value).map(|(b, _)| b), Uuid::from_slice(&key_id)) else {
                continue;
            };
            let state = match states.get(&block_id) {
                Some(state) => *state,
                None => {
                    let state = match self.blocks.get(block_id.as_bytes()).db()? {
                        None => None,
                        Some(record) => match decode_block(&record) {
                            Ok((_, state, _)) => Some(state),
                            // Verification reports the record; its units stay as they are.
                            Err(_) => Some(BlockState::Pending),
                        },
                    };
                    states.insert(block_id, state);
                    state
                }
            };
            match state {
                None => {
                    if let Some(value) = self.pending.remove(&key_id).db()? {
                        removed_slots.extend(unit_slot(&value));
                    }
                    removed += 1;
                }
                Some(BlockState::Ready) => {
                    to_publish.push(unit_id);
                    if to_publish.len() == PUBLISH_BATCH {
                        published += self.publish_batch(&to_publish)?;
                        to_publish.clear();
                    }
                }
                Some(BlockState::Pending) => {}
            }
        }
        published += self.publish_batch(&to_publish)?;
        self.erase_slots(removed_slots, false)?;
        let erased = self.remove_erased()?;
        if erased > 0 {
            tracing::warn!(
                erased,
                "key store: removed records of units delivered or discarded before a crash (their slots were erased, \
                 their removal had not reached the disk)"
            );
        }
        let used = self.used_slots()?;
        let zeroed = self.slots.scrub(&used).map_err(|e| self.slot_error(e))?;
        if zeroed > 0 {
            tracing::warn!(zeroed, "key store: zeroed slots no record names (erasures a crash interrupted)");
        }
        if removed + published + erased > 0 {
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

    /// Removes the `ready` units and the reservations whose slots were erased (see [`custody`]:
    /// they were delivered or discarded, and a crash lost their removal). Returns how many.
    /// Pending units are left alone: a pending unit's slot is erased only after its record is
    /// removed, so an erased one is damage, for verification to report.
    fn remove_erased(&self) -> Result<u64, StoreError> {
        let mut n = 0;
        for (tree, name) in [(&self.ready, "ready"), (&self.reserved, kme::RESERVATIONS_TREE)] {
            let mut erased = Vec::new();
            for item in until_error(tree.iter()) {
                let (key, value) = item.map_err(|e| sled_at(format!("recovery, reading tree `{name}`"), e))?;
                let sealed = if name == "ready" {
                    decode_key(&value).ok().map(|(_, sealed)| sealed.to_vec())
                } else {
                    kme::reservation_sealed(&value).ok()
                };
                let Some(sealed) = sealed else {
                    continue;
                };
                if Keys::is_erased(&self.slots, &sealed).map_err(|e| self.slot_error(e))? {
                    erased.push(key);
                }
            }
            for key in erased {
                if tree.remove(&key).db()?.is_some() {
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    /// The slots named by the records of `pending`, `ready` and the reservations.
    pub(crate) fn used_slots(&self) -> Result<std::collections::HashSet<u32>, StoreError> {
        let mut used = std::collections::HashSet::new();
        for (tree, name) in [(&self.pending, "pending"), (&self.ready, "ready")] {
            for item in until_error(tree.iter().values()) {
                let value = item.map_err(|e| sled_at(format!("reading tree `{name}`"), e))?;
                used.extend(unit_slot(&value));
            }
        }
        for item in until_error(self.reserved.iter().values()) {
            let value = item.map_err(|e| sled_at(format!("reading tree `{}`", kme::RESERVATIONS_TREE), e))?;
            if let Ok(sealed) = kme::reservation_sealed(&value) {
                used.extend(custody::sealed_slot(&sealed));
            }
        }
        Ok(used)
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
    /// the crate documentation). Returns how many units were moved.
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
        count_down(&self.n_pending, moved + duplicates);
        self.n_ready.fetch_add(moved, Ordering::Relaxed);
        if duplicates > 0 {
            tracing::warn!(duplicates, "key store: removed the pending copy of units already published");
        }
        Ok(moved)
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.group_flush.flush(&self.db, &self.slots)
    }

    /// A slot-file I/O error as a store error (an I/O fault: the store goes out of service).
    pub(crate) fn slot_error(&self, e: std::io::Error) -> StoreError {
        sled_at(format!("the slot file {}", self.slots.path().display()), sled::Error::Io(e))
    }

    /// Takes `n` slots for new sealed records and makes their secrets durable, before any record
    /// naming them is written (see [`custody`]).
    pub(crate) fn allocate_slots(&self, n: usize) -> Result<Vec<custody::Slot>, StoreError> {
        let slots = self.slots.allocate(n).map_err(|e| self.slot_error(e))?;
        if let Err(e) = self.slots.sync() {
            let _ = self.slots.erase(slots.iter().map(|s| s.index));
            return Err(self.slot_error(e));
        }
        Ok(slots)
    }

    /// Erases the slots of records just removed (zeroed in place; durable at the next flush,
    /// or now with `sync`).
    pub(crate) fn erase_slots(&self, indices: impl IntoIterator<Item = u32>, sync: bool) -> Result<(), StoreError> {
        self.slots.erase(indices).map_err(|e| self.slot_error(e))?;
        if sync {
            self.slots.sync().map_err(|e| self.slot_error(e))?;
        }
        Ok(())
    }

    /// The key bytes of the unit record `value` of unit `key_id`, and its block.
    pub(crate) fn unseal_unit(&self, key_id: Uuid, value: &[u8]) -> Result<(Uuid, Zeroizing<Vec<u8>>), StoreError> {
        let (block_id, sealed) = decode_key(value)?;
        let key = self
            .keys
            .open(&self.slots, Kind::Unit, key_id, Some(block_id), sealed)
            .map_err(|e| unseal_error(&e, "unit", key_id))?;
        Ok((block_id, key))
    }

    /// Stores a block (see "Block writes" in the crate documentation): units to `pending`,
    /// the record, then, for a ready block, the units published.
    fn put(&self, meta: &BlockMeta, keys: &[KeyUnit], state: BlockState) -> Result<(), StoreError> {
        let block_key = meta.block_id.as_bytes();
        if self.blocks.contains_key(block_key).db()? {
            return Err(StoreError::DuplicateBlock(meta.block_id));
        }
        // Each unit's secret is durable in its slot before its record is written (see
        // `custody`).
        let slots = self.allocate_slots(keys.len())?;
        for (key, slot) in keys.iter().zip(&slots) {
            let sealed = self.keys.seal(slot, Kind::Unit, key.key_id, Some(meta.block_id), &key.key);
            let old = self.pending.insert(key.key_id.as_bytes(), encode_key(meta.block_id, &sealed).as_slice()).db()?;
            if old.is_none() {
                self.n_pending.fetch_add(1, Ordering::Relaxed);
            }
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
        let mut erased = Vec::with_capacity(key_ids.len());
        for key_id in &key_ids {
            if let Some(value) = self.pending.remove(key_id.as_bytes()).db()? {
                count_down(&self.n_pending, 1);
                erased.extend(unit_slot(&value));
            }
        }
        self.flush()?;
        self.erase_slots(erased, true)
    }

    fn summary(&self) -> Result<StoreSummary, StoreError> {
        let mut hasher = Sha256::new();
        let (mut n_keys, mut n_key_bits) = (0u64, 0u64);
        // sled iterates in key order; UUID bytes order is key-ID order.
        for item in until_error(self.ready.iter()) {
            let (key_id, value) = item.db()?;
            let unit_id = Uuid::from_slice(&key_id).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let (_, key) = self.unseal_unit(unit_id, &value)?;
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

    fn blocks(&self) -> Result<Vec<(BlockMeta, BlockState)>, StoreError> {
        let mut out = Vec::new();
        for item in until_error(self.blocks.iter()) {
            let (_, value) = item.db()?;
            let (meta, state, _) = decode_block(&value)?;
            out.push((meta, state));
        }
        Ok(out)
    }
}

impl Trees {
    /// See [`KeyStore::holdings`]: every block record read, each of its units looked up in the
    /// tree of its state.
    fn holdings(&self) -> Result<UnitHoldings, StoreError> {
        let mut holdings = UnitHoldings::default();
        for item in until_error(self.blocks.iter()) {
            let (_, value) = item.db()?;
            let (meta, state, key_ids) = decode_block(&value)?;
            let units = match state {
                BlockState::Pending => &self.pending,
                BlockState::Ready => &self.ready,
            };
            let held =
                key_ids.iter().map(|id| units.contains_key(id.as_bytes()).db()).collect::<Result<Vec<_>, _>>()?;
            if held.contains(&true) {
                holdings.blocks.push(HeldUnits { block_id: meta.block_id, state, key_ids, held });
            }
        }
        Ok(holdings)
    }

    /// See [`KeyStore::drop_reservations`]: every reservation erased (compare-and-swap, so that
    /// a concurrent delivery is never undone), durably, and its slot erased. Tombstones stay.
    fn drop_reservations(&self) -> Result<u64, StoreError> {
        let (mut n, mut erased) = (0, Vec::new());
        for item in until_error(self.reserved.iter()) {
            let (key, value) = item.db()?;
            let slot = kme::reservation_sealed(&value).ok().and_then(|sealed| custody::sealed_slot(&sealed));
            if self.reserved.compare_and_swap(&key, Some(&value), None::<&[u8]>).db()?.is_ok() {
                n += 1;
                erased.extend(slot);
            }
        }
        if n > 0 {
            self.flush()?;
            self.erase_slots(erased, true)?;
        }
        Ok(n)
    }
}

impl KeyStore for SledStore {
    fn put_pending(&self, meta: &BlockMeta, keys: &[KeyUnit]) -> Result<(), StoreError> {
        self.with(|t| t.put(meta, keys, BlockState::Pending))
    }

    fn put_ready(&self, meta: &BlockMeta, keys: &[KeyUnit]) -> Result<(), StoreError> {
        self.with(|t| t.put(meta, keys, BlockState::Ready))
    }

    fn mark_ready(&self, block_id: Uuid) -> Result<(), StoreError> {
        self.with(|t| t.mark_ready(block_id))
    }

    fn drop_pending(&self, block_id: Uuid) -> Result<(), StoreError> {
        self.with(|t| t.drop_pending(block_id))
    }

    fn block_state(&self, block_id: Uuid) -> Result<Option<BlockState>, StoreError> {
        self.with(|t| Ok(t.load_block(block_id)?.map(|(_, state, _)| state)))
    }

    fn pending_blocks(&self) -> Result<Vec<Uuid>, StoreError> {
        let blocks = self.with(|t| t.blocks())?;
        Ok(blocks
            .into_iter()
            .filter(|(_, state)| *state == BlockState::Pending)
            .map(|(meta, _)| meta.block_id)
            .collect())
    }

    fn summary(&self) -> Result<StoreSummary, StoreError> {
        self.with(|t| t.summary())
    }

    /// Kept counts, no iteration (see "Counting without iterating" in the crate documentation).
    fn n_units(&self) -> Result<u64, StoreError> {
        self.with(|t| Ok(t.n_units()))
    }

    fn blocks(&self) -> Result<Vec<(BlockMeta, BlockState)>, StoreError> {
        self.with(|t| t.blocks())
    }

    fn holdings(&self) -> Result<UnitHoldings, StoreError> {
        self.with(|t| t.holdings())
    }

    /// In sled transactions of `PUBLISH_BATCH` units (a transaction keeps its writes in
    /// memory), each durable before the next.
    fn discard_units(&self, unit_ids: &[Uuid]) -> Result<u64, StoreError> {
        let mut n = 0;
        for batch in unit_ids.chunks(PUBLISH_BATCH) {
            n += self.discard_ready_units(batch)? as u64;
        }
        Ok(n)
    }

    fn drop_reservations(&self) -> Result<u64, StoreError> {
        self.with(|t| t.drop_reservations())
    }

    fn reagreed(&self) {
        if self.reservations_held.swap(false, Ordering::SeqCst) {
            tracing::info!(path = %self.label().display(), "key store re-agreed with the peer's: reservations served again");
        }
    }

    fn is_healthy(&self) -> bool {
        SledStore::is_healthy(self)
    }

    fn reopen_if_failed(&self) -> Result<bool, StoreError> {
        SledStore::reopen_if_failed(self)
    }
}

/// Opens sled's database in `dir`, retrying its directory lock for up to [`LOCK_WAIT`] (see
/// [`SledStore::open`]). First removes the snapshot files sled began and never finished
/// ([`remove_unfinished_snapshots`]), adding a note to `notes` for each.
fn open_db(dir: &Path, notes: &mut Vec<String>) -> Result<sled::Db, sled::Error> {
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        // Held by another process (or by sled threads of this one still closing a database):
        // sled's own open below says so, or succeeds once the lock is free.
        if let Some(removed) = remove_unfinished_snapshots(dir).map_err(sled::Error::Io)? {
            notes.extend(removed.iter().map(|path| {
                format!(
                    "removed {}: a snapshot sled began writing and never finished (a full disk or a crash \
                     interrupted it); sled reads the previous snapshot and its log instead",
                    path.display()
                )
            }));
        }
        match sled::Config::new().path(dir).open() {
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock") && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            result => return result,
        }
    }
}

/// Removes sled's unfinished snapshot files (`snap.<lsn>.generating`) from the store in `dir`,
/// if no process holds the store; returns the files removed, or `None` when the store is held
/// (sled may be writing one of them right now).
///
/// sled writes a snapshot of its page table to `snap.<lsn>.generating`, syncs it and only then
/// renames it to `snap.<lsn>`, so such a file is never a snapshot sled relies on. But sled's
/// open takes the newest `snap.*` file of all, unfinished ones included, and refuses a short or
/// partial one as corrupted: a disk that filled while sled wrote a snapshot (which leaves the
/// file empty) made every later open fail as if the store were damaged. Without the file sled
/// reads the previous snapshot and replays its log from there, as it would have before starting
/// the one that failed.
///
/// The store is held while this runs by an exclusive lock on its `db` file, the lock sled takes
/// (`flock`), released before sled opens the store.
fn remove_unfinished_snapshots(dir: &Path) -> std::io::Result<Option<Vec<PathBuf>>> {
    use fs2::FileExt;
    let db_file = match std::fs::File::open(dir.join("db")) {
        Ok(file) => file,
        // No data file: a new store (or none at all), with no snapshot to read.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Some(Vec::new())),
        Err(e) => return Err(e),
    };
    if let Err(e) = db_file.try_lock_exclusive() {
        return if e.kind() == std::io::ErrorKind::WouldBlock
            || e.raw_os_error() == fs2::lock_contended_error().raw_os_error()
        {
            Ok(None)
        } else {
            Err(e)
        };
    }
    let mut removed = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("snap.") && name.ends_with(".generating") && entry.file_type()?.is_file() {
            std::fs::remove_file(entry.path())?;
            removed.push(entry.path());
        }
    }
    // Closing the file releases the lock.
    drop(db_file);
    Ok(Some(removed))
}

/// Opens the store in `dir` for service: `conf` checked, database opened, marker checked (and
/// written for a new store), interrupted writes recovered, store verified and counted (see
/// "Opening" in the crate documentation). Every error names the store's directory.
fn open_trees(dir: &Path, keys: &std::sync::Arc<Keys>) -> Result<Trees, StoreError> {
    // The KEK first: a wrong one, or an old unsealed store, is refused before anything is
    // written (sled's open alone may write).
    if !Slots::check(dir, keys).map_err(StoreError::backend)? {
        Slots::create(dir, keys).map_err(StoreError::backend)?;
    }
    for note in verify::check_conf(dir).map_err(StoreError::backend)? {
        tracing::warn!(path = %dir.display(), "{note}");
    }
    let mut notes = Vec::new();
    let db = open_db(dir, &mut notes).map_err(|e| StoreError::backend(fault::classify(e, dir, None)))?;
    for note in &notes {
        tracing::warn!(path = %dir.display(), "{note}");
    }
    let opened = std::panic::catch_unwind(AssertUnwindSafe(|| -> Result<Trees, StoreError> {
        let slots = Slots::open(dir, keys, true).map_err(StoreError::backend)?;
        let trees = Trees::new(db, keys.clone(), slots)?;
        let mut v = Verification::new(dir);
        verify::check_marker(&trees, dir, true, &mut v)?;
        let flushes = verify::check_flushes(&trees, dir, true, &mut v)?;
        // A database that lost its contents or its last writes is refused before recovery
        // changes anything in it.
        if !v.problems.is_empty() {
            return Err(StoreError::backend(StoreFault::Invalid { path: dir.to_owned(), problems: v.problems }));
        }
        trees.count_flushes(dir.join(verify::FLUSHES_FILE), flushes);
        trees.recover()?;
        trees.check(Stage::Recovered, &mut v)?;
        if !v.problems.is_empty() {
            return Err(StoreError::backend(StoreFault::Invalid { path: dir.to_owned(), problems: v.problems }));
        }
        for note in &v.notes {
            tracing::warn!(path = %dir.display(), "{note}");
        }
        trees.set_counts(&v.counts);
        Ok(trees)
    }));
    match opened {
        Ok(result) => result.map_err(|e| locate(e, dir)),
        Err(panic) => {
            Err(StoreError::backend(StoreFault::Damaged { path: dir.to_owned(), detail: verify::panicked(&*panic) }))
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
    let ids_end = n.checked_mul(16).and_then(|len| len.checked_add(5)).ok_or_else(corrupt)?;
    let ids = value.get(5..ids_end).ok_or_else(corrupt)?;
    let key_ids = ids
        .chunks_exact(16)
        .map(|c| Uuid::from_slice(c).map_err(|e| StoreError::Corrupt(e.to_string())))
        .collect::<Result<Vec<_>, _>>()?;
    let meta = serde_json::from_slice(&value[ids_end..]).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    Ok((meta, state, key_ids))
}

/// Key record: block ID (16 bytes) then the sealed key bytes (see [`custody`]).
fn encode_key(block_id: Uuid, sealed: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + sealed.len());
    out.extend_from_slice(block_id.as_bytes());
    out.extend_from_slice(sealed);
    out
}

/// A key record's block ID and sealed key bytes (at least a seal's length).
fn decode_key(value: &[u8]) -> Result<(Uuid, &[u8]), StoreError> {
    if value.len() < 16 + custody::SEAL_OVERHEAD {
        return Err(StoreError::Corrupt("truncated key record".into()));
    }
    let block_id = Uuid::from_slice(&value[..16]).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    Ok((block_id, &value[16..]))
}

/// The slot a unit record names (`None`: the record is malformed).
pub(crate) fn unit_slot(value: &[u8]) -> Option<u32> {
    decode_key(value).ok().and_then(|(_, sealed)| custody::sealed_slot(sealed))
}

/// Key bytes a unit record holds, from its length.
pub(crate) fn unit_len(value: &[u8]) -> Option<usize> {
    decode_key(value).ok().and_then(|(_, sealed)| custody::sealed_plain_len(sealed.len()))
}

/// A record that could not be opened, as a store error.
pub(crate) fn unseal_error(e: &Unseal, what: &str, id: Uuid) -> StoreError {
    match e {
        Unseal::Io(detail) => StoreError::backend(std::io::Error::other(format!("{what} {id}: {detail}"))),
        _ => StoreError::Corrupt(format!("{what} {id} cannot be opened: {e}")),
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod fault_tests;

#[cfg(test)]
impl Trees {
    /// A unit record sealed as the store seals one (its slot allocated), for tests that write
    /// records behind the store's back.
    pub(crate) fn sealed_unit(&self, key_id: Uuid, block_id: Uuid, key: &[u8]) -> Vec<u8> {
        let slot = self.allocate_slots(1).unwrap().pop().unwrap();
        encode_key(block_id, &self.keys.seal(&slot, Kind::Unit, key_id, Some(block_id), key))
    }

    /// A reservation's sealed key, as [`Trees::sealed_unit`].
    pub(crate) fn sealed_reservation(&self, key_id: Uuid, key: &[u8]) -> Vec<u8> {
        let slot = self.allocate_slots(1).unwrap().pop().unwrap();
        self.keys.seal(&slot, Kind::Reservation, key_id, None, key).to_vec()
    }
}
