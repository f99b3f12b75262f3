use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use uuid::Uuid;
use zeroize::Zeroizing;

use super::api::{self, EtsiError, KeyRequest};
use super::config::{KmeConfig, SaeEntry};
use super::identity::{IdentitySource, KmeSide, SaeId, sae_id_from_certificate};
use super::peer::{BoxFuture, CancelError, CancelOutcome, CancelRequest, ReserveError, ReservePeer, ReserveRequest};
use super::pool::KmeState;
use qkd_store::kme::UNIT_BYTES;
use qkd_store::{BlockMeta, KeyStore, KeyUnit, SledStore};

fn message(result: Result<impl std::fmt::Debug, EtsiError>) -> (u16, String) {
    match result {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => (e.status_code().as_u16(), e.to_string()),
    }
}

#[test]
fn key_request_parses_every_documented_form() {
    assert_eq!(KeyRequest::from_json(b"").unwrap(), KeyRequest::default());
    assert_eq!(KeyRequest::from_json(b" \n").unwrap(), KeyRequest::default());
    assert_eq!(KeyRequest::from_json(b"{}").unwrap(), KeyRequest::default());
    let r = KeyRequest::from_json(br#"{"number":3,"size":512,"unknown":[1],"extension_optional":[{"x":1}]}"#).unwrap();
    assert_eq!((r.number, r.size, r.extension_optional.len()), (Some(3), Some(512), 1));
    let r = KeyRequest::from_json(br#"{"number":null,"additional_slave_SAE_IDs":["a","b"]}"#).unwrap();
    assert_eq!(r.number, None);
    assert_eq!(r.additional_slave_sae_ids, vec![SaeId("a".into()), SaeId("b".into())]);
    let pairs =
        vec![("number".to_string(), "2".to_string()), ("size".into(), "128".into()), ("other".into(), "x".into())];
    let r = KeyRequest::from_query(&pairs).unwrap();
    assert_eq!((r.number, r.size), (Some(2), Some(128)));
}

#[test]
fn malformed_key_requests_are_400_with_a_clear_message() {
    for (body, expected) in [
        (&br#"{"number":1.5}"#[..], "number shall be an integer"),
        (br#"{"size":"256"}"#, "size shall be an integer"),
        (br#"{"extension_mandatory":{"a":1}}"#, "extension_mandatory shall be an array of objects"),
        (br#"{"extension_optional":{"a":1}}"#, "extension_optional shall be an array of objects"),
        (br#"{"extension_optional":[1]}"#, "extension_optional shall be an array of objects"),
        (br#"{"additional_slave_SAE_IDs":"s"}"#, "additional_slave_SAE_IDs shall be an array of strings"),
        (br#"[]"#, "request body shall be a JSON object"),
    ] {
        assert_eq!(
            message(KeyRequest::from_json(body)),
            (400, expected.to_string()),
            "{}",
            String::from_utf8_lossy(body)
        );
    }
    let (code, text) = message(KeyRequest::from_json(b"{"));
    assert_eq!(code, 400);
    assert!(text.starts_with("request body is not valid JSON"), "{text}");
    let pairs = vec![("number".to_string(), "x".to_string())];
    assert_eq!(message(KeyRequest::from_query(&pairs)), (400, "number shall be an integer".into()));
}

#[test]
fn key_ids_parse_and_refuse_malformed_lists() {
    let id = Uuid::new_v4();
    let body = format!(r#"{{"key_IDs":[{{"key_ID":"{id}","key_ID_extension":{{}}}}],"key_IDs_extension":{{}},"x":1}}"#);
    assert_eq!(api::key_ids_from_json(body.as_bytes()).unwrap(), vec![id]);
    let upper = id.to_string().to_uppercase();
    assert_eq!(api::key_ids_from_query(&[("key_ID".into(), upper)]).unwrap(), vec![id]);
    for body in [
        r#"{"key_IDs":[]}"#.to_string(),
        r#"{"key_IDs":[{"key_ID":"not-a-uuid"}]}"#.to_string(),
        format!(r#"{{"key_IDs":[{{"key_ID":"{}"}}]}}"#, id.simple()),
        r#"{"key_IDs":{"key_ID":"x"}}"#.to_string(),
        format!(r#"{{"key_IDs":[{{"key_ID":"{id}"}},{{"key_ID":"{id}"}}]}}"#),
        String::new(),
    ] {
        assert_eq!(message(api::key_ids_from_json(body.as_bytes())).0, 400, "{body}");
    }
    assert_eq!(message(api::key_ids_from_query(&[])).0, 400);
}

#[test]
fn sae_id_comes_from_the_common_name_or_the_uri_san() {
    use rcgen::{CertificateParams, DnType, KeyPair, SanType};
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["host.example".to_string()]).unwrap();
    params.distinguished_name.push(DnType::CommonName, "sae 1/é");
    params.subject_alt_names.push(SanType::URI("urn:sae:gw-1".try_into().unwrap()));
    let cert = params.self_signed(&key).unwrap();
    assert_eq!(sae_id_from_certificate(cert.der(), IdentitySource::Cn).unwrap(), SaeId("sae 1/é".into()));
    assert_eq!(sae_id_from_certificate(cert.der(), IdentitySource::UriSan).unwrap(), SaeId("urn:sae:gw-1".into()));
    let bare = CertificateParams::new(Vec::<String>::new()).unwrap().self_signed(&key).unwrap();
    assert!(sae_id_from_certificate(bare.der(), IdentitySource::UriSan).is_err());
    assert!(sae_id_from_certificate(b"junk", IdentitySource::Cn).is_err());
}

#[test]
fn unit_ownership_splits_by_the_last_byte() {
    let even = Uuid::from_bytes([0; 16]);
    let mut odd_bytes = [0; 16];
    odd_bytes[15] = 1;
    let odd = Uuid::from_bytes(odd_bytes);
    assert!(KmeSide::Alice.owns(&even) && !KmeSide::Bob.owns(&even));
    assert!(KmeSide::Bob.owns(&odd) && !KmeSide::Alice.owns(&odd));
}

const SECTION: &str = r#"
listen = "127.0.0.1:8443"
peer_listen = "127.0.0.1:50061"
peer_addr = "bob.example:50061"
peer_name = "bob"
kme_id = "KME_A"
peer_kme_id = "KME_B"
identity = "uri_san"
max_key_per_request = 16
tls = { ca_cert = "sae-ca.crt", cert = "kme.crt", key = "kme.key" }
saes = [ { sae_id = "m", kme_id = "KME_A" }, { sae_id = "s", kme_id = "KME_B" } ]
"#;

#[test]
fn config_section_parses_with_defaults_and_rejects_nonsense() {
    let cfg: KmeConfig = toml::from_str(SECTION).unwrap();
    let settings = cfg.settings().unwrap();
    assert_eq!(settings.identity, IdentitySource::UriSan);
    assert_eq!(
        (settings.limits.key_size, settings.limits.max_key_per_request, settings.limits.max_sae_id_count),
        (256, 16, 0)
    );
    assert!(toml::from_str::<KmeConfig>(&format!("{SECTION}\nunknown = 1")).is_err());
    for bad in [
        KmeConfig { key_size: 100, ..cfg.clone() },
        KmeConfig { min_key_size: 512, ..cfg.clone() },
        KmeConfig { max_key_per_request: 0, ..cfg.clone() },
        KmeConfig { peer_kme_id: "KME_A".into(), ..cfg.clone() },
        KmeConfig { saes: vec![SaeEntry { sae_id: "x".into(), kme_id: "KME_C".into() }], ..cfg.clone() },
        KmeConfig { saes: vec![cfg.saes[0].clone(), cfg.saes[0].clone()], ..cfg.clone() },
        KmeConfig { max_connections: 0, ..cfg.clone() },
        KmeConfig { max_connections_per_sae: 0, ..cfg.clone() },
        KmeConfig { request_burst_per_sae: 0, ..cfg.clone() },
        KmeConfig { idle_timeout_s: 0, ..cfg.clone() },
        // 4096 keys of 65536 bits: 1M unit IDs, far more than one KME-to-KME message holds.
        KmeConfig { max_key_per_request: 4096, max_key_size: 65_536, ..cfg.clone() },
    ] {
        assert!(bad.settings().is_err(), "{bad:?}");
    }
}

#[test]
fn the_abuse_limits_have_defaults_and_a_zero_rate_needs_no_burst() {
    let cfg: KmeConfig = toml::from_str(SECTION).unwrap();
    assert_eq!(cfg.settings().unwrap().abuse, crate::limits::AbuseLimits::default());
    let unlimited = KmeConfig { requests_per_second_per_sae: 0, request_burst_per_sae: 0, ..cfg };
    assert_eq!(unlimited.settings().unwrap().abuse.requests_per_second_per_sae, 0);
}

/// The largest Reserve request that limits allow, encoded by prost, next to the bound that the
/// configuration checks: the bound is never below it, and is tight to within the fields counted
/// at their longest (SAE IDs, varint lengths).
#[test]
fn the_reserve_request_bound_is_never_below_the_exact_encoding() {
    use crate::config::{Limits, MAX_SAE_ID_BYTES, reserve_request_bound};
    use prost::Message;
    for (max_key_per_request, max_key_size, max_sae_id_count) in
        [(1, 8, 0), (128, 1024, 0), (4096, 256, 0), (16, 65_536, 64), (100, 8 * 33, 3), (1000, 4096, 1)]
    {
        let limits = Limits { max_key_per_request, max_key_size, max_sae_id_count, ..Limits::default() };
        let kme_id = "K".repeat(40);
        let units = (max_key_size as usize).div_ceil(8 * UNIT_BYTES);
        let id = vec![0xffu8; 16];
        let message = proto::kme::ReserveRequest {
            source_kme_id: kme_id.clone(),
            master_sae_id: "m".repeat(MAX_SAE_ID_BYTES),
            slave_sae_ids: vec!["s".repeat(MAX_SAE_ID_BYTES); 1 + max_sae_id_count as usize],
            size_bits: max_key_size,
            keys: (0..max_key_per_request)
                .map(|_| proto::kme::ReservedKey { key_id: id.clone(), unit_ids: vec![id.clone(); units] })
                .collect(),
        };
        let (exact, bound) = (message.encoded_len(), reserve_request_bound(&limits, kme_id.len()));
        assert!(bound >= exact, "{limits:?}: bound {bound} < exact {exact}");
        assert!(bound <= exact + 8 * max_key_per_request as usize + 8, "{limits:?}: bound {bound}, exact {exact}");
    }
}

/// An in-process peer: calls the other KME's reservation directly (no TLS, no gRPC). Without a
/// peer, calls fail as a refused connection does: nothing was sent.
struct LocalPeer(OnceLock<KmeState>);

impl ReservePeer for LocalPeer {
    fn reserve(&self, request: ReserveRequest) -> BoxFuture<'_, Result<(), ReserveError>> {
        Box::pin(async move {
            match self.0.get() {
                Some(peer) => peer.reserve_for_peer(request).await,
                None => Err(ReserveError::NotSent("no peer".into())),
            }
        })
    }

    fn cancel(&self, request: CancelRequest) -> BoxFuture<'_, Result<Vec<CancelOutcome>, CancelError>> {
        Box::pin(async move {
            match self.0.get() {
                Some(peer) => peer.cancel_for_peer(request).await,
                None => Err(CancelError::Unreachable("no peer".into())),
            }
        })
    }
}

/// How a [`LossyPeer`] fails the first Reserve call (later ones go through).
#[derive(Clone, Copy, PartialEq)]
enum Loss {
    /// The peer records the reservation, the answer is lost: `Unreachable`.
    Answer,
    /// The request is lost on the way: the peer never sees it, `Unreachable`.
    Request,
}

/// An in-process peer that loses the first Reserve call as `loss` says, records the requests,
/// and fails the first `cancel_failures` Cancel calls as unreachable.
struct LossyPeer {
    peer: OnceLock<KmeState>,
    loss: Loss,
    cancel_failures: usize,
    reserves: Mutex<Vec<ReserveRequest>>,
    cancels: AtomicUsize,
}

impl LossyPeer {
    fn new(loss: Loss, cancel_failures: usize) -> Self {
        Self {
            peer: OnceLock::new(),
            loss,
            cancel_failures,
            reserves: Mutex::new(Vec::new()),
            cancels: AtomicUsize::new(0),
        }
    }

    fn first_reserve(&self) -> ReserveRequest {
        self.reserves.lock().unwrap()[0].clone()
    }
}

impl ReservePeer for LossyPeer {
    fn reserve(&self, request: ReserveRequest) -> BoxFuture<'_, Result<(), ReserveError>> {
        Box::pin(async move {
            let peer = self.peer.get().expect("peer set");
            let first = {
                let mut reserves = self.reserves.lock().unwrap();
                reserves.push(request.clone());
                reserves.len() == 1
            };
            match (first, self.loss) {
                (true, Loss::Answer) => {
                    peer.reserve_for_peer(request).await.expect("the peer reserves");
                    Err(ReserveError::Unreachable("connection lost".into()))
                }
                (true, Loss::Request) => Err(ReserveError::Unreachable("no answer in time".into())),
                (false, _) => peer.reserve_for_peer(request).await,
            }
        })
    }

    fn cancel(&self, request: CancelRequest) -> BoxFuture<'_, Result<Vec<CancelOutcome>, CancelError>> {
        Box::pin(async move {
            if self.cancels.fetch_add(1, Ordering::SeqCst) < self.cancel_failures {
                return Err(CancelError::Unreachable("connection refused".into()));
            }
            self.peer.get().expect("peer set").cancel_for_peer(request).await
        })
    }
}

fn settings(kme: &str, peer: &str, max_sae_id_count: u32) -> super::KmeSettings {
    let mut cfg: KmeConfig = toml::from_str(SECTION).unwrap();
    cfg.kme_id = kme.into();
    cfg.peer_kme_id = peer.into();
    cfg.max_sae_id_count = max_sae_id_count;
    cfg.saes = vec![
        SaeEntry { sae_id: "m".into(), kme_id: "KME_A".into() },
        SaeEntry { sae_id: "s".into(), kme_id: "KME_B".into() },
        SaeEntry { sae_id: "s2".into(), kme_id: "KME_B".into() },
    ];
    cfg.settings().unwrap()
}

/// Two KMEs over in-process peers, sharing `n_units` random ready units (same IDs, same bytes).
fn pair(n_units: usize, max_sae_id_count: u32) -> (KmeState, KmeState) {
    let (store_a, store_b) = stores(n_units);
    let (peer_of_a, peer_of_b) = (Arc::new(LocalPeer(OnceLock::new())), Arc::new(LocalPeer(OnceLock::new())));
    let a = KmeState::new(settings("KME_A", "KME_B", max_sae_id_count), KmeSide::Alice, store_a, peer_of_a.clone());
    let b = KmeState::new(settings("KME_B", "KME_A", max_sae_id_count), KmeSide::Bob, store_b, peer_of_b.clone());
    let _ = peer_of_a.0.set(b.clone());
    let _ = peer_of_b.0.set(a.clone());
    (a, b)
}

/// As [`pair`], A reaching B through `peer` (B does not call A).
fn lossy_pair(n_units: usize, peer: LossyPeer) -> (KmeState, KmeState, Arc<LossyPeer>) {
    let (store_a, store_b) = stores(n_units);
    let peer = Arc::new(peer);
    let a = KmeState::new(settings("KME_A", "KME_B", 0), KmeSide::Alice, store_a, peer.clone());
    let b = KmeState::new(settings("KME_B", "KME_A", 0), KmeSide::Bob, store_b, Arc::new(LocalPeer(OnceLock::new())));
    let _ = peer.peer.set(b.clone());
    (a, b, peer)
}

/// Metadata of a fresh block of `n_units` units (the KME reads only the units).
fn block_meta(n_units: usize) -> BlockMeta {
    super::pair::test_block_meta(n_units, false)
}

/// Two stores holding the same `n_units` random ready units.
fn stores(n_units: usize) -> (Arc<SledStore>, Arc<SledStore>) {
    // Alternate the last byte's parity so that each KME owns exactly half of the units.
    let units: Vec<KeyUnit> = (0..n_units)
        .map(|i| {
            let mut id = *Uuid::new_v4().as_bytes();
            id[15] = (id[15] & 0xfe) | (i % 2) as u8;
            KeyUnit {
                key_id: Uuid::from_bytes(id),
                key: Zeroizing::new(Uuid::new_v4().as_bytes().repeat(UNIT_BYTES / 16)),
            }
        })
        .collect();
    let meta = block_meta(n_units);
    let (store_a, store_b) = (Arc::new(SledStore::temporary().unwrap()), Arc::new(SledStore::temporary().unwrap()));
    store_a.put_ready(&meta, &units).unwrap();
    store_b.put_ready(&meta, &units).unwrap();
    (store_a, store_b)
}

fn sae(id: &str) -> SaeId {
    SaeId(id.into())
}

#[tokio::test]
async fn a_key_reserved_at_the_peer_reaches_the_slave_once() {
    let (a, b) = pair(40, 0);
    let before = a.status(Some(&sae("m")), &sae("s")).await.unwrap().stored_key_count;
    let request = KeyRequest { number: Some(2), size: Some(320), ..KeyRequest::default() };
    let container = a.get_key(Some(&sae("m")), &sae("s"), request).await.unwrap();
    assert_eq!(container.keys.len(), 2);
    assert!(container.keys.iter().all(|k| k.key.decode().unwrap().len() == 40));
    // Two keys of 320 bits take four units, that is two keys of 256 bits.
    assert_eq!(a.status(Some(&sae("m")), &sae("s")).await.unwrap().stored_key_count, before - 4);
    let ids: Vec<Uuid> = container.keys.iter().map(|k| k.key_id).collect();
    assert_eq!(message(b.get_key_with_key_ids(Some(&sae("m")), &sae("m"), ids.clone()).await).0, 401);
    let got = b.get_key_with_key_ids(Some(&sae("s")), &sae("m"), ids.clone()).await.unwrap();
    assert_eq!(got.keys, container.keys);
    assert_eq!(
        message(b.get_key_with_key_ids(Some(&sae("s")), &sae("m"), ids).await),
        (400, api::MSG_KEYS_NOT_FOUND.to_string())
    );
}

#[tokio::test]
async fn missing_units_at_the_peer_are_discarded_and_replaced() {
    let (a, b) = pair(40, 0);
    // Simulate a crash of A after B reserved: B no longer holds some of A's units.
    let owned: Vec<Uuid> =
        a.store().select_ready_units(3, |id| KmeSide::Alice.owns(id)).unwrap().iter().map(|u| u.key_id).collect();
    b.store().take_ready_units(&owned).unwrap();
    let before = a.status(Some(&sae("m")), &sae("s")).await.unwrap().stored_key_count;
    let container =
        a.get_key(Some(&sae("m")), &sae("s"), KeyRequest { number: Some(4), ..KeyRequest::default() }).await.unwrap();
    assert_eq!(container.keys.len(), 4);
    assert_eq!(a.status(Some(&sae("m")), &sae("s")).await.unwrap().stored_key_count, before - 4 - 3);
    let ids = container.keys.iter().map(|k| k.key_id).collect();
    assert_eq!(b.get_key_with_key_ids(Some(&sae("s")), &sae("m"), ids).await.unwrap().keys, container.keys);
}

#[tokio::test]
async fn units_not_yet_committed_at_the_peer_are_kept_and_others_served() {
    let (a, b) = pair(40, 0);
    // The two-ended commit under way: three of A's units are ready at A, still pending at B.
    let first: Vec<KeyUnit> = a.store().select_ready_units(3, |id| KmeSide::Alice.owns(id)).unwrap();
    let ids: Vec<Uuid> = first.iter().map(|u| u.key_id).collect();
    b.store().take_ready_units(&ids).unwrap();
    let block = block_meta(3);
    b.store().put_pending(&block, &first).unwrap();
    let before = a.status(Some(&sae("m")), &sae("s")).await.unwrap().stored_key_count;
    let container =
        a.get_key(Some(&sae("m")), &sae("s"), KeyRequest { number: Some(4), ..KeyRequest::default() }).await.unwrap();
    assert_eq!(container.keys.len(), 4);
    // Only the four served units left A's pool: the three are kept, not discarded.
    assert_eq!(a.status(Some(&sae("m")), &sae("s")).await.unwrap().stored_key_count, before - 4);
    let kept = a.store().select_ready_units(usize::MAX, |id| ids.contains(id)).unwrap();
    assert_eq!(kept.len(), 3);
    let served = container.keys.iter().map(|k| k.key_id).collect();
    assert_eq!(b.get_key_with_key_ids(Some(&sae("s")), &sae("m"), served).await.unwrap().keys, container.keys);
    // Once B commits the block, they are served like any other.
    b.store().mark_ready(block.block_id).unwrap();
    let mut rest = (before - 4) as i64;
    while rest > 0 {
        let number = rest.min(16);
        let request = KeyRequest { number: Some(number), ..KeyRequest::default() };
        assert_eq!(a.get_key(Some(&sae("m")), &sae("s"), request).await.unwrap().keys.len() as i64, number);
        rest -= number;
    }
    assert_eq!(stored_key_count(&a).await, 0);
}

#[tokio::test]
async fn multicast_keys_reach_every_slave() {
    let (a, b) = pair(10, 1);
    let request = KeyRequest { additional_slave_sae_ids: vec![sae("s2")], ..KeyRequest::default() };
    let container = a.get_key(Some(&sae("m")), &sae("s"), request).await.unwrap();
    let ids: Vec<Uuid> = container.keys.iter().map(|k| k.key_id).collect();
    assert_eq!(b.get_key_with_key_ids(Some(&sae("s2")), &sae("m"), ids.clone()).await.unwrap().keys, container.keys);
    assert_eq!(b.get_key_with_key_ids(Some(&sae("s")), &sae("m"), ids).await.unwrap().keys, container.keys);
    let too_many = KeyRequest { additional_slave_sae_ids: vec![sae("s2"), sae("s3")], ..KeyRequest::default() };
    assert_eq!(message(a.get_key(Some(&sae("m")), &sae("s"), too_many).await).0, 400);
}

#[tokio::test]
async fn requests_outside_the_limits_are_refused_and_consume_nothing() {
    let (a, _b) = pair(8, 0);
    let m = sae("m");
    let before = a.status(Some(&m), &sae("s")).await.unwrap().stored_key_count;
    let cases = [
        (KeyRequest { size: Some(100), ..KeyRequest::default() }, 400, Some(api::MSG_SIZE_NOT_MULTIPLE_OF_8)),
        (KeyRequest { size: Some(32), ..KeyRequest::default() }, 400, None),
        (KeyRequest { size: Some(2048), ..KeyRequest::default() }, 400, None),
        (KeyRequest { number: Some(0), ..KeyRequest::default() }, 400, None),
        (KeyRequest { number: Some(17), ..KeyRequest::default() }, 400, None),
        (KeyRequest { number: Some(16), ..KeyRequest::default() }, 503, None),
    ];
    for (request, code, text) in cases {
        let (got_code, got_text) = message(a.get_key(Some(&m), &sae("s"), request.clone()).await);
        assert_eq!(got_code, code, "{request:?}: {got_text}");
        if let Some(text) = text {
            assert_eq!(got_text, text);
        }
    }
    assert_eq!(message(a.get_key(Some(&m), &m, KeyRequest::default()).await).0, 400);
    assert_eq!(message(a.get_key(Some(&sae("s")), &sae("s2"), KeyRequest::default()).await).0, 401);
    assert_eq!(message(a.get_key(None, &sae("s"), KeyRequest::default()).await).0, 401);
    assert_eq!(a.status(Some(&m), &sae("s")).await.unwrap().stored_key_count, before);
}

#[tokio::test]
async fn unreachable_peer_gives_503_and_keeps_the_units() {
    let (a, _b) = pair(8, 0);
    let lonely = KmeState::new(
        settings("KME_A", "KME_B", 0),
        KmeSide::Alice,
        a.store().clone(),
        Arc::new(LocalPeer(OnceLock::new())),
    );
    let before = lonely.status(Some(&sae("m")), &sae("s")).await.unwrap().stored_key_count;
    assert!(before > 0);
    assert_eq!(message(lonely.get_key(Some(&sae("m")), &sae("s"), KeyRequest::default()).await).0, 503);
    // Nothing was sent, so nothing is in doubt: the units are offered again at once.
    assert_eq!(lonely.in_doubt_units(), 0);
    assert_eq!(lonely.status(Some(&sae("m")), &sae("s")).await.unwrap().stored_key_count, before);
}

/// Only a failed connection (TCP or TLS) proves a call was never sent; only statuses the peer's
/// service answers itself prove it changed nothing. Anything else leaves the outcome in doubt.
#[test]
fn grpc_failures_are_classified_conservatively() {
    use super::peer::{answered_by_peer, never_sent};
    use tonic::{Code, ConnectError, Status};
    let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
    let connect = Status::from_error(Box::new(ConnectError(Box::new(refused))));
    assert_eq!(connect.code(), Code::Unavailable);
    assert!(never_sent(&connect));
    let reset = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "connection reset");
    for status in
        [Status::unavailable("connection lost"), Status::from_error(Box::new(reset)), Status::deadline_exceeded("late")]
    {
        assert!(!never_sent(&status) && !answered_by_peer(&status), "{status:?}");
    }
    for code in [Code::Internal, Code::Unknown, Code::Cancelled, Code::ResourceExhausted, Code::Aborted] {
        assert!(!answered_by_peer(&Status::new(code, "x")), "{code:?}");
    }
    for code in [Code::FailedPrecondition, Code::InvalidArgument, Code::PermissionDenied, Code::Unauthenticated] {
        assert!(answered_by_peer(&Status::new(code, "x")), "{code:?}");
    }
}

async fn stored_key_count(kme: &KmeState) -> u64 {
    kme.status(Some(&sae("m")), &sae("s")).await.unwrap().stored_key_count
}

/// Waits until `kme` has no reservation in doubt.
async fn settled(kme: &KmeState) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while kme.in_doubt_units() > 0 {
        assert!(Instant::now() < deadline, "the reservation in doubt was never settled");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// B records the reservation, A never hears back: A holds the units back (503, not counted),
/// cancels at B (retrying while B is unreachable), then discards them. Both pools end equal, and
/// the cancelled key can never be fetched nor reserved again.
#[tokio::test]
async fn a_reservation_whose_answer_was_lost_is_cancelled_at_both_ends() {
    let (a, b, peer) = lossy_pair(40, LossyPeer::new(Loss::Answer, 2));
    let before = stored_key_count(&a).await;
    let request = KeyRequest { number: Some(2), size: Some(512), ..KeyRequest::default() };
    assert_eq!(message(a.get_key(Some(&sae("m")), &sae("s"), request).await).0, 503);
    // Two keys of 512 bits: four units, held back while in doubt.
    assert_eq!(stored_key_count(&a).await, before - 4);
    settled(&a).await;
    assert_eq!(peer.cancels.load(Ordering::SeqCst), 3, "two failed cancellations, then one answered");
    assert_eq!(a.store().summary().unwrap(), b.store().summary().unwrap());
    assert_eq!(stored_key_count(&a).await, before - 4);
    assert_eq!(b.store().reserved_key_count().unwrap(), 0);
    let lost = peer.first_reserve();
    let ids: Vec<Uuid> = lost.keys.iter().map(|(key_id, _)| *key_id).collect();
    assert_eq!(
        message(b.get_key_with_key_ids(Some(&sae("s")), &sae("m"), ids).await),
        (400, api::MSG_KEYS_NOT_FOUND.to_string())
    );
    // A replay of the lost request is refused.
    assert!(matches!(b.reserve_for_peer(lost).await, Err(ReserveError::Refused(_))));
    // Key delivery goes on, the pools still agree.
    let container = a.get_key(Some(&sae("m")), &sae("s"), KeyRequest::default()).await.unwrap();
    let ids = container.keys.iter().map(|k| k.key_id).collect();
    assert_eq!(b.get_key_with_key_ids(Some(&sae("s")), &sae("m"), ids).await.unwrap().keys, container.keys);
    assert_eq!(a.store().summary().unwrap(), b.store().summary().unwrap());
    assert_eq!(stored_key_count(&a).await, before - 5);
}

/// The Reserve never reached B: the cancellation finds nothing there, A offers the units again,
/// and the request, should it arrive late, is refused without taking them at B.
#[tokio::test]
async fn a_reservation_that_never_reached_the_peer_gives_the_units_back() {
    let (a, b, peer) = lossy_pair(40, LossyPeer::new(Loss::Request, 0));
    let before = stored_key_count(&a).await;
    let request = KeyRequest { number: Some(3), ..KeyRequest::default() };
    assert_eq!(message(a.get_key(Some(&sae("m")), &sae("s"), request).await).0, 503);
    settled(&a).await;
    assert_eq!(stored_key_count(&a).await, before);
    assert_eq!(a.store().summary().unwrap(), b.store().summary().unwrap());
    let summary_b = b.store().summary().unwrap();
    assert!(matches!(b.reserve_for_peer(peer.first_reserve()).await, Err(ReserveError::Refused(_))));
    assert_eq!(b.store().summary().unwrap(), summary_b);
    assert_eq!(b.store().reserved_key_count().unwrap(), 0);
    // The units given back are served normally (all of A's 20 units, those three included;
    // B's 20 remain, for either KME).
    let container =
        a.get_key(Some(&sae("m")), &sae("s"), KeyRequest { number: Some(16), ..KeyRequest::default() }).await.unwrap();
    assert_eq!(container.keys.len(), 16);
    let container =
        a.get_key(Some(&sae("m")), &sae("s"), KeyRequest { number: Some(4), ..KeyRequest::default() }).await.unwrap();
    let ids = container.keys.iter().map(|k| k.key_id).collect();
    assert_eq!(b.get_key_with_key_ids(Some(&sae("s")), &sae("m"), ids).await.unwrap().keys, container.keys);
    assert_eq!(stored_key_count(&a).await, 20);
    assert!(a.store().select_ready_units(usize::MAX, |id| KmeSide::Alice.owns(id)).unwrap().is_empty());
    assert_eq!(a.store().summary().unwrap(), b.store().summary().unwrap());
}

/// A KME shutting down stops settling: the task ends (after logging what it leaves), its marks
/// go, and the units are offered again (a later Reserve would discard them if B had them).
#[tokio::test]
async fn shutdown_stops_settling_a_reservation_in_doubt() {
    let (a, _b, peer) = lossy_pair(10, LossyPeer::new(Loss::Request, usize::MAX));
    let before = stored_key_count(&a).await;
    assert_eq!(message(a.get_key(Some(&sae("m")), &sae("s"), KeyRequest::default()).await).0, 503);
    assert_eq!(a.in_doubt_units(), 1);
    tokio::time::sleep(Duration::from_millis(50)).await;
    tokio::time::timeout(Duration::from_secs(5), a.shutdown()).await.expect("shutdown waits for no peer");
    assert!(peer.cancels.load(Ordering::SeqCst) >= 1);
    assert_eq!(a.in_doubt_units(), 0);
    assert_eq!(stored_key_count(&a).await, before);
}

/// An in-process peer whose Reserve calls wait at a gate (after saying they arrived) until the
/// test opens it.
struct GatedPeer {
    peer: OnceLock<KmeState>,
    arrived: tokio::sync::Notify,
    gate: tokio::sync::Semaphore,
}

impl ReservePeer for GatedPeer {
    fn reserve(&self, request: ReserveRequest) -> BoxFuture<'_, Result<(), ReserveError>> {
        Box::pin(async move {
            self.arrived.notify_one();
            let _pass = self.gate.acquire().await.expect("gate open");
            self.peer.get().expect("peer set").reserve_for_peer(request).await
        })
    }

    fn cancel(&self, request: CancelRequest) -> BoxFuture<'_, Result<Vec<CancelOutcome>, CancelError>> {
        Box::pin(async move { self.peer.get().expect("peer set").cancel_for_peer(request).await })
    }
}

/// Every delivered key's bytes (one 256-bit unit each) and the slave's copy of it: the slave
/// gets each key once, and the same bytes.
async fn fetch_at_slave(kme: &KmeState, slave: &str, master: &str, keys: &api::KeyContainer) {
    let ids = keys.keys.iter().map(|k| k.key_id).collect();
    assert_eq!(kme.get_key_with_key_ids(Some(&sae(slave)), &sae(master), ids).await.unwrap().keys, keys.keys);
}

/// All masters at A (one-way use): once A's own half is spent, A borrows B's units, so the
/// whole store is served and none of it is stranded (it used to fill the store and stop the
/// link while A answered "not enough key").
#[tokio::test]
async fn a_kme_whose_own_units_are_spent_borrows_the_peers() {
    let (a, b) = pair(40, 0);
    assert_eq!(stored_key_count(&a).await, 40, "Get status counts every unit A can serve, borrowed ones too");
    let mut delivered = HashSet::new();
    for _ in 0..4 {
        let keys =
            a.get_key(Some(&sae("m")), &sae("s"), KeyRequest { number: Some(10), ..KeyRequest::default() }).await;
        let keys = keys.unwrap();
        fetch_at_slave(&b, "s", "m", &keys).await;
        delivered.extend(keys.keys.iter().map(|k| k.key.decode().unwrap().to_vec()));
    }
    assert_eq!(delivered.len(), 40, "40 distinct keys, one per unit");
    assert_eq!(stored_key_count(&a).await, 0);
    assert_eq!(b.store().summary().unwrap().n_keys, 0);
    assert_eq!(a.store().summary().unwrap(), b.store().summary().unwrap());
    let (code, text) = message(a.get_key(Some(&sae("m")), &sae("s"), KeyRequest::default()).await);
    assert_eq!(code, 503);
    assert!(text.contains("not enough key"), "{text}");
}

/// A borrows units that B's own Get key holds in flight at that moment: B answers "not now", A
/// serves from B's other units, and neither KME ever hands out a unit twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unit_the_owner_holds_in_flight_is_not_lent() {
    let (store_a, store_b) = stores(8);
    let peer_of_a = Arc::new(LocalPeer(OnceLock::new()));
    let peer_of_b = Arc::new(GatedPeer {
        peer: OnceLock::new(),
        arrived: tokio::sync::Notify::new(),
        gate: tokio::sync::Semaphore::new(0),
    });
    let a = KmeState::new(settings("KME_A", "KME_B", 0), KmeSide::Alice, store_a, peer_of_a.clone());
    let b = KmeState::new(settings("KME_B", "KME_A", 0), KmeSide::Bob, store_b, peer_of_b.clone());
    let _ = peer_of_a.0.set(b.clone());
    let _ = peer_of_b.peer.set(a.clone());
    let one = |n| KeyRequest { number: Some(n), ..KeyRequest::default() };
    // A spends its own four units.
    let first = a.get_key(Some(&sae("m")), &sae("s"), one(4)).await.unwrap();
    fetch_at_slave(&b, "s", "m", &first).await;
    // B's master asks for two keys: B picks two of its own units and waits at the gate.
    let b_request = tokio::spawn({
        let b = b.clone();
        async move { b.get_key(Some(&sae("s")), &sae("m"), one(2)).await }
    });
    peer_of_b.arrived.notified().await;
    // A borrows: of B's four units, the two B holds are refused, the other two are served.
    let borrowed = a.get_key(Some(&sae("m")), &sae("s"), one(2)).await.unwrap();
    fetch_at_slave(&b, "s", "m", &borrowed).await;
    // Nothing else can be lent now: the last two are B's, in flight.
    let (code, _) = message(a.get_key(Some(&sae("m")), &sae("s"), one(1)).await);
    assert_eq!(code, 503);
    peer_of_b.gate.add_permits(1);
    let at_b = b_request.await.unwrap().unwrap();
    fetch_at_slave(&a, "m", "s", &at_b).await;
    let all: HashSet<Vec<u8>> = [&first, &borrowed, &at_b]
        .into_iter()
        .flat_map(|c| c.keys.iter().map(|k| k.key.decode().unwrap().to_vec()))
        .collect();
    assert_eq!(all.len(), 8, "eight distinct keys from eight units");
    assert_eq!(a.store().summary().unwrap(), b.store().summary().unwrap());
    assert_eq!(a.store().summary().unwrap().n_keys, 0);
}

/// Both KMEs serve masters at once from a small store, each borrowing the other's units when
/// its own run out: every unit ends in exactly one delivered key, each slave gets each key once,
/// and the two stores end identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_kmes_drawing_on_one_store_at_once_never_share_a_unit() {
    let (a, b) = pair(64, 0);
    let run = |kme: KmeState, master: &'static str, slave: &'static str| {
        tokio::spawn(async move {
            let mut got = Vec::new();
            let mut refusals = 0;
            // Until nothing is left for this KME; collisions ("not now") only cost a retry.
            while stored_key_count_for(&kme, master, slave).await > 0 {
                match kme.get_key(Some(&sae(master)), &sae(slave), KeyRequest::default()).await {
                    Ok(keys) => got.push(keys),
                    Err(e) => {
                        refusals += 1;
                        assert!(refusals < 1000, "kept failing: {e}");
                    }
                }
            }
            got
        })
    };
    let (from_a, from_b) = (run(a.clone(), "m", "s"), run(b.clone(), "s", "m"));
    let (from_a, from_b) = (from_a.await.unwrap(), from_b.await.unwrap());
    let mut all = HashSet::new();
    for keys in &from_a {
        fetch_at_slave(&b, "s", "m", keys).await;
        all.extend(keys.keys.iter().map(|k| k.key.decode().unwrap().to_vec()));
    }
    for keys in &from_b {
        fetch_at_slave(&a, "m", "s", keys).await;
        all.extend(keys.keys.iter().map(|k| k.key.decode().unwrap().to_vec()));
    }
    assert_eq!(from_a.len() + from_b.len(), 64, "every unit delivered once");
    assert_eq!(all.len(), 64, "no unit in two keys");
    assert_eq!(a.store().summary().unwrap(), b.store().summary().unwrap());
    assert_eq!(a.store().summary().unwrap().n_keys, 0);
}

async fn stored_key_count_for(kme: &KmeState, master: &str, slave: &str) -> u64 {
    kme.status(Some(&sae(master)), &sae(slave)).await.unwrap().stored_key_count
}
