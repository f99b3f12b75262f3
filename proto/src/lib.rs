//! Wire messages of the QKD link. This is the only crate that contains generated code.
//!
//! * [`link`]: the classical channel between Alice and Bob (gRPC over mutual TLS): sifting,
//!   parameter estimation, error correction, verification, privacy amplification and the
//!   two-ended commit.
//! * [`fibre`]: the frames of photons that travel over the simulated quantum channel.
//! * [`kme`]: the KME-to-KME reservations of the ETSI key delivery.
//! * [`device`]: the hardware boundary: what a transmitter or receiver device (or its emulator)
//!   serves to its daemon, and the recording files of such runs.
//!
//! The messages (prost) are always there; the tonic clients and servers (`link_client`,
//! `link_server`, ...) only with the `grpc` feature, so that the protocol core
//! can use the messages without the network stack.

#![allow(clippy::all)]

/// Classical post-processing channel (gRPC service `qkd.link.v1.Link`, served by Alice).
pub mod link {
    include!(concat!(env!("OUT_DIR"), "/qkd.link.v1.rs"));
}

/// Photon frames on the simulated fibre.
pub mod fibre {
    include!(concat!(env!("OUT_DIR"), "/qkd.fibre.v1.rs"));
}

/// KME-to-KME key reservations (ETSI GS QKD 014 key life cycle across two KMEs).
pub mod kme {
    include!(concat!(env!("OUT_DIR"), "/qkd.kme.v1.rs"));
}

/// The quantum devices' API (gRPC services `qkd.device.v1.Transmitter` and
/// `qkd.device.v1.Receiver`, served by a device driver or the emulator) and the messages of
/// recording files.
pub mod device {
    include!(concat!(env!("OUT_DIR"), "/qkd.device.v1.rs"));
}
