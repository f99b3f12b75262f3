//! `qkdctl store ...`: inspection of a stopped daemon's key store.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use qkd_store::{KeyStore, SledStore, Verification};

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
pub fn summary(data_dir: &Path, json: bool) -> anyhow::Result<()> {
    let store_dir = store_dir(data_dir)?;
    // The error says what is wrong: a store held by a running daemon, a damaged one (run
    // `qkdctl store verify`), a full disk.
    let store = SledStore::open(&store_dir)
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

/// Verifies the stopped store of the daemon whose data directory is `data_dir` (the checks
/// of `qkd_store::verify`, as the daemon makes them when it starts) and prints what it found.
/// Exit status: 0 healthy, 1 problems found (listed), 2 the store could not be checked.
pub fn verify(data_dir: &Path, json: bool) -> ExitCode {
    let store_dir = match store_dir(data_dir) {
        Ok(dir) => dir,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(EXIT_UNCHECKED);
        }
    };
    let report = qkd_store::verify_dir(&store_dir);
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
