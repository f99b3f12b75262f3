//! Key custody at rest: every unit's key bytes (ready, pending, reserved) are sealed with an
//! AEAD under a key of their own, derived from the operator's key-encryption key (KEK) and a
//! per-unit secret kept in a *slot file* outside sled, which is overwritten in place when the
//! unit leaves the store.
//!
//! # The KEK
//! A [`Kek`] is 32 random bytes that the store never holds: a file the operator provides
//! (`[store] kek_file`, mode 0600 or stricter, checked) or a systemd credential
//! (`$CREDENTIALS_DIRECTORY/<name>`, so that `LoadCredentialEncrypted=` can keep it encrypted
//! under the host's TPM or its credential secret). Two keys are derived from it with HKDF-SHA256
//! (RFC 5869): a *check value* and the *unit root key*. The check value, kept in the slot
//! file's header, lets [`crate::SledStore::open`] refuse a wrong KEK before anything of the store
//! is read or written; it is an HKDF output (an HMAC, RFC 2104), which reveals nothing about the
//! KEK (HMAC is a PRF: RFC 2104 section 6, Bellare 2006 "New Proofs for NMAC and HMAC").
//!
//! # The slot file
//! `qkd-store.slots`: a 64-byte header (magic, check value), then fixed 32-byte slots. Each
//! stored unit (and each KME reservation) owns one slot, which holds a fresh random secret; the
//! unit's data key is HKDF(unit root key, slot secret, slot number), and the unit is sealed with
//! ChaCha20-Poly1305 (RFC 8439) under it, with a random 96-bit nonce and associated data binding
//! the record's kind, its key ID and its block ID, so that a sealed unit moved to another record
//! (or another slot) fails to open. A slot of zeros is free.
//!
//! When a unit is delivered or discarded its slot is overwritten with zeros in place and the file
//! synced: from then on the unit cannot be opened, even with the KEK, although sled, which is
//! log-structured, may keep the old sealed record in its segments until it rewrites them. (This
//! is the "Clear" of NIST SP 800-88 Rev. 1, overwriting in place through the file system;
//! on a copy-on-write file system, or flash whose controller remaps writes, the old sector may
//! survive physically: docs/store.md says what to do there.)
//!
//! # Order of writes, and crashes
//! * A slot's secret is synced to the slot file *before* any sled record naming the slot is
//!   written (sled flushes on its own every 500 ms, so a record may reach the disk at any time
//!   after it is written): a durable record always finds its secret.
//! * A slot is erased *after* the record that named it is removed. A crash between the two
//!   leaves a secret no record names: opening the store zeroes every such slot (the scrub).
//!   A removal sled had not made durable when the slot was erased comes back after a crash as a
//!   record whose slot is zero, or holds another unit's secret (slots are reused): each sealed
//!   record carries a short tag of its slot's secret, so that such a record is recognised as
//!   erased (not damaged) and removed by the recovery at open, which is what its removal meant.
//!
//! So after any crash: a unit is either openable (its record and secret both durable) or gone;
//! never half-written, never served twice (the key delivery's invariants are unchanged).
//!
//! # Old stores
//! A store written by an earlier version (a sled database without a slot file) holds its units
//! unsealed, and their bytes linger in sled's log whatever is done to them now: it is refused
//! with a message that says so (see [`KekFault::Unsealed`]), not migrated.

use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use chacha20poly1305::aead::rand_core::RngCore;
use chacha20poly1305::aead::{Aead, KeyInit, OsRng, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use hkdf::Hkdf;
use sha2::{Digest, Sha256};
use uuid::Uuid;
use zeroize::Zeroizing;

/// Bytes of a KEK.
pub const KEK_BYTES: usize = 32;

/// The slot file in a store's directory.
pub const SLOTS_FILE: &str = "qkd-store.slots";

/// What the slot file starts with (padded with zeros to [`MAGIC_LEN`] bytes).
const MAGIC: &[u8] = b"qkd key store slots v1\n";
const MAGIC_LEN: usize = 32;
/// The slot file's header: magic, then the KEK check value.
const HEADER_LEN: u64 = 64;
/// Bytes of a slot (a secret).
const SLOT_BYTES: usize = 32;

/// HKDF `info` of the KEK check value.
const INFO_CHECK: &[u8] = b"qkd-store v1 KEK check value";
/// HKDF `info` of the unit root key.
const INFO_UNITS: &[u8] = b"qkd-store v1 unit root key";

/// Bytes a seal adds to the key bytes: slot number (4), slot tag (8), nonce (12), Poly1305 tag
/// (16).
pub const SEAL_OVERHEAD: usize = 4 + TAG_LEN + 12 + 16;
/// Bytes of the slot tag kept in a sealed record.
const TAG_LEN: usize = 8;

/// What a sealed record is: its kind is bound in the associated data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A unit of `pending` or `ready` (its key ID and its block's ID are bound).
    Unit,
    /// A KME reservation (its ETSI key ID is bound; no block).
    Reservation,
}

/// Problems with the KEK or the slot file, each naming the file (or credential) at fault.
#[derive(Debug, thiserror::Error)]
pub enum KekFault {
    /// The KEK file (or credential) could not be read.
    #[error(
        "cannot read the key-encryption key {source_name}: {error} (make one with `qkdctl store kek --out FILE`, \
         see docs/store.md)"
    )]
    Unreadable {
        /// Where the KEK was looked for.
        source_name: String,
        /// The operating system's error.
        error: std::io::Error,
    },
    /// The KEK file is readable by others than its owner.
    #[error(
        "the key-encryption key {source_name} has mode {mode:04o}: it must be readable by its owner only \
         (chmod 600 it)"
    )]
    Mode {
        /// The file.
        source_name: String,
        /// Its permission bits.
        mode: u32,
    },
    /// The KEK file does not hold exactly 32 bytes.
    #[error(
        "the key-encryption key {source_name} holds {len} bytes, not {KEK_BYTES} (make one with `qkdctl store kek --out FILE`)"
    )]
    Length {
        /// The file.
        source_name: String,
        /// Its length.
        len: usize,
    },
    /// `$CREDENTIALS_DIRECTORY` is not set, so a systemd credential cannot be found.
    #[error(
        "the key-encryption key is the systemd credential {name:?}, but $CREDENTIALS_DIRECTORY is not set (run \
         the daemon under systemd with LoadCredential= or LoadCredentialEncrypted=, or set [store] kek_file)"
    )]
    NoCredentials {
        /// The credential's name.
        name: String,
    },
    /// The KEK does not open this store: its check value differs from the store's.
    #[error(
        "the key-encryption key {kek} is not the one of the key store at {} (its check value in {} differs): \
         wrong KEK file or credential? The store was not opened and nothing in it was changed",
        .store.display(), .slots.display()
    )]
    WrongKek {
        /// Where the KEK came from.
        kek: String,
        /// The store's directory.
        store: PathBuf,
        /// The slot file.
        slots: PathBuf,
    },
    /// The slot file is damaged (too short, wrong magic).
    #[error("the key store's slot file {} is damaged: {detail}", .path.display())]
    SlotsDamaged {
        /// The slot file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A store made by an earlier version, which kept its units unsealed.
    #[error(
        "the key store at {} was made by an earlier version, which stored its keys unsealed (it has a database \
         but no slot file {SLOTS_FILE}); it is refused rather than migrated, because sled keeps the old unsealed \
         bytes in its log whatever is done to them now. Fetch or give up its keys, then move the directory aside \
         (a new, sealed store is created in its place) and destroy the old copy (docs/store.md, \"Key custody\")",
        .path.display()
    )]
    Unsealed {
        /// The store's directory.
        path: PathBuf,
    },
    /// An I/O error on the slot file.
    #[error("I/O error on the key store's slot file {}: {source}", .path.display())]
    Io {
        /// The slot file.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
}

/// The key-encryption key: 32 bytes kept outside the store, wiped on drop. Its `Debug` shows
/// only where it came from.
pub struct Kek {
    bytes: Zeroizing<[u8; KEK_BYTES]>,
    source: String,
}

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Kek({})", self.source)
    }
}

impl Kek {
    /// A KEK from its bytes; `source` names it in errors.
    pub fn from_bytes(bytes: [u8; KEK_BYTES], source: impl Into<String>) -> Self {
        Self { bytes: Zeroizing::new(bytes), source: source.into() }
    }

    /// A fresh random KEK (from the operating system's generator).
    pub fn generate(source: impl Into<String>) -> Self {
        let mut bytes = Zeroizing::new([0u8; KEK_BYTES]);
        OsRng.fill_bytes(&mut *bytes);
        Self { bytes, source: source.into() }
    }

    /// Reads the KEK file `path`: exactly 32 bytes, readable by its owner only.
    pub fn from_file(path: &Path) -> Result<Self, KekFault> {
        Self::read(path, format!("file {}", path.display()), true)
    }

    /// Reads the systemd credential `name` (`$CREDENTIALS_DIRECTORY/<name>`, which systemd
    /// decrypts for `LoadCredentialEncrypted=`).
    pub fn from_credential(name: &str) -> Result<Self, KekFault> {
        let dir = std::env::var_os("CREDENTIALS_DIRECTORY")
            .ok_or_else(|| KekFault::NoCredentials { name: name.to_owned() })?;
        let path = Path::new(&dir).join(name);
        // systemd makes the credential readable by the service only, in a directory of its
        // own (the mode of the file itself is systemd's choice, not checked).
        Self::read(&path, format!("credential {name:?} ({})", path.display()), false)
    }

    fn read(path: &Path, source_name: String, check_mode: bool) -> Result<Self, KekFault> {
        let unreadable = |error| KekFault::Unreadable { source_name: source_name.clone(), error };
        let meta = std::fs::metadata(path).map_err(unreadable)?;
        let mode = meta.permissions().mode() & 0o777;
        if check_mode && mode & 0o077 != 0 {
            return Err(KekFault::Mode { source_name, mode });
        }
        let bytes = Zeroizing::new(std::fs::read(path).map_err(unreadable)?);
        let array: [u8; KEK_BYTES] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| KekFault::Length { source_name: source_name.clone(), len: bytes.len() })?;
        let kek = Self::from_bytes(array, source_name);
        Ok(kek)
    }

    /// Writes this KEK to a new file `path` (mode 0600, synced); never overwrites a file.
    pub fn write_new(&self, path: &Path) -> std::io::Result<()> {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
        file.write_all(&*self.bytes)?;
        file.sync_all()
    }

    /// Where the KEK came from (a file, a credential), for errors.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The keys the store uses, derived from this KEK (RFC 5869).
    pub(crate) fn derive(&self) -> Keys {
        let hkdf = Hkdf::<Sha256>::new(Some(b"qkd-store"), &*self.bytes);
        let mut check = [0u8; 32];
        let mut units = Zeroizing::new([0u8; 32]);
        // Invariant: 32 bytes is far below HKDF-SHA256's limit of 255 * 32.
        hkdf.expand(INFO_CHECK, &mut check).expect("32-byte HKDF output");
        hkdf.expand(INFO_UNITS, &mut *units).expect("32-byte HKDF output");
        Keys { check, units, source: self.source.clone() }
    }
}

/// What the store keeps of its KEK: the check value and the unit root key (wiped on drop).
pub(crate) struct Keys {
    check: [u8; 32],
    units: Zeroizing<[u8; 32]>,
    /// Where the KEK came from.
    pub(crate) source: String,
}

impl Keys {
    /// The data key of the unit in `slot` whose secret is `secret`.
    fn data_key(&self, slot: u32, secret: &[u8; SLOT_BYTES]) -> Zeroizing<[u8; 32]> {
        let hkdf = Hkdf::<Sha256>::new(Some(&*self.units), secret);
        let mut info = [0u8; 20];
        info[..16].copy_from_slice(b"qkd-store v1 dk ");
        info[16..].copy_from_slice(&slot.to_le_bytes());
        let mut key = Zeroizing::new([0u8; 32]);
        hkdf.expand(&info, &mut *key).expect("32-byte HKDF output");
        key
    }

    /// Seals `plain` under the secret of `slot` (see the module documentation); the record
    /// `id` and its block (`block`, for units) are bound as associated data.
    pub(crate) fn seal(
        &self,
        slot: &Slot,
        kind: Kind,
        id: Uuid,
        block: Option<Uuid>,
        plain: &[u8],
    ) -> Zeroizing<Vec<u8>> {
        let key = self.data_key(slot.index, &slot.secret);
        let cipher = ChaCha20Poly1305::new(Key::from_slice(&*key));
        let mut nonce = [0u8; 12];
        OsRng.fill_bytes(&mut nonce);
        let aad = associated_data(kind, id, block, slot.index);
        // Invariant: ChaCha20-Poly1305 encrypts any message shorter than 256 GB.
        let sealed =
            cipher.encrypt(Nonce::from_slice(&nonce), Payload { msg: plain, aad: &aad }).expect("AEAD encryption");
        let mut out = Zeroizing::new(Vec::with_capacity(SEAL_OVERHEAD + plain.len()));
        out.extend_from_slice(&slot.index.to_le_bytes());
        out.extend_from_slice(&slot_tag(&slot.secret));
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        out
    }

    /// Whether the slot of a sealed record was erased (zero, or reused: its tag differs); reads
    /// the slot, no cryptography but one hash.
    pub(crate) fn is_erased(slots: &Slots, sealed: &[u8]) -> std::io::Result<bool> {
        let Some(index) = sealed_slot(sealed) else {
            return Ok(false);
        };
        Ok(match slots.read(index)? {
            None => true,
            Some(secret) => sealed[4..4 + TAG_LEN] != slot_tag(&secret),
        })
    }

    /// Opens a sealed record with the secret its slot holds now.
    pub(crate) fn open(
        &self,
        slots: &Slots,
        kind: Kind,
        id: Uuid,
        block: Option<Uuid>,
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, Unseal> {
        let index = sealed_slot(sealed).ok_or_else(|| Unseal::Damaged("the sealed key is truncated".into()))?;
        let secret = slots.read(index).map_err(|e| Unseal::Io(e.to_string()))?;
        let Some(secret) = secret else {
            return Err(Unseal::Erased);
        };
        if sealed[4..4 + TAG_LEN] != slot_tag(&secret) {
            return Err(Unseal::Erased);
        }
        let key = self.data_key(index, &secret);
        let cipher = ChaCha20Poly1305::new(Key::from_slice(&*key));
        let aad = associated_data(kind, id, block, index);
        let nonce = &sealed[4 + TAG_LEN..4 + TAG_LEN + 12];
        cipher
            .decrypt(Nonce::from_slice(nonce), Payload { msg: &sealed[4 + TAG_LEN + 12..], aad: &aad })
            .map(Zeroizing::new)
            .map_err(|_| {
                Unseal::Damaged("the sealed key does not authenticate (altered, or moved from another record)".into())
            })
    }
}

/// Why a sealed record could not be opened.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Unseal {
    /// Its slot was erased (zero, or reused by another unit): the unit was delivered or
    /// discarded, and its record's removal was lost by a crash.
    Erased,
    /// The record is damaged or was moved.
    Damaged(String),
    /// The slot file could not be read.
    Io(String),
}

impl std::fmt::Display for Unseal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unseal::Erased => f.write_str("its slot was erased (the unit was delivered or discarded)"),
            Unseal::Damaged(detail) => f.write_str(detail),
            Unseal::Io(detail) => write!(f, "its slot cannot be read: {detail}"),
        }
    }
}

/// The slot a sealed record names, if it is long enough to be one.
pub(crate) fn sealed_slot(sealed: &[u8]) -> Option<u32> {
    (sealed.len() >= SEAL_OVERHEAD).then(|| u32::from_le_bytes([sealed[0], sealed[1], sealed[2], sealed[3]]))
}

/// Key bytes a sealed record of `len` bytes holds.
pub(crate) fn sealed_plain_len(len: usize) -> Option<usize> {
    len.checked_sub(SEAL_OVERHEAD)
}

fn associated_data(kind: Kind, id: Uuid, block: Option<Uuid>, slot: u32) -> [u8; 52] {
    let mut aad = [0u8; 52];
    aad[..15].copy_from_slice(b"qkd-store v1 u ");
    aad[14] = match kind {
        Kind::Unit => b'u',
        Kind::Reservation => b'r',
    };
    aad[16..32].copy_from_slice(id.as_bytes());
    aad[32..48].copy_from_slice(block.unwrap_or(Uuid::nil()).as_bytes());
    aad[48..].copy_from_slice(&slot.to_le_bytes());
    aad
}

/// A short public tag of a slot's secret (SHA-256, truncated): tells a record whose slot was
/// reused from a damaged one, and reveals nothing usable about the secret.
fn slot_tag(secret: &[u8; SLOT_BYTES]) -> [u8; TAG_LEN] {
    let digest = Sha256::new().chain_update(b"qkd-store v1 slot tag").chain_update(secret).finalize();
    let mut tag = [0u8; TAG_LEN];
    tag.copy_from_slice(&digest[..TAG_LEN]);
    tag
}

/// A slot just allocated: its number and its secret.
pub(crate) struct Slot {
    /// The slot's number.
    pub(crate) index: u32,
    secret: Zeroizing<[u8; SLOT_BYTES]>,
}

/// Where the slots live: a file (a store on disk) or memory (a temporary store).
enum Backing {
    File { file: File, path: PathBuf },
    Memory(Mutex<Vec<[u8; SLOT_BYTES]>>),
}

/// The slot file of an open store: per-unit secrets, overwritten in place (see the module
/// documentation).
pub(crate) struct Slots {
    backing: Backing,
    /// Free slots and the number of slots, once [`Slots::scrub`] has learnt them.
    state: Mutex<SlotState>,
    /// Erasures not yet synced.
    dirty: AtomicBool,
}

#[derive(Default)]
struct SlotState {
    /// Free slots (zero on disk).
    free: Vec<u32>,
    /// Slots in the file.
    len: u32,
}

impl Slots {
    /// Slots in memory (a temporary store).
    pub(crate) fn memory() -> Self {
        Self {
            backing: Backing::Memory(Mutex::new(Vec::new())),
            state: Mutex::default(),
            dirty: AtomicBool::new(false),
        }
    }

    /// Checks the KEK against the slot file of the store in `dir` without writing anything, and
    /// says whether the store exists: `Ok(true)` the KEK is the store's, `Ok(false)` there is no
    /// store yet. A wrong KEK, a damaged slot file or an old unsealed store is refused.
    pub(crate) fn check(dir: &Path, keys: &Keys) -> Result<bool, KekFault> {
        let path = dir.join(SLOTS_FILE);
        let io = |source| KekFault::Io { path: path.clone(), source };
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return if dir.join("db").exists() {
                    Err(KekFault::Unsealed { path: dir.to_owned() })
                } else {
                    Ok(false)
                };
            }
            Err(e) => return Err(io(e)),
        };
        let mut header = [0u8; HEADER_LEN as usize];
        if let Err(e) = file.read_exact_at(&mut header, 0) {
            return Err(if e.kind() == std::io::ErrorKind::UnexpectedEof {
                KekFault::SlotsDamaged { path, detail: "it is shorter than its header".into() }
            } else {
                io(e)
            });
        }
        if &header[..MAGIC.len()] != MAGIC || header[MAGIC.len()..MAGIC_LEN].iter().any(|b| *b != 0) {
            return Err(KekFault::SlotsDamaged { path, detail: "it does not start with its magic line".into() });
        }
        if !subtle_eq(&header[MAGIC_LEN..], &keys.check) {
            return Err(KekFault::WrongKek { kek: keys.source.clone(), store: dir.to_owned(), slots: path });
        }
        Ok(true)
    }

    /// Creates the slot file of a new store in `dir` (no slots yet): header written to a
    /// temporary file, synced, renamed.
    pub(crate) fn create(dir: &Path, keys: &Keys) -> Result<(), KekFault> {
        let path = dir.join(SLOTS_FILE);
        let io = |source| KekFault::Io { path: path.clone(), source };
        std::fs::create_dir_all(dir).map_err(io)?;
        let tmp = dir.join(format!("{SLOTS_FILE}.tmp"));
        let _ = std::fs::remove_file(&tmp);
        let file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).map_err(io)?;
        let mut header = [0u8; HEADER_LEN as usize];
        header[..MAGIC.len()].copy_from_slice(MAGIC);
        header[MAGIC_LEN..].copy_from_slice(&keys.check);
        file.write_all_at(&header, 0).map_err(io)?;
        file.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)?;
        File::open(dir).and_then(|d| d.sync_all()).map_err(io)
    }

    /// Opens the slot file of the store in `dir`, checking the KEK ([`Slots::check`]); read-only
    /// unless `write`.
    pub(crate) fn open(dir: &Path, keys: &Keys, write: bool) -> Result<Self, KekFault> {
        let path = dir.join(SLOTS_FILE);
        let io = |source| KekFault::Io { path: path.clone(), source };
        if !Self::check(dir, keys)? {
            return Err(KekFault::SlotsDamaged { path, detail: "it does not exist".into() });
        }
        let file = std::fs::OpenOptions::new().read(true).write(write).open(&path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len().saturating_sub(HEADER_LEN) / SLOT_BYTES as u64;
        let len = u32::try_from(len)
            .map_err(|_| KekFault::SlotsDamaged { path: path.clone(), detail: "it is too long".into() })?;
        Ok(Self {
            backing: Backing::File { file, path },
            state: Mutex::new(SlotState { free: Vec::new(), len }),
            dirty: AtomicBool::new(false),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The file, for errors.
    pub(crate) fn path(&self) -> &Path {
        match &self.backing {
            Backing::File { path, .. } => path,
            Backing::Memory(_) => Path::new("(memory)"),
        }
    }

    /// The secret in `index`, `None` when the slot is free (zero) or beyond the file's end.
    pub(crate) fn read(&self, index: u32) -> std::io::Result<Option<Zeroizing<[u8; SLOT_BYTES]>>> {
        let mut secret = Zeroizing::new([0u8; SLOT_BYTES]);
        match &self.backing {
            Backing::File { file, .. } => match file.read_exact_at(&mut *secret, offset(index)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
                Err(e) => return Err(e),
            },
            Backing::Memory(slots) => {
                match slots.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(index as usize) {
                    Some(s) => secret.copy_from_slice(s),
                    None => return Ok(None),
                }
            }
        }
        Ok((secret.iter().any(|b| *b != 0)).then_some(secret))
    }

    fn write(&self, index: u32, bytes: &[u8; SLOT_BYTES]) -> std::io::Result<()> {
        match &self.backing {
            Backing::File { file, .. } => file.write_all_at(bytes, offset(index)),
            Backing::Memory(slots) => {
                let mut slots = slots.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                if slots.len() <= index as usize {
                    slots.resize(index as usize + 1, [0; SLOT_BYTES]);
                }
                slots[index as usize] = *bytes;
                Ok(())
            }
        }
    }

    /// Takes `n` free slots and writes a fresh secret into each; not synced (see
    /// [`Slots::sync`], which must run before any record naming them is written).
    pub(crate) fn allocate(&self, n: usize) -> std::io::Result<Vec<Slot>> {
        let mut out = Vec::with_capacity(n);
        let mut state = self.state();
        for _ in 0..n {
            let index = match state.free.pop() {
                Some(index) => index,
                None => {
                    let index = state.len;
                    state.len = state.len.checked_add(1).ok_or_else(|| std::io::Error::other("slot file full"))?;
                    index
                }
            };
            let mut secret = Zeroizing::new([0u8; SLOT_BYTES]);
            while secret.iter().all(|b| *b == 0) {
                OsRng.fill_bytes(&mut *secret);
            }
            if let Err(e) = self.write(index, &secret) {
                state.free.push(index);
                // Slots already written are erased by the caller's error path or at the next open.
                return Err(e);
            }
            out.push(Slot { index, secret });
        }
        Ok(out)
    }

    /// Overwrites the given slots with zeros and frees them; not synced until [`Slots::sync`]
    /// (or the next flush of the store). Erasure comes after the records naming them are
    /// removed.
    pub(crate) fn erase(&self, indices: impl IntoIterator<Item = u32>) -> std::io::Result<()> {
        let mut state = self.state();
        for index in indices {
            if index >= state.len {
                continue;
            }
            self.write(index, &[0u8; SLOT_BYTES])?;
            self.dirty.store(true, Ordering::Release);
            state.free.push(index);
        }
        Ok(())
    }

    /// Makes every slot write so far durable (fdatasync).
    pub(crate) fn sync(&self) -> std::io::Result<()> {
        self.dirty.store(false, Ordering::Release);
        match &self.backing {
            Backing::File { file, .. } => file.sync_data(),
            Backing::Memory(_) => Ok(()),
        }
    }

    /// Syncs if an erasure is not durable yet.
    pub(crate) fn sync_if_dirty(&self) -> std::io::Result<()> {
        if self.dirty.load(Ordering::Acquire) { self.sync() } else { Ok(()) }
    }

    /// At open, once recovery has removed the records of erased units: zeroes every slot that
    /// no record in `used` names (secrets a crash left behind), rebuilds the free list, and
    /// syncs. Returns how many slots were zeroed.
    pub(crate) fn scrub(&self, used: &HashSet<u32>) -> std::io::Result<u64> {
        let mut state = self.state();
        let mut free = Vec::new();
        let mut zeroed = 0;
        for index in (0..state.len).rev() {
            if used.contains(&index) {
                continue;
            }
            if self.read(index)?.is_some() {
                self.write(index, &[0u8; SLOT_BYTES])?;
                zeroed += 1;
            }
            free.push(index);
        }
        state.free = free;
        drop(state);
        self.sync()?;
        Ok(zeroed)
    }

    /// Slots holding a secret that no record in `used` names (for verification).
    pub(crate) fn unused_secrets(&self, used: &HashSet<u32>) -> std::io::Result<u64> {
        let len = self.state().len;
        let mut n = 0;
        for index in 0..len {
            if !used.contains(&index) && self.read(index)?.is_some() {
                n += 1;
            }
        }
        Ok(n)
    }
}

fn offset(index: u32) -> u64 {
    HEADER_LEN + u64::from(index) * SLOT_BYTES as u64
}

/// Constant-time comparison (the check value is not secret, but costs nothing to compare so).
fn subtle_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests;

/// The KEK of the crate's tests.
#[cfg(test)]
pub(crate) fn test_kek() -> Kek {
    Kek::from_bytes([0x4B; KEK_BYTES], "test KEK")
}
