//! `alice`: the transmitting QKD daemon. Parses flags, sets up logging and TLS, then runs.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use common::config::AliceConfig;

/// Every heap block is wiped when it is freed, and when it moves as it grows (the default
/// `realloc` of `GlobalAlloc` allocates, copies and frees): key material never outlives its
/// owner in freed memory, whichever crate's buffer (a growing bit vector, an HTTP body, a TLS
/// record) held it.
#[global_allocator]
static ALLOCATOR: zeroizing_alloc::ZeroAlloc<std::alloc::System> = zeroizing_alloc::ZeroAlloc(std::alloc::System);

/// Alice, the transmitter of a QKD link: emits photons on the simulated fibre and serves the
/// classical post-processing channel (gRPC, mutual TLS) to Bob. Distilled keys go to the key
/// store in the data directory.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Configuration file (TOML). Values can be overridden by ALICE__SECTION__KEY variables,
    /// e.g. ALICE__LINK__DISTANCE_KM=50.
    #[arg(long, value_name = "FILE", required_unless_present = "check_config")]
    config: Option<PathBuf>,
    /// Validate a configuration file, explain any error, and exit (non-zero on error).
    #[arg(long, value_name = "FILE")]
    check_config: Option<PathBuf>,
    /// Override `data_dir`.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[tokio::main]
async fn run() -> anyhow::Result<()> {
    let hardening = common::service::harden_process();
    qkd_tls::install_crypto_provider();
    common::logging::init();
    for failure in hardening {
        tracing::warn!("process hardening: {failure}");
    }
    match common::service::lock_memory() {
        Ok(done) => tracing::info!("{done}"),
        Err(failure) => tracing::warn!("process hardening: {failure}"),
    }
    let args = Args::parse();
    if let Some(path) = args.check_config {
        let (cfg, link) = AliceConfig::load(&path)?;
        println!(
            "{}: ok (node {}, {} km, block {} bits)",
            path.display(),
            cfg.node_id,
            link.distance_km,
            cfg.protocol.block_bits
        );
        return Ok(());
    }
    let path = args.config.context("--config is required")?;
    alice::run_from_config(&path, args.data_dir).await
}
