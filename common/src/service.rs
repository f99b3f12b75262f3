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

/// Locks the daemon's memory in RAM where the system allows it, so that no page holding a key
/// is ever written to swap: `mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT)` (mlockall(2);
/// with `MCL_ONFAULT` pages are locked as they are touched, so thread stacks and arenas reserved
/// but unused cost nothing). Only when nothing limits the locked memory: `RLIMIT_MEMLOCK`
/// unlimited (the systemd units set `LimitMEMLOCK=infinity`) or `CAP_IPC_LOCK` in effect
/// (capabilities(7): it lifts the limit). Under a finite limit every allocation past it would
/// fail, so the daemon does not lock and says so. `Ok` with what was done (for an info line),
/// `Err` with what failed (for a warning).
pub fn lock_memory() -> Result<String, String> {
    use rustix::mm::{MlockAllFlags, mlockall};
    use rustix::process::{Resource, getrlimit};
    let limit = getrlimit(Resource::Memlock).current;
    if limit.is_some() && !has_cap_ipc_lock() {
        return Ok(format!(
            "memory not locked in RAM: RLIMIT_MEMLOCK is {} bytes, not unlimited, and CAP_IPC_LOCK is not in effect \
             (LimitMEMLOCK=infinity in the unit, or `ulimit -l unlimited`, turns locking on; the units' \
             MemorySwapMax=0 keeps pages out of swap meanwhile)",
            limit.unwrap_or_default()
        ));
    }
    match mlockall(MlockAllFlags::CURRENT | MlockAllFlags::FUTURE | MlockAllFlags::ONFAULT) {
        Ok(()) => Ok("memory locked in RAM (mlockall): no key page can be swapped out".into()),
        Err(e) => Err(format!("locking memory in RAM (mlockall): {e}; key pages may be swapped out")),
    }
}

/// Whether `CAP_IPC_LOCK` (capability 14, linux/capability.h) is in this process's effective set
/// (`CapEff` of /proc/self/status, proc(5)).
fn has_cap_ipc_lock() -> bool {
    const CAP_IPC_LOCK: u32 = 14;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?.trim().to_owned();
            u64::from_str_radix(&hex, 16).ok()
        })
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0)
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

/// Binds the health listener at `addr` (`health_listen`), with an error that names it.
pub async fn bind_health(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    use anyhow::Context as _;
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the health endpoint health_listen = {addr}"))
}

/// The status page (`GET /`): plots drawn by its own script from `/status/history.json`.
const STATUS_PAGE: &str = include_str!("status_page.html");

/// Serves over plain HTTP on `addr`, until `shutdown`: `GET /healthz` (200 while the process
/// runs), `GET /readyz` (200 when ready, 503 otherwise) and, with `telemetry`, `GET /metrics`
/// (Prometheus text format), `GET /` (the live status page), `GET /status.json` (the current
/// state, `qkdctl status`) and `GET /status/history.json` (the last hour, one sample every
/// [`crate::telemetry::SAMPLE_PERIOD`]). Nothing served here holds key material.
///
/// The caller binds `listener` itself (see [`bind_health`]) before it tells the supervisor it
/// is ready, so that READY=1 means the health endpoint answers.
pub async fn serve_health(
    listener: tokio::net::TcpListener,
    health: Health,
    telemetry: Option<Arc<crate::telemetry::Telemetry>>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    use axum::http::{StatusCode, header};
    use axum::routing::get;
    let addr = listener.local_addr()?;
    let mut app = axum::Router::new().route("/healthz", get(|| async { (StatusCode::OK, "live\n") })).route(
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
    if let Some(telemetry) = telemetry {
        tokio::spawn(telemetry.clone().run_sampler(shutdown.clone()));
        let (t1, t2, t3) = (telemetry.clone(), telemetry.clone(), telemetry);
        app = app
            .route(
                "/metrics",
                get(move || {
                    let t = t1.clone();
                    async move {
                        let text = tokio::task::spawn_blocking(move || t.render()).await.unwrap_or_default();
                        ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text)
                    }
                }),
            )
            .route("/status.json", get(move || std::future::ready(axum::Json(t2.status()))))
            .route(
                "/status/history.json",
                get(move || {
                    let t = t3.clone();
                    async move { axum::Json(serde_json::to_value(t.history()).unwrap_or_default()) }
                }),
            )
            .route(
                "/",
                get(|| async {
                    (
                        [
                            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
                            (
                                header::CONTENT_SECURITY_POLICY,
                                "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'",
                            ),
                        ],
                        STATUS_PAGE,
                    )
                }),
            );
    }
    info!(%addr, "health endpoint listening (GET /healthz, /readyz, /metrics, / status page)");
    axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await
}
