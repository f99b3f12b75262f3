//! What the daemons, the planning tool and the tests share beyond the protocol core: the
//! simulator, the durable key store, the transports (gRPC, TLS, the ETSI key delivery) and the
//! configuration.
//!
//! The transport-free protocol core is the `qkd-core` crate ([`qkd_core`]); its modules are
//! re-exported here at their old paths: [`bits`], [`wire`], [`sifting`], [`link`], and
//! [`postproc`] (with the benchmark added here).
//!
//! * [`sim`]: the physics of the simulated quantum channel (source, fibre, receiver, eavesdroppers).
//! * [`store`]: the durable key store (sled) implementing [`store::KeyStore`].
//! * [`grpc`]: the gRPC status of each link error and back.
//! * [`tls`]: the mutual-TLS configuration and the PKI for labs.
//! * [`fibre`]: the simulated fibre's frames as a byte stream.
//! * [`config`]: the daemons' configuration files.

pub use qkd_core::{bits, link, sifting, wire};

pub mod config;
pub mod etsi;
pub mod fibre;
pub mod grpc;
pub mod logging;
pub mod planner;
pub mod postproc;
pub mod service;
pub mod sim;
pub mod status;
pub mod store;
pub mod tls;

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
