//! The `sim` driver: today's in-process simulator behind the device traits. The transmitter is
//! `qkd_sim::Source` (a fresh frame secret per frame: the states are the simulator's AES
//! states, [`TxStates::Derived`]); the receiver is `qkd_sim::Receiver` (detections directly,
//! no time tags), with its phase loop driven by the reported X-basis errors. Photons go from the
//! one to the other as [`PhotonFrame`]s: in memory ([`pair`]), or through the daemons' simulated
//! fibre (the daemon sends [`SimTransmitter::emit`]'s photons and feeds the receiver's channel).
//!
//! # Seeded runs
//! [`SimRngs::from_seed`] gives the generators of a reproducible run, one ChaCha20 stream each:
//! Alice's (per frame, in this order: the frame secret, the photons of
//! [`qkd_sim::Source::emit_frame`], the monitor reading), Bob's (everything
//! [`qkd_sim::Receiver::detect_frame`] draws) and the emulator's tag-level noise (jitter, side
//! slots, background counts). The emulator uses the same streams, so that its frames carry
//! exactly the states and detections of this driver for the same seed.

use proto::device as pb;
use qkd_core::postproc::finite_key::SourceReading;
use qkd_core::quantum::FrameSecret;
use qkd_sim::{LinkParams, Photon, Source};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use tokio::sync::mpsc;

use crate::frames::{LockState, Monitors, RxEvent, RxFrame, TxEvent, TxFrame, TxStates};
use crate::info::{DeviceInfo, exact_period, role_to_proto};
use crate::{DeviceError, ReceiverDevice, TransmitterDevice};
use qkd_timetag::tags::Role;

/// The generators of a seeded simulated run (module docs).
#[derive(Clone, Debug)]
pub struct SimRngs {
    /// Alice's: frame secrets, photons, monitor readings.
    pub alice: ChaCha20Rng,
    /// Bob's: detection.
    pub bob: ChaCha20Rng,
    /// The emulator's tag-level noise.
    pub tags: ChaCha20Rng,
}

impl SimRngs {
    /// Streams 0, 1 and 2 of ChaCha20 keyed with `seed` (`SeedableRng::seed_from_u64`).
    pub fn from_seed(seed: u64) -> Self {
        let stream = |n: u64| {
            let mut r = ChaCha20Rng::seed_from_u64(seed);
            r.set_stream(n);
            r
        };
        Self { alice: stream(0), bob: stream(1), tags: stream(2) }
    }

    /// Generators seeded by the operating system (a daemon's simulated link).
    pub fn from_os() -> Self {
        Self { alice: ChaCha20Rng::from_os_rng(), bob: ChaCha20Rng::from_os_rng(), tags: ChaCha20Rng::from_os_rng() }
    }
}

/// One frame's photons that reached the end of the fibre, from the simulated source to the
/// simulated receiver.
#[derive(Clone, Debug, PartialEq)]
pub struct PhotonFrame {
    /// Frame index.
    pub index: u64,
    /// Pulses in the frame.
    pub n_pulses: u64,
    /// The photons, ascending by pulse index.
    pub photons: Vec<Photon>,
}

/// Alice's side of one simulated frame, drawing from `rng` in the documented order (module docs):
/// the frame secret, the surviving photons, the monitor reading.
pub(crate) fn alice_frame(
    source: &Source,
    n_pulses: u64,
    rng: &mut ChaCha20Rng,
) -> (FrameSecret, Vec<Photon>, SourceReading) {
    let secret = FrameSecret::random(rng);
    let photons = source.emit_frame(&secret, n_pulses, rng);
    let reading = source.monitor_reading(rng);
    (secret, photons, reading)
}

/// Tagger channels of the simulated receiver (the emulator's numbering, PicoQuant style: the
/// sync is 0, detector inputs 1 to 3).
pub const SYNC_CHANNEL: u8 = 0;
/// The Z detector's channel.
pub const Z_CHANNEL: u8 = 1;
/// D+'s channel.
pub const X_PLUS_CHANNEL: u8 = 2;
/// D-'s channel.
pub const X_MINUS_CHANNEL: u8 = 3;

/// The description of a simulated transmitter for `params` (both the `sim` driver's and the
/// emulator's).
pub fn transmitter_description(
    params: &LinkParams,
    frame_pulses: u64,
    model: &str,
    details: String,
) -> pb::DeviceDescription {
    pb::DeviceDescription {
        role: pb::DeviceRole::Transmitter as i32,
        vendor: "qkd-device".into(),
        model: model.into(),
        serial: String::new(),
        driver: format!("qkd-device {}", env!("CARGO_PKG_VERSION")),
        simulated: true,
        pulse_rate_hz: params.clock_hz,
        pulse_period: exact_period(params.clock_hz),
        timestamp_resolution_ps: 1.0,
        bin_separation_ps: params.bin_separation_ps,
        window_ps: params.window_ns * 1e3,
        frame_pulses,
        sync_every_pulses: 0,
        max_clock_offset_ppm: 0.0,
        max_clock_drift_ppm_per_s: 0.0,
        p_z: params.p_z,
        channels: Vec::new(),
        capabilities: Some(pb::Capabilities { source_monitor: true, ..Default::default() }),
        details,
    }
}

/// The description of a simulated receiver for `params`: channels Z, D+, D- (with their
/// nominal delays `delays_ps`, Z first) and, when `sync_every` > 0, the sync.
pub fn receiver_description(
    params: &LinkParams,
    frame_pulses: u64,
    sync_every: u64,
    delays_ps: [f64; 4],
    model: &str,
    details: String,
) -> pb::DeviceDescription {
    let ch = |channel: u8, role: Role, name: &str, delay_ps: f64| pb::Channel {
        channel: u32::from(channel),
        role: role_to_proto(role) as i32,
        name: name.into(),
        delay_ps,
    };
    let mut channels = vec![
        ch(Z_CHANNEL, Role::Z, "Z detector", delays_ps[0]),
        ch(X_PLUS_CHANNEL, Role::XPlus, "D+", delays_ps[1]),
        ch(X_MINUS_CHANNEL, Role::XMinus, "D-", delays_ps[2]),
    ];
    if sync_every > 0 {
        channels.insert(0, ch(SYNC_CHANNEL, Role::Sync, "sync", delays_ps[3]));
    }
    pb::DeviceDescription {
        role: pb::DeviceRole::Receiver as i32,
        sync_every_pulses: sync_every,
        max_clock_offset_ppm: 200.0,
        max_clock_drift_ppm_per_s: 2.0,
        p_z: 0.0,
        channels,
        capabilities: Some(pb::Capabilities {
            phase_feedback: params.feedback_enabled,
            hardware_sync: sync_every > 0,
            ..Default::default()
        }),
        // Vendor, model, pulse train and timing as the transmitter's.
        ..transmitter_description(params, frame_pulses, model, details)
    }
}

/// Alice's simulated source (module docs).
#[derive(Debug)]
pub struct SimTransmitter {
    info: DeviceInfo,
    source: Source,
    p_z: f64,
    period_ps: f64,
    frame_pulses: u64,
    rng: ChaCha20Rng,
    next_index: u64,
    last_reading: Option<SourceReading>,
    photons_out: Option<mpsc::Sender<PhotonFrame>>,
    ticker: Option<tokio::time::Interval>,
}

impl SimTransmitter {
    /// A simulated source for `params`, frames of `frame_pulses` pulses, drawing from `rng`.
    pub fn new(params: &LinkParams, frame_pulses: u64, rng: ChaCha20Rng) -> Result<Self, DeviceError> {
        let info =
            DeviceInfo::new(transmitter_description(params, frame_pulses, "in-process simulator", String::new()))?;
        Ok(Self {
            info,
            source: Source::new(params),
            p_z: params.p_z,
            period_ps: 1e12 / params.clock_hz,
            frame_pulses,
            rng,
            next_index: 0,
            last_reading: None,
            photons_out: None,
            ticker: None,
        })
    }

    /// Emits one frame per frame period of wall-clock time (as a real source does), instead of
    /// as fast as the frames are taken. Needs a tokio runtime with the time driver.
    pub fn paced(mut self) -> Self {
        let period = std::time::Duration::from_secs_f64(self.frame_pulses as f64 * self.period_ps * 1e-12);
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        self.ticker = Some(ticker);
        self
    }

    /// The next frame and the photons of it that survive the fibre (what the daemon's simulated
    /// fibre carries to Bob). Synchronous; [`TransmitterDevice::next_event`] paces it and hands
    /// the photons to a paired receiver.
    pub fn emit(&mut self) -> (TxFrame, PhotonFrame) {
        let index = self.next_index;
        self.next_index += 1;
        let (secret, photons, reading) = alice_frame(&self.source, self.frame_pulses, &mut self.rng);
        self.last_reading = Some(reading);
        let start_ps = (index as f64 * self.frame_pulses as f64 * self.period_ps).round() as u64;
        let frame = TxFrame {
            index,
            n_pulses: self.frame_pulses,
            start_ps,
            states: TxStates::derived(secret, self.p_z),
            reading: Some(reading),
        };
        (frame, PhotonFrame { index, n_pulses: self.frame_pulses, photons })
    }
}

impl TransmitterDevice for SimTransmitter {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    async fn next_event(&mut self) -> Result<Option<TxEvent>, DeviceError> {
        if let Some(t) = self.ticker.as_mut() {
            t.tick().await;
        }
        let (frame, photons) = self.emit();
        if let Some(out) = &self.photons_out {
            out.send(photons).await.map_err(|_| DeviceError::Closed("the simulated receiver went away".into()))?;
        }
        Ok(Some(TxEvent::Frame(frame)))
    }

    async fn monitors(&mut self) -> Result<Monitors, DeviceError> {
        Ok(Monitors {
            source: self.last_reading,
            reference_clock: LockState::Absent,
            sync: LockState::Absent,
            phase: LockState::Absent,
            frames: self.next_index,
            ..Monitors::default()
        })
    }
}

/// Bob's simulated receiver (module docs).
#[derive(Debug)]
pub struct SimReceiver {
    info: DeviceInfo,
    receiver: qkd_sim::Receiver,
    feedback_enabled: bool,
    rng: ChaCha20Rng,
    photons_in: mpsc::Receiver<PhotonFrame>,
    frames: u64,
    /// Frame index of each detected frame not yet fed back, oldest first.
    detected: std::collections::VecDeque<u64>,
}

impl SimReceiver {
    /// A simulated receiver for `params`, drawing from `rng`, detecting the photon frames that
    /// arrive on `photons`.
    pub fn new(
        params: &LinkParams,
        frame_pulses: u64,
        rng: ChaCha20Rng,
        photons: mpsc::Receiver<PhotonFrame>,
    ) -> Result<Self, DeviceError> {
        let desc = receiver_description(params, frame_pulses, 0, [0.0; 4], "in-process simulator", String::new());
        Ok(Self {
            info: DeviceInfo::new(desc)?,
            receiver: qkd_sim::Receiver::new(params),
            feedback_enabled: params.feedback_enabled,
            rng,
            photons_in: photons,
            frames: 0,
            detected: std::collections::VecDeque::new(),
        })
    }

    /// Detects one frame of photons (synchronous; what [`ReceiverDevice::next_event`] does with
    /// each frame that arrives).
    pub fn detect(&mut self, frame: &PhotonFrame) -> RxFrame {
        let detections = self.receiver.detect_frame(&frame.photons, frame.n_pulses, &mut self.rng);
        self.frames += 1;
        self.detected.push_back(frame.index);
        if self.detected.len() > 1 << 16 {
            self.detected.pop_front();
        }
        RxFrame {
            index: frame.index,
            n_pulses: frame.n_pulses,
            detections,
            x_slots: self.receiver.x_slot_counts(),
            counters: None,
        }
    }

    /// The interferometer's current phase error (the simulator's truth), rad.
    pub fn phase_error_rad(&self) -> f64 {
        self.receiver.phase_error_rad()
    }

    /// Feeds one frame's X-basis errors to the simulated phase loop, first feeding zero events
    /// for every detected frame before it that was never reported (the loop remembers one dither
    /// setting per detected frame).
    pub fn feedback(&mut self, frame: u64, test_events: u64, errors: u64) -> Result<(), DeviceError> {
        if !self.detected.contains(&frame) {
            return Err(DeviceError::Unsupported(format!(
                "phase report for frame {frame}, which is not a detected frame awaiting its report"
            )));
        }
        while let Some(f) = self.detected.pop_front() {
            if f == frame {
                self.receiver.feedback(test_events, errors);
                break;
            }
            self.receiver.feedback(0, 0);
        }
        Ok(())
    }
}

impl ReceiverDevice for SimReceiver {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    async fn next_event(&mut self) -> Result<Option<RxEvent>, DeviceError> {
        let Some(frame) = self.photons_in.recv().await else { return Ok(None) };
        Ok(Some(RxEvent::Ready(self.detect(&frame))))
    }

    async fn report_phase_errors(&mut self, frame: u64, test_events: u64, errors: u64) -> Result<(), DeviceError> {
        self.feedback(frame, test_events, errors)
    }

    async fn monitors(&mut self) -> Result<Monitors, DeviceError> {
        Ok(Monitors {
            reference_clock: LockState::Absent,
            sync: LockState::Absent,
            phase: if self.feedback_enabled { LockState::Locked } else { LockState::Absent },
            phase_error_rad: Some(self.receiver.phase_error_rad()),
            frames: self.frames,
            ..Monitors::default()
        })
    }
}

/// A simulated transmitter and receiver joined in memory (photon frames through a channel of a
/// few frames, which paces the source to the receiver), with the generators of `rngs`.
pub fn pair(
    params: &LinkParams,
    frame_pulses: u64,
    rngs: SimRngs,
) -> Result<(SimTransmitter, SimReceiver), DeviceError> {
    let (tx, rx) = mpsc::channel(4);
    let mut t = SimTransmitter::new(params, frame_pulses, rngs.alice)?;
    t.photons_out = Some(tx);
    let r = SimReceiver::new(params, frame_pulses, rngs.bob, rx)?;
    Ok((t, r))
}
