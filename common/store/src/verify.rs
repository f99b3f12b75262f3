//! Verification of a key store: what [`crate::SledStore::open`] checks before a daemon may use
//! its store, and what `qkdctl store verify` ([`verify_dir`]) reports about a stopped one.
//!
//! The checks, in order (docs/store.md says what each finding means and what to do):
//! 1. **`conf`**, sled's configuration file: readable, its CRC-32 matching its contents, and
//!    parsing (sled itself only warns about a bad checksum, and reports a damaged file as "created
//!    using a sled version earlier than 0.29").
//! 2. **sled's checksums**: opening the database replays sled's log, whose every message carries
//!    a CRC-32 that sled checks; a mismatch, malformed data or a truncated file refuses the open.
//!    Reading every tree to its end then makes sled read (and check) every page.
//! 3. **the marker**: a store this version created, or first opened, holds a store ID both in a
//!    file beside sled's (`qkd-store.id`) and in a record inside the database. The file without
//!    the record means the database lost its contents (a data file truncated to its start, or
//!    replaced, which sled may open as an empty store without complaint).
//!
//!    **The flush counter**, beside it: every flush of the open store writes the next number of
//!    a counter into the database (a record in sled's default tree), flushes, and only then
//!    writes that number to a file (`qkd-store.flushes`). The file therefore never says more
//!    than the database holds on disk, unless the database lost writes that had reached the
//!    disk: sled replays the end of its log (what follows its last snapshot) up to the first
//!    message whose checksum fails and silently drops the rest, so a flipped byte there, or a
//!    truncated `db`, left a store that opened without an error and with fewer keys. The file's
//!    count above the database's reveals it. (The file is written without an fsync of its own:
//!    after a power cut it may be older than the database, which is harmless, or unreadable,
//!    which is a note and skips this check once.)
//! 4. **the trees**, each read to its end, stopping at the first error (sled's iterators repeat
//!    an error for ever):
//!    * `blocks`: every record decodes, is stored under its own block ID, lists each key ID
//!      once, and its `final_bits` is a whole number of bytes per unit;
//!    * every key ID a block record lists is in the right tree: all units of a pending block in
//!      `pending` and none in `ready`; units of a ready block in `ready` (or gone: served), and
//!      in `pending` only while a publish is unfinished (a finding after recovery);
//!    * `pending` and `ready`: every unit decodes, names a block that has a record in the right
//!      state and lists it (pending units without a record are left by an interrupted write
//!      until recovery removes them), has the size of its block's units (`final_bits` / units),
//!      and no unit is in both trees;
//!    * `kme_reservations` and `kme_cancelled`: every record decodes, a reserved key has the
//!      bytes its size says, names a master and at least one slave that has not fetched it yet,
//!      and no key ID is both reserved and cancelled.
//!
//! A [`Verification`] lists *problems* (damage: the daemon refuses to start) and *notes*
//! (states a crash leaves, which the next start settles, or harmless oddities).

use std::collections::{HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};

use uuid::Uuid;

use crate::custody::{Kek, Kind, Slots, Unseal};
use crate::fault::{StoreFault, classify, locate, sled_at};
use crate::{BlockState, StoreError, Trees, decode_block, decode_key, kme, open_db, unit_len, until_error};

/// sled's configuration file in a store's directory.
pub(crate) const CONF_FILE: &str = "conf";

/// The file holding the store's ID beside sled's files (see "the marker" above).
pub const MARKER_FILE: &str = "qkd-store.id";

/// The key of the record holding the store's ID, in sled's default tree.
pub(crate) const MARKER_KEY: &[u8] = b"qkd-store-id";

/// What the marker file starts with, before the store ID.
const MARKER_PREFIX: &str = "qkd key store ";

/// The file holding the number of the last flush of the store that succeeded (see "the flush
/// counter" above).
pub const FLUSHES_FILE: &str = "qkd-store.flushes";

/// The key of the flush counter's record, in sled's default tree (a u64, little-endian).
pub(crate) const FLUSHES_KEY: &[u8] = b"qkd-store-flushes";

/// What the flush counter file starts with, before the number.
const FLUSHES_PREFIX: &str = "qkd key store flushes ";

/// At most this many problems are listed; the others are counted in [`Verification::omitted`].
const MAX_PROBLEMS: usize = 1000;

/// The trees this version of the store uses (and sled's default tree).
const KNOWN_TREES: [&str; 6] =
    ["__sled__default", "blocks", "ready", "pending", kme::RESERVATIONS_TREE, kme::CANCELLED_TREE];

/// One problem verification found: where, and what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// What holds it: "tree `ready`", "file conf", "marker", "database".
    pub place: String,
    /// The record's key (a UUID, or hex), when one record is at fault.
    pub key: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.key {
            Some(key) => write!(f, "{}, key {}: {}", self.place, key, self.message),
            None => write!(f, "{}: {}", self.place, self.message),
        }
    }
}

/// What a store holds, as counted by verification.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoreCounts {
    /// Block records in the ready state.
    pub ready_blocks: u64,
    /// Block records in the pending state.
    pub pending_blocks: u64,
    /// Units in the `ready` tree (servable).
    pub ready_units: u64,
    /// Units in the `pending` tree.
    pub pending_units: u64,
    /// The KME's reservations.
    pub reservations: u64,
    /// The KME's cancellation tombstones.
    pub tombstones: u64,
}

/// The outcome of verifying a store.
#[derive(Debug)]
pub struct Verification {
    /// The store's directory.
    pub path: PathBuf,
    /// Whether the store could be read at all: `false` when it is locked by another process,
    /// absent, or an I/O error stopped the check (see `problems`).
    pub checked: bool,
    /// What is wrong (at most 1000; see `omitted`).
    pub problems: Vec<Problem>,
    /// Problems found beyond those listed.
    pub omitted: u64,
    /// Findings that are not damage: states a crash leaves, which the next start settles.
    pub notes: Vec<String>,
    /// Whether the trees were read (the database opened); `counts` is meaningful only then.
    pub trees_read: bool,
    /// What the store holds (as far as it could be read).
    pub counts: StoreCounts,
}

/// When a verification runs, which decides whether a crash's leftovers are problems.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Stage {
    /// Right after recovery, at open: no write is under way and recovery finished every
    /// interrupted one, so their leftovers are problems.
    Recovered,
    /// Before recovery (offline) or while the store is in use: leftovers are notes.
    AsFound,
}

impl Verification {
    pub(crate) fn new(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
            checked: true,
            problems: Vec::new(),
            omitted: 0,
            notes: Vec::new(),
            trees_read: false,
            counts: StoreCounts::default(),
        }
    }

    /// Whether the store was read and nothing is wrong with it.
    pub fn is_healthy(&self) -> bool {
        self.checked && self.problems.is_empty() && self.omitted == 0
    }

    /// The verification as JSON (`qkdctl store verify --json`).
    pub fn to_json(&self) -> serde_json::Value {
        let problems: Vec<_> = self
            .problems
            .iter()
            .map(|p| serde_json::json!({ "place": p.place, "key": p.key, "message": p.message, "text": p.to_string() }))
            .collect();
        let c = &self.counts;
        serde_json::json!({
            "path": self.path.display().to_string(),
            "healthy": self.is_healthy(),
            "checked": self.checked,
            "problems": problems,
            "omitted_problems": self.omitted,
            "notes": self.notes,
            "counts": self.trees_read.then(|| serde_json::json!({
                "ready_blocks": c.ready_blocks,
                "pending_blocks": c.pending_blocks,
                "ready_units": c.ready_units,
                "pending_units": c.pending_units,
                "reservations": c.reservations,
                "tombstones": c.tombstones,
            })),
        })
    }

    pub(crate) fn problem(&mut self, place: impl Into<String>, key: Option<String>, message: impl Into<String>) {
        if self.problems.len() < MAX_PROBLEMS {
            self.problems.push(Problem { place: place.into(), key, message: message.into() });
        } else {
            self.omitted += 1;
        }
    }

    /// A problem that made the store impossible to check at all.
    fn blocked(&mut self, place: &str, message: String) {
        self.checked = false;
        self.problem(place, None, message);
    }
}

/// Verifies the stopped store in `dir` (`qkdctl store verify`): every check of the module
/// documentation, without recovery (so a crash's leftovers are notes) and without changing a
/// record. Opening the database lets sled replay its log, as any open does.
///
/// The KEK is checked first, as at open (a wrong one stops the check before anything is
/// opened); every sealed unit and reservation is then opened with it, so that verification
/// also proves that every key can be served.
pub fn verify_dir(dir: &Path, kek: &Kek) -> Verification {
    let mut v = Verification::new(dir);
    if !dir.join("db").is_file() {
        v.blocked("database", format!("{} holds no key store (no sled data file `db`)", dir.display()));
        return v;
    }
    let keys = std::sync::Arc::new(kek.derive());
    let slots = match Slots::open(dir, &keys, false) {
        Ok(slots) => slots,
        Err(fault) => {
            match fault {
                crate::KekFault::SlotsDamaged { .. } => {
                    v.problem(format!("file {}", crate::SLOTS_FILE), None, fault.to_string())
                }
                _ => v.blocked("key-encryption key", fault.to_string()),
            }
            return v;
        }
    };
    match check_conf(dir) {
        Ok(notes) => v.notes.extend(notes),
        Err(fault) => {
            v.problem("file conf", None, fault.to_string());
            return v;
        }
    }
    let db = match open_db(dir, &mut v.notes) {
        Ok(db) => db,
        Err(e) => {
            let fault = classify(e, dir, Some("opening the database".into()));
            match fault {
                StoreFault::Damaged { .. } | StoreFault::ConfDamaged { .. } => {
                    v.problem("database", None, fault.to_string())
                }
                _ => v.blocked("database", fault.to_string()),
            }
            return v;
        }
    };
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| -> Result<(), StoreError> {
        let trees = Trees::new(db, keys, slots)?;
        check_marker(&trees, dir, false, &mut v)?;
        check_flushes(&trees, dir, false, &mut v)?;
        trees.check(Stage::AsFound, &mut v)
    }));
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(e)) => v.blocked("database", locate(e, dir).to_string()),
        Err(panic) => v.problem("database", None, panicked(&panic)),
    }
    v
}

/// What to say when sled panicked reading a store (it does on some damaged trees, after a
/// million turns of a traversal loop).
pub(crate) fn panicked(panic: &(dyn std::any::Any + Send)) -> String {
    let message = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("no message");
    format!("sled panicked while reading the store ({message}): its data is damaged")
}

/// Checks sled's `conf` file (check 1 of the module documentation). Returns notes; a damaged or
/// unreadable file is a [`StoreFault::ConfDamaged`]. An absent file is fine (sled writes it).
pub(crate) fn check_conf(dir: &Path) -> Result<Vec<String>, StoreFault> {
    let path = dir.join(CONF_FILE);
    let damaged = |detail: String| StoreFault::ConfDamaged { path: path.clone(), detail };
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(damaged(format!("it cannot be read: {e}"))),
    };
    // sled ignores a file of 8 bytes or less (it rewrites it): a crash while sled first wrote it.
    if bytes.len() <= 8 {
        return Ok(vec![format!(
            "{} holds only {} bytes; sled rewrites it with its settings when the store is opened",
            path.display(),
            bytes.len()
        )]);
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    let stored = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
    if crc32(body) != stored {
        return Err(damaged("its checksum does not match its contents".into()));
    }
    let text = std::str::from_utf8(body).map_err(|_| damaged("it is not valid UTF-8".into()))?;
    let mut seen = HashSet::new();
    for line in text.lines() {
        let Some((key, value)) = line.split_once(": ") else {
            return Err(damaged(format!("line {line:?} is not `key: value`")));
        };
        let valid = match key {
            "segment_size" => value.parse::<usize>().is_ok(),
            "use_compression" => value.parse::<bool>().is_ok(),
            "version" => {
                value.split_once('.').is_some_and(|(a, b)| a.parse::<u32>().is_ok() && b.parse::<u32>().is_ok())
            }
            _ => true,
        };
        if !valid {
            return Err(damaged(format!("{key} has the value {value:?}")));
        }
        seen.insert(key);
    }
    for key in ["segment_size", "use_compression", "version"] {
        if !seen.contains(key) {
            return Err(damaged(format!("it has no {key}")));
        }
    }
    Ok(Vec::new())
}

/// CRC-32 (IEEE 802.3, the one sled uses), bit by bit: `conf` is a few dozen bytes.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xEDB8_8320 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

/// Checks the marker (check 3 of the module documentation). With `repair` (at open), a store
/// without one gets one (a new store, or one made by an earlier version), and a lost file is
/// written again from the record.
pub(crate) fn check_marker(trees: &Trees, dir: &Path, repair: bool, v: &mut Verification) -> Result<(), StoreError> {
    let file_path = dir.join(MARKER_FILE);
    let file = match std::fs::read_to_string(&file_path) {
        Ok(text) => match text.trim_end().strip_prefix(MARKER_PREFIX).and_then(|id| Uuid::parse_str(id).ok()) {
            Some(id) => Some(id),
            None => {
                v.problem("marker", None, format!("{} is damaged", file_path.display()));
                return Ok(());
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            v.problem("marker", None, format!("{} cannot be read: {e}", file_path.display()));
            return Ok(());
        }
    };
    let record = match trees.db.get(MARKER_KEY).map_err(|e| sled_at("reading the marker record", e))? {
        Some(bytes) => match Uuid::from_slice(&bytes) {
            Ok(id) => Some(id),
            Err(_) => {
                v.problem("marker", None, "the marker record in the database is damaged");
                return Ok(());
            }
        },
        None => None,
    };
    match (file, record) {
        (Some(file), Some(record)) if file == record => {}
        (Some(file), Some(record)) => v.problem(
            "marker",
            None,
            format!(
                "the database belongs to store {record}, but {} says this is store {file}: the data file was replaced",
                file_path.display()
            ),
        ),
        (Some(file), None) => v.problem(
            "marker",
            None,
            format!(
                "{} says store {file} was created here, but the database holds no marker record: it lost its \
                 contents (the data file was truncated, emptied or replaced)",
                file_path.display()
            ),
        ),
        (None, Some(record)) if repair => {
            write_marker_file(&file_path, record)?;
            v.notes.push(format!("{} was missing; written again from the database", file_path.display()));
        }
        (None, Some(_)) => {
            v.notes.push(format!("{} is missing; the next start writes it again", file_path.display()));
        }
        (None, None) if repair => {
            let id = Uuid::new_v4();
            trees.db.insert(MARKER_KEY, id.as_bytes()).map_err(|e| sled_at("writing the marker record", e))?;
            trees.db.flush().map_err(|e| sled_at("writing the marker record", e))?;
            write_marker_file(&file_path, id)?;
        }
        (None, None) => {
            v.notes.push("the store has no marker yet (made by an earlier version); the next start adds one".into())
        }
    }
    Ok(())
}

/// Checks the flush counter (see "the flush counter" in the module documentation): the count
/// in [`FLUSHES_FILE`] must not be above the database's. Returns the database's count (0 when
/// it has none), which the store continues from. With `repair` (at open), a missing or
/// unreadable file is written again from the database.
pub(crate) fn check_flushes(trees: &Trees, dir: &Path, repair: bool, v: &mut Verification) -> Result<u64, StoreError> {
    let path = dir.join(FLUSHES_FILE);
    let again = if repair { "it is written again" } else { "the next start writes it again" };
    // The file first: a flush under way (in a store in use) writes the database before the
    // file, so the database read next holds at least what the file says.
    let file = match std::fs::read_to_string(&path) {
        Ok(text) => match text.trim_end().strip_prefix(FLUSHES_PREFIX).and_then(|n| n.parse::<u64>().ok()) {
            Some(n) => Some(n),
            None => {
                v.notes.push(format!(
                    "{} is damaged (a power cut can leave it so); the check that the database kept its last writes \
                     was skipped, and {again}",
                    path.display()
                ));
                None
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            v.notes.push(format!(
                "{} cannot be read ({e}); the check that the database kept its last writes was skipped",
                path.display()
            ));
            return Ok(0);
        }
    };
    let record = trees.db.get(FLUSHES_KEY).map_err(|e| sled_at("reading the flush counter record", e))?;
    let in_db = match record.as_deref().map(<[u8; 8]>::try_from) {
        None => 0,
        Some(Ok(bytes)) => u64::from_le_bytes(bytes),
        Some(Err(_)) => {
            v.problem("database", None, "the flush counter record is damaged");
            return Ok(0);
        }
    };
    match file {
        Some(on_disk) if on_disk > in_db => v.problem(
            "database",
            None,
            format!(
                "the database is damaged: it lost writes that had reached the disk ({} counts {on_disk} flushes, \
                 the database only {in_db}; sled drops the end of its log from the first damaged message on, \
                 without an error)",
                path.display()
            ),
        ),
        Some(_) => {}
        None if record.is_none() => {}
        None if repair => {
            write_flushes_file(&path, in_db)
                .map_err(|e| sled_at(format!("writing {}", path.display()), sled::Error::Io(e)))?;
            if !v.notes.iter().any(|note| note.starts_with(&path.display().to_string())) {
                v.notes.push(format!("{} was missing; written again from the database", path.display()));
            }
        }
        None => {
            if !v.notes.iter().any(|note| note.starts_with(&path.display().to_string())) {
                v.notes.push(format!("{} is missing; {again}", path.display()));
            }
        }
    }
    Ok(in_db)
}

/// Writes the flush counter file: a temporary file renamed over it, so that a reader finds the
/// old count or the new one. No fsync (see "the flush counter" in the module documentation).
pub(crate) fn write_flushes_file(path: &Path, count: u64) -> std::io::Result<()> {
    let tmp = path.with_extension("flushes.tmp");
    std::fs::write(&tmp, format!("{FLUSHES_PREFIX}{count}\n"))?;
    std::fs::rename(&tmp, path)
}

/// Writes the marker file durably (a temporary file renamed over it).
fn write_marker_file(path: &Path, id: Uuid) -> Result<(), StoreError> {
    use std::io::Write;
    let io = |e: std::io::Error| sled_at(format!("writing {}", path.display()), sled::Error::Io(e));
    let tmp = path.with_extension("id.tmp");
    let mut file = std::fs::File::create(&tmp).map_err(io)?;
    file.write_all(format!("{MARKER_PREFIX}{id}\n").as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// A record's key as a problem names it: a UUID when it is 16 bytes, hex otherwise.
fn key_name(key: &[u8]) -> String {
    Uuid::from_slice(key).map(|id| id.to_string()).unwrap_or_else(|_| format!("0x{}", hex::encode(key)))
}

fn tree_place(name: &str) -> String {
    format!("tree `{name}`")
}

/// What verification learns about one block from its record.
struct BlockInfo {
    state: BlockState,
    /// Copies of its listed units found in `pending` or `ready` that name it.
    found: u64,
    /// Units in `pending` or `ready` that name it.
    claimed: u64,
}

/// Reads a tree to its end (stopping at the first error), calling `each` on every record. A sled
/// read error is a problem naming the last key read, except an I/O error, which stops the
/// verification (the store is failing, not damaged).
fn scan(
    tree: &sled::Tree,
    name: &str,
    v: &mut Verification,
    mut each: impl FnMut(&mut Verification, &[u8], &[u8]) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let mut last: Option<sled::IVec> = None;
    for item in until_error(tree.iter()) {
        match item {
            Ok((key, value)) => {
                each(v, &key, &value)?;
                last = Some(key);
            }
            Err(e) => {
                let after = last.as_deref().map(key_name);
                return read_error(v, name, after, e);
            }
        }
    }
    Ok(())
}

/// A sled read error: a problem (corruption), or the error (an I/O failure).
fn read_error(v: &mut Verification, tree: &str, after: Option<String>, e: sled::Error) -> Result<(), StoreError> {
    if let sled::Error::Io(_) = e {
        return Err(sled_at(format!("reading tree `{tree}`"), e));
    }
    let message = match &after {
        Some(_) => format!("the tree cannot be read past this key: {e}"),
        None => format!("the tree cannot be read: {e}"),
    };
    v.problem(tree_place(tree), after, message);
    Ok(())
}

/// Looks a key up in a tree; a read error becomes a problem (`None`) or the error.
fn lookup(tree: &sled::Tree, name: &str, key: &[u8], v: &mut Verification) -> Result<Option<sled::IVec>, StoreError> {
    match tree.get(key) {
        Ok(value) => Ok(value),
        Err(e) => {
            read_error(v, name, Some(key_name(key)), e)?;
            Ok(None)
        }
    }
}

impl Trees {
    /// Checks the trees (check 4 of the module documentation), adding problems, notes and counts
    /// to `v`. Fails only on an I/O error.
    pub(crate) fn check(&self, stage: Stage, v: &mut Verification) -> Result<(), StoreError> {
        v.trees_read = true;
        let mut blocks = self.check_blocks(stage, v)?;
        self.check_units(stage, v, &mut blocks)?;
        self.check_unlisted(v, &blocks)?;
        self.check_reservations(stage, v)?;
        let used = self.used_slots()?;
        let unused = self.slots.unused_secrets(&used).map_err(|e| self.slot_error(e))?;
        if unused > 0 {
            let finding = format!("{unused} slot(s) of {} hold a secret no record names", self.slots.path().display());
            match stage {
                Stage::Recovered => v.problem(format!("file {}", crate::SLOTS_FILE), None, finding),
                Stage::AsFound => v.notes.push(format!(
                    "{finding} (an erasure interrupted by a crash, or a write under way); the next start zeroes them"
                )),
            }
        }
        for name in self.db.tree_names() {
            if !KNOWN_TREES.iter().any(|known| known.as_bytes() == name.as_ref()) {
                v.notes.push(format!("tree {:?} is not used by this version", String::from_utf8_lossy(&name)));
            }
        }
        Ok(())
    }

    /// The `blocks` tree, and every key ID its records list.
    fn check_blocks(&self, stage: Stage, v: &mut Verification) -> Result<HashMap<Uuid, BlockInfo>, StoreError> {
        let mut blocks = HashMap::new();
        let place = tree_place("blocks");
        scan(&self.blocks, "blocks", v, |v, key, value| {
            let Ok(block_id) = Uuid::from_slice(key) else {
                v.problem(&place, Some(key_name(key)), "the key is not a block ID");
                return Ok(());
            };
            let (meta, state, key_ids) = match decode_block(value) {
                Ok(record) => record,
                Err(e) => {
                    v.problem(&place, Some(block_id.to_string()), format!("the record does not decode ({e})"));
                    return Ok(());
                }
            };
            let name = Some(block_id.to_string());
            if meta.block_id != block_id {
                v.problem(&place, name.clone(), format!("the record is block {}'s", meta.block_id));
            }
            match state {
                BlockState::Ready => v.counts.ready_blocks += 1,
                BlockState::Pending => v.counts.pending_blocks += 1,
            }
            let mut seen = HashSet::with_capacity(key_ids.len());
            let unique: Vec<Uuid> = key_ids.iter().copied().filter(|id| seen.insert(*id)).collect();
            if unique.len() != key_ids.len() {
                v.problem(
                    &place,
                    name.clone(),
                    format!("the record lists {} key IDs twice", key_ids.len() - unique.len()),
                );
            }
            let n = key_ids.len() as u64;
            let unit_len = if n == 0 {
                None
            } else if meta.final_bits.is_multiple_of(8 * n) {
                Some((meta.final_bits / 8 / n) as usize)
            } else {
                v.problem(
                    &place,
                    name.clone(),
                    format!("final_bits {} is not {n} units of whole bytes", meta.final_bits),
                );
                None
            };
            let mut info = BlockInfo { state, found: 0, claimed: 0 };
            let mut unpublished = 0u64;
            for key_id in &unique {
                let id = key_id.as_bytes();
                let in_pending = lookup(&self.pending, "pending", id, v)?;
                let in_ready = lookup(&self.ready, "ready", id, v)?;
                match state {
                    BlockState::Pending => {
                        if in_pending.is_none() {
                            v.problem(
                                &place,
                                name.clone(),
                                format!("unit {key_id} of this pending block is not in `pending`"),
                            );
                        }
                        if in_ready.is_some() {
                            v.problem(
                                tree_place("ready"),
                                Some(key_id.to_string()),
                                format!("the unit of pending block {block_id} is ready (servable before its block was committed)"),
                            );
                        }
                    }
                    BlockState::Ready if in_pending.is_some() => unpublished += 1,
                    BlockState::Ready => {}
                }
                for (tree, copy) in [("pending", &in_pending), ("ready", &in_ready)] {
                    // An undecodable unit is reported by the pass over its tree.
                    let Some(Ok((owner, _))) = copy.as_ref().map(|value| decode_key(value)) else {
                        continue;
                    };
                    let n_bytes = copy.as_deref().and_then(crate::unit_len).unwrap_or(0);
                    if owner != block_id {
                        v.problem(
                            tree_place(tree),
                            Some(key_id.to_string()),
                            format!("the unit block {block_id} lists names block {owner}"),
                        );
                        continue;
                    }
                    info.found += 1;
                    if let Some(len) = unit_len.filter(|len| *len != n_bytes) {
                        v.problem(
                            tree_place(tree),
                            Some(key_id.to_string()),
                            format!("the unit holds {n_bytes} bytes; block {block_id}'s units hold {len}"),
                        );
                    }
                }
            }
            if unpublished > 0 {
                let finding = format!("{unpublished} units of this ready block are still in `pending` (not published)");
                match stage {
                    Stage::Recovered => v.problem(&place, name, finding),
                    Stage::AsFound => v.notes.push(format!(
                        "block {block_id}: {finding}; an interrupted publish, which the next start finishes"
                    )),
                }
            }
            blocks.insert(block_id, info);
            Ok(())
        })?;
        Ok(blocks)
    }

    /// The `pending` and `ready` trees, unit by unit.
    fn check_units(
        &self,
        stage: Stage,
        v: &mut Verification,
        blocks: &mut HashMap<Uuid, BlockInfo>,
    ) -> Result<(), StoreError> {
        let mut unrecorded: HashMap<Uuid, u64> = HashMap::new();
        let place = tree_place("pending");
        scan(&self.pending, "pending", v, |v, key, value| {
            v.counts.pending_units += 1;
            let Some(owner) = check_unit(v, &place, key, value) else {
                return Ok(());
            };
            self.check_seal(v, stage, "pending", key, value)?;
            match blocks.get_mut(&owner) {
                Some(info) => info.claimed += 1,
                None => *unrecorded.entry(owner).or_default() += 1,
            }
            match self.ready.contains_key(key) {
                Ok(true) => v.problem(&place, Some(key_name(key)), "the unit is both pending and ready"),
                Ok(false) => {}
                Err(e) => read_error(v, "ready", Some(key_name(key)), e)?,
            }
            Ok(())
        })?;
        let mut unrecorded: Vec<_> = unrecorded.into_iter().collect();
        unrecorded.sort();
        for (owner, n) in unrecorded {
            let finding = format!("{n} units name block {owner}, which has no record");
            match stage {
                Stage::Recovered => v.problem(&place, None, finding),
                Stage::AsFound => v.notes.push(format!(
                    "tree `pending`: {finding} (a block write or drop was interrupted); the next start removes them"
                )),
            }
        }
        let place = tree_place("ready");
        scan(&self.ready, "ready", v, |v, key, value| {
            v.counts.ready_units += 1;
            let Some(owner) = check_unit(v, &place, key, value) else {
                return Ok(());
            };
            self.check_seal(v, stage, "ready", key, value)?;
            match blocks.get_mut(&owner) {
                None => {
                    v.problem(&place, Some(key_name(key)), format!("the unit names block {owner}, which has no record"))
                }
                Some(info) => {
                    info.claimed += 1;
                    if info.state == BlockState::Pending {
                        v.problem(&place, Some(key_name(key)), format!("the unit belongs to pending block {owner}"));
                    }
                }
            }
            Ok(())
        })
    }

    /// Units that name a block whose record does not list them: found by counting in the passes
    /// above, named here by a second pass over the units of those blocks only.
    fn check_unlisted(&self, v: &mut Verification, blocks: &HashMap<Uuid, BlockInfo>) -> Result<(), StoreError> {
        let mut listed: HashMap<Uuid, HashSet<Uuid>> = HashMap::new();
        for (block_id, _) in blocks.iter().filter(|(_, info)| info.claimed > info.found) {
            let record = self.blocks.get(block_id.as_bytes()).map_err(|e| sled_at("reading tree `blocks`", e))?;
            if let Some(Ok((_, _, key_ids))) = record.map(|value| decode_block(&value)) {
                listed.insert(*block_id, key_ids.into_iter().collect());
            }
        }
        if listed.is_empty() {
            return Ok(());
        }
        for (tree, name) in [(&self.pending, "pending"), (&self.ready, "ready")] {
            scan(tree, name, v, |v, key, value| {
                let (Ok(key_id), Ok((owner, _))) = (Uuid::from_slice(key), decode_key(value)) else {
                    return Ok(());
                };
                if listed.get(&owner).is_some_and(|ids| !ids.contains(&key_id)) {
                    v.problem(
                        tree_place(name),
                        Some(key_id.to_string()),
                        format!("the unit names block {owner}, whose record does not list it"),
                    );
                }
                Ok(())
            })?;
        }
        Ok(())
    }

    /// The KME's trees.
    fn check_reservations(&self, stage: Stage, v: &mut Verification) -> Result<(), StoreError> {
        let place = tree_place(kme::RESERVATIONS_TREE);
        scan(&self.reserved, kme::RESERVATIONS_TREE, v, |v, key, value| {
            v.counts.reservations += 1;
            let name = Some(key_name(key));
            if key.len() != 16 {
                v.problem(&place, name.clone(), "the key is not a key ID");
            }
            if let Err(problem) = kme::check_reservation(value) {
                v.problem(&place, name.clone(), problem);
            } else {
                self.check_seal(v, stage, kme::RESERVATIONS_TREE, key, value)?;
            }
            match self.cancelled.contains_key(key) {
                Ok(true) => v.problem(&place, name, "the key is both reserved and cancelled"),
                Ok(false) => {}
                Err(e) => read_error(v, kme::CANCELLED_TREE, name, e)?,
            }
            Ok(())
        })?;
        let place = tree_place(kme::CANCELLED_TREE);
        scan(&self.cancelled, kme::CANCELLED_TREE, v, |v, key, value| {
            v.counts.tombstones += 1;
            if key.len() != 16 {
                v.problem(&place, Some(key_name(key)), "the key is not a key ID");
            }
            if let Err(e) = kme::decode_tombstone(value) {
                v.problem(&place, Some(key_name(key)), e.to_string());
            }
            Ok(())
        })
    }
}

impl Trees {
    /// Opens the sealed key of a record of `tree` (a unit, or a reservation) with the KEK: a
    /// record whose slot was erased is a crash's leftover (removed at the next start) in
    /// `ready` and the reservations, damage in `pending`; one that does not authenticate is
    /// damage.
    fn check_seal(
        &self,
        v: &mut Verification,
        stage: Stage,
        tree: &str,
        key: &[u8],
        value: &[u8],
    ) -> Result<(), StoreError> {
        let Ok(id) = Uuid::from_slice(key) else {
            return Ok(());
        };
        let opened = if tree == kme::RESERVATIONS_TREE {
            let Ok(sealed) = kme::reservation_sealed(value) else {
                return Ok(());
            };
            self.keys.open(&self.slots, Kind::Reservation, id, None, &sealed).map(drop)
        } else {
            let Ok((block, sealed)) = decode_key(value) else {
                return Ok(());
            };
            self.keys.open(&self.slots, Kind::Unit, id, Some(block), sealed).map(drop)
        };
        match opened {
            Ok(()) => {}
            Err(Unseal::Io(detail)) => {
                return Err(self.slot_error(std::io::Error::other(detail)));
            }
            Err(Unseal::Erased) if tree != "pending" && stage == Stage::AsFound => v.notes.push(format!(
                "tree `{tree}`, key {id}: its slot was erased (delivered or discarded before a crash that lost the \
                 record's removal); the next start removes it"
            )),
            Err(e) => {
                v.problem(tree_place(tree), Some(id.to_string()), format!("the sealed key cannot be opened: {e}"))
            }
        }
        Ok(())
    }
}

/// Checks one unit record of `pending` or `ready`; returns the block it names if it decodes.
fn check_unit(v: &mut Verification, place: &str, key: &[u8], value: &[u8]) -> Option<Uuid> {
    if key.len() != 16 {
        v.problem(place, Some(key_name(key)), "the key is not a key ID");
        return None;
    }
    match decode_key(value) {
        Ok(_) if unit_len(value) == Some(0) => {
            v.problem(place, Some(key_name(key)), "the unit holds no key bytes");
            None
        }
        Ok((owner, _)) => Some(owner),
        Err(e) => {
            v.problem(place, Some(key_name(key)), format!("the unit record does not decode ({e})"));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_is_sleds() {
        // The check value of CRC-32/ISO-HDLC, which crc32fast (sled's) computes.
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn a_conf_file_is_checked_like_sled_would_and_then_some() {
        let dir = std::env::temp_dir().join(format!("qkd-conf-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let body = b"segment_size: 524288\nuse_compression: false\nversion: 0.34\n".to_vec();
        let with_crc = |body: &[u8]| [body, &crc32(body).to_le_bytes()].concat();
        std::fs::write(dir.join(CONF_FILE), with_crc(&body)).unwrap();
        assert!(check_conf(&dir).unwrap().is_empty());
        // A flipped byte: the checksum no longer matches.
        let mut flipped = with_crc(&body);
        flipped[3] ^= 0x80;
        std::fs::write(dir.join(CONF_FILE), &flipped).unwrap();
        let message = check_conf(&dir).unwrap_err().to_string();
        assert!(message.contains("checksum does not match"), "{message}");
        assert!(!message.contains("0.29"), "{message}");
        // Right checksum, wrong contents.
        std::fs::write(dir.join(CONF_FILE), with_crc(b"segment_size: many\nuse_compression: false\nversion: 0.34\n"))
            .unwrap();
        assert!(check_conf(&dir).unwrap_err().to_string().contains("segment_size"));
        // A file sled rewrites.
        std::fs::write(dir.join(CONF_FILE), b"seg").unwrap();
        assert_eq!(check_conf(&dir).unwrap().len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
