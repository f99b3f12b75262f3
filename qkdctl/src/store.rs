//! `qkdctl store ...`: inspection of a stopped daemon's key store.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use qkd_store::{Kek, KeyStore, SledStore, Verification};

/// Where the store's key-encryption key is (the daemon's `[store]` section).
#[derive(clap::Args, Debug)]
pub struct KekArgs {
    /// The key-encryption key file (the daemon's `[store] kek_file`).
    #[arg(long, value_name = "FILE", required_unless_present = "kek_credential")]
    kek: Option<PathBuf>,
    /// The systemd credential holding it (`$CREDENTIALS_DIRECTORY/NAME`, e.g. under
    /// `systemd-run -p LoadCredentialEncrypted=...`).
    #[arg(long, value_name = "NAME", conflicts_with = "kek")]
    kek_credential: Option<String>,
}

impl KekArgs {
    fn load(&self) -> anyhow::Result<Kek> {
        let kek = match (&self.kek, &self.kek_credential) {
            (_, Some(name)) => Kek::from_credential(name)?,
            (Some(path), None) => Kek::from_file(path)?,
            (None, None) => anyhow::bail!("no key-encryption key: pass --kek FILE or --kek-credential NAME"),
        };
        Ok(kek)
    }
}

/// `qkdctl store kek --out FILE`: a new KEK in a new file, mode 0600.
pub fn make_kek(outs: &[PathBuf], keep_existing: bool) -> anyhow::Result<()> {
    for out in outs {
        if keep_existing && out.exists() {
            println!("kept the existing key-encryption key {}", out.display());
            continue;
        }
        write_kek(out)?;
    }
    Ok(())
}

fn write_kek(out: &Path) -> anyhow::Result<()> {
    Kek::generate("new").write_new(out).map_err(|e| anyhow::anyhow!("creating {}: {e}", out.display()))?;
    println!(
        "wrote a new key-encryption key to {} (mode 0600); set `[store] kek_file` to it, or make it a systemd \
         credential (docs/store.md, \"Key custody\"). Keep a copy offline: a store cannot be read without it.",
        out.display()
    );
    Ok(())
}

/// Exit status of `store verify` when the store has problems.
const EXIT_DAMAGED: u8 = 1;

/// Exit status of `store verify` when the store could not be checked at all (held by a running
/// daemon, absent, or an I/O error).
const EXIT_UNCHECKED: u8 = 2;

/// The store directory of a daemon's data directory.
fn store_dir(data_dir: &Path) -> anyhow::Result<PathBuf> {
    let store_dir = data_dir.join("store");
    if !store_dir.is_dir() {
        anyhow::bail!("{} holds no key store (expected {})", data_dir.display(), store_dir.display());
    }
    Ok(store_dir)
}

/// Prints the store summary of the daemon whose data directory is `data_dir`.
pub fn summary(data_dir: &Path, kek: &KekArgs, json: bool) -> anyhow::Result<()> {
    let store_dir = store_dir(data_dir)?;
    let kek = kek.load()?;
    // The error says what is wrong: a store held by a running daemon, a damaged one (run
    // `qkdctl store verify`), a full disk.
    let store = SledStore::open(&store_dir, &kek)
        .map_err(|e| anyhow::anyhow!("opening the key store {}: {}", store_dir.display(), qkd_store::describe(&e)))?;
    let summary = store
        .summary()
        .map_err(|e| anyhow::anyhow!("reading the key store {}: {}", store_dir.display(), qkd_store::describe(&e)))?;
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

/// `qkdctl store drop-reservations`: erases, durably, every reservation of the stopped store of
/// the daemon whose data directory is `data_dir` (with `yes`; otherwise counts them and fails).
pub fn drop_reservations(data_dir: &Path, kek: &KekArgs, yes: bool) -> anyhow::Result<()> {
    let store_dir = store_dir(data_dir)?;
    let kek = kek.load()?;
    let store = SledStore::open(&store_dir, &kek)
        .map_err(|e| anyhow::anyhow!("opening the key store {}: {}", store_dir.display(), qkd_store::describe(&e)))?;
    let read_error = |e: qkd_store::StoreError| {
        anyhow::anyhow!("reading the key store {}: {}", store_dir.display(), qkd_store::describe(&e))
    };
    let n = store.reserved_key_count().map_err(read_error)?;
    if !yes {
        anyhow::bail!(
            "{n} reservation(s) in {} would be erased; nothing changed: pass --yes to erase them",
            store_dir.display()
        );
    }
    let erased = store.purge_reservations(u64::MAX).map_err(|e| {
        anyhow::anyhow!("erasing the reservations of {}: {}", store_dir.display(), qkd_store::describe(&e))
    })?;
    println!(
        "erased {erased} reservation(s) from {} (their slaves now get 400 \"keys not found\"; the ready keys are untouched)",
        store_dir.display()
    );
    Ok(())
}

/// Verifies the stopped store of the daemon whose data directory is `data_dir` (the checks
/// of `qkd_store::verify`, as the daemon makes them when it starts) and prints what it found.
/// Exit status: 0 healthy, 1 problems found (listed), 2 the store could not be checked.
pub fn verify(data_dir: &Path, kek: &KekArgs, json: bool) -> ExitCode {
    let store_dir = match store_dir(data_dir) {
        Ok(dir) => dir,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(EXIT_UNCHECKED);
        }
    };
    let kek = match kek.load() {
        Ok(kek) => kek,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(EXIT_UNCHECKED);
        }
    };
    let report = qkd_store::verify_dir(&store_dir, &kek);
    if json {
        match serde_json::to_string_pretty(&report.to_json()) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        print_report(&report);
    }
    if report.is_healthy() {
        ExitCode::SUCCESS
    } else if report.checked {
        ExitCode::from(EXIT_DAMAGED)
    } else {
        ExitCode::from(EXIT_UNCHECKED)
    }
}

fn print_report(report: &Verification) {
    let c = &report.counts;
    if report.is_healthy() {
        println!("key store {}: healthy", report.path.display());
    } else if report.checked {
        let n = report.problems.len() as u64 + report.omitted;
        println!("key store {}: {n} problem(s) found", report.path.display());
    } else {
        println!("key store {}: could not be checked", report.path.display());
    }
    if report.trees_read {
        println!("  blocks: {} ready, {} pending", c.ready_blocks, c.pending_blocks);
        println!("  units:  {} ready, {} pending", c.ready_units, c.pending_units);
        println!("  KME:    {} reservations, {} cancellation tombstones", c.reservations, c.tombstones);
    }
    if !report.problems.is_empty() {
        println!("problems:");
        for problem in &report.problems {
            println!("  - {problem}");
        }
        if report.omitted > 0 {
            println!("  ... and {} more", report.omitted);
        }
    }
    if !report.notes.is_empty() {
        println!("notes:");
        for note in &report.notes {
            println!("  - {note}");
        }
    }
}
