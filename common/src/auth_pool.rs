//! The daemons' authentication key pool ([`qkd_core::auth::AuthPool`]) on disk, in
//! `<data_dir>/auth/`:
//! * `pool`: the stream of secret bits: the pre-shared secret (`qkdctl auth-secret` makes one
//!   for both nodes; install it as `pool` at both before their first start), then each
//!   committed block's refill, appended; only the first `pool_bytes` (of `state.json`) count,
//!   so a crash during an append leaves no half refill;
//! * `state.json`: the watermark, the current hash key's position, `pool_bytes` and the last
//!   refill appended (replaced atomically: written, synced, renamed, directory synced);
//! * `staged/<block id>`: refills of blocks not settled yet (synced).
//!
//! Every change is on disk when the method returns, so a pad bit is marked spent before it is
//! used and no crash ever makes this end use it again.
//!
//! Interim (issue 14): a node started without a `pool` file creates one from a PUBLIC
//! placeholder secret and logs a warning at every start: its Wegman-Carter tags then protect
//! nothing beyond mutual TLS. Install a secret made by `qkdctl auth-secret` for real
//! authentication.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use qkd_core::auth::{AuthPool, AuthPoolError, AuthState, TAG_BYTES};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use uuid::Uuid;
use zeroize::Zeroizing;

/// Bytes of the placeholder secret (and of the secrets `qkdctl auth-secret` makes by default).
pub const DEFAULT_SECRET_BYTES: usize = 1 << 16;

/// The public seed of the placeholder secret: known to everyone, so it authenticates nothing.
const PLACEHOLDER_SEED: [u8; 32] = *b"qkd public placeholder auth pool";

/// A fresh pre-shared secret of `n_bytes` bytes from the OS's random source (install the same
/// file as `<data_dir>/auth/pool` at both nodes).
pub fn new_secret(n_bytes: usize) -> Zeroizing<Vec<u8>> {
    let mut bytes = Zeroizing::new(vec![0u8; n_bytes]);
    rand::rng().fill_bytes(&mut bytes);
    bytes
}

#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
struct Persisted {
    state: AuthState,
    pool_bytes: u64,
    last_appended: Option<Uuid>,
}

/// The file-backed pool of one node.
pub struct FileAuthPool {
    dir: PathBuf,
    inner: Mutex<Persisted>,
    /// True when the pool came from the public placeholder secret.
    pub placeholder: bool,
}

fn backend(what: &str, path: &Path, e: std::io::Error) -> AuthPoolError {
    AuthPoolError::Backend(format!("{what} {}: {e}", path.display()))
}

fn sync_dir(dir: &Path) -> Result<(), AuthPoolError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| backend("syncing", dir, e))
}

impl FileAuthPool {
    /// Opens (or, without a `pool` file, creates from the public placeholder) the pool in `dir`.
    pub fn open(dir: &Path) -> Result<Self, AuthPoolError> {
        fs::create_dir_all(dir.join("staged")).map_err(|e| backend("creating", dir, e))?;
        let pool_path = dir.join("pool");
        let state_path = dir.join("state.json");
        let mut placeholder = false;
        if !pool_path.exists() {
            let mut secret = Zeroizing::new(vec![0u8; DEFAULT_SECRET_BYTES]);
            ChaCha20Rng::from_seed(PLACEHOLDER_SEED).fill_bytes(&mut secret);
            write_synced(dir, "pool", &secret)?;
            placeholder = true;
        }
        if dir.join("placeholder").exists() {
            placeholder = true;
        } else if placeholder {
            write_synced(dir, "placeholder", b"the pool was made from the public placeholder secret\n")?;
        }
        let persisted = if state_path.exists() {
            let text = fs::read_to_string(&state_path).map_err(|e| backend("reading", &state_path, e))?;
            serde_json::from_str(&text)
                .map_err(|e| AuthPoolError::Backend(format!("{} is damaged: {e}", state_path.display())))?
        } else {
            let len = fs::metadata(&pool_path).map_err(|e| backend("reading", &pool_path, e))?.len();
            let persisted = Persisted { pool_bytes: len, ..Persisted::default() };
            write_synced(dir, "state.json", serde_json::to_string(&persisted).unwrap_or_default().as_bytes())?;
            persisted
        };
        Ok(Self { dir: dir.to_owned(), inner: Mutex::new(persisted), placeholder })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Persisted> {
        // Invariant: nothing panics while holding this lock.
        self.inner.lock().expect("auth pool lock poisoned")
    }

    fn save(&self, persisted: &Persisted) -> Result<(), AuthPoolError> {
        let text = serde_json::to_string(persisted).map_err(|e| AuthPoolError::Backend(e.to_string()))?;
        write_synced(&self.dir, "state.json", text.as_bytes())
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
    /// overwritten).
    fn append(&self, persisted: &mut Persisted, bytes: &[u8], block: Option<Uuid>) -> Result<(), AuthPoolError> {
        let path = self.dir.join("pool");
        let mut file = OpenOptions::new().write(true).open(&path).map_err(|e| backend("opening", &path, e))?;
        file.set_len(persisted.pool_bytes).map_err(|e| backend("truncating", &path, e))?;
        file.seek(SeekFrom::Start(persisted.pool_bytes)).map_err(|e| backend("writing", &path, e))?;
        file.write_all(bytes).and_then(|()| file.sync_all()).map_err(|e| backend("writing", &path, e))?;
        let next =
            Persisted { pool_bytes: persisted.pool_bytes + bytes.len() as u64, last_appended: block, ..*persisted };
        self.save(&next)?;
        *persisted = next;
        Ok(())
    }
}

/// Writes `name` in `dir` atomically and durably.
fn write_synced(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), AuthPoolError> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let path = dir.join(name);
    let mut file = File::create(&tmp).map_err(|e| backend("creating", &tmp, e))?;
    file.write_all(bytes).and_then(|()| file.sync_all()).map_err(|e| backend("writing", &tmp, e))?;
    fs::rename(&tmp, &path).map_err(|e| backend("renaming", &path, e))?;
    sync_dir(dir)
}

impl AuthPool for FileAuthPool {
    fn state(&self) -> Result<AuthState, AuthPoolError> {
        Ok(self.lock().state)
    }

    fn set_state(&self, state: AuthState) -> Result<(), AuthPoolError> {
        let mut persisted = self.lock();
        if state.watermark < persisted.state.watermark {
            return Err(AuthPoolError::Invalid(format!(
                "watermark would move back from {} to {}",
                persisted.state.watermark, state.watermark
            )));
        }
        let next = Persisted { state, ..persisted.clone() };
        self.save(&next)?;
        *persisted = next;
        Ok(())
    }

    fn total_bits(&self) -> Result<u64, AuthPoolError> {
        Ok(self.lock().pool_bytes * 8)
    }

    fn hash_key(&self, offset: u64) -> Result<Zeroizing<[u8; TAG_BYTES]>, AuthPoolError> {
        let bytes = self.read(offset, 128)?;
        let mut key = Zeroizing::new([0u8; TAG_BYTES]);
        key.copy_from_slice(&bytes);
        Ok(key)
    }

    fn pad(&self, offset: u64, n_bits: u64) -> Result<Zeroizing<Vec<u8>>, AuthPoolError> {
        self.read(offset, n_bits)
    }

    fn stage_refill(&self, block_id: Uuid, bytes: &[u8]) -> Result<(), AuthPoolError> {
        let staged = self.dir.join("staged");
        write_synced(&staged, &block_id.to_string(), bytes)
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
            self.append(&mut persisted, &bytes, Some(block_id))?;
        }
        fs::remove_file(&path).map_err(|e| backend("removing", &path, e))?;
        sync_dir(&staged)
    }

    fn staged_refills(&self) -> Result<Vec<Uuid>, AuthPoolError> {
        let staged = self.dir.join("staged");
        let mut ids = Vec::new();
        for entry in fs::read_dir(&staged).map_err(|e| backend("listing", &staged, e))? {
            let entry = entry.map_err(|e| backend("listing", &staged, e))?;
            if let Some(id) = entry.file_name().to_str().and_then(|n| Uuid::parse_str(n).ok()) {
                ids.push(id);
            }
        }
        Ok(ids)
    }

    fn install_secret(&self, bytes: &[u8]) -> Result<(), AuthPoolError> {
        let mut persisted = self.lock();
        self.append(&mut persisted, bytes, None)
    }
}

/// Opens a daemon's pool in `<data_dir>/auth`, warning loudly when it holds only the public
/// placeholder secret.
pub fn open_node_pool(data_dir: &Path) -> anyhow::Result<std::sync::Arc<FileAuthPool>> {
    let dir = data_dir.join("auth");
    let pool = FileAuthPool::open(&dir).map_err(|e| anyhow::anyhow!("opening the authentication key pool: {e}"))?;
    if pool.placeholder {
        tracing::warn!(
            dir = %dir.display(),
            "the authentication key pool holds the PUBLIC placeholder secret: the classical channel is authenticated \
             by TLS only; install a secret made by `qkdctl auth-secret` at both nodes (docs/security.md)"
        );
    }
    tracing::info!(pool_bits = pool.available_bits().unwrap_or(0), "authentication key pool opened");
    Ok(std::sync::Arc::new(pool))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_pool_keeps_its_state_and_refills_across_reopening() {
        let dir = std::env::temp_dir().join(format!("qkd-auth-pool-{}", Uuid::new_v4()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("pool"), [7u8; 64]).unwrap();
        let pool = FileAuthPool::open(&dir).unwrap();
        assert!(!pool.placeholder);
        assert_eq!(pool.total_bits().unwrap(), 512);
        pool.set_state(AuthState { watermark: 384, hash_key_offset: Some(0) }).unwrap();
        let block = Uuid::new_v4();
        pool.stage_refill(block, &[9u8; 16]).unwrap();
        drop(pool);
        // A crash: the refill is still staged, the watermark kept.
        let pool = FileAuthPool::open(&dir).unwrap();
        assert_eq!(pool.state().unwrap().watermark, 384);
        assert_eq!(pool.staged_refills().unwrap(), vec![block]);
        pool.settle_refill(block, true).unwrap();
        pool.settle_refill(block, true).unwrap();
        assert_eq!(pool.total_bits().unwrap(), 640);
        assert_eq!(*pool.pad(512, 128).unwrap(), vec![9u8; 16]);
        assert!(pool.advance_watermark(0).is_err());
        drop(pool);
        let pool = FileAuthPool::open(&dir).unwrap();
        assert_eq!((pool.total_bits().unwrap(), pool.available_bits().unwrap()), (640, 256));
        fs::remove_dir_all(&dir).unwrap();

        let fresh = std::env::temp_dir().join(format!("qkd-auth-pool-{}", Uuid::new_v4()));
        let pool = FileAuthPool::open(&fresh).unwrap();
        assert!(pool.placeholder);
        assert_eq!(pool.total_bits().unwrap(), 8 * DEFAULT_SECRET_BYTES as u64);
        fs::remove_dir_all(&fresh).unwrap();
    }
}
