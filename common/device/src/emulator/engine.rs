//! The emulator's physics, one frame at a time: the simulator's source and receiver
//! (`qkd_sim`), then the receiver's detections as raw time tags on Bob's clock (see the parent
//! module's docs for the model).

use std::collections::VecDeque;

use proto::device as pb;
use qkd_core::postproc::finite_key::SourceReading;
use qkd_core::quantum::{FrameStates, Measurement};
use qkd_sim::Source;
use qkd_timetag::synth::TaggerClock;
use qkd_timetag::tags::{Record, Tag};
use rand::Rng;
use rand_chacha::ChaCha20Rng;

use super::{EmulatorConfig, InjectedGap};
use crate::frames::pack_derived;
use crate::info::reading_to_proto;
use crate::sim::{SYNC_CHANNEL, SimRngs, X_MINUS_CHANNEL, X_PLUS_CHANNEL, Z_CHANNEL, alice_frame};
use crate::tagwire::{MAX_TAGS_PER_BATCH, encode_batch};

/// Sync periods the emulator's receiver stream runs on after its last frame.
pub(crate) const TRAILER_SYNCS: u64 = 4;

/// A standard normal number (Box-Muller).
fn normal(rng: &mut ChaCha20Rng) -> f64 {
    let u1: f64 = 1.0 - rng.random::<f64>();
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// Failures before the first success of Bernoulli(p) trials (geometric skipping); `u64::MAX`
/// for p <= 0.
fn geometric(rng: &mut ChaCha20Rng, p: f64) -> u64 {
    if p <= 0.0 {
        return u64::MAX;
    }
    if p >= 1.0 {
        return 0;
    }
    let u: f64 = 1.0 - rng.random::<f64>();
    let k = (u.ln() / (-p).ln_1p()).floor();
    if k >= u64::MAX as f64 { u64::MAX } else { k as u64 }
}

/// What one frame produced.
#[derive(Debug)]
pub(crate) struct FrameOutput {
    /// Frame index.
    pub index: u64,
    /// Alice's frame, as the transmitter serves it.
    pub transmitter: pb::TransmitterEvent,
    /// Bob's tags of the frame's time span, as the receiver serves them.
    pub batches: Vec<pb::TagBatch>,
    /// The source monitor's reading.
    pub reading: SourceReading,
    /// Tags per channel (sync, Z, D+, D-).
    pub tags_per_channel: [u64; 4],
    /// A gap injected in this frame.
    pub gap: Option<InjectedGap>,
    /// The interferometer's phase error after the frame (the simulator's truth), rad.
    pub phase_error_rad: f64,
    /// Correction steps of the phase loop so far.
    pub correction_steps: u64,
}

/// The physics of the emulated link.
pub(crate) struct Engine {
    cfg: EmulatorConfig,
    source: Source,
    receiver: qkd_sim::Receiver,
    rngs: SimRngs,
    clock: TaggerClock,
    period_ps: f64,
    next_frame: u64,
    /// Injected gaps (Bob's ps) that may still cover coming tags.
    active_gaps: Vec<(u64, u64)>,
    /// Frames detected and not yet fed back (the phase loop's dither memory, by frame).
    detected: VecDeque<u64>,
    /// Scratch: (time, channel) of the frame's tags.
    tags: Vec<(u64, u8)>,
}

impl Engine {
    pub fn new(cfg: &EmulatorConfig) -> Self {
        let period_ps = 1e12 / cfg.params.clock_hz;
        Self {
            source: Source::new(&cfg.params),
            receiver: qkd_sim::Receiver::new(&cfg.params),
            rngs: SimRngs::from_seed(cfg.seed),
            clock: TaggerClock {
                period_ps,
                start_ps: cfg.bob_clock_start_ps,
                offset_ppm: cfg.clock_offset_ppm,
                drift_ppm_per_s: cfg.drift_ppm_per_s,
            },
            period_ps,
            next_frame: 0,
            active_gaps: Vec::new(),
            detected: VecDeque::new(),
            tags: Vec::new(),
            cfg: cfg.clone(),
        }
    }

    /// Bob's tagger time (whole ps, floored) of an event `delay_ps` after Alice emits global
    /// pulse `pulse`.
    fn bob_time(&self, pulse: u64, delay_ps: f64) -> u64 {
        self.clock.time_ps(pulse, delay_ps).max(0.0).floor() as u64
    }

    /// The `StreamStart` of a stream that begins with frame `frame`: the acquisition counts as
    /// started one period before the frame's first pulse (the tags of that earlier pulse, frame
    /// `frame - 1`'s, are not in the stream: the pipeline reports that frame dropped).
    pub fn stream_start(&self, frame: u64) -> pb::StreamStart {
        let pulse = frame * self.cfg.frame_pulses;
        pb::StreamStart {
            acquisition_start_ps: self.bob_time(pulse, -self.period_ps),
            first_sync_pulse: i64::try_from(pulse).unwrap_or(i64::MAX),
        }
    }

    /// Feeds one frame's X-basis report to the phase loop (frames detected before it and never
    /// reported count as zero events); a report for a frame not awaiting one is ignored.
    pub fn apply_report(&mut self, frame: u64, test_events: u64, errors: u64) {
        if !self.detected.contains(&frame) {
            tracing::debug!(frame, "emulator: phase report for a frame not awaiting one; ignored");
            return;
        }
        while let Some(f) = self.detected.pop_front() {
            if f == frame {
                self.receiver.feedback(test_events, errors);
                break;
            }
            self.receiver.feedback(0, 0);
        }
    }

    /// The receiver's last batch when the emulation ends: the sync tags of the next
    /// `TRAILER_SYNCS` sync periods after the last frame, so that a pipeline that needs later
    /// syncs (its lookahead) can complete the last frame.
    pub fn trailer(&mut self) -> pb::TagBatch {
        let first = self.next_frame * self.cfg.frame_pulses;
        let records: Vec<Record> = (0..TRAILER_SYNCS)
            .map(|i| {
                let t = self.clock.time_ps(first + i * self.cfg.sync_every, self.cfg.delays_ps[3])
                    + self.cfg.sync_jitter_ps * normal(&mut self.rngs.tags);
                Record::Tag(Tag::new(SYNC_CHANNEL, t.max(0.0).floor() as u64))
            })
            .collect();
        encode_batch(&records, pb::LossReason::Injected)
    }

    /// Produces the next frame.
    pub fn frame(&mut self) -> FrameOutput {
        let n = self.cfg.frame_pulses;
        let f = self.next_frame;
        self.next_frame += 1;
        let first_pulse = f * n;

        // Alice, then Bob: exactly the in-process simulator's draws (`crate::sim`).
        let (secret, photons, reading) = alice_frame(&self.source, n, &mut self.rngs.alice);
        let detections = self.receiver.detect_frame(&photons, n, &mut self.rngs.bob);
        let x_slots = self.receiver.x_slot_counts();
        self.detected.push_back(f);
        if self.detected.len() > 1 << 16 {
            self.detected.pop_front();
        }
        let states = pack_derived(&FrameStates::new(&secret), self.cfg.params.p_z, n).into_bytes();
        drop(secret);
        let transmitter = pb::TransmitterEvent {
            event: Some(pb::transmitter_event::Event::Frame(pb::TransmitterFrame {
                frame_idx: f,
                n_pulses: n,
                start_ps: (first_pulse as f64 * self.period_ps).round() as u64,
                states,
                source: Some(reading_to_proto(&reading)),
            })),
        };

        // Bob's tags.
        let tau = self.cfg.params.bin_separation_ps;
        let w = self.cfg.params.window_ns * 1e3;
        let jitter = self.cfg.jitter_ps;
        let delays = self.cfg.delays_ps;
        let mut tags = std::mem::take(&mut self.tags);
        tags.clear();
        let sync_every = self.cfg.sync_every;
        let mut k = first_pulse;
        while k < first_pulse + n {
            let t = self.clock.time_ps(k, delays[3]) + self.cfg.sync_jitter_ps * normal(&mut self.rngs.tags);
            tags.push((t.max(0.0).floor() as u64, SYNC_CHANNEL));
            k += sync_every;
        }
        // Each detection at the centre of the window the simulator chose, plus jitter.
        let place = |engine: &mut Self, pulse: u64, channel: u8, offset: f64| {
            let delay = delays[usize::from(channel) - 1];
            let t = engine.clock.time_ps(pulse, delay + offset + w / 2.0) + jitter * normal(&mut engine.rngs.tags);
            (t.max(0.0).floor() as u64, channel)
        };
        for d in &detections {
            let (channel, offset) = match d.measurement {
                Measurement::Z { late } => (Z_CHANNEL, if late { tau } else { 0.0 }),
                Measurement::X { minus: false } => (X_PLUS_CHANNEL, tau),
                Measurement::X { minus: true } => (X_MINUS_CHANNEL, tau),
            };
            let tag = place(self, first_pulse + d.pulse_idx, channel, offset);
            tags.push(tag);
        }
        // The side-slot clicks the simulator counted, at random pulses of the frame.
        for _ in 0..x_slots.side {
            let pulse = first_pulse + self.rngs.tags.random_range(0..n);
            let channel = if self.rngs.tags.random::<bool>() { X_PLUS_CHANNEL } else { X_MINUS_CHANNEL };
            let offset = if self.rngs.tags.random::<bool>() { 0.0 } else { 2.0 * tau };
            let tag = place(self, pulse, channel, offset);
            tags.push(tag);
        }
        // Dark counts outside every window (the simulator has those inside them).
        if self.cfg.background_counts {
            let p = self.cfg.params.dark_count_rate_hz * self.period_ps * 1e-12;
            let guard = 6.0 * jitter + 50.0;
            for (channel, slots) in [(Z_CHANNEL, 2u32), (X_PLUS_CHANNEL, 3), (X_MINUS_CHANNEL, 3)] {
                let mut k = geometric(&mut self.rngs.tags, p);
                while k < n {
                    let ph = self.rngs.tags.random::<f64>() * self.period_ps;
                    let inside = (0..slots).any(|s| {
                        let lo = f64::from(s) * tau - guard;
                        let hi = f64::from(s) * tau + w + guard;
                        [ph - self.period_ps, ph, ph + self.period_ps].iter().any(|&x| x >= lo && x <= hi)
                    });
                    if !inside {
                        let delay = delays[usize::from(channel) - 1];
                        tags.push((self.bob_time(first_pulse + k, delay + ph), channel));
                    }
                    k = k.saturating_add(1).saturating_add(geometric(&mut self.rngs.tags, p));
                }
            }
        }
        tags.sort_unstable();

        // An injected gap: from the middle of every `every_frames`-th frame, `duration_ms` long.
        let mut gap = None;
        if let Some(g) = self.cfg.gaps
            && g.every_frames > 0
            && f % g.every_frames == g.every_frames - 1
        {
            let from_pulse = first_pulse + n / 2;
            let to_pulse = from_pulse + (g.duration_ms * 1e-3 * self.cfg.params.clock_hz).ceil() as u64;
            let (from_ps, to_ps) = (self.bob_time(from_pulse, 0.0), self.bob_time(to_pulse, 0.0));
            self.active_gaps.push((from_ps, to_ps));
            gap = Some(InjectedGap { frame: f, from_pulse, to_pulse, from_ps, to_ps });
        }
        let mut records: Vec<Record> = Vec::with_capacity(tags.len() + 1);
        let mut counts = [0u64; 4];
        let mut new_gap = gap.map(|g| (g.from_ps, g.to_ps));
        for &(time, channel) in &tags {
            if let Some((from, to)) = new_gap
                && from <= time
            {
                records.push(Record::Gap { from_ps: from, to_ps: to });
                new_gap = None;
            }
            if self.active_gaps.iter().any(|&(from, to)| from <= time && time <= to) {
                continue;
            }
            counts[usize::from(channel)] += 1;
            records.push(Record::Tag(Tag::new(channel, time)));
        }
        if let Some((from, to)) = new_gap {
            records.push(Record::Gap { from_ps: from, to_ps: to });
        }
        // Gaps that end before the next frame's first tag can no longer matter.
        let next_start = self.bob_time(first_pulse + n, 0.0);
        self.active_gaps.retain(|&(_, to)| to >= next_start);
        self.tags = tags;

        let mut batches = Vec::new();
        let mut rest = records.as_slice();
        loop {
            // Cut after MAX_TAGS_PER_BATCH tags.
            let mut n_tags = 0;
            let cut = rest
                .iter()
                .position(|r| {
                    n_tags += usize::from(matches!(r, Record::Tag(_)));
                    n_tags > MAX_TAGS_PER_BATCH
                })
                .unwrap_or(rest.len());
            let mut b = encode_batch(&rest[..cut], pb::LossReason::Injected);
            b.clock =
                Some(pb::ClockStatus { reference: pb::LockState::Absent as i32, sync: pb::LockState::Locked as i32 });
            batches.push(b);
            rest = &rest[cut..];
            if rest.is_empty() {
                break;
            }
        }
        if f == 0 {
            batches[0].start = Some(self.stream_start(0));
        }
        // Every tag of this frame's pulses has been produced; later pulses' tags come later.
        batches.last_mut().expect("one batch").complete_until_ps = next_start;

        FrameOutput {
            index: f,
            transmitter,
            batches,
            reading,
            tags_per_channel: counts,
            gap,
            phase_error_rad: self.receiver.phase_error_rad(),
            correction_steps: self.receiver.feedback_steps(),
        }
    }
}
