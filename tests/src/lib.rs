//! Test harness: a throw-away PKI, Alice and Bob daemons on `127.0.0.1:0` (in-process or as
//! real processes), an eavesdropper on the fibre, and polling with deadlines (never sleeps that
//! "wait long enough").

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::config::{
    AliceClassical, AliceConfig, AliceFibre, BobClassical, BobConfig, BobFibre, DeviceSection, LinkSection,
    SecuritySection, StoreSection,
};
use qkd_core::link::ProtocolParams;
use qkd_sim::LinkParams;
use qkd_store::{Kek, KeyStore, SledStore, StoreSummary};
use qkd_tls::LabPki;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// Creates a fresh directory under the system temp dir.
    pub fn new(label: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("qkd-{label}-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Installs the crypto provider and a test log subscriber (once).
pub fn init() {
    qkd_tls::install_crypto_provider();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
}

/// A lab's directory: PKI, and the addresses the daemons use.
pub struct Lab {
    /// Root directory (removed on drop).
    pub dir: TempDir,
    /// The PKI.
    pub pki: LabPki,
    /// Link physics.
    pub link: LinkParams,
    /// Protocol parameters.
    pub protocol: ProtocolParams,
    /// The `[security]` section both daemons get: the preset's calibration, eps_QKD default.
    pub security: SecuritySection,
}

impl Lab {
    /// A new lab with the `lab-10km` preset and small blocks, so that keys come quickly.
    pub fn new(label: &str) -> Self {
        init();
        let dir = TempDir::new(label);
        let pki = LabPki::open_or_create(&dir.0.join("pki")).expect("lab pki");
        let (link, bounds) = LinkParams::preset_with_bounds("lab-10km").expect("preset");
        let protocol = ProtocolParams { block_bits: 100_000, ..ProtocolParams::default() };
        let mut security = SecuritySection::default();
        security.complete(bounds).expect("the lab preset ships its calibration");
        // Each node's key-encryption key, outside its data directory, as an operator keeps it.
        std::fs::create_dir_all(dir.0.join("keks")).expect("create keks/");
        for node in ["alice", "bob"] {
            Kek::generate(node).write_new(&dir.0.join("keks").join(format!("{node}.kek"))).expect("write a KEK");
        }
        Self { dir, pki, link, protocol, security }
    }

    /// The KEK file of `node` (made by [`Lab::new`]).
    pub fn kek_file(&self, node: &str) -> PathBuf {
        self.dir.0.join("keks").join(format!("{node}.kek"))
    }

    /// The KEK of `node`.
    pub fn kek(&self, node: &str) -> Kek {
        Kek::from_file(&self.kek_file(node)).expect("read the node's KEK")
    }

    /// The `[store]` section of `node`.
    pub fn store_section(&self, node: &str) -> StoreSection {
        StoreSection { kek_file: Some(self.kek_file(node)), kek_credential: None }
    }

    /// Alice's configuration with the given listen addresses.
    pub fn alice_config(&self, grpc: std::net::SocketAddr, fibre: std::net::SocketAddr) -> AliceConfig {
        AliceConfig {
            node_id: "alice".into(),
            data_dir: self.dir.0.join("alice"),
            store: self.store_section("alice"),
            classical: AliceClassical { listen: grpc, peer_name: "bob".into() },
            device: DeviceSection::default(),
            fibre: AliceFibre { listen: fibre },
            tls: self.pki.files("alice"),
            link: LinkSection { preset: Some("lab-10km".into()), file: None, distance_km: None },
            protocol: self.protocol.clone(),
            security: self.security.clone(),
            health_listen: None,
            kme: None,
        }
    }

    /// Bob's configuration pointing at the given addresses.
    pub fn bob_config(&self, grpc: std::net::SocketAddr, fibre: std::net::SocketAddr) -> BobConfig {
        BobConfig {
            node_id: "bob".into(),
            data_dir: self.dir.0.join("bob"),
            store: self.store_section("bob"),
            max_stored_units: 0,
            classical: BobClassical {
                alice_addr: grpc.to_string(),
                alice_name: "alice".into(),
                max_backoff_s: 0.5,
                keepalive_s: 1.0,
            },
            device: DeviceSection::default(),
            fibre: BobFibre { alice_addr: fibre.to_string() },
            tls: self.pki.files("bob"),
            link: LinkSection { preset: Some("lab-10km".into()), file: None, distance_km: None },
            protocol: self.protocol.clone(),
            security: self.security.clone(),
            health_listen: None,
            kme: None,
        }
    }

    /// Summary of a stopped node's store.
    pub fn summary(&self, node: &str) -> StoreSummary {
        SledStore::open(&self.dir.0.join(node).join("store"), &self.kek(node))
            .expect("open store")
            .summary()
            .expect("summary")
    }

    /// A node's status file, if written yet.
    pub fn status(&self, node: &str) -> Option<serde_json::Value> {
        serde_json::from_slice(&std::fs::read(self.dir.0.join(node).join("status.json")).ok()?).ok()
    }
}

/// A daemon running in this process.
pub struct Running {
    /// Cancels the daemon.
    pub shutdown: CancellationToken,
    /// The daemon's task.
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    /// Stops the daemon gracefully and returns its result.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.task.await.expect("daemon task panicked")
    }
}

/// Binds two loopback listeners on port 0.
pub async fn bind_pair() -> (TcpListener, TcpListener) {
    (TcpListener::bind("127.0.0.1:0").await.expect("bind"), TcpListener::bind("127.0.0.1:0").await.expect("bind"))
}

/// Starts Alice in-process on the given listeners.
pub fn spawn_alice(lab: &Lab, grpc: TcpListener, fibre: TcpListener) -> Running {
    let cfg = lab.alice_config(grpc.local_addr().expect("addr"), fibre.local_addr().expect("addr"));
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(alice::run(cfg, lab.link.clone(), grpc, Some(fibre), shutdown.clone()));
    Running { shutdown, task }
}

/// Starts Bob in-process against the given addresses.
pub fn spawn_bob(lab: &Lab, grpc: std::net::SocketAddr, fibre: std::net::SocketAddr) -> Running {
    let cfg = lab.bob_config(grpc, fibre);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(bob::run(cfg, lab.link.clone(), shutdown.clone()));
    Running { shutdown, task }
}

/// Starts Alice in-process with the configuration `cfg` (`fibre`: the simulated fibre's
/// listener, for `device.driver = "sim"`).
pub fn spawn_alice_with(lab: &Lab, cfg: AliceConfig, grpc: TcpListener, fibre: Option<TcpListener>) -> Running {
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(alice::run(cfg, lab.link.clone(), grpc, fibre, shutdown.clone()));
    Running { shutdown, task }
}

/// Starts Bob in-process with the configuration `cfg`.
pub fn spawn_bob_with(lab: &Lab, cfg: BobConfig) -> Running {
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(bob::run(cfg, lab.link.clone(), shutdown.clone()));
    Running { shutdown, task }
}

/// Polls `check` every 50 ms until it returns `Some` or `timeout` passes; panics with `what` on
/// time-out.
pub async fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads a `u64` at a JSON pointer of a status value (0 when absent).
pub fn counter(status: &serde_json::Value, pointer: &str) -> u64 {
    status.pointer(pointer).and_then(|v| v.as_u64()).unwrap_or(0)
}

/// An intercept-resend eavesdropper on the fibre between Bob and Alice's source at `alice`.
pub async fn run_eve(listener: TcpListener, alice: std::net::SocketAddr, fraction: f64, stop: CancellationToken) {
    common::fibre::intercept_resend_tap(listener, alice.to_string(), fraction, 0xE7E, stop).await;
}

/// Path of a workspace binary, built first if needed (`cargo build --bin NAME`).
pub fn workspace_binary(name: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_owned();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = std::process::Command::new(cargo)
        .current_dir(&root)
        .args(["build", "--quiet", "-p", name, "--bin", name])
        .status()
        .expect("run cargo build");
    assert!(status.success(), "cargo build --bin {name} failed");
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    target.join("debug").join(name)
}

/// An error and all its sources, `: `-separated (TLS alerts hide a few levels down).
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

/// Calls Hello on Alice's classical channel at `addr` over mutual TLS with `material`, expecting
/// her certificate to be valid for `alice`. Ok when the call passed TLS and the name check (an
/// empty Hello is then refused for its content, FailedPrecondition); otherwise the whole error.
pub async fn link_hello(addr: std::net::SocketAddr, material: &qkd_tls::TlsMaterial) -> Result<(), String> {
    hello(&link_client(addr, material).await?).await
}

/// A client of Alice's classical channel at `addr` (one connection, mutual TLS with
/// `material`, her certificate expected valid for `alice`).
pub async fn link_client(
    addr: std::net::SocketAddr,
    material: &qkd_tls::TlsMaterial,
) -> Result<proto::link::link_client::LinkClient<tonic::transport::Channel>, String> {
    let connector = material.grpc_connector("alice").map_err(|e| format!("connector: {e}"))?;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(connector)
        .await
        .map_err(|e| format!("connect: {}", error_chain(&e)))?;
    Ok(proto::link::link_client::LinkClient::new(channel))
}

/// An empty Hello on `client`: Ok when refused for its content only (see [`link_hello`]).
pub async fn hello(client: &proto::link::link_client::LinkClient<tonic::transport::Channel>) -> Result<(), String> {
    match client.clone().hello(proto::link::HelloRequest::default()).await {
        Err(status) if status.code() == tonic::Code::FailedPrecondition => Ok(()),
        Err(status) => Err(format!("{:?}: {}", status.code(), error_chain(&status))),
        Ok(_) => Err("an empty Hello was accepted".into()),
    }
}

/// Waits (at most 5 s) until this process has refused the certificate `cert_pem` on `side`
/// ("client": a server refused it; "server": a client refused it), and returns the reason the
/// refusing side logged. A TLS 1.3 client whose certificate is refused often sees only a closed
/// connection: the reason is the server's to tell.
pub async fn refusal_of(cert_pem: &str, side: &str) -> String {
    let serial = hex::encode(qkd_tls::ca::serial_of(cert_pem).expect("certificate"));
    wait_for(&format!("a refusal of the {side} certificate with serial {serial}"), Duration::from_secs(5), || {
        qkd_tls::verify::recent_refusals()
            .into_iter()
            .rev()
            .find(|r| r.serial == serial && r.side == side)
            .map(|r| r.reason)
    })
    .await
}
