//! `qkdctl store ...`: inspection of a stopped daemon's key store.

use std::path::Path;

use anyhow::Context;
use qkd_store::{KeyStore, SledStore};

/// Prints the store summary of the daemon whose data directory is `data_dir`.
pub fn summary(data_dir: &Path, json: bool) -> anyhow::Result<()> {
    let store_dir = data_dir.join("store");
    if !store_dir.is_dir() {
        anyhow::bail!("{} holds no key store (expected {})", data_dir.display(), store_dir.display());
    }
    let store = SledStore::open(&store_dir)
        .with_context(|| format!("opening {} (is the daemon still running? stop it first)", store_dir.display()))?;
    let summary = store.summary()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!("keys:           {}", summary.n_keys);
        println!("key bits:       {}", summary.n_key_bits);
        println!("ready blocks:   {}", summary.n_ready_blocks);
        println!("pending blocks: {}", summary.n_pending_blocks);
        println!("digest:         {}", summary.digest);
    }
    Ok(())
}
