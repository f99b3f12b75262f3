//! Key custody at rest (docs/store.md, "Key custody"): keys delivered to applications through
//! the real KMEs leave no trace in the data directories, and a daemon given a wrong or missing
//! key-encryption key refuses to start (so its KME serves nothing) without touching its store.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use base64::Engine;
use common::config::{AliceConfig, BobConfig};
use qkd_kme::KmeConfig;
use qkd_store::{BlockMeta, Kek, KeyStore, KeyUnit, SledStore};
use serde_json::{Value, json};
use uuid::Uuid;
use zeroize::Zeroizing;

use super::*;

/// The two lab applications: app-a at Alice's KME, app-b at Bob's.
const SAES: [(&str, &str); 2] = [("app-a", "alice-kme"), ("app-b", "bob-kme")];

/// A free loopback port (the KME binds its addresses from its configuration).
pub(super) fn free_addr() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr")
}

/// The `[kme]` section of `node` (at `listen`, its peer channel at `peer_listen`, the peer's at
/// `peer`).
pub(super) fn kme_config(
    lab: &Lab,
    node: &str,
    peer_node: &str,
    listen: std::net::SocketAddr,
    peer_listen: std::net::SocketAddr,
    peer: std::net::SocketAddr,
) -> KmeConfig {
    let saes: Vec<Value> = SAES.iter().map(|(sae, kme)| json!({ "sae_id": sae, "kme_id": kme })).collect();
    serde_json::from_value(json!({
        "listen": listen.to_string(),
        "tls": serde_json::to_value(lab.pki.kme_files(node)).expect("tls files"),
        "peer_listen": peer_listen.to_string(),
        "peer_addr": peer.to_string(),
        "peer_name": peer_node,
        "kme_id": format!("{node}-kme"),
        "peer_kme_id": format!("{peer_node}-kme"),
        "saes": saes,
        "allow_simulated_keys": true,
    }))
    .expect("kme config")
}

/// An HTTPS client presenting `sae`'s certificate from the lab PKI.
pub(super) fn sae_client(lab: &Lab, sae: &str) -> reqwest::Client {
    use qkd_tls::pki::Kind;
    let ca = std::fs::read(lab.pki.sae_trust_anchor(sae)).expect("read the node CA");
    let mut pem = std::fs::read(lab.pki.cert_path(Kind::Sae, sae)).expect("read the SAE certificate");
    pem.push(b'\n');
    pem.extend(std::fs::read(lab.pki.key_path(Kind::Sae, sae)).expect("read the SAE key"));
    reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&ca).expect("ca pem")])
        .identity(reqwest::Identity::from_pem(&pem).expect("identity pem"))
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

/// `(status, JSON body)` of a request.
pub(super) async fn call(request: reqwest::RequestBuilder) -> (u16, Value) {
    match request.send().await {
        Ok(response) => {
            let code = response.status().as_u16();
            (code, response.json().await.unwrap_or(Value::Null))
        }
        Err(e) => (0, json!({ "error": e.to_string() })),
    }
}

/// The (key ID, key bytes) of a key container.
fn keys_of(container: &Value) -> Vec<(String, Vec<u8>)> {
    container["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .map(|k| {
            let bytes = base64::engine::general_purpose::STANDARD.decode(k["key"].as_str().expect("key")).expect("b64");
            (k["key_ID"].as_str().expect("key_ID").to_owned(), bytes)
        })
        .collect()
}

/// Every file under `dir` (recursively) and its bytes.
fn files_under(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display())) {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.insert(path.clone(), std::fs::read(&path).expect("read a file"));
        }
    }
    out
}

/// The files under `dirs` that hold `needle`.
fn grep(dirs: &[PathBuf], needle: &[u8]) -> Vec<PathBuf> {
    dirs.iter()
        .flat_map(|dir| files_under(dir))
        .filter(|(_, bytes)| bytes.windows(needle.len()).any(|w| w == needle))
        .map(|(path, _)| path)
        .collect()
}

/// A lab whose daemons serve keys through their KMEs (app-a at Alice's, app-b at Bob's): its
/// listeners, the ETSI addresses, and the two configurations, to adjust before the daemons start
/// ([`KmeLab::spawn`]).
struct KmeLab {
    lab: Lab,
    grpc: tokio::net::TcpListener,
    fibre: tokio::net::TcpListener,
    etsi_a: std::net::SocketAddr,
    etsi_b: std::net::SocketAddr,
    alice_cfg: AliceConfig,
    bob_cfg: BobConfig,
}

impl KmeLab {
    async fn new(name: &str) -> Self {
        let lab = Lab::new(name);
        for (sae, _) in SAES {
            lab.pki.ensure_sae(sae).expect("issue the SAE certificate");
        }
        let (grpc, fibre) = bind_pair().await;
        let (etsi_a, etsi_b, peer_a, peer_b) = (free_addr(), free_addr(), free_addr(), free_addr());
        let mut alice_cfg = lab.alice_config(grpc.local_addr().unwrap(), fibre.local_addr().unwrap());
        alice_cfg.kme = Some(kme_config(&lab, "alice", "bob", etsi_a, peer_a, peer_b));
        let mut bob_cfg = lab.bob_config(grpc.local_addr().unwrap(), fibre.local_addr().unwrap());
        bob_cfg.kme = Some(kme_config(&lab, "bob", "alice", etsi_b, peer_b, peer_a));
        Self { lab, grpc, fibre, etsi_a, etsi_b, alice_cfg, bob_cfg }
    }

    /// Starts Alice and Bob with their configurations; returns the lab and the two daemons.
    fn spawn(self) -> (Lab, std::net::SocketAddr, std::net::SocketAddr, Running, Running) {
        let alice = spawn_alice_with(&self.lab, self.alice_cfg, self.grpc, Some(self.fibre));
        let bob = spawn_bob_with(&self.lab, self.bob_cfg);
        (self.lab, self.etsi_a, self.etsi_b, alice, bob)
    }
}

/// Alice and Bob with their KMEs; the applications fetch keys both ways (master at one KME,
/// slave at the other); the daemons stop. No file of either data directory (stores, slot files,
/// audit logs, status files) holds a delivered key's bytes, raw, base64 or hex; nor does any hold
/// a key still in the store (they are sealed); while the audit logs do hold the key IDs (the
/// search reads every file).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivered_keys_leave_no_trace_in_the_data_directories() {
    let (lab, etsi_a, etsi_b, alice, bob) = KmeLab::new("custody").await.spawn();

    wait_for_keys(&lab, etsi_a, etsi_b, 4).await;
    let delivered = deliver_both_ways(&lab, etsi_a, etsi_b).await;
    bob.stop().await.expect("bob");
    alice.stop().await.expect("alice");

    let data_dirs = [lab.dir.0.join("alice"), lab.dir.0.join("bob")];
    // The search reads every file: the audit logs name the delivered key IDs.
    for (id, _) in &delivered {
        assert!(!grep(&data_dirs, id.as_bytes()).is_empty(), "key ID {id} in no audit log");
    }
    for (id, key) in &delivered {
        let b64 = base64::engine::general_purpose::STANDARD.encode(key.as_slice());
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        for (form, needle) in [("raw", key.as_slice()), ("base64", b64.as_bytes()), ("hex", hex.as_bytes())] {
            let found = grep(&data_dirs, needle);
            assert!(found.is_empty(), "key {id} ({form}) found in {found:?}");
        }
    }
    // Keys still held are sealed too: none of them is in clear either.
    for node in ["alice", "bob"] {
        let store = SledStore::open(&lab.dir.0.join(node).join("store"), &lab.kek(node)).expect("open the store");
        assert!(store.verify().expect("verify").is_healthy());
        let held = store.select_ready_units(50, |_| true).expect("units");
        assert!(!held.is_empty(), "{node} holds keys still");
        drop(store);
        for unit in &held {
            assert!(grep(&data_dirs, &unit.key).is_empty(), "{node}'s unit {} in clear", unit.key_id);
        }
    }
}

/// The URL of an ETSI endpoint of the KME at `kme` for the peer SAE `sae`.
pub(super) fn url(kme: std::net::SocketAddr, sae: &str, endpoint: &str) -> String {
    format!("https://{kme}/api/v1/keys/{sae}/{endpoint}")
}

/// Waits (up to 180 s) until the KMEs at `etsi_a` (app-a's) and `etsi_b` (app-b's) can serve
/// at least `n` keys each way at once. Either KME may serve any ready unit, so each counts them
/// all: `2 n` keys.
pub(super) async fn wait_for_keys(lab: &Lab, etsi_a: std::net::SocketAddr, etsi_b: std::net::SocketAddr, n: u64) {
    let (app_a, app_b) = (sae_client(lab, "app-a"), sae_client(lab, "app-b"));
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let (x, y) = (
            call(app_a.get(url(etsi_a, "app-b", "status"))).await,
            call(app_b.get(url(etsi_b, "app-a", "status"))).await,
        );
        let count = |(code, status): &(u16, Value)| {
            if *code == 200 { status["stored_key_count"].as_u64().unwrap_or(0) } else { 0 }
        };
        if count(&x) >= 2 * n && count(&y) >= 2 * n {
            return;
        }
        assert!(Instant::now() < deadline, "no {n} keys at both KMEs within 180 s: {x:?} {y:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Get key at the master's KME: `(key ID, key bytes)` of `number` keys of 256 bits (one unit
/// each).
pub(super) async fn enc_keys(
    lab: &Lab,
    kme: std::net::SocketAddr,
    master: &str,
    slave: &str,
    number: u32,
) -> Vec<(String, Vec<u8>)> {
    let (code, container) =
        call(sae_client(lab, master).get(url(kme, slave, &format!("enc_keys?number={number}")))).await;
    assert_eq!(code, 200, "{container}");
    keys_of(&container)
}

/// Get key with key IDs at the slave's KME: the status and the keys.
pub(super) async fn dec_keys(
    lab: &Lab,
    kme: std::net::SocketAddr,
    slave: &str,
    master: &str,
    keys: &[(String, Vec<u8>)],
) -> (u16, Vec<(String, Vec<u8>)>) {
    let body = json!({ "key_IDs": keys.iter().map(|(id, _)| json!({ "key_ID": id })).collect::<Vec<_>>() });
    let (code, answer) = call(sae_client(lab, slave).post(url(kme, master, "dec_keys")).json(&body)).await;
    (code, if code == 200 { keys_of(&answer) } else { vec![] })
}

/// One delivery of 3 keys both ways: app-a master at its KME `etsi_a` (app-b fetches at
/// `etsi_b`), and app-b master at `etsi_b`. Returns the keys; the clients are dropped, so their
/// connections close.
pub(super) async fn deliver_both_ways(
    lab: &Lab,
    etsi_a: std::net::SocketAddr,
    etsi_b: std::net::SocketAddr,
) -> Vec<(String, Vec<u8>)> {
    let mut delivered = Vec::new();
    for (master_kme, slave_kme, master, slave) in
        [(etsi_a, etsi_b, "app-a", "app-b"), (etsi_b, etsi_a, "app-b", "app-a")]
    {
        let keys = enc_keys(lab, master_kme, master, slave, 3).await;
        assert_eq!(keys.len(), 3);
        let (code, fetched) = dec_keys(lab, slave_kme, slave, master, &keys).await;
        assert_eq!(code, 200);
        assert!(fetched == keys, "the slave gets the master's keys");
        delivered.extend(keys);
    }
    delivered
}

/// A daemon process of the test, killed if the test ends before it stopped.
struct Daemon {
    name: &'static str,
    child: std::process::Child,
    log: PathBuf,
}

impl Daemon {
    fn start(name: &'static str, config: &Path, log: PathBuf) -> Self {
        let child = std::process::Command::new(workspace_binary(name))
            .arg("--config")
            .arg(config)
            .stderr(std::fs::File::create(&log).expect("create the log"))
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        Self { name, child, log }
    }

    /// As [`Daemon::start`], with locking memory in RAM not allowed: `RLIMIT_MEMLOCK` of 8 MiB
    /// and `CAP_IPC_LOCK` dropped (`setpriv`, util-linux), through a shell that `exec`s, so the
    /// child's PID is the daemon's.
    fn start_without_memlock(name: &'static str, config: &Path, log: PathBuf) -> Self {
        let child = std::process::Command::new("sh")
            .arg("-c")
            .arg("ulimit -l 8192 && exec setpriv --bounding-set -ipc_lock \"$0\" --config \"$1\"")
            .arg(workspace_binary(name))
            .arg(config)
            .stderr(std::fs::File::create(&log).expect("create the log"))
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        Self { name, child, log }
    }

    /// Kilobytes of the daemon's memory locked in RAM (`VmLck` of /proc/PID/status).
    fn locked_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).expect("read /proc/PID/status");
        let line = status.lines().find(|l| l.starts_with("VmLck:")).expect("a VmLck line");
        line.split_whitespace().nth(1).and_then(|kib| kib.parse().ok()).expect("VmLck in kB")
    }

    /// SIGTERM, and the exit status is success.
    fn stop(mut self) {
        let pid = self.child.id().to_string();
        std::process::Command::new("kill").args(["-TERM", &pid]).status().expect("kill");
        let status = self.child.wait().expect("wait");
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        assert!(status.success(), "{} exited with {status}; its log:\n{log}", self.name);
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every readable mapping of process `pid`, read through /proc/PID/mem (which needs
/// CAP_SYS_PTRACE for a process that made itself non-dumpable): `(mapping, bytes)`.
fn process_memory(pid: u32) -> Vec<(String, Vec<u8>)> {
    use std::os::unix::fs::FileExt;
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("read /proc/PID/maps");
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).expect("open /proc/PID/mem (needs CAP_SYS_PTRACE)");
    let mut regions = Vec::new();
    for line in maps.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (range, perms) = (fields[0], fields[1]);
        let name = fields.get(5).copied().unwrap_or("[anonymous]");
        if !perms.starts_with('r') || name == "[vvar]" || name == "[vsyscall]" || name.starts_with("[vvar") {
            continue;
        }
        let (start, end) = range.split_once('-').expect("a range");
        let (start, end) = (u64::from_str_radix(start, 16).unwrap(), u64::from_str_radix(end, 16).unwrap());
        let mut bytes = vec![0u8; (end - start) as usize];
        // A mapping that cannot be read (a guard page, a device) holds nothing of ours.
        if mem.read_exact_at(&mut bytes, start).is_ok() {
            regions.push((line.to_owned(), bytes));
        }
    }
    regions
}

/// Acceptance of memory hygiene: real `alice` and `bob` processes with their KMEs; the
/// applications fetch keys both ways and close their connections. Then every readable page of
/// both processes (through /proc/PID/mem, as a debugger or a core dump would see them) is
/// searched for the delivered keys, raw and base64: none is found, because every buffer that
/// held one was wiped when it was freed (the daemons' wiping allocator) and the store holds
/// units sealed. The search is checked to work: it finds each KME's ID.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivered_keys_are_not_in_the_daemons_memory() {
    let lab = Lab::new("custody-memory");
    for (sae, _) in SAES {
        lab.pki.ensure_sae(sae).expect("issue the SAE certificate");
    }
    let (grpc, fibre) = bind_pair().await;
    let (grpc_addr, fibre_addr) = (grpc.local_addr().unwrap(), fibre.local_addr().unwrap());
    drop((grpc, fibre));
    let (etsi_a, etsi_b, peer_a, peer_b) = (free_addr(), free_addr(), free_addr(), free_addr());
    let mut alice_cfg = lab.alice_config(grpc_addr, fibre_addr);
    alice_cfg.kme = Some(kme_config(&lab, "alice", "bob", etsi_a, peer_a, peer_b));
    let mut bob_cfg = lab.bob_config(grpc_addr, fibre_addr);
    bob_cfg.kme = Some(kme_config(&lab, "bob", "alice", etsi_b, peer_b, peer_a));
    let (alice_toml, bob_toml) = (lab.dir.0.join("alice.toml"), lab.dir.0.join("bob.toml"));
    std::fs::write(&alice_toml, toml::to_string(&alice_cfg).expect("alice toml")).unwrap();
    std::fs::write(&bob_toml, toml::to_string(&bob_cfg).expect("bob toml")).unwrap();
    // Alice may lock her memory in RAM (this test runs as root, CAP_IPC_LOCK in effect, as
    // LimitMEMLOCK=infinity allows under systemd), Bob may not.
    let alice = Daemon::start("alice", &alice_toml, lab.dir.0.join("alice.log"));
    let bob = Daemon::start_without_memlock("bob", &bob_toml, lab.dir.0.join("bob.log"));

    wait_for_keys(&lab, etsi_a, etsi_b, 4).await;
    let delivered = deliver_both_ways(&lab, etsi_a, etsi_b).await;

    // Where RLIMIT_MEMLOCK allows it, the daemon's pages are locked (none can be swapped out);
    // elsewhere it says why it did not lock them.
    let log = |d: &Daemon| std::fs::read_to_string(&d.log).unwrap_or_default();
    assert!(log(&alice).contains("memory locked in RAM"), "alice's log:\n{}", log(&alice));
    assert!(alice.locked_kib() > 1024, "alice locked only {} kB", alice.locked_kib());
    eprintln!("alice: {} kB of memory locked in RAM; bob: none (not allowed)", alice.locked_kib());
    assert!(log(&bob).contains("memory not locked in RAM: RLIMIT_MEMLOCK is"), "bob's log:\n{}", log(&bob));
    assert_eq!(bob.locked_kib(), 0);

    // The clients have closed their connections; the KMEs end their side when they read the
    // close, so the search is repeated (for up to 10 s) while it still finds a key.
    for daemon in [&alice, &bob] {
        let pid = daemon.child.id();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let memory = process_memory(pid);
            let total: usize = memory.iter().map(|(_, bytes)| bytes.len()).sum();
            let found_in = |needle: &[u8]| -> Vec<String> {
                let finder = memchr::memmem::Finder::new(needle);
                memory.iter().filter(|(_, bytes)| finder.find(bytes).is_some()).map(|(map, _)| map.clone()).collect()
            };
            let kme_id = format!("{}-kme", daemon.name);
            assert!(
                !found_in(kme_id.as_bytes()).is_empty(),
                "the search of {} ({total} bytes) does not work",
                daemon.name
            );
            let mut found = Vec::new();
            for (id, key) in &delivered {
                let b64 = base64::engine::general_purpose::STANDARD.encode(key.as_slice());
                for (form, needle) in [("raw", key.as_slice()), ("base64", b64.as_bytes())] {
                    for mapping in found_in(needle) {
                        found.push(format!("key {id} ({form}) at {mapping}"));
                    }
                }
            }
            if found.is_empty() {
                eprintln!(
                    "{}: {total} bytes of memory searched, none of the {} delivered keys found",
                    daemon.name,
                    delivered.len()
                );
                break;
            }
            assert!(Instant::now() < deadline, "delivered keys in {}'s memory:\n{}", daemon.name, found.join("\n"));
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    bob.stop();
    alice.stop();
}

/// A data directory whose store holds keys (sealed under `lab`'s KEK of `node`); returns the
/// store's files.
fn store_with_keys(lab: &Lab, node: &str) -> BTreeMap<PathBuf, Vec<u8>> {
    let dir = lab.dir.0.join(node).join("store");
    let store = SledStore::open(&dir, &lab.kek(node)).expect("create the store");
    let units: Vec<KeyUnit> =
        (0..8).map(|i| KeyUnit { key_id: Uuid::new_v4(), key: Zeroizing::new(vec![i as u8 ^ 0xA5; 32]) }).collect();
    let meta = BlockMeta {
        block_id: Uuid::new_v4(),
        created_unix_ms: 1,
        n_sifted_bits: 1000,
        qber_z: 0.02,
        qber_x: 0.03,
        phase_error_upper: 0.05,
        leak_bits: 300,
        final_bits: 256 * units.len() as u64,
        simulated: true,
    };
    store.put_ready(&meta, &units).expect("put_ready");
    drop(store);
    files_under(&dir)
}

/// Alice with her KME, given a wrong KEK: she refuses to start with an error naming the KEK
/// file, her KME never listens, and every file of her store is byte for byte as before. Then
/// with a missing KEK file: refused too, naming the file and how to make one. With the right
/// one she starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kme_with_a_wrong_or_missing_kek_refuses_to_serve_and_leaves_the_store_untouched() {
    let lab = Lab::new("custody-kek");
    let before = store_with_keys(&lab, "alice");
    let store_dir = lab.dir.0.join("alice").join("store");
    let wrong = lab.dir.0.join("keks").join("wrong.kek");
    Kek::generate("wrong").write_new(&wrong).expect("write a wrong KEK");
    let missing = lab.dir.0.join("keks").join("missing.kek");

    for (kek_file, expected) in [(&wrong, "wrong KEK"), (&missing, "qkdctl store kek")] {
        let (grpc, fibre) = bind_pair().await;
        let (etsi, peer_listen) = (free_addr(), free_addr());
        let mut cfg = lab.alice_config(grpc.local_addr().unwrap(), fibre.local_addr().unwrap());
        cfg.kme = Some(kme_config(&lab, "alice", "bob", etsi, peer_listen, free_addr()));
        cfg.store.kek_file = Some(kek_file.clone());
        let alice = spawn_alice_with(&lab, cfg, grpc, Some(fibre));
        let error = match tokio::time::timeout(Duration::from_secs(30), alice.task).await {
            Ok(joined) => joined.expect("alice panicked").expect_err("alice started with a bad KEK"),
            Err(_) => panic!("alice did not refuse a bad KEK ({})", kek_file.display()),
        };
        let message = format!("{error:#}");
        assert!(message.contains(&kek_file.display().to_string()), "names the KEK file: {message}");
        assert!(message.contains(expected), "{message}");
        assert!(tokio::net::TcpStream::connect(etsi).await.is_err(), "the KME listens");
        assert_eq!(files_under(&store_dir), before, "the store changed ({})", kek_file.display());
    }

    // The right KEK: she starts, her KME answers, and the keys are there.
    let (grpc, fibre) = bind_pair().await;
    let etsi = free_addr();
    let mut cfg = lab.alice_config(grpc.local_addr().unwrap(), fibre.local_addr().unwrap());
    cfg.kme = Some(kme_config(&lab, "alice", "bob", etsi, free_addr(), free_addr()));
    let alice = spawn_alice_with(&lab, cfg, grpc, Some(fibre));
    lab.pki.ensure_sae("app-a").expect("issue the SAE certificate");
    let app_a = sae_client(&lab, "app-a");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        let (code, status) = call(app_a.get(format!("https://{etsi}/api/v1/keys/app-b/status"))).await;
        if code == 200 {
            break status;
        }
        assert!(Instant::now() < deadline, "alice's KME does not answer: {code} {status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Alice owns the units whose UUID ends in an even byte: some of the 8, most likely; the
    // count is what her store holds for the pair, whatever it is.
    assert!(status["stored_key_count"].is_u64(), "{status}");
    alice.stop().await.expect("alice");
    let store = SledStore::open(&store_dir, &lab.kek("alice")).expect("open");
    assert_eq!(store.n_units().expect("units"), 8);
}

/// One-way use (every master at Alice's KME) with a small store at Bob: the store fills, Bob
/// aborts blocks ("key store full"), and Alice's KME still serves every unit in it (its own
/// half, then Bob's half, borrowed), each once and the same at the slave's KME; once keys are
/// fetched, blocks are committed again. Before borrowing, Alice's KME answered "not enough key"
/// with Bob's half of the store untouched, the store stayed full and the link stopped for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_way_use_drains_a_full_store_and_the_link_resumes() {
    const MAX_STORED_UNITS: u64 = 40;
    let mut kme_lab = KmeLab::new("oneway").await;
    kme_lab.bob_cfg.max_stored_units = MAX_STORED_UNITS;
    let (lab, etsi_a, etsi_b, alice, bob) = kme_lab.spawn();

    let full = wait_for("a block aborted because Bob's store is full", Duration::from_secs(180), || {
        lab.status("bob").filter(|s| {
            s.pointer("/last_block/abort_reason").and_then(Value::as_str).is_some_and(|r| r.contains("store is full"))
        })
    })
    .await;
    let committed_when_full = counter(&full, "/total/blocks_committed");
    let (app_a, app_b) = (sae_client(&lab, "app-a"), sae_client(&lab, "app-b"));
    let (_, status) = call(app_a.get(url(etsi_a, "app-b", "status"))).await;
    let stored = status["stored_key_count"].as_u64().expect("stored_key_count");
    assert!(stored >= MAX_STORED_UNITS, "the store is full, and Alice's KME counts all of it: {status}");
    // app-a takes it all, in requests of up to 8 keys; app-b fetches each key from Bob's KME.
    let mut delivered = Vec::new();
    while (delivered.len() as u64) < stored {
        let number = (stored - delivered.len() as u64).min(8) as u32;
        let keys = enc_keys(&lab, etsi_a, "app-a", "app-b", number).await;
        let (code, fetched) = dec_keys(&lab, etsi_b, "app-b", "app-a", &keys).await;
        assert_eq!(code, 200);
        assert!(fetched == keys, "the slave gets the master's keys");
        delivered.extend(keys);
    }
    let distinct: std::collections::HashSet<&Vec<u8>> = delivered.iter().map(|(_, key)| key).collect();
    assert_eq!(distinct.len(), delivered.len(), "a key was delivered twice");
    // The store has room again: Bob commits blocks.
    wait_for("a block committed after the store was drained", Duration::from_secs(180), || {
        lab.status("bob").filter(|s| counter(s, "/total/blocks_committed") > committed_when_full)
    })
    .await;
    drop((app_a, app_b));
    bob.stop().await.expect("bob");
    alice.stop().await.expect("alice");
}
