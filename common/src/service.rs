//! What a long-running daemon owes its supervisor: the systemd notify protocol (READY after the
//! listeners are up, watchdog pings, STOPPING) and plain-HTTP liveness/readiness endpoints for
//! container health checks and load balancers (no client certificate, nothing about keys).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Tells systemd (when started with `Type=notify`; a no-op otherwise) that the daemon is ready,
/// and starts watchdog pings at half the configured `WatchdogSec` until `shutdown`.
/// Process hygiene for a daemon that holds keys, done first thing in `main`: files it creates are
/// private whatever umask it inherited (umask 077: directories 0700, files 0600), and its memory
/// can never end up in a core dump (`PR_SET_DUMPABLE` 0, prctl(2); this also keeps other
/// processes of the same user from ptrace-attaching or reading /proc/PID/mem). Returns what it
/// could not do, for the log.
pub fn harden_process() -> Vec<String> {
    use rustix::fs::Mode;
    rustix::process::umask(Mode::from_raw_mode(0o077));
    let mut failed = Vec::new();
    if let Err(e) = rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable) {
        failed.push(format!("turning core dumps off (PR_SET_DUMPABLE): {e}"));
    }
    failed
}

/// Creates `dir` (and its parents) if missing and makes it private (0700) whatever it was.
pub fn private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

pub fn notify_ready(status: &str, shutdown: CancellationToken) {
    let states = [sd_notify::NotifyState::Ready, sd_notify::NotifyState::Status(status)];
    if let Err(e) = sd_notify::notify(false, &states) {
        warn!(error = %e, "cannot notify systemd");
    }
    let mut usec = 0u64;
    if sd_notify::watchdog_enabled(false, &mut usec) && usec > 0 {
        let period = Duration::from_micros(usec / 2);
        info!(period_ms = period.as_millis() as u64, "systemd watchdog enabled");
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(period);
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    _ = ticker.tick() => {
                        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
                    }
                }
            }
        });
    }
}

/// Tells systemd the daemon is stopping.
/// Tells systemd the daemon's current state in a line (`STATUS=`, shown by `systemctl status`);
/// nothing outside systemd.
pub fn notify_status(status: &str) {
    if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Status(status)]) {
        tracing::debug!(error = %e, "cannot notify systemd");
    }
}

pub fn notify_stopping() {
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
}

/// Liveness and readiness, shared between the daemon and its health endpoint.
#[derive(Clone, Default)]
pub struct Health {
    ready: Arc<AtomicBool>,
}

impl Health {
    /// Marks the daemon ready (or not) to do its job.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    /// Whether the daemon is ready.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }
}

/// Serves `GET /healthz` (200 while the process runs) and `GET /readyz` (200 when ready, 503
/// otherwise) over plain HTTP on `addr`, until `shutdown`.
pub async fn serve_health(addr: SocketAddr, health: Health, shutdown: CancellationToken) -> std::io::Result<()> {
    use axum::http::StatusCode;
    use axum::routing::get;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let app = axum::Router::new().route("/healthz", get(|| async { (StatusCode::OK, "live\n") })).route(
        "/readyz",
        get(move || {
            let health = health.clone();
            async move {
                if health.is_ready() {
                    (StatusCode::OK, "ready\n")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                }
            }
        }),
    );
    info!(%addr, "health endpoint listening (GET /healthz, /readyz)");
    axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await
}
