//! Mutual TLS for the classical channel, and a small PKI for labs and tests.
//!
//! Both ends verify the other's certificate against a configured CA *and* an expected peer
//! name: the client checks the server's DNS SAN through rustls; the server checks the client's
//! certificate chain through rustls and its DNS SAN with [`peer_has_name`].

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, ServerName};

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
}

/// Paths of a node's TLS material: its certificate chain, its private key and the CA that
/// signs its peers.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// PEM file of the CA certificate that peers' certificates must chain to.
    pub ca_cert: PathBuf,
    /// PEM file of this node's certificate.
    pub cert: PathBuf,
    /// PEM file of this node's private key (keep it mode 0600).
    pub key: PathBuf,
}

/// PEM contents of [`TlsFiles`], read once at start-up.
#[derive(Clone)]
pub struct TlsMaterial {
    /// CA certificate, PEM.
    pub ca_pem: String,
    /// Node certificate, PEM.
    pub cert_pem: String,
    /// Node private key, PEM (never logged).
    pub key_pem: zeroize::Zeroizing<String>,
}

impl TlsFiles {
    /// Reads the three files.
    pub fn load(&self) -> Result<TlsMaterial, TlsError> {
        Ok(TlsMaterial {
            ca_pem: read(&self.ca_cert)?,
            cert_pem: read(&self.cert)?,
            key_pem: zeroize::Zeroizing::new(read(&self.key)?),
        })
    }
}

fn read(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|source| TlsError::Read { path: path.to_owned(), source })
}

impl TlsMaterial {
    /// Server side of the classical channel: presents this node's certificate and requires a
    /// client certificate chaining to the CA.
    pub fn tonic_server(&self) -> tonic::transport::ServerTlsConfig {
        tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(&self.cert_pem, self.key_pem.as_bytes()))
            .client_ca_root(tonic::transport::Certificate::from_pem(&self.ca_pem))
    }

    /// Client side of the classical channel: presents this node's certificate and accepts only
    /// a server certificate chaining to the CA and valid for `peer_name`.
    pub fn tonic_client(&self, peer_name: &str) -> tonic::transport::ClientTlsConfig {
        tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&self.ca_pem))
            .identity(tonic::transport::Identity::from_pem(&self.cert_pem, self.key_pem.as_bytes()))
            .domain_name(peer_name)
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

/// A certificate authority that issues node and application certificates.
pub struct CertAuthority {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    key_pem: zeroize::Zeroizing<String>,
}

/// A freshly issued certificate and its key, PEM.
pub struct IssuedCert {
    /// Certificate, PEM.
    pub cert_pem: String,
    /// Private key, PEM.
    pub key_pem: zeroize::Zeroizing<String>,
}

impl CertAuthority {
    /// Creates a new self-signed CA with the given common name.
    pub fn generate(common_name: &str) -> Result<Self, TlsError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let cert = params.self_signed(&key)?;
        let key_pem = zeroize::Zeroizing::new(key.serialize_pem());
        Ok(Self { cert_pem: cert.pem(), key_pem, issuer: Issuer::new(params, key) })
    }

    /// Loads an existing CA (yours or one made by `qkdctl pki init`) from its certificate and
    /// private key, PEM. Issued certificates name the CA certificate's subject as issuer.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        let key = KeyPair::from_pem(key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        Ok(Self { cert_pem: cert_pem.to_owned(), key_pem: zeroize::Zeroizing::new(key_pem.to_owned()), issuer })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key, PEM.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// Issues a certificate with common name `common_name` and the given DNS names (and
    /// 127.0.0.1 when `loopback`), usable both as TLS server and TLS client.
    pub fn issue(&self, common_name: &str, dns_names: &[&str], loopback: bool) -> Result<IssuedCert, TlsError> {
        let mut names: Vec<String> = dns_names.iter().map(|s| s.to_string()).collect();
        if loopback {
            names.push(std::net::Ipv4Addr::LOCALHOST.to_string());
        }
        self.issue_for(common_name, &names)
    }
}

impl CertAuthority {
    /// Issues a node certificate for `names`: entries that parse as IP addresses become IP SANs,
    /// the others DNS SANs; the common name is `common_name`.
    pub fn issue_for(&self, common_name: &str, names: &[String]) -> Result<IssuedCert, TlsError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        for name in names {
            params.subject_alt_names.push(match name.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(name.as_str().try_into()?),
            });
        }
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCert { cert_pem: cert.pem(), key_pem: zeroize::Zeroizing::new(key.serialize_pem()) })
    }

    /// Issues an application (SAE) client certificate whose subject common name is `sae_id`.
    pub fn issue_client(&self, sae_id: &str) -> Result<IssuedCert, TlsError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, sae_id);
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCert { cert_pem: cert.pem(), key_pem: zeroize::Zeroizing::new(key.serialize_pem()) })
    }
}

/// Writes `contents` to `path`; private keys (`secret`) get mode 0600 before any byte is written.
pub fn write_pem(path: &Path, contents: &str, secret: bool) -> Result<(), TlsError> {
    use std::io::Write;
    let err = |source| TlsError::Write { path: path.to_owned(), source };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if secret { 0o600 } else { 0o644 });
    }
    let mut file = options.open(path).map_err(err)?;
    file.write_all(contents.as_bytes()).map_err(err)?;
    Ok(())
}

/// Writes an issued certificate as `<dir>/<name>.crt` and `<dir>/<name>.key`.
pub fn write_issued(dir: &Path, name: &str, issued: &IssuedCert) -> Result<(PathBuf, PathBuf), TlsError> {
    let cert = dir.join(format!("{name}.crt"));
    let key = dir.join(format!("{name}.key"));
    write_pem(&cert, &issued.cert_pem, false)?;
    write_pem(&key, &issued.key_pem, true)?;
    Ok((cert, key))
}

/// The certificates of a two-node lab: one CA, Alice (`alice`) and Bob (`bob`), each valid for
/// its name, `localhost` and 127.0.0.1, written as PEM files in one directory.
#[derive(Clone, Debug)]
pub struct LabPki {
    /// The directory holding the files.
    pub dir: PathBuf,
}

impl LabPki {
    /// Node names the lab PKI issues certificates for.
    pub const NODES: [&'static str; 2] = ["alice", "bob"];

    /// Opens the PKI in `dir`, creating the CA and node certificates if `ca.crt` is missing.
    pub fn open_or_create(dir: &Path) -> Result<Self, TlsError> {
        let pki = Self { dir: dir.to_owned() };
        if dir.join("ca.crt").exists() {
            return Ok(pki);
        }
        std::fs::create_dir_all(dir).map_err(|source| TlsError::Write { path: dir.to_owned(), source })?;
        let ca = CertAuthority::generate("QKD lab CA")?;
        for node in Self::NODES {
            write_issued(dir, node, &ca.issue(node, &[node, "localhost"], true)?)?;
        }
        write_pem(&dir.join("ca.key"), ca.key_pem(), true)?;
        write_pem(&dir.join("ca.crt"), ca.cert_pem(), false)?;
        Ok(pki)
    }

    /// The TLS files of `node`.
    pub fn files(&self, node: &str) -> TlsFiles {
        TlsFiles {
            ca_cert: self.dir.join("ca.crt"),
            cert: self.dir.join(format!("{node}.crt")),
            key: self.dir.join(format!("{node}.key")),
        }
    }
}

/// Installs ring as the process-wide rustls crypto provider. Call it first thing in `main`
/// (and in tests): every TLS configuration of the process then uses the same provider.
pub fn install_crypto_provider() {
    // Err only means a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificate_is_valid_for_its_names_only() {
        let ca = CertAuthority::generate("test ca").unwrap();
        let issued = ca.issue("alice", &["alice", "localhost"], true).unwrap();
        let der = rustls_pki_types::pem::PemObject::from_pem_slice(issued.cert_pem.as_bytes()).unwrap();
        assert!(peer_has_name(&der, "alice"));
        assert!(peer_has_name(&der, "localhost"));
        assert!(!peer_has_name(&der, "bob"));
    }
}
