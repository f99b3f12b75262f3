//! The key life cycle of one KME: Get status, Get key (reserve at the peer, then take locally),
//! Get key with key IDs (hand out a reservation once), and the peer's reservations.
//!
//! Get key at KME A for master m (at A) and slave s (at B):
//! 1. A picks ready units, those it owns first ([`KmeSide`]) and, when they are too few, the
//!    peer's, and marks them *in flight* in memory, so concurrent requests at A never pick the
//!    same unit.
//! 2. A asks B to reserve them ([`ReservePeer::reserve`]); B refuses units its own Get key holds
//!    in flight (`NotNow`), marks the others in flight while it removes them from its ready pool
//!    and records the ETSI keys for (m, s), in one transaction, durably, or changes nothing.
//! 3. Only then A removes the units from its own pool (one transaction) and answers. The removal
//!    need not reach the disk first: B's durable reservation already keeps the units from being
//!    delivered again (see "If A stops" below), so the Get key path waits for one fsync, B's.
//!
//! If B refuses, or cannot be reached before anything was sent (connection refused), A's units
//! go back to its pool and the master gets a 503.
//!
//! If the call fails after the request may have reached B (timeout, connection lost), B may
//! have recorded the reservation or not: the master gets a 503, the units stay in flight (not
//! offered, not counted in `stored_key_count`) and a background task settles the doubt with
//! [`ReservePeer::cancel`], retrying with back-off until B answers or the KME shuts down. For
//! each key, B either erases the reservation it recorded (`Cancelled`: its units are gone at B,
//! A discards them durably) or records that the key ID is cancelled, so that the Reserve, should
//! it arrive late, is refused (`Unknown`: B still holds the units if it never took them, A offers
//! them again). Either way both pools hold the same units afterwards.
//!
//! If A stops (or dies) before B answered, or after answering but before its removal reached the
//! disk, the in-flight marks vanish and the units are offered again; if B had reserved them, the
//! next Reserve naming them reports them missing and A discards them then. Likewise, if B no
//! longer holds some units for any other reason, A discards them and tries again with others: no
//! unit is ever part of two delivered keys. Units that B holds but has not committed yet (the
//! block is ready at A, still pending at B for the moment of the two-ended commit) are not
//! missing: B says so, and A keeps them and tries again with others.
//!
//! Why no unit is ever part of two keys, although both KMEs may pick any unit: for KME X to
//! hand out unit u, the peer Y must first reserve u, which durably removes u from Y's pool; so
//! Y can hand out u only if X reserved it earlier, removing it from X's pool before X could
//! pick it. The two can only interleave while each holds u: X's Reserve handler refuses (`NotNow`)
//! a unit X's own Get key holds in flight, and X's picker skips a unit the handler is
//! reserving (both take X's in-flight lock). If both pick u at once, both answer `NotNow` and
//! both pick others. X's own removal after delivering u may be lost in a crash (see above), but
//! u is gone from Y's pool for good, so only X can pick u again and Y then reports it missing.
//!
//! Owning is thus a preference that keeps the two KMEs apart in normal use. Borrowing keeps a
//! KME serving when all masters sit at it and its own half is spent: without it, the peer's
//! half would fill the store, stop the link, and leave this KME with nothing to serve.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};
use uuid::Uuid;

use super::api::{self, EtsiError, Key, KeyContainer, KeyRequest, StatusBody};
use super::audit::{AuditLog, Delivery};
use super::config::{Attachment, KmeSettings, MAX_SUPPORTED_KEY_SIZE, MAX_SUPPORTED_KEYS_PER_REQUEST};
use super::identity::{KmeSide, SaeId};
use super::peer::{CancelError, CancelOutcome, CancelRequest, ReserveError, ReservePeer, ReserveRequest};
use qkd_store::kme::{KeyReservation, KmeStoreError, UNIT_BYTES, combine_units};
use qkd_store::{KeyUnit, SledStore, StoreError};

/// Bits in one key unit.
const UNIT_BITS: u32 = 8 * UNIT_BYTES as u32;

/// Reservation attempts of one Get key when the peer reports units it no longer holds.
const MAX_RESERVE_ATTEMPTS: usize = 4;

/// First delay between two attempts to cancel a reservation in doubt; it doubles up to
/// [`CANCEL_MAX_DELAY`].
const CANCEL_FIRST_DELAY: Duration = Duration::from_millis(100);

/// Longest delay between two attempts to cancel a reservation in doubt.
const CANCEL_MAX_DELAY: Duration = Duration::from_secs(5);

/// After a search for this KME's own units came up short, the next searches skip them (and go
/// straight to the peer's) for this long, unless the peer's are short too: a search for own
/// units among a store of the peer's reads the whole pool, which would be paid on every Get key
/// while a one-way load borrows.
const OWN_UNITS_RESEARCH_PERIOD: Duration = Duration::from_secs(1);

/// A failed cancellation is logged at warn on the first attempt and then every this many.
const CANCEL_WARN_EVERY: u32 = 12;

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
    /// Units picked by a Get key in progress or in doubt (never picked twice).
    in_flight: Mutex<HashSet<Uuid>>,
    /// Where the next searches for units start. Only used with `in_flight` locked.
    pick: Mutex<PickState>,
    /// How many of the in-flight units wait for the peer's answer to a cancellation.
    in_doubt: AtomicUsize,
    /// The tasks settling reservations in doubt.
    tasks: TaskTracker,
    /// Stops those tasks ([`KmeState::shutdown`]).
    shutdown: CancellationToken,
    /// The store holds, or the link now makes, keys of a simulated quantum channel.
    simulated: AtomicBool,
    /// The delivery audit log ([`KmeState::set_audit_log`]).
    audit: std::sync::OnceLock<AuditLog>,
    /// Where the HTTPS server's request metrics go ([`KmeState::set_metrics_recorder`]).
    metrics: std::sync::OnceLock<crate::server::SharedRecorder>,
}

/// Where the searches for ready units start ([`KmeState`]'s picker).
struct PickState {
    /// The last own unit picked: the next search starts after it (see
    /// [`SledStore::select_ready_units_after`]).
    own_cursor: Option<Uuid>,
    /// The same for the peer's units, when this KME borrows them. It starts at a random ID, so
    /// that a borrowing KME seldom reaches for the units the owner picks next.
    borrow_cursor: Option<Uuid>,
    /// When a search for own units last came up short (see [`OWN_UNITS_RESEARCH_PERIOD`]).
    own_short_at: Option<std::time::Instant>,
}

/// A Get key that passed every check: who, how many, how big.
struct ValidKeyRequest {
    master: SaeId,
    slaves: Vec<SaeId>,
    number: u32,
    size_bits: u32,
}

impl KmeState {
    /// A KME serving from `store` as `side`, reserving through `peer`. A store that holds blocks
    /// of a simulated quantum channel (their records say so) makes it a KME of simulated keys
    /// ([`KmeState::set_channel_simulated`]); a store that cannot be read is judged when keys
    /// are asked for.
    pub fn new(settings: KmeSettings, side: KmeSide, store: Arc<SledStore>, peer: Arc<dyn ReservePeer>) -> Self {
        use qkd_store::KeyStore;
        let holds_simulated = match store.blocks() {
            Ok(blocks) => blocks.iter().any(|(meta, _)| meta.simulated),
            Err(e) => {
                warn!(error = %e, "cannot list the store's blocks; assuming they may be simulated");
                true
            }
        };
        Self {
            inner: Arc::new(Inner {
                settings,
                side,
                store,
                peer,
                in_flight: Mutex::new(HashSet::new()),
                pick: Mutex::new(PickState {
                    own_cursor: None,
                    borrow_cursor: Some(Uuid::new_v4()),
                    own_short_at: None,
                }),
                in_doubt: AtomicUsize::new(0),
                tasks: TaskTracker::new(),
                shutdown: CancellationToken::new(),
                simulated: AtomicBool::new(holds_simulated),
                audit: std::sync::OnceLock::new(),
                metrics: std::sync::OnceLock::new(),
            }),
        }
    }

    /// Says that the link feeding the store is simulated (the daemon's device says so): its keys
    /// are then refused to applications unless `allow_simulated_keys` (see
    /// [`KmeState::serves_simulated_keys`]). Once simulated, always: the store keeps the keys.
    pub fn set_channel_simulated(&self, simulated: bool) {
        self.inner.simulated.fetch_or(simulated, Ordering::SeqCst);
    }

    /// Counts the HTTPS server's requests (by endpoint, method and status) and their latencies in
    /// `recorder` from now on: the daemon's own recorder, so that two KMEs in one process keep
    /// separate counts. Without one, nothing is counted.
    pub fn set_metrics_recorder(&self, recorder: crate::server::SharedRecorder) {
        let _ = self.inner.metrics.set(recorder);
    }

    /// The recorder set by [`KmeState::set_metrics_recorder`], if any.
    pub fn metrics_recorder(&self) -> Option<&crate::server::SharedRecorder> {
        self.inner.metrics.get()
    }

    /// Records every delivery in `log` from now on, and refuses deliveries it cannot record.
    pub fn set_audit_log(&self, log: AuditLog) {
        let _ = self.inner.audit.set(log);
    }

    /// Appends a delivery record, if a log is set; a failure refuses the delivery (503).
    fn audit(&self, event: &str, delivery: &Delivery<'_>) -> Result<(), EtsiError> {
        let Some(log) = self.inner.audit.get() else { return Ok(()) };
        log.record(event, delivery).map_err(|e| {
            error!(error = %e, "cannot write the delivery audit log: refusing to deliver keys");
            EtsiError::Unavailable("the KME cannot record the delivery in its audit log; no key was delivered".into())
        })
    }

    /// True when this KME holds keys of a simulated quantum channel.
    pub fn serves_simulated_keys(&self) -> bool {
        self.inner.simulated.load(Ordering::SeqCst)
    }

    /// Refuses key delivery from a store of simulated keys, unless the configuration allows it.
    fn refuse_simulated(&self) -> Result<(), EtsiError> {
        if self.serves_simulated_keys() && !self.inner.settings.allow_simulated_keys {
            warn!(
                "refused a key request: the keys come from a simulated quantum channel (allow_simulated_keys is off)"
            );
            return Err(EtsiError::Unavailable(api::MSG_SIMULATED_KEYS.into()));
        }
        Ok(())
    }

    /// Units held back because a reservation of them at the peer is in doubt (the Reserve call
    /// failed after it may have been sent), until the peer answers the cancellation.
    pub fn in_doubt_units(&self) -> usize {
        self.inner.in_doubt.load(Ordering::SeqCst)
    }

    /// Stops the tasks settling reservations in doubt and waits for them; each logs, at warn,
    /// what it leaves unresolved. Get key requests after this settle nothing either.
    pub async fn shutdown(&self) {
        self.inner.shutdown.cancel();
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
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
    pub async fn get_key(
        &self,
        caller: Option<&SaeId>,
        slave: &SaeId,
        request: KeyRequest,
    ) -> Result<KeyContainer, EtsiError> {
        let valid = self.validate_key_request(caller, slave, request)?;
        self.refuse_simulated()?;
        // The life cycle runs in its own task: a client that hangs up cannot stop it between
        // the peer's reservation and the local removal.
        let state = self.clone();
        tokio::spawn(async move { state.deliver_new_keys(valid).await }).await.map_err(|e| {
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
        self.refuse_simulated()?;
        // Recorded before the keys leave the store; a delivery that then fails is recorded too.
        let audited_ids = key_ids.clone();
        let delivery = Delivery {
            role: "slave",
            master: &master.0,
            slaves: vec![slave.0.as_str()],
            caller: &slave.0,
            size_bits: 0,
            key_ids: &audited_ids,
        };
        self.audit("delivering", &delivery)?;
        let store = self.inner.store.clone();
        let master_id = master.0.clone();
        let n_keys = key_ids.len();
        let caller_id = slave.0.clone();
        let delivered =
            tokio::task::spawn_blocking(move || store.deliver_reserved_keys(&key_ids, &master_id, &caller_id))
                .await
                .map_err(|_| EtsiError::Unavailable("internal error of the KME".into()))?;
        if delivered.is_err() {
            // The keys did not leave; this record only completes the log.
            let _ = self.audit("not_delivered", &delivery);
        }
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
            Err(KmeStoreError::AwaitingReagreement) => {
                info!(master = %master, slave = %slave, "refused keys: the store awaits its re-agreement with the peer's");
                Err(EtsiError::Unavailable(
                    "the KME's key store has not been re-agreed with the peer's since it started (the link is not up \
                     yet); try again later"
                        .into(),
                ))
            }
            Err(e) => Err(store_unavailable(&e)),
        }
    }

    /// The peer KME's reservation (step 2 of the life cycle, at this KME). All or nothing.
    pub async fn reserve_for_peer(&self, request: ReserveRequest) -> Result<(), ReserveError> {
        let reservations = self.validate_reservation(&request)?;
        // The units are marked in flight while they are reserved, so that this KME's own Get
        // key cannot pick them meanwhile; units it already holds in flight are refused.
        let claim = self.claim_for_peer(reservations.iter().flat_map(|r| r.unit_ids.iter().copied()).collect())?;
        let store = self.inner.store.clone();
        let n_keys = reservations.len();
        let result = tokio::task::spawn_blocking(move || store.reserve_keys(&reservations))
            .await
            .map_err(|_| ReserveError::Refused("internal error of the peer KME".into()))?;
        // The transaction is over: the units are out of the pool, or still in it and free.
        drop(claim);
        match result {
            Ok(()) => {
                info!(master = %request.master, n_keys, size_bits = request.size_bits, "keys reserved for the peer KME");
                Ok(())
            }
            Err(KmeStoreError::MissingUnits(missing)) => {
                warn!(n_units = missing.len(), "peer KME asked for units this store does not hold");
                Err(ReserveError::Missing(missing))
            }
            Err(KmeStoreError::NotYetReady(units)) => {
                // Not missing: the peer keeps the units and picks others.
                info!(n_units = units.len(), "peer KME asked for units of a block not committed here yet");
                Err(ReserveError::NotNow(units))
            }
            Err(e) => {
                error!(error = %e, "reservation failed");
                Err(ReserveError::Refused(format!("reservation failed: {e}")))
            }
        }
    }

    /// Marks `unit_ids` in flight for the peer's reservation, or refuses (`NotNow`, nothing
    /// marked) if this KME's own Get key holds any of them.
    fn claim_for_peer(&self, unit_ids: Vec<Uuid>) -> Result<InFlightMarks, ReserveError> {
        let inner = &self.inner;
        // Invariant: no code panics while holding this lock, so it is never poisoned.
        let mut in_flight = inner.in_flight.lock().expect("in-flight lock poisoned");
        let busy: Vec<Uuid> = unit_ids.iter().filter(|id| in_flight.contains(id)).copied().collect();
        if !busy.is_empty() {
            drop(in_flight);
            info!(n_units = busy.len(), "peer KME asked for units this KME's own Get key holds: try others");
            return Err(ReserveError::NotNow(busy));
        }
        in_flight.extend(unit_ids.iter().copied());
        drop(in_flight);
        Ok(InFlightMarks { inner: inner.clone(), ids: unit_ids, in_doubt: false })
    }

    /// The peer KME's cancellation of reservations whose answer it never got: for each key ID,
    /// whether this KME had recorded (and now erased) the reservation, or not (and now refuses it).
    pub async fn cancel_for_peer(&self, request: CancelRequest) -> Result<Vec<CancelOutcome>, CancelError> {
        let refuse = |m: String| Err(CancelError::Refused(m));
        if request.source_kme_id != self.settings().peer_kme_id {
            return refuse(format!("KME {} is not this KME's peer", request.source_kme_id));
        }
        if request.key_ids.len() > MAX_SUPPORTED_KEYS_PER_REQUEST as usize {
            return refuse(format!("unsupported number of keys {}", request.key_ids.len()));
        }
        let mut seen = HashSet::new();
        if let Some(key_id) = request.key_ids.iter().find(|k| !seen.insert(**k)) {
            return refuse(format!("key {key_id} is named twice"));
        }
        let store = self.inner.store.clone();
        let key_ids = request.key_ids;
        let result = tokio::task::spawn_blocking(move || store.cancel_reservations(&key_ids, now_unix_ms()))
            .await
            .map_err(|_| CancelError::Refused("internal error of the peer KME".into()))?;
        match result {
            Ok(cancelled) => {
                let n_cancelled = cancelled.iter().filter(|c| **c).count();
                info!(
                    n_cancelled,
                    n_unknown = cancelled.len() - n_cancelled,
                    "reservations cancelled for the peer KME"
                );
                Ok(cancelled
                    .into_iter()
                    .map(|c| if c { CancelOutcome::Cancelled } else { CancelOutcome::Unknown })
                    .collect())
            }
            Err(e) => {
                error!(error = %e, "cancellation failed");
                Err(CancelError::Refused(format!("cancellation failed: {e}")))
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

    fn validate_key_request(
        &self,
        caller: Option<&SaeId>,
        slave: &SaeId,
        request: KeyRequest,
    ) -> Result<ValidKeyRequest, EtsiError> {
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
        // Units the peer has not committed yet: kept, but not picked again for this request.
        let mut not_ready: HashSet<Uuid> = HashSet::new();
        for _ in 0..MAX_RESERVE_ATTEMPTS {
            let picked = self.pick_units(n_units, &not_ready)?;
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
            let keys: Vec<(Uuid, &[KeyUnit])> =
                picked.units.chunks(units_per_key).map(|units| (Uuid::new_v4(), units)).collect();
            let key_units: Vec<(Uuid, Vec<Uuid>)> =
                keys.iter().map(|(key_id, units)| (*key_id, units.iter().map(|u| u.key_id).collect())).collect();
            let reserve = ReserveRequest {
                source_kme_id: self.settings().kme_id.clone(),
                master: request.master.clone(),
                slaves: request.slaves.clone(),
                size_bits: request.size_bits,
                keys: key_units.clone(),
            };
            let outcome =
                match tokio::time::timeout(self.settings().peer_timeout, self.inner.peer.reserve(reserve)).await {
                    Ok(outcome) => outcome,
                    Err(_) => Err(ReserveError::Unreachable("no answer in time".into())),
                };
            match outcome {
                Ok(()) => {
                    // Recorded before the keys leave the pool: an unwritable log refuses the
                    // delivery, and the units stay here as on a failed removal below.
                    let key_ids: Vec<Uuid> = keys.iter().map(|(id, _)| *id).collect();
                    self.audit(
                        "delivered",
                        &Delivery {
                            role: "master",
                            master: &request.master.0,
                            slaves: request.slaves.iter().map(|s| s.0.as_str()).collect(),
                            caller: &request.master.0,
                            size_bits: request.size_bits,
                            key_ids: &key_ids,
                        },
                    )?;
                    // In memory (no flush, see take_ready_units), so on the async worker.
                    let unit_ids: Vec<Uuid> = picked.units.iter().map(|u| u.key_id).collect();
                    let taken = self.inner.store.take_ready_units(&unit_ids);
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
                                Key::new(
                                    *key_id,
                                    &combine_units(units.iter().map(|u| u.key.as_slice()), request.size_bits),
                                )
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
                Err(ReserveError::NotNow(units)) => {
                    // The units go back to the pool (`picked` dropped); others are picked.
                    info!(
                        n_units = units.len(),
                        "the peer KME cannot reserve some units now (not committed there yet, or in use): picking others"
                    );
                    let ours: HashSet<Uuid> = picked.units.iter().map(|u| u.key_id).collect();
                    let before = not_ready.len();
                    not_ready.extend(units.into_iter().filter(|id| ours.contains(id)));
                    if not_ready.len() == before {
                        return Err(EtsiError::Unavailable("the peer KME refused the reservation".into()));
                    }
                }
                Err(ReserveError::Refused(message)) => {
                    warn!(%message, "the peer KME refused a reservation");
                    return Err(EtsiError::Unavailable(format!("the peer KME refused the reservation: {message}")));
                }
                Err(ReserveError::NotSent(message)) => {
                    // Nothing reached the peer: the units go back to the pool (`picked` dropped).
                    warn!(%message, "the peer KME is unreachable");
                    return Err(EtsiError::Unavailable(format!("the peer KME is unreachable: {message}")));
                }
                Err(ReserveError::Unreachable(message)) => {
                    warn!(%message, n_keys = key_units.len(), "the peer KME is unreachable; settling its reservation in the background");
                    drop(keys);
                    self.settle_in_doubt(picked.into_marks(), key_units);
                    return Err(EtsiError::Unavailable(format!("the peer KME is unreachable: {message}")));
                }
            }
        }
        Err(EtsiError::Unavailable("the peer KME lacks key units this KME holds; try again".into()))
    }

    /// Keeps the units of a reservation in doubt in flight and settles it in a background task:
    /// asks the peer to cancel `keys` (key ID, unit IDs), with back-off, until it answers or the
    /// KME shuts down; then discards the units of cancelled keys and offers the others again.
    fn settle_in_doubt(&self, mut marks: InFlightMarks, keys: Vec<(Uuid, Vec<Uuid>)>) {
        marks.set_in_doubt();
        let state = self.clone();
        self.inner.tasks.spawn(async move { state.settle(marks, keys).await });
    }

    async fn settle(&self, mut marks: InFlightMarks, keys: Vec<(Uuid, Vec<Uuid>)>) {
        let shutdown = self.inner.shutdown.clone();
        let key_ids: Vec<Uuid> = keys.iter().map(|(key_id, _)| *key_id).collect();
        let request = CancelRequest { source_kme_id: self.settings().kme_id.clone(), key_ids: key_ids.clone() };
        let mut delay = CANCEL_FIRST_DELAY;
        let mut attempt: u32 = 0;
        let outcomes = loop {
            attempt += 1;
            let result = tokio::select! {
                biased;
                () = shutdown.cancelled() => None,
                result = tokio::time::timeout(self.settings().peer_timeout, self.inner.peer.cancel(request.clone())) => Some(result),
            };
            let error = match result {
                None => {
                    warn!(
                        n_keys = key_ids.len(),
                        n_units = marks.len(),
                        ?key_ids,
                        "shutting down with a reservation at the peer KME in doubt: its units stay in this KME's pool; \
                         if the peer reserved them, the next reservation naming them finds them missing and discards them"
                    );
                    return;
                }
                Some(Ok(Ok(outcomes))) if outcomes.len() == keys.len() => break outcomes,
                Some(Ok(Ok(outcomes))) => {
                    CancelError::Refused(format!("{} outcomes for {} keys", outcomes.len(), keys.len()))
                }
                Some(Ok(Err(e))) => e,
                Some(Err(_)) => CancelError::Unreachable("no answer in time".into()),
            };
            if attempt == 1 || attempt.is_multiple_of(CANCEL_WARN_EVERY) {
                warn!(%error, attempt, n_keys = key_ids.len(), "cancelling a reservation in doubt at the peer KME failed; retrying");
            }
            tokio::select! {
                biased;
                () = shutdown.cancelled() => {}
                () = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(CANCEL_MAX_DELAY);
        };
        let mut discard = Vec::new();
        let mut release = HashSet::new();
        for ((_, units), outcome) in keys.iter().zip(&outcomes) {
            match outcome {
                CancelOutcome::Cancelled => discard.extend(units.iter().copied()),
                CancelOutcome::Unknown => release.extend(units.iter().copied()),
            }
        }
        marks.release(&release);
        info!(
            n_keys_cancelled = outcomes.iter().filter(|o| **o == CancelOutcome::Cancelled).count(),
            n_units_discarded = discard.len(),
            n_units_released = release.len(),
            "reservation in doubt settled with the peer KME"
        );
        if discard.is_empty() {
            return;
        }
        let mut delay = CANCEL_FIRST_DELAY;
        loop {
            let store = self.inner.store.clone();
            let units = discard.clone();
            let error = match tokio::task::spawn_blocking(move || store.discard_ready_units(&units)).await {
                Ok(Ok(_)) => return,
                Ok(Err(e)) => e.to_string(),
                Err(e) => format!("discard task failed: {e}"),
            };
            error!(%error, n_units = discard.len(), "discarding units of a cancelled reservation failed; retrying");
            tokio::select! {
                biased;
                () = shutdown.cancelled() => {
                    warn!(
                        n_units = discard.len(),
                        "shutting down before discarding units whose reservation the peer KME cancelled: they stay in this \
                         KME's pool until a reservation naming them finds them missing and discards them"
                    );
                    return;
                }
                () = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(CANCEL_MAX_DELAY);
        }
        // The marks of the discarded units go when `marks` is dropped, after the discard.
    }

    /// Picks `n_units` ready units, neither in flight nor in `exclude`, owned ones first and then
    /// the peer's ([`KmeSide`]), and marks them in flight; `Err(n)` with the number available
    /// when there are fewer.
    ///
    /// Runs on the async worker: it reads sled's in-memory page cache and writes nothing, so it
    /// does not block on the disk; a hop to the blocking pool per request cost more than the
    /// search (context switches were most of the KME's CPU time under load).
    fn pick_units(&self, n_units: usize, exclude: &HashSet<Uuid>) -> Result<Result<InFlight, usize>, EtsiError> {
        let inner = &self.inner;
        // Invariant: no code panics while holding these locks, so they are never poisoned.
        let mut in_flight = inner.in_flight.lock().expect("in-flight lock poisoned");
        let mut pick = inner.pick.lock().expect("pick state lock poisoned");
        let side = inner.side;
        let free = |id: &Uuid| !in_flight.contains(id) && !exclude.contains(id);
        let search_own = |pick: &mut PickState, n: usize| {
            let units = inner
                .store
                .select_ready_units_after(pick.own_cursor.as_ref(), n, |id| side.owns(id) && free(id))
                .map_err(|e| store_unavailable(&e))?;
            if let Some(last) = units.last() {
                pick.own_cursor = Some(last.key_id);
            }
            pick.own_short_at = (units.len() < n).then(std::time::Instant::now);
            Ok::<_, EtsiError>(units)
        };
        let skip_own = pick.own_short_at.is_some_and(|at| at.elapsed() < OWN_UNITS_RESEARCH_PERIOD);
        let mut units = if skip_own { Vec::new() } else { search_own(&mut pick, n_units)? };
        if units.len() < n_units {
            let borrowed = inner
                .store
                .select_ready_units_after(pick.borrow_cursor.as_ref(), n_units - units.len(), |id| {
                    !side.owns(id) && free(id)
                })
                .map_err(|e| store_unavailable(&e))?;
            if let Some(last) = borrowed.last() {
                pick.borrow_cursor = Some(last.key_id);
            }
            units.extend(borrowed);
        }
        if units.len() < n_units && skip_own {
            // The peer's units are short too: own units may have come since the last search.
            let own = search_own(&mut pick, n_units - units.len())?;
            units.extend(own);
        }
        if units.len() < n_units {
            return Ok(Err(units.len()));
        }
        in_flight.extend(units.iter().map(|u| u.key_id));
        drop((pick, in_flight));
        let marks =
            InFlightMarks { inner: inner.clone(), ids: units.iter().map(|u| u.key_id).collect(), in_doubt: false };
        Ok(Ok(InFlight { marks, units }))
    }

    /// Keys of `size_bits` that can be served now: ready units not in flight (owned or
    /// borrowed), in whole keys, at most `cap`.
    async fn servable_keys(&self, size_bits: u32, cap: u64) -> Result<u64, EtsiError> {
        let inner = self.inner.clone();
        let units_per_key = size_bits.div_ceil(UNIT_BITS) as usize;
        let unit_cap = usize::try_from(cap).unwrap_or(usize::MAX).saturating_mul(units_per_key);
        let n_units = tokio::task::spawn_blocking(move || {
            // A copy, so that Get key requests do not wait for the count. Invariant: no code
            // panics while holding this lock, so it is never poisoned.
            let in_flight = inner.in_flight.lock().expect("in-flight lock poisoned").clone();
            inner.store.count_ready_units(unit_cap, |id| !in_flight.contains(id))
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
    marks: InFlightMarks,
    units: Vec<KeyUnit>,
}

impl InFlight {
    /// Only the marks, the key bytes wiped.
    fn into_marks(self) -> InFlightMarks {
        self.marks
    }
}

/// In-flight marks of units; removed when this is dropped (or earlier, by
/// [`InFlightMarks::release`]).
struct InFlightMarks {
    inner: Arc<Inner>,
    ids: Vec<Uuid>,
    /// Whether these units are counted in [`Inner::in_doubt`].
    in_doubt: bool,
}

impl InFlightMarks {
    fn len(&self) -> usize {
        self.ids.len()
    }

    /// Counts these units as in doubt until they are released.
    fn set_in_doubt(&mut self) {
        if !self.in_doubt {
            self.inner.in_doubt.fetch_add(self.ids.len(), Ordering::SeqCst);
            self.in_doubt = true;
        }
    }

    /// Removes the marks of the units in `ids` now: they can be picked again.
    fn release(&mut self, ids: &HashSet<Uuid>) {
        // Invariant: no code panics while holding this lock, so it is never poisoned.
        let mut in_flight = self.inner.in_flight.lock().expect("in-flight lock poisoned");
        let before = self.ids.len();
        self.ids.retain(|id| {
            let released = ids.contains(id);
            if released {
                in_flight.remove(id);
            }
            !released
        });
        drop(in_flight);
        if self.in_doubt {
            self.inner.in_doubt.fetch_sub(before - self.ids.len(), Ordering::SeqCst);
        }
    }
}

impl Drop for InFlightMarks {
    fn drop(&mut self) {
        // Invariant: no code panics while holding this lock, so it is never poisoned.
        let mut in_flight = self.inner.in_flight.lock().expect("in-flight lock poisoned");
        for id in &self.ids {
            in_flight.remove(id);
        }
        drop(in_flight);
        if self.in_doubt {
            self.inner.in_doubt.fetch_sub(self.ids.len(), Ordering::SeqCst);
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
