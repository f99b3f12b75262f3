//! `qkdctl lab`: a local Alice+Bob pair over a simulated fibre on loopback.
//!
//! Layout of the lab directory (created on first run, reused afterwards):
//!
//! ```text
//! DIR/pki/        ca.crt ca.key alice.crt alice.key bob.crt bob.key  (keys mode 0600)
//! DIR/alice.toml  DIR/bob.toml                                      (daemon configs)
//! DIR/alice/      DIR/bob/        data directories: store/ and status.json
//! DIR/logs/       alice.log bob.log
//! DIR/lab.json    for scripts: CA path, each KME's ETSI address and ID, each SAE's ID, KME,
//!                 certificate and key (SAEs app-a at Alice's KME, app-b at Bob's)
//! ```

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use common::store::{KeyStore, SledStore};
use common::tls::LabPki;

/// Options of `qkdctl lab`.
#[derive(clap::Args, Debug)]
pub struct LabArgs {
    /// Directory for the lab's certificates, configs, stores and logs.
    #[arg(long, default_value = "lab")]
    dir: PathBuf,
    /// Link preset for a new lab (see presets/); ignored when the configs already exist.
    #[arg(long, default_value = "lab-10km")]
    preset: String,
    /// Fibre length for a new lab, km (default: the preset's).
    #[arg(long)]
    distance_km: Option<f64>,
    /// Sifted bits per finite-key block for a new lab.
    #[arg(long, default_value_t = 100_000)]
    block_bits: u64,
    /// Stop by itself after this many seconds (default: run until Ctrl-C).
    #[arg(long)]
    duration_s: Option<f64>,
}

/// Runs the lab.
pub fn run(args: LabArgs) -> anyhow::Result<()> {
    let dir = &args.dir;
    std::fs::create_dir_all(dir.join("logs")).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    let pki = LabPki::open_or_create(&dir.join("pki")).context("creating the lab PKI")?;
    issue_lab_saes(&pki)?;
    let (alice_cfg, bob_cfg) = (dir.join("alice.toml"), dir.join("bob.toml"));
    if alice_cfg.exists() && bob_cfg.exists() {
        println!("lab: reusing {} (delete it for a fresh lab)", dir.display());
    } else {
        write_configs(&dir, &pki, &args)?;
        println!("lab: created {} (PKI in pki/, configs alice.toml and bob.toml)", dir.display());
    }

    let alice = spawn("alice", &alice_cfg, &dir.join("logs/alice.log"))?;
    let bob = spawn("bob", &bob_cfg, &dir.join("logs/bob.log"))?;
    let mut children = Children(vec![alice, bob]);
    println!(
        "lab: alice pid {}, bob pid {}; logs in {}/logs; Ctrl-C to stop",
        children.0[0].id(),
        children.0[1].id(),
        dir.display()
    );

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc_flag(stop)?;
    }
    let start = Instant::now();
    let mut last_print = Instant::now();
    let mut last_detections = 0u64;
    let result = loop {
        std::thread::sleep(Duration::from_millis(200));
        if stop.load(std::sync::atomic::Ordering::SeqCst)
            || args.duration_s.is_some_and(|d| start.elapsed().as_secs_f64() >= d)
        {
            break Ok(());
        }
        if let Some(name) = children.exited() {
            break Err(anyhow::anyhow!("{name} exited unexpectedly; see {}/logs/{name}.log", dir.display()));
        }
        if last_print.elapsed() >= Duration::from_secs(2) {
            let dt = last_print.elapsed().as_secs_f64();
            last_print = Instant::now();
            last_detections = progress(&dir, start.elapsed(), dt, last_detections);
        }
    };
    println!("lab: stopping alice and bob");
    children.terminate();
    result?;
    for node in ["alice", "bob"] {
        let store = SledStore::open(&dir.join(node).join("store"))?;
        let s = store.summary()?;
        println!("lab: {node:5} store: {} keys, {} bits, digest {}", s.n_keys, s.n_key_bits, &s.digest[..16]);
    }
    Ok(())
}

/// Prints one progress line from the daemons' status files; returns Bob's detection count.
fn progress(dir: &Path, elapsed: Duration, dt: f64, last_detections: u64) -> u64 {
    let read = |node: &str| -> Option<serde_json::Value> {
        serde_json::from_slice(&std::fs::read(dir.join(node).join("status.json")).ok()?).ok()
    };
    let Some(bob) = read("bob") else {
        println!("[{:>5.0}s] waiting for bob's first status", elapsed.as_secs_f64());
        return last_detections;
    };
    let total = &bob["total"];
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    let detections = n(&total["detections"]);
    let last = &bob["last_block"];
    let (qber_z, qber_x) = (last["qber_z"].as_f64(), last["qber_x"].as_f64());
    let pct = |x: Option<f64>| x.map_or("  -  ".to_string(), |x| format!("{:.2}%", 100.0 * x));
    let secret_bits = n(&total["secret_bits"]);
    println!(
        "[{:>5.0}s] {} | detections {:>8.0}/s | QBER Z {} X {} | blocks {} ok, {} aborted | keys {} | secret key rate {:.0} bit/s",
        elapsed.as_secs_f64(),
        if bob["connected"].as_bool() == Some(true) { "linked " } else { "waiting" },
        (detections.saturating_sub(last_detections)) as f64 / dt,
        pct(qber_z),
        pct(qber_x),
        n(&total["blocks_committed"]),
        n(&total["blocks_aborted"]),
        n(&total["keys_stored"]),
        secret_bits as f64 / elapsed.as_secs_f64(),
    );
    if let Some(reason) = last["abort_reason"].as_str() {
        println!("          last block aborted: {reason}");
    }
    detections
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The lab's two applications: `app-a` at Alice's KME, `app-b` at Bob's.
const LAB_SAES: [(&str, &str); 2] = [("app-a", "alice-kme"), ("app-b", "bob-kme")];

fn issue_lab_saes(pki: &LabPki) -> anyhow::Result<()> {
    for (sae, _) in LAB_SAES {
        if pki.dir.join(format!("{sae}.crt")).exists() {
            continue;
        }
        let read = |f: &str| std::fs::read_to_string(pki.dir.join(f)).with_context(|| format!("reading {f}"));
        let ca = common::tls::CertAuthority::from_pem(&read("ca.crt")?, &read("ca.key")?)?;
        common::tls::write_issued(&pki.dir, sae, &ca.issue_client(sae)?)?;
    }
    Ok(())
}

fn write_configs(dir: &Path, pki: &LabPki, args: &LabArgs) -> anyhow::Result<()> {
    let (grpc, fibre) = (free_port()?, free_port()?);
    let (etsi_a, etsi_b, peer_a, peer_b) = (free_port()?, free_port()?, free_port()?, free_port()?);
    let distance = args.distance_km.map_or(String::new(), |d| format!("distance_km = {d}\n"));
    let shared = format!(
        "# The physical link model (a preset from presets/, or `file = \"my-link.toml\"`).\n\
         [link]\npreset = \"{preset}\"\n{distance}\n\
         # Post-processing parameters: must be identical at Alice and Bob.\n\
         [protocol]\n# Sifted key bits per finite-key block.\nblock_bits = {block_bits}\n\n\
         # What the key length assumes (must be identical at Alice and Bob): eps_QKD, and the\n\
         # source's calibrated upper bounds mu_max and g2_max, taken from the preset's [security]\n\
         # table when not set here. Blocks whose monitored source exceeds them are aborted.\n\
         [security]\neps_qkd = 1e-9\n\n",
        preset = args.preset,
        block_bits = args.block_bits,
    );
    let tls = |node: &str| {
        let f = pki.files(node);
        format!(
            "# Mutual TLS of the classical channel: CA of the peer, own certificate and key.\n\
             [tls]\nca_cert = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n\n",
            f.ca_cert.display(),
            f.cert.display(),
            f.key.display()
        )
    };
    let kme = |node: &str, peer: &str, etsi: u16, peer_listen: u16, peer_port: u16| {
        let f = pki.files(node);
        let saes: String = LAB_SAES
            .iter()
            .map(|(sae, kme)| format!("[[kme.saes]]\nsae_id = \"{sae}\"\nkme_id = \"{kme}\"\n"))
            .collect();
        format!(
            "# Key delivery to applications (ETSI GS QKD 014) and the KME-to-KME channel.\n\
             [kme]\nlisten = \"127.0.0.1:{etsi}\"\npeer_listen = \"127.0.0.1:{peer_listen}\"\n\
             peer_addr = \"127.0.0.1:{peer_port}\"\npeer_name = \"{peer}\"\n\
             kme_id = \"{node}-kme\"\npeer_kme_id = \"{peer}-kme\"\n\n\
             # HTTPS server: the CA of the applications' client certificates, and this KME's certificate.\n\
             [kme.tls]\nca_cert = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n\n\
             # The applications (SAEs) and the KME each is attached to.\n{saes}",
            f.ca_cert.display(),
            f.cert.display(),
            f.key.display()
        )
    };
    let alice = format!(
        "# Alice (transmitter) of the qkdctl lab. Relative paths are relative to this file.\n\
         node_id = \"alice\"\n# Key store and status file.\ndata_dir = \"alice\"\n\n\
         # gRPC server of the classical channel; Bob's certificate must be valid for peer_name.\n\
         [classical]\nlisten = \"127.0.0.1:{grpc}\"\npeer_name = \"bob\"\n\n\
         # Where Bob's receiver connects to the simulated fibre.\n[fibre]\nlisten = \"127.0.0.1:{fibre}\"\n\n{}{shared}{}",
        tls("alice"),
        kme("alice", "bob", etsi_a, peer_a, peer_b)
    );
    let bob = format!(
        "# Bob (receiver) of the qkdctl lab. Relative paths are relative to this file.\n\
         node_id = \"bob\"\n# Key store and status file.\ndata_dir = \"bob\"\n\
         # Most 256-bit key units the store may hold (0: no limit); while it is full, new blocks are\n\
         # aborted (\"key store is full\") until applications fetch keys.\nmax_stored_units = {max_units}\n\n\
         # Alice's classical-channel server; her certificate must be valid for alice_name.\n\
         [classical]\nalice_addr = \"127.0.0.1:{grpc}\"\nalice_name = \"alice\"\n\n\
         # Alice's end of the simulated fibre.\n[fibre]\nalice_addr = \"127.0.0.1:{fibre}\"\n\n{}{shared}{}",
        tls("bob"),
        kme("bob", "alice", etsi_b, peer_b, peer_a),
        max_units = common::config::DEFAULT_MAX_STORED_UNITS
    );
    std::fs::write(dir.join("alice.toml"), alice)?;
    std::fs::write(dir.join("bob.toml"), bob)?;
    let sae = |name: &str, kme: &str| {
        serde_json::json!({
            "sae_id": name,
            "kme_id": kme,
            "cert": pki.dir.join(format!("{name}.crt")),
            "key": pki.dir.join(format!("{name}.key")),
        })
    };
    let lab_json = serde_json::json!({
        "ca_cert": pki.dir.join("ca.crt"),
        "kmes": [
            { "kme_id": "alice-kme", "etsi_addr": format!("127.0.0.1:{etsi_a}") },
            { "kme_id": "bob-kme", "etsi_addr": format!("127.0.0.1:{etsi_b}") },
        ],
        "saes": [sae("app-a", "alice-kme"), sae("app-b", "bob-kme")],
    });
    std::fs::write(dir.join("lab.json"), serde_json::to_string_pretty(&lab_json)?)?;
    Ok(())
}

fn spawn(name: &str, config: &Path, log: &Path) -> anyhow::Result<Child> {
    let log_file = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
    Command::new(std::env::current_exe()?)
        .args(["daemon", name, "--config"])
        .arg(config)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .spawn()
        .with_context(|| format!("starting {name}"))
}

/// The daemons, Alice then Bob; stopped when dropped.
struct Children(Vec<Child>);

impl Children {
    fn exited(&mut self) -> Option<&'static str> {
        for (child, name) in self.0.iter_mut().zip(["alice", "bob"]) {
            if let Ok(Some(_)) = child.try_wait() {
                return Some(name);
            }
        }
        None
    }

    /// Stops Bob first (he finishes the block in progress), then Alice: SIGTERM, then SIGKILL
    /// after 15 s.
    fn terminate(&mut self) {
        for child in self.0.iter_mut().rev() {
            if let Ok(None) = child.try_wait() {
                let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
            }
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() > deadline => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        }
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// Sets `flag` on SIGINT or SIGTERM.
fn ctrlc_flag(flag: std::sync::Arc<std::sync::atomic::AtomicBool>) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    std::thread::spawn(move || {
        runtime.block_on(async {
            let token = tokio_util::sync::CancellationToken::new();
            common::shutdown_on_signal(token.clone()).await;
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
        });
    });
    Ok(())
}
