//! The pipeline: records in, per-frame detections out. It wires the channel map, clock recovery
//! ([`crate::clock`]), window calibration and assignment ([`crate::assign`]) and gap handling
//! ([`crate::gap`]) into one streaming processor, fed in tagger-time order by any source (a
//! live device, an emulator, [`crate::ptu`] or [`crate::text`] files).
//!
//! # Flow
//! 1. Detector tags wait in a buffer until the clock model covers them (sync mode: `lookahead`
//!    syncs later; data mode: `lookahead` blocks later). Sync tags (or, in data mode, the Z
//!    detector's tags) drive the tracking loop.
//! 2. Until the windows are known, final tags only fill each detector's phase histogram (and
//!    are kept, as pulse coordinates); once every detector's peaks are clear, the windows are
//!    set and the kept tags are assigned like any other. Given a [`Calibration`], this step is
//!    skipped.
//! 3. Each final tag is mapped to (pulse, outcome) and added to its frame. A frame is emitted
//!    ([`FrameEvent::Ready`]) once the model has passed its last pulse's reach, or dropped
//!    ([`FrameEvent::Dropped`]) if a gap touched it, if the stream began inside it, or if the
//!    stream ended inside it. Frames come out in index order, each exactly once, from the
//!    first fully observed one on.
//!
//! Frame indices are global pulse index / `frame_pulses`; the pulse index comes from the sync
//! (`first_sync_pulse`) or, in data mode, counts from the first Z click (see
//! [`crate::clock::DataTracker`]).
//!
//! Records must come in time order, to within a pulse period (tags further out of order may be
//! discarded, and are counted). Latency: a frame is emitted once the clock is final past its
//! end, i.e. `lookahead` syncs later (with the defaults and one sync per frame, about three
//! frames, 165 ms; with frequent syncs, little more than a frame).
//!
//! # Cost
//! Per detector tag: a channel lookup and a copy into the buffer; later one segment lookup
//! (a cursor that moves forward), one 64 x 64-bit multiplication, up to three window
//! comparisons and a push into the frame's buffer. No allocation per tag (buffers are reused).

use std::collections::VecDeque;
use std::ops::RangeInclusive;

use qkd_core::quantum::Detection;

use crate::assign::{Assigner, Calibration, FrameBuilder, FrameCounters, PhaseHistogram, WindowConfig, WindowError};
use crate::clock::{ClockError, ClockEstimate, DataConfig, DataTracker, Segment, SyncConfig, SyncTracker, SyncVerdict};
use crate::gap::PendingGaps;
use crate::tags::{ChannelMap, Record, Role, Tag};

/// Channel lookup codes besides the detector indices 0..=2.
const SYNC: u8 = 3;
const CLOCK: u8 = 4;
const NONE: u8 = 255;

/// How the clock is recovered.
#[derive(Clone, Debug, PartialEq)]
pub enum ClockMode {
    /// From Alice's sync channel.
    Sync(SyncConfig),
    /// From the Z detector's clicks alone (no sync; relative pulse indices).
    Data(DataConfig),
}

/// Pipeline settings.
#[derive(Clone, Debug, PartialEq)]
pub struct PipelineConfig {
    /// Pulses per frame.
    pub frame_pulses: u64,
    /// Clock recovery.
    pub clock: ClockMode,
    /// Windows.
    pub windows: WindowConfig,
    /// Known peak phases; `None`: found from the first tags' histograms.
    pub calibration: Option<Calibration>,
    /// Pulses of tags kept for calibration at most; beyond, a detector without clear peaks is
    /// an error.
    pub max_calibration_pulses: u64,
    /// Detector tags buffered at most while the clock is not locked (older ones are discarded
    /// beyond).
    pub max_unlocked_tags: usize,
    /// Tagger time at which the acquisition began (PicoQuant files and most taggers: 0), so
    /// that the first frame counts as fully observed when it began after it. `None`: the first
    /// record's time (safe for a stream cut anywhere; may cost the first frame).
    pub stream_start_ps: Option<u64>,
}

impl Default for PipelineConfig {
    /// Frames of 2^22 pulses, sync per frame, default windows, calibration from histograms over
    /// at most 4 frames, 2^22 tags buffered before lock, stream start at the first record.
    fn default() -> Self {
        Self {
            frame_pulses: 1 << 22,
            clock: ClockMode::Sync(SyncConfig::default()),
            windows: WindowConfig::default(),
            calibration: None,
            max_calibration_pulses: 4 << 22,
            max_unlocked_tags: 1 << 22,
            stream_start_ps: None,
        }
    }
}

/// Why a frame was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// A gap (lost data) touched it.
    Gap,
    /// The stream (or the clock model) began inside it.
    StreamStart,
    /// The stream ended inside it.
    StreamEnd,
}

/// One frame's result.
#[derive(Clone, Debug, PartialEq)]
pub struct Frame {
    /// Frame index.
    pub index: u64,
    /// Detections, ascending by pulse index within the frame, at most one per pulse.
    pub detections: Vec<Detection>,
    /// Counters (outside windows, side slots, squashing).
    pub counters: FrameCounters,
}

/// What the pipeline reports, in frame order.
#[derive(Clone, Debug, PartialEq)]
pub enum FrameEvent {
    /// A complete frame.
    Ready(Frame),
    /// A frame that must be dropped at both ends.
    Dropped {
        /// Frame index.
        frame: u64,
        /// Why.
        reason: DropReason,
    },
}

impl FrameEvent {
    /// The frame index.
    pub fn frame(&self) -> u64 {
        match self {
            FrameEvent::Ready(f) => f.index,
            FrameEvent::Dropped { frame, .. } => *frame,
        }
    }
}

/// Counts over the whole stream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PipelineStats {
    /// Detector tags received.
    pub detector_tags: u64,
    /// Sync tags received.
    pub sync_tags: u64,
    /// Sync tags rejected as inconsistent.
    pub syncs_rejected: u64,
    /// Acquisition restarts (spurious first sync).
    pub acquisition_restarts: u64,
    /// Tags of the reference-clock channel (not used yet), and in data mode of a sync channel.
    pub clock_tags: u64,
    /// Marker records.
    pub markers: u64,
    /// Tags on channels without a role.
    pub unknown_channel: u64,
    /// Gap records.
    pub gaps: u64,
    /// Detector tags discarded before the model or the first reported frame began (or too far
    /// out of time order to be mapped, or dropped from the buffer while the clock was unlocked).
    pub discarded_before_start: u64,
    /// Detector tags that arrived after their frame had been emitted (out of order).
    pub discarded_late: u64,
    /// Detector tags of dropped frames.
    pub discarded_dropped: u64,
    /// Frames emitted complete.
    pub frames_ready: u64,
    /// Frames dropped.
    pub frames_dropped: u64,
}

/// Why the pipeline stopped.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum PipelineError {
    /// A configuration that cannot work.
    #[error("pipeline configuration: {0}")]
    Config(String),
    /// Clock recovery failed (configuration or lock lost).
    #[error(transparent)]
    Clock(#[from] ClockError),
    /// The windows could not be set.
    #[error(transparent)]
    Window(#[from] WindowError),
}

/// The clock tracker of either mode.
#[derive(Clone, Debug)]
enum Tracker {
    Sync(SyncTracker),
    Data(DataTracker),
}

impl Tracker {
    fn final_time(&self) -> Option<u64> {
        match self {
            Tracker::Sync(t) => t.final_time(),
            Tracker::Data(t) => t.final_time(),
        }
    }

    fn final_pulse(&self) -> Option<i64> {
        match self {
            Tracker::Sync(t) => t.final_pulse(),
            Tracker::Data(t) => t.final_pulse(),
        }
    }

    fn estimate(&self) -> Option<ClockEstimate> {
        match self {
            Tracker::Sync(t) => t.estimate(),
            Tracker::Data(t) => t.estimate(),
        }
    }

    /// Pulse coordinate of `t` under the current fit.
    fn coordinate(&self, t: u64) -> Option<f64> {
        let fit = match self {
            Tracker::Sync(s) => s.fit(),
            Tracker::Data(d) => d.fit(),
        }?;
        let (k, f) = fit.coordinate_at(t);
        Some(k as f64 + f)
    }
}

/// One frame being collected.
#[derive(Debug)]
struct Slot {
    index: i64,
    builder: FrameBuilder,
    dropped: Option<DropReason>,
}

/// Mutable state of frame collection, apart from the clock.
#[derive(Debug, Default)]
struct Frames {
    /// Open frames, contiguous from `next`.
    open: VecDeque<Slot>,
    /// Next frame to emit.
    next: i64,
    /// Builders to reuse.
    spare: Vec<FrameBuilder>,
    /// Pulse range of the frame last looked up, and its position in `open`.
    cur: (i64, i64, usize),
}

impl Frames {
    /// The position in `open` of frame `f` (>= `next`), creating slots up to it.
    fn slot(&mut self, f: i64) -> usize {
        let front = self.open.front().map_or(self.next, |s| s.index);
        while self.open.back().map_or(front - 1, |s| s.index) < f {
            let index = self.open.back().map_or(front, |s| s.index + 1);
            let builder = self.spare.pop().unwrap_or_default();
            self.open.push_back(Slot { index, builder, dropped: None });
        }
        (f - front) as usize
    }
}

/// Records in, frame events out (module docs).
pub struct Pipeline {
    cfg: PipelineConfig,
    /// Channel -> detector index, SYNC, CLOCK or NONE.
    lut: [u8; 256],
    /// Which detector indices are present.
    present: [bool; 3],
    tracker: Tracker,
    segs: VecDeque<Segment>,
    cursor: usize,
    /// Detector tags not yet final; `channel` holds the detector index.
    pending: VecDeque<Tag>,
    gaps: PendingGaps,
    gap_frames: Vec<RangeInclusive<i64>>,
    assigner: Option<Assigner>,
    calibration: Option<Calibration>,
    hists: [PhaseHistogram; 3],
    /// Final tags kept during calibration: (pulse, fraction, detector).
    held: Vec<(i64, u64, u8)>,
    frames: Frames,
    /// Frames before this are never reported (set once calibrated).
    first_frame: Option<i64>,
    /// Coordinate where the model began (first segment).
    model_start: Option<f64>,
    /// Time of the first and of the latest record.
    first_time: Option<u64>,
    last_time: u64,
    last_final: Option<u64>,
    events: VecDeque<FrameEvent>,
    coin: Box<dyn FnMut() -> bool + Send>,
    stats: PipelineStats,
    failed: Option<PipelineError>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("cfg", &self.cfg)
            .field("stats", &self.stats)
            .field("first_frame", &self.first_frame)
            .finish_non_exhaustive()
    }
}

impl Pipeline {
    /// A pipeline for `cfg` over the channels of `map`. `coin` decides squashing of multiple
    /// clicks (see [`crate::assign`]): on real data a cryptographic generator.
    pub fn new(
        cfg: PipelineConfig,
        map: &ChannelMap,
        coin: Box<dyn FnMut() -> bool + Send>,
    ) -> Result<Self, PipelineError> {
        if cfg.frame_pulses == 0 || cfg.frame_pulses > 1 << 40 {
            return Err(PipelineError::Config("frame_pulses must be in 1..=2^40".into()));
        }
        cfg.windows.validate()?;
        let tracker = match &cfg.clock {
            ClockMode::Sync(s) => {
                if map.channel(Role::Sync).is_none() {
                    return Err(PipelineError::Config("sync clock recovery needs a sync channel in the map".into()));
                }
                Tracker::Sync(SyncTracker::new(s.clone())?)
            }
            ClockMode::Data(d) => Tracker::Data(DataTracker::new(d.clone())?),
        };
        let mut lut = [NONE; 256];
        let mut present = [false; 3];
        for &(role, ch) in map.entries() {
            lut[usize::from(ch)] = match role {
                Role::Sync if matches!(cfg.clock, ClockMode::Sync(_)) => SYNC,
                Role::Sync | Role::Clock => CLOCK,
                det => {
                    let i = crate::assign::detector_index(det).expect("a detector");
                    present[i] = true;
                    i as u8
                }
            };
        }
        let (assigner, calibration) = match &cfg.calibration {
            Some(cal) => {
                for (i, role) in [Role::Z, Role::XPlus, Role::XMinus].into_iter().enumerate() {
                    if present[i] && cal.peaks_of(role).is_none() {
                        return Err(PipelineError::Config(format!("the calibration lacks {role}")));
                    }
                }
                (Some(Assigner::new(&cfg.windows, cal)?), Some(cal.clone()))
            }
            None => (None, None),
        };
        let bins = cfg.windows.histogram_bins;
        Ok(Self {
            lut,
            present,
            tracker,
            segs: VecDeque::new(),
            cursor: 0,
            pending: VecDeque::new(),
            gaps: PendingGaps::new(),
            gap_frames: Vec::new(),
            assigner,
            calibration,
            hists: [PhaseHistogram::new(bins), PhaseHistogram::new(bins), PhaseHistogram::new(bins)],
            held: Vec::new(),
            frames: Frames::default(),
            first_frame: None,
            model_start: None,
            first_time: None,
            last_time: 0,
            last_final: None,
            events: VecDeque::new(),
            coin,
            stats: PipelineStats::default(),
            failed: None,
            cfg,
        })
    }

    /// The next frame event, in frame order.
    pub fn next_event(&mut self) -> Option<FrameEvent> {
        self.events.pop_front()
    }

    /// Counts so far.
    pub fn stats(&self) -> &PipelineStats {
        &self.stats
    }

    /// The clock's current estimate.
    pub fn clock_estimate(&self) -> Option<ClockEstimate> {
        self.tracker.estimate()
    }

    /// The peak phases in use, once known.
    pub fn calibration(&self) -> Option<&Calibration> {
        self.calibration.as_ref()
    }

    /// The first frame that will be reported, once the windows are known.
    pub fn first_frame(&self) -> Option<u64> {
        self.first_frame.map(|f| f as u64)
    }

    /// The next frame index to be reported: after an error, frames from here on were not.
    pub fn next_frame(&self) -> u64 {
        self.frames.next.max(0) as u64
    }

    /// Feeds one record.
    pub fn push(&mut self, record: &Record) -> Result<(), PipelineError> {
        match *record {
            Record::Tag(t) => self.push_tags(std::slice::from_ref(&t)),
            Record::Gap { from_ps, to_ps } => self.push_gap(from_ps, to_ps),
            Record::Marker { time_ps, .. } => {
                self.stats.markers += 1;
                self.see_time(time_ps);
                Ok(())
            }
        }
    }

    /// Feeds records (in time order).
    pub fn push_records(&mut self, records: &[Record]) -> Result<(), PipelineError> {
        for r in records {
            match r {
                Record::Tag(t) => self.push_tag(*t)?,
                other => self.push(other)?,
            }
        }
        Ok(())
    }

    /// Feeds tags (in time order).
    pub fn push_tags(&mut self, tags: &[Tag]) -> Result<(), PipelineError> {
        for &t in tags {
            self.push_tag(t)?;
        }
        Ok(())
    }

    /// Records that data were lost between `from_ps` and `to_ps`.
    pub fn push_gap(&mut self, from_ps: u64, to_ps: u64) -> Result<(), PipelineError> {
        self.check()?;
        self.stats.gaps += 1;
        self.see_time(from_ps);
        self.see_time(to_ps);
        self.gaps.push(from_ps, to_ps);
        if let Tracker::Data(d) = &mut self.tracker {
            let r = d.gap(from_ps, to_ps, &mut self.segs);
            self.fail_on(r.map_err(PipelineError::from))?;
            self.after_clock()?;
        }
        Ok(())
    }

    /// End of stream: processes everything buffered, emits the frames the stream covered and
    /// drops the one it ended in.
    pub fn finish(&mut self) -> Result<(), PipelineError> {
        self.check()?;
        let end = self.last_time;
        let r = match &mut self.tracker {
            Tracker::Sync(s) => {
                s.finish(end, &mut self.segs);
                Ok(())
            }
            Tracker::Data(d) => d.finish(end, &mut self.segs),
        };
        self.fail_on(r.map_err(PipelineError::from))?;
        let Some(t_fin) = self.tracker.final_time() else { return Ok(()) };
        self.note_model_start();
        let r = self.process_until(t_fin, true);
        self.fail_on(r)?;
        if self.assigner.is_none() {
            return Ok(());
        }
        let end_coordinate = self.coordinate(end);
        self.resolve_gaps(u64::MAX);
        self.emit_complete(end_coordinate.floor());
        // The frame the stream ended in (if it reached it) is incomplete.
        let reach = self.reach();
        let mut f = self.frames.next;
        while (f as f64) * self.cfg.frame_pulses as f64 + reach.0 <= end_coordinate {
            let dropped = self.frames.open.front().filter(|s| s.index == f).and_then(|s| s.dropped);
            self.drop_front(f, dropped.unwrap_or(DropReason::StreamEnd));
            f += 1;
        }
        Ok(())
    }

    /// Returns the stored error, if the pipeline has failed.
    fn check(&self) -> Result<(), PipelineError> {
        match &self.failed {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    /// Stores an error so that every later call returns it.
    fn fail_on<T>(&mut self, r: Result<T, PipelineError>) -> Result<T, PipelineError> {
        if let Err(e) = &r {
            self.failed = Some(e.clone());
        }
        r
    }

    fn see_time(&mut self, t: u64) {
        self.first_time.get_or_insert(t);
        self.last_time = self.last_time.max(t);
    }

    /// One tag: the hot path.
    #[inline]
    fn push_tag(&mut self, t: Tag) -> Result<(), PipelineError> {
        if self.failed.is_some() {
            return self.check();
        }
        let code = self.lut[usize::from(t.channel)];
        if code >= SYNC {
            return self.push_other(t, code);
        }
        self.stats.detector_tags += 1;
        self.pending.push_back(Tag { channel: code, time_ps: t.time_ps });
        if self.first_time.is_none() {
            self.first_time = Some(t.time_ps);
        }
        self.last_time = self.last_time.max(t.time_ps);
        match &mut self.tracker {
            Tracker::Data(d) if code == 0 => match d.observe(t.time_ps, &mut self.segs) {
                Ok(false) => Ok(()),
                Ok(true) => self.after_clock(),
                Err(e) => self.fail_on(Err(e.into())),
            },
            _ => {
                if self.last_final.is_none() && self.pending.len() > self.cfg.max_unlocked_tags {
                    self.discard_unlocked();
                }
                Ok(())
            }
        }
    }

    /// A sync, clock or unknown tag.
    fn push_other(&mut self, t: Tag, code: u8) -> Result<(), PipelineError> {
        self.check()?;
        self.see_time(t.time_ps);
        match code {
            SYNC => {
                self.stats.sync_tags += 1;
                let Tracker::Sync(s) = &mut self.tracker else { unreachable!("SYNC only in sync mode") };
                let r = s.observe(t.time_ps, &mut self.segs);
                match self.fail_on(r.map_err(PipelineError::from))? {
                    SyncVerdict::Accepted(_) => {}
                    SyncVerdict::Rejected => self.stats.syncs_rejected += 1,
                    SyncVerdict::Restarted => {
                        self.stats.syncs_rejected += 1;
                        self.stats.acquisition_restarts += 1;
                    }
                }
                self.after_clock()
            }
            CLOCK => {
                self.stats.clock_tags += 1;
                Ok(())
            }
            _ => {
                self.stats.unknown_channel += 1;
                Ok(())
            }
        }
    }

    /// Drops the oldest half of the buffer while the clock is not locked.
    fn discard_unlocked(&mut self) {
        let n = self.pending.len() / 2;
        self.pending.drain(..n);
        self.stats.discarded_before_start += n as u64;
    }

    /// After the clock may have produced segments: processes what became final.
    fn after_clock(&mut self) -> Result<(), PipelineError> {
        let Some(t_fin) = self.tracker.final_time() else {
            if self.pending.len() > self.cfg.max_unlocked_tags {
                self.discard_unlocked();
            }
            return Ok(());
        };
        if self.last_final == Some(t_fin) {
            return Ok(());
        }
        self.last_final = Some(t_fin);
        self.note_model_start();
        let r = self.process_until(t_fin, false);
        self.fail_on(r)
    }

    fn note_model_start(&mut self) {
        if self.model_start.is_none()
            && let Some(s) = self.segs.front()
        {
            self.model_start = Some(s.pulse as f64 + s.frac as f64 / 18_446_744_073_709_551_616.0);
        }
    }

    /// Processes the buffered tags before `t_fin` (all of them at the end of the stream).
    fn process_until(&mut self, t_fin: u64, end: bool) -> Result<(), PipelineError> {
        let n = if end {
            self.pending.len()
        } else {
            self.pending.iter().position(|t| t.time_ps >= t_fin).unwrap_or(self.pending.len())
        };
        if self.assigner.is_none() {
            self.histogram(n);
            self.pending.drain(..n);
            if !self.try_calibrate(end)? {
                return Ok(());
            }
            self.start_frames();
            self.resolve_gaps(t_fin);
            self.assign_held();
        } else {
            if self.first_frame.is_none() {
                self.start_frames();
            }
            self.resolve_gaps(t_fin);
            self.assign_pending(n);
            self.pending.drain(..n);
        }
        if !end && let Some(k) = self.tracker.final_pulse() {
            self.emit_complete(k as f64);
        }
        self.prune_segments();
        Ok(())
    }

    /// The segment covering `t` (moving `cursor`), if any.
    #[inline]
    fn locate(segs: &VecDeque<Segment>, cursor: &mut usize, t: u64) -> Option<(i64, u64)> {
        let mut c = *cursor;
        while c + 1 < segs.len() && segs[c + 1].start_ps <= t {
            c += 1;
        }
        while c > 0 && segs[c].start_ps > t {
            c -= 1;
        }
        *cursor = c;
        let s = segs.get(c)?;
        if t < s.start_ps {
            return None;
        }
        Some(s.coordinate(t))
    }

    /// Calibration phase: the first `n` buffered tags into the histograms and `held`.
    fn histogram(&mut self, n: usize) {
        for t in self.pending.range(..n) {
            match Self::locate(&self.segs, &mut self.cursor, t.time_ps) {
                Some((k, f)) => {
                    self.hists[usize::from(t.channel)].add(f);
                    self.held.push((k, f, t.channel));
                }
                None => self.stats.discarded_before_start += 1,
            }
        }
    }

    /// Sets the windows once every detector's histogram is clear (or, at the end of the stream
    /// or past `max_calibration_pulses`, fails). Returns whether calibrated.
    fn try_calibrate(&mut self, end: bool) -> Result<bool, PipelineError> {
        let roles = [Role::Z, Role::XPlus, Role::XMinus];
        let hists: Vec<(Role, &PhaseHistogram)> =
            (0..3).filter(|&i| self.present[i]).map(|i| (roles[i], &self.hists[i])).collect();
        let span = match (self.held.first(), self.held.last()) {
            (Some(a), Some(b)) => (b.0 - a.0) as u64,
            _ => 0,
        };
        let enough = hists.iter().all(|(_, h)| h.total() >= self.cfg.windows.min_counts);
        if !enough && !end && span < self.cfg.max_calibration_pulses {
            return Ok(false);
        }
        match Calibration::from_histograms(&self.cfg.windows, &hists) {
            Ok(cal) => {
                self.assigner = Some(Assigner::new(&self.cfg.windows, &cal)?);
                self.calibration = Some(cal);
                Ok(true)
            }
            Err(_) if !end && span < self.cfg.max_calibration_pulses => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Tags of pulse k lie in coordinates [k + reach.0, k + reach.1).
    fn reach(&self) -> (f64, f64) {
        let (lo, hi) = self.assigner.as_ref().map_or((0.0, 1.0), Assigner::shift_range);
        let off = self.cfg.windows.pulse_offset as f64;
        (lo + off, hi + off)
    }

    /// Pulse coordinate of tagger time `t`: from the segments where they reach, else the fit.
    fn coordinate(&self, t: u64) -> f64 {
        let i = self.segs.partition_point(|s| s.start_ps <= t);
        if i > 0 && i < self.segs.len() {
            let (k, f) = self.segs[i - 1].coordinate(t);
            return k as f64 + f as f64 / 18_446_744_073_709_551_616.0;
        }
        self.tracker.coordinate(t).unwrap_or(f64::NEG_INFINITY)
    }

    /// Once the windows are known: the first frame to report, and the one the model began in.
    fn start_frames(&mut self) {
        let reach = self.reach();
        let start = self.model_start.unwrap_or(0.0);
        let stream = self.cfg.stream_start_ps.or(self.first_time).map_or(start, |t| self.coordinate(t));
        let begin = start.max(stream);
        let f = self.cfg.frame_pulses as f64;
        let first = (((begin - reach.0) / f).ceil() as i64).max(0);
        self.first_frame = Some(first);
        self.frames.next = first;
        // The frame before, if the stream covered part of it, is incomplete.
        if first > 0 && (first as f64) * f - 1.0 + reach.1 > begin {
            self.events.push_back(FrameEvent::Dropped { frame: (first - 1) as u64, reason: DropReason::StreamStart });
            self.stats.frames_dropped += 1;
        }
    }

    /// Marks the frames touched by gaps that start before `t_fin`.
    fn resolve_gaps(&mut self, t_fin: u64) {
        if self.gaps.is_empty() || self.first_frame.is_none() {
            return;
        }
        let reach = self.reach();
        let mut ranges = std::mem::take(&mut self.gap_frames);
        let this = &*self;
        let mut gaps = this.gaps.clone();
        gaps.resolve(t_fin, |t| this.coordinate(t), reach, self.cfg.frame_pulses, &mut ranges);
        self.gaps = gaps;
        for r in ranges.drain(..) {
            let from = (*r.start()).max(self.frames.next);
            for f in from..=*r.end() {
                let i = self.frames.slot(f);
                self.frames.open[i].dropped = Some(DropReason::Gap);
            }
        }
        self.gap_frames = ranges;
        self.frames.cur = (0, 0, usize::MAX);
    }

    /// Assigns the first `n` buffered tags: the hot loop. The current segment and the start of
    /// the next are kept in locals; only a tag beyond them looks the segments up again.
    fn assign_pending(&mut self, n: usize) {
        let Self { pending, segs, cursor, assigner, frames, stats, cfg, first_frame, .. } = self;
        let a = assigner.as_ref().expect("calibrated");
        let first_pulse = first_frame.expect("started") * cfg.frame_pulses as i64;
        let (mut seg, mut lo, mut hi) = (Segment { start_ps: u64::MAX, pulse: 0, frac: 0, slope: 0 }, u64::MAX, 0u64);
        for t in pending.range(..n) {
            let time = t.time_ps;
            if time < lo || time >= hi {
                if Self::locate(segs, cursor, time).is_none() {
                    stats.discarded_before_start += 1;
                    continue;
                }
                seg = segs[*cursor];
                lo = seg.start_ps;
                hi = segs.get(*cursor + 1).map_or(u64::MAX, |s| s.start_ps);
            }
            let (k, f) = seg.coordinate(time);
            let (pulse, code) = a.classify(usize::from(t.channel), k, f);
            place(frames, stats, cfg.frame_pulses, first_pulse, pulse, code);
        }
    }

    /// Assigns the tags kept during calibration.
    fn assign_held(&mut self) {
        let held = std::mem::take(&mut self.held);
        let Self { assigner, frames, stats, cfg, first_frame, .. } = self;
        let a = assigner.as_ref().expect("calibrated");
        let first_pulse = first_frame.expect("started") * cfg.frame_pulses as i64;
        for &(k, f, det) in &held {
            let (pulse, code) = a.classify(usize::from(det), k, f);
            place(frames, stats, cfg.frame_pulses, first_pulse, pulse, code);
        }
    }

    /// Emits every frame whose tags all lie before pulse coordinate `limit`.
    fn emit_complete(&mut self, limit: f64) {
        let reach = self.reach();
        let fp = self.cfg.frame_pulses as f64;
        while ((self.frames.next + 1) as f64) * fp - 1.0 + reach.1 + 1.0 <= limit {
            let f = self.frames.next;
            let i = self.frames.slot(f);
            debug_assert_eq!(i, 0);
            let mut slot = self.frames.open.pop_front().expect("slot exists");
            self.frames.next += 1;
            self.frames.cur = (0, 0, usize::MAX);
            match slot.dropped {
                Some(reason) => {
                    slot.builder.clear();
                    self.events.push_back(FrameEvent::Dropped { frame: f as u64, reason });
                    self.stats.frames_dropped += 1;
                }
                None => {
                    let (detections, counters) = slot.builder.finish(&mut *self.coin);
                    self.events.push_back(FrameEvent::Ready(Frame { index: f as u64, detections, counters }));
                    self.stats.frames_ready += 1;
                }
            }
            self.frames.spare.push(slot.builder);
        }
    }

    /// Drops frame `f` (the next one) for `reason`.
    fn drop_front(&mut self, f: i64, reason: DropReason) {
        let i = self.frames.slot(f);
        debug_assert_eq!(i, 0);
        let mut slot = self.frames.open.pop_front().expect("slot exists");
        slot.builder.clear();
        self.frames.spare.push(slot.builder);
        self.frames.next += 1;
        self.frames.cur = (0, 0, usize::MAX);
        self.events.push_back(FrameEvent::Dropped { frame: f as u64, reason });
        self.stats.frames_dropped += 1;
    }

    /// Forgets segments well behind the cursor.
    fn prune_segments(&mut self) {
        if self.cursor > 2 {
            let n = self.cursor - 2;
            self.segs.drain(..n);
            self.cursor -= n;
        }
    }
}

/// Adds a click of global pulse `pulse` with outcome `code` to its frame.
#[inline(always)]
fn place(frames: &mut Frames, stats: &mut PipelineStats, frame_pulses: u64, first_pulse: i64, pulse: i64, code: u8) {
    let (lo, hi, pos) = frames.cur;
    let pos = if pulse >= lo && pulse < hi && pos != usize::MAX {
        pos
    } else {
        if pulse < first_pulse {
            stats.discarded_before_start += 1;
            return;
        }
        let f = pulse.div_euclid(frame_pulses as i64);
        if f < frames.next {
            stats.discarded_late += 1;
            return;
        }
        let pos = frames.slot(f);
        let lo = f * frame_pulses as i64;
        frames.cur = (lo, lo + frame_pulses as i64, pos);
        pos
    };
    let slot = &mut frames.open[pos];
    if slot.dropped.is_some() {
        stats.discarded_dropped += 1;
        return;
    }
    slot.builder.push((pulse - frames.cur.0) as u64, code);
}

#[cfg(test)]
mod tests;
