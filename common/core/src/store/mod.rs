//! The key store as the link sees it: the [`KeyStore`] trait, the records it keeps (no key
//! material in [`BlockMeta`] and [`StoreSummary`]; [`KeyUnit`] wipes its bytes), and
//! [`MemoryStore`], an in-memory implementation for the planning tool and the tests.
//!
//! A block's keys go through two states (the two-ended commit of ARCHITECTURE.md): *pending*
//! (stored durably at Bob, not servable) and *ready* (servable). Only ready keys are ever listed
//! or served. The durable implementation (sled, in the daemons' data directories) is
//! `qkd_store::SledStore`.

use uuid::Uuid;
use zeroize::Zeroizing;

pub use memory::MemoryStore;

mod memory;

/// Errors of the key store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The storage backend failed (disk full, permissions, corruption); the backend's own error
    /// is the source.
    #[error("key store database error: {0}")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync + 'static>),
    /// A record on disk does not decode; the store is damaged or from another version.
    #[error("key store record is corrupt: {0}")]
    Corrupt(String),
    /// The block is already stored (in any state).
    #[error("block {0} is already in the key store")]
    DuplicateBlock(Uuid),
    /// The block is not stored as pending.
    #[error("block {0} is not pending in the key store")]
    NotPending(Uuid),
}

/// Where a block's keys stand in the two-ended commit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlockState {
    /// Stored durably, not yet known to be stored at the peer; never served.
    Pending,
    /// Stored at both ends; its keys may be served.
    Ready,
}

/// Public facts about a distilled block, kept with its keys (no key material).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BlockMeta {
    /// Block identifier chosen by Alice.
    pub block_id: Uuid,
    /// Unix time in milliseconds when the block was distilled.
    pub created_unix_ms: u64,
    /// Sifted key bits that went into the block.
    pub n_sifted_bits: u64,
    /// Measured quantum bit error rate in the key (Z) basis.
    pub qber_z: f64,
    /// Measured error rate in the test (X) basis.
    pub qber_x: f64,
    /// Finite-size upper bound on the phase error used for privacy amplification.
    pub phase_error_upper: f64,
    /// Bits disclosed by error correction and verification.
    pub leak_bits: u64,
    /// Final secret key bits of the block.
    pub final_bits: u64,
    /// The block came from a simulated quantum channel (the in-process simulator, an emulator
    /// or a replay of one): its keys are not secret from whoever ran the simulation, and a KME
    /// serves them only when configured with `allow_simulated_keys`. Absent in records written
    /// before the field existed, which read as not simulated.
    #[serde(default)]
    pub simulated: bool,
}

/// One unit of distilled key: a UUID and its bytes.
#[derive(Clone)]
pub struct KeyUnit {
    /// Identifier agreed by both sides.
    pub key_id: Uuid,
    /// The key bytes; wiped on drop.
    pub key: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for KeyUnit {
    /// Prints the ID and the length only, never the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyUnit({}, {} bytes)", self.key_id, self.key.len())
    }
}

/// Count and digest of the ready keys, for comparing the two ends without revealing keys.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct StoreSummary {
    /// Number of ready keys.
    pub n_keys: u64,
    /// Total bits of ready keys.
    pub n_key_bits: u64,
    /// Number of blocks in the ready state.
    pub n_ready_blocks: u64,
    /// Number of blocks still pending.
    pub n_pending_blocks: u64,
    /// SHA-256 over (key ID bytes, key bytes) of every ready key in key-ID order, hex.
    pub digest: String,
}

/// Which units of one stored block a store still holds (see [`KeyStore::holdings`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldUnits {
    /// The block.
    pub block_id: Uuid,
    /// Its state.
    pub state: BlockState,
    /// Every unit the block's record lists, in the record's order (the order of the block's key
    /// IDs in Alice's Amplify answer, the same at both ends).
    pub key_ids: Vec<Uuid>,
    /// One flag per unit of `key_ids`: whether the store still holds it (ready or pending);
    /// `false` once it was delivered, reserved for the KME, discarded or dropped.
    pub held: Vec<bool>,
}

/// What a store holds, block by block: the input of the re-agreement at `Hello` (see
/// `qkd_core::link::reagree`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UnitHoldings {
    /// The blocks of which at least one unit is held, in block-ID order (blocks whose units
    /// were all served keep their records, but are not listed).
    pub blocks: Vec<HeldUnits>,
}

impl StoreError {
    /// A failure of the storage backend (see [`StoreError::Backend`]).
    pub fn backend(error: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>) -> Self {
        StoreError::Backend(error.into())
    }
}

/// The operations the link needs from a key store.
pub trait KeyStore: Send + Sync {
    /// Stores a block's keys as pending, durably, before returning.
    fn put_pending(&self, meta: &BlockMeta, keys: &[KeyUnit]) -> Result<(), StoreError>;
    /// Stores a block's keys as ready, durably, before returning.
    fn put_ready(&self, meta: &BlockMeta, keys: &[KeyUnit]) -> Result<(), StoreError>;
    /// Promotes a pending block to ready, durably.
    fn mark_ready(&self, block_id: Uuid) -> Result<(), StoreError>;
    /// Removes a pending block and its keys, durably (the peer never committed it).
    fn drop_pending(&self, block_id: Uuid) -> Result<(), StoreError>;
    /// The state of a block, if stored.
    fn block_state(&self, block_id: Uuid) -> Result<Option<BlockState>, StoreError>;
    /// IDs of all pending blocks.
    fn pending_blocks(&self) -> Result<Vec<Uuid>, StoreError>;
    /// Count and digest of ready keys.
    fn summary(&self) -> Result<StoreSummary, StoreError>;
    /// Metadata of every stored block, ready or pending.
    fn blocks(&self) -> Result<Vec<(BlockMeta, BlockState)>, StoreError>;
    /// Number of key units held, ready or pending (what the store's size limit counts). Must
    /// not loop on a backend error: a durable store keeps this count rather than iterating.
    fn n_units(&self) -> Result<u64, StoreError>;
    /// Which units of which blocks the store still holds (see [`UnitHoldings`]). Reads every
    /// block record.
    fn holdings(&self) -> Result<UnitHoldings, StoreError>;
    /// Removes whichever of `unit_ids` are ready, durably, and erases them (units the peer no
    /// longer holds, found by the re-agreement at `Hello`). Pending units are left alone (a
    /// pending block is settled whole, by [`KeyStore::drop_pending`] or
    /// [`KeyStore::mark_ready`]). Returns how many units were removed.
    fn discard_units(&self, unit_ids: &[Uuid]) -> Result<u64, StoreError>;
    /// Erases, durably, every key reserved for the KME and not fetched yet by all its slaves (a
    /// store found behind its peer at `Hello`: restored from an older copy, its reservations may
    /// have been fetched since). Returns how many. Stores without reservations keep this
    /// default (`Ok(0)`).
    fn drop_reservations(&self) -> Result<u64, StoreError> {
        Ok(0)
    }
    /// Says that the re-agreement at `Hello` has run at this end (and erased the reservations if
    /// the stores differed): a store that holds its reservations back until then (a daemon's,
    /// whose store may have just been restored from an older copy) serves them again. Default:
    /// nothing to release.
    fn reagreed(&self) {}
    /// Whether the store is in service: `false` once its backend failed (a full disk, an I/O
    /// error) until [`KeyStore::reopen_if_failed`] brings it back. Does no I/O. Stores that
    /// cannot fail that way keep this default (`true`).
    fn is_healthy(&self) -> bool {
        true
    }
    /// Brings a store whose backend failed back into service without a restart (the durable
    /// store reopens its database, with the recovery and checks of a restart). `Ok(true)`:
    /// reopened; `Ok(false)`: it was in service; an error: still out of service (the disk is
    /// still full, say). A block whose write failed is left as a crash at that point would
    /// leave it. Default: nothing to do (`Ok(false)`).
    fn reopen_if_failed(&self) -> Result<bool, StoreError> {
        Ok(false)
    }
}
