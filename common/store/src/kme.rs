//! Key-pool operations of the ETSI GS QKD 014 key delivery (the KME, crate `qkd-kme`).
//!
//! Ready 256-bit units leave the pool in two ways, each one sled transaction:
//! * the KME that answers a master SAE removes the units it handed out
//!   ([`SledStore::take_ready_units`]; not flushed before the answer, see there);
//! * the peer KME turns the same units into *reservations* ([`SledStore::reserve_keys`]): one
//!   record per ETSI key in the `kme_reservations` tree (key ID -> master, slaves, size, key
//!   bytes), which the slave SAEs later fetch, each once ([`SledStore::deliver_reserved_keys`]).
//!
//! When the KME that asked for a reservation never got the answer, it asks the peer to cancel
//! it ([`SledStore::cancel_reservations`]): the record is erased (its units are not given back to
//! the pool) and a *tombstone* in the `kme_cancelled` tree (key ID -> outcome, time) makes any
//! later reservation of that key ID fail, and a repeated cancellation give the same answer.
//! Tombstones expire with the reservations ([`SledStore::purge_reservations`]).
//!
//! Block records keep listing the IDs of units that were served; only the `ready` tree says
//! which units are still available.

use tracing::error;
use uuid::Uuid;
use zeroize::Zeroizing;

use super::{
    CallError, DbResult, KeyUnit, SledStore, StoreError, Trees, count_down, count_entries, db_error, unit_slot,
    unseal_error, until_error,
};
use crate::custody::{self, Kind};

/// Name of the sled tree holding the reservations.
pub(super) const RESERVATIONS_TREE: &str = "kme_reservations";

/// Name of the sled tree holding the tombstones of cancelled reservation key IDs.
pub(super) const CANCELLED_TREE: &str = "kme_cancelled";

/// Bytes in one key unit (256 bits), the granularity of the ETSI key pool.
pub const UNIT_BYTES: usize = 32;

/// Errors of the key-pool operations.
#[derive(Debug, thiserror::Error)]
pub enum KmeStoreError {
    /// The key store itself failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Some units are not ready in this store (already served or never stored); nothing changed.
    #[error("{} key units are not ready in the key store", .0.len())]
    MissingUnits(Vec<Uuid>),
    /// Some units belong to a block that this end has stored but not yet committed (the peer
    /// committed first, or this end is publishing the block right now): they will be ready in
    /// a moment, so the caller must keep them and ask again later. Nothing changed.
    #[error("{} key units are not committed in the key store yet", .0.len())]
    NotYetReady(Vec<Uuid>),
    /// A unit does not hold exactly [`UNIT_BYTES`] bytes, so it cannot be part of an ETSI key.
    #[error("key unit {key_id} holds {len} bytes, not {UNIT_BYTES}")]
    BadUnit {
        /// The unit.
        key_id: Uuid,
        /// Its length in bytes.
        len: usize,
    },
    /// A reservation with this key ID exists already; nothing changed.
    #[error("key {0} is already reserved")]
    DuplicateReservation(Uuid),
    /// This key ID was cancelled ([`SledStore::cancel_reservations`]); it can no longer be
    /// reserved. Nothing changed.
    #[error("key {0} was cancelled and cannot be reserved")]
    Cancelled(Uuid),
    /// The request names a key that is not reserved for this master (or was already delivered
    /// to this slave); nothing changed.
    #[error("key {0} is not reserved for this master and slave")]
    NotFound(Uuid),
    /// The caller is not one of the key's slave SAEs; nothing changed.
    #[error("the caller is not a slave SAE of key {0}")]
    NotSlave(Uuid),
    /// The store's reservations are held back until the link has re-agreed the store with the
    /// peer's at `Hello` ([`SledStore::hold_reservations_until_reagreed`]); nothing changed.
    #[error(
        "the key store has not been re-agreed with the peer's yet (the link's Hello): reservations are held until then"
    )]
    AwaitingReagreement,
}

/// One ETSI key to reserve: its ID, the units that make it and who may fetch it.
#[derive(Clone, Debug)]
pub struct KeyReservation {
    /// The ETSI key ID handed to the master.
    pub key_id: Uuid,
    /// The units, in order; their bytes concatenated and truncated to `size_bits / 8` are the key.
    pub unit_ids: Vec<Uuid>,
    /// Key size, bits (a multiple of 8, at most `8 * UNIT_BYTES * unit_ids.len()`).
    pub size_bits: u32,
    /// The master SAE ID.
    pub master: String,
    /// The slave SAE IDs; each may fetch the key once.
    pub slaves: Vec<String>,
    /// Unix time in milliseconds when the reservation was made (for expiry).
    pub created_unix_ms: u64,
}

impl SledStore {
    /// Reads, in key-ID order, up to `limit` ready units whose IDs pass `select`.
    pub fn select_ready_units(
        &self,
        limit: usize,
        select: impl FnMut(&Uuid) -> bool,
    ) -> Result<Vec<KeyUnit>, StoreError> {
        self.with(|t| t.select_ready_units(limit, select))
    }

    /// Like [`SledStore::select_ready_units`], but starting after the unit ID `after` and
    /// wrapping around to the start: a caller that picks units one request after another
    /// passes the last unit it picked, so that each search starts where the units it can take
    /// are, instead of walking again over every unit it skips (the peer KME's, which it never
    /// takes, pile up at the front of the key order as its own are taken).
    pub fn select_ready_units_after(
        &self,
        after: Option<&Uuid>,
        limit: usize,
        select: impl FnMut(&Uuid) -> bool,
    ) -> Result<Vec<KeyUnit>, StoreError> {
        self.with(|t| t.select_ready_units_after(after, limit, select))
    }

    /// Counts the ready units whose IDs pass `select`, stopping at `cap` (or at the first read
    /// error).
    pub fn count_ready_units(&self, cap: usize, select: impl FnMut(&Uuid) -> bool) -> Result<usize, StoreError> {
        self.with(|t| t.count_ready_units(cap, select))
    }

    /// Removes the given ready units: all of them, or (when one is missing) none.
    ///
    /// Not flushed (sled writes it out within its flush interval, 500 ms): the peer KME's
    /// reservation of these units, durable before this is called, is what prevents a second
    /// delivery. Should this KME die before the removal reaches the disk, the units are back in
    /// its pool after the restart, and the first reservation naming them is answered "missing"
    /// by the peer, which makes this KME discard them (the KME pool's life cycle, crate
    /// `qkd-kme`). A reopen after a disk fault (see the crate documentation) can lose the
    /// removal the same way, with the same outcome. Saving the fsync here takes one of the two
    /// fsyncs off the Get key path.
    pub fn take_ready_units(&self, unit_ids: &[Uuid]) -> Result<(), KmeStoreError> {
        self.with(|t| t.take_ready_units(unit_ids))
    }

    /// Removes whichever of the given units are ready, durably (units that can never be served,
    /// because the peer KME no longer holds them). Returns how many were removed.
    pub fn discard_ready_units(&self, unit_ids: &[Uuid]) -> Result<usize, StoreError> {
        self.with(|t| t.discard_ready_units(unit_ids))
    }

    /// Turns ready units into reservations, durably and all at once: removes every unit of
    /// every reservation from the ready pool and records each ETSI key. If any unit is missing
    /// ([`KmeStoreError::MissingUnits`], listing all of them), a unit is malformed, a key ID is
    /// already reserved or a key ID was cancelled ([`KmeStoreError::Cancelled`]), nothing
    /// changes.
    pub fn reserve_keys(&self, reservations: &[KeyReservation]) -> Result<(), KmeStoreError> {
        self.with(|t| t.reserve_keys(reservations))
    }

    /// Hands reserved keys to the slave `caller`, durably and all at once. Every key must be
    /// reserved for `master` and not yet delivered to `caller`; a key is erased once every slave
    /// has fetched it. Returns the keys in the order of `key_ids`.
    ///
    /// Errors, nothing changed: [`KmeStoreError::AwaitingReagreement`] while reservations are
    /// held ([`SledStore::hold_reservations_until_reagreed`]); [`KmeStoreError::NotSlave`] when
    /// `caller` is not a slave of a reserved key (checked first), otherwise
    /// [`KmeStoreError::NotFound`] for an unknown key, a key of another master, or one already
    /// delivered to `caller`.
    pub fn deliver_reserved_keys(
        &self,
        key_ids: &[Uuid],
        master: &str,
        caller: &str,
    ) -> Result<Vec<KeyUnit>, KmeStoreError> {
        if self.reservations_held() {
            return Err(KmeStoreError::AwaitingReagreement);
        }
        self.with(|t| t.deliver_reserved_keys(key_ids, master, caller))
    }

    /// Cancels the reservations of `key_ids` (the key IDs of one reservation request whose
    /// answer the asking KME never got), durably and all at once. For each key ID, in order:
    /// * a reservation not yet delivered to any slave is erased: `true` (cancelled). Its units
    ///   are not given back to the ready pool (the record keeps only the combined key), so the
    ///   asking KME must discard them too;
    /// * no reservation: `false` (unknown), and the key ID can never be reserved afterwards
    ///   ([`KmeStoreError::Cancelled`]), so a late request cannot take the units any more;
    /// * a reservation already delivered to a slave cannot be cancelled: `false`, logged as an
    ///   error (never happens: the asking KME never handed the key ID to its master).
    ///
    /// Each key ID gets a tombstone dated `now_unix_ms`, so that asking again gives the same
    /// answer (until [`SledStore::purge_reservations`] erases it).
    pub fn cancel_reservations(&self, key_ids: &[Uuid], now_unix_ms: u64) -> Result<Vec<bool>, KmeStoreError> {
        self.with(|t| t.cancel_reservations(key_ids, now_unix_ms))
    }

    /// Number of reservations not yet fetched by all their slaves (read to the end of the tree,
    /// or to its first read error).
    pub fn reserved_key_count(&self) -> Result<usize, StoreError> {
        self.with(|t| t.reserved_key_count())
    }

    /// Erases, durably, the reservations made before `created_before_unix_ms` (keys whose
    /// slaves never came), and the tombstones of cancellations made before then. Returns how
    /// many reservations were erased.
    pub fn purge_reservations(&self, created_before_unix_ms: u64) -> Result<usize, StoreError> {
        self.with(|t| t.purge_reservations(created_before_unix_ms))
    }
}

impl CallError for KmeStoreError {
    fn store_error(&mut self) -> Option<&mut StoreError> {
        match self {
            KmeStoreError::Store(e) => Some(e),
            _ => None,
        }
    }
}

impl Trees {
    /// See [`SledStore::select_ready_units`].
    pub(crate) fn select_ready_units(
        &self,
        limit: usize,
        select: impl FnMut(&Uuid) -> bool,
    ) -> Result<Vec<KeyUnit>, StoreError> {
        self.select_ready_units_after(None, limit, select)
    }

    /// See [`SledStore::select_ready_units_after`].
    pub(crate) fn select_ready_units_after(
        &self,
        after: Option<&Uuid>,
        limit: usize,
        mut select: impl FnMut(&Uuid) -> bool,
    ) -> Result<Vec<KeyUnit>, StoreError> {
        use std::ops::Bound;
        let mut out = Vec::with_capacity(limit.min(4096));
        if limit == 0 {
            return Ok(out);
        }
        let (tail, head) = match after {
            Some(after) => (
                self.ready.range::<&[u8], _>((Bound::Excluded(after.as_bytes().as_slice()), Bound::Unbounded)),
                Some(self.ready.range::<&[u8], _>((Bound::Unbounded, Bound::Included(after.as_bytes().as_slice())))),
            ),
            None => (self.ready.iter(), None),
        };
        for item in until_error(tail).chain(until_error(head.into_iter().flatten())) {
            let (key, value) = item.db()?;
            let key_id = Uuid::from_slice(&key).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            if !select(&key_id) {
                continue;
            }
            let (_, bytes) = self.unseal_unit(key_id, &value)?;
            out.push(KeyUnit { key_id, key: bytes });
            if out.len() == limit {
                break;
            }
        }
        Ok(out)
    }

    /// See [`SledStore::count_ready_units`].
    pub(crate) fn count_ready_units(
        &self,
        cap: usize,
        mut select: impl FnMut(&Uuid) -> bool,
    ) -> Result<usize, StoreError> {
        let mut n = 0;
        if cap == 0 {
            return Ok(0);
        }
        for key in until_error(self.ready.iter().keys()) {
            let key = key.db()?;
            let key_id = Uuid::from_slice(&key).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            if select(&key_id) {
                n += 1;
                if n == cap {
                    break;
                }
            }
        }
        Ok(n)
    }

    /// See [`SledStore::take_ready_units`].
    pub(crate) fn take_ready_units(&self, unit_ids: &[Uuid]) -> Result<(), KmeStoreError> {
        let result = self.ready.transaction(|ready| {
            let mut missing = Vec::new();
            for unit_id in unit_ids {
                if ready.get(unit_id.as_bytes())?.is_none() {
                    missing.push(*unit_id);
                }
            }
            if !missing.is_empty() {
                return sled::transaction::abort(KmeStoreError::MissingUnits(missing));
            }
            let mut slots = Vec::with_capacity(unit_ids.len());
            for unit_id in unit_ids {
                if let Some(value) = ready.remove(unit_id.as_bytes())? {
                    slots.extend(unit_slot(&value));
                }
            }
            Ok(slots)
        });
        let slots = unwrap_kme_tx(result)?;
        count_down(&self.n_ready, slots.len() as u64);
        // Erased now, durably at the next flush of the store (not waited for, like the removal:
        // see above and `custody`).
        self.erase_slots(slots, false)?;
        Ok(())
    }

    /// See [`SledStore::discard_ready_units`].
    pub(crate) fn discard_ready_units(&self, unit_ids: &[Uuid]) -> Result<usize, StoreError> {
        let result = self.ready.transaction(|ready| {
            let (mut n, mut slots) = (0, Vec::new());
            for unit_id in unit_ids {
                if let Some(value) = ready.remove(unit_id.as_bytes())? {
                    n += 1;
                    slots.extend(unit_slot(&value));
                }
            }
            Ok((n, slots))
        });
        let (n, slots) = match result {
            Ok(n) => n,
            Err(sled::transaction::TransactionError::Abort(e)) => return Err(e),
            Err(sled::transaction::TransactionError::Storage(e)) => return Err(db_error(e)),
        };
        count_down(&self.n_ready, n as u64);
        // The flush makes both the removal and the erasure durable.
        self.erase_slots(slots, false)?;
        self.flush()?;
        Ok(n)
    }

    /// See [`SledStore::reserve_keys`].
    pub(crate) fn reserve_keys(&self, reservations: &[KeyReservation]) -> Result<(), KmeStoreError> {
        // Each reservation's secret is durable before its record is written (see `custody`).
        let new_slots = self.allocate_slots(reservations.len())?;
        let result = self.reserve_in(reservations, &new_slots);
        if result.is_err() {
            self.erase_slots(new_slots.iter().map(|s| s.index), false)?;
        }
        result
    }

    /// [`Trees::reserve_keys`] with the reservations' slots allocated.
    fn reserve_in(&self, reservations: &[KeyReservation], new_slots: &[custody::Slot]) -> Result<(), KmeStoreError> {
        use sled::Transactional;
        let (tree, tombstones) = (&self.reserved, &self.cancelled);
        let result = (&self.ready, tree, tombstones).transaction(|(ready, reserved, cancelled)| {
            let mut missing = Vec::new();
            let mut records = Vec::with_capacity(reservations.len());
            for reservation in reservations {
                if cancelled.get(reservation.key_id.as_bytes())?.is_some() {
                    return sled::transaction::abort(KmeStoreError::Cancelled(reservation.key_id));
                }
                if reserved.get(reservation.key_id.as_bytes())?.is_some() {
                    return sled::transaction::abort(KmeStoreError::DuplicateReservation(reservation.key_id));
                }
                let mut units = Vec::with_capacity(reservation.unit_ids.len());
                for unit_id in &reservation.unit_ids {
                    match ready.get(unit_id.as_bytes())? {
                        None => missing.push(*unit_id),
                        Some(value) => match self.unseal_unit(*unit_id, &value) {
                            Ok((_, bytes)) if bytes.len() == UNIT_BYTES => units.push(bytes),
                            Ok((_, bytes)) => {
                                return sled::transaction::abort(KmeStoreError::BadUnit {
                                    key_id: *unit_id,
                                    len: bytes.len(),
                                });
                            }
                            Err(e) => return sled::transaction::abort(KmeStoreError::Store(e)),
                        },
                    }
                }
                if missing.is_empty() {
                    let key = combine_units(units.iter().map(|u| u.as_slice()), reservation.size_bits);
                    let slot = &new_slots[records.len()];
                    let sealed = self.keys.seal(slot, Kind::Reservation, reservation.key_id, None, &key);
                    records.push(encode_reservation(reservation, &sealed));
                }
            }
            if !missing.is_empty() {
                return sled::transaction::abort(KmeStoreError::MissingUnits(missing));
            }
            let mut removed = Vec::new();
            for reservation in reservations {
                for unit_id in &reservation.unit_ids {
                    if let Some(value) = ready.remove(unit_id.as_bytes())? {
                        removed.extend(unit_slot(&value));
                    }
                }
            }
            for (reservation, record) in reservations.iter().zip(&records) {
                reserved.insert(reservation.key_id.as_bytes(), record.as_slice())?;
            }
            Ok(removed)
        });
        let mut erased = Vec::new();
        let outcome = unwrap_kme_tx(result).map(|removed| {
            count_down(&self.n_ready, removed.len() as u64);
            erased = removed;
        });
        match outcome {
            Err(KmeStoreError::MissingUnits(missing)) => {
                // A unit of a block still pending here, or being published (a unit is in exactly
                // one of the two trees at every moment of the move), is not lost: say so, so that
                // the peer keeps it instead of discarding it.
                let mut not_yet = Vec::new();
                for unit_id in &missing {
                    let held = self.pending.contains_key(unit_id.as_bytes()).db()?
                        || self.ready.contains_key(unit_id.as_bytes()).db()?;
                    if held {
                        not_yet.push(*unit_id);
                    }
                }
                if not_yet.is_empty() {
                    Err(KmeStoreError::MissingUnits(missing))
                } else {
                    Err(KmeStoreError::NotYetReady(not_yet))
                }
            }
            Err(e) => Err(e),
            Ok(()) => {
                self.flush()?;
                // The units now live in the reservations only: their own slots go.
                self.erase_slots(erased, true)?;
                Ok(())
            }
        }
    }

    /// See [`SledStore::deliver_reserved_keys`].
    pub(crate) fn deliver_reserved_keys(
        &self,
        key_ids: &[Uuid],
        master: &str,
        caller: &str,
    ) -> Result<Vec<KeyUnit>, KmeStoreError> {
        let tree = &self.reserved;
        let result = tree.transaction(|reserved| {
            let mut records = Vec::with_capacity(key_ids.len());
            let mut not_found = None;
            for key_id in key_ids {
                let Some(value) = reserved.get(key_id.as_bytes())? else {
                    not_found.get_or_insert(*key_id);
                    continue;
                };
                let record = match decode_reservation(&value) {
                    Ok(record)
                        if custody::sealed_plain_len(record.sealed.len()) == Some((record.size_bits / 8) as usize) =>
                    {
                        record
                    }
                    Ok(_) => {
                        let e = StoreError::Corrupt(format!("reserved key {key_id} does not have its recorded size"));
                        return sled::transaction::abort(KmeStoreError::Store(e));
                    }
                    Err(e) => return sled::transaction::abort(KmeStoreError::Store(e)),
                };
                match record.slaves.iter().find(|(slave, _)| slave == caller) {
                    None => return sled::transaction::abort(KmeStoreError::NotSlave(*key_id)),
                    Some((_, true)) => {
                        not_found.get_or_insert(*key_id);
                    }
                    Some((_, false)) if record.master != master => {
                        not_found.get_or_insert(*key_id);
                    }
                    Some((_, false)) => records.push((*key_id, record)),
                }
            }
            if let Some(key_id) = not_found {
                return sled::transaction::abort(KmeStoreError::NotFound(key_id));
            }
            let (mut keys, mut erased) = (Vec::with_capacity(records.len()), Vec::new());
            for (key_id, mut record) in records {
                let key = match self.keys.open(&self.slots, Kind::Reservation, key_id, None, &record.sealed) {
                    Ok(key) => key,
                    Err(e) => {
                        return sled::transaction::abort(KmeStoreError::Store(unseal_error(
                            &e,
                            "reserved key",
                            key_id,
                        )));
                    }
                };
                for (slave, delivered) in &mut record.slaves {
                    if slave == caller {
                        *delivered = true;
                    }
                }
                if record.slaves.iter().all(|(_, delivered)| *delivered) {
                    reserved.remove(key_id.as_bytes())?;
                    erased.extend(custody::sealed_slot(&record.sealed));
                } else {
                    reserved.insert(key_id.as_bytes(), encode_record(&record).as_slice())?;
                }
                keys.push(KeyUnit { key_id, key });
            }
            Ok((keys, erased))
        });
        let (keys, erased) = match result {
            Ok(keys) => keys,
            Err(sled::transaction::TransactionError::Abort(e)) => return Err(e),
            Err(sled::transaction::TransactionError::Storage(e)) => return Err(db_error(e).into()),
        };
        self.flush()?;
        // Delivered to every slave: the key becomes unrecoverable (see `custody`).
        self.erase_slots(erased, true)?;
        Ok(keys)
    }

    /// See [`SledStore::cancel_reservations`].
    pub(crate) fn cancel_reservations(&self, key_ids: &[Uuid], now_unix_ms: u64) -> Result<Vec<bool>, KmeStoreError> {
        use sled::Transactional;
        let (tree, tombstones) = (&self.reserved, &self.cancelled);
        let result = (tree, tombstones).transaction(|(reserved, cancelled)| {
            let mut outcomes = Vec::with_capacity(key_ids.len());
            let (mut delivered, mut erased) = (Vec::new(), Vec::new());
            for key_id in key_ids {
                let id = key_id.as_bytes();
                if let Some(tombstone) = cancelled.get(id)? {
                    match decode_tombstone(&tombstone) {
                        Ok((was_cancelled, _)) => outcomes.push(was_cancelled),
                        Err(e) => return sled::transaction::abort(KmeStoreError::Store(e)),
                    }
                    continue;
                }
                let outcome = match reserved.get(id)? {
                    None => false,
                    Some(value) => match decode_reservation(&value) {
                        Ok(record) if record.slaves.iter().any(|(_, fetched)| *fetched) => {
                            delivered.push(*key_id);
                            outcomes.push(false);
                            continue;
                        }
                        Ok(record) => {
                            reserved.remove(id)?;
                            erased.extend(custody::sealed_slot(&record.sealed));
                            true
                        }
                        Err(e) => return sled::transaction::abort(KmeStoreError::Store(e)),
                    },
                };
                cancelled.insert(id, encode_tombstone(outcome, now_unix_ms).as_slice())?;
                outcomes.push(outcome);
            }
            Ok((outcomes, delivered, erased))
        });
        let (outcomes, delivered, erased) = match result {
            Ok(out) => out,
            Err(sled::transaction::TransactionError::Abort(e)) => return Err(e),
            Err(sled::transaction::TransactionError::Storage(e)) => return Err(db_error(e).into()),
        };
        for key_id in delivered {
            error!(%key_id, "asked to cancel a reservation already delivered to a slave; kept");
        }
        self.flush()?;
        self.erase_slots(erased, true)?;
        Ok(outcomes)
    }

    /// See [`SledStore::reserved_key_count`].
    pub(crate) fn reserved_key_count(&self) -> Result<usize, StoreError> {
        Ok(count_entries(&self.reserved).db()? as usize)
    }

    /// See [`SledStore::purge_reservations`].
    pub(crate) fn purge_reservations(&self, created_before_unix_ms: u64) -> Result<usize, StoreError> {
        let tree = &self.reserved;
        let (mut n, mut erased) = (0, Vec::new());
        for item in until_error(tree.iter()) {
            let (key, value) = item.db()?;
            let record = decode_reservation(&value)?;
            // Compare-and-swap so that a concurrent delivery is never undone.
            if record.created_unix_ms < created_before_unix_ms
                && tree.compare_and_swap(&key, Some(&value), None::<&[u8]>).db()?.is_ok()
            {
                n += 1;
                erased.extend(custody::sealed_slot(&record.sealed));
            }
        }
        let tombstones = &self.cancelled;
        let mut n_tombstones = 0;
        for item in until_error(tombstones.iter()) {
            let (key, value) = item.db()?;
            let (_, created) = decode_tombstone(&value)?;
            if created < created_before_unix_ms
                && tombstones.compare_and_swap(&key, Some(&value), None::<&[u8]>).db()?.is_ok()
            {
                n_tombstones += 1;
            }
        }
        if n + n_tombstones > 0 {
            self.flush()?;
            self.erase_slots(erased, true)?;
        }
        Ok(n)
    }
}

/// The bytes of an ETSI key of `size_bits` made of `units`: their bytes concatenated, the first
/// `size_bits / 8` kept, the rest discarded (and wiped).
pub fn combine_units<'a>(units: impl IntoIterator<Item = &'a [u8]>, size_bits: u32) -> Zeroizing<Vec<u8>> {
    let n_bytes = (size_bits / 8) as usize;
    let mut key = Zeroizing::new(Vec::with_capacity(n_bytes + UNIT_BYTES));
    for unit in units {
        key.extend_from_slice(unit);
    }
    // Truncating a Zeroizing<Vec> leaves the tail in the allocation: wipe it first.
    if key.len() > n_bytes {
        zeroize::Zeroize::zeroize(&mut key[n_bytes..]);
        key.truncate(n_bytes);
    }
    key
}

fn unwrap_kme_tx<T>(result: sled::transaction::TransactionResult<T, KmeStoreError>) -> Result<T, KmeStoreError> {
    match result {
        Ok(value) => Ok(value),
        Err(sled::transaction::TransactionError::Abort(e)) => Err(e),
        Err(sled::transaction::TransactionError::Storage(e)) => Err(db_error(e).into()),
    }
}

/// A decoded reservation record.
struct Reservation {
    created_unix_ms: u64,
    size_bits: u32,
    master: String,
    /// Each slave and whether it has fetched the key.
    slaves: Vec<(String, bool)>,
    /// The key bytes, sealed (see [`custody`]).
    sealed: Vec<u8>,
}

/// Format version of reservation records (2: the key sealed).
const RECORD_VERSION: u8 = 2;

pub(crate) fn encode_reservation(reservation: &KeyReservation, sealed: &[u8]) -> Vec<u8> {
    encode_record(&Reservation {
        created_unix_ms: reservation.created_unix_ms,
        size_bits: reservation.size_bits,
        master: reservation.master.clone(),
        slaves: reservation.slaves.iter().map(|s| (s.clone(), false)).collect(),
        sealed: sealed.to_vec(),
    })
}

/// Record: version byte, created (u64 LE), size bits (u32 LE), master (u16 LE length + UTF-8),
/// slave count (u16 LE) and per slave a delivered byte and its ID (u16 LE length + UTF-8), then
/// the sealed key bytes.
fn encode_record(record: &Reservation) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + record.sealed.len());
    out.push(RECORD_VERSION);
    out.extend_from_slice(&record.created_unix_ms.to_le_bytes());
    out.extend_from_slice(&record.size_bits.to_le_bytes());
    push_str(&mut out, &record.master);
    out.extend_from_slice(&(record.slaves.len() as u16).to_le_bytes());
    for (slave, delivered) in &record.slaves {
        out.push(u8::from(*delivered));
        push_str(&mut out, slave);
    }
    out.extend_from_slice(&record.sealed);
    out
}

/// SAE IDs are limited to `u16::MAX` bytes by configuration validation; longer ones are cut
/// (never happens).
fn push_str(out: &mut Vec<u8>, s: &str) {
    let bytes = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
    out.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
    out.extend_from_slice(bytes);
}

fn decode_reservation(value: &[u8]) -> Result<Reservation, StoreError> {
    let mut reader = Reader { bytes: value, pos: 0 };
    let version = reader.take(1)?[0];
    if version != RECORD_VERSION {
        return Err(StoreError::Corrupt(format!("unknown reservation record version {version}")));
    }
    let created_unix_ms = u64::from_le_bytes(reader.array()?);
    let size_bits = u32::from_le_bytes(reader.array()?);
    let master = reader.string()?;
    let n_slaves = u16::from_le_bytes(reader.array()?);
    let mut slaves = Vec::with_capacity(n_slaves as usize);
    for _ in 0..n_slaves {
        let delivered = reader.take(1)?[0] != 0;
        slaves.push((reader.string()?, delivered));
    }
    let sealed = value[reader.pos..].to_vec();
    Ok(Reservation { created_unix_ms, size_bits, master, slaves, sealed })
}

/// The sealed key of a reservation record.
pub(crate) fn reservation_sealed(value: &[u8]) -> Result<Vec<u8>, StoreError> {
    Ok(decode_reservation(value)?.sealed)
}

/// What is wrong with a reservation record, if anything (for [`crate::verify`]).
pub(crate) fn check_reservation(value: &[u8]) -> Result<(), String> {
    let record = decode_reservation(value).map_err(|e| format!("the record does not decode ({e})"))?;
    if !record.size_bits.is_multiple_of(8) {
        return Err(format!("its size, {} bits, is not whole bytes", record.size_bits));
    }
    match custody::sealed_plain_len(record.sealed.len()) {
        None => return Err("its sealed key is truncated".into()),
        Some(len) if len != (record.size_bits / 8) as usize => {
            return Err(format!("it holds {len} key bytes for a size of {} bits", record.size_bits));
        }
        Some(_) => {}
    }
    if record.master.is_empty() {
        return Err("it names no master SAE".into());
    }
    if record.slaves.is_empty() {
        return Err("it names no slave SAE, so nobody can fetch it".into());
    }
    if record.slaves.iter().all(|(_, delivered)| *delivered) {
        return Err("every slave SAE has fetched it, yet it was not erased".into());
    }
    Ok(())
}

/// Tombstone: outcome byte (1: a reservation was cancelled, 0: none was recorded), then the
/// cancellation time (u64 LE, Unix milliseconds).
pub(crate) fn encode_tombstone(cancelled: bool, created_unix_ms: u64) -> [u8; 9] {
    let mut out = [0u8; 9];
    out[0] = u8::from(cancelled);
    out[1..].copy_from_slice(&created_unix_ms.to_le_bytes());
    out
}

pub(crate) fn decode_tombstone(value: &[u8]) -> Result<(bool, u64), StoreError> {
    match value {
        [outcome @ (0 | 1), time @ ..] if time.len() == 8 => {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(time);
            Ok((*outcome == 1, u64::from_le_bytes(bytes)))
        }
        _ => Err(StoreError::Corrupt("malformed cancellation tombstone".into())),
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], StoreError> {
        let out = self
            .bytes
            .get(self.pos..self.pos + n)
            .ok_or_else(|| StoreError::Corrupt("truncated reservation record".into()))?;
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], StoreError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn string(&mut self) -> Result<String, StoreError> {
        let len = u16::from_le_bytes(self.array()?) as usize;
        String::from_utf8(self.take(len)?.to_vec()).map_err(|e| StoreError::Corrupt(e.to_string()))
    }
}

#[cfg(test)]
mod tests;
