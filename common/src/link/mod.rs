//! The post-processing protocol between Alice and Bob, as transport-free state machines.
//!
//! [`alice::AliceCore`] answers Bob's requests (it is what Alice's gRPC service calls);
//! [`bob::BobLink`] drives a session through any [`bob::LinkPeer`]: the gRPC client in the
//! daemon, or an in-memory [`AliceCore`](alice::AliceCore) in the planning tool and the tests.
//! Neither reads the clock: times come in as arguments. Randomness is injected.

pub mod alice;
pub mod bob;
pub mod memory;
pub mod params;
pub mod reconcile;
pub mod transcript;

pub use params::ProtocolParams;
pub use reconcile::Reconciliation;

/// Errors of the post-processing protocol. Each maps to one gRPC status.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The request does not fit the protocol state (unknown session, block or frame).
    #[error("{0}")]
    State(String),
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

impl From<LinkError> for tonic::Status {
    fn from(e: LinkError) -> Self {
        match e {
            LinkError::State(m) => tonic::Status::failed_precondition(m),
            LinkError::Malformed(m) => tonic::Status::invalid_argument(m),
            LinkError::ParamsMismatch(m) => {
                tonic::Status::failed_precondition(format!("protocol parameters differ: {m}"))
            }
            LinkError::Store(e) => tonic::Status::unavailable(e.to_string()),
            LinkError::Transport(m) | LinkError::Refused(m) => tonic::Status::unavailable(m),
        }
    }
}

impl From<tonic::Status> for LinkError {
    fn from(status: tonic::Status) -> Self {
        match status.code() {
            tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
            | tonic::Code::DeadlineExceeded => LinkError::Transport(status.message().to_owned()),
            _ => LinkError::Refused(format!("{:?}: {}", status.code(), status.message())),
        }
    }
}

/// Parses a UUID from the wire.
pub(crate) fn parse_uuid(s: &str, what: &str) -> Result<uuid::Uuid, LinkError> {
    uuid::Uuid::parse_str(s).map_err(|_| LinkError::Malformed(format!("{what} {s:?} is not a UUID")))
}

#[cfg(test)]
mod tests;
