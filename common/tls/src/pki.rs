//! The PKI of a deployment on disk, as `qkdctl pki` makes and runs it:
//!
//! ```text
//! DIR/ca/                 OFFLINE: never installed on a node (mode 0700)
//!     nodes-ca.crt nodes-ca.key   issuing CA of node certificates (link, KME-to-KME, KME HTTPS)
//!     apps-ca.crt  apps-ca.key    issuing CA of application (SAE) certificates
//!     nodes.crl    apps.crl       the CAs' revocation lists (RFC 5280, section 5)
//!     index.json                  every certificate issued: serial, names, validity, revocation
//! DIR/nodes/NAME/         a node's bundle, what is installed on it (e.g. in /etc/qkd/pki/):
//!     node.crt node.key           its certificate and key
//!     nodes-ca.crt apps-ca.crt    trust anchors: of its peer node, of the applications
//!     nodes.crl apps.crl          revocation lists (refreshed by `revoke` and `crl`)
//! DIR/apps/SAE_ID/        an application's bundle:
//!     sae.crt sae.key             its client certificate (CN = SAE ID) and key
//!     nodes-ca.crt                the trust anchor of the KMEs' HTTPS certificates
//! ```
//!
//! Both issuing CAs are self-signed with basic constraints CA, path length 0, and key usage
//! keyCertSign and cRLSign; the node CA may carry DNS name constraints. Node certificates have
//! extended key usage serverAuth and clientAuth, application certificates clientAuth only, so
//! that neither CA's certificates are accepted where the other's are expected: the link and the
//! KME-to-KME channel trust the node CA only, the KMEs' HTTPS servers the application CA only.
//! Private keys are written mode 0600.

use std::path::{Path, PathBuf};

use rcgen::RevocationReason;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use time::OffsetDateTime;

use crate::ca::{CaOptions, CertAuthority, DEFAULT_CRL_DAYS, IssuedCert, RevokedEntry, Validity, write_pem};
use crate::{TlsError, TlsFiles};

/// Subdirectory of the offline CA material.
pub const CA_DIR: &str = "ca";
/// Subdirectory of the node bundles.
pub const NODES_DIR: &str = "nodes";
/// Subdirectory of the application bundles.
pub const APPS_DIR: &str = "apps";
/// The node CA's certificate.
pub const NODES_CA_CRT: &str = "nodes-ca.crt";
const NODES_CA_KEY: &str = "nodes-ca.key";
/// The application CA's certificate.
pub const APPS_CA_CRT: &str = "apps-ca.crt";
const APPS_CA_KEY: &str = "apps-ca.key";
/// The node CA's revocation list.
pub const NODES_CRL: &str = "nodes.crl";
/// The application CA's revocation list.
pub const APPS_CRL: &str = "apps.crl";
const INDEX: &str = "index.json";

/// The two kinds of certificates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A node (Alice, Bob): TLS server and client.
    Node,
    /// An application (SAE): TLS client of a KME.
    Sae,
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::Node => "node",
            Kind::Sae => "sae",
        })
    }
}

/// One issued certificate in the index.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Record {
    /// Serial number, hex.
    pub serial: String,
    /// Node or application.
    pub kind: Kind,
    /// Node name or SAE ID (the subject common name).
    pub name: String,
    /// Subject alternative names (nodes).
    #[serde(default)]
    pub names: Vec<String>,
    /// Start of validity, UNIX seconds.
    pub not_before: i64,
    /// End of validity, UNIX seconds.
    pub not_after: i64,
    /// Whether it is the one in the bundle (false once renewed).
    pub current: bool,
    /// When it was revoked, UNIX seconds.
    #[serde(default)]
    pub revoked_at: Option<i64>,
    /// Why it was revoked (RFC 5280 reason code name).
    #[serde(default)]
    pub reason: Option<String>,
}

impl Record {
    /// "revoked", "expired", "superseded" or "valid", at `now` (UNIX seconds).
    pub fn status(&self, now: i64) -> &'static str {
        if self.revoked_at.is_some() {
            "revoked"
        } else if now > self.not_after {
            "expired"
        } else if !self.current {
            "superseded"
        } else {
            "valid"
        }
    }
}

#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
struct Index {
    records: Vec<Record>,
    #[serde(default)]
    permitted_dns: Vec<String>,
    nodes_crl_number: u64,
    apps_crl_number: u64,
    crl_days: u32,
}

/// Revocation reasons accepted by [`Pki::revoke`] (RFC 5280, 5.3.1).
pub const REASONS: [&str; 6] =
    ["unspecified", "key-compromise", "ca-compromise", "affiliation-changed", "superseded", "cessation-of-operation"];

fn reason_code(reason: &str) -> Option<RevocationReason> {
    Some(match reason {
        "unspecified" => RevocationReason::Unspecified,
        "key-compromise" => RevocationReason::KeyCompromise,
        "ca-compromise" => RevocationReason::CaCompromise,
        "affiliation-changed" => RevocationReason::AffiliationChanged,
        "superseded" => RevocationReason::Superseded,
        "cessation-of-operation" => RevocationReason::CessationOfOperation,
        _ => return None,
    })
}

/// What `qkdctl pki init` makes.
#[derive(Clone, Debug)]
pub struct InitOptions {
    /// Common name of the node CA.
    pub nodes_ca_name: String,
    /// Common name of the application CA.
    pub apps_ca_name: String,
    /// Validity of the CAs, days.
    pub ca_days: u32,
    /// Validity of the certificates issued now, days.
    pub days: u32,
    /// DNS name constraints of the node CA (empty: none).
    pub permitted_dns: Vec<String>,
    /// Nodes to issue now: name and SANs.
    pub nodes: Vec<(String, Vec<String>)>,
    /// SAEs to issue now.
    pub saes: Vec<String>,
}

/// A PKI directory (see the module documentation for its layout).
#[derive(Clone, Debug)]
pub struct Pki {
    dir: PathBuf,
}

fn now_unix() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp()
}

fn create_dir(path: &Path, private: bool) -> Result<(), TlsError> {
    let err = |source| TlsError::Write { path: path.to_owned(), source };
    std::fs::create_dir_all(path).map_err(err)?;
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
    }
    #[cfg(not(unix))]
    let _ = private;
    Ok(())
}

fn read(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|source| TlsError::Read { path: path.to_owned(), source })
}

fn copy(from: &Path, to: &Path) -> Result<(), TlsError> {
    write_pem(to, &read(from)?, false)
}

/// Checks that a node name or SAE ID can name a directory.
fn check_name(name: &str) -> Result<(), TlsError> {
    if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\\', '\0']) {
        return Err(TlsError::Pki(format!("{name:?} cannot name a directory (no '/', not empty)")));
    }
    Ok(())
}

/// Whether `name` satisfies DNS name constraints `permitted` (RFC 5280, 4.2.1.10): no
/// constraint, an IP address (not constrained by DNS subtrees), or the domain or a name under it.
fn permitted(permitted: &[String], name: &str) -> bool {
    if permitted.is_empty() || name.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    let name = name.to_ascii_lowercase();
    permitted.iter().any(|d| {
        let d = d.trim_start_matches('.').to_ascii_lowercase();
        name == d || name.ends_with(&format!(".{d}"))
    })
}

/// Serial number and validity of a certificate, PEM.
fn cert_facts(pem: &str) -> Result<(String, i64, i64), TlsError> {
    let der =
        CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| TlsError::Config(format!("certificate: {e}")))?;
    let (_, cert) =
        x509_parser::parse_x509_certificate(der.as_ref()).map_err(|e| TlsError::Config(format!("certificate: {e}")))?;
    let validity = cert.validity();
    Ok((hex::encode(cert.raw_serial()), validity.not_before.timestamp(), validity.not_after.timestamp()))
}

impl Pki {
    /// Whether `dir` holds an initialized PKI.
    pub fn exists(dir: &Path) -> bool {
        dir.join(CA_DIR).join(INDEX).exists()
    }

    /// Opens the PKI in `dir`.
    pub fn open(dir: &Path) -> Result<Self, TlsError> {
        if !Self::exists(dir) {
            return Err(TlsError::Pki(format!(
                "{} holds no PKI (no {CA_DIR}/{INDEX}); run `qkdctl pki init` first",
                dir.display()
            )));
        }
        Ok(Self { dir: dir.to_owned() })
    }

    /// Creates the two CAs, their empty CRLs, and the node and application bundles asked for.
    /// Refuses a directory that already holds CA material.
    pub fn init(dir: &Path, options: &InitOptions) -> Result<Self, TlsError> {
        let ca_dir = dir.join(CA_DIR);
        for f in [NODES_CA_CRT, NODES_CA_KEY, APPS_CA_CRT, APPS_CA_KEY, INDEX] {
            if ca_dir.join(f).exists() {
                return Err(TlsError::Pki(format!(
                    "{} already exists; refusing to overwrite a CA",
                    ca_dir.join(f).display()
                )));
            }
        }
        create_dir(&ca_dir, true)?;
        for (name, crt, key) in
            [(&options.nodes_ca_name, NODES_CA_CRT, NODES_CA_KEY), (&options.apps_ca_name, APPS_CA_CRT, APPS_CA_KEY)]
        {
            let permitted_dns = if crt == NODES_CA_CRT { options.permitted_dns.clone() } else { Vec::new() };
            let ca = CertAuthority::generate_with(&CaOptions {
                common_name: name.clone(),
                days: options.ca_days,
                permitted_dns,
            })?;
            write_pem(&ca_dir.join(key), ca.key_pem(), true)?;
            write_pem(&ca_dir.join(crt), ca.cert_pem(), false)?;
        }
        let pki = Self { dir: dir.to_owned() };
        pki.save(&Index {
            crl_days: DEFAULT_CRL_DAYS,
            permitted_dns: options.permitted_dns.clone(),
            ..Index::default()
        })?;
        pki.refresh_crls(None)?;
        for (name, names) in &options.nodes {
            pki.issue_node(name, names, options.days)?;
        }
        for sae in &options.saes {
            pki.issue_sae(sae, options.days)?;
        }
        Ok(pki)
    }

    /// The PKI's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The offline CA directory.
    pub fn ca_dir(&self) -> PathBuf {
        self.dir.join(CA_DIR)
    }

    /// The bundle directory of a certificate.
    pub fn bundle_dir(&self, kind: Kind, name: &str) -> PathBuf {
        match kind {
            Kind::Node => self.dir.join(NODES_DIR).join(name),
            Kind::Sae => self.dir.join(APPS_DIR).join(name),
        }
    }

    /// The certificate file in a bundle.
    pub fn cert_path(&self, kind: Kind, name: &str) -> PathBuf {
        self.bundle_dir(kind, name).join(match kind {
            Kind::Node => "node.crt",
            Kind::Sae => "sae.crt",
        })
    }

    /// The private key file in a bundle.
    pub fn key_path(&self, kind: Kind, name: &str) -> PathBuf {
        self.bundle_dir(kind, name).join(match kind {
            Kind::Node => "node.key",
            Kind::Sae => "sae.key",
        })
    }

    /// The TLS files of node `name` for the classical channel and the KME-to-KME channel: its
    /// certificate and key, the node CA as trust anchor and its CRL.
    pub fn node_files(&self, name: &str) -> TlsFiles {
        let bundle = self.bundle_dir(Kind::Node, name);
        TlsFiles {
            ca_cert: bundle.join(NODES_CA_CRT),
            cert: bundle.join("node.crt"),
            key: bundle.join("node.key"),
            crls: vec![bundle.join(NODES_CRL)],
            peer_spki_sha256: Vec::new(),
        }
    }

    /// The TLS files of node `name`'s KME HTTPS server: its certificate and key, the
    /// application CA as trust anchor and its CRL.
    pub fn kme_files(&self, name: &str) -> TlsFiles {
        let bundle = self.bundle_dir(Kind::Node, name);
        TlsFiles {
            ca_cert: bundle.join(APPS_CA_CRT),
            cert: bundle.join("node.crt"),
            key: bundle.join("node.key"),
            crls: vec![bundle.join(APPS_CRL)],
            peer_spki_sha256: Vec::new(),
        }
    }

    /// The trust anchor an application uses to verify the KMEs (in its bundle).
    pub fn sae_trust_anchor(&self, sae: &str) -> PathBuf {
        self.bundle_dir(Kind::Sae, sae).join(NODES_CA_CRT)
    }

    fn load(&self) -> Result<Index, TlsError> {
        let path = self.ca_dir().join(INDEX);
        serde_json::from_str(&read(&path)?).map_err(|e| TlsError::Pki(format!("{}: {e}", path.display())))
    }

    fn save(&self, index: &Index) -> Result<(), TlsError> {
        let json = serde_json::to_string_pretty(index).expect("the index serializes");
        write_pem(&self.ca_dir().join(INDEX), &json, false)
    }

    fn authority(&self, kind: Kind) -> Result<CertAuthority, TlsError> {
        let (crt, key) = match kind {
            Kind::Node => (NODES_CA_CRT, NODES_CA_KEY),
            Kind::Sae => (APPS_CA_CRT, APPS_CA_KEY),
        };
        let ca_dir = self.ca_dir();
        CertAuthority::from_pem(&read(&ca_dir.join(crt))?, &read(&ca_dir.join(key))?)
    }

    /// Every certificate issued, oldest first.
    pub fn records(&self) -> Result<Vec<Record>, TlsError> {
        Ok(self.load()?.records)
    }

    /// The current record of `name`.
    pub fn current(&self, kind: Kind, name: &str) -> Result<Record, TlsError> {
        self.load()?
            .records
            .into_iter()
            .rev()
            .find(|r| r.kind == kind && r.name == name && r.current)
            .ok_or_else(|| TlsError::Pki(format!("no {kind} certificate named {name:?} in this PKI")))
    }

    /// The validity of a new certificate: `days` from now, but never past its CA's end.
    fn validity(&self, kind: Kind, days: u32) -> Result<Validity, TlsError> {
        let crt = if kind == Kind::Node { NODES_CA_CRT } else { APPS_CA_CRT };
        let (_, _, ca_end) = cert_facts(&read(&self.ca_dir().join(crt))?)?;
        let mut validity = Validity::days(days);
        let ca_end = OffsetDateTime::from_unix_timestamp(ca_end).map_err(|e| TlsError::Pki(e.to_string()))?;
        if validity.not_after > ca_end {
            validity.not_after = ca_end;
        }
        Ok(validity)
    }

    /// Issues node `name`'s certificate (SANs `names`; IP addresses become IP SANs) valid
    /// `days`, and writes its bundle. Refuses a node that already has one (see
    /// [`Pki::renew`]).
    pub fn issue_node(&self, name: &str, names: &[String], days: u32) -> Result<Record, TlsError> {
        check_name(name)?;
        if names.is_empty() {
            return Err(TlsError::Pki(format!("node {name:?} needs at least one DNS name or IP address")));
        }
        self.issue(Kind::Node, name, names, days, None, false)
    }

    /// Issues application `sae`'s client certificate (CN = the SAE ID) valid `days`, and writes
    /// its bundle. Refuses an SAE that already has one (see [`Pki::renew`]).
    pub fn issue_sae(&self, sae: &str, days: u32) -> Result<Record, TlsError> {
        check_name(sae)?;
        self.issue(Kind::Sae, sae, &[], days, None, false)
    }

    fn issue(
        &self,
        kind: Kind,
        name: &str,
        names: &[String],
        days: u32,
        key: Option<&str>,
        renew: bool,
    ) -> Result<Record, TlsError> {
        let mut index = self.load()?;
        let issued_before = index.records.iter().any(|r| r.kind == kind && r.name == name && r.current);
        if !renew && (issued_before || self.cert_path(kind, name).exists()) {
            return Err(TlsError::Pki(format!(
                "{kind} {name:?} already has a certificate ({}); use `qkdctl pki renew`",
                self.cert_path(kind, name).display()
            )));
        }
        if let Some(name) = names.iter().find(|n| !permitted(&index.permitted_dns, n)) {
            return Err(TlsError::Pki(format!(
                "{name} is outside the node CA's name constraint ({})",
                index.permitted_dns.join(", ")
            )));
        }
        let ca = self.authority(kind)?;
        let validity = self.validity(kind, days)?;
        let issued: IssuedCert = match kind {
            Kind::Node => ca.issue_node(name, names, validity, key)?,
            Kind::Sae => ca.issue_sae(name, validity, key)?,
        };
        let bundle = self.bundle_dir(kind, name);
        create_dir(&bundle, true)?;
        write_pem(&self.key_path(kind, name), &issued.key_pem, true)?;
        write_pem(&self.cert_path(kind, name), &issued.cert_pem, false)?;
        let ca_dir = self.ca_dir();
        copy(&ca_dir.join(NODES_CA_CRT), &bundle.join(NODES_CA_CRT))?;
        if kind == Kind::Node {
            copy(&ca_dir.join(APPS_CA_CRT), &bundle.join(APPS_CA_CRT))?;
            copy(&ca_dir.join(NODES_CRL), &bundle.join(NODES_CRL))?;
            copy(&ca_dir.join(APPS_CRL), &bundle.join(APPS_CRL))?;
        }
        let (serial, not_before, not_after) = cert_facts(&issued.cert_pem)?;
        for record in index.records.iter_mut().filter(|r| r.kind == kind && r.name == name) {
            record.current = false;
        }
        let record = Record {
            serial,
            kind,
            name: name.to_owned(),
            names: names.to_vec(),
            not_before,
            not_after,
            current: true,
            revoked_at: None,
            reason: None,
        };
        index.records.push(record.clone());
        self.save(&index)?;
        Ok(record)
    }

    /// Issues a new certificate for `name` with the same names, valid `days` from now. It keeps
    /// the private key (pins of it stay valid) unless `new_key`. The old certificate stays
    /// valid until it expires, unless `revoke_old` (reason superseded).
    pub fn renew(
        &self,
        kind: Kind,
        name: &str,
        days: u32,
        new_key: bool,
        revoke_old: bool,
    ) -> Result<Record, TlsError> {
        let old = self.current(kind, name)?;
        let key = if new_key { None } else { Some(zeroize::Zeroizing::new(read(&self.key_path(kind, name))?)) };
        let record = self.issue(kind, name, &old.names, days, key.as_ref().map(|k| k.as_str()), true)?;
        if revoke_old {
            self.revoke_serial(&old.serial, "superseded")?;
        }
        Ok(record)
    }

    /// Revokes the current certificate of `name` and rewrites the CRLs (in `ca/` and in every
    /// node bundle of this directory). `reason` is one of [`REASONS`].
    pub fn revoke(&self, kind: Kind, name: &str, reason: &str) -> Result<Record, TlsError> {
        let record = self.current(kind, name)?;
        self.revoke_serial(&record.serial, reason)
    }

    /// Revokes the certificate with serial `serial` (hex) and rewrites the CRLs.
    pub fn revoke_serial(&self, serial: &str, reason: &str) -> Result<Record, TlsError> {
        if reason_code(reason).is_none() {
            return Err(TlsError::Pki(format!("unknown revocation reason {reason:?}; one of {}", REASONS.join(", "))));
        }
        let mut index = self.load()?;
        let serial = serial.to_ascii_lowercase().replace(':', "");
        let record = index
            .records
            .iter_mut()
            .find(|r| r.serial == serial)
            .ok_or_else(|| TlsError::Pki(format!("no certificate with serial {serial} in this PKI")))?;
        if record.revoked_at.is_some() {
            return Err(TlsError::Pki(format!("{} {} (serial {serial}) is already revoked", record.kind, record.name)));
        }
        record.revoked_at = Some(now_unix());
        record.reason = Some(reason.to_owned());
        let record = record.clone();
        self.save(&index)?;
        self.refresh_crls(None)?;
        Ok(record)
    }

    /// Writes fresh CRLs of both CAs (new numbers, thisUpdate now, nextUpdate in `days` or the
    /// last value used) into `ca/` and every node bundle of this directory. Copy them to the
    /// nodes: the daemons read them again when the files change.
    pub fn refresh_crls(&self, days: Option<u32>) -> Result<(), TlsError> {
        let mut index = self.load()?;
        if let Some(days) = days {
            index.crl_days = days;
        }
        let days = if index.crl_days == 0 { DEFAULT_CRL_DAYS } else { index.crl_days };
        let ca_dir = self.ca_dir();
        for kind in [Kind::Node, Kind::Sae] {
            let revoked: Vec<RevokedEntry> = index
                .records
                .iter()
                .filter(|r| r.kind == kind)
                .filter_map(|r| {
                    Some(RevokedEntry {
                        serial: hex::decode(&r.serial).ok()?,
                        revoked_at: OffsetDateTime::from_unix_timestamp(r.revoked_at?).ok()?,
                        reason: r.reason.as_deref().and_then(reason_code),
                    })
                })
                .collect();
            let number = match kind {
                Kind::Node => &mut index.nodes_crl_number,
                Kind::Sae => &mut index.apps_crl_number,
            };
            *number += 1;
            let crl = self.authority(kind)?.crl(&revoked, *number, days)?;
            write_pem(&ca_dir.join(if kind == Kind::Node { NODES_CRL } else { APPS_CRL }), &crl, false)?;
        }
        self.save(&index)?;
        let nodes = self.dir.join(NODES_DIR);
        if let Ok(entries) = std::fs::read_dir(&nodes) {
            for entry in entries.flatten() {
                let bundle = entry.path();
                if bundle.join("node.crt").exists() {
                    copy(&ca_dir.join(NODES_CRL), &bundle.join(NODES_CRL))?;
                    copy(&ca_dir.join(APPS_CRL), &bundle.join(APPS_CRL))?;
                }
            }
        }
        Ok(())
    }
}

/// The PKI of a two-node lab (`qkdctl lab`, the tests): a [`Pki`] whose nodes are `alice` and
/// `bob`, each valid for its name, `localhost` and 127.0.0.1.
#[derive(Clone, Debug)]
pub struct LabPki {
    /// The directory holding the PKI.
    pub dir: PathBuf,
    pki: Pki,
}

impl std::ops::Deref for LabPki {
    type Target = Pki;
    fn deref(&self) -> &Pki {
        &self.pki
    }
}

impl LabPki {
    /// Node names the lab PKI issues certificates for.
    pub const NODES: [&'static str; 2] = ["alice", "bob"];

    /// Opens the PKI in `dir`, creating it (CAs and both nodes' bundles) if it holds none.
    pub fn open_or_create(dir: &Path) -> Result<Self, TlsError> {
        let pki = if Pki::exists(dir) {
            Pki::open(dir)?
        } else {
            let nodes = Self::NODES
                .iter()
                .map(|n| (n.to_string(), vec![n.to_string(), "localhost".into(), "127.0.0.1".into()]))
                .collect();
            Pki::init(
                dir,
                &InitOptions {
                    nodes_ca_name: "QKD lab node CA".into(),
                    apps_ca_name: "QKD lab application CA".into(),
                    ca_days: crate::ca::DEFAULT_CA_DAYS,
                    days: crate::ca::DEFAULT_CERT_DAYS,
                    permitted_dns: Vec::new(),
                    nodes,
                    saes: Vec::new(),
                },
            )?
        };
        Ok(Self { dir: dir.to_owned(), pki })
    }

    /// The TLS files of `node` for the classical channel and the KME-to-KME channel.
    pub fn files(&self, node: &str) -> TlsFiles {
        self.pki.node_files(node)
    }

    /// Issues `sae`'s certificate unless its bundle already holds one.
    pub fn ensure_sae(&self, sae: &str) -> Result<(), TlsError> {
        if !self.cert_path(Kind::Sae, sae).exists() {
            self.pki.issue_sae(sae, crate::ca::DEFAULT_CERT_DAYS)?;
        }
        Ok(())
    }
}
