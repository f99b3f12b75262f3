//! What the daemons owe their supervisor: the systemd notify protocol and health endpoints.

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};

use super::*;

/// Alice started by systemd with `Type=notify` and `WatchdogSec`: she sends READY=1 once her
/// listeners are up, then WATCHDOG=1 pings, and STOPPING=1 on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_speaks_the_systemd_notify_protocol() {
    let lab = Lab::new("notify");
    let alice_bin = workspace_binary("alice");
    let (grpc, fibre) = bind_pair().await;
    let (grpc_addr, fibre_addr) = (grpc.local_addr().unwrap(), fibre.local_addr().unwrap());
    drop((grpc, fibre));
    let health = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let mut cfg = lab.alice_config(grpc_addr, fibre_addr);
    cfg.health_listen = Some(health);
    let cfg_path = lab.dir.0.join("alice.toml");
    std::fs::write(&cfg_path, toml::to_string(&cfg).unwrap()).unwrap();

    let socket_path = lab.dir.0.join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let log_path = lab.dir.0.join("alice.log");
    // As systemd does, WATCHDOG_PID names the daemon's own PID: the shell's, kept by exec.
    let mut alice = Command::new("sh")
        .arg("-c")
        .arg("WATCHDOG_PID=$$ exec \"$0\" --config \"$1\"")
        .arg(&alice_bin)
        .arg(&cfg_path)
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "200000")
        .stderr(Stdio::from(std::fs::File::create(&log_path).unwrap()))
        .spawn()
        .unwrap();
    let recv = || {
        let mut buf = [0u8; 1024];
        let n = socket.recv(&mut buf).unwrap_or_else(|e| {
            panic!(
                "no notification within 60 s ({e}); alice's log:\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            )
        });
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let first = recv();
    assert!(first.lines().any(|l| l == "READY=1"), "first notification is not READY=1: {first:?}");
    // Ready means the listeners are up: the health endpoint answers now.
    let ready = reqwest::get(format!("http://{health}/readyz")).await.unwrap();
    assert_eq!(ready.status(), 200);
    let live = reqwest::get(format!("http://{health}/healthz")).await.unwrap();
    assert_eq!(live.status(), 200);
    assert!(recv().lines().any(|l| l == "WATCHDOG=1"), "no watchdog ping");
    Command::new("kill").arg("-TERM").arg(alice.id().to_string()).status().unwrap();
    let stopping = (0..50).map(|_| recv()).find(|m| m.lines().any(|l| l == "STOPPING=1"));
    assert!(stopping.is_some(), "no STOPPING=1 after SIGTERM");
    assert!(alice.wait().unwrap().success());
}
