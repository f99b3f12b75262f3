//! Two KMEs on loopback that share a pool of ready units, with a throw-away PKI: what
//! `qkdctl keys pair` serves to SAE client developers, the API fuzzer and the key-delivery
//! benchmark, and what the integration tests start.
//!
//! The units are random bytes from the operating system, not keys from a quantum channel: a pair
//! is for exercising the API, never for protecting data. Both KMEs are the real thing otherwise
//! (HTTPS with client certificates, the KME-to-KME gRPC channel with mutual TLS, sled stores on
//! disk, in temporary directories that are removed when the stores are dropped).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use qkd_store::kme::UNIT_BYTES;
use qkd_store::{BlockMeta, KeyStore, KeyUnit, SledStore, StoreError};
use qkd_tls::{CertAuthority, IssuedCert, RevokedEntry, TlsError, TlsFiles, TlsMaterial};
use rand::RngCore;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::limits::AbuseLimits;
use crate::{IdentitySource, KmeConfig, KmeError, KmeSide, SaeEntry};

/// KME IDs of the pair (source_KME_ID and target_KME_ID in Get status).
pub const KME_A: &str = "KME_A";
/// See [`KME_A`].
pub const KME_B: &str = "KME_B";

/// What a pair serves.
#[derive(Clone, Debug)]
pub struct PairOptions {
    /// Ready 256-bit units in each store (the same units at both KMEs); each KME owns half.
    pub n_units: usize,
    /// `max_key_per_request` of both KMEs.
    pub max_key_per_request: u32,
    /// SAEs attached to KME A.
    pub a_saes: Vec<String>,
    /// SAEs attached to KME B.
    pub b_saes: Vec<String>,
    /// The delivery audit logs of KME A and KME B (none by default).
    pub audit_logs: Option<(PathBuf, PathBuf)>,
    /// `allow_simulated_keys` of both KMEs. The pair's units are random test keys, stored
    /// marked simulated: without it, Get key answers 503. Default true.
    pub allow_simulated_keys: bool,
    /// Connection, rate and idle limits of both KMEs (the `[kme]` defaults by default).
    pub abuse: AbuseLimits,
}

impl Default for PairOptions {
    fn default() -> Self {
        Self {
            n_units: 64,
            max_key_per_request: 128,
            allow_simulated_keys: true,
            audit_logs: None,
            abuse: AbuseLimits::default(),
            a_saes: vec!["sae-a1".into(), "sae-a2".into()],
            b_saes: vec!["sae-b1".into(), "sae-b2".into()],
        }
    }
}

/// Errors of starting a pair.
#[derive(Debug, thiserror::Error)]
pub enum PairError {
    /// The PKI could not be made or written.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// A store could not be created or filled.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A loopback port could not be bound.
    #[error("cannot bind a loopback port: {0}")]
    Bind(std::io::Error),
}

/// The pair's PKI: a node CA (node certificates of the KME-to-KME channel and the KMEs' HTTPS
/// server certificates) and an application CA (SAE client certificates), each with a CRL, their
/// files in a directory: `ca.crt` (the node CA, which SAEs trust), `apps-ca.crt`, `nodes.crl`,
/// `apps.crl`.
pub struct PairPki {
    dir: PathBuf,
    /// The node CA.
    pub ca: CertAuthority,
    /// The application CA.
    pub apps_ca: CertAuthority,
    revoked: std::sync::Mutex<(Vec<RevokedEntry>, Vec<RevokedEntry>, u64)>,
}

impl PairPki {
    /// New CAs, their certificates and empty CRLs written to `dir`.
    pub fn new(dir: &Path) -> Result<Self, TlsError> {
        let ca = CertAuthority::generate("qkd kme pair node ca")?;
        let apps_ca = CertAuthority::generate("qkd kme pair application ca")?;
        qkd_tls::write_pem(&dir.join("ca.crt"), ca.cert_pem(), false)?;
        qkd_tls::write_pem(&dir.join("apps-ca.crt"), apps_ca.cert_pem(), false)?;
        let pki =
            Self { dir: dir.to_owned(), ca, apps_ca, revoked: std::sync::Mutex::new((Vec::new(), Vec::new(), 0)) };
        pki.write_crls()?;
        Ok(pki)
    }

    /// The directory holding the PKI's files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn write_crls(&self) -> Result<(), TlsError> {
        let mut revoked = self.revoked.lock().unwrap_or_else(|e| e.into_inner());
        revoked.2 += 1;
        let nodes = self.ca.crl(&revoked.0, revoked.2, 1)?;
        let apps = self.apps_ca.crl(&revoked.1, revoked.2, 1)?;
        qkd_tls::write_pem(&self.dir.join("nodes.crl"), &nodes, false)?;
        qkd_tls::write_pem(&self.dir.join("apps.crl"), &apps, false)
    }

    /// Revokes a node certificate of this PKI (PEM) and rewrites the CRLs, which the running
    /// KMEs read again at their next handshake.
    pub fn revoke_node(&self, cert_pem: &str) -> Result<(), TlsError> {
        self.revoke(cert_pem, true)
    }

    /// Revokes an SAE certificate of this PKI (PEM) and rewrites the CRLs.
    pub fn revoke_sae(&self, cert_pem: &str) -> Result<(), TlsError> {
        self.revoke(cert_pem, false)
    }

    fn revoke(&self, cert_pem: &str, node: bool) -> Result<(), TlsError> {
        let entry = RevokedEntry::now(qkd_tls::ca::serial_of(cert_pem)?, Some(rcgen::RevocationReason::KeyCompromise));
        {
            let mut revoked = self.revoked.lock().unwrap_or_else(|e| e.into_inner());
            if node { revoked.0.push(entry) } else { revoked.1.push(entry) }
        }
        self.write_crls()
    }

    /// A node certificate (KME-to-KME channel) for `name`, in memory, checked against the
    /// node CRL.
    pub fn node(&self, name: &str) -> Result<TlsMaterial, TlsError> {
        let issued = self.ca.issue(name, &[name, "localhost"], true)?;
        Ok(TlsMaterial {
            ca_pem: self.ca.cert_pem().to_owned(),
            cert_pem: issued.cert_pem,
            key_pem: issued.key_pem,
            crl_files: vec![self.dir.join("nodes.crl")],
            peer_spki_sha256: Vec::new(),
        })
    }

    /// The HTTPS server files of KME `name` (valid for localhost and 127.0.0.1; SAE clients
    /// checked against the application CA and its CRL).
    pub fn https_files(&self, name: &str) -> Result<TlsFiles, TlsError> {
        let issued = self.ca.issue(name, &["localhost"], true)?;
        let (cert, key) = qkd_tls::write_issued(&self.dir, name, &issued)?;
        Ok(TlsFiles {
            ca_cert: self.dir.join("apps-ca.crt"),
            cert,
            key,
            crls: vec![self.dir.join("apps.crl")],
            peer_spki_sha256: Vec::new(),
        })
    }

    /// A client certificate whose CN is `sae_id`, from the application CA.
    pub fn sae(&self, sae_id: &str) -> Result<IssuedCert, TlsError> {
        self.apps_ca.issue_client(sae_id)
    }

    /// Writes `sae_id`'s certificate and key into one PEM file at `path` (owner-only).
    pub fn write_sae_pem(&self, sae_id: &str, path: &Path) -> Result<(), TlsError> {
        let issued = self.sae(sae_id)?;
        let pem = Zeroizing::new(format!("{}{}", issued.cert_pem, issued.key_pem.as_str()));
        qkd_tls::write_pem(path, &pem, true)
    }
}

/// One running KME of the pair.
pub struct RunningKme {
    /// Its HTTPS address (SAEs).
    pub addr: SocketAddr,
    /// Its KME-to-KME gRPC address.
    pub peer_addr: SocketAddr,
    /// Its store.
    pub store: Arc<SledStore>,
    /// Its node certificate and key (KME-to-KME channel).
    pub node: TlsMaterial,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), KmeError>>,
}

impl RunningKme {
    /// Stops the KME and waits for it; its error, if it failed (a panic of the KME's task is
    /// resumed here).
    pub async fn stop(self) -> Result<(), KmeError> {
        self.shutdown.cancel();
        match self.task.await {
            Ok(result) => result,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(KmeError::Io(std::io::Error::other(e))),
        }
    }
}

/// Two KMEs (A on Alice's side, B on Bob's) sharing the same ready units.
pub struct KmePair {
    /// The PKI.
    pub pki: PairPki,
    /// Alice's KME.
    pub a: RunningKme,
    /// Bob's KME.
    pub b: RunningKme,
    /// The units, in the order given to the stores.
    pub units: Vec<KeyUnit>,
}

impl KmePair {
    /// Starts a pair on loopback (ports chosen by the system), its PKI files in `pki_dir`. Must
    /// run inside a tokio runtime.
    pub async fn start(options: &PairOptions, pki_dir: &Path) -> Result<Self, PairError> {
        let pki = PairPki::new(pki_dir)?;
        let units = random_units(options.n_units);
        // Random test keys, not a QKD link's: marked (and served) as simulated.
        let meta = test_block_meta(options.n_units, true);
        let bind = || async { TcpListener::bind("127.0.0.1:0").await.map_err(PairError::Bind) };
        let (https_a, peer_a, https_b, peer_b) = (bind().await?, bind().await?, bind().await?, bind().await?);
        let (peer_addr_a, peer_addr_b) = (local(&peer_a)?, local(&peer_b)?);
        let saes: Vec<SaeEntry> = (options.a_saes.iter().map(|s| (s, KME_A)))
            .chain(options.b_saes.iter().map(|s| (s, KME_B)))
            .map(|(s, kme)| SaeEntry { sae_id: s.clone(), kme_id: kme.into() })
            .collect();
        let config = |me: &str, peer: &str, https: &TcpListener, listen: SocketAddr, to: SocketAddr, name: &str| {
            Ok::<_, PairError>(KmeConfig {
                listen: local(https)?,
                tls: pki.https_files(me)?,
                peer_listen: listen,
                peer_addr: to.to_string(),
                peer_name: name.into(),
                kme_id: me.into(),
                peer_kme_id: peer.into(),
                saes: saes.clone(),
                identity: IdentitySource::Cn,
                key_size: 256,
                min_key_size: 64,
                max_key_size: 1024,
                max_key_per_request: options.max_key_per_request,
                max_key_count: 100_000,
                max_sae_id_count: 0,
                peer_timeout_ms: 3000,
                reservation_ttl_s: 0,
                allow_simulated_keys: options.allow_simulated_keys,
                audit_log: None,
                max_connections: options.abuse.max_connections,
                max_connections_per_sae: options.abuse.max_connections_per_sae,
                requests_per_second_per_sae: options.abuse.requests_per_second_per_sae,
                request_burst_per_sae: options.abuse.request_burst_per_sae,
                idle_timeout_s: options.abuse.idle_timeout.as_secs(),
            })
        };
        let mut cfg_a = config(KME_A, KME_B, &https_a, peer_addr_a, peer_addr_b, "bob")?;
        let mut cfg_b = config(KME_B, KME_A, &https_b, peer_addr_b, peer_addr_a, "alice")?;
        if let Some((a, b)) = &options.audit_logs {
            (cfg_a.audit_log, cfg_b.audit_log) = (Some(a.clone()), Some(b.clone()));
        }
        let start = |cfg: KmeConfig, side: KmeSide, node: TlsMaterial, https: TcpListener, peer: TcpListener| {
            let store = Arc::new(SledStore::temporary()?);
            store.put_ready(&meta, &units)?;
            let shutdown = CancellationToken::new();
            let (addr, peer_addr) = (local(&https)?, local(&peer)?);
            let task = tokio::spawn({
                let (store, shutdown, node) = (store.clone(), shutdown.clone(), node.clone());
                async move {
                    crate::run_kme_with_listeners(&cfg, side, &node, store, https, peer, true, None, shutdown).await
                }
            });
            Ok::<_, PairError>(RunningKme { addr, peer_addr, store, node, shutdown, task })
        };
        let a = start(cfg_a, KmeSide::Alice, pki.node("alice")?, https_a, peer_a)?;
        let b = start(cfg_b, KmeSide::Bob, pki.node("bob")?, https_b, peer_b)?;
        Ok(Self { pki, a, b, units })
    }

    /// Stops both KMEs; the first error, if one failed.
    pub async fn stop(self) -> Result<(), KmeError> {
        let a = self.a.stop().await;
        let b = self.b.stop().await;
        a.and(b)
    }
}

fn local(listener: &TcpListener) -> Result<SocketAddr, PairError> {
    listener.local_addr().map_err(PairError::Bind)
}

/// Metadata of a fresh block of `n_units` ready units made up for a test or a benchmark (the KME
/// reads only the units; the link's statistics are zero).
pub fn test_block_meta(n_units: usize, simulated: bool) -> BlockMeta {
    BlockMeta {
        block_id: Uuid::new_v4(),
        created_unix_ms: 0,
        n_sifted_bits: 0,
        qber_z: 0.0,
        qber_x: 0.0,
        phase_error_upper: 0.0,
        leak_bits: 0,
        final_bits: 8 * (UNIT_BYTES * n_units) as u64,
        simulated,
    }
}

/// `n` units of random bytes with random UUIDs whose last byte alternates parity, so that each
/// KME owns exactly half (ownership: ARCHITECTURE.md, key delivery).
fn random_units(n: usize) -> Vec<KeyUnit> {
    let mut rng = rand::rng();
    (0..n)
        .map(|i| {
            let mut id = *Uuid::new_v4().as_bytes();
            id[15] = (id[15] & 0xfe) | (i % 2) as u8;
            let mut key = Zeroizing::new(vec![0u8; UNIT_BYTES]);
            rng.fill_bytes(&mut key);
            KeyUnit { key_id: Uuid::from_bytes(id), key }
        })
        .collect()
}
