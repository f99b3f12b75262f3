//! Alice's daemon: the source (a device through `qkd_device`, by default the in-process
//! simulator on the simulated fibre) and the server of the classical channel. `main.rs` only parses flags and wires; [`run`] takes bound listeners and a shutdown
//! token, so tests bind port 0 and stop it themselves.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use common::config::AliceConfig;
use common::fibre::{encode_frame, write_frame};
use common::grpc::status_from_link_error;
use proto::link::link_server::{Link, LinkServer};
use proto::link::*;
use qkd_core::link::abort::AbortReason;
use qkd_core::link::alice::{AliceCore, AliceEvent, PreparedFrame};
use qkd_core::link::{HandleContext, LinkError, Request, Response};
use qkd_device::sim::SimTransmitter;
use qkd_device::{AnyTransmitter, TransmitterDevice, TxEvent};
use qkd_sim::LinkParams;
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
    /// Key units (of `key_unit_bits`) stored by committed blocks, the authentication refill not
    /// counted.
    pub keys_stored: u64,
    /// Secret bits stored.
    pub secret_bits: u64,
    /// The last abort reason, if any.
    pub last_abort_reason: Option<String>,
    /// Set while the key store is out of service (a full or failing disk): why. Alice is then
    /// unready and retries the reopen every second.
    pub store_failure: Option<String>,
    /// Set while no key can be distilled for want of authentication key (the pool is exhausted,
    /// or the two pools differ): what to do. Cleared by the next committed block.
    pub auth_alarm: Option<String>,
    /// The quantum device, as it describes itself.
    pub device: String,
    /// Whether the quantum channel is simulated (keys marked simulated in the store).
    pub simulated: bool,
    /// Frames the device reported lost (their states never reached the daemon).
    pub frames_lost: u64,
    /// The last device error, if any.
    pub device_error: Option<String>,
    /// Frame periods in which the source emitted nothing although a receiver was connected: the
    /// emitter fell behind the clock (a stalled worker, a fibre write that took too long). 0 in
    /// a healthy run; each skip is logged at warn.
    pub frames_missed: u64,
    /// Sifted key bits of the committed blocks.
    pub sifted_bits: u64,
    /// Bits disclosed by error correction and verification in committed blocks.
    pub leak_bits: u64,
    /// Key units dropped at `Hello` because the peer's store did not hold them (see
    /// `qkd_core::link::reagree`).
    pub units_dropped_at_hello: u64,
    /// KME reservations erased at `Hello` because the two stores differed.
    pub reservations_dropped_at_hello: u64,
    /// The last committed block's statistics.
    pub last_block: Option<BlockStats>,
    /// The last block aborted and its reason's label (not in the status file).
    #[serde(skip)]
    pub last_aborted: Option<(String, String)>,
    /// Blocks aborted, by reason (snake case, as the metrics label them).
    pub aborted_by_reason: std::collections::BTreeMap<String, u64>,
    /// Unused bits of the authentication key pool (at start, then after each committed block).
    pub auth_pool_bits: Option<u64>,
    /// When Bob last called the classical channel, Unix ms.
    pub last_peer_request_unix_ms: Option<u64>,
    /// The source monitor's latest reading (mean photon number, g2(0)), if the source has one.
    pub source_reading: Option<(f64, f64)>,
}

/// A committed block's statistics, as Alice's status keeps the last one.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct BlockStats {
    /// Key-basis QBER.
    pub qber_z: f64,
    /// Test-basis QBER.
    pub qber_x: f64,
    /// Upper bound on the phase error.
    pub phase_error_upper: f64,
    /// Bits disclosed by error correction and verification.
    pub leak_bits: u64,
    /// Final key bits (authentication refill included).
    pub final_bits: u64,
    /// Sifted key bits.
    pub sifted_bits: u64,
}

/// Bob counts as linked while he called within this time.
const LINKED_WITHIN_MS: u64 = 10_000;

impl AliceStatus {
    /// The status as the telemetry reads it.
    pub fn snapshot(&self) -> common::telemetry::NodeSnapshot {
        let link_up =
            self.last_peer_request_unix_ms.is_some_and(|t| now_unix_ms().saturating_sub(t) <= LINKED_WITHIN_MS);
        let state = if self.device_error.is_some() {
            "device failed"
        } else if link_up {
            "linked"
        } else {
            "waiting for Bob"
        };
        let last = self.last_block.as_ref();
        common::telemetry::NodeSnapshot {
            state: state.into(),
            link_up,
            qber_z: last.map(|b| b.qber_z),
            qber_x: last.map(|b| b.qber_x),
            phase_error_upper: last.map(|b| b.phase_error_upper),
            reconciliation_efficiency: last
                .and_then(|b| common::telemetry::reconciliation_efficiency(b.leak_bits, b.sifted_bits, b.qber_z)),
            detections: None,
            sifted_bits: self.sifted_bits,
            secret_bits: self.secret_bits,
            leak_bits: self.leak_bits,
            blocks_committed: self.blocks_committed,
            blocks_aborted: self.aborted_by_reason.clone(),
            frames: self.frames_emitted,
            frames_dropped: self.frames_lost,
            frames_missed: Some(self.frames_missed),
            sessions: None,
            phase_offset_rad: None,
            auth_pool_bits: self.auth_pool_bits,
            units_dropped_at_hello: self.units_dropped_at_hello,
            reservations_dropped_at_hello: self.reservations_dropped_at_hello,
            device: common::telemetry::DeviceReadings {
                source_mu: self.source_reading.map(|r| r.0),
                source_g2: self.source_reading.map(|r| r.1),
                ..Default::default()
            },
        }
    }
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
    let fibre = match cfg.device.driver {
        common::config::DeviceDriver::Sim => Some(
            TcpListener::bind(cfg.fibre.listen)
                .await
                .with_context(|| format!("binding fibre.listen {}", cfg.fibre.listen))?,
        ),
        _ => None,
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(common::shutdown_on_signal(shutdown.clone()));
    run(cfg, link, grpc, fibre, shutdown).await
}

/// Runs Alice until `shutdown` is cancelled. `fibre_listener` is the simulated fibre's, for
/// `device.driver = "sim"` (required then, unused otherwise).
pub async fn run(
    cfg: AliceConfig,
    link: LinkParams,
    grpc_listener: TcpListener,
    fibre_listener: Option<TcpListener>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    common::service::private_dir(&cfg.data_dir)
        .with_context(|| format!("creating data_dir {} (mode 0700)", cfg.data_dir.display()))?;
    // The key-encryption key first: a missing, unreadable or wrong one stops the daemon before
    // its store (and so its KME) is used; a wrong one leaves the store untouched.
    let kek = cfg.store.load_kek().context("loading the key store's key-encryption key ([store])")?;
    let store = Arc::new(SledStore::open(&cfg.data_dir.join("store"), &kek).context("opening the key store")?);
    // A store restored from an older copy may hold reservations fetched since: none is served
    // before the first Hello has re-agreed the store with the peer's.
    store.hold_reservations_until_reagreed();
    drop(kek);
    let tls = cfg.tls.load().context("loading TLS material")?;
    let security = cfg.security.params(link.p_z).map_err(|e| anyhow::anyhow!("{e}"))?;
    let device = common::device::open_transmitter(&cfg.device, &link, cfg.protocol.frame_pulses).await?;
    let simulated = device.info().simulated();
    let auth = common::auth_pool::open_node_pool(&cfg.data_dir)?;
    let mut core =
        AliceCore::new(cfg.node_id.clone(), cfg.protocol.clone(), security.clone(), ChaCha20Rng::from_os_rng(), auth);
    core.set_simulated(simulated);
    let auth_pool_bits = core.auth_pool_bits().ok();
    let (core, core_thread) = CoreHandle::spawn(core, store.clone()).context("starting the core's thread")?;
    let status = Arc::new(Mutex::new(AliceStatus {
        device: device.info().summary(),
        simulated,
        auth_pool_bits,
        ..AliceStatus::default()
    }));
    let unit = common::telemetry::UnitSize {
        unit_bits: u64::from(cfg.protocol.key_unit_bits),
        auth_refill_bits: cfg.protocol.auth_refill_bits,
    };
    let telemetry = {
        let status = status.clone();
        common::telemetry::Telemetry::new(
            &cfg.node_id,
            "alice",
            move || status.lock().expect("status lock poisoned").snapshot(),
            store.clone(),
            unit,
            None,
        )
    };
    let fibre_addr = fibre_listener.as_ref().map(TcpListener::local_addr).transpose()?;
    if simulated {
        warn!(
            device = %device.info().summary(),
            "the quantum channel is SIMULATED: its keys are not secret from whoever runs the simulation; they are \
             stored marked simulated, and a KME serves them only with kme.allow_simulated_keys = true"
        );
    }
    info!(
        node = %cfg.node_id,
        classical = %grpc_listener.local_addr()?,
        fibre = ?fibre_addr,
        device = %device.info().summary(),
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
        unit,
    };
    let incoming =
        tls.grpc_incoming(grpc_listener, "classical channel").context("TLS configuration of the classical channel")?;
    let grpc = tonic::transport::Server::builder()
        .add_service(
            LinkServer::new(service)
                .max_decoding_message_size(qkd_core::link::reagree::MAX_LINK_MESSAGE_BYTES)
                .max_encoding_message_size(qkd_core::link::reagree::MAX_LINK_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(incoming, server_stop.cancelled_owned());

    let health = common::service::Health::default();
    let health_listener = match cfg.health_listen {
        Some(addr) => Some(common::service::bind_health(addr).await?),
        None => None,
    };
    let health_server = {
        let (health, shutdown) = (health.clone(), shutdown.clone());
        let telemetry = telemetry.clone();
        async move {
            if let Some(listener) = health_listener
                && let Err(e) = common::service::serve_health(listener, health, Some(telemetry), shutdown).await
            {
                warn!(error = %e, "health endpoint failed");
            }
        }
    };
    // The listeners are bound and the key store is open: tell the supervisor.
    health.set_ready(true);
    common::service::notify_ready("emitting photons; serving the classical channel", shutdown.clone());
    let kme = {
        let mut kme_cfg = cfg.kme.clone();
        if let Some(kme_cfg) = &mut kme_cfg {
            kme_cfg.audit_log.get_or_insert_with(|| cfg.data_dir.join("delivery-audit.jsonl"));
        }
        let (tls, store, shutdown) = (tls.clone(), store.clone(), shutdown.clone());
        let recorder = telemetry.recorder();
        async move {
            match kme_cfg {
                Some(kme_cfg) => {
                    let result = qkd_kme::run_kme(
                        &kme_cfg,
                        qkd_kme::KmeSide::Alice,
                        &tls,
                        store,
                        simulated,
                        Some(recorder),
                        shutdown.clone(),
                    )
                    .await;
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
    let emitter = {
        let (core, status, shutdown) = (core.clone(), status.clone(), shutdown.clone());
        async move {
            match (device, fibre_listener) {
                (AnyTransmitter::Sim(sim), Some(fibre)) => emit_frames(fibre, core, sim, link, status, shutdown).await,
                (AnyTransmitter::Sim(_), None) => {
                    tracing::error!("the simulated source needs the fibre's listener; stopping");
                    shutdown.cancel();
                }
                (device, _) => run_transmitter(device, core, status, shutdown).await,
            }
        }
    };
    let status_writer =
        common::status::write_periodically(cfg.data_dir.join("status.json"), status.clone(), shutdown.clone());
    // The key store's health, once a second: out of service (a full or failing disk) makes Alice
    // unready and says why in her status and to systemd; she tries the reopen herself.
    let store_watch = {
        let (store, status, health, shutdown) = (store.clone(), status.clone(), health.clone(), shutdown.clone());
        async move {
            let mut ticker = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    _ = ticker.tick() => {}
                }
                let failure = if store.is_healthy() {
                    None
                } else {
                    let store = store.clone();
                    match tokio::task::spawn_blocking(move || store.reopen_if_failed()).await {
                        Ok(Ok(_)) => None,
                        Ok(Err(e)) => Some(format!("{e:#}")),
                        Err(e) => Some(format!("reopening the key store: {e}")),
                    }
                };
                let previous =
                    std::mem::replace(&mut status.lock().expect("status lock poisoned").store_failure, failure.clone());
                match (previous, failure) {
                    (None, Some(failure)) => {
                        warn!(error = %failure, "key store out of service; no block until it is back");
                        common::service::notify_status(&format!("key store out of service: {failure}"));
                        health.set_ready(false);
                    }
                    (Some(_), None) => {
                        info!("key store back in service");
                        common::service::notify_status("emitting photons; serving the classical channel");
                        health.set_ready(true);
                    }
                    _ => {}
                }
            }
        }
    };

    let stopping = async {
        shutdown.cancelled().await;
        common::service::notify_stopping();
    };
    let (grpc_result, kme_result, (), (), (), (), (), ()) =
        tokio::join!(grpc, kme, emitter, status_writer, drainer, health_server, store_watch, stopping);
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
    // A failed device stopped the daemon: exit with the error, so that the supervisor says so.
    match status.lock().expect("status lock poisoned").device_error.take() {
        Some(e) => Err(anyhow::anyhow!("the transmitter device failed: {e}")),
        None => Ok(()),
    }
}

/// What every RPC returns.
type RpcResult<T> = Result<tonic::Response<T>, Status>;

/// Where the core's answer to a request goes.
type Reply = oneshot::Sender<Result<(Response, Option<AliceEvent>), LinkError>>;

/// How long a sift request for a frame the source has not reported yet waits for it.
const FRAME_WAIT: Duration = Duration::from_secs(2);

/// What the core's thread is asked to do.
enum Command {
    /// Record a frame's states (the source, before the frame's photons leave).
    Frame { frame_idx: u64, frame: PreparedFrame },
    /// The source lost these frames.
    Lost { first: u64, count: u64 },
    /// Answer one of Bob's requests.
    Handle { request: Request, reply: Reply },
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
    ///
    /// A sift request for a frame newer than any the source has reported waits on the thread
    /// (up to [`FRAME_WAIT`]) for that frame: with two device streams (a transmitter and a
    /// receiver process, or two replays) Bob's detections of a frame can arrive before Alice's
    /// states of it. Past the wait, the frame is answered "unavailable" and dropped at both ends.
    fn spawn(core: AliceCore, store: Arc<SledStore>) -> std::io::Result<(Self, std::thread::JoinHandle<()>)> {
        use std::sync::mpsc::RecvTimeoutError;
        let (commands, inbox) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new().name("alice-core".into()).spawn(move || {
            let mut core = core;
            // Requests waiting for their frame, with their deadlines (Bob sends one at a time).
            let mut waiting: Vec<(std::time::Instant, Request, Reply)> = Vec::new();
            let answer = |core: &mut AliceCore, request: Request, reply: Reply| {
                let ctx = HandleContext { store: store.as_ref(), now_unix_ms: now_unix_ms() };
                // Bob may have gone meanwhile: nobody to answer is not an error.
                let _ = reply.send(core.handle(request, &ctx));
            };
            loop {
                let next = match waiting.iter().map(|(deadline, ..)| *deadline).min() {
                    None => inbox.recv().map_err(|_| RecvTimeoutError::Disconnected),
                    Some(deadline) => inbox.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now())),
                };
                match next {
                    Ok(Command::Frame { frame_idx, frame }) => core.register_frame(frame_idx, frame),
                    Ok(Command::Lost { first, count }) => core.frames_lost(first, count),
                    Ok(Command::Handle { request, reply }) => match &request {
                        Request::Sift(req) if !req.dropped && core.awaits_frame(req.frame_idx) => {
                            waiting.push((std::time::Instant::now() + FRAME_WAIT, request, reply));
                        }
                        _ => answer(&mut core, request, reply),
                    },
                    Ok(Command::Drain) => core.drain(),
                    Ok(Command::BlocksInProgress { reply }) => {
                        let _ = reply.send(core.blocks_in_progress());
                    }
                    Ok(Command::Stop) | Err(RecvTimeoutError::Disconnected) => break,
                    Err(RecvTimeoutError::Timeout) => {}
                }
                // Answer what no longer waits: its frame came (or was lost), or time ran out.
                let now = std::time::Instant::now();
                let mut i = 0;
                while i < waiting.len() {
                    let ready = match &waiting[i].1 {
                        Request::Sift(req) => !core.awaits_frame(req.frame_idx),
                        _ => true,
                    };
                    if ready || waiting[i].0 <= now {
                        let (_, request, reply) = waiting.swap_remove(i);
                        answer(&mut core, request, reply);
                    } else {
                        i += 1;
                    }
                }
            }
        })?;
        Ok((Self { commands }, thread))
    }

    /// Registers a frame's states; never waits.
    fn register_frame(&self, frame_idx: u64, frame: PreparedFrame) {
        // After Stop nobody sifts any more: a frame then has nowhere to go, and needs none.
        let _ = self.commands.send(Command::Frame { frame_idx, frame });
    }

    /// Notes frames the source lost; never waits.
    fn frames_lost(&self, first: u64, count: u64) {
        let _ = self.commands.send(Command::Lost { first, count });
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
    /// What a key unit is, to count the units of a committed block.
    unit: common::telemetry::UnitSize,
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
        self.status.lock().expect("status lock poisoned").last_peer_request_unix_ms = Some(now_unix_ms());
        let (response, event) = self.core.handle(request.into_inner().into()).await?;
        self.record(event);
        Ok(tonic::Response::new(A::try_from(response).map_err(status_from_link_error)?))
    }

    fn record(&self, event: Option<AliceEvent>) {
        let Some(event) = event else { return };
        let mut status = self.status.lock().expect("status lock poisoned");
        match event {
            AliceEvent::SessionOpened { bob_id, session_id, settled_ready, reagreement } => {
                info!(bob = %bob_id, session = %session_id, settled_ready, "session opened");
                status.units_dropped_at_hello += reagreement.units_dropped;
                status.reservations_dropped_at_hello += reagreement.reservations_dropped;
            }
            AliceEvent::Committed(meta, security, auth) => {
                info!(
                    block = %meta.block_id,
                    security = %serde_json::to_string(&security).unwrap_or_default(),
                    auth = %serde_json::to_string(&auth).unwrap_or_default(),
                    sifted_bits = meta.n_sifted_bits,
                    qber_z = format_args!("{:.3}%", 100.0 * meta.qber_z),
                    qber_x = format_args!("{:.3}%", 100.0 * meta.qber_x),
                    phase_error_upper = format_args!("{:.3}%", 100.0 * meta.phase_error_upper),
                    leak_bits = meta.leak_bits,
                    final_bits = meta.final_bits,
                    "block committed: keys stored as ready"
                );
                status.auth_alarm = None;
                status.blocks_committed += 1;
                status.keys_stored +=
                    meta.final_bits.saturating_sub(self.unit.auth_refill_bits) / self.unit.unit_bits.max(1);
                status.secret_bits += meta.final_bits;
                status.sifted_bits += meta.n_sifted_bits;
                status.leak_bits += meta.leak_bits;
                status.auth_pool_bits = Some(auth.pool_bits);
                status.last_block = Some(BlockStats {
                    qber_z: meta.qber_z,
                    qber_x: meta.qber_x,
                    phase_error_upper: meta.phase_error_upper,
                    leak_bits: meta.leak_bits,
                    final_bits: meta.final_bits,
                    sifted_bits: meta.n_sifted_bits,
                });
            }
            AliceEvent::Aborted { block_id, abort, by_bob } => {
                warn!(
                    block = %block_id,
                    reason = %abort.reason,
                    detail = abort.detail(),
                    by_bob,
                    "block aborted: no key stored"
                );
                if matches!(abort.reason, AbortReason::AuthPoolExhausted | AbortReason::AuthPoolsDiffer) {
                    status.auth_alarm = Some(abort.to_string());
                }
                let label = common::telemetry::reason_label(&abort.reason);
                match status.last_aborted.take() {
                    // The same block again: Bob found Alice's abort answer altered (its tag does not
                    // match), so its reason becomes his; counted once.
                    Some((id, previous)) if id == block_id.to_string() => {
                        if let Some(count) = status.aborted_by_reason.get_mut(&previous) {
                            *count = count.saturating_sub(1);
                        }
                    }
                    _ => status.blocks_aborted += 1,
                }
                *status.aborted_by_reason.entry(label.clone()).or_default() += 1;
                status.last_aborted = Some((block_id.to_string(), label));
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

/// The simulated source: while a receiver is connected to the simulated fibre, emits one frame
/// per frame period (wall clock), registering each frame's states with the core before its
/// photons leave. Frames that are late by up to [`CATCH_UP_PERIODS`] are emitted at once;
/// periods further behind are not made up for: they are counted in
/// [`AliceStatus::frames_missed`] and logged.
async fn emit_frames(
    listener: TcpListener,
    core: CoreHandle,
    mut source: SimTransmitter,
    link: LinkParams,
    status: Arc<Mutex<AliceStatus>>,
    shutdown: CancellationToken,
) {
    let frame_pulses = source.info().frame_pulses();
    let period = Duration::from_secs_f64(frame_pulses as f64 / link.clock_hz);
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut receiver: Option<TcpStream> = None;
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
                let (frame, photons) = source.emit();
                let wire = encode_frame(photons.index, photons.n_pulses, &photons.photons);
                let n_photons = photons.photons.len() as u64;
                if let Some(r) = &frame.reading {
                    status.lock().expect("status lock poisoned").source_reading = Some((r.mu, r.g2));
                }
                core.register_frame(
                    frame.index,
                    PreparedFrame { n_pulses: frame.n_pulses, states: frame.states, reading: frame.reading },
                );
                let sent = tokio::time::timeout(Duration::from_secs(2), write_frame(stream, &wire)).await;
                let mut status = status.lock().expect("status lock poisoned");
                match sent {
                    Ok(Ok(())) => {
                        status.frames_emitted += 1;
                        status.photons_sent += n_photons;
                    }
                    Ok(Err(e)) => {
                        // Bob closing the fibre is routine (he stops or restarts and reconnects);
                        // the classical channel reports a link that stays down. The OS's words for
                        // a closed socket ("Broken pipe") read like a failure: said plainly.
                        let closed = matches!(
                            &e,
                            common::fibre::FibreError::Io(io) if matches!(
                                io.kind(),
                                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                            )
                        );
                        if closed {
                            info!("fibre: the receiver closed the fibre; waiting for it to reconnect");
                        } else {
                            info!(reason = %e, "fibre: receiver disconnected; waiting for it to reconnect");
                        }
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

/// A device source (a device process, a replay): registers each frame's states with the core
/// as the device reports them, and the frames it lost. A device error stops the daemon (the
/// supervisor restarts it, and the session with Bob resumes); the end of a replay leaves the
/// link idle until shutdown.
async fn run_transmitter(
    mut device: AnyTransmitter,
    core: CoreHandle,
    status: Arc<Mutex<AliceStatus>>,
    shutdown: CancellationToken,
) {
    // A device process's stream ends only when the device stops: a failure. A recording ends.
    let live = matches!(device, AnyTransmitter::Grpc(_));
    loop {
        let event = tokio::select! {
            () = shutdown.cancelled() => return,
            event = device.next_event() => event,
        };
        match event {
            Ok(Some(TxEvent::Frame(frame))) => {
                if let Some(r) = &frame.reading {
                    status.lock().expect("status lock poisoned").source_reading = Some((r.mu, r.g2));
                }
                core.register_frame(
                    frame.index,
                    PreparedFrame { n_pulses: frame.n_pulses, states: frame.states, reading: frame.reading },
                );
                status.lock().expect("status lock poisoned").frames_emitted += 1;
            }
            Ok(Some(TxEvent::Lost { first, count, reason })) => {
                warn!(first, count, %reason, "device: frames lost; Bob's detections of them are dropped");
                core.frames_lost(first, count);
                status.lock().expect("status lock poisoned").frames_lost += count;
            }
            Ok(None) if !live => {
                info!("device: the frame stream ended (end of the recording); no more frames");
                shutdown.cancelled().await;
                return;
            }
            failed => {
                let e =
                    failed.err().map_or_else(|| "the device closed its frame stream".to_string(), |e| e.to_string());
                tracing::error!(error = %e, "device: the transmitter failed; stopping");
                status.lock().expect("status lock poisoned").device_error = Some(e);
                shutdown.cancel();
                return;
            }
        }
    }
}
