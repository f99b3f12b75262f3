//! The QKD link's core, shared by the daemons, the planning tool and the tests.
//!
//! * [`sim`]: the physics of the simulated quantum channel (source, fibre, receiver, eavesdroppers).
//! * [`postproc`]: pure post-processing stages (Cascade, verification hash, Toeplitz privacy
//!   amplification, finite-key length). No IO, no clock, randomness injected.
//! * [`sifting`]: the sifting and parameter-estimation rules both sides apply to a frame.
//! * [`link`]: the post-processing protocol as transport-free state machines (Alice answers,
//!   Bob drives), used over gRPC by the daemons and in memory by the planning tool and tests.
//! * [`store`]: the durable key store (sled) behind the [`store::KeyStore`] trait.
//! * [`tls`]: the mutual-TLS configuration and the PKI for labs.
//! * [`fibre`]: the simulated fibre's frames as a byte stream.
//! * [`config`]: the daemons' configuration files.

pub mod bits;
pub mod config;
pub mod etsi;
pub mod fibre;
pub mod link;
pub mod logging;
pub mod planner;
pub mod postproc;
pub mod service;
pub mod sifting;
pub mod sim;
pub mod status;
pub mod store;
pub mod tls;
pub mod wire;

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
