//! Certificate authorities and what they sign (RFC 5280 profiles made with rcgen): issuing CAs
//! (basic constraints CA with path length 0, key usage keyCertSign and cRLSign, optional DNS name
//! constraints), node certificates (TLS server and client authentication), application (SAE)
//! certificates (TLS client authentication only), and certificate revocation lists.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, GeneralSubtree, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, NameConstraints,
    RevocationReason, RevokedCertParams, SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};

use crate::TlsError;

/// Default validity of node and application certificates, days.
pub const DEFAULT_CERT_DAYS: u32 = 365;

/// Default validity of the issuing CAs, days (ten years).
pub const DEFAULT_CA_DAYS: u32 = 3650;

/// Default time until a CRL's nextUpdate, days.
pub const DEFAULT_CRL_DAYS: u32 = 30;

/// A validity period.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    /// First instant of validity.
    pub not_before: OffsetDateTime,
    /// Last instant of validity.
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// From one hour ago (clock skew between hosts) to `days` days from now.
    pub fn days(days: u32) -> Self {
        let now = OffsetDateTime::now_utc();
        Self { not_before: now - Duration::hours(1), not_after: now + Duration::days(i64::from(days)) }
    }
}

/// A certificate authority that issues node and application certificates, and CRLs.
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

/// Options of a new issuing CA.
#[derive(Clone, Debug)]
pub struct CaOptions {
    /// Subject common name.
    pub common_name: String,
    /// Validity, days.
    pub days: u32,
    /// DNS name constraints (RFC 5280, 4.2.1.10): when not empty, every DNS name of a
    /// certificate the CA signs must be one of these domains or under one of them.
    pub permitted_dns: Vec<String>,
}

impl CaOptions {
    /// A CA named `common_name`, valid [`DEFAULT_CA_DAYS`], without name constraints.
    pub fn new(common_name: &str) -> Self {
        Self { common_name: common_name.to_owned(), days: DEFAULT_CA_DAYS, permitted_dns: Vec::new() }
    }
}

/// One revoked certificate, for a CRL.
#[derive(Clone, Debug)]
pub struct RevokedEntry {
    /// Its serial number, big-endian bytes.
    pub serial: Vec<u8>,
    /// When it was revoked.
    pub revoked_at: OffsetDateTime,
    /// Why (RFC 5280, 5.3.1), if given.
    pub reason: Option<RevocationReason>,
}

impl RevokedEntry {
    /// `serial` revoked now.
    pub fn now(serial: Vec<u8>, reason: Option<RevocationReason>) -> Self {
        Self { serial, revoked_at: OffsetDateTime::now_utc(), reason }
    }
}

/// The serial number of a certificate (the first of a PEM file), big-endian bytes.
pub fn serial_of(cert_pem: &str) -> Result<Vec<u8>, TlsError> {
    use rustls_pki_types::pem::PemObject;
    let bad = |e: &dyn std::fmt::Display| TlsError::Config(format!("certificate: {e}"));
    let der = rustls_pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| bad(&e))?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).map_err(|e| bad(&e))?;
    Ok(cert.raw_serial().to_vec())
}

fn common_name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

/// A random positive serial number of 16 bytes (RFC 5280, 4.1.2.2: at most 20 octets).
pub fn random_serial() -> Vec<u8> {
    let mut bytes = vec![0u8; 16];
    crate::provider().secure_random.fill(&mut bytes).expect("the system random source failed");
    bytes[0] = (bytes[0] & 0x7f) | 0x40; // positive, and no leading zero byte to strip
    bytes
}

impl CertAuthority {
    /// Creates a new self-signed issuing CA with the given common name, valid ten years, path
    /// length 0 (it signs end-entity certificates only).
    pub fn generate(common_name: &str) -> Result<Self, TlsError> {
        Self::generate_with(&CaOptions::new(common_name))
    }

    /// Creates a new self-signed issuing CA: basic constraints CA with path length 0 (critical),
    /// key usage keyCertSign and cRLSign (critical), and the name constraints asked for.
    pub fn generate_with(options: &CaOptions) -> Result<Self, TlsError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = common_name(&options.common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let validity = Validity::days(options.days);
        (params.not_before, params.not_after) = (validity.not_before, validity.not_after);
        params.serial_number = Some(SerialNumber::from(random_serial()));
        params.key_identifier_method = KeyIdMethod::Sha256;
        if !options.permitted_dns.is_empty() {
            params.name_constraints = Some(NameConstraints {
                permitted_subtrees: options.permitted_dns.iter().map(|d| GeneralSubtree::DnsName(d.clone())).collect(),
                excluded_subtrees: Vec::new(),
            });
        }
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

    /// Issues a node certificate valid [`DEFAULT_CERT_DAYS`] with common name `common_name` and
    /// the given DNS names (and 127.0.0.1 when `loopback`).
    pub fn issue(&self, common_name: &str, dns_names: &[&str], loopback: bool) -> Result<IssuedCert, TlsError> {
        let mut names: Vec<String> = dns_names.iter().map(|s| s.to_string()).collect();
        if loopback {
            names.push(std::net::Ipv4Addr::LOCALHOST.to_string());
        }
        self.issue_for(common_name, &names)
    }

    /// Issues a node certificate for `names`, valid [`DEFAULT_CERT_DAYS`] (see
    /// [`CertAuthority::issue_node`]).
    pub fn issue_for(&self, common_name: &str, names: &[String]) -> Result<IssuedCert, TlsError> {
        self.issue_node(common_name, names, Validity::days(DEFAULT_CERT_DAYS), None)
    }

    /// Issues a node certificate: entries of `names` that parse as IP addresses become IP SANs,
    /// the others DNS SANs; key usage digitalSignature and keyEncipherment, extended key usage
    /// TLS server and TLS client authentication. With `key`, the certificate is for that key
    /// (a renewal that keeps pins valid); otherwise a new P-256 key is made.
    pub fn issue_node(
        &self,
        common_name: &str,
        names: &[String],
        validity: Validity,
        key: Option<&str>,
    ) -> Result<IssuedCert, TlsError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        for name in names {
            params.subject_alt_names.push(match name.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(name.as_str().try_into()?),
            });
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params, common_name, validity, key)
    }

    /// Issues an application (SAE) client certificate valid [`DEFAULT_CERT_DAYS`] whose subject
    /// common name is `sae_id`.
    pub fn issue_client(&self, sae_id: &str) -> Result<IssuedCert, TlsError> {
        self.issue_sae(sae_id, Validity::days(DEFAULT_CERT_DAYS), None)
    }

    /// Issues an application (SAE) certificate: subject common name `sae_id`, no subject
    /// alternative name, key usage digitalSignature, extended key usage TLS client
    /// authentication only (an SAE never serves TLS).
    pub fn issue_sae(&self, sae_id: &str, validity: Validity, key: Option<&str>) -> Result<IssuedCert, TlsError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params, sae_id, validity, key)
    }

    fn sign(
        &self,
        mut params: CertificateParams,
        cn: &str,
        validity: Validity,
        key: Option<&str>,
    ) -> Result<IssuedCert, TlsError> {
        let key = match key {
            Some(pem) => KeyPair::from_pem(pem)?,
            None => KeyPair::generate()?,
        };
        params.distinguished_name = common_name(cn);
        (params.not_before, params.not_after) = (validity.not_before, validity.not_after);
        params.serial_number = Some(SerialNumber::from(random_serial()));
        params.use_authority_key_identifier_extension = true;
        params.key_identifier_method = KeyIdMethod::Sha256;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCert { cert_pem: cert.pem(), key_pem: zeroize::Zeroizing::new(key.serialize_pem()) })
    }

    /// A CRL (RFC 5280, section 5) signed by this CA, listing `revoked`, PEM.
    pub fn crl(&self, revoked: &[RevokedEntry], crl_number: u64, next_update_days: u32) -> Result<String, TlsError> {
        let now = OffsetDateTime::now_utc();
        let params = CertificateRevocationListParams {
            this_update: now - Duration::minutes(5),
            next_update: now + Duration::days(i64::from(next_update_days.max(1))),
            crl_number: SerialNumber::from(crl_number),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|r| RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&r.serial),
                    revocation_time: r.revoked_at,
                    reason_code: r.reason,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(&self.issuer)?.pem()?)
    }
}

/// Writes `contents` to `path`; private keys (`secret`) get mode 0600 before any byte is written.
/// The file is written beside its final name and renamed over it, so that a reader (a daemon
/// reloading a CRL) never sees half a file.
pub fn write_pem(path: &Path, contents: &str, secret: bool) -> Result<(), TlsError> {
    use std::io::Write;
    let err = |source| TlsError::Write { path: path.to_owned(), source };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if secret { 0o600 } else { 0o644 });
    }
    let mut file = options.open(&tmp).map_err(err)?;
    file.write_all(contents.as_bytes()).map_err(err)?;
    file.sync_all().map_err(err)?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(err)
}

/// Writes an issued certificate as `<dir>/<name>.crt` and `<dir>/<name>.key`.
pub fn write_issued(dir: &Path, name: &str, issued: &IssuedCert) -> Result<(PathBuf, PathBuf), TlsError> {
    let cert = dir.join(format!("{name}.crt"));
    let key = dir.join(format!("{name}.key"));
    write_pem(&key, &issued.key_pem, true)?;
    write_pem(&cert, &issued.cert_pem, false)?;
    Ok((cert, key))
}

/// A human-readable description of a certificate (the first of a PEM file): subject, issuer,
/// serial, validity, names, constraints, key usages and the SHA-256 of its SubjectPublicKeyInfo
/// (the value a peer pins with `peer_spki_sha256`).
pub fn show(cert_pem: &str) -> Result<String, TlsError> {
    use rustls_pki_types::pem::PemObject;
    use std::fmt::Write;
    use x509_parser::extensions::{GeneralName, ParsedExtension};
    let bad = |e: &dyn std::fmt::Display| TlsError::Config(format!("certificate: {e}"));
    let der = rustls_pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| bad(&e))?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).map_err(|e| bad(&e))?;
    let mut out = String::new();
    let _ = writeln!(out, "subject:        {}", cert.subject());
    let _ = writeln!(out, "issuer:         {}", cert.issuer());
    let _ = writeln!(out, "serial:         {}", hex::encode(cert.raw_serial()));
    let _ = writeln!(out, "not before:     {}", cert.validity().not_before);
    let _ = writeln!(out, "not after:      {}", cert.validity().not_after);
    for ext in cert.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => {
                let names: Vec<String> = san
                    .general_names
                    .iter()
                    .map(|n| match n {
                        GeneralName::DNSName(d) => d.to_string(),
                        GeneralName::IPAddress(ip) => match ip.len() {
                            4 => std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*ip).expect("4 bytes")).to_string(),
                            16 => std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*ip).expect("16 bytes")).to_string(),
                            _ => hex::encode(ip),
                        },
                        other => format!("{other:?}"),
                    })
                    .collect();
                let _ = writeln!(out, "names:          {}", names.join(", "));
            }
            ParsedExtension::BasicConstraints(bc) => {
                let _ = writeln!(out, "CA:             {} (path length {:?})", bc.ca, bc.path_len_constraint);
            }
            ParsedExtension::KeyUsage(ku) => {
                let _ = writeln!(out, "key usage:      {ku}");
            }
            ParsedExtension::ExtendedKeyUsage(eku) => {
                let mut uses = Vec::new();
                if eku.server_auth {
                    uses.push("serverAuth");
                }
                if eku.client_auth {
                    uses.push("clientAuth");
                }
                let _ = writeln!(out, "extended usage: {}", uses.join(", "));
            }
            ParsedExtension::NameConstraints(nc) => {
                let _ = writeln!(out, "constraints:    {nc:?}");
            }
            _ => {}
        }
    }
    let spki = crate::verify::spki_sha256(&der).map(hex::encode).unwrap_or_default();
    let _ = writeln!(out, "spki sha-256:   {spki}");
    Ok(out)
}
