//! ETSI GS QKD 014 key delivery: each daemon is a KME serving its SAEs over HTTPS.
//!
//! * [`api`]: the standard's JSON formats, request parsing, errors as HTTP answers.
//! * [`server`]: the HTTPS server (mutual TLS, HTTP/1.1 and HTTP/2) and its axum router.
//! * [`pool`]: the key life cycle ([`KmeState`]): split ownership of units, reservation at the
//!   peer KME before delivery (cancelled in the background when its answer is lost), delivery
//!   of reserved keys to slaves, each once.
//! * [`peer`]: the KME-to-KME gRPC channel (`proto/kme.proto`).
//! * [`identity`]: SAE IDs from client certificates, unit ownership.
//! * [`limits`]: connections, request rates and idle time granted to callers (429, 503).
//! * [`config`]: the `[kme]` configuration section.
//! * [`pair`]: two KMEs on loopback with a throw-away PKI (`qkdctl keys pair`, the tests).
//!
//! The daemons call [`run_kme`] (or [`run_kme_with_listeners`] with bound sockets).

pub mod api;
pub mod audit;
pub mod config;
pub mod identity;
pub mod limits;
pub mod pair;
pub mod peer;
pub mod pool;
pub mod server;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use config::{KmeConfig, KmeConfigError, KmeSettings, SaeEntry};
pub use identity::{IdentitySource, KmeId, KmeSide, SaeId};
pub use peer::{CancelError, CancelOutcome, CancelRequest, GrpcPeer, ReserveError, ReservePeer, ReserveRequest};
pub use pool::KmeState;
pub use server::{SharedRecorder, serve_etsi};

use qkd_store::SledStore;
use qkd_tls::{TlsError, TlsMaterial};

/// Errors that stop a KME.
#[derive(Debug, thiserror::Error)]
pub enum KmeError {
    /// The `[kme]` section is invalid.
    #[error(transparent)]
    Config(#[from] KmeConfigError),
    /// TLS files cannot be read.
    #[error(transparent)]
    TlsFiles(#[from] TlsError),
    /// TLS material is unusable.
    #[error("kme TLS: {0}")]
    Tls(String),
    /// A listener cannot be bound.
    #[error("cannot bind {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The IO error.
        source: std::io::Error,
    },
    /// A socket failed.
    #[error("kme socket: {0}")]
    Io(#[from] std::io::Error),
    /// The peer channel (client or server) cannot be set up or failed.
    #[error("kme peer channel: {0}")]
    Peer(#[from] tonic::transport::Error),
    /// The delivery audit log cannot be opened.
    #[error("{0}")]
    Audit(String),
}

/// Runs the KME of a daemon until `shutdown`: binds `cfg.listen` (ETSI HTTPS) and
/// `cfg.peer_listen` (KME-to-KME gRPC), then as [`run_kme_with_listeners`].
///
/// `simulated`: the link feeding `store` runs on a simulated quantum channel (see
/// [`KmeState::set_channel_simulated`]). `metrics`: the daemon's recorder, for the HTTPS
/// server's request counts and latencies ([`KmeState::set_metrics_recorder`]).
#[allow(clippy::too_many_arguments)]
pub async fn run_kme(
    cfg: &KmeConfig,
    side: KmeSide,
    node_tls: &TlsMaterial,
    store: Arc<SledStore>,
    simulated: bool,
    metrics: Option<SharedRecorder>,
    shutdown: CancellationToken,
) -> Result<(), KmeError> {
    let bind = |addr: SocketAddr| async move {
        TcpListener::bind(addr).await.map_err(|source| KmeError::Bind { addr, source })
    };
    let https = bind(cfg.listen).await?;
    let peer = bind(cfg.peer_listen).await?;
    run_kme_with_listeners(cfg, side, node_tls, store, https, peer, simulated, metrics, shutdown).await
}

/// Runs the KME on bound listeners until `shutdown`: the ETSI HTTPS server on `https_listener`
/// (TLS files of `cfg.tls`), the peer's gRPC server on `peer_listener` (the node's TLS material
/// `node_tls`, callers checked against `cfg.peer_name`), the client of the peer KME, and the
/// periodic purge of expired reservations. `side` says which units this KME owns (the daemon's
/// role). Returns once both servers have stopped and the settling of reservations in doubt
/// ([`KmeState::shutdown`]) has ended.
#[allow(clippy::too_many_arguments)]
pub async fn run_kme_with_listeners(
    cfg: &KmeConfig,
    side: KmeSide,
    node_tls: &TlsMaterial,
    store: Arc<SledStore>,
    https_listener: TcpListener,
    peer_listener: TcpListener,
    simulated: bool,
    metrics: Option<SharedRecorder>,
    shutdown: CancellationToken,
) -> Result<(), KmeError> {
    let settings = cfg.settings()?;
    let https_tls = server::https_server_config(&cfg.tls.load()?)?;
    let peer = GrpcPeer::connect_lazy(&cfg.peer_addr, &cfg.peer_name, node_tls, settings.peer_timeout)?;
    let state = KmeState::new(settings, side, store, Arc::new(peer));
    state.set_channel_simulated(simulated);
    if let Some(recorder) = metrics {
        state.set_metrics_recorder(recorder);
    }
    match &cfg.audit_log {
        Some(path) => {
            let log = audit::AuditLog::open(path).map_err(|e| KmeError::Audit(e.to_string()))?;
            info!(path = %path.display(), "delivery audit log open (one JSON line per delivery)");
            state.set_audit_log(log);
        }
        None => warn!("no delivery audit log configured ([kme] audit_log): deliveries are recorded nowhere"),
    }
    if state.serves_simulated_keys() {
        if state.settings().allow_simulated_keys {
            warn!(
                "KME: serving keys of a SIMULATED quantum channel (allow_simulated_keys = true): they are not secret"
            );
        } else {
            warn!(
                "KME: the keys come from a SIMULATED quantum channel; Get key is refused (503) unless \
                 allow_simulated_keys = true"
            );
        }
    }
    info!(
        kme = %state.settings().kme_id,
        peer_kme = %state.settings().peer_kme_id,
        ?side,
        https = %https_listener.local_addr()?,
        peer_channel = %peer_listener.local_addr()?,
        "KME started"
    );
    let peer_server = tonic::transport::Server::builder()
        .add_service(peer::peer_server(state.clone(), cfg.peer_name.clone(), node_tls.peer_check()?))
        .serve_with_incoming_shutdown(
            node_tls.grpc_incoming(peer_listener, "KME-to-KME channel")?,
            shutdown.clone().cancelled_owned(),
        );
    let https = serve_etsi(https_listener, state.clone(), https_tls, shutdown.clone());
    let purge = purge_periodically(state.clone(), shutdown);
    let (peer_result, https_result, ()) = tokio::join!(peer_server, https, purge);
    // Reservations still in doubt are logged, not settled: the process goes away.
    state.shutdown().await;
    peer_result?;
    https_result?;
    info!("KME stopped");
    Ok(())
}

/// Erases expired reservations now and then, until `shutdown`.
async fn purge_periodically(state: KmeState, shutdown: CancellationToken) {
    let Some(ttl) = state.settings().reservation_ttl else {
        return;
    };
    let period = (ttl / 4).clamp(Duration::from_secs(1), Duration::from_secs(3600));
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(period) => {}
        }
        match state.purge_expired_reservations().await {
            Ok(0) => {}
            Ok(n) => info!(n_keys = n, "erased reservations never fetched by their slaves"),
            Err(e) => warn!(error = %e, "purging expired reservations failed"),
        }
    }
}

#[cfg(test)]
mod tests;
