//! The device emulator: one process that serves both `proto/device.proto` services, Alice's
//! transmitter and Bob's receiver, from the simulator's physics, at the time-tag level. The
//! physics couples the two ends (Bob's clicks depend on Alice's states), so one engine produces
//! both: frame f's states on the transmitter's stream and the tags of frame f's pulses on the
//! receiver's, from the same draw. Each service has its own listener (TCP or Unix socket).
//!
//! # Model
//! Per frame, exactly what the in-process `sim` driver computes for the same seed
//! ([`crate::sim::SimRngs`]): Alice's frame secret, the photons that survive the fibre and her
//! monitor reading (`qkd_sim::Source`), Bob's detections with his losses, basis split,
//! interferometer and phase drift, detector efficiency, dark counts, dead time, after-pulses
//! and squashing (`qkd_sim::Receiver`). The transmitter serves every pulse's state, packed.
//! Bob's detections then become tags on his tagger's clock:
//!
//! * the clock: Alice emits global pulse k at k T (T = 1 / `clock_hz`, her clock is the
//!   reference); Bob's tagger reads `start + x (1 + e) + d x^2 / 2` for an event at Alice time x
//!   (`qkd_timetag::synth::TaggerClock`: e = `clock_offset_ppm` 10^-6 and a frequency that
//!   changes by `drift_ppm_per_s` per second);
//! * a detection of pulse k: at k T + the channel's delay + the window's offset (0 / tau for
//!   Z early / late, tau for the X central slot) + half a window (the window the simulator
//!   chose is [offset, offset + window) after the bin's nominal time), plus Gaussian jitter of
//!   `jitter_ps` (on top of the arrival-time spread the simulator already folded into its window
//!   probabilities); floored to whole ps (1 ps resolution);
//! * the side-slot clicks the simulator counts (`x_slot_counts().side`): at uniformly random
//!   pulses of the frame, D+ or D-, slot 0 or 2 (the simulator does not say which pulses);
//! * background dark counts outside every window (the simulator places dark counts only inside
//!   its windows): `dark_count_rate_hz` per detector, uniform over the period, those within
//!   6 jitter + 50 ps of a window discarded;
//! * sync tags every `sync_every` pulses (a divisor of the frame), at the sync delay plus
//!   `sync_jitter_ps` of Gaussian jitter;
//! * gaps on demand: from the middle of every `every_frames`-th frame (frames K-1, 2K-1, ...),
//!   `duration_ms` of tags removed and a Gap record in their place.
//!
//! The pipeline on Bob's side thus finds, frame by frame, the simulator's detections (every tag
//! lies well inside the window of its outcome); only the X central-slot counter misses the X
//! clicks the simulator squashed away.
//!
//! # Streams and pacing
//! The engine starts when both services have a subscriber, from frame 0. With `speed` 0 it runs
//! as fast as both subscribers read (each stream's queue holds `queue_frames` frames, and a full
//! queue holds the engine back: the two stay in step). With `speed` > 0 it produces frames at
//! that multiple of real time, as hardware does; a subscriber that falls a queue behind loses
//! data, reported in its stream (FramesLost; a Gap of reason OVERFLOW). A subscriber that
//! reconnects resumes at the next frame (a receiver stream with a new `StreamStart`). After
//! `max_frames` frames the streams end, the receiver's after a last batch with the syncs of the
//! next few sync periods: the pipeline needs syncs beyond a frame (its lookahead) to complete
//! it, and a real tagger would go on delivering them.
//!
//! # Phase control
//! `ReportPhaseErrors` feeds the simulator's phase loop (`qkd_sim::Receiver::feedback`), which
//! remembers the dither of each frame: reports must come in frame order, frames not reported
//! count as zero events, and a report takes effect at the next frame the engine produces.
//!
//! # Determinism
//! Under a seed the frames (states, tags, gaps) are a pure function of the configuration, in
//! unpaced mode and without phase reports; phase reports arrive at times the network decides,
//! so a run with them is reproducible only up to when they take effect.
//!
//! # Recording
//! With `record`, every frame and tag batch the engine produces (whether or not a subscriber
//! received it) is written to a [`crate::record`] file, flushed after each frame.

mod engine;
mod service;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto::device as pb;
use proto::device::receiver_server::ReceiverServer;
use proto::device::transmitter_server::TransmitterServer;
use qkd_sim::LinkParams;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::DeviceError;
use crate::frames::{LockState, Monitors};
use crate::grpc::{DeviceAddress, MAX_MESSAGE_BYTES};
use crate::info::DeviceInfo;
use crate::record::{RecordingCounts, RecordingWriter};
use crate::sim::{receiver_description, transmitter_description};
#[cfg(test)]
pub(crate) use engine::TRAILER_SYNCS;
use engine::{Engine, FrameOutput};
pub use service::Listener;
use service::{Loss, RxService, Sent, Shared, State, TxService, deliver, forget_bob, offer, serve};

/// Injected gaps: every `every_frames` frames, `duration_ms` of tags lost.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct GapSpec {
    /// A gap in frames K-1, 2K-1, ... (K = `every_frames`, at least 1).
    pub every_frames: u64,
    /// Its length, ms of Alice's time.
    pub duration_ms: f64,
}

/// A gap the emulator injected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct InjectedGap {
    /// The frame it starts in.
    pub frame: u64,
    /// Global pulses it covers (first, last), Alice's numbering.
    pub from_pulse: u64,
    /// Last pulse.
    pub to_pulse: u64,
    /// The same on Bob's tagger, ps.
    pub from_ps: u64,
    /// End on Bob's tagger, ps.
    pub to_ps: u64,
}

/// The emulator's settings (module docs).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct EmulatorConfig {
    /// Name of the link preset (for the descriptions).
    pub preset: String,
    /// The physics.
    pub params: LinkParams,
    /// Seed of every random draw.
    pub seed: u64,
    /// Pulses per frame.
    pub frame_pulses: u64,
    /// Pulses between sync tags (a divisor of `frame_pulses`).
    pub sync_every: u64,
    /// Bob's tagger frequency against Alice's pulse clock, ppm.
    pub clock_offset_ppm: f64,
    /// Rate of change of that offset, ppm/s.
    pub drift_ppm_per_s: f64,
    /// Bob's tagger reading when Alice emits pulse 0, ps.
    pub bob_clock_start_ps: f64,
    /// Gaussian jitter added to each detector tag (rms), ps.
    pub jitter_ps: f64,
    /// Gaussian jitter of the sync tags (rms), ps.
    pub sync_jitter_ps: f64,
    /// Delays of the Z, D+, D- and sync channels after emission, ps (early bin / slot 0).
    pub delays_ps: [f64; 4],
    /// Dark counts outside the windows.
    pub background_counts: bool,
    /// Injected gaps.
    pub gaps: Option<GapSpec>,
    /// Multiple of real time (0: as fast as the subscribers read).
    pub speed: f64,
    /// Frames to produce (`None`: until stopped).
    pub max_frames: Option<u64>,
    /// Recording file.
    pub record: Option<PathBuf>,
    /// Frames each stream's queue holds.
    pub queue_frames: usize,
}

impl EmulatorConfig {
    /// The defaults for link preset `preset` (`qkd_sim::LinkParams::preset`): frames of 2^22
    /// pulses, a sync every 2^16 pulses, clocks in step, the preset's jitter, 10 ps sync
    /// jitter, channel delays 3.0, 3.2, 3.15 ns and sync 1 ns, background counts, real time,
    /// no gaps, no recording.
    pub fn from_preset(preset: &str, seed: u64) -> Result<Self, DeviceError> {
        let params = LinkParams::preset(preset).map_err(|e| DeviceError::Description(e.to_string()))?;
        Ok(Self {
            preset: preset.to_owned(),
            jitter_ps: params.jitter_ps,
            params,
            seed,
            frame_pulses: 1 << 22,
            sync_every: 1 << 16,
            clock_offset_ppm: 0.0,
            drift_ppm_per_s: 0.0,
            bob_clock_start_ps: 1_000_000.0,
            sync_jitter_ps: 10.0,
            delays_ps: [3000.0, 3200.0, 3150.0, 1000.0],
            background_counts: true,
            gaps: None,
            speed: 1.0,
            max_frames: None,
            record: None,
            queue_frames: 8,
        })
    }

    /// Checks that the settings can work: frames of 1..=2^40 pulses, a sync period that divides
    /// them, clocks within +-1000 ppm, non-negative jitter and speed, each detector's peaks within
    /// one period after the sync, sensible gaps.
    pub fn validate(&self) -> Result<(), DeviceError> {
        let bad = |m: String| Err(DeviceError::Description(format!("emulator: {m}")));
        self.params.validate().map_err(|e| DeviceError::Description(e.to_string()))?;
        if !(1..=crate::info::MAX_FRAME_PULSES).contains(&self.frame_pulses) {
            return bad(format!("frame_pulses {} must be in 1..=2^40", self.frame_pulses));
        }
        if self.sync_every == 0 || !self.frame_pulses.is_multiple_of(self.sync_every) {
            return bad(format!("sync_every {} must divide frame_pulses {}", self.sync_every, self.frame_pulses));
        }
        for (name, v, max) in
            [("clock_offset_ppm", self.clock_offset_ppm, 1000.0), ("drift_ppm_per_s", self.drift_ppm_per_s, 100.0)]
        {
            if !(v.is_finite() && v.abs() <= max) {
                return bad(format!("{name} {v} must be within +-{max}"));
            }
        }
        for (name, v) in [
            ("jitter_ps", self.jitter_ps),
            ("sync_jitter_ps", self.sync_jitter_ps),
            ("speed", self.speed),
            ("bob_clock_start_ps", self.bob_clock_start_ps),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return bad(format!("{name} {v} must be a finite number >= 0"));
            }
        }
        let period = 1e12 / self.params.clock_hz;
        let (tau, w) = (self.params.bin_separation_ps, self.params.window_ns * 1e3);
        let margin = 6.0 * self.jitter_ps.max(self.sync_jitter_ps);
        for (i, name) in ["Z", "D+", "D-"].iter().enumerate() {
            let rel = self.delays_ps[i] - self.delays_ps[3];
            let span = if i == 0 { tau + w } else { 2.0 * tau + w };
            if !(rel >= margin && rel + span + margin < period) {
                return bad(format!(
                    "the {name} channel's peaks ({rel} ps after the sync, spanning {span} ps) must lie within one \
                     period ({period:.1} ps) after the sync"
                ));
            }
        }
        if let Some(g) = self.gaps
            && (g.every_frames == 0 || !(g.duration_ms.is_finite() && g.duration_ms > 0.0))
        {
            return bad(format!("gaps every {} frames of {} ms: both must be positive", g.every_frames, g.duration_ms));
        }
        if self.queue_frames == 0 {
            return bad("queue_frames must be positive".into());
        }
        Ok(())
    }

    /// The settings as JSON (the descriptions' and the recording's details).
    pub fn details_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The transmitter's description.
    pub fn transmitter_description(&self) -> pb::DeviceDescription {
        let model = format!("emulator (qkd_sim physics, preset {})", self.preset);
        transmitter_description(&self.params, self.frame_pulses, &model, self.details_json())
    }

    /// The receiver's description.
    pub fn receiver_description(&self) -> pb::DeviceDescription {
        let model = format!("emulator (qkd_sim physics, preset {})", self.preset);
        let mut d = receiver_description(
            &self.params,
            self.frame_pulses,
            self.sync_every,
            self.delays_ps,
            &model,
            self.details_json(),
        );
        d.max_clock_offset_ppm = (2.0 * self.clock_offset_ppm.abs()).max(200.0);
        d.max_clock_drift_ppm_per_s = (2.0 * self.drift_ppm_per_s.abs()).max(2.0);
        d
    }
}

/// What an emulation produced.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct EmulatorSummary {
    /// Frames produced.
    pub frames: u64,
    /// Tags produced (all channels, after gaps).
    pub tags: u64,
    /// Gaps injected.
    pub gaps: Vec<InjectedGap>,
    /// What the recording holds, if one was written.
    pub recording: Option<RecordingCounts>,
}

/// A running emulator (module docs).
pub struct Emulator {
    alice: DeviceAddress,
    bob: DeviceAddress,
    stop: CancellationToken,
    engine: Option<tokio::task::JoinHandle<Result<EmulatorSummary, DeviceError>>>,
    servers: Vec<tokio::task::JoinHandle<Result<(), tonic::transport::Error>>>,
}

impl std::fmt::Debug for Emulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Emulator").field("alice", &self.alice).field("bob", &self.bob).finish_non_exhaustive()
    }
}

impl Emulator {
    /// Validates `cfg`, creates the recording (if any) and starts serving the transmitter on
    /// `alice` and the receiver on `bob`; the engine starts once both have a subscriber.
    pub async fn start(cfg: EmulatorConfig, alice: Listener, bob: Listener) -> Result<Self, DeviceError> {
        cfg.validate()?;
        let (tx_desc, rx_desc) = (cfg.transmitter_description(), cfg.receiver_description());
        DeviceInfo::new(tx_desc.clone())?;
        DeviceInfo::new(rx_desc.clone())?;
        let writer = match &cfg.record {
            Some(path) => Some(RecordingWriter::create(
                path,
                pb::RecordingHeader {
                    version: 0,
                    created_by: format!("qkd-device emulator {}", env!("CARGO_PKG_VERSION")),
                    created_unix_ms: std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as u64),
                    transmitter: Some(tx_desc.clone()),
                    receiver: Some(rx_desc.clone()),
                    details: cfg.details_json(),
                },
            )?),
            None => None,
        };
        let (alice_addr, bob_addr) = (alice.address()?, bob.address()?);
        let shared = Arc::new(Shared {
            tx_desc,
            rx_desc,
            queue_frames: cfg.queue_frames,
            state: Mutex::new(State::default()),
            subscribed: Notify::new(),
        });
        let stop = CancellationToken::new();
        let tx_router = tonic::transport::Server::builder().add_service(
            TransmitterServer::new(TxService(shared.clone()))
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        );
        let rx_router = tonic::transport::Server::builder().add_service(
            ReceiverServer::new(RxService(shared.clone()))
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        );
        let servers = vec![
            tokio::spawn(serve(tx_router, alice, stop.clone())),
            tokio::spawn(serve(rx_router, bob, stop.clone())),
        ];
        let engine = tokio::spawn(run_engine(shared, cfg, writer, stop.clone()));
        Ok(Self { alice: alice_addr, bob: bob_addr, stop, engine: Some(engine), servers })
    }

    /// Where the transmitter is served.
    pub fn alice_address(&self) -> &DeviceAddress {
        &self.alice
    }

    /// Where the receiver is served.
    pub fn bob_address(&self) -> &DeviceAddress {
        &self.bob
    }

    /// A token that stops the emulator when cancelled.
    pub fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Waits until the engine has produced its `max_frames` (or was stopped) and the streams
    /// have delivered them; the services keep answering `Describe` and `ReadMonitors` until
    /// [`Emulator::shutdown`]. Returns the summary once (later calls: an empty one).
    pub async fn finished(&mut self) -> Result<EmulatorSummary, DeviceError> {
        match self.engine.take() {
            Some(h) => h.await.map_err(|e| DeviceError::Closed(format!("emulator engine: {e}")))?,
            None => Ok(EmulatorSummary::default()),
        }
    }

    /// Stops the engine and the servers and waits for them.
    pub async fn shutdown(mut self) -> Result<EmulatorSummary, DeviceError> {
        self.stop.cancel();
        let summary = self.finished().await;
        for s in self.servers.drain(..) {
            let _ = s.await;
        }
        summary
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The engine's task: waits for both subscribers, produces the frames, records and delivers
/// them, and at the end closes the streams once they have delivered everything.
async fn run_engine(
    shared: Arc<Shared>,
    cfg: EmulatorConfig,
    writer: Option<RecordingWriter>,
    stop: CancellationToken,
) -> Result<EmulatorSummary, DeviceError> {
    let mut summary = EmulatorSummary::default();
    let mut slot = Some((Engine::new(&cfg), writer));
    let result = produce(&shared, &cfg, &mut slot, &mut summary, &stop).await;
    // Close the streams: drop the senders, then wait until tonic has sent what is queued.
    let (alice, bob) = {
        let mut st = shared.lock();
        st.finished = true;
        (st.alice.take(), st.bob.take())
    };
    for done in [alice.map(|s| s.done), bob.map(|s| s.done)].into_iter().flatten() {
        tokio::select! {
            _ = done => {}
            () = stop.cancelled() => {}
        }
    }
    let writer = slot.and_then(|(_, w)| w);
    if let Some(w) = writer {
        let counts = tokio::task::spawn_blocking(move || w.finish())
            .await
            .map_err(|e| DeviceError::Closed(format!("recording task: {e}")))??;
        summary.recording = Some(counts);
    }
    result.map(|()| summary)
}

async fn produce(
    shared: &Shared,
    cfg: &EmulatorConfig,
    slot: &mut Option<(Engine, Option<RecordingWriter>)>,
    summary: &mut EmulatorSummary,
    stop: &CancellationToken,
) -> Result<(), DeviceError> {
    // Both ends subscribed.
    loop {
        {
            let st = shared.lock();
            if st.alice.is_some() && st.bob.is_some() {
                break;
            }
        }
        tokio::select! {
            () = shared.subscribed.notified() => {}
            () = stop.cancelled() => return Ok(()),
        }
    }
    tracing::info!(seed = cfg.seed, preset = %cfg.preset, "emulator: both ends subscribed; producing frames");
    let frame_s = cfg.frame_pulses as f64 / cfg.params.clock_hz;
    let t0 = tokio::time::Instant::now();
    let mut lost = Loss::default();
    let mut f = 0u64;
    while cfg.max_frames.is_none_or(|m| f < m) && !stop.is_cancelled() {
        if cfg.speed > 0.0 {
            let due = t0 + Duration::from_secs_f64(f as f64 * frame_s / cfg.speed);
            tokio::select! {
                () = tokio::time::sleep_until(due) => {}
                () = stop.cancelled() => break,
            }
        }
        let reports: Vec<(u64, u64, u64)> = shared.lock().reports.drain(..).collect();
        let (mut engine, mut writer) = slot.take().expect("engine present");
        let (engine, writer, out) = tokio::task::spawn_blocking(move || {
            for (frame, n, e) in reports {
                engine.apply_report(frame, n, e);
            }
            let out = engine.frame();
            let recorded = match writer.as_mut() {
                Some(w) => (|| {
                    w.write_transmitter(&out.transmitter)?;
                    for b in &out.batches {
                        w.write_tags(b)?;
                    }
                    w.flush()
                })(),
                None => Ok(()),
            };
            (engine, writer, recorded.map(|()| out))
        })
        .await
        .map_err(|e| DeviceError::Closed(format!("emulator engine: {e}")))?;
        let rx_start = engine.stream_start(f);
        *slot = Some((engine, writer));
        let out = out?;
        note_frame(shared, cfg, &out, frame_s, summary);
        if !deliver(shared, cfg, out, rx_start, &mut lost, stop).await {
            break;
        }
        f += 1;
    }
    if cfg.max_frames == Some(f) {
        // The end: a last batch of syncs completes the last frame (engine::Engine::trailer).
        let (engine, writer) = slot.as_mut().expect("engine present");
        let trailer = engine.trailer();
        if let Some(w) = writer.as_mut() {
            w.write_tags(&trailer)?;
        }
        let bob = shared.lock().bob.as_ref().map(|s| s.tx.clone());
        if let Some(tx) = bob
            && let Sent::Gone = offer(&tx, trailer, cfg.speed > 0.0, stop).await
        {
            forget_bob(shared, &tx);
        }
    }
    Ok(())
}

/// Updates the monitors and the summary with a produced frame.
fn note_frame(shared: &Shared, cfg: &EmulatorConfig, out: &FrameOutput, frame_s: f64, summary: &mut EmulatorSummary) {
    summary.frames += 1;
    summary.tags += out.tags_per_channel.iter().sum::<u64>();
    summary.gaps.extend(out.gap);
    let mut st = shared.lock();
    st.frames = out.index + 1;
    st.correction_steps = out.correction_steps;
    st.tx_monitors = Monitors {
        source: Some(out.reading),
        reference_clock: LockState::Absent,
        sync: LockState::Locked,
        phase: LockState::Absent,
        frames: out.index + 1,
        ..Monitors::default()
    };
    st.rx_monitors = Monitors {
        rates: (0u8..4).map(|c| (c, out.tags_per_channel[usize::from(c)] as f64 / frame_s)).collect(),
        temperatures: vec![("snspd (simulated)".into(), 0.85)],
        reference_clock: LockState::Absent,
        sync: LockState::Locked,
        phase: if cfg.params.feedback_enabled { LockState::Locked } else { LockState::Absent },
        phase_error_rad: Some(out.phase_error_rad),
        frames: out.index + 1,
        ..Monitors::default()
    };
}
