//! Alice's daemon: the photon source on the simulated fibre and the server of the classical
//! channel. `main.rs` only parses flags and wires; [`run`] takes bound listeners and a shutdown
//! token, so tests bind port 0 and stop it themselves.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use common::config::AliceConfig;
use common::fibre::{encode_frame, write_frame};
use common::grpc::status_from_link_error;
use proto::link::link_server::{Link, LinkServer};
use proto::link::*;
use qkd_core::link::alice::{AliceCore, AliceEvent};
use qkd_core::link::{HandleContext, LinkError, Request, Response};
use qkd_core::postproc::finite_key::SourceReading;
use qkd_sim::{FrameSecret, LinkParams, Source};
use qkd_store::SledStore;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tracing::{info, warn};

/// Alice's counters, written to `status.json` in the data directory every second.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct AliceStatus {
    /// Frames emitted on the fibre.
    pub frames_emitted: u64,
    /// Photons that reached the fibre's far end (before Bob's losses).
    pub photons_sent: u64,
    /// Whether a receiver is connected to the fibre.
    pub fibre_connected: bool,
    /// Blocks committed.
    pub blocks_committed: u64,
    /// Blocks aborted.
    pub blocks_aborted: u64,
    /// Key units stored.
    pub keys_stored: u64,
    /// Secret bits stored.
    pub secret_bits: u64,
    /// The last abort reason, if any.
    pub last_abort_reason: Option<String>,
    /// Frame periods in which the source emitted nothing although a receiver was connected: the
    /// emitter fell behind the clock (a stalled worker, a fibre write that took too long). 0 in
    /// a healthy run; each skip is logged at warn.
    pub frames_missed: u64,
}

/// Loads `config` (with `data_dir` overriding its data directory), binds the listeners and runs
/// until SIGINT or SIGTERM.
pub async fn run_from_config(config: &std::path::Path, data_dir: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    let (mut cfg, link) = AliceConfig::load(config)?;
    if let Some(dir) = data_dir {
        cfg.data_dir = dir;
    }
    let grpc = TcpListener::bind(cfg.classical.listen)
        .await
        .with_context(|| format!("binding classical.listen {}", cfg.classical.listen))?;
    let fibre = TcpListener::bind(cfg.fibre.listen)
        .await
        .with_context(|| format!("binding fibre.listen {}", cfg.fibre.listen))?;
    let shutdown = CancellationToken::new();
    tokio::spawn(common::shutdown_on_signal(shutdown.clone()));
    run(cfg, link, grpc, fibre, shutdown).await
}

/// Runs Alice until `shutdown` is cancelled.
pub async fn run(
    cfg: AliceConfig,
    link: LinkParams,
    grpc_listener: TcpListener,
    fibre_listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.data_dir).with_context(|| format!("creating data_dir {}", cfg.data_dir.display()))?;
    let store = Arc::new(SledStore::open(&cfg.data_dir.join("store")).context("opening the key store")?);
    let tls = cfg.tls.load().context("loading TLS material")?;
    let security = cfg.security.params(link.p_z).map_err(|e| anyhow::anyhow!("{e}"))?;
    let core = AliceCore::new(cfg.node_id.clone(), cfg.protocol.clone(), security.clone(), ChaCha20Rng::from_os_rng());
    let (core, core_thread) = CoreHandle::spawn(core, store.clone()).context("starting the core's thread")?;
    let status = Arc::new(Mutex::new(AliceStatus::default()));
    info!(
        node = %cfg.node_id,
        classical = %grpc_listener.local_addr()?,
        fibre = %fibre_listener.local_addr()?,
        health = ?cfg.health_listen,
        distance_km = link.distance_km,
        eps_qkd = security.eps_qkd,
        mu_max = security.mu_max,
        g2_max = security.g2_max,
        block_bits = cfg.protocol.block_bits,
        "alice started"
    );

    // Shutdown drains: the source stops at once, blocks in progress get up to 10 s to commit,
    // then the classical channel closes. A block is thus never left committed at one end only.
    let server_stop = CancellationToken::new();
    let drainer = {
        let (core, shutdown, server_stop) = (core.clone(), shutdown.clone(), server_stop.clone());
        async move {
            shutdown.cancelled().await;
            core.drain();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while core.blocks_in_progress().await > 0 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            server_stop.cancel();
        }
    };
    let peer_check = Arc::new(tls.peer_check().context("TLS configuration of the classical channel")?);
    let service = LinkService {
        core: core.clone(),
        peer_name: cfg.classical.peer_name.clone(),
        peer_check,
        status: status.clone(),
    };
    let incoming =
        tls.grpc_incoming(grpc_listener, "classical channel").context("TLS configuration of the classical channel")?;
    let grpc = tonic::transport::Server::builder()
        .add_service(LinkServer::new(service))
        .serve_with_incoming_shutdown(incoming, server_stop.cancelled_owned());

    let health = common::service::Health::default();
    let health_server = {
        let (addr, health, shutdown) = (cfg.health_listen, health.clone(), shutdown.clone());
        async move {
            if let Some(addr) = addr
                && let Err(e) = common::service::serve_health(addr, health, shutdown).await
            {
                warn!(error = %e, "health endpoint failed");
            }
        }
    };
    // The listeners are bound and the key store is open: tell the supervisor.
    health.set_ready(true);
    common::service::notify_ready("emitting photons; serving the classical channel", shutdown.clone());
    let kme = {
        let (kme_cfg, tls, store, shutdown) = (cfg.kme.clone(), tls.clone(), store.clone(), shutdown.clone());
        async move {
            match kme_cfg {
                Some(kme_cfg) => {
                    let result =
                        qkd_kme::run_kme(&kme_cfg, qkd_kme::KmeSide::Alice, &tls, store, shutdown.clone()).await;
                    if let Err(e) = &result {
                        tracing::error!(error = %e, "key management entity failed; stopping");
                        shutdown.cancel();
                    }
                    result.context("key management entity")
                }
                None => Ok(()),
            }
        }
    };
    let emitter =
        emit_frames(fibre_listener, core.clone(), link, cfg.protocol.frame_pulses, status.clone(), shutdown.clone());
    let status_writer = common::status::write_periodically(cfg.data_dir.join("status.json"), status, shutdown.clone());

    let stopping = async {
        shutdown.cancelled().await;
        common::service::notify_stopping();
    };
    let (grpc_result, kme_result, (), (), (), (), ()) =
        tokio::join!(grpc, kme, emitter, status_writer, drainer, health_server, stopping);
    // The core's thread ends after the requests already queued; the store is then ours alone.
    core.stop();
    tokio::task::spawn_blocking(move || core_thread.join())
        .await
        .context("joining the core's thread")?
        .map_err(|_| anyhow::anyhow!("the core's thread panicked"))?;
    grpc_result.context("classical channel server")?;
    kme_result?;
    store.flush().context("flushing the key store")?;
    info!("alice stopped; key store flushed");
    Ok(())
}

/// What every RPC returns.
type RpcResult<T> = Result<tonic::Response<T>, Status>;

/// What the core's thread is asked to do.
enum Command {
    /// Record a frame's secret (the source, before the frame's photons leave).
    Frame { frame_idx: u64, secret: FrameSecret, n_pulses: u64, reading: SourceReading },
    /// Answer one of Bob's requests.
    Handle { request: Request, reply: oneshot::Sender<Result<(Response, Option<AliceEvent>), LinkError>> },
    /// Accept no new block (shutdown).
    Drain,
    /// Say how many blocks are in progress.
    BlocksInProgress { reply: oneshot::Sender<usize> },
    /// End the thread.
    Stop,
}

/// Alice's core on a thread of its own, reached through a channel. Answering Cascade, hashing
/// a block and writing it to the store with fsyncs take from milliseconds to seconds; on the
/// thread they hold neither an async worker nor a lock the source needs, so the source keeps
/// its clock. Frames and requests reach the core in the order they were sent: a frame is
/// registered before its photons leave, hence before Bob can ask to sift it.
#[derive(Clone)]
struct CoreHandle {
    commands: std::sync::mpsc::Sender<Command>,
}

impl CoreHandle {
    /// Moves `core` to a new thread that answers with `store`.
    fn spawn(core: AliceCore, store: Arc<SledStore>) -> std::io::Result<(Self, std::thread::JoinHandle<()>)> {
        let (commands, inbox) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new().name("alice-core".into()).spawn(move || {
            let mut core = core;
            for command in inbox {
                match command {
                    Command::Frame { frame_idx, secret, n_pulses, reading } => {
                        core.register_frame(frame_idx, secret, n_pulses, reading);
                    }
                    Command::Handle { request, reply } => {
                        let ctx = HandleContext { store: store.as_ref(), now_unix_ms: now_unix_ms() };
                        // Bob may have gone meanwhile: nobody to answer is not an error.
                        let _ = reply.send(core.handle(request, &ctx));
                    }
                    Command::Drain => core.drain(),
                    Command::BlocksInProgress { reply } => {
                        let _ = reply.send(core.blocks_in_progress());
                    }
                    Command::Stop => break,
                }
            }
        })?;
        Ok((Self { commands }, thread))
    }

    /// Registers a frame's secret; never waits.
    fn register_frame(&self, frame_idx: u64, secret: FrameSecret, n_pulses: u64, reading: SourceReading) {
        // After Stop nobody sifts any more: a frame then has nowhere to go, and needs none.
        let _ = self.commands.send(Command::Frame { frame_idx, secret, n_pulses, reading });
    }

    /// Answers `request` on the core's thread.
    async fn handle(&self, request: Request) -> Result<(Response, Option<AliceEvent>), Status> {
        let stopped = || Status::unavailable("alice is stopping");
        let (reply, answer) = oneshot::channel();
        self.commands.send(Command::Handle { request, reply }).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?.map_err(status_from_link_error)
    }

    /// Accepts no new block from now on.
    fn drain(&self) {
        let _ = self.commands.send(Command::Drain);
    }

    /// Blocks started and not yet committed or aborted (0 once the thread has stopped).
    async fn blocks_in_progress(&self) -> usize {
        let (reply, answer) = oneshot::channel();
        if self.commands.send(Command::BlocksInProgress { reply }).is_err() {
            return 0;
        }
        answer.await.unwrap_or(0)
    }

    /// Ends the thread once the commands already sent are done.
    fn stop(&self) {
        let _ = self.commands.send(Command::Stop);
    }
}

/// The gRPC service: checks the caller's certificate name, then hands each request to the core.
struct LinkService {
    core: CoreHandle,
    peer_name: String,
    peer_check: Arc<qkd_tls::verify::PeerCheck>,
    status: Arc<Mutex<AliceStatus>>,
}

impl LinkService {
    /// Refuses a caller whose (CA-verified) certificate is not valid for the configured peer name,
    /// or no longer passes the handshake's checks (revoked, expired, pins) since the connection
    /// was opened.
    fn authorize<T>(&self, request: &tonic::Request<T>) -> Result<(), Status> {
        let certs = request.peer_certs().ok_or_else(|| Status::unauthenticated("no client certificate"))?;
        let leaf = certs.first().ok_or_else(|| Status::unauthenticated("no client certificate"))?;
        if qkd_tls::peer_has_name(leaf, &self.peer_name) {
            self.peer_check
                .check(&certs)
                .map_err(|reason| Status::permission_denied(format!("client certificate {reason}")))
        } else {
            warn!(expected = %self.peer_name, "refused a classical-channel client whose certificate names another peer");
            Err(Status::permission_denied(format!("client certificate is not valid for {}", self.peer_name)))
        }
    }

    /// Every RPC: checks the caller, hands the request to the core, records what the core
    /// reports, and answers.
    async fn serve<Q, A>(&self, request: tonic::Request<Q>) -> RpcResult<A>
    where
        Q: Into<Request>,
        A: TryFrom<Response, Error = LinkError>,
    {
        self.authorize(&request)?;
        let (response, event) = self.core.handle(request.into_inner().into()).await?;
        self.record(event);
        Ok(tonic::Response::new(A::try_from(response).map_err(status_from_link_error)?))
    }

    fn record(&self, event: Option<AliceEvent>) {
        let Some(event) = event else { return };
        let mut status = self.status.lock().expect("status lock poisoned");
        match event {
            AliceEvent::SessionOpened { bob_id, session_id, settled_ready } => {
                info!(bob = %bob_id, session = %session_id, settled_ready, "session opened");
            }
            AliceEvent::Committed(meta, security) => {
                info!(
                    block = %meta.block_id,
                    security = %serde_json::to_string(&security).unwrap_or_default(),
                    sifted_bits = meta.n_sifted_bits,
                    qber_z = format_args!("{:.3}%", 100.0 * meta.qber_z),
                    qber_x = format_args!("{:.3}%", 100.0 * meta.qber_x),
                    phase_error_upper = format_args!("{:.3}%", 100.0 * meta.phase_error_upper),
                    leak_bits = meta.leak_bits,
                    final_bits = meta.final_bits,
                    "block committed: keys stored as ready"
                );
                status.blocks_committed += 1;
                status.keys_stored += meta.final_bits / 256;
                status.secret_bits += meta.final_bits;
            }
            AliceEvent::Aborted { block_id, abort, by_bob } => {
                warn!(
                    block = %block_id,
                    reason = %abort.reason,
                    detail = abort.detail(),
                    by_bob,
                    "block aborted: no key stored"
                );
                status.blocks_aborted += 1;
                status.last_abort_reason =
                    Some(if by_bob { format!("Bob aborted: {abort}") } else { abort.to_string() });
            }
        }
    }
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Each RPC is one call of [`LinkService::serve`].
#[tonic::async_trait]
impl Link for LinkService {
    async fn hello(&self, request: tonic::Request<HelloRequest>) -> RpcResult<HelloResponse> {
        self.serve(request).await
    }

    async fn sift(&self, request: tonic::Request<SiftRequest>) -> RpcResult<SiftResponse> {
        self.serve(request).await
    }

    async fn start_block(&self, request: tonic::Request<StartBlockRequest>) -> RpcResult<StartBlockResponse> {
        self.serve(request).await
    }

    async fn parities(&self, request: tonic::Request<ParityRequest>) -> RpcResult<ParityResponse> {
        self.serve(request).await
    }

    async fn syndromes(&self, request: tonic::Request<SyndromeRequest>) -> RpcResult<SyndromeResponse> {
        self.serve(request).await
    }

    async fn reveal(&self, request: tonic::Request<RevealRequest>) -> RpcResult<RevealResponse> {
        self.serve(request).await
    }

    async fn verify(&self, request: tonic::Request<VerifyRequest>) -> RpcResult<VerifyResponse> {
        self.serve(request).await
    }

    async fn amplify(&self, request: tonic::Request<AmplifyRequest>) -> RpcResult<AmplifyResponse> {
        self.serve(request).await
    }

    async fn commit(&self, request: tonic::Request<CommitRequest>) -> RpcResult<CommitResponse> {
        self.serve(request).await
    }

    async fn abort(&self, request: tonic::Request<AbortRequest>) -> RpcResult<AbortResponse> {
        self.serve(request).await
    }
}

/// How many frame periods the source may fall behind its clock and still make up for them by
/// emitting the late frames at once (a buffer of about 0.4 s at 76 MHz and 2^22 pulses a frame,
/// as a device's FIFO would hold): a scheduling hiccup of the host loses nothing. Beyond it, the
/// periods are skipped and counted as missed.
const CATCH_UP_PERIODS: u32 = 8;

/// The source: while a receiver is connected, emits one frame per frame period (wall clock),
/// registering each frame's secret with the core before its photons leave. Frames that are late
/// by up to [`CATCH_UP_PERIODS`] are emitted at once; periods further behind are not made up
/// for: they are counted in [`AliceStatus::frames_missed`] and logged.
async fn emit_frames(
    listener: TcpListener,
    core: CoreHandle,
    link: LinkParams,
    frame_pulses: u64,
    status: Arc<Mutex<AliceStatus>>,
    shutdown: CancellationToken,
) {
    let source = Source::new(&link);
    let mut rng = ChaCha20Rng::from_os_rng();
    let period = Duration::from_secs_f64(frame_pulses as f64 / link.clock_hz);
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut receiver: Option<TcpStream> = None;
    let mut frame_idx = 0u64;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, addr)) => {
                    let _ = stream.set_nodelay(true);
                    if receiver.replace(stream).is_some() {
                        info!(%addr, "fibre: a new receiver replaced the previous one");
                    } else {
                        info!(%addr, "fibre: receiver connected; emitting frames");
                    }
                    status.lock().expect("status lock poisoned").fibre_connected = true;
                }
                Err(e) => warn!(error = %e, "fibre: accept failed"),
            },
            tick = ticker.tick() => {
                // Burst: a late tick comes at once, stamped with its scheduled time.
                let behind = tick.elapsed();
                let skipped = if behind > period * CATCH_UP_PERIODS {
                    ticker.reset();
                    (behind.as_secs_f64() / period.as_secs_f64()) as u64
                } else {
                    0
                };
                let Some(stream) = receiver.as_mut() else { continue };
                if skipped > 0 {
                    let mut status = status.lock().expect("status lock poisoned");
                    status.frames_missed += skipped;
                    warn!(skipped, total = status.frames_missed, "fibre: the source fell behind its clock; frame periods skipped");
                }
                let secret = FrameSecret::random(&mut rng);
                let photons = source.emit_frame(&secret, frame_pulses, &mut rng);
                let frame = encode_frame(frame_idx, frame_pulses, &photons);
                let reading = source.monitor_reading(&mut rng);
                core.register_frame(frame_idx, secret, frame_pulses, reading);
                frame_idx += 1;
                let sent = tokio::time::timeout(Duration::from_secs(2), write_frame(stream, &frame)).await;
                let mut status = status.lock().expect("status lock poisoned");
                match sent {
                    Ok(Ok(())) => {
                        status.frames_emitted += 1;
                        status.photons_sent += photons.len() as u64;
                    }
                    Ok(Err(e)) => {
                        // Bob closing the fibre is routine (he stops or restarts and reconnects);
                        // the classical channel reports a link that stays down.
                        info!(reason = %e, "fibre: receiver disconnected; waiting for it to reconnect");
                        receiver = None;
                        status.fibre_connected = false;
                    }
                    Err(_) => {
                        warn!("fibre: receiver stalled for 2 s; dropping it");
                        receiver = None;
                        status.fibre_connected = false;
                    }
                }
            }
        }
    }
}
