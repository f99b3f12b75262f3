//! TLS for the node: mutual TLS of the classical channel, the KME-to-KME channel and the
//! key-delivery API, all built here on the one rustls crypto provider (ring); and the PKI that
//! `qkdctl pki` and the labs make.
//!
//! * [`TlsFiles`] / [`TlsMaterial`]: a node's certificate, key, trust anchors, certificate
//!   revocation lists (RFC 5280, section 5) and optional pins of the peer's public key.
//! * [`TlsMaterial::server_config`] / [`TlsMaterial::client_config`]: rustls configurations whose
//!   verifiers ([`verify`]) check the chain, validity, key usage, revocation (CRLs read again
//!   when their files change) and pins, and log every refusal with the certificate it refuses.
//! * [`TlsMaterial::grpc_incoming`] / [`TlsMaterial::grpc_connector`]: tonic over tokio-rustls.
//! * [`ca`]: issuing CAs, node and application certificates, CRLs; [`pki`]: the on-disk PKI of
//!   `qkdctl pki` (offline CA directory, node and application bundles, index, revocation).
//!
//! Both ends verify the other's certificate against the configured CAs *and* an expected peer
//! name: the client checks the server's DNS SAN through rustls; the server checks the client's
//! certificate chain through rustls and its DNS SAN with [`peer_has_name`].

pub mod ca;
mod net;
pub mod pki;
pub mod verify;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

pub use ca::{CaOptions, CertAuthority, IssuedCert, RevokedEntry, Validity, write_issued, write_pem};
pub use net::{HANDSHAKE_TIMEOUT, TlsConnector, TlsIncoming};
pub use pki::{LabPki, Pki};

/// Errors of TLS material handling.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate or key file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The IO error.
        source: std::io::Error,
    },
    /// A certificate or key file cannot be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The IO error.
        source: std::io::Error,
    },
    /// Certificate generation failed.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// A PEM file holds no usable certificate.
    #[error("{path} holds no PEM certificate")]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// The TLS material is unusable (the message says which part and why).
    #[error("TLS: {0}")]
    Config(String),
    /// A PKI directory operation is impossible (the message says why).
    #[error("PKI: {0}")]
    Pki(String),
}

/// Paths of a node's TLS material: its certificate chain, its private key, the CAs that sign its
/// peers, their revocation lists, and optionally pins of the peer's public key.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// PEM file of the CA certificate(s) that peers' certificates must chain to (the trust
    /// anchors; several may be concatenated).
    pub ca_cert: PathBuf,
    /// PEM file of this node's certificate.
    pub cert: PathBuf,
    /// PEM file of this node's private key (keep it mode 0600).
    pub key: PathBuf,
    /// Certificate revocation lists (PEM or DER) of the CAs of `ca_cert`. When any is given,
    /// a peer certificate whose issuer has no list here is refused (its status is unknown), and
    /// a revoked one is refused. The files are read again whenever they change. Default: none
    /// (no revocation checking).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub crls: Vec<PathBuf>,
    /// Pins of the peer's public key: hex SHA-256 of its certificate's SubjectPublicKeyInfo
    /// (`qkdctl pki show` prints it). When any is given, a peer whose certificate holds another
    /// key is refused even if the CA signed it. Several allow a key change without downtime.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peer_spki_sha256: Vec<String>,
}

/// The contents of [`TlsFiles`], read once at start-up (the CRLs are read by the verifiers,
/// again whenever their files change).
#[derive(Clone, Default)]
pub struct TlsMaterial {
    /// CA certificate(s), PEM.
    pub ca_pem: String,
    /// Node certificate, PEM.
    pub cert_pem: String,
    /// Node private key, PEM (never logged).
    pub key_pem: zeroize::Zeroizing<String>,
    /// CRL files.
    pub crl_files: Vec<PathBuf>,
    /// SHA-256 pins of the peer's SubjectPublicKeyInfo (empty: no pinning).
    pub peer_spki_sha256: Vec<[u8; 32]>,
}

impl TlsFiles {
    /// Reads the files and checks the pins' syntax. The CRLs must exist and parse.
    pub fn load(&self) -> Result<TlsMaterial, TlsError> {
        verify::read_crls(&self.crls)?;
        Ok(TlsMaterial {
            ca_pem: read(&self.ca_cert)?,
            cert_pem: read(&self.cert)?,
            key_pem: zeroize::Zeroizing::new(read(&self.key)?),
            crl_files: self.crls.clone(),
            peer_spki_sha256: self.peer_spki_sha256.iter().map(|p| parse_pin(p)).collect::<Result<_, _>>()?,
        })
    }

    /// Makes relative paths relative to `base` (the configuration file's directory).
    pub fn rebase(&mut self, base: &Path) {
        for path in [&mut self.ca_cert, &mut self.cert, &mut self.key].into_iter().chain(self.crls.iter_mut()) {
            if path.is_relative() {
                *path = base.join(&*path);
            }
        }
    }
}

impl TlsFiles {
    /// The fields as TOML `key = value` lines (paths as they are), for generated configurations.
    pub fn toml_lines(&self) -> String {
        let quote = |p: &Path| format!("{:?}", p.display().to_string());
        let mut lines =
            format!("ca_cert = {}\ncert = {}\nkey = {}\n", quote(&self.ca_cert), quote(&self.cert), quote(&self.key));
        if !self.crls.is_empty() {
            let crls: Vec<String> = self.crls.iter().map(|p| quote(p)).collect();
            lines.push_str(&format!("crls = [{}]\n", crls.join(", ")));
        }
        if !self.peer_spki_sha256.is_empty() {
            let pins: Vec<String> = self.peer_spki_sha256.iter().map(|p| format!("{p:?}")).collect();
            lines.push_str(&format!("peer_spki_sha256 = [{}]\n", pins.join(", ")));
        }
        lines
    }
}

/// Parses a pin: 64 hex digits (colons allowed between bytes).
pub fn parse_pin(pin: &str) -> Result<[u8; 32], TlsError> {
    let digits: String = pin.chars().filter(|c| *c != ':').collect();
    let bytes = hex::decode(&digits).ok().filter(|b| b.len() == 32);
    bytes
        .map(|b| b.try_into().expect("32 bytes"))
        .ok_or_else(|| TlsError::Config(format!("peer_spki_sha256: {pin:?} is not a SHA-256 in hex (64 hex digits)")))
}

fn read(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|source| TlsError::Read { path: path.to_owned(), source })
}

/// The process's crypto provider: the installed default, or ring (the one this crate installs).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()))
}

impl TlsMaterial {
    fn roots(&self) -> Result<Arc<rustls::RootCertStore>, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()) {
            let cert = cert.map_err(|e| TlsError::Config(format!("CA certificate: {e}")))?;
            roots.add(cert).map_err(|e| TlsError::Config(format!("CA certificate: {e}")))?;
        }
        if roots.is_empty() {
            return Err(TlsError::Config("the CA file holds no certificate".into()));
        }
        Ok(Arc::new(roots))
    }

    fn identity(&self) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
        let chain = CertificateDer::pem_slice_iter(self.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::Config(format!("certificate: {e}")))?;
        if chain.is_empty() {
            return Err(TlsError::Config("the certificate file holds no certificate".into()));
        }
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())
            .map_err(|e| TlsError::Config(format!("key: {e}")))?;
        Ok((chain, key))
    }

    /// A server configuration that presents this node's certificate and requires a client
    /// certificate chaining to the CAs, not revoked, and matching the pins. TLS 1.3 and 1.2;
    /// `alpn` lists the application protocols offered.
    pub fn server_config(&self, alpn: &[&[u8]]) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let provider = provider();
        let verifier = verify::ClientVerifier::new(
            self.roots()?,
            self.crl_files.clone(),
            self.peer_spki_sha256.clone(),
            provider.clone(),
        )?;
        let (chain, key) = self.identity()?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| TlsError::Config(format!("TLS versions: {e}")))?
            .with_client_cert_verifier(Arc::new(verifier))
            .with_single_cert(chain, key)
            .map_err(|e| TlsError::Config(format!("certificate and key: {e}")))?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    }

    /// A client configuration that presents this node's certificate and accepts a server
    /// certificate chaining to the CAs, not revoked, and matching the pins (the name is checked
    /// against the name the connection is made for). ALPN `h2`.
    pub fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        let provider = provider();
        let verifier = verify::ServerVerifier::new(
            self.roots()?,
            self.crl_files.clone(),
            self.peer_spki_sha256.clone(),
            provider.clone(),
        )?;
        let (chain, key) = self.identity()?;
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| TlsError::Config(format!("TLS versions: {e}")))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(chain, key)
            .map_err(|e| TlsError::Config(format!("certificate and key: {e}")))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    /// A re-check of connected peers' certificates at each request (see [`verify::PeerCheck`]),
    /// against the same CAs, CRLs and pins as [`TlsMaterial::server_config`].
    pub fn peer_check(&self) -> Result<verify::PeerCheck, TlsError> {
        let verifier = verify::ClientVerifier::new(
            self.roots()?,
            self.crl_files.clone(),
            self.peer_spki_sha256.clone(),
            provider(),
        )?;
        Ok(verify::PeerCheck::new(verifier))
    }

    /// The server side of a gRPC channel (the classical channel, the KME-to-KME channel):
    /// accepts mutual-TLS connections on `listener` for tonic's `serve_with_incoming_shutdown`.
    /// `channel` names the channel in logs. Must be called inside a tokio runtime.
    pub fn grpc_incoming(
        &self,
        listener: tokio::net::TcpListener,
        channel: &'static str,
    ) -> Result<TlsIncoming, TlsError> {
        Ok(net::tls_incoming(listener, self.server_config(&[b"h2"])?, channel))
    }

    /// The client side of a gRPC channel: a connector for tonic's
    /// `Endpoint::connect_with_connector` (use an `http://host:port` URI) that accepts only a
    /// server certificate valid for `peer_name`.
    pub fn grpc_connector(&self, peer_name: &str) -> Result<TlsConnector, TlsError> {
        let name = ServerName::try_from(peer_name.to_owned())
            .map_err(|e| TlsError::Config(format!("peer name {peer_name:?}: {e}")))?;
        Ok(TlsConnector::new(self.client_config()?, name))
    }
}

/// True when the end-entity certificate `cert` is valid for the DNS name `name` (its SANs).
/// The chain itself was already verified by rustls during the handshake.
pub fn peer_has_name(cert: &CertificateDer<'_>, name: &str) -> bool {
    let Ok(server_name) = ServerName::try_from(name) else {
        return false;
    };
    match webpki::EndEntityCert::try_from(cert) {
        Ok(ee) => ee.verify_is_valid_for_subject_name(&server_name).is_ok(),
        Err(_) => false,
    }
}

/// Installs ring as the process-wide rustls crypto provider. Call it first thing in `main`
/// (and in tests): every TLS configuration of the process then uses the same provider.
pub fn install_crypto_provider() {
    // Err only means a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[cfg(test)]
mod tests;
