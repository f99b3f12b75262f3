//! The PKI of `qkdctl pki` against the real servers: node bundles without CA keys, revocation
//! honoured by the classical channel, the KME-to-KME channel and the KMEs' HTTPS servers (the
//! CRL files are reread at the next handshake, without a restart), expired certificates and
//! pinned peer keys. Real TLS, real certificates, loopback sockets.

use qkd_kme::pair::{KmePair, PairOptions};
use qkd_kme::{GrpcPeer, KmeId};
use qkd_tls::pki::{InitOptions, Kind, Pki};
use qkd_tls::{CertAuthority, TlsMaterial, Validity};

use std::time::Instant;

use super::*;

fn init_options() -> InitOptions {
    InitOptions {
        nodes_ca_name: "test node CA".into(),
        apps_ca_name: "test application CA".into(),
        ca_days: 3650,
        days: 365,
        permitted_dns: vec!["example.net".into()],
        nodes: vec![
            ("alice".into(), vec!["qkd-a.example.net".into(), "127.0.0.1".into()]),
            ("bob".into(), vec!["qkd-b.example.net".into()]),
        ],
        saes: vec!["app-a".into()],
    }
}

/// `qkdctl pki init` (the library it calls): a node bundle holds exactly its certificate, its
/// key, the trust anchors and the CRLs; its only private key is the node's own, which is neither
/// CA's; the CAs are constrained; node and SAE certificates have their own extended key usages.
#[test]
fn node_bundle_holds_no_ca_private_key() {
    let dir = TempDir::new("pki-init");
    let pki = Pki::init(&dir.0, &init_options()).unwrap();
    let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap();
    let ca_dir = pki.ca_dir();
    let ca_public_keys: Vec<Vec<u8>> =
        ["nodes-ca.key", "apps-ca.key"].iter().map(|f| rcgen_public_key(&read(&ca_dir.join(f)))).collect();
    let mut files: Vec<String> = std::fs::read_dir(pki.bundle_dir(Kind::Node, "alice"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    assert_eq!(files, ["apps-ca.crt", "apps.crl", "node.crt", "node.key", "nodes-ca.crt", "nodes.crl"]);
    let mut private_keys = 0;
    for f in &files {
        let text = read(&pki.bundle_dir(Kind::Node, "alice").join(f));
        if text.contains("PRIVATE KEY") {
            private_keys += 1;
            assert_eq!(f, "node.key");
            assert!(!ca_public_keys.contains(&rcgen_public_key(&text)), "{f} holds a CA private key");
        }
    }
    assert_eq!(private_keys, 1);
    // The node key matches the node certificate.
    let node_key = rcgen_public_key(&read(&pki.key_path(Kind::Node, "alice")));
    let shown = qkd_tls::ca::show(&read(&pki.cert_path(Kind::Node, "alice"))).unwrap();
    assert!(shown.contains(&hex_sha256(&node_key)), "node.key is not node.crt's key:\n{shown}");
    assert!(shown.contains("extended usage: serverAuth, clientAuth"), "{shown}");
    assert!(shown.contains("names:          qkd-a.example.net, 127.0.0.1"), "{shown}");
    let sae = qkd_tls::ca::show(&read(&pki.cert_path(Kind::Sae, "app-a"))).unwrap();
    assert!(sae.contains("extended usage: clientAuth\n"), "{sae}");
    assert!(sae.contains("CN=app-a"), "{sae}");
    for ca in ["nodes-ca.crt", "apps-ca.crt"] {
        let shown = qkd_tls::ca::show(&read(&ca_dir.join(ca))).unwrap();
        assert!(shown.contains("CA:             true (path length Some(0))"), "{ca}:\n{shown}");
    }
    // At most a year by default.
    let record = pki.current(Kind::Node, "alice").unwrap();
    assert!(record.not_after - record.not_before <= 366 * 86_400);
    // Outside the node CA's name constraint: refused at issuance (webpki also refuses such a
    // certificate under the constrained CA: qkd-tls's unit tests).
    let err = pki.issue_node("mallory", &["mallory.example.org".into()], 30).map(|_| ()).unwrap_err().to_string();
    assert!(err.contains("name constraint"), "{err}");
    // A second init on the same directory is refused, and nothing is overwritten.
    let before = read(&ca_dir.join("nodes-ca.crt"));
    assert!(Pki::init(&dir.0, &init_options()).is_err());
    assert_eq!(read(&ca_dir.join("nodes-ca.crt")), before);
}

fn rcgen_public_key(pem: &str) -> Vec<u8> {
    rcgen::PublicKeyData::subject_public_key_info(&rcgen::KeyPair::from_pem(pem).unwrap())
}

fn hex_sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// A revoked node certificate is refused on the classical channel in both directions: Alice
/// (already running) refuses Bob's once his revocation reaches her CRL file, and a client
/// refuses Alice's server certificate once hers is revoked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_node_certificate_is_refused_on_the_link() {
    let lab = Lab::new("revoke-link");
    let (grpc, fibre) = bind_pair().await;
    let grpc_addr = grpc.local_addr().unwrap();
    let alice = spawn_alice(&lab, grpc, fibre);
    let bob_material = lab.pki.files("bob").load().unwrap();
    let open = link_client(grpc_addr, &bob_material).await.unwrap();
    hello(&open).await.expect("bob's valid certificate was refused");

    lab.pki.revoke(Kind::Node, "bob", "key-compromise").unwrap();
    // A new connection fails its handshake.
    link_hello(grpc_addr, &bob_material).await.expect_err("bob's revoked certificate was accepted");
    let reason = refusal_of(&bob_material.cert_pem, "client").await;
    assert!(reason.starts_with("revoked"), "unexpected refusal: {reason}");
    // The connection opened before the revocation has its next request refused (the check of
    // an established session is reused for at most one second: wait that long, by deadline).
    let deadline = Instant::now() + Duration::from_secs(5);
    let err = loop {
        match hello(&open).await {
            Err(e) => break e,
            Ok(()) => assert!(Instant::now() < deadline, "the open connection is still served after 5 s"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(err.starts_with("PermissionDenied") && err.contains("revoked"), "unexpected refusal: {err}");

    // Bob renews (new serial, same key): accepted again.
    lab.pki.renew(Kind::Node, "bob", 30, false, false).unwrap();
    let renewed = lab.pki.files("bob").load().unwrap();
    assert_eq!(renewed.key_pem.as_str(), bob_material.key_pem.as_str());
    link_hello(grpc_addr, &renewed).await.expect("bob's renewed certificate was refused");

    // Alice's own certificate revoked: the client side refuses her.
    lab.pki.revoke(Kind::Node, "alice", "key-compromise").unwrap();
    let err = link_hello(grpc_addr, &renewed).await.expect_err("alice's revoked certificate was accepted");
    assert!(err.contains("invalid peer certificate: Revoked"), "unexpected refusal: {err}");
    let alice_cert = std::fs::read_to_string(lab.pki.cert_path(Kind::Node, "alice")).unwrap();
    assert!(refusal_of(&alice_cert, "server").await.starts_with("revoked"));
    alice.stop().await.unwrap();
}

/// An expired node certificate is refused, and the refusal says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_node_certificate_is_refused_as_expired() {
    let lab = Lab::new("expired");
    let (grpc, fibre) = bind_pair().await;
    let grpc_addr = grpc.local_addr().unwrap();
    let alice = spawn_alice(&lab, grpc, fibre);
    let ca_dir = lab.pki.ca_dir();
    let read = |f: &str| std::fs::read_to_string(ca_dir.join(f)).unwrap();
    let ca = CertAuthority::from_pem(&read("nodes-ca.crt"), &read("nodes-ca.key")).unwrap();
    let now = time::OffsetDateTime::now_utc();
    let past = Validity { not_before: now - time::Duration::days(30), not_after: now - time::Duration::days(1) };
    let expired = ca.issue_node("bob", &["bob".into()], past, None).unwrap();
    let material = TlsMaterial {
        cert_pem: expired.cert_pem.clone(),
        key_pem: expired.key_pem,
        ..lab.pki.files("bob").load().unwrap()
    };
    link_hello(grpc_addr, &material).await.expect_err("an expired certificate was accepted");
    // Alice's reason, and the certificate as she logged it.
    let reason = refusal_of(&expired.cert_pem, "client").await;
    assert!(reason.starts_with("expired: not valid after"), "unexpected refusal: {reason}");
    let serial = hex::encode(qkd_tls::ca::serial_of(&expired.cert_pem).unwrap());
    let refusal = qkd_tls::verify::recent_refusals().into_iter().find(|r| r.serial == serial).unwrap();
    assert!(refusal.certificate.contains("CN=bob") && refusal.certificate.contains(&serial), "{refusal:?}");
    alice.stop().await.unwrap();
}

/// A client that pins Alice's public key accepts her, and refuses a server whose certificate
/// (from the same CA, valid for the name) holds another key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_peer_key_mismatch_is_refused() {
    let lab = Lab::new("pin");
    let (grpc, fibre) = bind_pair().await;
    let grpc_addr = grpc.local_addr().unwrap();
    let alice = spawn_alice(&lab, grpc, fibre);
    let alice_cert = std::fs::read_to_string(lab.pki.cert_path(Kind::Node, "alice")).unwrap();
    let der = rustls_pki_types::pem::PemObject::from_pem_slice(alice_cert.as_bytes()).unwrap();
    let alice_pin = qkd_tls::verify::spki_sha256(&der).unwrap();
    let mut bob = lab.pki.files("bob");
    bob.peer_spki_sha256 = vec![hex::encode(alice_pin)];
    link_hello(grpc_addr, &bob.load().unwrap()).await.expect("the pinned key was refused");

    let mut other = alice_pin;
    other[0] ^= 1;
    bob.peer_spki_sha256 = vec![hex::encode(other)];
    let err = link_hello(grpc_addr, &bob.load().unwrap()).await.expect_err("a key mismatching the pin was accepted");
    assert!(err.contains("ApplicationVerificationFailure"), "unexpected refusal: {err}");
    alice.stop().await.unwrap();
}

/// The KME-to-KME channel: once B's node certificate is revoked, A's client refuses B's server
/// and A's server refuses a client presenting B's certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_node_certificate_is_refused_on_the_kme_channel() {
    init();
    let dir = TempDir::new("revoke-kme");
    let pair = KmePair::start(&PairOptions::default(), &dir.0).await.unwrap();
    let timeout = Duration::from_secs(3);
    let a_to_b = GrpcPeer::connect_lazy(&pair.b.peer_addr.to_string(), "bob", &pair.a.node, timeout).unwrap();
    assert_eq!(a_to_b.ping().await.unwrap(), KmeId("KME_B".into()));
    let b_to_a = GrpcPeer::connect_lazy(&pair.a.peer_addr.to_string(), "alice", &pair.b.node, timeout).unwrap();
    assert_eq!(b_to_a.ping().await.unwrap(), KmeId("KME_A".into()));

    pair.pki.revoke_node(&pair.b.node.cert_pem).unwrap();
    // B's open connection to A: its next call is refused by A's re-check of B's certificate
    // (a success is reused for at most one second: poll until the deadline).
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        match b_to_a.ping().await {
            Err(status) => break status,
            Ok(_) => assert!(Instant::now() < deadline, "B's open connection is still served after 5 s"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("revoked"), "{status:?}");
    // New connections (an open one keeps its verified session).
    let a_to_b = GrpcPeer::connect_lazy(&pair.b.peer_addr.to_string(), "bob", &pair.a.node, timeout).unwrap();
    let err = error_chain(&a_to_b.ping().await.expect_err("A accepted B's revoked server certificate"));
    assert!(err.contains("invalid peer certificate: Revoked"), "unexpected refusal: {err}");
    let b_to_a = GrpcPeer::connect_lazy(&pair.a.peer_addr.to_string(), "alice", &pair.b.node, timeout).unwrap();
    b_to_a.ping().await.expect_err("A accepted B's revoked client certificate");
    let reason = refusal_of(&pair.b.node.cert_pem, "client").await;
    assert!(reason.starts_with("revoked"), "unexpected refusal: {reason}");
    pair.stop().await.unwrap();
}

/// A KME's HTTPS server refuses a revoked SAE certificate, and keeps serving the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_sae_certificate_is_refused_by_the_kme() {
    init();
    let dir = TempDir::new("revoke-sae");
    let pair = KmePair::start(&PairOptions::default(), &dir.0).await.unwrap();
    let (revoked, kept) = (pair.pki.sae("sae-a1").unwrap(), pair.pki.sae("sae-a2").unwrap());
    let status = |issued: &qkd_tls::IssuedCert| {
        // A fresh client each time: no pooled connection outlives the revocation.
        let identity = format!("{}\n{}", issued.cert_pem, issued.key_pem.as_str());
        let client = reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(pair.pki.ca.cert_pem().as_bytes()).unwrap()])
            .identity(reqwest::Identity::from_pem(identity.as_bytes()).unwrap())
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        let url = format!("https://localhost:{}/api/v1/keys/sae-b1/status", pair.a.addr.port());
        async move { client.get(url).send().await.map(|r| r.status().as_u16()).map_err(|e| error_chain(&e)) }
    };
    assert_eq!(status(&revoked).await, Ok(200));
    pair.pki.revoke_sae(&revoked.cert_pem).unwrap();
    status(&revoked).await.expect_err("a revoked SAE certificate was served");
    let reason = refusal_of(&revoked.cert_pem, "client").await;
    assert!(reason.starts_with("revoked"), "unexpected refusal: {reason}");
    assert_eq!(status(&kept).await, Ok(200));
    pair.stop().await.unwrap();
}
