//! The daemons' authentication key pool ([`qkd_core::auth::AuthPool`]) on disk, in
//! `<data_dir>/auth/`:
//! * `pool`: the stream of secret bits: the pre-shared secret, then each committed block's
//!   refill and each later secret, appended in the order both ends agree on; only the first
//!   `pool_bytes` (of `state.json`) count, so a crash during an append leaves no half refill;
//! * `state.json`: the watermark, the current hash key's position, `pool_bytes`, the secrets
//!   applied (ID, position, length), the last refill appended, and whether the pool holds only
//!   the public placeholder (replaced atomically: written, synced, renamed, directory synced);
//! * `staged/<block id>`: refills of blocks not settled yet (synced);
//! * `secrets/<secret id>`: secrets installed by `qkdctl auth-secret install` and not yet
//!   applied (StartBlock applies a secret once both ends hold it);
//! * `log`: one JSON line per event (pad and hash key handed out, watermark moved, refill or
//!   secret appended), synced before the bits are used, never the bits themselves: the record
//!   that no pad bit was used twice, across crashes;
//! * `lock`: held (flock) by the process that has the pool open.
//!
//! Every change is on disk when the method returns, so a pad bit is marked spent before it is
//! used and no crash ever makes this end use it again.
//!
//! A node started without a `pool` file creates one from a PUBLIC placeholder secret and logs a
//! warning at every start: its Wegman-Carter tags then protect nothing beyond mutual TLS. The
//! first secret applied to such a pool skips what is left of the placeholder.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use qkd_core::auth::{AppliedSecret, AuthPool, AuthPoolError, AuthState, HASH_KEY_BITS, TAG_BYTES};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use uuid::Uuid;
use zeroize::Zeroizing;

/// Bytes of the placeholder secret (and of the secrets `qkdctl auth-secret new` makes by default).
pub const DEFAULT_SECRET_BYTES: usize = 1 << 16;

/// The public seed of the placeholder secret: known to everyone, so it authenticates nothing.
const PLACEHOLDER_SEED: [u8; 32] = *b"qkd public placeholder auth pool";

/// First bytes of a secret file made by `qkdctl auth-secret new`.
const SECRET_MAGIC: &[u8; 8] = b"QKDPSK01";

/// A pre-shared secret as `qkdctl auth-secret new` writes it: the magic, a random ID (16 bytes),
/// then the secret bits. The ID names the secret in logs and on the wire; it is not derived
/// from the secret.
pub struct SecretFile {
    /// The secret's ID.
    pub id: Uuid,
    /// The secret bits.
    pub bytes: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for SecretFile {
    /// The ID and the length, never the bits.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretFile").field("id", &self.id).field("bytes", &self.bytes.len()).finish()
    }
}

impl SecretFile {
    /// A fresh secret of `n_bytes` bytes from the OS's random source.
    pub fn generate(n_bytes: usize) -> Self {
        let mut bytes = Zeroizing::new(vec![0u8; n_bytes]);
        rand::rng().fill_bytes(&mut bytes);
        Self { id: Uuid::new_v4(), bytes }
    }

    /// The file's contents.
    pub fn encode(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::with_capacity(24 + self.bytes.len()));
        out.extend_from_slice(SECRET_MAGIC);
        out.extend_from_slice(self.id.as_bytes());
        out.extend_from_slice(&self.bytes);
        out
    }

    /// Reads a secret file, refusing anything else with the reason.
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let data = Zeroizing::new(fs::read(path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?);
        if data.len() < 24 || &data[..8] != SECRET_MAGIC {
            anyhow::bail!("{} is not a pre-shared secret made by `qkdctl auth-secret new`", path.display());
        }
        let n = data.len() - 24;
        if n < 2 * TAG_BYTES || !n.is_multiple_of(TAG_BYTES) {
            anyhow::bail!("{}: a secret must hold a multiple of 16 bytes, at least 32; it holds {n}", path.display());
        }
        let id = Uuid::from_slice(&data[8..24]).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Ok(Self { id, bytes: Zeroizing::new(data[24..].to_vec()) })
    }
}

#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
struct Persisted {
    state: AuthState,
    pool_bytes: u64,
    last_appended: Option<Uuid>,
    #[serde(default)]
    applied: Vec<AppliedSecret>,
    #[serde(default)]
    placeholder: bool,
}

/// The file-backed pool of one node.
pub struct FileAuthPool {
    dir: PathBuf,
    inner: Mutex<Persisted>,
    /// The open lock file (flock held while the pool is open).
    _lock: File,
}

fn backend(what: &str, path: &Path, e: std::io::Error) -> AuthPoolError {
    AuthPoolError::Backend(format!("{what} {}: {e}", path.display()))
}

fn sync_dir(dir: &Path) -> Result<(), AuthPoolError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| backend("syncing", dir, e))
}

/// Writes `name` in `dir` atomically and durably, mode 0600.
fn write_synced(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), AuthPoolError> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = dir.join(format!(".{name}.tmp"));
    let path = dir.join(name);
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| backend("creating", &tmp, e))?;
    file.write_all(bytes).and_then(|()| file.sync_all()).map_err(|e| backend("writing", &tmp, e))?;
    fs::rename(&tmp, &path).map_err(|e| backend("renaming", &path, e))?;
    sync_dir(dir)
}

fn list_ids(dir: &Path) -> Result<Vec<Uuid>, AuthPoolError> {
    let mut ids = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| backend("listing", dir, e))? {
        let entry = entry.map_err(|e| backend("listing", dir, e))?;
        if let Some(id) = entry.file_name().to_str().and_then(|n| Uuid::parse_str(n).ok()) {
            ids.push(id);
        }
    }
    ids.sort();
    Ok(ids)
}

/// One line of the pool's log.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum LogEvent {
    /// Pad bits handed out for a tag (after the watermark moved past them).
    Pad {
        /// First bit.
        offset: u64,
        /// Number of bits.
        bits: u64,
    },
    /// A hash key handed out (recycled across blocks until an authentication fails).
    HashKey {
        /// First bit.
        offset: u64,
    },
    /// The watermark moved.
    Watermark {
        /// Before.
        from: u64,
        /// After.
        to: u64,
    },
    /// A block's refill appended.
    Refill {
        /// The block.
        block: Uuid,
        /// First bit.
        position: u64,
        /// Number of bits.
        bits: u64,
    },
    /// A pre-shared secret appended.
    Secret {
        /// The secret.
        id: Uuid,
        /// First bit.
        position: u64,
        /// Number of bits.
        bits: u64,
    },
}

/// Reads a pool's log (`<dir>/log`); a torn last line (a crash while appending) is skipped.
pub fn read_log(dir: &Path) -> anyhow::Result<Vec<LogEvent>> {
    let path = dir.join("log");
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => anyhow::bail!("reading {}: {e}", path.display()),
    };
    let lines: Vec<&str> = text.lines().collect();
    let mut events = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        match serde_json::from_str(line) {
            Ok(event) => events.push(event),
            Err(_) if i + 1 == lines.len() && !text.ends_with('\n') => {}
            Err(e) => anyhow::bail!("{} line {}: {e}", path.display(), i + 1),
        }
    }
    Ok(events)
}

impl FileAuthPool {
    /// Opens (or, without a `pool` file, creates from the public placeholder) the pool in `dir`,
    /// and locks it against a second process.
    pub fn open(dir: &Path) -> Result<Self, AuthPoolError> {
        fs::create_dir_all(dir.join("staged")).map_err(|e| backend("creating", dir, e))?;
        fs::create_dir_all(dir.join("secrets")).map_err(|e| backend("creating", dir, e))?;
        let lock = lock_dir(dir)?;
        let pool_path = dir.join("pool");
        let state_path = dir.join("state.json");
        if !pool_path.exists() {
            let mut secret = Zeroizing::new(vec![0u8; DEFAULT_SECRET_BYTES]);
            ChaCha20Rng::from_seed(PLACEHOLDER_SEED).fill_bytes(&mut secret);
            write_synced(dir, "pool", &secret)?;
            let persisted = Persisted { pool_bytes: secret.len() as u64, placeholder: true, ..Persisted::default() };
            write_synced(dir, "state.json", &serde_json::to_vec(&persisted).unwrap_or_default())?;
        }
        let persisted: Persisted = if state_path.exists() {
            let text = fs::read_to_string(&state_path).map_err(|e| backend("reading", &state_path, e))?;
            serde_json::from_str(&text)
                .map_err(|e| AuthPoolError::Backend(format!("{} is damaged: {e}", state_path.display())))?
        } else {
            // A pool file installed by hand, without its state: its bits are unspent.
            let len = fs::metadata(&pool_path).map_err(|e| backend("reading", &pool_path, e))?.len();
            let persisted = Persisted { pool_bytes: len, ..Persisted::default() };
            write_synced(dir, "state.json", &serde_json::to_vec(&persisted).unwrap_or_default())?;
            persisted
        };
        let pool = Self { dir: dir.to_owned(), inner: Mutex::new(persisted), _lock: lock };
        // A crash after a secret was appended and before its staged file was removed.
        for id in pool.staged_secrets()? {
            if pool.lock().applied.iter().any(|s| s.id == id) {
                let path = dir.join("secrets").join(id.to_string());
                fs::remove_file(&path).map_err(|e| backend("removing", &path, e))?;
            }
        }
        Ok(pool)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Persisted> {
        // Invariant: nothing panics while holding this lock.
        self.inner.lock().expect("auth pool lock poisoned")
    }

    fn save(&self, persisted: &Persisted) -> Result<(), AuthPoolError> {
        let text = serde_json::to_string(persisted).map_err(|e| AuthPoolError::Backend(e.to_string()))?;
        write_synced(&self.dir, "state.json", text.as_bytes())
    }

    /// Appends one event to the log, synced.
    fn log(&self, event: &LogEvent) -> Result<(), AuthPoolError> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.dir.join("log");
        let mut line = serde_json::to_vec(event).map_err(|e| AuthPoolError::Backend(e.to_string()))?;
        line.push(b'\n');
        let mut file = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| backend("opening", &path, e))?;
        file.write_all(&line).and_then(|()| file.sync_data()).map_err(|e| backend("writing", &path, e))
    }

    fn read(&self, offset: u64, n_bits: u64) -> Result<Zeroizing<Vec<u8>>, AuthPoolError> {
        if !offset.is_multiple_of(8) || !n_bits.is_multiple_of(8) {
            return Err(AuthPoolError::Invalid(format!("bits [{offset}, +{n_bits}) are not byte aligned")));
        }
        let total = self.lock().pool_bytes * 8;
        let end = offset.saturating_add(n_bits);
        if end > total {
            return Err(AuthPoolError::OutOfRange { offset, end, total });
        }
        let path = self.dir.join("pool");
        let mut file = File::open(&path).map_err(|e| backend("opening", &path, e))?;
        file.seek(SeekFrom::Start(offset / 8)).map_err(|e| backend("reading", &path, e))?;
        let mut bytes = Zeroizing::new(vec![0u8; (n_bits / 8) as usize]);
        file.read_exact(&mut bytes).map_err(|e| backend("reading", &path, e))?;
        Ok(bytes)
    }

    /// Appends `bytes` to the counted stream (a tail beyond `pool_bytes`, left by a crash, is
    /// overwritten); `update` completes the new state, saved in the same write.
    fn append(
        &self,
        persisted: &mut Persisted,
        bytes: &[u8],
        update: impl FnOnce(&mut Persisted),
    ) -> Result<(), AuthPoolError> {
        let path = self.dir.join("pool");
        let mut file = OpenOptions::new().write(true).open(&path).map_err(|e| backend("opening", &path, e))?;
        file.set_len(persisted.pool_bytes).map_err(|e| backend("truncating", &path, e))?;
        file.seek(SeekFrom::Start(persisted.pool_bytes)).map_err(|e| backend("writing", &path, e))?;
        file.write_all(bytes).and_then(|()| file.sync_all()).map_err(|e| backend("writing", &path, e))?;
        let mut next = Persisted { pool_bytes: persisted.pool_bytes + bytes.len() as u64, ..persisted.clone() };
        update(&mut next);
        self.save(&next)?;
        *persisted = next;
        Ok(())
    }
}

/// Takes the pool's lock (flock on `<dir>/lock`), refusing a pool another process holds.
fn lock_dir(dir: &Path) -> Result<File, AuthPoolError> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join("lock");
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|e| backend("opening", &path, e))?;
    rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(|_| {
        AuthPoolError::Backend(format!(
            "the authentication key pool {} is in use by another process (a running daemon?)",
            dir.display()
        ))
    })?;
    Ok(file)
}

impl AuthPool for FileAuthPool {
    fn state(&self) -> Result<AuthState, AuthPoolError> {
        Ok(self.lock().state)
    }

    fn set_state(&self, state: AuthState) -> Result<(), AuthPoolError> {
        let mut persisted = self.lock();
        let from = persisted.state.watermark;
        if state.watermark < from {
            return Err(AuthPoolError::Invalid(format!(
                "watermark would move back from {from} to {}",
                state.watermark
            )));
        }
        let next = Persisted { state, ..persisted.clone() };
        self.save(&next)?;
        *persisted = next;
        if state.watermark != from {
            self.log(&LogEvent::Watermark { from, to: state.watermark })?;
        }
        Ok(())
    }

    fn total_bits(&self) -> Result<u64, AuthPoolError> {
        Ok(self.lock().pool_bytes * 8)
    }

    fn hash_key(&self, offset: u64) -> Result<Zeroizing<[u8; TAG_BYTES]>, AuthPoolError> {
        let bytes = self.read(offset, HASH_KEY_BITS)?;
        self.log(&LogEvent::HashKey { offset })?;
        let mut key = Zeroizing::new([0u8; TAG_BYTES]);
        key.copy_from_slice(&bytes);
        Ok(key)
    }

    fn pad(&self, offset: u64, n_bits: u64) -> Result<Zeroizing<Vec<u8>>, AuthPoolError> {
        let watermark = self.lock().state.watermark;
        if offset.saturating_add(n_bits) > watermark {
            return Err(AuthPoolError::Invalid(format!(
                "pad bits [{offset}, +{n_bits}) are not below the watermark {watermark}: they must be marked spent first"
            )));
        }
        let bytes = self.read(offset, n_bits)?;
        self.log(&LogEvent::Pad { offset, bits: n_bits })?;
        Ok(bytes)
    }

    fn stage_refill(&self, block_id: Uuid, bytes: &[u8]) -> Result<(), AuthPoolError> {
        write_synced(&self.dir.join("staged"), &block_id.to_string(), bytes)
    }

    fn settle_refill(&self, block_id: Uuid, keep: bool) -> Result<(), AuthPoolError> {
        let staged = self.dir.join("staged");
        let path = staged.join(block_id.to_string());
        if !path.exists() {
            return Ok(());
        }
        let mut persisted = self.lock();
        // A crash after the append and before the removal: appended already.
        if keep && persisted.last_appended != Some(block_id) {
            let bytes = Zeroizing::new(fs::read(&path).map_err(|e| backend("reading", &path, e))?);
            let position = persisted.pool_bytes * 8;
            self.append(&mut persisted, &bytes, |next| next.last_appended = Some(block_id))?;
            self.log(&LogEvent::Refill { block: block_id, position, bits: bytes.len() as u64 * 8 })?;
        }
        fs::remove_file(&path).map_err(|e| backend("removing", &path, e))?;
        sync_dir(&staged)
    }

    fn staged_refills(&self) -> Result<Vec<Uuid>, AuthPoolError> {
        list_ids(&self.dir.join("staged"))
    }

    fn stage_secret(&self, id: Uuid, bytes: &[u8]) -> Result<(), AuthPoolError> {
        write_synced(&self.dir.join("secrets"), &id.to_string(), bytes)
    }

    fn staged_secrets(&self) -> Result<Vec<Uuid>, AuthPoolError> {
        list_ids(&self.dir.join("secrets"))
    }

    fn apply_secret(&self, id: Uuid) -> Result<(), AuthPoolError> {
        let secrets = self.dir.join("secrets");
        let path = secrets.join(id.to_string());
        let bytes = Zeroizing::new(fs::read(&path).map_err(|e| backend("reading", &path, e))?);
        let mut persisted = self.lock();
        let position = persisted.pool_bytes * 8;
        let bits = bytes.len() as u64 * 8;
        self.append(&mut persisted, &bytes, |next| {
            next.applied.push(AppliedSecret { id, position, bits });
            if next.placeholder {
                // No public bit is used once a real secret is there.
                next.placeholder = false;
                next.state = AuthState { watermark: position, hash_key_offset: None };
            }
        })?;
        drop(persisted);
        self.log(&LogEvent::Secret { id, position, bits })?;
        fs::remove_file(&path).map_err(|e| backend("removing", &path, e))?;
        sync_dir(&secrets)
    }

    fn applied_secrets(&self) -> Result<Vec<AppliedSecret>, AuthPoolError> {
        Ok(self.lock().applied.clone())
    }

    fn is_placeholder(&self) -> bool {
        self.lock().placeholder
    }
}

/// What `qkdctl auth-secret install` did.
#[derive(Debug, PartialEq, Eq)]
pub enum Installed {
    /// The node had no pool (or `--reset`): the secret is its pool now.
    NewPool,
    /// Staged: applied at the next block once the peer holds it too.
    Staged,
    /// This secret was applied already.
    AlreadyApplied,
}

/// Installs `secret` in the pool of the node whose data directory is `data_dir`. A node with no
/// pool (or a placeholder pool, or `reset`) gets a new pool made of the secret alone; this
/// needs the daemon stopped (the pool's lock says whether it runs) and the same at the peer.
/// Otherwise the secret is staged, running daemon or not, and the link applies it at both ends
/// at its next block once both hold it.
pub fn install_secret(data_dir: &Path, secret: &SecretFile, reset: bool) -> anyhow::Result<Installed> {
    let dir = data_dir.join("auth");
    for private in [data_dir, dir.as_path()] {
        crate::service::private_dir(private).map_err(|e| anyhow::anyhow!("creating {}: {e}", private.display()))?;
    }
    let fresh = !dir.join("pool").exists();
    if fresh || reset {
        let _lock = lock_dir(&dir)?;
        for name in ["staged", "secrets"] {
            let sub = dir.join(name);
            if sub.exists() {
                fs::remove_dir_all(&sub).map_err(|e| anyhow::anyhow!("removing {}: {e}", sub.display()))?;
            }
        }
        let bits = secret.bytes.len() as u64 * 8;
        write_synced(&dir, "pool", &secret.bytes)?;
        let persisted = Persisted {
            pool_bytes: secret.bytes.len() as u64,
            applied: vec![AppliedSecret { id: secret.id, position: 0, bits }],
            ..Persisted::default()
        };
        write_synced(&dir, "state.json", &serde_json::to_vec(&persisted)?)?;
        return Ok(Installed::NewPool);
    }
    let pool = match FileAuthPool::open(&dir) {
        Ok(pool) => Some(pool),
        // A running daemon holds the pool: staging needs no lock (the daemon lists the
        // directory at each block).
        Err(AuthPoolError::Backend(e)) if e.contains("in use by another process") => None,
        Err(e) => return Err(e.into()),
    };
    if let Some(pool) = &pool
        && pool.applied_secrets()?.iter().any(|s| s.id == secret.id)
    {
        return Ok(Installed::AlreadyApplied);
    }
    write_synced(&dir.join("secrets"), &secret.id.to_string(), &secret.bytes)?;
    Ok(Installed::Staged)
}

/// Gives the nodes at `data_dirs` (a lab's, on one machine) one new secret, written nowhere
/// else, unless they all have a pool already. `Ok(true)`: installed; `Ok(false)`: every node had
/// a pool, nothing done. Some with a pool and some without is refused: the new secret would not
/// be theirs.
pub fn init_nodes(data_dirs: &[&Path]) -> anyhow::Result<bool> {
    let has_pool: Vec<bool> = data_dirs.iter().map(|d| d.join("auth").join("pool").exists()).collect();
    if has_pool.iter().all(|&h| h) {
        return Ok(false);
    }
    if has_pool.iter().any(|&h| h) {
        let with: Vec<String> =
            data_dirs.iter().zip(&has_pool).filter(|(_, h)| **h).map(|(d, _)| d.display().to_string()).collect();
        anyhow::bail!(
            "{} already hold(s) an authentication key pool and the others do not: install one secret at every node \
             with `qkdctl auth-secret install --reset` instead",
            with.join(", ")
        );
    }
    let secret = SecretFile::generate(DEFAULT_SECRET_BYTES);
    for dir in data_dirs {
        install_secret(dir, &secret, false)?;
    }
    Ok(true)
}

/// An offline view of a node's pool, for `qkdctl auth-secret status`.
#[derive(Debug, serde::Serialize)]
pub struct PoolSummary {
    /// Bits in the stream.
    pub total_bits: u64,
    /// Unused bits.
    pub available_bits: u64,
    /// The watermark.
    pub watermark: u64,
    /// Only the public placeholder secret.
    pub placeholder: bool,
    /// Secrets applied.
    pub applied: Vec<AppliedSecret>,
    /// Secrets installed and not applied yet.
    pub staged: Vec<Uuid>,
}

/// Reads a pool's state without opening it (works while the daemon runs).
pub fn summary(data_dir: &Path) -> anyhow::Result<PoolSummary> {
    let dir = data_dir.join("auth");
    let path = dir.join("state.json");
    let text = fs::read_to_string(&path).map_err(|e| {
        anyhow::anyhow!("reading {}: {e} (has the node run, or a secret been installed?)", path.display())
    })?;
    let persisted: Persisted =
        serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{} is damaged: {e}", path.display()))?;
    let total_bits = persisted.pool_bytes * 8;
    Ok(PoolSummary {
        total_bits,
        available_bits: total_bits.saturating_sub(persisted.state.watermark),
        watermark: persisted.state.watermark,
        placeholder: persisted.placeholder,
        applied: persisted.applied,
        staged: list_ids(&dir.join("secrets")).unwrap_or_default(),
    })
}

/// Opens a daemon's pool in `<data_dir>/auth`, warning loudly when it holds only the public
/// placeholder secret.
pub fn open_node_pool(data_dir: &Path) -> anyhow::Result<std::sync::Arc<FileAuthPool>> {
    let dir = data_dir.join("auth");
    let pool = FileAuthPool::open(&dir).map_err(|e| anyhow::anyhow!("opening the authentication key pool: {e}"))?;
    if pool.is_placeholder() {
        tracing::warn!(
            dir = %dir.display(),
            "the authentication key pool holds the PUBLIC placeholder secret: the classical channel is authenticated \
             by TLS only; install a secret made by `qkdctl auth-secret new` at both nodes with `qkdctl auth-secret \
             install` (docs/security.md)"
        );
    }
    tracing::info!(
        pool_bits = pool.available_bits().unwrap_or(0),
        staged_secrets = pool.staged_secrets().map(|s| s.len()).unwrap_or(0),
        "authentication key pool opened"
    );
    Ok(std::sync::Arc::new(pool))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("qkd-auth-pool-{}", Uuid::new_v4()));
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn the_file_pool_keeps_its_state_and_refills_across_reopening() {
        let dir = temp_dir();
        fs::write(dir.join("pool"), [7u8; 64]).unwrap();
        let pool = FileAuthPool::open(&dir).unwrap();
        assert!(!pool.is_placeholder());
        assert_eq!(pool.total_bits().unwrap(), 512);
        pool.set_state(AuthState { watermark: 384, hash_key_offset: Some(0) }).unwrap();
        let block = Uuid::new_v4();
        pool.stage_refill(block, &[9u8; 16]).unwrap();
        assert!(pool.pad(384, 128).is_err(), "a pad above the watermark is refused");
        drop(pool);
        // A crash: the refill is still staged, the watermark kept.
        let pool = FileAuthPool::open(&dir).unwrap();
        assert_eq!(pool.state().unwrap().watermark, 384);
        assert_eq!(pool.staged_refills().unwrap(), vec![block]);
        pool.settle_refill(block, true).unwrap();
        pool.settle_refill(block, true).unwrap();
        assert_eq!(pool.total_bits().unwrap(), 640);
        pool.advance_watermark(640).unwrap();
        assert_eq!(*pool.pad(512, 128).unwrap(), vec![9u8; 16]);
        assert!(pool.advance_watermark(0).is_err());
        drop(pool);
        let pool = FileAuthPool::open(&dir).unwrap();
        assert_eq!((pool.total_bits().unwrap(), pool.available_bits().unwrap()), (640, 0));
        // A second process is refused while the pool is open.
        let second = FileAuthPool::open(&dir).err().expect("the pool is locked");
        assert!(second.to_string().contains("in use by another process"), "{second}");
        drop(pool);
        let log = read_log(&dir).unwrap();
        assert!(log.contains(&LogEvent::Refill { block, position: 512, bits: 128 }), "{log:?}");
        assert!(log.contains(&LogEvent::Pad { offset: 512, bits: 128 }), "{log:?}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn secrets_are_installed_staged_and_applied_and_the_placeholder_is_skipped() {
        // A node that ran on the placeholder.
        let data = temp_dir();
        let pool = FileAuthPool::open(&data.join("auth")).unwrap();
        assert!(pool.is_placeholder());
        assert_eq!(pool.total_bits().unwrap(), 8 * DEFAULT_SECRET_BYTES as u64);
        pool.advance_watermark(1024).unwrap();
        // While it runs, the operator installs a secret: staged, not applied.
        let secret = SecretFile::generate(64);
        assert_eq!(install_secret(&data, &secret, false).unwrap(), Installed::Staged);
        assert_eq!(pool.staged_secrets().unwrap(), vec![secret.id]);
        let reset = install_secret(&data, &secret, true).unwrap_err();
        assert!(reset.to_string().contains("in use by another process"), "{reset}");
        // Applied: the rest of the placeholder is skipped, the hash key dropped.
        pool.apply_secret(secret.id).unwrap();
        let start = 8 * DEFAULT_SECRET_BYTES as u64;
        assert!(!pool.is_placeholder());
        assert_eq!(pool.state().unwrap(), AuthState { watermark: start, hash_key_offset: None });
        assert_eq!(pool.available_bits().unwrap(), 512);
        assert_eq!(pool.applied_secrets().unwrap(), vec![AppliedSecret { id: secret.id, position: start, bits: 512 }]);
        assert!(pool.staged_secrets().unwrap().is_empty());
        pool.advance_watermark(start + 128).unwrap();
        assert_eq!(*pool.pad(start, 128).unwrap(), secret.bytes[..16].to_vec());
        drop(pool);
        assert_eq!(install_secret(&data, &secret, false).unwrap(), Installed::AlreadyApplied);
        let summary = summary(&data).unwrap();
        assert_eq!((summary.available_bits, summary.placeholder), (384, false));

        // A secret file round-trips; anything else is refused.
        let file = data.join("psk");
        fs::write(&file, secret.encode()).unwrap();
        let read = SecretFile::read(&file).unwrap();
        assert_eq!((read.id, &*read.bytes), (secret.id, &*secret.bytes));
        fs::write(&file, b"not a secret").unwrap();
        assert!(SecretFile::read(&file).unwrap_err().to_string().contains("not a pre-shared secret"));

        // A new node: the secret is its pool.
        let fresh = temp_dir();
        assert_eq!(install_secret(&fresh, &secret, false).unwrap(), Installed::NewPool);
        let pool = FileAuthPool::open(&fresh.join("auth")).unwrap();
        assert!(!pool.is_placeholder());
        assert_eq!((pool.total_bits().unwrap(), pool.watermark().unwrap()), (512, 0));
        assert_eq!(pool.applied_secrets().unwrap()[0].id, secret.id);
        fs::remove_dir_all(&data).unwrap();
        fs::remove_dir_all(&fresh).unwrap();
    }
}
