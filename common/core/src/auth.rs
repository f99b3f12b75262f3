//! Wegman-Carter authentication of the post-processing (docs/security.md, "Authentication").
//!
//! Each block's transcript (every request and answer, as both ends encode them: see
//! [`crate::link::transcript`]) is authenticated twice: Alice's tag over the transcript up to
//! and including her Amplify answer, which Bob checks before he stores anything, and Bob's tag
//! over the whole transcript, which Alice checks before she stores anything. A tag is
//! `UH_H(label || transcript) XOR pad`:
//! * `UH` is the polynomial hash over GF(2^128) (POLYVAL, RFC 8452, through the RustCrypto
//!   `polyval` crate) of the message cut into 128-bit blocks, the last one padded with zeros,
//!   followed by a block holding the message's length: for two different messages of at most
//!   `L` blocks (the length block included) the hashes differ by any given value with
//!   probability at most `L / 2^128` over the key (epsilon-almost-XOR-universal; Wegman &
//!   Carter, JCSS 22, 265 (1981); Stinson; McGrew & Viega for GHASH, of which POLYVAL is a
//!   reversed representation). [`eps_per_tag`] is that bound, [`hash_blocks`] the `L` the code
//!   hashes.
//! * `H` is 128 bits of the authentication key pool; it is recycled across blocks (Portmann,
//!   IEEE TIT 60(7), 4383 (2014)) and replaced after any failed authentication.
//! * the pad is 128 fresh bits of the pool, used once: Alice's tag takes the bits
//!   `[pad_offset, pad_offset + 128)`, Bob's `[pad_offset + 128, pad_offset + 256)`.
//!
//! The pool ([`AuthPool`]) is a stream of secret bits (the pre-shared secret, then the first
//! `auth_refill_bits` of each committed block's final key, in commit order) with a durable
//! watermark: every bit below it is spent. Alice picks the block's positions from her
//! watermark and persists the new watermark before she answers StartBlock; Bob refuses
//! positions below his own watermark and persists his new one before he uses them. No pad bit
//! is therefore ever used twice at either end, even across crashes.

use std::sync::Mutex;

use polyval::Polyval;
use polyval::universal_hash::{KeyInit, UniversalHash};
use subtle::ConstantTimeEq;
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::link::abort::{Abort, AbortReason};

/// Bytes of a tag (and of a hash key, and of one tag's pad).
pub const TAG_BYTES: usize = 16;
/// Bits of a tag.
pub const TAG_BITS: u64 = 128;
/// Pad bits a block uses: one tag each way.
pub const PAD_BITS_PER_BLOCK: u64 = 2 * TAG_BITS;
/// Bits of a hash key.
pub const HASH_KEY_BITS: u64 = 128;
/// Longest transcript either end authenticates, in bytes (1 GiB; a block beyond it is aborted).
/// It bounds the hashed message's length, and so eps per tag ([`eps_auth_per_block`]).
pub const MAX_TRANSCRIPT_BYTES: u64 = 1 << 30;

/// Which end's tag: the label hashed first (one 128-bit block), so that a tag of one direction
/// is never a tag of the other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Alice's tag (in her Amplify answer).
    AliceToBob,
    /// Bob's tag (in his Commit request).
    BobToAlice,
}

impl Direction {
    /// The 16-byte label.
    pub fn label(self) -> &'static [u8; TAG_BYTES] {
        match self {
            Direction::AliceToBob => b"qkd-wc alice->bo",
            Direction::BobToAlice => b"qkd-wc bob->alic",
        }
    }
}

/// The number of 128-bit blocks the hash takes for a message of `message_bytes` bytes: the
/// message's blocks (the last one padded with zeros) and the length block. The hash's
/// polynomial has this degree, so it is also the `L` of the bound [`eps_per_tag`].
pub fn hash_blocks(message_bytes: u64) -> u64 {
    message_bytes.div_ceil(TAG_BYTES as u64) + 1
}

/// Forgery probability of one tag over messages of at most `message_bytes` bytes:
/// `hash_blocks(message_bytes) / 2^128` (epsilon-almost-XOR-universal bound of the polynomial
/// hash; the one-time pad makes the tag of a substituted message uniform otherwise).
pub fn eps_per_tag(message_bytes: u64) -> f64 {
    hash_blocks(message_bytes) as f64 / 2f64.powi(128)
}

/// eps_auth of one block: two tags, each over a message of at most the label and
/// [`MAX_TRANSCRIPT_BYTES`] of transcript.
pub fn eps_auth_per_block() -> f64 {
    2.0 * eps_per_tag(TAG_BYTES as u64 + MAX_TRANSCRIPT_BYTES)
}

/// `UH_key(label || transcript)`: POLYVAL over the label block, the transcript's blocks (the last
/// one padded with zeros) and a length block (the message's length in bits, 64-bit little
/// endian, then 64 zero bits). Returns the hash and the number of blocks hashed.
pub fn uh_hash(key: &[u8; TAG_BYTES], direction: Direction, transcript: &[u8]) -> ([u8; TAG_BYTES], u64) {
    let mut hash = Polyval::new(key.into());
    hash.update(&[(*direction.label()).into()]);
    hash.update_padded(transcript);
    let message_bytes = (TAG_BYTES + transcript.len()) as u64;
    let mut length = [0u8; TAG_BYTES];
    length[..8].copy_from_slice(&(message_bytes * 8).to_le_bytes());
    hash.update(&[length.into()]);
    let blocks = 1 + transcript.len().div_ceil(TAG_BYTES) as u64 + 1;
    debug_assert_eq!(blocks, hash_blocks(message_bytes));
    (hash.finalize().into(), blocks)
}

/// The tag of `transcript` in `direction`: `uh_hash XOR pad`.
pub fn tag(key: &[u8; TAG_BYTES], pad: &[u8; TAG_BYTES], direction: Direction, transcript: &[u8]) -> [u8; TAG_BYTES] {
    let (mut out, _) = uh_hash(key, direction, transcript);
    for (o, p) in out.iter_mut().zip(pad) {
        *o ^= p;
    }
    out
}

/// True when `received` is the tag of `transcript` (compared in constant time; a tag of the
/// wrong length never matches).
pub fn tag_matches(
    key: &[u8; TAG_BYTES],
    pad: &[u8; TAG_BYTES],
    direction: Direction,
    transcript: &[u8],
    received: &[u8],
) -> bool {
    let expected = tag(key, pad, direction, transcript);
    received.len() == TAG_BYTES && bool::from(expected.ct_eq(received))
}

/// Errors of an authentication key pool.
#[derive(Debug, thiserror::Error)]
pub enum AuthPoolError {
    /// The pool does not hold the bits asked for.
    #[error("authentication pool: bits [{offset}, {end}) are beyond its {total} bits")]
    OutOfRange {
        /// First bit asked.
        offset: u64,
        /// One past the last bit asked.
        end: u64,
        /// Bits the pool holds.
        total: u64,
    },
    /// The request is invalid (a watermark moved back, an unaligned position).
    #[error("authentication pool: {0}")]
    Invalid(String),
    /// The storage failed (the pool's state may not be durable).
    #[error("authentication pool storage: {0}")]
    Backend(String),
}

impl From<AuthPoolError> for crate::link::LinkError {
    fn from(e: AuthPoolError) -> Self {
        crate::link::LinkError::Store(crate::store::StoreError::Backend(Box::new(e)))
    }
}

/// What an end's pool remembers durably besides its bits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AuthState {
    /// The next unused bit: every bit below it is spent (a pad, a hash key, or skipped).
    pub watermark: u64,
    /// Position of the current hash key; `None` before the first block and after a failed
    /// authentication (the next block takes a fresh key).
    pub hash_key_offset: Option<u64>,
}

/// An end's authentication key pool: a stream of secret bits shared with the peer (the
/// pre-shared secret, then each committed block's refill, in commit order), its durable
/// [`AuthState`], and the refills of blocks not yet settled. Positions are in bits and
/// multiples of 8. Every method that changes the state is durable when it returns (a file-backed
/// pool syncs before returning).
pub trait AuthPool: Send + Sync {
    /// The durable state.
    fn state(&self) -> Result<AuthState, AuthPoolError>;
    /// Records `state` durably. Refuses a watermark below the current one.
    fn set_state(&self, state: AuthState) -> Result<(), AuthPoolError>;
    /// Bits in the stream (spent or not).
    fn total_bits(&self) -> Result<u64, AuthPoolError>;
    /// The 128-bit hash key at `offset`.
    fn hash_key(&self, offset: u64) -> Result<Zeroizing<[u8; TAG_BYTES]>, AuthPoolError>;
    /// `n_bits` pad bits at `offset` (the caller has moved the watermark past them first).
    fn pad(&self, offset: u64, n_bits: u64) -> Result<Zeroizing<Vec<u8>>, AuthPoolError>;
    /// Keeps a block's refill aside, durably, until the block is settled.
    fn stage_refill(&self, block_id: Uuid, bytes: &[u8]) -> Result<(), AuthPoolError>;
    /// Settles a staged refill: appended to the stream when the block is ready at this end
    /// (`keep`), erased otherwise. Unknown blocks are ignored.
    fn settle_refill(&self, block_id: Uuid, keep: bool) -> Result<(), AuthPoolError>;
    /// Blocks whose refills are staged.
    fn staged_refills(&self) -> Result<Vec<Uuid>, AuthPoolError>;
    /// Stages a pre-shared secret the operator installed, under its ID, until StartBlock applies
    /// it at both ends ([`alice_sync_secrets`], [`bob_apply_secrets`]). Durable.
    fn stage_secret(&self, id: Uuid, bytes: &[u8]) -> Result<(), AuthPoolError>;
    /// IDs of the staged secrets, in ascending order.
    fn staged_secrets(&self) -> Result<Vec<Uuid>, AuthPoolError>;
    /// Appends the staged secret `id` to the stream and unstages it, durably (an error if it is
    /// not staged). A pool that held only the public placeholder secret moves its watermark to
    /// the secret's first bit and drops its hash key: no placeholder bit is used after a secret
    /// is applied.
    fn apply_secret(&self, id: Uuid) -> Result<(), AuthPoolError>;
    /// The secrets applied so far, in stream order.
    fn applied_secrets(&self) -> Result<Vec<AppliedSecret>, AuthPoolError>;
    /// True while the pool holds only the public placeholder secret (no authentication beyond
    /// TLS).
    fn is_placeholder(&self) -> bool {
        false
    }

    /// The next unused bit.
    fn watermark(&self) -> Result<u64, AuthPoolError> {
        Ok(self.state()?.watermark)
    }
    /// Moves the watermark to `new` (durably); never backwards.
    fn advance_watermark(&self, new: u64) -> Result<(), AuthPoolError> {
        let state = self.state()?;
        self.set_state(AuthState { watermark: new, ..state })
    }
    /// Unused bits: the pool's level.
    fn available_bits(&self) -> Result<u64, AuthPoolError> {
        Ok(self.total_bits()?.saturating_sub(self.state()?.watermark))
    }
    /// Settles every staged refill by `ready(block_id)` (opening a session, after a crash).
    fn settle_all(
        &self,
        ready: &mut dyn FnMut(Uuid) -> Result<bool, crate::store::StoreError>,
    ) -> Result<(), crate::link::LinkError> {
        for block_id in self.staged_refills()? {
            let keep = ready(block_id)?;
            self.settle_refill(block_id, keep)?;
        }
        Ok(())
    }
}

/// A pre-shared secret applied to the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AppliedSecret {
    /// The secret's ID (made with it by `qkdctl auth-secret new`).
    pub id: Uuid,
    /// Its first bit in the stream.
    pub position: u64,
    /// Its length in bits.
    pub bits: u64,
}

/// An in-memory [`AuthPool`] (tests, the planning tool). Sharing it (an `Arc`) between cores
/// created one after the other models a pool that survives a crash.
pub struct MemoryAuthPool {
    inner: Mutex<MemoryPoolInner>,
}

struct MemoryPoolInner {
    stream: Zeroizing<Vec<u8>>,
    state: AuthState,
    staged: Vec<(Uuid, Zeroizing<Vec<u8>>)>,
    staged_secrets: Vec<(Uuid, Zeroizing<Vec<u8>>)>,
    applied: Vec<AppliedSecret>,
}

impl MemoryAuthPool {
    /// A pool holding `secret` (the pre-shared secret), nothing spent.
    pub fn new(secret: &[u8]) -> Self {
        Self {
            inner: Mutex::new(MemoryPoolInner {
                stream: Zeroizing::new(secret.to_vec()),
                state: AuthState::default(),
                staged: Vec::new(),
                staged_secrets: Vec::new(),
                applied: Vec::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryPoolInner> {
        // Invariant: nothing panics while holding this lock.
        self.inner.lock().expect("auth pool lock poisoned")
    }

    fn read(&self, offset: u64, n_bits: u64) -> Result<Zeroizing<Vec<u8>>, AuthPoolError> {
        if !offset.is_multiple_of(8) || !n_bits.is_multiple_of(8) {
            return Err(AuthPoolError::Invalid(format!("bits [{offset}, +{n_bits}) are not byte aligned")));
        }
        let inner = self.lock();
        let total = inner.stream.len() as u64 * 8;
        let end = offset.saturating_add(n_bits);
        if end > total {
            return Err(AuthPoolError::OutOfRange { offset, end, total });
        }
        Ok(Zeroizing::new(inner.stream[(offset / 8) as usize..(end / 8) as usize].to_vec()))
    }
}

impl AuthPool for MemoryAuthPool {
    fn state(&self) -> Result<AuthState, AuthPoolError> {
        Ok(self.lock().state)
    }

    fn set_state(&self, state: AuthState) -> Result<(), AuthPoolError> {
        let mut inner = self.lock();
        if state.watermark < inner.state.watermark {
            return Err(AuthPoolError::Invalid(format!(
                "watermark would move back from {} to {}",
                inner.state.watermark, state.watermark
            )));
        }
        inner.state = state;
        Ok(())
    }

    fn total_bits(&self) -> Result<u64, AuthPoolError> {
        Ok(self.lock().stream.len() as u64 * 8)
    }

    fn hash_key(&self, offset: u64) -> Result<Zeroizing<[u8; TAG_BYTES]>, AuthPoolError> {
        let bytes = self.read(offset, HASH_KEY_BITS)?;
        let mut key = Zeroizing::new([0u8; TAG_BYTES]);
        key.copy_from_slice(&bytes);
        Ok(key)
    }

    fn pad(&self, offset: u64, n_bits: u64) -> Result<Zeroizing<Vec<u8>>, AuthPoolError> {
        self.read(offset, n_bits)
    }

    fn stage_refill(&self, block_id: Uuid, bytes: &[u8]) -> Result<(), AuthPoolError> {
        let mut inner = self.lock();
        inner.staged.retain(|(id, _)| *id != block_id);
        inner.staged.push((block_id, Zeroizing::new(bytes.to_vec())));
        Ok(())
    }

    fn settle_refill(&self, block_id: Uuid, keep: bool) -> Result<(), AuthPoolError> {
        let mut inner = self.lock();
        if let Some(i) = inner.staged.iter().position(|(id, _)| *id == block_id) {
            let (_, bytes) = inner.staged.remove(i);
            if keep {
                inner.stream.extend_from_slice(&bytes);
            }
        }
        Ok(())
    }

    fn staged_refills(&self) -> Result<Vec<Uuid>, AuthPoolError> {
        Ok(self.lock().staged.iter().map(|(id, _)| *id).collect())
    }

    fn stage_secret(&self, id: Uuid, bytes: &[u8]) -> Result<(), AuthPoolError> {
        let mut inner = self.lock();
        inner.staged_secrets.retain(|(staged, _)| *staged != id);
        inner.staged_secrets.push((id, Zeroizing::new(bytes.to_vec())));
        Ok(())
    }

    fn staged_secrets(&self) -> Result<Vec<Uuid>, AuthPoolError> {
        let mut ids: Vec<Uuid> = self.lock().staged_secrets.iter().map(|(id, _)| *id).collect();
        ids.sort();
        Ok(ids)
    }

    fn apply_secret(&self, id: Uuid) -> Result<(), AuthPoolError> {
        let mut inner = self.lock();
        let Some(i) = inner.staged_secrets.iter().position(|(staged, _)| *staged == id) else {
            return Err(AuthPoolError::Invalid(format!("secret {id} is not staged")));
        };
        let (_, bytes) = inner.staged_secrets.remove(i);
        let position = inner.stream.len() as u64 * 8;
        inner.stream.extend_from_slice(&bytes);
        inner.applied.push(AppliedSecret { id, position, bits: bytes.len() as u64 * 8 });
        Ok(())
    }

    fn applied_secrets(&self) -> Result<Vec<AppliedSecret>, AuthPoolError> {
        Ok(self.lock().applied.clone())
    }
}

/// What authenticating a block cost at one end, for the block report and the logs.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AuthReport {
    /// Pool bits spent: the two tags' pads (256), and a fresh hash key (128) when one was taken.
    pub spent_bits: u64,
    /// Bits of the block's final key that refilled the pool.
    pub refill_bits: u64,
    /// Unused bits left in the pool afterwards (the pool's level).
    pub pool_bits: u64,
    /// The block's eps_auth (both tags, [`eps_auth_per_block`]).
    pub eps_auth: f64,
}

impl AuthReport {
    /// A report with the block's eps_auth.
    pub fn new(spent_bits: u64, refill_bits: u64, pool_bits: u64) -> Self {
        Self { spent_bits, refill_bits, pool_bits, eps_auth: eps_auth_per_block() }
    }
}

/// A block's authentication material at one end: the hash key and both tags' pads, read from
/// the pool after the watermark moved past them.
pub struct BlockAuth {
    /// Position of the hash key.
    pub key_offset: u64,
    /// Position of the block's pads.
    pub pad_offset: u64,
    /// Pool bits this end spent on the block (pads, and a fresh hash key if it took one).
    pub spent_bits: u64,
    key: Zeroizing<[u8; TAG_BYTES]>,
    pads: Zeroizing<[u8; 2 * TAG_BYTES]>,
}

impl std::fmt::Debug for BlockAuth {
    /// The positions only, never the key or the pads.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockAuth")
            .field("key_offset", &self.key_offset)
            .field("pad_offset", &self.pad_offset)
            .field("spent_bits", &self.spent_bits)
            .finish_non_exhaustive()
    }
}

impl BlockAuth {
    fn read(pool: &dyn AuthPool, key_offset: u64, pad_offset: u64, spent_bits: u64) -> Result<Self, AuthPoolError> {
        let key = pool.hash_key(key_offset)?;
        let pad_bytes = pool.pad(pad_offset, PAD_BITS_PER_BLOCK)?;
        let mut pads = Zeroizing::new([0u8; 2 * TAG_BYTES]);
        pads.copy_from_slice(&pad_bytes);
        Ok(Self { key_offset, pad_offset, spent_bits, key, pads })
    }

    fn pad(&self, direction: Direction) -> &[u8; TAG_BYTES] {
        let half = match direction {
            Direction::AliceToBob => &self.pads[..TAG_BYTES],
            Direction::BobToAlice => &self.pads[TAG_BYTES..],
        };
        half.try_into().expect("half of the pads is one tag's pad")
    }

    /// This end's tag of `transcript` in `direction`.
    pub fn tag(&self, direction: Direction, transcript: &[u8]) -> [u8; TAG_BYTES] {
        tag(&self.key, self.pad(direction), direction, transcript)
    }

    /// Checks the peer's tag of `transcript` in `direction` (constant time).
    pub fn verify(&self, direction: Direction, transcript: &[u8], received: &[u8]) -> bool {
        tag_matches(&self.key, self.pad(direction), direction, transcript, received)
    }
}

/// Alice at StartBlock: the block's hash key (the current one, or a fresh one after a failure
/// or for the first block) and pads, taken at her watermark, which moves past them durably
/// before this returns. An exhausted pool is an abort ([`AbortReason::AuthPoolExhausted`]) and
/// spends nothing.
pub fn alice_allocate(pool: &dyn AuthPool) -> Result<Result<BlockAuth, Abort>, AuthPoolError> {
    let state = pool.state()?;
    let watermark = state.watermark;
    let (key_offset, pad_offset) = match state.hash_key_offset {
        Some(key_offset) => (key_offset, watermark),
        None => (watermark, watermark + HASH_KEY_BITS),
    };
    let new_watermark = pad_offset + PAD_BITS_PER_BLOCK;
    let total = pool.total_bits()?;
    if total < new_watermark {
        return Ok(Err(exhausted("Alice", total.saturating_sub(watermark), new_watermark - watermark)));
    }
    pool.set_state(AuthState { watermark: new_watermark, hash_key_offset: Some(key_offset) })?;
    Ok(Ok(BlockAuth::read(pool, key_offset, pad_offset, new_watermark - watermark)?))
}

/// Bob at StartBlock: accepts Alice's positions if no pad bit there is spent at his end
/// (`pad_offset` at or above his watermark) and the hash key is his current one or fresh bits,
/// moves his watermark past them durably, and reads them. Otherwise an abort (nothing spent).
pub fn bob_accept(
    pool: &dyn AuthPool,
    key_offset: u64,
    pad_offset: u64,
) -> Result<Result<BlockAuth, Abort>, AuthPoolError> {
    let state = pool.state()?;
    let refuse = |detail: String| Ok(Err(Abort::new(AbortReason::AuthenticationFailed, detail)));
    if !key_offset.is_multiple_of(TAG_BITS) || !pad_offset.is_multiple_of(TAG_BITS) {
        return refuse(format!("authentication positions {key_offset}/{pad_offset} are not multiples of 128"));
    }
    if pad_offset < state.watermark {
        return refuse(format!(
            "pad reuse refused: Alice's pad offset {pad_offset} is below Bob's watermark {}",
            state.watermark
        ));
    }
    let pads_end = pad_offset.saturating_add(PAD_BITS_PER_BLOCK);
    let fresh_key = key_offset >= state.watermark
        && (key_offset.saturating_add(HASH_KEY_BITS) <= pad_offset || key_offset >= pads_end);
    if state.hash_key_offset != Some(key_offset) && !fresh_key {
        return refuse(format!(
            "Alice's hash key at {key_offset} is neither Bob's current key nor unused bits (a key is replaced after a \
             failed authentication)"
        ));
    }
    let new_watermark = pads_end.max(if fresh_key { key_offset + HASH_KEY_BITS } else { 0 });
    let total = pool.total_bits()?;
    if total < new_watermark {
        return Ok(Err(exhausted("Bob", total.saturating_sub(state.watermark), new_watermark - state.watermark)));
    }
    pool.set_state(AuthState { watermark: new_watermark, hash_key_offset: Some(key_offset) })?;
    Ok(Ok(BlockAuth::read(pool, key_offset, pad_offset, new_watermark - state.watermark)?))
}

/// Alice at StartBlock, before she takes the block's positions: makes the two streams one.
/// Bob's stream (`bob_total_bits` long) must be hers, or hers without the secrets she applied
/// last; those, and the secrets staged at both ends (`bob_staged`, applied here now, in ID
/// order), are what Bob applies before he reads the positions. Anything else is an abort
/// ([`AbortReason::AuthPoolsDiffer`]) that spends nothing. An altered list (the message is not
/// authenticated yet) can only make the streams differ, which the tags then refuse.
pub fn alice_sync_secrets(
    pool: &dyn AuthPool,
    bob_total_bits: u64,
    bob_staged: &[String],
) -> Result<Result<Vec<Uuid>, Abort>, AuthPoolError> {
    let total = pool.total_bits()?;
    let mut apply = Vec::new();
    if bob_total_bits != total {
        let missing: Vec<AppliedSecret> =
            pool.applied_secrets()?.into_iter().filter(|s| s.position >= bob_total_bits).collect();
        let explained = missing.first().is_some_and(|s| s.position == bob_total_bits)
            && missing.windows(2).all(|w| w[0].position + w[0].bits == w[1].position)
            && missing.last().is_some_and(|s| s.position + s.bits == total);
        if !explained {
            return Ok(Err(Abort::new(
                AbortReason::AuthPoolsDiffer,
                format!(
                    "Alice's authentication key pool holds {total} bits and Bob's {bob_total_bits}, which no secret \
                     Alice applied explains (a secret installed at one end only, or a pool restored from a backup): \
                     install a new secret at both ends with `qkdctl auth-secret install --reset`"
                ),
            )));
        }
        apply.extend(missing.iter().map(|s| s.id));
    }
    let here = pool.staged_secrets()?;
    let mut both: Vec<Uuid> =
        bob_staged.iter().filter_map(|id| Uuid::parse_str(id).ok()).filter(|id| here.contains(id)).collect();
    both.sort();
    both.dedup();
    for id in both {
        pool.apply_secret(id)?;
        tracing::info!(secret = %id, "pre-shared authentication secret applied (held at both ends)");
        apply.push(id);
    }
    Ok(Ok(apply))
}

/// Bob at StartBlock: applies, in order, the secrets Alice's answer names (those he applied
/// already are skipped). One that is not installed here is an abort
/// ([`AbortReason::AuthPoolsDiffer`]) naming it.
pub fn bob_apply_secrets(pool: &dyn AuthPool, ids: &[String]) -> Result<Result<(), Abort>, AuthPoolError> {
    for text in ids {
        let Ok(id) = Uuid::parse_str(text) else {
            return Ok(Err(Abort::new(AbortReason::AuthPoolsDiffer, format!("{text:?} is not a secret ID"))));
        };
        if pool.applied_secrets()?.iter().any(|s| s.id == id) {
            continue;
        }
        if !pool.staged_secrets()?.contains(&id) {
            return Ok(Err(Abort::new(
                AbortReason::AuthPoolsDiffer,
                format!(
                    "Alice applied the pre-shared secret {id}, which is not installed at Bob: install the same \
                     secret file there with `qkdctl auth-secret install`"
                ),
            )));
        }
        pool.apply_secret(id)?;
        tracing::info!(secret = %id, "pre-shared authentication secret applied (held at both ends)");
    }
    Ok(Ok(()))
}

/// Retires the hash key at `key_offset` after a failed authentication: the next block takes a
/// fresh one (a key already replaced stays replaced).
pub fn retire_hash_key(pool: &dyn AuthPool, key_offset: u64) -> Result<(), AuthPoolError> {
    let state = pool.state()?;
    if state.hash_key_offset == Some(key_offset) {
        pool.set_state(AuthState { hash_key_offset: None, ..state })?;
    }
    Ok(())
}

fn exhausted(end: &str, available: u64, needed: u64) -> Abort {
    Abort::new(
        AbortReason::AuthPoolExhausted,
        format!(
            "{end}'s authentication key pool holds {available} unused bits, a block needs {needed}: no key is \
             distilled until a new pre-shared secret is installed at both ends"
        ),
    )
}

#[cfg(test)]
mod tests;
