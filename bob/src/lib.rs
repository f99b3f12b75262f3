//! Bob's daemon: the receiver (a device through `qkd_device`, by default the in-process
//! simulator on the simulated fibre) and the driver of the classical channel.
//! `main.rs` only parses flags and wires; [`run`] takes a shutdown token.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, anyhow};
use common::config::BobConfig;
use common::fibre::{decode_frame, read_frame};
use common::grpc::link_error_from_status;
use proto::link::link_client::LinkClient;
use qkd_core::auth::AuthPool;
use qkd_core::link::abort::AbortReason;
use qkd_core::link::bob::{BlockReport, BobLink, LinkCounters, LinkPeer};
use qkd_core::link::{LinkError, Request, Response};
use qkd_device::sim::PhotonFrame;
use qkd_device::{AnyReceiver, DeviceError, ReceiverDevice, RxEvent};
use qkd_sim::LinkParams;
use qkd_store::SledStore;
use qkd_tls::TlsMaterial;
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
    /// The last committed block (not written to the status file: `last_block` has it when it
    /// is the last).
    #[serde(skip)]
    pub last_committed: Option<BlockReport>,
    /// Current uncorrected phase offset of the decoder, radians (simulated receivers only: the
    /// simulation's truth).
    pub phase_error_rad: f64,
    /// The quantum device, as it describes itself.
    pub device: String,
    /// Whether the quantum channel is simulated (keys marked simulated in the store).
    pub simulated: bool,
    /// The last device error, if any.
    pub device_error: Option<String>,
    /// Why the link last went down (cleared when a session opens again).
    pub last_error: Option<String>,
    /// Sessions that ended on an error (a refusal, a lost peer, a store error, ...).
    pub sessions_failed: u64,
    /// Set while the key store is out of service (a full or failing disk): why. No block starts
    /// until the store is reopened, which the daemon retries by itself.
    pub store_failure: Option<String>,
    /// The error that ended the last failed session (kept).
    pub last_session_error: Option<String>,
    /// Set while no key can be distilled for want of authentication key (the pool is exhausted,
    /// or the two pools differ): what to do. Cleared by the next committed block.
    pub auth_alarm: Option<String>,
    /// Blocks aborted, by reason (snake case, as the metrics label them).
    pub aborted_by_reason: std::collections::BTreeMap<String, u64>,
    /// Bits disclosed by error correction and verification in committed blocks.
    pub leak_bits: u64,
    /// Key units dropped at `Hello` because the peer's store did not hold them (see
    /// `qkd_core::link::reagree`).
    pub units_dropped_at_hello: u64,
    /// KME reservations erased at `Hello` because the two stores differed.
    pub reservations_dropped_at_hello: u64,
    /// Unused bits of the authentication key pool (at start, then after each block).
    pub auth_pool_bits: Option<u64>,
    /// The receiver's monitors as last read (about once a second).
    pub monitors: common::telemetry::DeviceReadings,
    /// Whether the receiver reports its phase offset (`phase_error_rad` is then its reading).
    pub phase_reported: bool,
}

impl BobStatus {
    /// The status as the telemetry reads it.
    pub fn snapshot(&self) -> common::telemetry::NodeSnapshot {
        let state = if self.device_error.is_some() {
            "device failed"
        } else if self.connected {
            "linked"
        } else {
            "connecting to Alice"
        };
        let last = self.last_block.as_ref();
        let committed = self.last_committed.as_ref();
        common::telemetry::NodeSnapshot {
            state: state.into(),
            link_up: self.connected,
            qber_z: last.filter(|b| b.qber_z > 0.0 || b.abort_reason.is_none()).map(|b| b.qber_z),
            qber_x: last.map(|b| b.qber_x),
            phase_error_upper: last.filter(|b| b.phase_error_upper > 0.0).map(|b| b.phase_error_upper),
            reconciliation_efficiency: committed
                .and_then(|b| common::telemetry::reconciliation_efficiency(b.leak_bits, b.n_bits, b.qber_z)),
            detections: Some(self.total.detections),
            sifted_bits: self.total.sifted_bits,
            secret_bits: self.total.secret_bits,
            leak_bits: self.leak_bits,
            blocks_committed: self.total.blocks_committed,
            blocks_aborted: self.aborted_by_reason.clone(),
            frames: self.total.frames,
            frames_dropped: self.total.frames_dropped,
            frames_missed: None,
            sessions: Some(self.sessions),
            phase_offset_rad: self.phase_reported.then_some(self.phase_error_rad),
            auth_pool_bits: self.auth_pool_bits,
            units_dropped_at_hello: self.units_dropped_at_hello,
            reservations_dropped_at_hello: self.reservations_dropped_at_hello,
            device: self.monitors.clone(),
        }
    }
}

/// The receiver's monitor readings as the telemetry keeps them.
fn device_readings(m: &qkd_device::Monitors, last_block: Option<&BlockReport>) -> common::telemetry::DeviceReadings {
    use qkd_device::LockState;
    let locks = [("reference_clock", m.reference_clock), ("sync", m.sync), ("phase", m.phase)]
        .into_iter()
        .filter_map(|(name, state)| match state {
            LockState::Locked => Some((name.to_string(), true)),
            LockState::Unlocked => Some((name.to_string(), false)),
            _ => None,
        })
        .collect();
    // Bob's receiver has no source monitor: the source's readings are those of the last block.
    let source = m
        .source
        .as_ref()
        .map(|r| (r.mu, r.g2))
        .or_else(|| last_block.filter(|b| b.monitor_mu > 0.0).map(|b| (b.monitor_mu, b.monitor_g2)));
    common::telemetry::DeviceReadings {
        source_mu: source.map(|s| s.0),
        source_g2: source.map(|s| s.1),
        count_rates: m.rates.clone(),
        temperatures: m.temperatures.clone(),
        locks,
    }
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
    let (device, photons) = common::device::open_receiver(&cfg.device, &link, cfg.protocol.frame_pulses).await?;
    let simulated = device.info().simulated();
    let status = Arc::new(Mutex::new(BobStatus { device: device.info().summary(), simulated, ..BobStatus::default() }));
    if simulated {
        warn!(
            device = %device.info().summary(),
            "the quantum channel is SIMULATED: its keys are not secret from whoever runs the simulation; they are \
             stored marked simulated, and a KME serves them only with kme.allow_simulated_keys = true"
        );
    }
    let status_writer = tokio::spawn(common::status::write_periodically(
        cfg.data_dir.join("status.json"),
        status.clone(),
        shutdown.clone(),
    ));
    let telemetry = {
        let status = status.clone();
        let capacity = (cfg.max_stored_units > 0).then_some(cfg.max_stored_units);
        common::telemetry::Telemetry::new(
            &cfg.node_id,
            "bob",
            move || status.lock().expect("status lock poisoned").snapshot(),
            store.clone(),
            common::telemetry::UnitSize {
                unit_bits: u64::from(cfg.protocol.key_unit_bits),
                auth_refill_bits: cfg.protocol.auth_refill_bits,
            },
            capacity,
        )
    };
    let health = common::service::Health::default();
    if let Some(addr) = cfg.health_listen {
        let listener = common::service::bind_health(addr).await?;
        let (health, shutdown, telemetry) = (health.clone(), shutdown.clone(), telemetry.clone());
        tokio::spawn(async move {
            if let Err(e) = common::service::serve_health(listener, health, Some(telemetry), shutdown).await {
                warn!(error = %e, "health endpoint failed");
            }
        });
    }
    common::service::notify_ready("receiving; connecting to Alice", shutdown.clone());
    let kme = cfg.kme.clone().map(|mut kme_cfg| {
        kme_cfg.audit_log.get_or_insert_with(|| cfg.data_dir.join(AUDIT_LOG));
        let (tls, store, shutdown) = (tls.clone(), store.clone(), shutdown.clone());
        let recorder = telemetry.recorder();
        tokio::spawn(async move {
            let result = qkd_kme::run_kme(
                &kme_cfg,
                qkd_kme::KmeSide::Bob,
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
            result
        })
    });
    info!(
        node = %cfg.node_id,
        alice = %cfg.classical.alice_addr,
        fibre = ?photons.as_ref().map(|_| &cfg.fibre.alice_addr),
        device = %device.info().summary(),
        simulated,
        "bob started"
    );
    let auth = common::auth_pool::open_node_pool(&cfg.data_dir)?;
    status.lock().expect("status lock poisoned").auth_pool_bits = auth.available_bits().ok();
    let (events_tx, mut events) = mpsc::channel(RX_QUEUE_FRAMES);
    let (reports, reports_rx) = mpsc::unbounded_channel();
    let receiver_task = tokio::spawn(run_receiver(device, events_tx, reports_rx, status.clone(), shutdown.clone()));
    let mut device = DeviceLink { events: &mut events, reports, photons, simulated };

    let min_backoff = Duration::from_millis(100);
    let mut backoff = min_backoff;
    let mut device_failed = None;
    while !shutdown.is_cancelled() {
        // A store out of service (a full or failing disk) is reopened first: no session, and so
        // no block, starts until it is back. Unhealthy meanwhile (status, readiness, systemd).
        let reopened = if store.is_healthy() {
            Ok(Ok(false))
        } else {
            let store = store.clone();
            tokio::task::spawn_blocking(move || store.reopen_if_failed()).await
        };
        if let Err(e) = reopened.map_err(anyhow::Error::from).and_then(|r| r.map_err(anyhow::Error::from)) {
            let failure = format!("{e:#}");
            warn!(error = %failure, retry_in_ms = backoff.as_millis() as u64, "key store out of service; no block until it is back");
            common::service::notify_status(&format!("key store out of service: {failure}"));
            status.lock().expect("status lock poisoned").store_failure = Some(failure);
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs_f64(cfg.classical.max_backoff_s));
            continue;
        }
        if status.lock().expect("status lock poisoned").store_failure.take().is_some() {
            info!("key store back in service");
            common::service::notify_status("key store back in service; connecting to Alice");
        }
        let committed_before = status.lock().expect("status lock poisoned").total.blocks_committed;
        let result = session(&cfg, &link, store.as_ref(), &tls, &auth, &status, &health, &mut device, &shutdown).await;
        let committed = status.lock().expect("status lock poisoned").total.blocks_committed > committed_before;
        status.lock().expect("status lock poisoned").connected = false;
        health.set_ready(false);
        match result {
            Ok(()) => break,
            // Shutting down: the session ended because this end is stopping, not a failure.
            Err(e) if shutdown.is_cancelled() => {
                info!(reason = %format!("{e:#}"), "session closed for shutdown");
                break;
            }
            Err(e) if e.is::<DeviceError>() => {
                tracing::error!(error = %format!("{e:#}"), "the receiver failed; stopping");
                device_failed = Some(e);
                shutdown.cancel();
                break;
            }
            // The receiver failed while the link was down: its error never reaches a session.
            Err(e) if status.lock().expect("status lock poisoned").device_error.is_some() => {
                let device_error =
                    status.lock().expect("status lock poisoned").device_error.clone().unwrap_or_default();
                tracing::error!(error = %device_error, link = %format!("{e:#}"), "the receiver failed; stopping");
                device_failed = Some(anyhow::Error::new(DeviceError::Closed(device_error)));
                shutdown.cancel();
                break;
            }
            Err(e) => {
                // A session that committed a block was a working link: start the back-off over.
                if committed {
                    backoff = min_backoff;
                }
                // Before the first session, Alice not listening yet is how a pair starts (she may
                // start after Bob): not a failure worth a warning.
                let never_linked = status.lock().expect("status lock poisoned").sessions == 0;
                if never_linked {
                    tracing::debug!(reason = %format!("{e:#}"), "first connection to Alice failed");
                    info!(retry_in_ms = backoff.as_millis() as u64, "Alice not reachable yet; retrying");
                } else {
                    warn!(error = %format!("{e:#}"), retry_in_ms = backoff.as_millis() as u64, "link down; reconnecting");
                }
                {
                    let mut s = status.lock().expect("status lock poisoned");
                    s.last_error = Some(format!("{e:#}"));
                    s.sessions_failed += 1;
                    s.last_session_error = s.last_error.clone();
                }
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs_f64(cfg.classical.max_backoff_s));
            }
        }
    }
    common::service::notify_stopping();
    shutdown.cancel();
    let _ = receiver_task.await;
    if let Some(kme) = kme {
        kme.await.context("key management entity task")?.context("key management entity")?;
    }
    store.flush().context("flushing the key store")?;
    let _ = status_writer.await;
    info!("bob stopped; key store flushed");
    match device_failed {
        Some(e) => Err(e.context("the receiver device")),
        None => Ok(()),
    }
}

/// The KME's delivery audit log in the data directory, unless `[kme] audit_log` says otherwise.
const AUDIT_LOG: &str = "delivery-audit.jsonl";

/// Detected frames queued between the receiver and the session (a block's post-processing
/// takes seconds, during which frames keep coming).
const RX_QUEUE_FRAMES: usize = 4096;

/// The receiver as the session sees it: its frames, the phase reports back to it, and (for
/// the simulated receiver) where the simulated fibre's photons go.
struct DeviceLink<'a> {
    events: &'a mut mpsc::Receiver<Result<RxEvent, DeviceError>>,
    /// (frame, X-basis test events, errors) for the phase stabilisation.
    reports: mpsc::UnboundedSender<(u64, u64, u64)>,
    photons: Option<mpsc::Sender<PhotonFrame>>,
    simulated: bool,
}

/// The receiver's own task: takes its frames as they come (so that none waits while a block
/// is post-processed), hands phase reports to it between frames, and reads its monitors about
/// once a second. A device error ends the task after it is passed on.
async fn run_receiver(
    mut device: AnyReceiver,
    events: mpsc::Sender<Result<RxEvent, DeviceError>>,
    mut reports: mpsc::UnboundedReceiver<(u64, u64, u64)>,
    status: Arc<Mutex<BobStatus>>,
    shutdown: CancellationToken,
) {
    let mut last_monitors = std::time::Instant::now();
    let live = matches!(device, AnyReceiver::Grpc(_));
    loop {
        let event = tokio::select! {
            () = shutdown.cancelled() => return,
            event = device.next_event() => event,
        };
        let event = match event {
            Ok(Some(event)) => Ok(event),
            // A device process's stream ends only when the device stops: a failure.
            Ok(None) if live => Err(DeviceError::Closed("the device closed its tag stream".into())),
            Ok(None) => {
                info!("device: the detection stream ended (end of the recording); no more frames");
                shutdown.cancelled().await;
                return;
            }
            Err(e) => Err(e),
        };
        if let Err(e) = &event {
            status.lock().expect("status lock poisoned").device_error = Some(e.to_string());
        }
        let failed = event.is_err();
        if events.send(event).await.is_err() || failed {
            return;
        }
        while let Ok((frame, test_events, errors)) = reports.try_recv() {
            if let Err(e) = device.report_phase_errors(frame, test_events, errors).await {
                warn!(frame, error = %e, "device: phase report refused");
            }
        }
        if last_monitors.elapsed() >= Duration::from_secs(1) {
            last_monitors = std::time::Instant::now();
            match device.monitors().await {
                Ok(m) => {
                    let mut status = status.lock().expect("status lock poisoned");
                    if let Some(phase) = m.phase_error_rad {
                        status.phase_error_rad = phase;
                        status.phase_reported = true;
                    }
                    status.monitors = device_readings(&m, status.last_block.as_ref());
                }
                Err(e) => warn!(error = %e, "device: reading the monitors failed"),
            }
        }
    }
}

/// One session: connect the classical channel (and, for the simulated receiver, the simulated
/// fibre), settle pending blocks, then sift frames and process blocks until an error or
/// shutdown.
#[allow(clippy::too_many_arguments)]
async fn session(
    cfg: &BobConfig,
    link: &LinkParams,
    store: &SledStore,
    tls: &TlsMaterial,
    auth: &std::sync::Arc<common::auth_pool::FileAuthPool>,
    status: &Mutex<BobStatus>,
    health: &common::service::Health,
    device: &mut DeviceLink<'_>,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let security = cfg.security.params(link.p_z).map_err(|e| anyhow::anyhow!("{e}"))?;
    let connector =
        tls.grpc_connector(&cfg.classical.alice_name).context("TLS configuration of the classical channel")?;
    let endpoint = Endpoint::from_shared(format!("http://{}", cfg.classical.alice_addr))
        .context("classical.alice_addr")?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .http2_keep_alive_interval(Duration::from_secs_f64(cfg.classical.keepalive_s))
        .keep_alive_timeout(Duration::from_secs_f64(cfg.classical.keepalive_s))
        .keep_alive_while_idle(true);
    let channel = endpoint
        .connect_with_connector(connector)
        .await
        .with_context(|| format!("connecting to Alice at {}", cfg.classical.alice_addr))?;
    // The simulated fibre is read by its own task, into the simulated receiver.
    let reader_stop = shutdown.child_token();
    let _stop_reader = reader_stop.clone().drop_guard();
    let (fibre_tx, mut fibre_closed) = tokio::sync::oneshot::channel::<anyhow::Error>();
    let reader = match &device.photons {
        Some(photons) => {
            let fibre = tokio::net::TcpStream::connect(&cfg.fibre.alice_addr)
                .await
                .with_context(|| format!("connecting the fibre to {}", cfg.fibre.alice_addr))?;
            let _ = fibre.set_nodelay(true);
            Some(tokio::spawn(read_fibre(fibre, photons.clone(), fibre_tx, reader_stop.clone())))
        }
        None => None,
    };
    let client = LinkClient::new(channel)
        .max_decoding_message_size(qkd_core::link::reagree::MAX_LINK_MESSAGE_BYTES)
        .max_encoding_message_size(qkd_core::link::reagree::MAX_LINK_MESSAGE_BYTES);
    let peer = GrpcPeer { client };
    let (mut bob, (ready, dropped)) = off_the_workers(BobLink::open(
        peer,
        &cfg.node_id,
        cfg.protocol.clone(),
        security.clone(),
        store,
        device.simulated,
        auth.clone(),
    ))
    .await?;
    bob.set_max_stored_units(cfg.max_stored_units);
    bob.set_side_slot_monitor(link.side_slot_calibration());
    info!(settled_ready = ready, settled_dropped = dropped, "session opened with Alice");
    {
        let mut s = status.lock().expect("status lock poisoned");
        s.connected = true;
        s.sessions += 1;
        s.last_error = None;
        s.units_dropped_at_hello += bob.reagreement().units_dropped;
        s.reservations_dropped_at_hello += bob.reagreement().reservations_dropped;
    }
    health.set_ready(true);

    let mut last = bob.counters.clone();
    let result = loop {
        let event = tokio::select! {
            () = shutdown.cancelled() => break Ok(()),
            closed = &mut fibre_closed, if reader.is_some() => {
                break Err(closed.unwrap_or_else(|_| anyhow!("the fibre reader stopped")));
            }
            event = device.events.recv() => event,
        };
        let frame = match event {
            Some(Ok(RxEvent::Ready(frame))) => frame,
            Some(Ok(RxEvent::Dropped { index, reason })) => {
                info!(frame = index, ?reason, "device: frame dropped at both ends");
                if let Err(e) = bob.drop_frame(index).await {
                    break Err(anyhow!(e).context("dropping a frame"));
                }
                continue;
            }
            Some(Err(e)) => break Err(anyhow::Error::new(e)),
            None => break Err(anyhow::Error::new(DeviceError::Closed("the receiver's task ended".into()))),
        };
        bob.add_x_slot_counts(&frame.x_slots);
        match bob.sift_frame(frame.index, frame.n_pulses, &frame.detections).await {
            Ok(Some(x_counts)) => {
                let _ =
                    device.reports.send((frame.index, x_counts.plus_plus + x_counts.plus_minus, x_counts.plus_minus));
            }
            Ok(None) => info!(frame = frame.index, "Alice does not hold the frame; dropped at both ends"),
            Err(e) => break Err(anyhow!(e).context("sifting")),
        }
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
        if let Some(report) = report {
            match &report.abort_reason {
                Some(abort) => {
                    *s.aborted_by_reason.entry(common::telemetry::reason_label(&abort.reason)).or_default() += 1;
                    if matches!(abort.reason, AbortReason::AuthPoolExhausted | AbortReason::AuthPoolsDiffer) {
                        s.auth_alarm = Some(abort.to_string());
                    }
                }
                None => {
                    s.leak_bits += report.leak_bits;
                    s.last_committed = Some(report.clone());
                    s.auth_alarm = None;
                }
            }
            if report.auth.pool_bits > 0 || report.abort_reason.is_none() {
                s.auth_pool_bits = Some(report.auth.pool_bits);
            }
            s.last_block = Some(report);
        }
    };
    reader_stop.cancel();
    if let Some(reader) = reader {
        let _ = reader.await;
    }
    result
}

/// The simulated fibre's reader: decodes each photon frame and hands it to the simulated
/// receiver, until the fibre closes (reported on `closed`) or `stop`.
async fn read_fibre(
    mut fibre: tokio::net::TcpStream,
    photons: mpsc::Sender<PhotonFrame>,
    closed: tokio::sync::oneshot::Sender<anyhow::Error>,
    stop: CancellationToken,
) {
    let error = loop {
        let frame = tokio::select! {
            () = stop.cancelled() => return,
            frame = read_frame(&mut fibre) => frame,
        };
        let frame = match frame {
            Ok(Some(frame)) => frame,
            Ok(None) => break anyhow!("the fibre was closed by the far end"),
            Err(e) => break anyhow!(e).context("fibre"),
        };
        let decoded = match decode_frame(&frame) {
            Ok(p) => p,
            Err(e) => break anyhow!(e).context("fibre"),
        };
        let photon_frame = PhotonFrame { index: frame.frame_idx, n_pulses: frame.n_pulses, photons: decoded };
        tokio::select! {
            () = stop.cancelled() => return,
            sent = photons.send(photon_frame) => if sent.is_err() { return },
        }
    };
    let _ = closed.send(error);
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
            auth = %serde_json::to_string(&report.auth).unwrap_or_default(),
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
    total.frames_dropped += now.frames_dropped - before.frames_dropped;
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
