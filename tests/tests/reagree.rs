//! Issue 15, acceptance 4: re-agreement of the stores at `Hello` after one end's store was
//! restored from an older copy, or lost, with the real daemons, their KMEs and sled stores on
//! disk. After `Hello` both stores hold exactly the same units, and no key delivered before is
//! held or delivered again.

use std::collections::BTreeSet;
use std::path::Path;

use qkd_store::{BlockState, KeyStore, SledStore};
use uuid::Uuid;

use super::custody::{dec_keys, deliver_both_ways, enc_keys, free_addr, kme_config, wait_for_keys};
use super::*;

/// Where the two KMEs listen (ETSI, peer channel), fixed for the whole test so that a restarted
/// daemon comes back at the same addresses.
struct Addrs {
    grpc: std::net::SocketAddr,
    fibre: std::net::SocketAddr,
    etsi_a: std::net::SocketAddr,
    etsi_b: std::net::SocketAddr,
    peer_a: std::net::SocketAddr,
    peer_b: std::net::SocketAddr,
}

async fn start_alice(lab: &Lab, a: &Addrs) -> Running {
    let _ = std::fs::remove_file(lab.dir.0.join("alice").join("status.json"));
    let grpc = tokio::net::TcpListener::bind(a.grpc).await.expect("bind Alice's classical channel");
    let fibre = tokio::net::TcpListener::bind(a.fibre).await.expect("bind Alice's fibre");
    let mut cfg = lab.alice_config(a.grpc, a.fibre);
    cfg.kme = Some(kme_config(lab, "alice", "bob", a.etsi_a, a.peer_a, a.peer_b));
    spawn_alice_with(lab, cfg, grpc, Some(fibre))
}

fn start_bob(lab: &Lab, a: &Addrs) -> Running {
    // The previous run's status file must not answer for this one.
    let _ = std::fs::remove_file(lab.dir.0.join("bob").join("status.json"));
    let mut cfg = lab.bob_config(a.grpc, a.fibre);
    cfg.kme = Some(kme_config(lab, "bob", "alice", a.etsi_b, a.peer_b, a.peer_a));
    spawn_bob_with(lab, cfg)
}

/// The units a stopped node's store holds in ready blocks, with their bytes, and its pending
/// blocks.
fn held(lab: &Lab, node: &str) -> (std::collections::BTreeMap<Uuid, Vec<u8>>, BTreeSet<Uuid>) {
    let store = SledStore::open(&lab.dir.0.join(node).join("store"), &lab.kek(node)).expect("open the store");
    let units = store.select_ready_units(10_000_000, |_| true).expect("read the units");
    let pending = store
        .holdings()
        .expect("holdings")
        .blocks
        .iter()
        .filter(|b| b.state == BlockState::Pending)
        .map(|b| b.block_id)
        .collect();
    let units = units.into_iter().map(|u| (u.key_id, u.key.to_vec())).collect();
    (units, pending)
}

/// Block of each ready unit of a stopped node's store.
fn blocks_of(lab: &Lab, node: &str) -> std::collections::BTreeMap<Uuid, Uuid> {
    let store = SledStore::open(&lab.dir.0.join(node).join("store"), &lab.kek(node)).expect("open the store");
    let mut out = std::collections::BTreeMap::new();
    for block in store.holdings().expect("holdings").blocks {
        for (id, held) in block.key_ids.iter().zip(&block.held) {
            if *held {
                out.insert(*id, block.block_id);
            }
        }
    }
    out
}

/// Both stopped stores hold the same units (Alice may hold, in addition, whole blocks that are
/// still pending at Bob: a block whose commit the stop interrupted, which the next Hello settles),
/// and none of them is a key delivered before. Returns Alice's units.
fn assert_stores_agree(lab: &Lab, delivered: &[(String, Vec<u8>)]) -> BTreeSet<Uuid> {
    let ((alice, _), (bob, bob_pending)) = (held(lab, "alice"), held(lab, "bob"));
    let alice_blocks = blocks_of(lab, "alice");
    let alice_ids: BTreeSet<Uuid> =
        alice.keys().filter(|id| !bob_pending.contains(&alice_blocks[*id])).copied().collect();
    let bob_ids: BTreeSet<Uuid> = bob.keys().copied().collect();
    assert!(!alice_ids.is_empty(), "the stores hold keys again");
    assert_eq!(alice_ids, bob_ids, "both stores hold exactly the same key units");
    for (id, key) in delivered {
        for (node, units) in [("alice", &alice), ("bob", &bob)] {
            assert!(units.values().all(|unit| unit != key), "{node} still holds the delivered key {id}");
        }
    }
    alice.keys().copied().collect()
}

/// Waits until `node`'s status file counts a session (Bob) or a Hello's re-agreement.
async fn wait_for_status(lab: &Lab, node: &str, what: &str, pointer: &str, at_least: u64) {
    wait_for(&format!("{node}: {what}"), Duration::from_secs(120), || {
        lab.status(node).filter(|s| counter(s, pointer) >= at_least).map(|_| ())
    })
    .await;
}

/// Copies the directory `from` to `to` (the store of a stopped daemon, as a backup does).
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create the copy");
    for entry in std::fs::read_dir(from).expect("read the store") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy a file");
        }
    }
}

/// (b) Bob's store restored from a copy taken before some deliveries (and before a slave
/// fetched a key reserved at Bob), then (a) Bob's store deleted: after each restart's Hello both
/// stores hold exactly the same units, no key delivered before is held anywhere, and none is
/// delivered again (the key reserved in the copy and fetched since is refused). In between, a
/// restart with stores that agree: a reservation is held until the Hello, then served once, and
/// nothing is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_or_lost_store_at_bob_is_re_agreed_at_hello_and_no_delivered_key_comes_back() {
    let lab = Lab::new("reagree");
    for sae in ["app-a", "app-b"] {
        lab.pki.ensure_sae(sae).expect("issue the SAE certificate");
    }
    let a = Addrs {
        grpc: free_addr(),
        fibre: free_addr(),
        etsi_a: free_addr(),
        etsi_b: free_addr(),
        peer_a: free_addr(),
        peer_b: free_addr(),
    };
    let alice = start_alice(&lab, &a).await;
    let bob = start_bob(&lab, &a);
    wait_for_keys(&lab, a.etsi_a, a.etsi_b, 12).await;
    let mut delivered = deliver_both_ways(&lab, a.etsi_a, a.etsi_b).await;
    // Reserved at Bob for app-b, fetched only after the copy is taken.
    let reserved = enc_keys(&lab, a.etsi_a, "app-a", "app-b", 2).await;

    // The copy, taken with Bob stopped.
    bob.stop().await.expect("bob");
    let store = lab.dir.0.join("bob").join("store");
    let backup = lab.dir.0.join("bob-store-backup");
    copy_dir(&store, &backup);
    let bob = start_bob(&lab, &a);
    wait_for_status(&lab, "bob", "a session", "/sessions", 1).await;
    let (code, fetched) = dec_keys(&lab, a.etsi_b, "app-b", "app-a", &reserved).await;
    assert_eq!(code, 200);
    assert!(fetched == reserved, "the slave gets the master's keys");
    delivered.extend(reserved.clone());
    wait_for_keys(&lab, a.etsi_a, a.etsi_b, 8).await;
    delivered.extend(deliver_both_ways(&lab, a.etsi_a, a.etsi_b).await);

    // (b) Restored from the copy.
    bob.stop().await.expect("bob");
    std::fs::remove_dir_all(&store).expect("remove Bob's store");
    copy_dir(&backup, &store);
    let bob = start_bob(&lab, &a);
    wait_for_status(&lab, "bob", "a session", "/sessions", 1).await;
    // The stores differed: Bob erased the reservations of the copy (the one fetched since).
    wait_for_status(&lab, "bob", "reservations erased", "/reservations_dropped_at_hello", 1).await;
    // No key comes back: neither the one reserved in the copy (fetched since) nor any other.
    for (kme, slave, master) in [(a.etsi_b, "app-b", "app-a"), (a.etsi_a, "app-a", "app-b")] {
        for key in &delivered {
            let (code, _) = dec_keys(&lab, kme, slave, master, std::slice::from_ref(key)).await;
            assert_ne!(code, 200, "key {} delivered again", key.0);
        }
    }
    // Keys flow both ways again.
    wait_for_keys(&lab, a.etsi_a, a.etsi_b, 4).await;
    delivered.extend(deliver_both_ways(&lab, a.etsi_a, a.etsi_b).await);
    let reserved = enc_keys(&lab, a.etsi_a, "app-a", "app-b", 1).await;
    bob.stop().await.expect("bob");
    alice.stop().await.expect("alice");
    assert_stores_agree(&lab, &delivered);

    // A restart with stores that agree: until the Hello (Alice is still down), Bob's KME holds
    // the reservation back; after it, the slave gets its key, once.
    let bob = start_bob(&lab, &a);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let held = loop {
        match dec_keys(&lab, a.etsi_b, "app-b", "app-a", &reserved).await {
            // Bob's KME is not listening yet.
            (0, _) if std::time::Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
            (code, _) => break code,
        }
    };
    assert_eq!(held, 503, "a reservation is held until the first Hello");
    let alice = start_alice(&lab, &a).await;
    wait_for_status(&lab, "bob", "a session", "/sessions", 1).await;
    let (code, fetched) = dec_keys(&lab, a.etsi_b, "app-b", "app-a", &reserved).await;
    assert_eq!(code, 200);
    assert!(fetched == reserved, "the slave gets the master's key");
    assert_ne!(dec_keys(&lab, a.etsi_b, "app-b", "app-a", &reserved).await.0, 200);
    delivered.extend(reserved);
    let status = lab.status("bob").expect("Bob's status");
    assert_eq!(counter(&status, "/units_dropped_at_hello"), 0, "{status}");
    assert_eq!(counter(&status, "/reservations_dropped_at_hello"), 0, "{status}");
    bob.stop().await.expect("bob");
    alice.stop().await.expect("alice");
    let before_loss = assert_stores_agree(&lab, &delivered);

    // (a) Bob's store lost.
    std::fs::remove_dir_all(&store).expect("remove Bob's store");
    let alice = start_alice(&lab, &a).await;
    let bob = start_bob(&lab, &a);
    wait_for_status(&lab, "alice", "units dropped at Hello", "/units_dropped_at_hello", before_loss.len() as u64).await;
    wait_for_keys(&lab, a.etsi_a, a.etsi_b, 4).await;
    delivered.extend(deliver_both_ways(&lab, a.etsi_a, a.etsi_b).await);
    bob.stop().await.expect("bob");
    alice.stop().await.expect("alice");
    let after_loss = assert_stores_agree(&lab, &delivered);
    assert!(after_loss.is_disjoint(&before_loss), "Alice dropped every unit Bob's lost store held");
}
