//! `qkdctl`: the operator's tool for the QKD link.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

mod lab;
mod pki;
mod plot;
mod simulate;
mod store;

/// Operator tool of the QKD link: run a local lab, inspect key stores.
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a local Alice+Bob pair over a simulated fibre on loopback and show progress until
    /// Ctrl-C (or --duration-s). Creates a throw-away PKI, configs and stores in --dir, and
    /// reuses them on the next run.
    Lab(lab::LabArgs),
    /// Run a daemon in this process (used by `lab`, which starts Alice and Bob as two processes
    /// of this same executable; deployments use the `alice` and `bob` binaries).
    #[command(hide = true)]
    Daemon {
        /// `alice` or `bob`.
        role: String,
        /// Configuration file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Simulate one link configuration for a given duration in simulated time, with the full
    /// post-processing, and print QBER, rates and the finite-key secret key rate.
    Simulate(simulate::SimulateArgs),
    /// Simulate a range of distances (or of any model parameter) and write a table (CSV, JSON)
    /// and a plot (SVG) of key rate and QBER, with the analytic model and the reference
    /// experiment's published points.
    Sweep(simulate::SweepArgs),
    /// Create the certificates of a deployment: a CA, the two KMEs, application (SAE) clients.
    Pki {
        #[command(subcommand)]
        command: pki::PkiCommand,
    },
    /// Inspect a key store.
    Store {
        #[command(subcommand)]
        command: StoreCommand,
    },
}

#[derive(Subcommand, Debug)]
enum StoreCommand {
    /// Count and digest of a stopped daemon's ready keys: number of keys, total key bits and a
    /// SHA-256 over (key ID, key bytes) in key-ID order. Never prints a key.
    Summary {
        /// The daemon's data directory (the one holding `store/`).
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn run_daemon(role: &str, config: &std::path::Path) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    match role {
        "alice" => runtime.block_on(alice::run_from_config(config, None)),
        "bob" => runtime.block_on(bob::run_from_config(config, None)),
        other => anyhow::bail!("unknown daemon role {other:?} (alice or bob)"),
    }
}

fn main() -> std::process::ExitCode {
    common::tls::install_crypto_provider();
    common::logging::init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Lab(args) => lab::run(args),
        Command::Pki { command } => pki::run(command),
        Command::Simulate(args) => simulate::run_simulate(args),
        Command::Sweep(args) => simulate::run_sweep(args),
        Command::Daemon { role, config } => run_daemon(&role, &config),
        Command::Store { command: StoreCommand::Summary { data_dir, json } } => store::summary(&data_dir, json),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
