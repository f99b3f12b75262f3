//! `qkdctl lab`: a local Alice+Bob pair on loopback, over the simulated fibre (`--device sim`,
//! the default) or through the device API served by the emulator (`--device emulator`: a
//! `qkdctl device emulate` process serves Alice's transmitter and Bob's receiver at the
//! time-tag level, and the daemons use their `grpc` device drivers, as with hardware).
//!
//! Either way the quantum channel is simulated: the keys are stored marked simulated, and the
//! lab's KMEs serve them because their configs set `allow_simulated_keys = true`.
//!
//! Layout of the lab directory (created on first run, reused afterwards):
//!
//! ```text
//! DIR/pki/        the lab's PKI (qkd_tls::pki layout): ca/ (CAs, offline), nodes/alice/,
//!                 nodes/bob/ (node bundles), apps/app-a/, apps/app-b/ (keys mode 0600)
//! DIR/alice.toml  DIR/bob.toml                                      (daemon configs)
//! DIR/alice/      DIR/bob/        data directories: store/ and status.json
//! DIR/keks/       alice.kek bob.kek: each store's key-encryption key (mode 0600)
//! DIR/logs/       alice.log bob.log (and emulator.log)
//! DIR/lab.json    for scripts: CA path, each KME's ETSI address and ID, each SAE's ID, KME,
//!                 certificate and key (SAEs app-a at Alice's KME, app-b at Bob's), and whether
//!                 the lab is running (`running`, `pid`)
//! DIR/lab-args.json  the preset, distance, block size and device the lab was created with
//! DIR/lab.pid     the PID of the `qkdctl lab` running on the directory (removed when it stops)
//! ```
//!
//! Flags are checked before anything is written; a directory that holds a lab keeps the settings
//! it was created with (other values are refused, not ignored); a directory in use by another
//! `qkdctl lab` is refused with that lab's PID.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use qkd_store::{KeyStore, SledStore};
use qkd_tls::LabPki;

/// Options of `qkdctl lab`.
#[derive(clap::Args, Debug)]
pub struct LabArgs {
    /// Directory for the lab's certificates, configs, stores and logs.
    #[arg(long, default_value = "lab")]
    dir: PathBuf,
    /// Link preset for a new lab (see presets/) [default: lab-10km]. An existing lab keeps the
    /// preset it was created with: another value is refused.
    #[arg(long)]
    preset: Option<String>,
    /// Fibre length for a new lab, km [default: the preset's].
    #[arg(long)]
    distance_km: Option<f64>,
    /// Sifted bits per finite-key block for a new lab [default: 100000].
    #[arg(long)]
    block_bits: Option<u64>,
    /// Stop by itself after this many seconds (default: run until Ctrl-C).
    #[arg(long)]
    duration_s: Option<f64>,
    /// The quantum channel of a new lab [default: sim]: `sim`, the in-process simulator over
    /// the simulated fibre; `emulator`, the device emulator serving the device API at the
    /// time-tag level, the daemons connected to it as to hardware.
    #[arg(long, value_enum)]
    device: Option<LabDevice>,
}

/// The quantum channel of a lab.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LabDevice {
    /// The in-process simulator, photons over the simulated fibre.
    #[default]
    Sim,
    /// The device emulator (`qkdctl device emulate`), through the device API.
    Emulator,
}

/// The settings a lab is created with (`DIR/lab-args.json`).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct LabSettings {
    preset: String,
    distance_km: Option<f64>,
    block_bits: u64,
    #[serde(default)]
    device: LabDevice,
    /// The emulator's transmitter and receiver addresses (`--device emulator`).
    #[serde(default)]
    emulator: Option<(String, String)>,
}

impl LabSettings {
    /// The flags' values over the defaults, checked the way the daemons will check them, before
    /// anything is written.
    fn from_args(args: &LabArgs) -> anyhow::Result<Self> {
        let settings = Self {
            preset: args.preset.clone().unwrap_or_else(|| "lab-10km".into()),
            distance_km: args.distance_km,
            block_bits: args.block_bits.unwrap_or(100_000),
            device: args.device.unwrap_or_default(),
            emulator: None,
        };
        let mut link = qkd_sim::LinkParams::preset(&settings.preset)
            .map_err(|e| anyhow::anyhow!("--preset {}: {e}", settings.preset))?;
        if let Some(km) = settings.distance_km {
            if !(km.is_finite() && km >= 0.0) {
                anyhow::bail!("--distance-km {km}: not a fibre length in km (a finite number, 0 or more)");
            }
            link.distance_km = km;
            link.validate().map_err(|e| anyhow::anyhow!("--distance-km {km}: {e}"))?;
        }
        let protocol = qkd_core::link::ProtocolParams {
            block_bits: settings.block_bits,
            ..qkd_core::link::ProtocolParams::default()
        };
        protocol.validate().map_err(|e| anyhow::anyhow!("--block-bits {}: {e}", settings.block_bits))?;
        Ok(settings)
    }

    /// The flags given explicitly that differ from these settings, as `--flag value` text.
    fn conflicts(&self, args: &LabArgs) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(preset) = args.preset.as_ref().filter(|p| **p != self.preset) {
            out.push(format!("--preset {preset} (the lab has {})", self.preset));
        }
        if let Some(km) = args.distance_km.filter(|km| Some(*km) != self.distance_km) {
            let has = self.distance_km.map_or("the preset's".to_string(), |d| format!("{d}"));
            out.push(format!("--distance-km {km} (the lab has {has})"));
        }
        if let Some(bits) = args.block_bits.filter(|b| *b != self.block_bits) {
            out.push(format!("--block-bits {bits} (the lab has {})", self.block_bits));
        }
        if let Some(device) = args.device.filter(|d| *d != self.device) {
            out.push(format!("--device {device:?} (the lab has {:?})", self.device).to_lowercase());
        }
        out
    }
}

/// `DIR/lab.pid` while a lab runs on the directory; removed when dropped.
struct PidFile(PathBuf);

impl PidFile {
    /// Refuses a directory in use by a running `qkdctl lab` (its PID file names a live process);
    /// a PID file left by a lab that was killed is taken over.
    fn check(dir: &Path) -> anyhow::Result<()> {
        let path = dir.join("lab.pid");
        if let Ok(text) = std::fs::read_to_string(&path)
            && let Ok(pid) = text.trim().parse::<u32>()
            && pid != std::process::id()
            && Path::new("/proc").join(pid.to_string()).exists()
        {
            anyhow::bail!(
                "{} is in use by another qkdctl lab (pid {pid}); stop it first, or use another --dir",
                dir.display()
            );
        }
        Ok(())
    }

    fn create(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join("lab.pid");
        std::fs::write(&path, format!("{}\n", std::process::id()))
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(Self(path))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Runs the lab.
pub fn run(args: LabArgs) -> anyhow::Result<()> {
    let settings = LabSettings::from_args(&args)?;
    let dir = &args.dir;
    let (alice_cfg, bob_cfg) = (dir.join("alice.toml"), dir.join("bob.toml"));
    let existing = alice_cfg.exists() && bob_cfg.exists();
    if dir.exists() {
        PidFile::check(dir)?;
    }
    let settings_path = dir.join("lab-args.json");
    let mut settings = if existing {
        let recorded: Option<LabSettings> =
            std::fs::read(&settings_path).ok().and_then(|bytes| serde_json::from_slice(&bytes).ok());
        match recorded {
            Some(recorded) => {
                let conflicts = recorded.conflicts(&args);
                if !conflicts.is_empty() {
                    anyhow::bail!(
                        "{} holds a lab created with other settings: {}; delete the directory for a new lab with \
                         these, or use another --dir",
                        dir.display(),
                        conflicts.join(", ")
                    );
                }
                recorded
            }
            None if args.preset.is_some()
                || args.distance_km.is_some()
                || args.block_bits.is_some()
                || args.device.is_some() =>
            {
                anyhow::bail!(
                    "{} holds a lab whose settings are not recorded (made by an older qkdctl): its configs \
                     stay as they are; delete the directory for a new lab with these flags, or run without them",
                    dir.display()
                );
            }
            None => settings,
        }
    } else {
        settings
    };
    std::fs::create_dir_all(dir.join("logs")).with_context(|| format!("creating {}", dir.join("logs").display()))?;
    let dir = dir.canonicalize().with_context(|| format!("resolving {}", dir.display()))?;
    let _pid_file = PidFile::create(&dir)?;
    let pki_dir = dir.join("pki");
    let pki =
        LabPki::open_or_create(&pki_dir).with_context(|| format!("creating the lab PKI in {}", pki_dir.display()))?;
    issue_lab_saes(&pki)?;
    let (alice_cfg, bob_cfg) = (dir.join("alice.toml"), dir.join("bob.toml"));
    if existing {
        println!("lab: reusing {} (delete it for a fresh lab)", dir.display());
    } else {
        write_configs(&dir, &pki, &mut settings)?;
        // One pre-shared authentication secret for both nodes (never written anywhere else).
        common::auth_pool::init_nodes(&[&dir.join("alice"), &dir.join("bob")])
            .context("installing the lab's authentication secret")?;
        let path = dir.join("lab-args.json");
        std::fs::write(&path, serde_json::to_string_pretty(&settings)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!(
            "lab: created {} (PKI in pki/, configs alice.toml and bob.toml, one pre-shared authentication secret \
             installed at both nodes)",
            dir.display()
        );
    }

    mark_running(&dir, true)?;
    let mut children = Children(Vec::new());
    if settings.device == LabDevice::Emulator {
        let (alice_dev, bob_dev) = settings.emulator.clone().context("lab-args.json names no emulator addresses")?;
        let mut args = vec![
            "device".to_string(),
            "emulate".into(),
            "--listen-alice".into(),
            alice_dev,
            "--listen-bob".into(),
            bob_dev,
            "--preset".into(),
            settings.preset.clone(),
        ];
        if let Some(km) = settings.distance_km {
            args.extend(["--distance-km".into(), km.to_string()]);
        }
        children.0.push(("emulator", spawn_with(&args, "emulator", &dir.join("logs/emulator.log"))?));
    }
    children.0.push(("alice", spawn("alice", &alice_cfg, &dir.join("logs/alice.log"))?));
    children.0.push(("bob", spawn("bob", &bob_cfg, &dir.join("logs/bob.log"))?));
    let pids: Vec<String> = children.0.iter().map(|(name, c)| format!("{name} pid {}", c.id())).collect();
    println!("lab: {}; logs in {}/logs; Ctrl-C to stop", pids.join(", "), dir.display());
    if let Some(pages) = status_pages(&dir) {
        println!("lab: status pages {pages}; `qkdctl status --dir {}` for one line per daemon", dir.display());
    }
    println!(
        "lab: the quantum channel is SIMULATED ({}): keys are marked simulated, and the lab's KMEs serve them \
         because their configs set allow_simulated_keys = true",
        match settings.device {
            LabDevice::Sim => "in-process simulator over the simulated fibre",
            LabDevice::Emulator => "device emulator through the device API",
        }
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
    println!("lab: stopping {}", children.0.iter().rev().map(|(n, _)| *n).collect::<Vec<_>>().join(", "));
    children.terminate();
    mark_running(&dir, false)?;
    result?;
    for node in ["alice", "bob"] {
        let path = dir.join(node).join("store");
        let kek = qkd_store::Kek::from_file(&dir.join("keks").join(format!("{node}.kek")))?;
        let store = SledStore::open(&path, &kek).with_context(|| format!("opening {}", path.display()))?;
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
        "[{:>5.0}s] {} | detections {:>8.0}/s | QBER Z {} X {} (last block) | blocks {} ok, {} aborted | stored {} key units | secret key {:.0} bit/s (mean since start)",
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

/// The daemons' status pages, from `lab.json` (a lab made by an older qkdctl has none).
fn status_pages(dir: &Path) -> Option<String> {
    let lab: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("lab.json")).ok()?).ok()?;
    let pages: Vec<String> = lab["daemons"]
        .as_array()?
        .iter()
        .filter_map(|d| Some(format!("{} {}", d["node"].as_str()?, d["status_page"].as_str()?)))
        .collect();
    (!pages.is_empty()).then(|| pages.join(", "))
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The lab's two applications: `app-a` at Alice's KME, `app-b` at Bob's.
const LAB_SAES: [(&str, &str); 2] = [("app-a", "alice-kme"), ("app-b", "bob-kme")];

fn issue_lab_saes(pki: &LabPki) -> anyhow::Result<()> {
    for (sae, _) in LAB_SAES {
        pki.ensure_sae(sae)?;
    }
    Ok(())
}

fn write_configs(dir: &Path, pki: &LabPki, args: &mut LabSettings) -> anyhow::Result<()> {
    let (grpc, fibre) = (free_port()?, free_port()?);
    let (alice_device, bob_device) = match args.device {
        LabDevice::Sim => (
            format!(
                "# The quantum channel: the in-process simulator. Its photons go over the simulated fibre,\n\
                 # a TCP connection that carries Alice's states in clear: it listens on loopback only.\n\
                 [device]\ndriver = \"sim\"\n\n\
                 # Where Bob's receiver connects to the simulated fibre.\n[fibre]\nlisten = \"127.0.0.1:{fibre}\"\n\n"
            ),
            format!(
                "# The quantum channel: the in-process simulator, photons from Alice's simulated fibre.\n\
                 [device]\ndriver = \"sim\"\n\n\
                 # Alice's end of the simulated fibre.\n[fibre]\nalice_addr = \"127.0.0.1:{fibre}\"\n\n"
            ),
        ),
        LabDevice::Emulator => {
            let (a, b) = (format!("127.0.0.1:{}", free_port()?), format!("127.0.0.1:{}", free_port()?));
            args.emulator = Some((a.clone(), b.clone()));
            let device = |role: &str, addr: &str| {
                format!(
                    "# The quantum channel: the {role} served by the device emulator (qkdctl device emulate)\n\
                     # through the device API (proto/device.proto), as a vendor's driver process would.\n\
                     [device]\ndriver = \"grpc\"\naddress = \"{addr}\"\n\n"
                )
            };
            (device("transmitter", &a), device("receiver", &b))
        }
    };
    let (etsi_a, etsi_b, peer_a, peer_b) = (free_port()?, free_port()?, free_port()?, free_port()?);
    let (health_a, health_b) = (free_port()?, free_port()?);
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
            "# Mutual TLS of the classical channel: CA of the peer, own certificate and key, CRL.\n\
             [tls]\n{}\n",
            f.toml_lines()
        )
    };
    let kme = |node: &str, peer: &str, etsi: u16, peer_listen: u16, peer_port: u16| {
        let f = pki.kme_files(node);
        let saes: String = LAB_SAES
            .iter()
            .map(|(sae, kme)| format!("[[kme.saes]]\nsae_id = \"{sae}\"\nkme_id = \"{kme}\"\n"))
            .collect();
        format!(
            "# Key delivery to applications (ETSI GS QKD 014) and the KME-to-KME channel.\n\
             [kme]\nlisten = \"127.0.0.1:{etsi}\"\npeer_listen = \"127.0.0.1:{peer_listen}\"\n\
             peer_addr = \"127.0.0.1:{peer_port}\"\npeer_name = \"{peer}\"\n\
             kme_id = \"{node}-kme\"\npeer_kme_id = \"{peer}-kme\"\n\
             # The lab's quantum channel is simulated: its keys are not secret from whoever runs the\n\
             # simulation. A KME serves such keys only when told to.\n\
             allow_simulated_keys = true\n\n\
             # HTTPS server: the CA of the applications' client certificates and its CRL, and this KME's certificate.\n\
             [kme.tls]\n{}\n\
             # The applications (SAEs) and the KME each is attached to.\n{saes}",
            f.toml_lines()
        )
    };
    let alice = format!(
        "# Alice (transmitter) of the qkdctl lab. Relative paths are relative to this file.\n\
         node_id = \"alice\"\n# Key store and status file.\ndata_dir = \"alice\"\n\
         # Plain HTTP: /healthz, /readyz, /metrics (Prometheus), / (the status page).\n\
         health_listen = \"127.0.0.1:{health_a}\"\n\n\
         # The key store's key-encryption key (KEK): it seals every stored key; made by the lab\n\
         # (`qkdctl store kek --out FILE`), kept outside the data directory.\n\
         [store]\nkek_file = \"keks/alice.kek\"\n\n\
         # gRPC server of the classical channel; Bob's certificate must be valid for peer_name.\n\
         [classical]\nlisten = \"127.0.0.1:{grpc}\"\npeer_name = \"bob\"\n\n{alice_device}{}{shared}{}",
        tls("alice"),
        kme("alice", "bob", etsi_a, peer_a, peer_b)
    );
    let bob = format!(
        "# Bob (receiver) of the qkdctl lab. Relative paths are relative to this file.\n\
         node_id = \"bob\"\n# Key store and status file.\ndata_dir = \"bob\"\n\
         # Plain HTTP: /healthz, /readyz, /metrics (Prometheus), / (the status page).\n\
         health_listen = \"127.0.0.1:{health_b}\"\n\
         # Most 256-bit key units the store may hold (0: no limit); while it is full, new blocks are\n\
         # aborted (\"key store is full\") until applications fetch keys.\nmax_stored_units = {max_units}\n\n\
         # The key store's key-encryption key (KEK): it seals every stored key; made by the lab\n\
         # (`qkdctl store kek --out FILE`), kept outside the data directory.\n\
         [store]\nkek_file = \"keks/bob.kek\"\n\n\
         # Alice's classical-channel server; her certificate must be valid for alice_name.\n\
         [classical]\nalice_addr = \"127.0.0.1:{grpc}\"\nalice_name = \"alice\"\n\n{bob_device}{}{shared}{}",
        tls("bob"),
        kme("bob", "alice", etsi_b, peer_b, peer_a),
        max_units = common::config::DEFAULT_MAX_STORED_UNITS
    );
    let keks = dir.join("keks");
    common::service::private_dir(&keks).with_context(|| format!("creating {}", keks.display()))?;
    for node in ["alice", "bob"] {
        let path = keks.join(format!("{node}.kek"));
        if !path.exists() {
            qkd_store::Kek::generate("new").write_new(&path).with_context(|| format!("writing {}", path.display()))?;
        }
    }
    for (name, text) in [("alice.toml", alice), ("bob.toml", bob)] {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    let sae = |name: &str, kme: &str| {
        serde_json::json!({
            "sae_id": name,
            "kme_id": kme,
            "cert": pki.cert_path(qkd_tls::pki::Kind::Sae, name),
            "key": pki.key_path(qkd_tls::pki::Kind::Sae, name),
        })
    };
    let lab_json = serde_json::json!({
        "ca_cert": pki.sae_trust_anchor("app-a"),
        "kmes": [
            { "kme_id": "alice-kme", "etsi_addr": format!("127.0.0.1:{etsi_a}") },
            { "kme_id": "bob-kme", "etsi_addr": format!("127.0.0.1:{etsi_b}") },
        ],
        "saes": [sae("app-a", "alice-kme"), sae("app-b", "bob-kme")],
        "daemons": [
            { "node": "alice", "health_addr": format!("127.0.0.1:{health_a}"),
              "status_page": format!("http://127.0.0.1:{health_a}/"), "log": dir.join("logs/alice.log") },
            { "node": "bob", "health_addr": format!("127.0.0.1:{health_b}"),
              "status_page": format!("http://127.0.0.1:{health_b}/"), "log": dir.join("logs/bob.log") },
        ],
    });
    let path = dir.join("lab.json");
    std::fs::write(&path, serde_json::to_string_pretty(&lab_json)?)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Records in `lab.json` whether the lab is running (`"running"`, the PID of `qkdctl lab` while
/// it runs, `started_unix_s`, and `stopped_unix_s` once it stopped), so that scripts can tell a
/// stopped lab's addresses from a live one's.
fn mark_running(dir: &Path, running: bool) -> anyhow::Result<()> {
    let path = dir.join("lab.json");
    let text = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut lab: serde_json::Value =
        serde_json::from_slice(&text).with_context(|| format!("parsing {}", path.display()))?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    lab["running"] = serde_json::Value::Bool(running);
    lab["pid"] = if running { serde_json::json!(std::process::id()) } else { serde_json::Value::Null };
    if running {
        lab["started_unix_s"] = serde_json::json!(now);
        lab["stopped_unix_s"] = serde_json::Value::Null;
    } else {
        lab["stopped_unix_s"] = serde_json::json!(now);
    }
    std::fs::write(&path, serde_json::to_string_pretty(&lab)?).with_context(|| format!("writing {}", path.display()))
}

fn spawn(name: &str, config: &Path, log: &Path) -> anyhow::Result<Child> {
    let args = ["daemon".to_string(), name.into(), "--config".into(), config.display().to_string()];
    spawn_with(&args, name, log)
}

/// Starts `qkdctl ARGS`, its output appended to `log`.
fn spawn_with(args: &[String], name: &str, log: &Path) -> anyhow::Result<Child> {
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    Command::new(std::env::current_exe()?)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .spawn()
        .with_context(|| format!("starting {name}"))
}

/// The processes (the emulator if any, Alice, Bob), by name; stopped when dropped.
struct Children(Vec<(&'static str, Child)>);

impl Children {
    fn exited(&mut self) -> Option<&'static str> {
        for (name, child) in self.0.iter_mut() {
            if let Ok(Some(_)) = child.try_wait() {
                return Some(name);
            }
        }
        None
    }

    /// Stops Bob first (he finishes the block in progress), then Alice, then the emulator:
    /// SIGTERM, then SIGKILL after 15 s.
    fn terminate(&mut self) {
        for (_, child) in self.0.iter_mut().rev() {
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
