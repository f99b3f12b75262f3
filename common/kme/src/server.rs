//! The ETSI GS QKD 014 HTTPS server: a TLS accept loop (mutual TLS, TLS 1.2 and 1.3), HTTP/1.1
//! and HTTP/2 on each connection, and the axum router of the endpoints. The caller's SAE ID is
//! read once per connection from its verified certificate and handed to the handlers as a
//! request extension; no header or URL can claim an identity.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, ExtensionRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::KmeError;
use super::api::{self, EtsiError, KeyRequest};
use super::identity::{IdentitySource, SaeId, sae_id_from_certificate};
use super::limits::{Admission, REFUSAL_SOCKETS, Refusal};
use super::pool::KmeState;
use qkd_tls::TlsMaterial;

/// The OpenAPI 3 document of this API, served at `GET /api/v1/openapi.yaml`.
pub const OPENAPI_YAML: &str = include_str!("../../../docs/openapi.yaml");

/// Path of Get status (`{slave_SAE_ID}` URL-encoded).
pub const STATUS_PATH: &str = "/api/v1/keys/{slave_SAE_ID}/status";
/// Path of Get key.
pub const ENC_KEYS_PATH: &str = "/api/v1/keys/{slave_SAE_ID}/enc_keys";
/// Path of Get key with key IDs.
pub const DEC_KEYS_PATH: &str = "/api/v1/keys/{master_SAE_ID}/dec_keys";
/// Path of the OpenAPI document.
pub const OPENAPI_PATH: &str = "/api/v1/openapi.yaml";

/// Every (method, path template) the router serves; a test checks that the OpenAPI document
/// lists exactly these.
pub const ROUTES: [(&str, &str); 6] = [
    ("get", STATUS_PATH),
    ("get", ENC_KEYS_PATH),
    ("post", ENC_KEYS_PATH),
    ("get", DEC_KEYS_PATH),
    ("post", DEC_KEYS_PATH),
    ("get", OPENAPI_PATH),
];

/// Largest request body accepted, bytes.
const MAX_BODY_BYTES: usize = 1 << 20;

/// Time a client has to complete the TLS handshake, and to send a request's headers.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Time open connections get to finish their requests at shutdown.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// A metrics recorder shared with the daemon that renders it (its `/metrics`).
pub type SharedRecorder = Arc<dyn metrics::Recorder + Send + Sync>;

/// Upper bounds of the request-latency histogram's buckets, seconds.
pub const LATENCY_BUCKETS_S: [f64; 12] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

/// The caller of a request: the SAE ID read from its client certificate, if any could be read.
#[derive(Clone, Debug)]
pub struct Caller(pub Option<SaeId>);

/// The rustls configuration of the HTTPS server (built by `qkd_tls`): `tls.cert_pem`/`tls.key_pem`
/// are the KME's server certificate and key; every client must present a certificate chaining
/// to `tls.ca_pem` (the application CA), not revoked by the CRLs of `tls.crl_files`. TLS 1.2 and
/// 1.3, ALPN `h2` and `http/1.1`.
pub fn https_server_config(tls: &TlsMaterial) -> Result<Arc<rustls::ServerConfig>, KmeError> {
    Ok(tls.server_config(&[b"h2", b"http/1.1"])?)
}

/// The axum router of the API. Handlers read the caller from the [`Caller`] extension (absent:
/// the request is refused with 401).
pub fn router(state: KmeState, admission: Arc<Admission>) -> Router {
    Router::new()
        .route(STATUS_PATH, get(status))
        .route(ENC_KEYS_PATH, get(enc_keys_get).post(enc_keys_post))
        .route(DEC_KEYS_PATH, get(dec_keys_get).post(dec_keys_post))
        .route(OPENAPI_PATH, get(openapi))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn_with_state(admission, limit_rate))
        .layer(axum::middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

/// Middleware of every route: takes a token of the caller's bucket, or answers 429 with
/// `Retry-After` before any work is done.
async fn limit_rate(
    State(admission): State<Arc<Admission>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let caller = request.extensions().get::<Caller>().and_then(|c| c.0.clone());
    match admission.admit_request(caller.as_ref(), std::time::Instant::now()) {
        Ok(()) => next.run(request).await,
        Err(refusal) => {
            debug!(caller = ?caller, "request over the SAE's rate limit refused (429)");
            // See Refusal::answer_delay: a client retrying at once gets one refusal a second
            // per request in flight, not as many as the CPU can answer.
            tokio::time::sleep(refusal.answer_delay()).await;
            refusal.into_response()
        }
    }
}

/// The endpoint a request reached, named for the metrics' `endpoint` label (a fixed set: the
/// SAE IDs of the path never become label values).
fn endpoint_name(matched: Option<&MatchedPath>) -> &'static str {
    match matched.map(MatchedPath::as_str) {
        Some(STATUS_PATH) => "status",
        Some(ENC_KEYS_PATH) => "enc_keys",
        Some(DEC_KEYS_PATH) => "dec_keys",
        Some(OPENAPI_PATH) => "openapi",
        _ => "other",
    }
}

/// Middleware of every route: counts the request by endpoint, method and status
/// (`qkd_etsi_requests_total`) and records its latency (`qkd_etsi_request_duration_seconds`) in
/// the KME's recorder, if it has one. Only the route template and the status code are recorded.
async fn observe(
    State(state): State<KmeState>,
    matched: Option<MatchedPath>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let start = std::time::Instant::now();
    let endpoint = endpoint_name(matched.as_ref());
    let method = match *request.method() {
        axum::http::Method::GET => "GET",
        axum::http::Method::POST => "POST",
        _ => "other",
    };
    let response = next.run(request).await;
    if let Some(recorder) = state.metrics_recorder() {
        let status = response.status().as_u16().to_string();
        let elapsed = start.elapsed().as_secs_f64();
        metrics::with_local_recorder(recorder.as_ref(), || {
            metrics::counter!("qkd_etsi_requests_total", "endpoint" => endpoint, "method" => method, "status" => status)
                .increment(1);
            metrics::histogram!("qkd_etsi_request_duration_seconds", "endpoint" => endpoint).record(elapsed);
        });
    }
    response
}

/// Serves the API on `listener` until `shutdown`, then lets open connections finish (up to
/// 10 s). Connections, request rates and idle time are limited as the KME's settings say
/// ([`crate::limits::AbuseLimits`]).
pub async fn serve_etsi(
    listener: TcpListener,
    state: KmeState,
    tls: Arc<rustls::ServerConfig>,
    shutdown: CancellationToken,
) -> Result<(), KmeError> {
    let acceptor = TlsAcceptor::from(tls);
    let settings = state.settings();
    let identity = settings.identity;
    let limits = settings.abuse;
    let listed: std::collections::HashSet<SaeId> = settings.saes.keys().cloned().collect();
    let admission = Admission::new(limits, move |sae| listed.contains(sae));
    let router = router(state.clone(), admission.clone());
    // Sockets held at once, refused ones included; past it the server stops accepting (the
    // kernel's backlog holds new connections) until one ends.
    let sockets = Arc::new(tokio::sync::Semaphore::new((limits.max_connections + REFUSAL_SOCKETS) as usize));
    let connections = TaskTracker::new();
    info!(
        addr = %listener.local_addr()?,
        max_connections = limits.max_connections,
        max_connections_per_sae = limits.max_connections_per_sae,
        requests_per_second_per_sae = limits.requests_per_second_per_sae,
        idle_timeout_s = limits.idle_timeout.as_secs(),
        "ETSI key delivery API listening"
    );
    let mut warned_full = false;
    loop {
        let permit = tokio::select! {
            () = shutdown.cancelled() => break,
            permit = sockets.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
        };
        if sockets.available_permits() == 0 && !warned_full {
            warn!(
                sockets = limits.max_connections + REFUSAL_SOCKETS,
                "ETSI server holds all the sockets it may; new connections wait in the listen backlog"
            );
        }
        warned_full = sockets.available_permits() == 0;
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((tcp, remote)) => {
                let connection = Connection {
                    remote,
                    identity,
                    admission: admission.clone(),
                    state: state.clone(),
                    router: router.clone(),
                    shutdown: shutdown.clone(),
                };
                let acceptor = acceptor.clone();
                connections.spawn(async move {
                    connection.serve(tcp, acceptor).await;
                    drop(permit);
                });
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                warn!(error = %e, "accepting an ETSI connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    connections.close();
    if tokio::time::timeout(DRAIN_TIMEOUT, connections.wait()).await.is_err() {
        warn!("ETSI connections still open after the drain time; closing them");
    }
    Ok(())
}

/// Most requests in flight on one HTTP/2 connection.
const MAX_CONCURRENT_STREAMS: u32 = 32;

/// One accepted socket and what serving it needs.
struct Connection {
    remote: SocketAddr,
    identity: IdentitySource,
    admission: Arc<Admission>,
    state: KmeState,
    router: Router,
    shutdown: CancellationToken,
}

/// What a connection's requests are answered with: the API, or one refusal.
enum Service {
    Api(Router),
    Refuse(Refusal),
}

impl Connection {
    fn record<F: FnOnce()>(&self, f: F) {
        if let Some(recorder) = self.state.metrics_recorder() {
            metrics::with_local_recorder(recorder.as_ref(), f);
        }
    }

    fn record_open(&self) {
        let open = f64::from(self.admission.open_connections());
        self.record(|| metrics::gauge!("qkd_etsi_connections_open").set(open));
    }

    async fn serve(self, tcp: TcpStream, acceptor: TlsAcceptor) {
        let remote = self.remote;
        let _ = tcp.set_nodelay(true);
        let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                debug!(%remote, error = %e, "TLS handshake refused");
                return;
            }
            Err(_) => {
                debug!(%remote, "TLS handshake timed out");
                return;
            }
        };
        let leaf = tls.get_ref().1.peer_certificates().and_then(|certs| certs.first());
        let caller = match leaf.map(|leaf| sae_id_from_certificate(leaf, self.identity)) {
            Some(Ok(sae_id)) => Caller(Some(sae_id)),
            Some(Err(e)) => {
                warn!(%remote, error = %e, "no SAE ID in a client certificate; its requests get 401");
                Caller(None)
            }
            None => Caller(None),
        };
        let (slot, service) = match self.admission.admit_connection(caller.0.as_ref()) {
            Ok(slot) => (Some(slot), Service::Api(self.router.clone())),
            Err(refusal) => {
                let reason = match refusal {
                    Refusal::KmeBusy { .. } => "kme_connections",
                    _ => "sae_connections",
                };
                debug!(%remote, caller = ?caller.0, reason, "connection over a limit: its requests are refused");
                self.record(|| {
                    metrics::counter!("qkd_etsi_connections_refused_total", "reason" => reason).increment(1)
                });
                (None, Service::Refuse(refusal))
            }
        };
        self.record_open();
        debug!(%remote, caller = ?caller.0, "ETSI connection");
        self.run(tls, caller, service).await;
        drop(slot);
        self.record_open();
    }

    /// Serves HTTP on the TLS stream until the client closes it, it stays idle for the idle
    /// timeout, or shutdown. A refused connection answers its first request(s) with the refusal
    /// and is closed.
    async fn run(&self, tls: tokio_rustls::server::TlsStream<TcpStream>, caller: Caller, service: Service) {
        let remote = self.remote;
        let activity = Arc::new(Activity::default());
        let refused = matches!(service, Service::Refuse(_));
        let answered = Arc::new(tokio::sync::Notify::new());
        let service = {
            let (activity, answered) = (activity.clone(), answered.clone());
            let service = Arc::new(service);
            hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
                let (activity, answered, service) = (activity.clone(), answered.clone(), service.clone());
                request.extensions_mut().insert(caller.clone());
                let busy = activity.start();
                async move {
                    let response = match &*service {
                        Service::Api(router) => tower::ServiceExt::oneshot(router.clone(), request).await,
                        Service::Refuse(refusal) => {
                            // Answered only after the time the client is told to wait: a client
                            // that reconnects at once would otherwise turn refusals into a storm
                            // of TLS handshakes that takes the CPU from the admitted callers.
                            tokio::time::sleep(refusal.answer_delay()).await;
                            let mut response = refusal.clone().into_response();
                            // HTTP/2 has no Connection header: its GOAWAY (the graceful shutdown
                            // below) says the same.
                            if request.version() < hyper::Version::HTTP_2 {
                                let close = header::HeaderValue::from_static("close");
                                response.headers_mut().insert(header::CONNECTION, close);
                            }
                            answered.notify_one();
                            Ok(response)
                        }
                    };
                    drop(busy);
                    response
                }
            })
        };
        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        builder.http1().timer(TokioTimer::new()).header_read_timeout(HANDSHAKE_TIMEOUT);
        builder.http2().timer(TokioTimer::new()).max_concurrent_streams(MAX_CONCURRENT_STREAMS);
        let connection = builder.serve_connection(TokioIo::new(tls), service);
        tokio::pin!(connection);
        let idle_timeout = self.admission.limits().idle_timeout;
        let mut closing = false;
        loop {
            let idle_deadline = activity.idle_deadline(idle_timeout);
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(e) = result {
                        debug!(%remote, error = %e, "ETSI connection ended with an error");
                    }
                    break;
                }
                () = self.shutdown.cancelled(), if !closing => {
                    connection.as_mut().graceful_shutdown();
                    closing = true;
                }
                () = answered.notified(), if refused && !closing => {
                    connection.as_mut().graceful_shutdown();
                    closing = true;
                }
                () = tokio::time::sleep_until(idle_deadline), if !closing => {
                    if activity.is_idle_for(idle_timeout) {
                        debug!(%remote, idle_s = idle_timeout.as_secs(), "closing an idle ETSI connection");
                        connection.as_mut().graceful_shutdown();
                        closing = true;
                    }
                }
            }
        }
    }
}

/// Requests in flight on a connection and when the last one ended.
struct Activity {
    in_flight: std::sync::atomic::AtomicUsize,
    last: std::sync::Mutex<tokio::time::Instant>,
}

impl Default for Activity {
    fn default() -> Self {
        Self { in_flight: 0.into(), last: std::sync::Mutex::new(tokio::time::Instant::now()) }
    }
}

/// A request in flight; its end is the connection's latest activity.
struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        *self.0.last.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = tokio::time::Instant::now();
        self.0.in_flight.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Activity {
    fn start(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Busy(self.clone())
    }

    fn last(&self) -> tokio::time::Instant {
        *self.last.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// When to look again whether the connection has been idle for `timeout`: `timeout` after
    /// its last request ended, or from now while a request is in flight.
    fn idle_deadline(&self, timeout: Duration) -> tokio::time::Instant {
        if self.in_flight.load(std::sync::atomic::Ordering::SeqCst) > 0 {
            tokio::time::Instant::now() + timeout
        } else {
            self.last() + timeout
        }
    }

    fn is_idle_for(&self, timeout: Duration) -> bool {
        self.in_flight.load(std::sync::atomic::Ordering::SeqCst) == 0 && self.last().elapsed() >= timeout
    }
}

/// The [`Caller`] extension as handlers receive it (missing only if the router is served
/// without [`serve_etsi`], e.g. in a test: then the caller has no identity).
type CallerExtension = Result<Extension<Caller>, ExtensionRejection>;

fn caller_id(caller: &CallerExtension) -> Option<&SaeId> {
    caller.as_ref().ok().and_then(|Extension(c)| c.0.as_ref())
}

fn path_id(path: Result<Path<String>, PathRejection>) -> Result<SaeId, EtsiError> {
    match path {
        Ok(Path(id)) if !id.is_empty() => Ok(SaeId(id)),
        Ok(_) => Err(EtsiError::bad_request("the SAE ID in the path is empty")),
        Err(e) => Err(EtsiError::bad_request(format!("the SAE ID in the path is malformed: {}", e.body_text()))),
    }
}

fn query_pairs(
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Vec<(String, String)>, EtsiError> {
    query.map(|Query(pairs)| pairs).map_err(|e| EtsiError::bad_request(format!("malformed query: {}", e.body_text())))
}

fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, EtsiError> {
    body.map_err(|e| EtsiError::bad_request(format!("unreadable request body: {}", e.body_text())))
}

async fn status(
    State(state): State<KmeState>,
    caller: CallerExtension,
    slave: Result<Path<String>, PathRejection>,
) -> Result<Json<api::StatusBody>, EtsiError> {
    let slave = path_id(slave)?;
    Ok(Json(state.status(caller_id(&caller), &slave).await?))
}

async fn enc_keys_get(
    State(state): State<KmeState>,
    caller: CallerExtension,
    slave: Result<Path<String>, PathRejection>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Json<api::KeyContainer>, EtsiError> {
    let slave = path_id(slave)?;
    let request = KeyRequest::from_query(&query_pairs(query)?)?;
    Ok(Json(state.get_key(caller_id(&caller), &slave, request).await?))
}

async fn enc_keys_post(
    State(state): State<KmeState>,
    caller: CallerExtension,
    slave: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<api::KeyContainer>, EtsiError> {
    let slave = path_id(slave)?;
    let request = KeyRequest::from_json(&body_bytes(body)?)?;
    Ok(Json(state.get_key(caller_id(&caller), &slave, request).await?))
}

async fn dec_keys_get(
    State(state): State<KmeState>,
    caller: CallerExtension,
    master: Result<Path<String>, PathRejection>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Json<api::KeyContainer>, EtsiError> {
    let master = path_id(master)?;
    let key_ids = api::key_ids_from_query(&query_pairs(query)?)?;
    Ok(Json(state.get_key_with_key_ids(caller_id(&caller), &master, key_ids).await?))
}

async fn dec_keys_post(
    State(state): State<KmeState>,
    caller: CallerExtension,
    master: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<api::KeyContainer>, EtsiError> {
    let master = path_id(master)?;
    let key_ids = api::key_ids_from_json(&body_bytes(body)?)?;
    Ok(Json(state.get_key_with_key_ids(caller_id(&caller), &master, key_ids).await?))
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/yaml")], OPENAPI_YAML).into_response()
}

async fn not_found() -> Response {
    (StatusCode::NOT_FOUND, Json(api::ErrorBody { message: "no such resource".into(), details: None })).into_response()
}

async fn method_not_allowed() -> Response {
    (
        StatusCode::METHOD_NOT_ALLOWED,
        Json(api::ErrorBody { message: "method not allowed on this resource".into(), details: None }),
    )
        .into_response()
}
