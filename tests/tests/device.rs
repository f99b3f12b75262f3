//! The daemons through the device API (`proto/device.proto`): the emulator serves Alice's
//! transmitter and Bob's receiver at the time-tag level over loopback gRPC, and the daemons use
//! their `grpc` drivers, as they would a vendor's device process.

use common::config::{DeviceDriver, DeviceSection};
use qkd_device::emulator::{Emulator, EmulatorConfig, GapSpec, Listener};
use qkd_device::grpc::DeviceAddress;
use qkd_store::{KeyStore, SledStore};

use super::*;

/// The emulator on two loopback ports.
async fn start_emulator(cfg: EmulatorConfig) -> Emulator {
    let any = DeviceAddress::Tcp("127.0.0.1:0".into());
    let (a, b) = (Listener::bind(&any).await.unwrap(), Listener::bind(&any).await.unwrap());
    Emulator::start(cfg, a, b).await.expect("start the emulator")
}

fn grpc_device(address: &DeviceAddress) -> DeviceSection {
    DeviceSection { driver: DeviceDriver::Grpc, address: Some(address.to_string()), file: None }
}

/// Alice and Bob in-process on loopback, with the given devices (no simulated fibre).
async fn spawn_on_devices(lab: &Lab, alice_device: DeviceSection, bob_device: DeviceSection) -> (Running, Running) {
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc_addr = grpc.local_addr().unwrap();
    let unused: std::net::SocketAddr = "127.0.0.1:9".parse().unwrap();
    let mut alice_cfg = lab.alice_config(grpc_addr, unused);
    alice_cfg.device = alice_device;
    let mut bob_cfg = lab.bob_config(grpc_addr, unused);
    bob_cfg.device = bob_device;
    (spawn_alice_with(lab, alice_cfg, grpc, None), spawn_bob_with(lab, bob_cfg))
}

/// Alice and Bob through the emulator, with Bob's tagger 100 ppm fast and drifting by 1 ppm/s
/// and a 2 ms gap in every 4th frame: the clock is recovered, frames with a gap are dropped at
/// both ends, blocks commit, the two stores hold the same keys, the keys are marked simulated,
/// and the QBER in Z is within 0.3 percentage points of the simulator's model of the same link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemons_through_the_emulator_distil_identical_keys_despite_clock_offset_and_gaps() {
    let lab = Lab::new("emulated");
    let mut ecfg = EmulatorConfig::from_preset("lab-10km", 41).unwrap();
    ecfg.frame_pulses = lab.protocol.frame_pulses;
    ecfg.clock_offset_ppm = 100.0;
    ecfg.drift_ppm_per_s = 1.0;
    ecfg.gaps = Some(GapSpec { every_frames: 4, duration_ms: 2.0 });
    let emulator = start_emulator(ecfg).await;

    let (alice, bob) =
        spawn_on_devices(&lab, grpc_device(emulator.alice_address()), grpc_device(emulator.bob_address())).await;
    let status = wait_for("two committed blocks at Bob, and dropped frames", Duration::from_secs(180), || {
        lab.status("bob")
            .filter(|s| counter(s, "/total/blocks_committed") >= 2 && counter(s, "/total/frames_dropped") >= 1)
    })
    .await;
    bob.stop().await.unwrap();
    alice.stop().await.unwrap();
    let summary = emulator.shutdown().await.unwrap();
    assert!(!summary.gaps.is_empty(), "the emulator injected no gap: {summary:?}");

    assert_eq!(status["simulated"], serde_json::json!(true), "{status}");
    let (a, b) = (lab.summary("alice"), lab.summary("bob"));
    assert!(a.n_keys > 0, "no keys stored: {a:?}");
    assert_eq!(a.digest, b.digest, "the two stores differ");
    assert_eq!(b.n_pending_blocks, 0);
    let store = SledStore::open(&lab.dir.0.join("bob").join("store"), &lab.kek("bob")).unwrap();
    assert!(store.blocks().unwrap().iter().all(|(meta, _)| meta.simulated), "blocks not marked simulated");

    let qber_z = status.pointer("/last_block/qber_z").and_then(|v| v.as_f64()).unwrap();
    let model = qkd_sim::analytic::expected(&lab.link).qber_z;
    assert!((qber_z - model).abs() < 0.003, "QBER Z through the emulator {qber_z}, the simulator's model {model}");
}

/// The reference driver in another language (deploy/drivers/python/replay_receiver.py, grpcio)
/// serves Bob's receiver from a recorded emulator run; Alice replays the recording's
/// transmitter side; the link distils keys and both stores agree. Needs a Python with grpcio
/// and grpcio-tools (`QKD_PYTHON`, default `python3`): `.ci/python-driver.sh` installs them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Python with grpcio and grpcio-tools (QKD_PYTHON); run by .ci/python-driver.sh"]
async fn the_python_reference_driver_feeds_bob_and_the_link_distils_keys() {
    use std::io::BufRead;
    let python = std::env::var("QKD_PYTHON").unwrap_or_else(|_| "python3".into());
    let lab = Lab::new("pydriver");
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned();

    // Record an emulated run: the emulator as fast as the recorder reads.
    let recording = lab.dir.0.join("run.qkdrec");
    let mut ecfg = EmulatorConfig::from_preset("lab-10km", 43).unwrap();
    ecfg.frame_pulses = lab.protocol.frame_pulses;
    ecfg.speed = 0.0;
    ecfg.max_frames = Some(120);
    let emulator = start_emulator(ecfg).await;
    let counts = qkd_device::grpc::record_live(
        emulator.alice_address(),
        emulator.bob_address(),
        &recording,
        tokio_util::sync::CancellationToken::new(),
    )
    .await
    .expect("record the emulated run");
    emulator.shutdown().await.unwrap();
    assert!(counts.transmitter_events >= 120, "{counts:?}");

    // The Python stubs of the device API, and the driver.
    let generated = lab.dir.0.join("py");
    std::fs::create_dir_all(&generated).unwrap();
    let protoc = std::process::Command::new(&python)
        .args(["-m", "grpc_tools.protoc", "-I"])
        .arg(root.join("proto/proto"))
        .arg(format!("--python_out={}", generated.display()))
        .arg(format!("--grpc_python_out={}", generated.display()))
        .arg("device.proto")
        .status()
        .expect("run grpc_tools.protoc");
    assert!(protoc.success(), "grpc_tools.protoc failed");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let listen = format!("127.0.0.1:{port}");
    let mut driver = std::process::Command::new(&python)
        .arg(root.join("deploy/drivers/python/replay_receiver.py"))
        .args(["--listen", &listen])
        .arg(&recording)
        .env("PYTHONPATH", &generated)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start the Python driver");
    let mut line = String::new();
    // Kept open until the driver exits: it prints a last line when it stops.
    let mut driver_out = std::io::BufReader::new(driver.stdout.take().unwrap());
    driver_out.read_line(&mut line).unwrap();
    assert!(line.contains("serving"), "the driver did not start: {line:?}");

    let replay = DeviceSection { driver: DeviceDriver::Replay, address: None, file: Some(recording.clone()) };
    let (alice, bob) = spawn_on_devices(&lab, replay, grpc_device(&DeviceAddress::Tcp(listen))).await;
    let status = wait_for("a committed block at Bob", Duration::from_secs(180), || {
        lab.status("bob").filter(|s| counter(s, "/total/blocks_committed") >= 1)
    })
    .await;
    bob.stop().await.unwrap();
    alice.stop().await.unwrap();
    let _ = std::process::Command::new("kill").arg("-TERM").arg(driver.id().to_string()).status();
    let _ = driver.wait();
    drop(driver_out);

    assert_eq!(status["simulated"], serde_json::json!(true), "{status}");
    let (a, b) = (lab.summary("alice"), lab.summary("bob"));
    assert!(a.n_keys > 0, "no keys stored: {a:?}");
    assert_eq!(a.digest, b.digest, "the two stores differ");
    assert_eq!(b.n_pending_blocks, 0);
}

/// A device process that goes away stops both daemons with an error that says so (their
/// supervisor restarts them and they reconnect), and the keys stored before stay identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanishing_device_stops_the_daemons_with_the_reason_and_the_stores_agree() {
    let lab = Lab::new("vanishing");
    let mut ecfg = EmulatorConfig::from_preset("lab-10km", 47).unwrap();
    ecfg.frame_pulses = lab.protocol.frame_pulses;
    let emulator = start_emulator(ecfg).await;
    let (alice, bob) =
        spawn_on_devices(&lab, grpc_device(emulator.alice_address()), grpc_device(emulator.bob_address())).await;
    wait_for("a committed block at Bob", Duration::from_secs(180), || {
        lab.status("bob").filter(|s| counter(s, "/total/blocks_committed") >= 1)
    })
    .await;
    emulator.shutdown().await.unwrap();
    let stopped = |r: Running| async move {
        tokio::time::timeout(Duration::from_secs(60), r.task).await.expect("the daemon did not stop").unwrap()
    };
    let bob_result = stopped(bob).await;
    let alice_result = stopped(alice).await;
    for (who, result) in [("bob", bob_result), ("alice", alice_result)] {
        let error = format!("{:#}", result.expect_err(who));
        assert!(error.contains("device"), "{who}: {error}");
    }
    let (a, b) = (lab.summary("alice"), lab.summary("bob"));
    assert!(a.n_keys > 0, "no keys stored: {a:?}");
    assert_eq!(a.digest, b.digest, "the two stores differ");
}
