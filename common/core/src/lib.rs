//! The QKD link's protocol core, free of any transport: no network IO, no async runtime, no
//! database, no clock (times are arguments), randomness injected.
//!
//! * [`quantum`]: Alice's time-bin states and bases, her per-frame secret and the state of each
//!   pulse, and Bob's detections (what a source and a receiver, simulated or real, exchange with
//!   the protocol).
//! * [`postproc`]: pure post-processing stages (Cascade, LDPC, verification hash, Toeplitz
//!   privacy amplification, finite-key length).
//! * [`sifting`]: the sifting and parameter-estimation rules both sides apply to a frame.
//! * [`link`]: the post-processing protocol as state machines (Alice answers, Bob drives), used
//!   over gRPC by the daemons and in memory by the planning tool and tests.
//! * [`store`]: the [`store::KeyStore`] trait the link commits keys through, and an in-memory
//!   [`store::MemoryStore`].
//! * [`bits`], [`wire`]: packed bit strings and the varint encodings of the wire messages.

pub mod bits;
pub mod link;
pub mod postproc;
pub mod quantum;
pub mod sifting;
pub mod store;
pub mod wire;
