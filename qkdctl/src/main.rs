//! `qkdctl`: the operator's tool for the QKD link.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

mod auth;
mod bench_postproc;
mod demo;
mod device;
mod keys;
mod kme_pair;
mod lab;
mod pki;
mod plot;
mod simulate;
mod status;
mod store;

/// Every heap block is wiped when it is freed, and when it moves as it grows (the default
/// `realloc` of `GlobalAlloc` allocates, copies and frees): key material never outlives its
/// owner in freed memory, whichever crate's buffer (a growing bit vector, an HTTP body, a TLS
/// record) held it.
#[global_allocator]
static ALLOCATOR: zeroizing_alloc::ZeroAlloc<std::alloc::System> = zeroizing_alloc::ZeroAlloc(std::alloc::System);

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
    /// One line per running daemon: state, QBER, secret key rate, authentication pool, store
    /// (from the daemons' health listeners: --addr, or the lab in --dir).
    Status(status::StatusArgs),
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
    /// Benchmark the post-processing stages: reconciliation efficiency, frame error rate, round
    /// trips and throughput per core for Cascade, LDPC, verification and Toeplitz hashing, beside
    /// the published Cascade curve.
    BenchPostproc(bench_postproc::BenchArgs),
    /// Simulate one link configuration for a given duration in simulated time, with the full
    /// post-processing, and print QBER, rates and the finite-key secret key rate.
    Simulate(simulate::SimulateArgs),
    /// Simulate a range of distances (or of any model parameter) and write a table (CSV, JSON)
    /// and a plot (SVG) of key rate and QBER, with the analytic model and the reference
    /// experiment's published points.
    Sweep(simulate::SweepArgs),
    /// ETSI GS QKD 014 client: key status, Get key, Get key with key IDs against any KME
    /// (this one or another vendor's), with client-certificate options; and a load benchmark.
    Keys {
        #[command(subcommand)]
        command: keys::KeysCommand,
    },
    /// Create the certificates of a deployment: a CA, the two KMEs, application (SAE) clients.
    Pki {
        #[command(subcommand)]
        command: pki::PkiCommand,
    },
    /// Pre-shared secrets of the Wegman-Carter authentication of the classical channel: make one
    /// (`new`), install it at a node (`install`), see a node's pool (`status`).
    AuthSecret {
        #[command(subcommand)]
        command: auth::AuthCommand,
    },
    /// A demonstration application (ETSI GS QKD 014 client) for labs: a master and a slave at
    /// the two KMEs fetch the same keys and check that they match.
    DemoApp(demo::DemoArgs),
    /// An intercept-resend eavesdropper on the simulated fibre (for labs: no key must survive).
    Eve {
        /// Address Bob's receiver connects to.
        #[arg(long, default_value = "0.0.0.0:7001")]
        listen: String,
        /// Alice's fibre address.
        #[arg(long)]
        alice: String,
        /// Fraction of photons measured and resent.
        #[arg(long, default_value_t = 1.0)]
        fraction: f64,
    },
    /// Exit 0 when an HTTP URL answers 200 (container health checks: `/readyz`).
    Probe {
        /// URL, e.g. http://127.0.0.1:9000/readyz.
        url: String,
    },
    /// Quantum devices: the emulator of the device API, recording and inspecting runs.
    Device {
        #[command(subcommand)]
        command: device::DeviceCommand,
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
        #[command(flatten)]
        kek: store::KekArgs,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Verify a stopped daemon's key store as the daemon does when it starts (sled's checksums,
    /// every tree read to its end, the store's invariants) and list any problem. Exit status:
    /// 0 healthy, 1 problems found, 2 the store could not be checked (held by a running daemon,
    /// absent). See docs/store.md.
    Verify {
        /// The daemon's data directory (the one holding `store/`).
        #[arg(value_name = "DATA_DIR", required_unless_present = "data_dir", conflicts_with = "data_dir")]
        dir: Option<PathBuf>,
        /// The same, as an option (as `store summary` takes it).
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
        #[command(flatten)]
        kek: store::KekArgs,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Erase every KME reservation of a stopped daemon's key store: keys whose master already
    /// has them, still waiting for their slave's Get key with key IDs (the slave then gets 400
    /// "keys not found" and the applications fetch new keys). Run it after restoring a store
    /// from a backup, before starting the daemon: a copy may hold reservations fetched since it
    /// was made, which the re-agreement at Hello cannot see when nothing else changed (see
    /// docs/store.md). Cancellation records go too. Without --yes, only says how many would go.
    DropReservations {
        /// The daemon's data directory (the one holding `store/`).
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        #[command(flatten)]
        kek: store::KekArgs,
        /// Erase them (without it, nothing is changed).
        #[arg(long)]
        yes: bool,
    },
    /// Make a key-encryption key (KEK) for a daemon's key store: 32 random bytes in a new file
    /// of mode 0600 (never overwrites one). Point `[store] kek_file` at it, or encrypt it as a
    /// systemd credential (`systemd-creds encrypt --name=qkd-store-kek FILE ...`) and remove the
    /// plain file. Keep a copy offline: without its KEK a store's keys cannot be read.
    Kek {
        /// The file to create (repeat for several nodes).
        #[arg(long, value_name = "FILE", required = true)]
        out: Vec<PathBuf>,
        /// Keep a file that exists already (it is never overwritten; without this flag it is an
        /// error).
        #[arg(long)]
        keep_existing: bool,
    },
}

fn run_daemon(role: &str, config: &std::path::Path) -> anyhow::Result<()> {
    for failure in common::service::harden_process() {
        tracing::warn!("process hardening: {failure}");
    }
    match common::service::lock_memory() {
        Ok(done) => tracing::info!("{done}"),
        Err(failure) => tracing::warn!("process hardening: {failure}"),
    }
    let runtime = tokio::runtime::Runtime::new()?;
    match role {
        "alice" => runtime.block_on(alice::run_from_config(config, None)),
        "bob" => runtime.block_on(bob::run_from_config(config, None)),
        other => anyhow::bail!("unknown daemon role {other:?} (alice or bob)"),
    }
}

fn run_eve(listen: &str, alice: String, fraction: f64) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let stop = tokio_util::sync::CancellationToken::new();
        tokio::spawn(common::shutdown_on_signal(stop.clone()));
        common::fibre::intercept_resend_tap(listener, alice, fraction, rand::random(), stop).await;
        Ok(())
    })
}

fn probe(url: &str) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let response =
            reqwest::Client::builder().timeout(std::time::Duration::from_secs(3)).build()?.get(url).send().await?;
        anyhow::ensure!(response.status().is_success(), "{url}: {}", response.status());
        Ok(())
    })
}

fn main() -> std::process::ExitCode {
    qkd_tls::install_crypto_provider();
    common::logging::init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Lab(args) => lab::run(args),
        Command::Status(args) => match status::run(args) {
            Ok(code) => return code,
            Err(e) => Err(e),
        },
        Command::Pki { command } => pki::run(command),
        Command::Keys { command } => keys::run(command),
        Command::DemoApp(args) => demo::run(args),
        Command::AuthSecret { command } => auth::run(command),
        Command::Eve { listen, alice, fraction } => run_eve(&listen, alice, fraction),
        Command::Probe { url } => probe(&url),
        Command::BenchPostproc(args) => bench_postproc::run(args),
        Command::Simulate(args) => simulate::run_simulate(args),
        Command::Sweep(args) => simulate::run_sweep(args),
        Command::Daemon { role, config } => run_daemon(&role, &config),
        Command::Device { command } => device::run(command),
        Command::Store { command: StoreCommand::Summary { data_dir, kek, json } } => {
            store::summary(&data_dir, &kek, json)
        }
        Command::Store { command: StoreCommand::Kek { out, keep_existing } } => store::make_kek(&out, keep_existing),
        Command::Store { command: StoreCommand::DropReservations { data_dir, kek, yes } } => {
            store::drop_reservations(&data_dir, &kek, yes)
        }
        Command::Store { command: StoreCommand::Verify { dir, data_dir, kek, json } } => {
            return store::verify(&dir.or(data_dir).unwrap_or_default(), &kek, json);
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
