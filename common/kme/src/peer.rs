//! The KME-to-KME channel (`proto/kme.proto`, gRPC with mutual TLS on node certificates): the
//! reservation a KME asks of its peer before handing keys to a master SAE, and the cancellation
//! of reservations whose answer was lost.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use proto::kme::kme_peer_client::KmePeerClient;
use proto::kme::kme_peer_server::{KmePeer, KmePeerServer};
use proto::kme::{
    CancelRequest as CancelMessage, CancelResponse, Cancellation, PingRequest, PingResponse,
    ReserveRequest as ReserveMessage, ReserveResponse, ReservedKey,
};
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};
use tracing::warn;
use uuid::Uuid;

use super::config::PEER_MAX_MESSAGE_BYTES;
use super::identity::{KmeId, SaeId};
use super::pool::KmeState;
use qkd_tls::TlsMaterial;

/// A reservation asked of the peer KME: ETSI keys, each made of units, for a master and slaves.
#[derive(Clone, Debug, PartialEq)]
pub struct ReserveRequest {
    /// The asking KME.
    pub source_kme_id: KmeId,
    /// The master SAE (attached to the asking KME).
    pub master: SaeId,
    /// The slave SAEs (attached to the peer): the path's slave first.
    pub slaves: Vec<SaeId>,
    /// Key size, bits.
    pub size_bits: u32,
    /// Each ETSI key ID and its units, in order.
    pub keys: Vec<(Uuid, Vec<Uuid>)>,
}

/// Why a reservation did not happen, or may not have.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ReserveError {
    /// The peer does not hold these units (any more); they can never be served. The peer
    /// changed nothing.
    #[error("the peer KME does not hold {} of the units", .0.len())]
    Missing(Vec<Uuid>),
    /// The peer holds these units but cannot reserve them now: their block is not committed
    /// there yet (the two-ended commit is under way), or the peer's own Get key holds them in
    /// flight (a KME short of its own units borrows the peer's, see [`crate::KmeSide`]). They
    /// may be reservable shortly; the caller keeps them and picks others. The peer changed
    /// nothing.
    #[error("{} of the units are not reservable at the peer KME now (not committed there yet, or in use)", .0.len())]
    NotNow(Vec<Uuid>),
    /// The peer refused the request (it is inconsistent with its configuration, or its store
    /// failed). The peer changed nothing.
    #[error("the peer KME refused: {0}")]
    Refused(String),
    /// The request never left this KME (no connection to the peer could be made), so the peer
    /// changed nothing.
    #[error("the peer KME is unreachable: {0}")]
    NotSent(String),
    /// The peer could not be reached or did not answer in time, after the request may have been
    /// sent: the peer may or may not have recorded the reservation (settle it with
    /// [`ReservePeer::cancel`]).
    #[error("the peer KME is unreachable: {0}")]
    Unreachable(String),
}

/// A cancellation asked of the peer KME: the key IDs of one reservation request whose answer
/// never came.
#[derive(Clone, Debug, PartialEq)]
pub struct CancelRequest {
    /// The asking KME.
    pub source_kme_id: KmeId,
    /// The ETSI key IDs of that request.
    pub key_ids: Vec<Uuid>,
}

/// What became of one key ID of a [`CancelRequest`] at the peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CancelOutcome {
    /// The peer had recorded the reservation and has now erased it; its units are gone from the
    /// peer's pool, so the asking KME must discard them.
    Cancelled,
    /// The peer had no such reservation and will refuse it from now on; its units stay at the
    /// peer if it never took them, so the asking KME may offer them again.
    Unknown,
}

/// Why a cancellation did not get an answer (it may be asked again: it is idempotent).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum CancelError {
    /// The peer refused the request, or its answer is malformed.
    #[error("the peer KME refused the cancellation: {0}")]
    Refused(String),
    /// The peer could not be reached or did not answer in time.
    #[error("the peer KME is unreachable: {0}")]
    Unreachable(String),
}

/// A boxed future, as returned by [`ReservePeer`].
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The peer KME as the key life cycle sees it (gRPC in the daemons, in-process in unit tests).
pub trait ReservePeer: Send + Sync + 'static {
    /// Asks the peer to reserve the keys of `request`, all or nothing.
    fn reserve(&self, request: ReserveRequest) -> BoxFuture<'_, Result<(), ReserveError>>;
    /// Asks the peer to cancel the reservations of `request`'s key IDs; one outcome per key ID,
    /// in order.
    fn cancel(&self, request: CancelRequest) -> BoxFuture<'_, Result<Vec<CancelOutcome>, CancelError>>;
}

/// The gRPC client of the peer KME. The channel connects lazily and reconnects by itself.
#[derive(Clone)]
pub struct GrpcPeer {
    client: KmePeerClient<Channel>,
}

impl GrpcPeer {
    /// A client of the peer KME at `addr` (`host:port`), whose node certificate must be valid
    /// for `peer_name`; every call is limited to `timeout` (connection included).
    pub fn connect_lazy(
        addr: &str,
        peer_name: &str,
        node_tls: &TlsMaterial,
        timeout: Duration,
    ) -> Result<Self, crate::KmeError> {
        let connector = node_tls.grpc_connector(peer_name)?;
        let channel = Endpoint::from_shared(format!("http://{addr}"))?
            .connect_timeout(timeout)
            .timeout(timeout)
            .connect_with_connector_lazy(connector);
        let client = KmePeerClient::new(channel)
            .max_decoding_message_size(PEER_MAX_MESSAGE_BYTES)
            .max_encoding_message_size(PEER_MAX_MESSAGE_BYTES);
        Ok(Self { client })
    }

    /// Asks the peer KME for its ID (a health check).
    pub async fn ping(&self) -> Result<KmeId, Status> {
        let response = self.client.clone().ping(PingRequest {}).await?;
        Ok(KmeId(response.into_inner().kme_id))
    }
}

impl ReservePeer for GrpcPeer {
    fn reserve(&self, request: ReserveRequest) -> BoxFuture<'_, Result<(), ReserveError>> {
        let mut client = self.client.clone();
        Box::pin(async move {
            let message = ReserveMessage {
                source_kme_id: request.source_kme_id.0,
                master_sae_id: request.master.0,
                slave_sae_ids: request.slaves.into_iter().map(|s| s.0).collect(),
                size_bits: request.size_bits,
                keys: request
                    .keys
                    .into_iter()
                    .map(|(key_id, units)| ReservedKey {
                        key_id: key_id.as_bytes().to_vec(),
                        unit_ids: units.iter().map(|u| u.as_bytes().to_vec()).collect(),
                    })
                    .collect(),
            };
            let response = client.reserve(message).await.map_err(|status| {
                if never_sent(&status) {
                    ReserveError::NotSent(peer_text(status.message()))
                } else if answered_by_peer(&status) {
                    ReserveError::Refused(peer_text(status.message()))
                } else {
                    ReserveError::Unreachable(peer_text(status.message()))
                }
            })?;
            let response = response.into_inner();
            let ids = |ids: &[Vec<u8>]| {
                ids.iter()
                    .map(|id| Uuid::from_slice(id))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|_| ReserveError::Refused("malformed unit ID in the peer's answer".into()))
            };
            if !response.missing_unit_ids.is_empty() {
                return Err(ReserveError::Missing(ids(&response.missing_unit_ids)?));
            }
            if !response.not_ready_unit_ids.is_empty() {
                return Err(ReserveError::NotNow(ids(&response.not_ready_unit_ids)?));
            }
            Ok(())
        })
    }

    fn cancel(&self, request: CancelRequest) -> BoxFuture<'_, Result<Vec<CancelOutcome>, CancelError>> {
        let mut client = self.client.clone();
        Box::pin(async move {
            let n_keys = request.key_ids.len();
            let message = CancelMessage {
                source_kme_id: request.source_kme_id.0,
                key_ids: request.key_ids.iter().map(|k| k.as_bytes().to_vec()).collect(),
            };
            let response = client.cancel(message).await.map_err(|status| {
                if answered_by_peer(&status) {
                    CancelError::Refused(peer_text(status.message()))
                } else {
                    CancelError::Unreachable(peer_text(status.message()))
                }
            })?;
            let outcomes = response.into_inner().outcomes;
            if outcomes.len() != n_keys {
                return Err(CancelError::Refused(format!(
                    "the peer answered {} outcomes for {n_keys} keys",
                    outcomes.len()
                )));
            }
            outcomes
                .into_iter()
                .map(|outcome| match Cancellation::try_from(outcome) {
                    Ok(Cancellation::Cancelled) => Ok(CancelOutcome::Cancelled),
                    Ok(Cancellation::Unknown) => Ok(CancelOutcome::Unknown),
                    _ => Err(CancelError::Refused(format!("malformed outcome {outcome} in the peer's answer"))),
                })
                .collect()
        })
    }
}

/// Longest text of the peer's (an error message) kept, bytes: the rest is cut before it is
/// logged or shown to an SAE.
pub const MAX_PEER_TEXT_BYTES: usize = 256;

/// `text` from the peer, cut to at most [`MAX_PEER_TEXT_BYTES`] on a character boundary (marked
/// with an ellipsis when cut).
pub(super) fn peer_text(text: &str) -> String {
    if text.len() <= MAX_PEER_TEXT_BYTES {
        return text.to_owned();
    }
    let mut end = MAX_PEER_TEXT_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// Whether the call failed while connecting (TCP or TLS), before any byte of the request was
/// sent. tonic marks these errors with [`tonic::ConnectError`] in the status's source chain.
pub(super) fn never_sent(status: &Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        if error.is::<tonic::ConnectError>() {
            return true;
        }
        source = error.source();
    }
    false
}

/// Whether the status is one the peer's service answers itself after changing nothing (bad
/// caller, malformed or refused request, unknown method). Every other status (transport errors,
/// timeouts, resets, internal errors) leaves the outcome in doubt.
pub(super) fn answered_by_peer(status: &Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::FailedPrecondition
            | tonic::Code::InvalidArgument
            | tonic::Code::PermissionDenied
            | tonic::Code::Unauthenticated
            | tonic::Code::Unimplemented
    )
}

/// The gRPC service a KME offers its peer: checks that the caller's (CA-verified) node
/// certificate is valid for the configured peer name, then reserves or cancels.
pub struct PeerService {
    state: KmeState,
    peer_name: String,
    peer_check: qkd_tls::verify::PeerCheck,
}

/// The tonic service to add to the peer channel's server; `peer_check` re-checks the caller's
/// certificate at each request (revoked, expired or unpinned since the connection opened).
pub fn peer_server(
    state: KmeState,
    peer_name: String,
    peer_check: qkd_tls::verify::PeerCheck,
) -> KmePeerServer<PeerService> {
    KmePeerServer::new(PeerService { state, peer_name, peer_check })
        .max_decoding_message_size(PEER_MAX_MESSAGE_BYTES)
        .max_encoding_message_size(PEER_MAX_MESSAGE_BYTES)
}

impl PeerService {
    fn authorize<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let certs = request.peer_certs().ok_or_else(|| Status::unauthenticated("no client certificate"))?;
        let leaf = certs.first().ok_or_else(|| Status::unauthenticated("no client certificate"))?;
        if qkd_tls::peer_has_name(leaf, &self.peer_name) {
            self.peer_check
                .check(&certs)
                .map_err(|reason| Status::permission_denied(format!("client certificate {reason}")))
        } else {
            warn!(expected = %self.peer_name, "refused a KME peer whose certificate names another node");
            Err(Status::permission_denied(format!("client certificate is not valid for {}", self.peer_name)))
        }
    }
}

fn uuid_field(bytes: &[u8], what: &str) -> Result<Uuid, Status> {
    Uuid::from_slice(bytes).map_err(|_| Status::invalid_argument(format!("{what} is not a 16-byte UUID")))
}

#[tonic::async_trait]
impl KmePeer for PeerService {
    async fn ping(&self, request: Request<PingRequest>) -> Result<Response<PingResponse>, Status> {
        self.authorize(&request)?;
        Ok(Response::new(PingResponse { kme_id: self.state.settings().kme_id.0.clone() }))
    }

    async fn reserve(&self, request: Request<ReserveMessage>) -> Result<Response<ReserveResponse>, Status> {
        self.authorize(&request)?;
        let message = request.into_inner();
        let mut keys = Vec::with_capacity(message.keys.len());
        for key in &message.keys {
            let units = key.unit_ids.iter().map(|u| uuid_field(u, "unit_id")).collect::<Result<Vec<_>, _>>()?;
            keys.push((uuid_field(&key.key_id, "key_id")?, units));
        }
        let request = ReserveRequest {
            source_kme_id: KmeId(message.source_kme_id),
            master: SaeId(message.master_sae_id),
            slaves: message.slave_sae_ids.into_iter().map(SaeId).collect(),
            size_bits: message.size_bits,
            keys,
        };
        match self.state.reserve_for_peer(request).await {
            Ok(()) => Ok(Response::new(ReserveResponse::default())),
            Err(ReserveError::Missing(missing)) => Ok(Response::new(ReserveResponse {
                missing_unit_ids: missing.iter().map(|u| u.as_bytes().to_vec()).collect(),
                ..ReserveResponse::default()
            })),
            Err(ReserveError::NotNow(units)) => Ok(Response::new(ReserveResponse {
                not_ready_unit_ids: units.iter().map(|u| u.as_bytes().to_vec()).collect(),
                ..ReserveResponse::default()
            })),
            Err(ReserveError::Refused(message)) => Err(Status::failed_precondition(message)),
            Err(ReserveError::NotSent(message) | ReserveError::Unreachable(message)) => Err(Status::internal(message)),
        }
    }

    async fn cancel(&self, request: Request<CancelMessage>) -> Result<Response<CancelResponse>, Status> {
        self.authorize(&request)?;
        let message = request.into_inner();
        let key_ids = message.key_ids.iter().map(|k| uuid_field(k, "key_id")).collect::<Result<Vec<_>, _>>()?;
        let request = CancelRequest { source_kme_id: KmeId(message.source_kme_id), key_ids };
        match self.state.cancel_for_peer(request).await {
            Ok(outcomes) => Ok(Response::new(CancelResponse {
                outcomes: outcomes
                    .into_iter()
                    .map(|outcome| match outcome {
                        CancelOutcome::Cancelled => Cancellation::Cancelled as i32,
                        CancelOutcome::Unknown => Cancellation::Unknown as i32,
                    })
                    .collect(),
            })),
            Err(CancelError::Refused(message)) => Err(Status::failed_precondition(message)),
            Err(CancelError::Unreachable(message)) => Err(Status::internal(message)),
        }
    }
}
