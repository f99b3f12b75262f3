//! Unit tests of the certificate profiles and the verifiers (real certificates, direct calls of
//! the rustls verifiers; the integration tests do the same over loopback sockets).

use std::sync::Arc;

use rustls::client::danger::ServerCertVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use super::*;
use crate::verify::{ClientVerifier, ServerVerifier, refusal_reason, spki_sha256};

fn der(pem: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
}

fn roots(ca: &CertAuthority) -> Arc<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der(ca.cert_pem())).unwrap();
    Arc::new(roots)
}

struct TempDir(PathBuf);
impl TempDir {
    fn new() -> Self {
        let mut bytes = [0u8; 8];
        provider().secure_random.fill(&mut bytes).unwrap();
        let dir = std::env::temp_dir().join(format!("qkd-tls-test-{}", hex::encode(bytes)));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn issued_certificate_is_valid_for_its_names_only() {
    let ca = CertAuthority::generate("test ca").unwrap();
    let issued = ca.issue("alice", &["alice", "localhost"], true).unwrap();
    let der = der(&issued.cert_pem);
    assert!(peer_has_name(&der, "alice"));
    assert!(peer_has_name(&der, "localhost"));
    assert!(!peer_has_name(&der, "bob"));
}

/// A CA reloaded from its PEM files signs CRLs that webpki matches to its certificates: the
/// revoked client is refused as revoked, the other accepted; and a CRL file rewritten while the
/// verifier lives is read at the next verification.
#[test]
fn crl_from_a_reloaded_ca_revokes_and_is_reread_when_the_file_changes() {
    let dir = TempDir::new();
    let generated = CertAuthority::generate("node ca").unwrap();
    let ca = CertAuthority::from_pem(generated.cert_pem(), generated.key_pem()).unwrap();
    let (bob, carol) = (ca.issue("bob", &["bob"], false).unwrap(), ca.issue("carol", &["carol"], false).unwrap());
    let crl = dir.0.join("nodes.crl");
    write_pem(&crl, &ca.crl(&[], 1, 30).unwrap(), false).unwrap();
    let verifier = ClientVerifier::new(roots(&ca), vec![crl.clone()], Vec::new(), provider()).unwrap();
    let now = UnixTime::now();
    verifier.verify_client_cert(&der(&bob.cert_pem), &[], now).expect("bob before revocation");

    let revoked = RevokedEntry::now(ca::serial_of(&bob.cert_pem).unwrap(), None);
    write_pem(&crl, &ca.crl(&[revoked], 2, 30).unwrap(), false).unwrap();
    let err = verifier.verify_client_cert(&der(&bob.cert_pem), &[], now).unwrap_err();
    assert_eq!(err, rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked));
    assert!(refusal_reason(&err).starts_with("revoked"));
    verifier.verify_client_cert(&der(&carol.cert_pem), &[], now).expect("carol is not revoked");

    // A CRL file that becomes unreadable leaves the last good list in force.
    std::fs::write(&crl, "garbage").unwrap();
    assert!(verifier.verify_client_cert(&der(&bob.cert_pem), &[], now).is_err());
    verifier.verify_client_cert(&der(&carol.cert_pem), &[], now).expect("carol with the last good list");
}

/// With a CRL configured, a certificate of an issuer that has no CRL there is refused (its status
/// is unknown); without any CRL there is no revocation checking.
#[test]
fn a_certificate_whose_issuer_has_no_crl_is_refused_when_crls_are_configured() {
    let dir = TempDir::new();
    let (ca, other) = (CertAuthority::generate("ca").unwrap(), CertAuthority::generate("other").unwrap());
    let crl = dir.0.join("other.crl");
    write_pem(&crl, &other.crl(&[], 1, 30).unwrap(), false).unwrap();
    let bob = ca.issue("bob", &["bob"], false).unwrap();
    let with_crl = ClientVerifier::new(roots(&ca), vec![crl], Vec::new(), provider()).unwrap();
    let err = with_crl.verify_client_cert(&der(&bob.cert_pem), &[], UnixTime::now()).unwrap_err();
    assert!(refusal_reason(&err).starts_with("revocation status unknown"), "{err}");
    let without = ClientVerifier::new(roots(&ca), Vec::new(), Vec::new(), provider()).unwrap();
    without.verify_client_cert(&der(&bob.cert_pem), &[], UnixTime::now()).unwrap();
}

/// Expired, not-yet-valid and foreign certificates are refused with plain reasons.
#[test]
fn validity_and_issuer_refusals_say_why() {
    let ca = CertAuthority::generate("ca").unwrap();
    let now = time::OffsetDateTime::now_utc();
    let day = time::Duration::days(1);
    let expired = ca
        .issue_node("bob", &["bob".into()], Validity { not_before: now - 10 * day, not_after: now - day }, None)
        .unwrap();
    let future = ca
        .issue_node("bob", &["bob".into()], Validity { not_before: now + day, not_after: now + 10 * day }, None)
        .unwrap();
    let foreign = CertAuthority::generate("foreign").unwrap().issue("bob", &["bob"], false).unwrap();
    let verifier = ClientVerifier::new(roots(&ca), Vec::new(), Vec::new(), provider()).unwrap();
    let reason = |pem: &str| refusal_reason(&verifier.verify_client_cert(&der(pem), &[], UnixTime::now()).unwrap_err());
    assert!(reason(&expired.cert_pem).starts_with("expired"), "{}", reason(&expired.cert_pem));
    assert_eq!(reason(&future.cert_pem), "not valid yet");
    assert_eq!(reason(&foreign.cert_pem), "not issued by a trusted CA");
    let described = verify::describe(&der(&expired.cert_pem));
    assert!(described.contains("CN=bob") && described.contains("serial"), "{described}");
}

/// An SAE certificate (clientAuth only) is not accepted as a TLS server certificate.
#[test]
fn sae_certificates_cannot_serve_tls() {
    let ca = CertAuthority::generate("apps").unwrap();
    let sae = ca.issue_client("app-a").unwrap();
    let node = ca.issue("app-a", &["app-a"], false).unwrap();
    let verifier = ServerVerifier::new(roots(&ca), Vec::new(), Vec::new(), provider()).unwrap();
    let name = ServerName::try_from("app-a").unwrap();
    let verify = |pem: &str| verifier.verify_server_cert(&der(pem), &[], &name, &[], UnixTime::now());
    verify(&node.cert_pem).expect("node certificate");
    let err = verify(&sae.cert_pem).unwrap_err();
    // An SAE certificate has no DNS name either; whichever check fails first, it is refused.
    assert!(matches!(err, rustls::Error::InvalidCertificate(_)), "{err}");
}

/// The node CA's DNS name constraint is enforced by the relying party (webpki), whatever the CA
/// was made to sign.
#[test]
fn name_constraints_are_enforced_by_the_verifier() {
    let options = CaOptions { permitted_dns: vec!["example.net".into()], ..CaOptions::new("constrained") };
    let ca = CertAuthority::generate_with(&options).unwrap();
    let inside = ca.issue_for("alice", &["qkd-a.example.net".into()]).unwrap();
    let outside = ca.issue_for("mallory", &["qkd-a.example.org".into()]).unwrap();
    let verifier = ServerVerifier::new(roots(&ca), Vec::new(), Vec::new(), provider()).unwrap();
    let at = |name: &'static str| ServerName::try_from(name).unwrap();
    verifier.verify_server_cert(&der(&inside.cert_pem), &[], &at("qkd-a.example.net"), &[], UnixTime::now()).unwrap();
    assert!(
        verifier
            .verify_server_cert(&der(&outside.cert_pem), &[], &at("qkd-a.example.org"), &[], UnixTime::now())
            .is_err()
    );
}

/// Pins: the pinned key passes, another key of the same CA is refused with the pin reason.
#[test]
fn pinned_key_mismatch_is_refused() {
    let ca = CertAuthority::generate("ca").unwrap();
    let (alice, impostor) =
        (ca.issue("alice", &["alice"], false).unwrap(), ca.issue("alice", &["alice"], false).unwrap());
    let pin = spki_sha256(&der(&alice.cert_pem)).unwrap();
    let verifier = ServerVerifier::new(roots(&ca), Vec::new(), vec![pin], provider()).unwrap();
    let name = ServerName::try_from("alice").unwrap();
    verifier.verify_server_cert(&der(&alice.cert_pem), &[], &name, &[], UnixTime::now()).unwrap();
    let err = verifier.verify_server_cert(&der(&impostor.cert_pem), &[], &name, &[], UnixTime::now()).unwrap_err();
    assert!(refusal_reason(&err).contains("pinned"), "{err}");
    assert_eq!(parse_pin(&hex::encode(pin)).unwrap(), pin);
    assert!(parse_pin("abc").is_err());
}

/// The PKI directory: renew keeps the key (pins survive) unless asked, revoke rewrites the CRLs
/// of the node bundles, a node cannot be issued twice.
#[test]
fn pki_directory_renew_and_revoke() {
    let dir = TempDir::new();
    let pki = LabPki::open_or_create(&dir.0).unwrap();
    let alice = pki.current(pki::Kind::Node, "alice").unwrap();
    assert!(pki.issue_node("alice", &["alice".into()], 30).is_err());
    let key = std::fs::read_to_string(pki.key_path(pki::Kind::Node, "alice")).unwrap();
    let renewed = pki.renew(pki::Kind::Node, "alice", 30, false, true).unwrap();
    assert_ne!(renewed.serial, alice.serial);
    assert_eq!(std::fs::read_to_string(pki.key_path(pki::Kind::Node, "alice")).unwrap(), key);
    let records = pki.records().unwrap();
    let old = records.iter().find(|r| r.serial == alice.serial).unwrap();
    assert_eq!(old.status(0), "revoked");
    let bob_crl = std::fs::read(pki.node_files("bob").crls[0].clone()).unwrap();
    let ca_crl = std::fs::read(pki.ca_dir().join(pki::NODES_CRL)).unwrap();
    assert_eq!(bob_crl, ca_crl, "the bundle's CRL is the CA's latest");
    // Bob's verifier (his bundle) refuses alice's old certificate, accepts the renewed one.
    let bob = pki.node_files("bob").load().unwrap();
    let verifier = ServerVerifier::new(bob.roots().unwrap(), bob.crl_files.clone(), Vec::new(), provider()).unwrap();
    let name = ServerName::try_from("alice").unwrap();
    let cert = std::fs::read_to_string(pki.cert_path(pki::Kind::Node, "alice")).unwrap();
    verifier.verify_server_cert(&der(&cert), &[], &name, &[], UnixTime::now()).unwrap();
    pki.renew(pki::Kind::Node, "alice", 30, true, false).unwrap();
    assert_ne!(std::fs::read_to_string(pki.key_path(pki::Kind::Node, "alice")).unwrap(), key);
    let crl_before = std::fs::read(pki.ca_dir().join(pki::APPS_CRL)).unwrap();
    pki.ensure_sae("app-a").unwrap();
    pki.revoke(pki::Kind::Sae, "app-a", "key-compromise").unwrap();
    assert_ne!(std::fs::read(pki.ca_dir().join(pki::APPS_CRL)).unwrap(), crl_before);
    assert!(pki.revoke(pki::Kind::Sae, "app-a", "key-compromise").is_err(), "revoked twice");
}
