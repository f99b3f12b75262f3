//! The post-processing protocol between Alice and Bob, as transport-free state machines.
//!
//! [`alice::AliceCore`] answers Bob's requests (it is what Alice's gRPC service calls);
//! [`bob::BobLink`] drives a session through any [`bob::LinkPeer`]: the gRPC client in the
//! daemon, or an in-memory [`AliceCore`](alice::AliceCore) in the planning tool and the tests.
//! The request surface exists once, as [`Request`] and [`Response`]: Alice's core answers
//! one with [`AliceCore::handle`](alice::AliceCore::handle), and each transport carries one
//! with [`LinkPeer::call`](bob::LinkPeer::call).
//! Neither reads the clock: times come in as arguments. Randomness is injected. No transport
//! either: [`LinkError`] knows nothing of gRPC.

pub mod abort;
pub mod alice;
pub mod bob;
pub mod memory;
pub mod params;
pub mod reagree;
pub mod reconcile;
pub mod request;
#[doc(hidden)]
pub mod testing;
pub mod transcript;

pub use abort::{Abort, AbortReason};
pub use params::ProtocolParams;
pub use reagree::{Reagreement, UnitMap};
pub use reconcile::Reconciliation;
pub use request::{HandleContext, Request, Response};

/// Errors of the post-processing protocol. Each maps to one gRPC status (the mapping lives with
/// the transport, in `common::grpc`).
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The request does not fit the protocol state (unknown session, block or frame).
    #[error("{0}")]
    State(String),
    /// A request about a block arrived in another phase than the one it needs (a state error:
    /// the request does not fit the block's state).
    #[error("block {block_id}: {request:?} expects the block {expected}, but it is {actual}")]
    Phase {
        /// The block.
        block_id: uuid::Uuid,
        /// The request.
        request: alice::BlockRequest,
        /// The phase the request needs.
        expected: alice::BlockPhase,
        /// The block's phase.
        actual: alice::BlockPhase,
    },
    /// The request is malformed.
    #[error("malformed request: {0}")]
    Malformed(String),
    /// The peer runs with different protocol parameters.
    #[error("protocol parameters differ between Alice and Bob: {0}")]
    ParamsMismatch(String),
    /// The key store failed; nothing was committed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The transport failed (connection lost, peer gone, TLS refused).
    #[error("transport: {0}")]
    Transport(String),
    /// The peer refused the request.
    #[error("peer refused: {0}")]
    Refused(String),
}

impl From<crate::wire::WireError> for LinkError {
    fn from(e: crate::wire::WireError) -> Self {
        LinkError::Malformed(e.to_string())
    }
}

/// Parses a UUID from the wire.
pub(crate) fn parse_uuid(s: &str, what: &str) -> Result<uuid::Uuid, LinkError> {
    uuid::Uuid::parse_str(s).map_err(|_| LinkError::Malformed(format!("{what} {s:?} is not a UUID")))
}

#[cfg(test)]
mod tests;
