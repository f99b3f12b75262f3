//! The link's request surface, once: one [`Request`] variant per RPC of `qkd.link.v1.Link`
//! and one [`Response`] variant per answer. Alice's core answers a [`Request`]
//! ([`AliceCore::handle`](super::alice::AliceCore::handle)); every transport carries one
//! ([`LinkPeer::call`](super::bob::LinkPeer::call)) and only that.

use proto::link::*;

use super::LinkError;
use crate::store::KeyStore;

/// What Alice's core needs from its driver to answer a request: her key store (Hello reads it,
/// Commit writes to it) and the time stamped on a block's keys.
pub struct HandleContext<'a> {
    /// Alice's key store.
    pub store: &'a dyn KeyStore,
    /// Now, Unix milliseconds (wall clock in the daemon, simulated time in the planner).
    pub now_unix_ms: u64,
}

macro_rules! surface {
    ($($(#[$doc:meta])* $variant:ident($request:ident => $response:ident),)*) => {
        /// A request from Bob to Alice: one variant per RPC.
        #[derive(Clone, Debug, PartialEq)]
        pub enum Request {
            $($(#[$doc])* $variant($request),)*
        }

        /// Alice's answer: one variant per RPC, the same as the request's.
        #[derive(Clone, Debug, PartialEq)]
        pub enum Response {
            $($(#[$doc])* $variant($response),)*
        }

        impl Request {
            /// The RPC's name (`"Hello"`, `"Sift"`, ...), for logs and errors.
            pub fn name(&self) -> &'static str {
                match self {
                    $(Request::$variant(_) => stringify!($variant),)*
                }
            }
        }

        impl Response {
            /// The RPC's name.
            pub fn name(&self) -> &'static str {
                match self {
                    $(Response::$variant(_) => stringify!($variant),)*
                }
            }
        }

        $(
            impl From<$request> for Request {
                fn from(request: $request) -> Self {
                    Request::$variant(request)
                }
            }

            impl From<$response> for Response {
                fn from(response: $response) -> Self {
                    Response::$variant(response)
                }
            }

            impl TryFrom<Response> for $response {
                type Error = LinkError;

                /// The answer of this RPC; another RPC's answer is malformed.
                fn try_from(response: Response) -> Result<Self, LinkError> {
                    match response {
                        Response::$variant(response) => Ok(response),
                        other => Err(LinkError::Malformed(format!(
                            "{} answered where {} was asked",
                            other.name(),
                            stringify!($variant)
                        ))),
                    }
                }
            }
        )*
    };
}

surface! {
    /// Opens a session and settles Bob's pending blocks.
    Hello(HelloRequest => HelloResponse),
    /// Sifts one frame.
    Sift(SiftRequest => SiftResponse),
    /// Cuts a block and starts its post-processing.
    StartBlock(StartBlockRequest => StartBlockResponse),
    /// Cascade: parities of sub-blocks.
    Parities(ParityRequest => ParityResponse),
    /// Blind LDPC: the frames' syndromes.
    Syndromes(SyndromeRequest => SyndromeResponse),
    /// Blind LDPC: more punctured bits.
    Reveal(RevealRequest => RevealResponse),
    /// Closes error correction; Alice's verification tags.
    Verify(VerifyRequest => VerifyResponse),
    /// Privacy amplification: final length, seed, key IDs.
    Amplify(AmplifyRequest => AmplifyResponse),
    /// Bob holds the block as pending; Alice stores it as ready.
    Commit(CommitRequest => CommitResponse),
    /// Bob gives up a block.
    Abort(AbortRequest => AbortResponse),
}
