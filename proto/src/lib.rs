//! Wire messages of the QKD link. This is the only crate that contains generated code.
//!
//! * [`link`]: the classical channel between Alice and Bob (gRPC over mutual TLS): sifting,
//!   parameter estimation, error correction, verification, privacy amplification and the
//!   two-ended commit.
//! * [`fibre`]: the frames of photons that travel over the simulated quantum channel.

#![allow(clippy::all)]

/// Classical post-processing channel (gRPC service `qkd.link.v1.Link`, served by Alice).
pub mod link {
    tonic::include_proto!("qkd.link.v1");
}

/// Photon frames on the simulated fibre.
pub mod fibre {
    tonic::include_proto!("qkd.fibre.v1");
}

/// KME-to-KME key reservations (ETSI GS QKD 014 key life cycle across two KMEs).
pub mod kme {
    tonic::include_proto!("qkd.kme.v1");
}
