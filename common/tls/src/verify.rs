//! Peer certificate verification: rustls's `WebPkiClientVerifier` / `WebPkiServerVerifier` (chain
//! to the configured CAs, validity period, extended key usage, name constraints, revocation per
//! RFC 5280 CRLs), wrapped so that
//! * the CRL files are read again whenever one of them changes (checked at each handshake: a
//!   revocation takes effect at the next connection, without a restart);
//! * the peer's public key can be pinned (SHA-256 of its SubjectPublicKeyInfo);
//! * every refusal is logged with the certificate it refuses (subject, serial, validity) and a
//!   plain reason ("expired", "revoked", ...).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, Error, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, ServerName, UnixTime};
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use crate::TlsError;

/// SHA-256 of a certificate's SubjectPublicKeyInfo (the value to pin), or `None` when the
/// certificate cannot be parsed.
pub fn spki_sha256(cert: &CertificateDer<'_>) -> Option<[u8; 32]> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    Some(Sha256::digest(parsed.tbs_certificate.subject_pki.raw).into())
}

/// A one-line description of a certificate for logs: subject, serial, issuer and validity.
pub fn describe(cert: &CertificateDer<'_>) -> String {
    match x509_parser::parse_x509_certificate(cert.as_ref()) {
        Ok((_, c)) => format!(
            "\"{}\" (serial {}, issuer \"{}\", valid {} to {})",
            c.subject(),
            hex::encode(c.raw_serial()),
            c.issuer(),
            c.validity().not_before,
            c.validity().not_after
        ),
        Err(_) => format!("(unparsable certificate of {} bytes)", cert.as_ref().len()),
    }
}

/// Why a certificate was refused, in plain words.
pub fn refusal_reason(error: &Error) -> String {
    let Error::InvalidCertificate(e) = error else {
        return error.to_string();
    };
    match e {
        CertificateError::Expired => "expired".into(),
        CertificateError::ExpiredContext { time, not_after } => format!(
            "expired: not valid after {} (UNIX), {} s ago",
            not_after.as_secs(),
            time.as_secs().saturating_sub(not_after.as_secs())
        ),
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => "not valid yet".into(),
        CertificateError::Revoked => "revoked: listed in its issuer's certificate revocation list".into(),
        CertificateError::UnknownRevocationStatus => {
            "revocation status unknown: no revocation list of its issuer is configured".into()
        }
        CertificateError::ExpiredRevocationList | CertificateError::ExpiredRevocationListContext { .. } => {
            "the revocation list of its issuer has expired".into()
        }
        CertificateError::UnknownIssuer => "not issued by a trusted CA".into(),
        CertificateError::ApplicationVerificationFailure => {
            "its public key does not match the pinned SPKI SHA-256".into()
        }
        CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
            "not valid for this use (extended key usage)".into()
        }
        other => other.to_string(),
    }
}

/// State of the CRL files: their identity (modification time, size, inode) when last read.
type Stamp = Vec<Option<(SystemTime, u64, u64)>>;

fn stamp(files: &[PathBuf]) -> Stamp {
    files
        .iter()
        .map(|f| {
            let m = std::fs::metadata(f).ok()?;
            #[cfg(unix)]
            let ino = std::os::unix::fs::MetadataExt::ino(&m);
            #[cfg(not(unix))]
            let ino = 0;
            Some((m.modified().ok()?, m.len(), ino))
        })
        .collect()
}

/// Reads CRL files (PEM, or DER when the file holds no PEM block).
pub fn read_crls(files: &[PathBuf]) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    use rustls_pki_types::pem::PemObject;
    let mut crls = Vec::new();
    for file in files {
        let bytes = std::fs::read(file).map_err(|source| TlsError::Read { path: file.clone(), source })?;
        let pem: Vec<_> = CertificateRevocationListDer::pem_slice_iter(&bytes)
            .collect::<Result<_, _>>()
            .map_err(|e| TlsError::Config(format!("{}: {e}", file.display())))?;
        if pem.is_empty() {
            crls.push(CertificateRevocationListDer::from(bytes));
        } else {
            crls.extend(pem);
        }
    }
    Ok(crls)
}

/// Builds a webpki verifier from the CRLs.
type Build<V> = Box<dyn Fn(Vec<CertificateRevocationListDer<'static>>) -> Result<Arc<V>, TlsError> + Send + Sync>;

/// A webpki verifier rebuilt when its CRL files change.
struct Reloading<V: ?Sized> {
    files: Vec<PathBuf>,
    build: Build<V>,
    state: Mutex<(Stamp, Arc<V>)>,
}

impl<V: ?Sized> Reloading<V> {
    fn new(files: Vec<PathBuf>, build: Build<V>) -> Result<Self, TlsError> {
        let stamp = stamp(&files);
        let verifier = build(read_crls(&files)?)?;
        Ok(Self { files, build, state: Mutex::new((stamp, verifier)) })
    }

    /// The verifier with the CRLs as they are on disk now. A file that changed but cannot be
    /// read or parsed (being copied over, say) leaves the last good lists in force.
    fn current(&self) -> Arc<V> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if self.files.is_empty() {
            return state.1.clone();
        }
        let now = stamp(&self.files);
        if now != state.0 {
            match read_crls(&self.files).and_then(|crls| (self.build)(crls)) {
                Ok(verifier) => {
                    info!(files = ?self.files, "revocation lists reloaded");
                    *state = (now, verifier);
                }
                Err(e) => {
                    warn!(error = %e, "a revocation list changed but cannot be loaded; the previous lists stay in force");
                    state.0 = now;
                }
            }
        }
        state.1.clone()
    }
}

/// Checks `end_entity` against the pins, if any.
fn check_pins(pins: &[[u8; 32]], end_entity: &CertificateDer<'_>) -> Result<(), Error> {
    if pins.is_empty() {
        return Ok(());
    }
    match spki_sha256(end_entity) {
        Some(hash) if pins.contains(&hash) => Ok(()),
        _ => Err(Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)),
    }
}

/// A certificate this process refused.
#[derive(Clone, Debug, PartialEq)]
pub struct Refusal {
    /// "client" (refused by a server) or "server" (refused by a client).
    pub side: &'static str,
    /// The certificate, as [`describe`] gives it.
    pub certificate: String,
    /// Its serial number, hex.
    pub serial: String,
    /// Why, as [`refusal_reason`] gives it.
    pub reason: String,
}

/// The last refusals of the process (at most [`MAX_REFUSALS`]), oldest first.
static REFUSALS: Mutex<std::collections::VecDeque<Refusal>> = Mutex::new(std::collections::VecDeque::new());

/// How many refusals [`recent_refusals`] keeps.
pub const MAX_REFUSALS: usize = 64;

/// The last certificates this process refused, oldest first: what a peer that sees only a closed
/// connection (TLS 1.3 client certificates are judged after the client's handshake has ended)
/// can learn from the refusing side.
pub fn recent_refusals() -> Vec<Refusal> {
    REFUSALS.lock().unwrap_or_else(|e| e.into_inner()).iter().cloned().collect()
}

fn log_refusal(side: &'static str, end_entity: &CertificateDer<'_>, error: &Error) {
    let reason = refusal_reason(error);
    let serial = x509_parser::parse_x509_certificate(end_entity.as_ref())
        .map(|(_, c)| hex::encode(c.raw_serial()))
        .unwrap_or_default();
    {
        let mut refusals = REFUSALS.lock().unwrap_or_else(|e| e.into_inner());
        if refusals.len() == MAX_REFUSALS {
            refusals.pop_front();
        }
        refusals.push_back(Refusal { side, certificate: describe(end_entity), serial, reason: reason.clone() });
    }
    let spki = spki_sha256(end_entity).map(hex::encode).unwrap_or_default();
    warn!(
        certificate = %describe(end_entity),
        spki_sha256 = %spki,
        reason = %reason,
        "refused the {side} certificate {}: {reason}",
        describe(end_entity)
    );
}

/// What both wrappers share.
struct Common {
    provider: Arc<CryptoProvider>,
    pins: Vec<[u8; 32]>,
}

impl Common {
    fn tls12(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }
    fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }
    fn schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// Verifies client certificates (servers that require one).
pub struct ClientVerifier {
    inner: Reloading<dyn ClientCertVerifier>,
    subjects: Vec<DistinguishedName>,
    common: Common,
}

impl std::fmt::Debug for ClientVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientVerifier")
            .field("crls", &self.inner.files)
            .field("pins", &self.common.pins.len())
            .finish()
    }
}

impl ClientVerifier {
    /// A verifier of client certificates chaining to `roots`, checked against the CRL files
    /// (when any is given, the revocation status of every certificate of the chain must be
    /// known: a CRL of each issuer is required) and the pins.
    pub fn new(
        roots: Arc<RootCertStore>,
        crl_files: Vec<PathBuf>,
        pins: Vec<[u8; 32]>,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, TlsError> {
        let subjects = roots.subjects();
        let build_provider = provider.clone();
        let inner = Reloading::new(
            crl_files,
            Box::new(move |crls| {
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), build_provider.clone())
                    .with_crls(crls)
                    .build()
                    .map_err(|e| TlsError::Config(format!("client certificate verifier: {e}")))
            }),
        )?;
        Ok(Self { inner, subjects, common: Common { provider, pins } })
    }
}

impl ClientCertVerifier for ClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.subjects
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let result = self
            .inner
            .current()
            .verify_client_cert(end_entity, intermediates, now)
            .and_then(|ok| check_pins(&self.common.pins, end_entity).map(|()| ok));
        if let Err(e) = &result {
            log_refusal("client", end_entity, e);
        }
        result
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.common.tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.common.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.common.schemes()
    }
}

/// Verifies server certificates (clients).
pub struct ServerVerifier {
    inner: Reloading<rustls::client::WebPkiServerVerifier>,
    common: Common,
}

impl std::fmt::Debug for ServerVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerVerifier")
            .field("crls", &self.inner.files)
            .field("pins", &self.common.pins.len())
            .finish()
    }
}

impl ServerVerifier {
    /// A verifier of server certificates chaining to `roots`, checked against the CRL files
    /// (see [`ClientVerifier::new`]) and the pins.
    pub fn new(
        roots: Arc<RootCertStore>,
        crl_files: Vec<PathBuf>,
        pins: Vec<[u8; 32]>,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, TlsError> {
        let build_provider = provider.clone();
        let inner = Reloading::new(
            crl_files,
            Box::new(move |crls| {
                rustls::client::WebPkiServerVerifier::builder_with_provider(roots.clone(), build_provider.clone())
                    .with_crls(crls)
                    .build()
                    .map_err(|e| TlsError::Config(format!("server certificate verifier: {e}")))
            }),
        )?;
        Ok(Self { inner, common: Common { provider, pins } })
    }
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let result = self
            .inner
            .current()
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            .and_then(|ok| check_pins(&self.common.pins, end_entity).map(|()| ok));
        if let Err(e) = &result {
            log_refusal("server", end_entity, e);
        }
        result
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.common.tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.common.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.common.schemes()
    }
}

/// Checks the certificate of an established connection again, at each request: a session
/// outlives its handshake (the classical channel stays open for hours), and a certificate that
/// is revoked (the CRL file changed), expires, or stops matching the pins meanwhile must stop
/// being served without waiting for the next handshake. A success is reused for one second for
/// the same certificate, so that a busy channel verifies about once a second.
pub struct PeerCheck {
    verifier: ClientVerifier,
    last_ok: Mutex<Option<(Vec<u8>, std::time::Instant)>>,
}

/// How long a successful [`PeerCheck`] is reused for the same certificate.
pub const PEER_CHECK_REUSE: std::time::Duration = std::time::Duration::from_secs(1);

impl PeerCheck {
    pub(crate) fn new(verifier: ClientVerifier) -> Self {
        Self { verifier, last_ok: Mutex::new(None) }
    }

    /// Verifies the peer's chain (`certs[0]` is its certificate) as at a handshake; the
    /// refusal's reason otherwise (also logged, with the certificate).
    pub fn check(&self, certs: &[CertificateDer<'_>]) -> Result<(), String> {
        let Some((leaf, intermediates)) = certs.split_first() else {
            return Err("no client certificate".into());
        };
        let mut last_ok = self.last_ok.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((der, at)) = last_ok.as_ref()
            && der.as_slice() == leaf.as_ref()
            && at.elapsed() < PEER_CHECK_REUSE
        {
            return Ok(());
        }
        match self.verifier.verify_client_cert(leaf, intermediates, UnixTime::now()) {
            Ok(_) => {
                *last_ok = Some((leaf.as_ref().to_vec(), std::time::Instant::now()));
                Ok(())
            }
            Err(e) => {
                *last_ok = None;
                Err(refusal_reason(&e))
            }
        }
    }
}
