//! Get key at a KME that serves from the peer's units (one-way use, its own half spent): the
//! time per call of [`KmeState::get_key`] for one 256-bit key, with the peer KME in the same
//! process (no TLS, no gRPC) and real sled stores in temporary directories, whose reservations
//! at the peer are durable (one fsync per call). The store holds `QKD_BENCH_UNITS` units
//! (default 100 000), all owned by the peer, so every call borrows.
//!
//! `cargo bench -p qkd-kme --bench pick` (release profile). A plain `harness = false` binary: the
//! workspace carries no benchmark framework. Prints the mean wall time per call over
//! `QKD_BENCH_CALLS` calls (default 500), after 20 warm-up calls.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use qkd_kme::api::KeyRequest;
use qkd_kme::peer::BoxFuture;
use qkd_kme::{
    CancelError, CancelOutcome, CancelRequest, KmeConfig, KmeSide, KmeState, ReserveError, ReservePeer, ReserveRequest,
    SaeId,
};
use qkd_store::kme::UNIT_BYTES;
use qkd_store::{KeyStore, KeyUnit, SledStore};
use uuid::Uuid;
use zeroize::Zeroizing;

/// The other KME, called directly.
struct LocalPeer(OnceLock<KmeState>);

impl ReservePeer for LocalPeer {
    fn reserve(&self, request: ReserveRequest) -> BoxFuture<'_, Result<(), ReserveError>> {
        Box::pin(async move { self.0.get().expect("peer set").reserve_for_peer(request).await })
    }

    fn cancel(&self, request: CancelRequest) -> BoxFuture<'_, Result<Vec<CancelOutcome>, CancelError>> {
        Box::pin(async move { self.0.get().expect("peer set").cancel_for_peer(request).await })
    }
}

fn settings(kme: &str, peer: &str) -> qkd_kme::KmeSettings {
    let cfg: KmeConfig = toml::from_str(&format!(
        r#"
listen = "127.0.0.1:8443"
peer_listen = "127.0.0.1:50061"
peer_addr = "peer.example:50061"
peer_name = "peer"
kme_id = "{kme}"
peer_kme_id = "{peer}"
tls = {{ ca_cert = "sae-ca.crt", cert = "kme.crt", key = "kme.key" }}
saes = [ {{ sae_id = "m", kme_id = "KME_A" }}, {{ sae_id = "s", kme_id = "KME_B" }} ]
"#
    ))
    .expect("KME section");
    cfg.settings().expect("settings")
}

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    let (n_units, n_calls) = (env_or("QKD_BENCH_UNITS", 100_000), env_or("QKD_BENCH_CALLS", 500));
    // Odd last byte: every unit is owned by Bob's KME; Alice's KME borrows each one it serves.
    let units: Vec<KeyUnit> = (0..n_units)
        .map(|_| {
            let mut id = *Uuid::new_v4().as_bytes();
            id[15] |= 1;
            KeyUnit { key_id: Uuid::from_bytes(id), key: Zeroizing::new(vec![0x5a; UNIT_BYTES]) }
        })
        .collect();
    let meta = qkd_kme::pair::test_block_meta(n_units, false);
    let stores = [SledStore::temporary().expect("store"), SledStore::temporary().expect("store")];
    for store in &stores {
        store.put_ready(&meta, &units).expect("fill the store");
    }
    let [store_a, store_b] = stores;
    let (peer_of_a, peer_of_b) = (Arc::new(LocalPeer(OnceLock::new())), Arc::new(LocalPeer(OnceLock::new())));
    let a = KmeState::new(settings("KME_A", "KME_B"), KmeSide::Alice, Arc::new(store_a), peer_of_a.clone());
    let b = KmeState::new(settings("KME_B", "KME_A"), KmeSide::Bob, Arc::new(store_b), peer_of_b.clone());
    let _ = peer_of_a.0.set(b.clone());
    let _ = peer_of_b.0.set(a.clone());
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let (master, slave) = (SaeId("m".into()), SaeId("s".into()));
    let call = || runtime.block_on(a.get_key(Some(&master), &slave, KeyRequest::default())).expect("get key");
    for _ in 0..20 {
        call();
    }
    let start = Instant::now();
    for _ in 0..n_calls {
        call();
    }
    let per_call = start.elapsed() / n_calls as u32;
    println!(
        "get key, borrowing from a store of {n_units} units owned by the peer: {per_call:?} per call ({n_calls} calls)"
    );
}
