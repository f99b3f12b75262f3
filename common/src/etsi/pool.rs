//! The key life cycle of one KME: Get status, Get key (reserve at the peer, then take locally),
//! Get key with key IDs (hand out a reservation once), and the peer's reservations.
//!
//! Get key at KME A for master m (at A) and slave s (at B):
//! 1. A picks the units it owns (split ownership, [`KmeSide`]) and marks them *in flight* in
//!    memory, so concurrent requests at A never pick the same unit.
//! 2. A asks B to reserve them ([`ReservePeer::reserve`]); B removes them from its ready pool and
//!    records the ETSI keys for (m, s), in one transaction, durably, or changes nothing.
//! 3. Only then A removes the units from its own pool (one transaction, durably) and answers.
//!
//! If B is unreachable or refuses, A's units go back to its pool and the master gets a 503.
//! If B no longer holds some units (A crashed after step 2 once), A discards them and tries
//! again with others: no unit is ever part of two delivered keys.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use serde_json::json;
use tracing::{error, info, warn};
use uuid::Uuid;

use super::api::{self, EtsiError, Key, KeyContainer, KeyRequest, StatusBody};
use super::config::{Attachment, KmeSettings, MAX_SUPPORTED_KEYS_PER_REQUEST, MAX_SUPPORTED_KEY_SIZE};
use super::identity::{KmeSide, SaeId};
use super::peer::{ReserveError, ReservePeer, ReserveRequest};
use crate::store::kme::{combine_units, KeyReservation, KmeStoreError, UNIT_BYTES};
use crate::store::{KeyUnit, SledStore, StoreError};

/// Bits in one key unit.
const UNIT_BITS: u32 = 8 * UNIT_BYTES as u32;

/// Reservation attempts of one Get key when the peer reports units it no longer holds.
const MAX_RESERVE_ATTEMPTS: usize = 4;

/// One KME: its settings, its key store and its link to the peer KME. Cheap to clone.
#[derive(Clone)]
pub struct KmeState {
    inner: Arc<Inner>,
}

struct Inner {
    settings: KmeSettings,
    side: KmeSide,
    store: Arc<SledStore>,
    peer: Arc<dyn ReservePeer>,
    /// Units picked by a Get key in progress (never picked twice).
    in_flight: Mutex<HashSet<Uuid>>,
}

/// A Get key that passed every check: who, how many, how big.
struct ValidKeyRequest {
    master: SaeId,
    slaves: Vec<SaeId>,
    number: u32,
    size_bits: u32,
}

impl KmeState {
    /// A KME serving from `store` as `side`, reserving through `peer`.
    pub fn new(settings: KmeSettings, side: KmeSide, store: Arc<SledStore>, peer: Arc<dyn ReservePeer>) -> Self {
        Self { inner: Arc::new(Inner { settings, side, store, peer, in_flight: Mutex::new(HashSet::new()) }) }
    }

    /// The validated settings.
    pub fn settings(&self) -> &KmeSettings {
        &self.inner.settings
    }

    /// Which KME this is.
    pub fn side(&self) -> KmeSide {
        self.inner.side
    }

    /// The key store.
    pub fn store(&self) -> &Arc<SledStore> {
        &self.inner.store
    }

    /// Get status: the limits and how many keys of `key_size` can be served now for `slave`.
    pub async fn status(&self, caller: Option<&SaeId>, slave: &SaeId) -> Result<StatusBody, EtsiError> {
        let master = self.authorize_caller(caller)?;
        self.check_slave(master, slave)?;
        let limits = self.settings().limits;
        let stored_key_count = self.servable_keys(limits.key_size, limits.max_key_count).await?;
        Ok(StatusBody {
            source_kme_id: self.settings().kme_id.0.clone(),
            target_kme_id: self.settings().peer_kme_id.0.clone(),
            master_sae_id: master.0.clone(),
            slave_sae_id: slave.0.clone(),
            key_size: limits.key_size,
            stored_key_count,
            max_key_count: limits.max_key_count,
            max_key_per_request: limits.max_key_per_request,
            max_key_size: limits.max_key_size,
            min_key_size: limits.min_key_size,
            max_sae_id_count: limits.max_sae_id_count,
            status_extension: None,
        })
    }

    /// Get key: `number` new keys of `size` bits for the caller (master) and `slave`.
    pub async fn get_key(&self, caller: Option<&SaeId>, slave: &SaeId, request: KeyRequest) -> Result<KeyContainer, EtsiError> {
        let valid = self.validate_key_request(caller, slave, request)?;
        // The life cycle runs in its own task: a client that hangs up cannot stop it between
        // the peer's reservation and the local removal.
        let state = self.clone();
        tokio::spawn(async move { state.deliver_new_keys(valid).await })
            .await
            .map_err(|e| {
                error!(error = %e, "get key task failed");
                EtsiError::Unavailable("internal error of the KME".into())
            })?
    }

    /// Get key with key IDs: hands the reserved keys `key_ids` of `master` to the caller (a
    /// slave), each once.
    pub async fn get_key_with_key_ids(
        &self,
        caller: Option<&SaeId>,
        master: &SaeId,
        key_ids: Vec<Uuid>,
    ) -> Result<KeyContainer, EtsiError> {
        let slave = self.authorize_caller(caller)?.clone();
        if &slave == master {
            return Err(EtsiError::bad_request("master and slave SAE IDs shall differ"));
        }
        let store = self.inner.store.clone();
        let master_id = master.0.clone();
        let n_keys = key_ids.len();
        let caller_id = slave.0.clone();
        let delivered = tokio::task::spawn_blocking(move || store.deliver_reserved_keys(&key_ids, &master_id, &caller_id))
            .await
            .map_err(|_| EtsiError::Unavailable("internal error of the KME".into()))?;
        match delivered {
            Ok(keys) => {
                info!(master = %master, slave = %slave, n_keys, "keys delivered to slave");
                Ok(container(&keys))
            }
            Err(KmeStoreError::NotSlave(key_id)) => {
                warn!(caller = %slave, master = %master, %key_id, "refused keys to an SAE that is not their slave");
                Err(EtsiError::Unauthorized(format!("SAE {slave} is not a slave SAE of the requested keys")))
            }
            Err(KmeStoreError::NotFound(_)) => Err(EtsiError::bad_request(api::MSG_KEYS_NOT_FOUND)),
            Err(e) => Err(store_unavailable(&e)),
        }
    }

    /// The peer KME's reservation (step 2 of the life cycle, at this KME). All or nothing.
    pub async fn reserve_for_peer(&self, request: ReserveRequest) -> Result<(), ReserveError> {
        let reservations = self.validate_reservation(&request)?;
        let store = self.inner.store.clone();
        let n_keys = reservations.len();
        let result = tokio::task::spawn_blocking(move || store.reserve_keys(&reservations))
            .await
            .map_err(|_| ReserveError::Refused("internal error of the peer KME".into()))?;
        match result {
            Ok(()) => {
                info!(master = %request.master, n_keys, size_bits = request.size_bits, "keys reserved for the peer KME");
                Ok(())
            }
            Err(KmeStoreError::MissingUnits(missing)) => {
                warn!(n_units = missing.len(), "peer KME asked for units this store does not hold");
                Err(ReserveError::Missing(missing))
            }
            Err(e) => {
                error!(error = %e, "reservation failed");
                Err(ReserveError::Refused(format!("reservation failed: {e}")))
            }
        }
    }

    /// Erases reservations older than the configured lifetime; returns how many.
    pub async fn purge_expired_reservations(&self) -> Result<usize, StoreError> {
        let Some(ttl) = self.settings().reservation_ttl else {
            return Ok(0);
        };
        let before = now_unix_ms().saturating_sub(ttl.as_millis() as u64);
        let store = self.inner.store.clone();
        tokio::task::spawn_blocking(move || store.purge_reservations(before))
            .await
            .map_err(|e| StoreError::Corrupt(format!("purge task failed: {e}")))?
    }

    /// The caller must be an SAE attached to this KME.
    fn authorize_caller<'a>(&self, caller: Option<&'a SaeId>) -> Result<&'a SaeId, EtsiError> {
        let Some(caller) = caller else {
            return Err(EtsiError::Unauthorized("the client certificate carries no SAE ID".into()));
        };
        match self.settings().attachment(caller) {
            Some(Attachment::Local) => Ok(caller),
            Some(Attachment::Peer) => Err(EtsiError::Unauthorized(format!("SAE {caller} is not attached to this KME"))),
            None => Err(EtsiError::Unauthorized(format!("SAE {caller} is not registered at this KME"))),
        }
    }

    /// The slave of a pair must be another SAE, attached to the peer KME.
    fn check_slave(&self, master: &SaeId, slave: &SaeId) -> Result<(), EtsiError> {
        if master == slave {
            return Err(EtsiError::bad_request("master and slave SAE IDs shall differ"));
        }
        match self.settings().attachment(slave) {
            Some(Attachment::Peer) => Ok(()),
            Some(Attachment::Local) => Err(EtsiError::bad_request(format!(
                "slave SAE {slave} is attached to this KME; keys are only served to pairs across KME {} and KME {}",
                self.settings().kme_id,
                self.settings().peer_kme_id
            ))),
            None => Err(EtsiError::bad_request(format!("unknown slave SAE ID {slave}"))),
        }
    }

    fn validate_key_request(&self, caller: Option<&SaeId>, slave: &SaeId, request: KeyRequest) -> Result<ValidKeyRequest, EtsiError> {
        let master = self.authorize_caller(caller)?;
        self.check_slave(master, slave)?;
        let limits = self.settings().limits;
        let number = request.number.unwrap_or(1);
        if number < 1 {
            return Err(EtsiError::bad_request("number shall be at least 1"));
        }
        if number > i64::from(limits.max_key_per_request) {
            return Err(EtsiError::bad_request(format!(
                "number shall be at most max_key_per_request ({})",
                limits.max_key_per_request
            )));
        }
        let size = request.size.unwrap_or(i64::from(limits.key_size));
        if size % 8 != 0 {
            return Err(EtsiError::bad_request(api::MSG_SIZE_NOT_MULTIPLE_OF_8));
        }
        if size < i64::from(limits.min_key_size) || size > i64::from(limits.max_key_size) {
            return Err(EtsiError::bad_request(format!(
                "size shall be between min_key_size ({}) and max_key_size ({})",
                limits.min_key_size, limits.max_key_size
            )));
        }
        if request.additional_slave_sae_ids.len() > limits.max_sae_id_count as usize {
            return Err(EtsiError::bad_request(format!(
                "additional_slave_SAE_IDs holds {} IDs; max_SAE_ID_count is {}",
                request.additional_slave_sae_ids.len(),
                limits.max_sae_id_count
            )));
        }
        let mut slaves = vec![slave.clone()];
        for extra in request.additional_slave_sae_ids {
            if slaves.contains(&extra) {
                return Err(EtsiError::bad_request(format!("slave SAE {extra} is named more than once")));
            }
            self.check_slave(master, &extra)?;
            slaves.push(extra);
        }
        if !request.extension_mandatory.is_empty() {
            let names: Vec<_> = request.extension_mandatory.iter().flat_map(|e| e.keys().cloned()).collect();
            return Err(EtsiError::BadRequest {
                message: api::MSG_EXTENSION_MANDATORY_UNSUPPORTED.into(),
                details: names.into_iter().map(|name| json!({ "unsupported_extension": name })).collect(),
            });
        }
        // extension_optional: none is supported, so all are ignored (allowed by the standard).
        Ok(ValidKeyRequest {
            master: master.clone(),
            slaves,
            // Both fit: checked against limits that are u32 above.
            number: number as u32,
            size_bits: size as u32,
        })
    }

    async fn deliver_new_keys(&self, request: ValidKeyRequest) -> Result<KeyContainer, EtsiError> {
        let units_per_key = request.size_bits.div_ceil(UNIT_BITS) as usize;
        let n_units = request.number as usize * units_per_key;
        for _ in 0..MAX_RESERVE_ATTEMPTS {
            let picked = self.pick_units(n_units).await?;
            let picked = match picked {
                Ok(picked) => picked,
                Err(n_available) => {
                    return Err(EtsiError::Unavailable(format!(
                        "not enough key: {} keys of {} bits requested, {} available",
                        request.number,
                        request.size_bits,
                        n_available / units_per_key
                    )));
                }
            };
            let keys: Vec<(Uuid, &[KeyUnit])> = picked.units.chunks(units_per_key).map(|units| (Uuid::new_v4(), units)).collect();
            let reserve = ReserveRequest {
                source_kme_id: self.settings().kme_id.clone(),
                master: request.master.clone(),
                slaves: request.slaves.clone(),
                size_bits: request.size_bits,
                keys: keys.iter().map(|(key_id, units)| (*key_id, units.iter().map(|u| u.key_id).collect())).collect(),
            };
            let outcome = match tokio::time::timeout(self.settings().peer_timeout, self.inner.peer.reserve(reserve)).await {
                Ok(outcome) => outcome,
                Err(_) => Err(ReserveError::Unreachable("no answer in time".into())),
            };
            match outcome {
                Ok(()) => {
                    let unit_ids: Vec<Uuid> = picked.units.iter().map(|u| u.key_id).collect();
                    let store = self.inner.store.clone();
                    let taken = tokio::task::spawn_blocking(move || store.take_ready_units(&unit_ids))
                        .await
                        .map_err(|_| EtsiError::Unavailable("internal error of the KME".into()))?;
                    if let Err(e) = taken {
                        // The peer holds reservations for these units; they stay here until a
                        // later reservation fails and discards them. No key is handed out twice.
                        error!(error = %e, "removing delivered units from the pool failed");
                        return Err(store_unavailable(&e));
                    }
                    let container = KeyContainer {
                        keys: keys
                            .iter()
                            .map(|(key_id, units)| {
                                Key::new(*key_id, &combine_units(units.iter().map(|u| u.key.as_slice()), request.size_bits))
                            })
                            .collect(),
                        key_container_extension: None,
                    };
                    info!(
                        master = %request.master,
                        slave = %request.slaves[0],
                        n_keys = request.number,
                        size_bits = request.size_bits,
                        "keys delivered to master"
                    );
                    return Ok(container);
                }
                Err(ReserveError::Missing(missing)) => {
                    // Discard only units of this request: the peer's answer cannot erase others.
                    let ours: HashSet<Uuid> = picked.units.iter().map(|u| u.key_id).collect();
                    let missing: Vec<Uuid> = missing.into_iter().filter(|id| ours.contains(id)).collect();
                    warn!(n_units = missing.len(), "the peer KME no longer holds some units: discarding them");
                    if missing.is_empty() {
                        return Err(EtsiError::Unavailable("the peer KME refused the reservation".into()));
                    }
                    let store = self.inner.store.clone();
                    let discarded = tokio::task::spawn_blocking(move || store.discard_ready_units(&missing))
                        .await
                        .map_err(|_| EtsiError::Unavailable("internal error of the KME".into()))?;
                    discarded.map_err(|e| store_unavailable(&e))?;
                }
                Err(ReserveError::Refused(message)) => {
                    warn!(%message, "the peer KME refused a reservation");
                    return Err(EtsiError::Unavailable(format!("the peer KME refused the reservation: {message}")));
                }
                Err(ReserveError::Unreachable(message)) => {
                    warn!(%message, "the peer KME is unreachable");
                    return Err(EtsiError::Unavailable(format!("the peer KME is unreachable: {message}")));
                }
            }
        }
        Err(EtsiError::Unavailable("the peer KME lacks key units this KME holds; try again".into()))
    }

    /// Picks `n_units` owned ready units not in flight and marks them in flight; `Err(n)` with
    /// the number available when there are fewer.
    async fn pick_units(&self, n_units: usize) -> Result<Result<InFlight, usize>, EtsiError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            // Invariant: no code panics while holding this lock, so it is never poisoned.
            let mut in_flight = inner.in_flight.lock().expect("in-flight lock poisoned");
            let side = inner.side;
            let units = inner.store.select_ready_units(n_units, |id| side.owns(id) && !in_flight.contains(id))?;
            if units.len() < n_units {
                return Ok(Err(units.len()));
            }
            in_flight.extend(units.iter().map(|u| u.key_id));
            drop(in_flight);
            Ok(Ok(InFlight { inner: inner.clone(), units }))
        })
        .await
        .map_err(|_| EtsiError::Unavailable("internal error of the KME".into()))?
        .map_err(|e: StoreError| store_unavailable(&e))
    }

    /// Keys of `size_bits` that can be served now: owned ready units not in flight, in whole
    /// keys, at most `cap`.
    async fn servable_keys(&self, size_bits: u32, cap: u64) -> Result<u64, EtsiError> {
        let inner = self.inner.clone();
        let units_per_key = size_bits.div_ceil(UNIT_BITS) as usize;
        let unit_cap = usize::try_from(cap).unwrap_or(usize::MAX).saturating_mul(units_per_key);
        let n_units = tokio::task::spawn_blocking(move || {
            // A copy, so that Get key requests do not wait for the count. Invariant: no code
            // panics while holding this lock, so it is never poisoned.
            let in_flight = inner.in_flight.lock().expect("in-flight lock poisoned").clone();
            let side = inner.side;
            inner.store.count_ready_units(unit_cap, |id| side.owns(id) && !in_flight.contains(id))
        })
        .await
        .map_err(|_| EtsiError::Unavailable("internal error of the KME".into()))?
        .map_err(|e| store_unavailable(&e))?;
        Ok((n_units / units_per_key) as u64)
    }

    fn validate_reservation(&self, request: &ReserveRequest) -> Result<Vec<KeyReservation>, ReserveError> {
        let refuse = |m: String| Err(ReserveError::Refused(m));
        if request.source_kme_id != self.settings().peer_kme_id {
            return refuse(format!("KME {} is not this KME's peer", request.source_kme_id));
        }
        if self.settings().attachment(&request.master) != Some(Attachment::Peer) {
            return refuse(format!("master SAE {} is not attached to KME {}", request.master, request.source_kme_id));
        }
        if request.slaves.is_empty() {
            return refuse("no slave SAE".into());
        }
        let mut slaves = HashSet::new();
        for slave in &request.slaves {
            if self.settings().attachment(slave) != Some(Attachment::Local) || !slaves.insert(slave) {
                return refuse(format!("slave SAE {slave} is not attached to this KME or named twice"));
            }
        }
        let size = request.size_bits;
        if size == 0 || !size.is_multiple_of(8) || size > MAX_SUPPORTED_KEY_SIZE {
            return refuse(format!("unsupported key size {size}"));
        }
        if request.keys.is_empty() || request.keys.len() > MAX_SUPPORTED_KEYS_PER_REQUEST as usize {
            return refuse(format!("unsupported number of keys {}", request.keys.len()));
        }
        let units_per_key = size.div_ceil(UNIT_BITS) as usize;
        let mut seen_units = HashSet::new();
        let mut seen_keys = HashSet::new();
        let created_unix_ms = now_unix_ms();
        let mut out = Vec::with_capacity(request.keys.len());
        for (key_id, unit_ids) in &request.keys {
            if !seen_keys.insert(*key_id) {
                return refuse(format!("key {key_id} is named twice"));
            }
            if unit_ids.len() != units_per_key {
                return refuse(format!("key {key_id} has {} units, {size} bits need {units_per_key}", unit_ids.len()));
            }
            for unit_id in unit_ids {
                if !seen_units.insert(*unit_id) {
                    return refuse(format!("unit {unit_id} is named twice"));
                }
                if !self.side().peer().owns(unit_id) {
                    return refuse(format!("unit {unit_id} is not owned by the peer KME"));
                }
            }
            out.push(KeyReservation {
                key_id: *key_id,
                unit_ids: unit_ids.clone(),
                size_bits: size,
                master: request.master.0.clone(),
                slaves: request.slaves.iter().map(|s| s.0.clone()).collect(),
                created_unix_ms,
            });
        }
        Ok(out)
    }
}

/// Units picked for a Get key; they leave the in-flight set when this is dropped (after they
/// were removed from the store, or given back).
struct InFlight {
    inner: Arc<Inner>,
    units: Vec<KeyUnit>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        // Invariant: no code panics while holding this lock, so it is never poisoned.
        let mut in_flight = self.inner.in_flight.lock().expect("in-flight lock poisoned");
        for unit in &self.units {
            in_flight.remove(&unit.key_id);
        }
    }
}

fn container(keys: &[KeyUnit]) -> KeyContainer {
    KeyContainer { keys: keys.iter().map(|k| Key::new(k.key_id, &k.key)).collect(), key_container_extension: None }
}

fn store_unavailable(e: &dyn std::fmt::Display) -> EtsiError {
    error!(error = %e, "key store failure");
    EtsiError::Unavailable("the key store of the KME failed".into())
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
