//! The node: what a daemon runs around the protocol core. The crates below it:
//!
//! * `qkd-core` ([`qkd_core`]): the transport-free protocol (states, sifting, post-processing,
//!   the link's state machines, the key-store trait).
//! * `qkd-sim` ([`qkd_sim`]): the physics of the simulated quantum channel, the planner, the
//!   post-processing benchmark.
//! * `qkd-store` ([`qkd_store`]): the durable key store (sled).
//! * `qkd-tls` ([`qkd_tls`]): mutual TLS and the lab PKI.
//! * `qkd-kme` ([`qkd_kme`]): ETSI GS QKD 014 key delivery.
//!
//! This crate adds:
//! * [`config`]: the daemons' configuration files.
//! * [`grpc`]: the gRPC status of each link error and back.
//! * [`device`]: the quantum devices (`qkd-device` drivers) as `[device]` chooses them.
//! * [`fibre`]: the simulated fibre's frames as a byte stream.
//! * [`logging`], [`service`], [`status`]: logs, systemd notification and the health listener,
//!   the status file.
//! * [`telemetry`]: Prometheus metrics, the status page's history, `qkdctl status`'s state.

pub mod auth_pool;
pub mod config;
pub mod device;
pub mod fibre;
pub mod grpc;
pub mod logging;
pub mod service;
pub mod status;
pub mod telemetry;

#[cfg(test)]
mod link_tests;

/// Cancels `token` on SIGINT or SIGTERM (logging which), for graceful shutdown.
pub async fn shutdown_on_signal(token: tokio_util::sync::CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut int), Ok(mut term)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) else {
            tracing::warn!("cannot install signal handlers");
            return;
        };
        let name = tokio::select! {
            _ = int.recv() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        };
        tracing::info!(signal = name, "shutting down");
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    token.cancel();
}
