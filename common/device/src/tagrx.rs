//! The receiver side of every time-tag-level device (the `grpc` driver, recordings, PTU and text
//! files): raw tags through [`qkd_timetag::pipeline::Pipeline`] into per-frame detections.
//! [`TagReceiver`] builds the pipeline from the device's description and the stream's start
//! (`StreamStart`), and keeps the frame events contiguous across acquisition restarts.

use std::collections::VecDeque;

use proto::device as pb;
use qkd_timetag::assign::{Calibration, WindowConfig};
use qkd_timetag::clock::{ClockEstimate, DataConfig, SyncConfig};
use qkd_timetag::pipeline::{ClockMode, DropReason, FrameEvent, Pipeline, PipelineConfig, PipelineStats};
use qkd_timetag::tags::Record;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

use crate::frames::{RxEvent, RxFrame};
use crate::info::DeviceInfo;
use crate::tagwire::decode_batch;
use crate::{DeviceError, DeviceRole};

/// How a time-tag-level receiver's pipeline is set up beyond what the device describes.
#[derive(Clone, Debug, PartialEq)]
pub struct PipelineOptions {
    /// A window opens this long before its peak, ps (default: half the described window).
    pub window_before_ps: Option<f64>,
    /// And closes this long after it, ps (default: half the described window).
    pub window_after_ps: Option<f64>,
    /// Each peak is refined within +- this, ps (default: up to 200 ps, as the windows allow).
    pub search_ps: Option<f64>,
    /// Tags a detector's phase histogram needs before its peaks are trusted.
    pub min_counts: u64,
    /// Frames of tags kept for finding the peaks at most.
    pub max_calibration_frames: u64,
    /// Known peak phases (skips the histograms).
    pub calibration: Option<Calibration>,
    /// Whole pulses subtracted from every pulse index (cable delays beyond a period).
    pub pulse_offset: i64,
    /// Seed of the squashing coin; `None` (the default, and the only choice on real data): a
    /// ChaCha20 generator seeded by the operating system, since a double click's random bit is
    /// key.
    pub coin_seed: Option<u64>,
}

impl Default for PipelineOptions {
    fn default() -> Self {
        Self {
            window_before_ps: None,
            window_after_ps: None,
            search_ps: None,
            min_counts: 1000,
            max_calibration_frames: 16,
            calibration: None,
            pulse_offset: 0,
            coin_seed: None,
        }
    }
}

/// Where a tag stream starts (`StreamStart` in `proto/device.proto`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamStartInfo {
    /// Tagger time from which on nothing was lost, ps (`None`: the first record's time).
    pub acquisition_start_ps: Option<u64>,
    /// Global pulse index of the first sync tag.
    pub first_sync_pulse: i64,
}

impl From<&pb::StreamStart> for StreamStartInfo {
    fn from(s: &pb::StreamStart) -> Self {
        Self { acquisition_start_ps: Some(s.acquisition_start_ps), first_sync_pulse: s.first_sync_pulse }
    }
}

/// The pipeline configuration for `info`'s receiver, a stream starting at `start`, and `opts`.
pub fn pipeline_config(
    info: &DeviceInfo,
    start: StreamStartInfo,
    opts: &PipelineOptions,
) -> Result<PipelineConfig, DeviceError> {
    if info.role() != DeviceRole::Receiver {
        return Err(DeviceError::Description("a tag pipeline needs a receiver's description".into()));
    }
    let d = info.description();
    let period = info.period_ps();
    let half = d.window_ps / 2.0;
    let (before, after) = (opts.window_before_ps.unwrap_or(half), opts.window_after_ps.unwrap_or(half));
    let search =
        opts.search_ps.unwrap_or_else(|| ((d.bin_separation_ps - before - after) / 2.0 - 1.0).clamp(0.0, 200.0));
    let max_offset_ppm = if d.max_clock_offset_ppm > 0.0 { d.max_clock_offset_ppm } else { 200.0 };
    let clock = if info.sync_every_pulses() > 0 {
        ClockMode::Sync(SyncConfig {
            nominal_period_ps: period,
            sync_every: info.sync_every_pulses(),
            first_sync_pulse: start.first_sync_pulse,
            max_offset_ppm,
            max_drift_ppm_per_s: if d.max_clock_drift_ppm_per_s > 0.0 { d.max_clock_drift_ppm_per_s } else { 2.0 },
            ..SyncConfig::default()
        })
    } else {
        ClockMode::Data(DataConfig {
            nominal_period_ps: period,
            bin_separation_ps: d.bin_separation_ps,
            max_offset_ppm,
            ..DataConfig::default()
        })
    };
    Ok(PipelineConfig {
        frame_pulses: info.frame_pulses(),
        clock,
        windows: WindowConfig {
            period_ps: period,
            bin_separation_ps: d.bin_separation_ps,
            before_ps: before,
            after_ps: after,
            pulse_offset: opts.pulse_offset,
            search_ps: search,
            min_counts: opts.min_counts,
            ..WindowConfig::default()
        },
        calibration: opts.calibration.clone(),
        max_calibration_pulses: opts.max_calibration_frames.max(1).saturating_mul(info.frame_pulses()),
        stream_start_ps: start.acquisition_start_ps,
        ..PipelineConfig::default()
    })
}

/// Raw tags in, contiguous frame events out (module docs).
pub struct TagReceiver {
    info: DeviceInfo,
    opts: PipelineOptions,
    pipeline: Option<Pipeline>,
    /// The generator of the squashing coins.
    coin: ChaCha20Rng,
    events: VecDeque<RxEvent>,
    /// The next frame index to report (after the first).
    next: Option<u64>,
    /// Finished pipelines' statistics, summed.
    stats: PipelineStats,
    scratch: Vec<Record>,
    finished: bool,
    /// The first pipeline's first reported frame, once known.
    first_frame: Option<u64>,
    /// The clock estimate of the last pipeline when it finished.
    last_clock: Option<ClockEstimate>,
}

impl std::fmt::Debug for TagReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TagReceiver")
            .field("next", &self.next)
            .field("finished", &self.finished)
            .finish_non_exhaustive()
    }
}

impl TagReceiver {
    /// A receiver for the device `info` (a receiver's description).
    pub fn new(info: DeviceInfo, opts: PipelineOptions) -> Result<Self, DeviceError> {
        if info.role() != DeviceRole::Receiver {
            return Err(DeviceError::Description(format!("expected a receiver, the device is a {}", info.role())));
        }
        let coin = match opts.coin_seed {
            Some(seed) => ChaCha20Rng::seed_from_u64(seed),
            None => ChaCha20Rng::from_os_rng(),
        };
        Ok(Self {
            info,
            opts,
            pipeline: None,
            coin,
            events: VecDeque::new(),
            next: None,
            stats: PipelineStats::default(),
            scratch: Vec::new(),
            finished: false,
            first_frame: None,
            last_clock: None,
        })
    }

    /// The device's description.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// Starts a stream (or restarts it: the current pipeline is finished first, its last frame
    /// dropped).
    pub fn start(&mut self, start: StreamStartInfo) -> Result<(), DeviceError> {
        if self.pipeline.is_some() {
            self.finish_pipeline()?;
        }
        let cfg = pipeline_config(&self.info, start, &self.opts)?;
        // Each pipeline's coin is drawn from the receiver's generator.
        let mut fork = ChaCha20Rng::from_seed(self.coin.random());
        let coin: Box<dyn FnMut() -> bool + Send> = Box::new(move || fork.random());
        self.pipeline = Some(Pipeline::new(cfg, self.info.channel_map().expect("a receiver has a map"), coin)?);
        Ok(())
    }

    /// Feeds one batch of the wire form (its `start`, if any, (re)starts the stream; a batch
    /// before any start starts a stream at its first record, with the first sync marking
    /// pulse 0).
    pub fn push_batch(&mut self, batch: &pb::TagBatch) -> Result<(), DeviceError> {
        if let Some(start) = &batch.start {
            self.start(start.into())?;
        }
        let mut records = std::mem::take(&mut self.scratch);
        records.clear();
        let r = decode_batch(batch, &mut records).and_then(|_| self.push_records(&records));
        self.scratch = records;
        r
    }

    /// Feeds records in stream order.
    pub fn push_records(&mut self, records: &[Record]) -> Result<(), DeviceError> {
        if self.finished {
            return Err(DeviceError::Malformed("records after the end of the stream".into()));
        }
        if self.pipeline.is_none() {
            self.start(StreamStartInfo { acquisition_start_ps: None, first_sync_pulse: 0 })?;
        }
        let p = self.pipeline.as_mut().expect("started");
        p.push_records(records)?;
        self.collect();
        Ok(())
    }

    /// End of the stream: everything buffered is processed; the frame it ended in is dropped.
    pub fn finish(&mut self) -> Result<(), DeviceError> {
        if !self.finished {
            self.finished = true;
            if self.pipeline.is_some() {
                self.finish_pipeline()?;
            }
        }
        Ok(())
    }

    fn finish_pipeline(&mut self) -> Result<(), DeviceError> {
        let mut p = self.pipeline.take().expect("a pipeline");
        let r = p.finish();
        self.collect_from(&mut p);
        self.last_clock = p.clock_estimate();
        let s = p.stats();
        add_stats(&mut self.stats, s);
        r.map_err(Into::into)
    }

    fn collect(&mut self) {
        if let Some(mut p) = self.pipeline.take() {
            self.collect_from(&mut p);
            self.pipeline = Some(p);
        }
    }

    fn collect_from(&mut self, p: &mut Pipeline) {
        if self.first_frame.is_none() {
            self.first_frame = p.first_frame();
        }
        let n_pulses = self.info.frame_pulses();
        while let Some(e) = p.next_event() {
            let index = e.frame();
            if let Some(next) = self.next {
                if index < next {
                    // Already reported by a previous pipeline (an acquisition restart).
                    continue;
                }
                for missing in next..index {
                    self.events.push_back(RxEvent::Dropped { index: missing, reason: DropReason::StreamStart });
                }
            }
            self.next = Some(index + 1);
            self.events.push_back(match e {
                FrameEvent::Ready(f) => RxEvent::Ready(RxFrame {
                    index: f.index,
                    n_pulses,
                    detections: f.detections,
                    x_slots: f.counters.x_slots,
                    counters: Some(f.counters),
                }),
                FrameEvent::Dropped { frame, reason } => RxEvent::Dropped { index: frame, reason },
            });
        }
    }

    /// The next frame event, in frame order.
    pub fn next_event(&mut self) -> Option<RxEvent> {
        self.events.pop_front()
    }

    /// Whether the stream has ended and every event has been taken.
    pub fn is_done(&self) -> bool {
        self.finished && self.events.is_empty()
    }

    /// Counts over the whole stream (all pipelines so far).
    pub fn stats(&self) -> PipelineStats {
        let mut s = self.stats;
        if let Some(p) = &self.pipeline {
            add_stats(&mut s, p.stats());
        }
        s
    }

    /// The clock's current estimate (at the end of the stream: the last one).
    pub fn clock_estimate(&self) -> Option<ClockEstimate> {
        self.pipeline.as_ref().map_or(self.last_clock, Pipeline::clock_estimate)
    }

    /// The first frame the stream reports (once the first pipeline's windows are known): 0 when
    /// the clock locked and the windows were found without losing a frame.
    pub fn first_frame(&self) -> Option<u64> {
        self.first_frame.or_else(|| self.pipeline.as_ref().and_then(Pipeline::first_frame))
    }
}

fn add_stats(total: &mut PipelineStats, s: &PipelineStats) {
    total.detector_tags += s.detector_tags;
    total.sync_tags += s.sync_tags;
    total.syncs_rejected += s.syncs_rejected;
    total.acquisition_restarts += s.acquisition_restarts;
    total.clock_tags += s.clock_tags;
    total.markers += s.markers;
    total.unknown_channel += s.unknown_channel;
    total.gaps += s.gaps;
    total.discarded_before_start += s.discarded_before_start;
    total.discarded_late += s.discarded_late;
    total.discarded_dropped += s.discarded_dropped;
    total.frames_ready += s.frames_ready;
    total.frames_dropped += s.frames_dropped;
}
