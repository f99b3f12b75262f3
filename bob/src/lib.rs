//! Bob's daemon: the receiver on the simulated fibre and the driver of the classical channel.
//! `main.rs` only parses flags and wires; [`run`] takes a shutdown token.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, anyhow};
use common::config::BobConfig;
use common::fibre::{decode_frame, read_frame};
use common::grpc::link_error_from_status;
use proto::link::link_client::LinkClient;
use qkd_core::link::bob::{BlockReport, BobLink, LinkCounters, LinkPeer};
use qkd_core::link::{LinkError, Request, Response};
use qkd_sim::{LinkParams, Receiver};
use qkd_store::SledStore;
use qkd_tls::TlsMaterial;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use tracing::{info, warn};

/// Bob's status, written to `status.json` in the data directory every second.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct BobStatus {
    /// True while a session with Alice is open.
    pub connected: bool,
    /// Sessions opened since start.
    pub sessions: u64,
    /// Counters of all sessions since start.
    pub total: LinkCounters,
    /// Sifted bits waiting for the next block.
    pub pending_bits: u64,
    /// The last block's outcome.
    pub last_block: Option<BlockReport>,
    /// Current uncorrected phase offset of the decoder, radians.
    pub phase_error_rad: f64,
    /// Why the link last went down.
    pub last_error: Option<String>,
}

/// Loads `config` (with `data_dir` overriding its data directory) and runs until SIGINT or
/// SIGTERM.
pub async fn run_from_config(config: &std::path::Path, data_dir: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    let (mut cfg, link) = BobConfig::load(config)?;
    if let Some(dir) = data_dir {
        cfg.data_dir = dir;
    }
    let shutdown = CancellationToken::new();
    tokio::spawn(common::shutdown_on_signal(shutdown.clone()));
    run(cfg, link, shutdown).await
}

/// Runs Bob until `shutdown` is cancelled, reconnecting with back-off whenever Alice (or the
/// fibre) goes away.
pub async fn run(cfg: BobConfig, link: LinkParams, shutdown: CancellationToken) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.data_dir).with_context(|| format!("creating data_dir {}", cfg.data_dir.display()))?;
    let store = Arc::new(SledStore::open(&cfg.data_dir.join("store")).context("opening the key store")?);
    let tls = cfg.tls.load().context("loading TLS material")?;
    let status = Arc::new(Mutex::new(BobStatus::default()));
    let status_writer = tokio::spawn(common::status::write_periodically(
        cfg.data_dir.join("status.json"),
        status.clone(),
        shutdown.clone(),
    ));
    let health = common::service::Health::default();
    if let Some(addr) = cfg.health_listen {
        let (health, shutdown) = (health.clone(), shutdown.clone());
        tokio::spawn(async move {
            if let Err(e) = common::service::serve_health(addr, health, shutdown).await {
                warn!(error = %e, "health endpoint failed");
            }
        });
    }
    common::service::notify_ready("receiving; connecting to Alice", shutdown.clone());
    let kme = cfg.kme.clone().map(|kme_cfg| {
        let (tls, store, shutdown) = (tls.clone(), store.clone(), shutdown.clone());
        tokio::spawn(async move {
            let result = qkd_kme::run_kme(&kme_cfg, qkd_kme::KmeSide::Bob, &tls, store, shutdown.clone()).await;
            if let Err(e) = &result {
                tracing::error!(error = %e, "key management entity failed; stopping");
                shutdown.cancel();
            }
            result
        })
    });
    let mut receiver = Receiver::new(&link);
    let mut rng = ChaCha20Rng::from_os_rng();
    info!(node = %cfg.node_id, alice = %cfg.classical.alice_addr, fibre = %cfg.fibre.alice_addr, "bob started");

    let min_backoff = Duration::from_millis(100);
    let mut backoff = min_backoff;
    while !shutdown.is_cancelled() {
        let started = std::time::Instant::now();
        let result =
            session(&cfg, &link, store.as_ref(), &tls, &status, &health, &mut receiver, &mut rng, &shutdown).await;
        status.lock().expect("status lock poisoned").connected = false;
        health.set_ready(false);
        match result {
            Ok(()) => break,
            // Shutting down: the session ended because this end is stopping, not a failure.
            Err(e) if shutdown.is_cancelled() => {
                info!(reason = %format!("{e:#}"), "session closed for shutdown");
                break;
            }
            Err(e) => {
                if started.elapsed() > Duration::from_secs(10) {
                    backoff = min_backoff;
                }
                warn!(error = %format!("{e:#}"), retry_in_ms = backoff.as_millis() as u64, "link down; reconnecting");
                status.lock().expect("status lock poisoned").last_error = Some(format!("{e:#}"));
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs_f64(cfg.classical.max_backoff_s));
            }
        }
    }
    common::service::notify_stopping();
    if let Some(kme) = kme {
        kme.await.context("key management entity task")?.context("key management entity")?;
    }
    store.flush().context("flushing the key store")?;
    let _ = status_writer.await;
    info!("bob stopped; key store flushed");
    Ok(())
}

/// One session: connect both channels, settle pending blocks, then sift frames and process
/// blocks until an error or shutdown.
#[allow(clippy::too_many_arguments)]
async fn session(
    cfg: &BobConfig,
    link: &LinkParams,
    store: &SledStore,
    tls: &TlsMaterial,
    status: &Mutex<BobStatus>,
    health: &common::service::Health,
    receiver: &mut Receiver,
    rng: &mut ChaCha20Rng,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let security = cfg.security.params(link.p_z).map_err(|e| anyhow::anyhow!("{e}"))?;
    let connector =
        tls.grpc_connector(&cfg.classical.alice_name).context("TLS configuration of the classical channel")?;
    let endpoint = Endpoint::from_shared(format!("http://{}", cfg.classical.alice_addr))
        .context("classical.alice_addr")?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5));
    let channel = endpoint
        .connect_with_connector(connector)
        .await
        .with_context(|| format!("connecting to Alice at {}", cfg.classical.alice_addr))?;
    let fibre = tokio::net::TcpStream::connect(&cfg.fibre.alice_addr)
        .await
        .with_context(|| format!("connecting the fibre to {}", cfg.fibre.alice_addr))?;
    let _ = fibre.set_nodelay(true);
    let peer = GrpcPeer { client: LinkClient::new(channel) };
    let (mut bob, (ready, dropped)) =
        off_the_workers(BobLink::open(peer, &cfg.node_id, cfg.protocol.clone(), security.clone(), store)).await?;
    bob.set_max_stored_units(cfg.max_stored_units);
    bob.set_side_slot_monitor(link.side_slot_calibration());
    info!(settled_ready = ready, settled_dropped = dropped, "session opened with Alice");
    {
        let mut s = status.lock().expect("status lock poisoned");
        s.connected = true;
        s.sessions += 1;
        s.last_error = None;
    }
    health.set_ready(true);

    // The fibre is read by its own task so that frames keep arriving (and queue) while a block
    // is post-processed.
    let (frames_tx, mut frames_rx) = mpsc::channel(4096);
    let reader_stop = shutdown.child_token();
    let reader = tokio::spawn({
        let stop = reader_stop.clone();
        async move {
            let mut fibre = fibre;
            loop {
                let frame = tokio::select! {
                    () = stop.cancelled() => return,
                    frame = read_frame(&mut fibre) => frame,
                };
                let done = !matches!(frame, Ok(Some(_)));
                if frames_tx.send(frame).await.is_err() || done {
                    return;
                }
            }
        }
    });
    let _stop_reader = reader_stop.clone().drop_guard();

    let mut last = bob.counters.clone();
    let result = loop {
        let frame = tokio::select! {
            () = shutdown.cancelled() => break Ok(()),
            frame = frames_rx.recv() => frame,
        };
        let frame = match frame {
            Some(Ok(Some(frame))) => frame,
            Some(Ok(None)) | None => break Err(anyhow!("the fibre was closed by the far end")),
            Some(Err(e)) => break Err(anyhow!(e).context("fibre")),
        };
        let photons = match decode_frame(&frame) {
            Ok(p) => p,
            Err(e) => break Err(anyhow!(e).context("fibre")),
        };
        let detections = receiver.detect_frame(&photons, frame.n_pulses, rng);
        bob.add_x_slot_counts(&receiver.x_slot_counts());
        let x_counts = match bob.sift_frame(frame.frame_idx, frame.n_pulses, &detections).await {
            Ok(c) => c,
            Err(e) => break Err(anyhow!(e).context("sifting")),
        };
        receiver.feedback(x_counts.plus_plus + x_counts.plus_minus, x_counts.plus_minus);
        let mut report = None;
        if bob.block_ready() {
            match off_the_workers(bob.process_block(store, now_unix_ms())).await {
                Ok(r) => report = Some(r),
                Err(e) => break Err(anyhow!(e).context("block post-processing")),
            }
        }
        if let Some(report) = &report {
            log_block(report);
        }
        let mut s = status.lock().expect("status lock poisoned");
        add_counters(&mut s.total, &bob.counters, &last);
        last = bob.counters.clone();
        s.pending_bits = bob.pending_bits();
        s.phase_error_rad = receiver.phase_error_rad();
        if report.is_some() {
            s.last_block = report;
        }
    };
    reader_stop.cancel();
    let _ = reader.await;
    result
}

/// Runs `future` (a block's post-processing, or the settling of pending blocks) without holding
/// an async worker: error correction, hashing and the store's fsyncs take from milliseconds to
/// seconds of CPU and disk, during which this worker's other tasks (the fibre reader, and
/// Alice's when both run in one process) move to another worker. On a current-thread runtime,
/// where there is no other worker, it is simply awaited.
async fn off_the_workers<F: Future>(future: F) -> F::Output {
    let runtime = tokio::runtime::Handle::current();
    if runtime.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread {
        tokio::task::block_in_place(|| runtime.block_on(future))
    } else {
        future.await
    }
}

fn log_block(report: &BlockReport) {
    match &report.abort_reason {
        None => info!(
            block = %report.block_id,
            sifted_bits = report.n_bits,
            qber_z = format_args!("{:.3}%", 100.0 * report.qber_z),
            qber_x = format_args!("{:.3}%", 100.0 * report.qber_x),
            phase_error_upper = format_args!("{:.3}%", 100.0 * report.phase_error_upper),
            leak_bits = report.leak_bits,
            round_trips = report.round_trips,
            final_bits = report.final_bits,
            keys = report.n_keys,
            monitor_mu = report.monitor_mu,
            monitor_g2 = report.monitor_g2,
            security = %report.security.as_ref().map(|s| serde_json::to_string(s).unwrap_or_default()).unwrap_or_default(),
            "block committed: keys stored as ready"
        ),
        Some(abort) => warn!(
            block = %report.block_id,
            sifted_bits = report.n_bits,
            qber_z = format_args!("{:.3}%", 100.0 * report.qber_z),
            qber_x = format_args!("{:.3}%", 100.0 * report.qber_x),
            monitor_mu = report.monitor_mu,
            monitor_g2 = report.monitor_g2,
            reason = %abort.reason,
            detail = abort.detail(),
            "block aborted: no key stored"
        ),
    }
}

fn add_counters(total: &mut LinkCounters, now: &LinkCounters, before: &LinkCounters) {
    total.frames += now.frames - before.frames;
    total.detections += now.detections - before.detections;
    total.sifted_bits += now.sifted_bits - before.sifted_bits;
    total.blocks_committed += now.blocks_committed - before.blocks_committed;
    total.blocks_aborted += now.blocks_aborted - before.blocks_aborted;
    total.keys_stored += now.keys_stored - before.keys_stored;
    total.secret_bits += now.secret_bits - before.secret_bits;
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Alice over gRPC with mutual TLS.
struct GrpcPeer {
    client: LinkClient<Channel>,
}

impl LinkPeer for GrpcPeer {
    async fn call(&mut self, request: Request) -> Result<Response, LinkError> {
        let client = &mut self.client;
        let response = match request {
            Request::Hello(req) => client.hello(req).await.map(|r| r.into_inner().into()),
            Request::Sift(req) => client.sift(req).await.map(|r| r.into_inner().into()),
            Request::StartBlock(req) => client.start_block(req).await.map(|r| r.into_inner().into()),
            Request::Parities(req) => client.parities(req).await.map(|r| r.into_inner().into()),
            Request::Syndromes(req) => client.syndromes(req).await.map(|r| r.into_inner().into()),
            Request::Reveal(req) => client.reveal(req).await.map(|r| r.into_inner().into()),
            Request::Verify(req) => client.verify(req).await.map(|r| r.into_inner().into()),
            Request::Amplify(req) => client.amplify(req).await.map(|r| r.into_inner().into()),
            Request::Commit(req) => client.commit(req).await.map(|r| r.into_inner().into()),
            Request::Abort(req) => client.abort(req).await.map(|r| r.into_inner().into()),
        };
        response.map_err(link_error_from_status)
    }
}
