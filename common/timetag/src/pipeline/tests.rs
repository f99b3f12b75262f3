//! End-to-end tests: synthetic streams with known per-pulse clicks ([`crate::synth`]) through
//! the whole pipeline, compared with the truth.

use std::collections::BTreeMap;

use qkd_core::quantum::Measurement;

use super::*;
use crate::synth::{Generator, GeneratorConfig, SplitMix64, TaggerClock, TrueClick, TrueOutcome};

const F: u64 = 1 << 22;

fn map() -> ChannelMap {
    ChannelMap::new(&[(Role::Sync, 0), (Role::Z, 1), (Role::XPlus, 2), (Role::XMinus, 3)]).unwrap()
}

fn coin(seed: u64) -> Box<dyn FnMut() -> bool + Send> {
    let mut rng = SplitMix64::new(seed);
    Box::new(move || rng.coin())
}

fn generator(offset_ppm: f64, drift: f64, pulses: u64, seed: u64) -> GeneratorConfig {
    GeneratorConfig {
        clock: TaggerClock {
            period_ps: crate::clock::PERIOD_76MHZ_PS,
            start_ps: 2_000_000.0,
            offset_ppm,
            drift_ppm_per_s: drift,
        },
        pulses,
        seed,
        ..GeneratorConfig::default()
    }
}

/// Runs `records` through a pipeline (in chunks, as a reader would deliver them).
fn run(cfg: PipelineConfig, map: &ChannelMap, records: &[Record]) -> (Vec<FrameEvent>, Pipeline) {
    let mut p = Pipeline::new(cfg, map, coin(7)).unwrap();
    for chunk in records.chunks(7919) {
        p.push_records(chunk).unwrap();
    }
    p.finish().unwrap();
    let mut events = Vec::new();
    while let Some(e) = p.next_event() {
        events.push(e);
    }
    (events, p)
}

/// The outcome bit of a measurement (E 1, L 2, + 4, - 8).
fn bit(m: Measurement) -> u8 {
    match m {
        Measurement::Z { late: false } => 1,
        Measurement::Z { late: true } => 2,
        Measurement::X { minus: false } => 4,
        Measurement::X { minus: true } => 8,
    }
}

/// Truth: per pulse, the mask of in-window outcomes; per frame, the side-slot clicks and the
/// pulses with several in-window clicks.
struct Truth {
    masks: BTreeMap<u64, u8>,
    side: BTreeMap<u64, u64>,
    multi: BTreeMap<u64, u64>,
}

fn truth(clicks: &[TrueClick], frame_pulses: u64) -> Truth {
    let mut masks = BTreeMap::new();
    let mut side = BTreeMap::new();
    let mut clicks_per_pulse: BTreeMap<u64, u32> = BTreeMap::new();
    for c in clicks {
        let b = match c.outcome {
            TrueOutcome::Early => 1,
            TrueOutcome::Late => 2,
            TrueOutcome::Plus => 4,
            TrueOutcome::Minus => 8,
            TrueOutcome::Side => {
                *side.entry(c.pulse / frame_pulses).or_insert(0) += 1;
                0
            }
            TrueOutcome::Outside => 0,
        };
        if b != 0 {
            *masks.entry(c.pulse).or_insert(0) |= b;
            *clicks_per_pulse.entry(c.pulse).or_insert(0) += 1;
        }
    }
    let mut multi = BTreeMap::new();
    for (&p, &n) in &clicks_per_pulse {
        if n > 1 {
            *multi.entry(p / frame_pulses).or_insert(0) += 1;
        }
    }
    Truth { masks, side, multi }
}

/// How a frame's detections compare with the truth.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Cmp {
    /// Pulses with one true click: found with the right outcome, missing, wrong.
    single_ok: u64,
    missing: u64,
    wrong: u64,
    /// Pulses with several true clicks: squashed to one of them, or not.
    multi_ok: u64,
    multi_bad: u64,
    /// Detections at pulses without a true in-window click.
    extra: u64,
}

impl Cmp {
    fn add(&mut self, o: Cmp) {
        self.single_ok += o.single_ok;
        self.missing += o.missing;
        self.wrong += o.wrong;
        self.multi_ok += o.multi_ok;
        self.multi_bad += o.multi_bad;
        self.extra += o.extra;
    }
}

/// Compares frame `frame` (pipeline pulse = true pulse - `offset`) with the truth.
fn compare(frame: &Frame, frame_pulses: u64, t: &Truth, offset: i64) -> Cmp {
    let start = (frame.index * frame_pulses) as i64 + offset;
    let range = start.max(0) as u64..(start + frame_pulses as i64).max(0) as u64;
    let mut c = Cmp::default();
    let found: BTreeMap<u64, Measurement> =
        frame.detections.iter().map(|d| ((d.pulse_idx as i64 + start) as u64, d.measurement)).collect();
    assert_eq!(found.len(), frame.detections.len(), "frame {}: two detections on one pulse", frame.index);
    assert!(frame.detections.windows(2).all(|w| w[0].pulse_idx < w[1].pulse_idx), "not sorted");
    for (&pulse, &mask) in t.masks.range(range.clone()) {
        let got = found.get(&pulse).map(|&m| bit(m));
        match (mask.count_ones(), got) {
            (_, None) => c.missing += 1,
            (1, Some(b)) if b == mask => c.single_ok += 1,
            (1, Some(_)) => c.wrong += 1,
            (_, Some(b)) if b & mask != 0 => c.multi_ok += 1,
            (_, Some(_)) => c.multi_bad += 1,
        }
    }
    c.extra = found.keys().filter(|p| !t.masks.contains_key(p)).count() as u64;
    c
}

fn ready(events: &[FrameEvent]) -> Vec<&Frame> {
    events
        .iter()
        .filter_map(|e| match e {
            FrameEvent::Ready(f) => Some(f),
            _ => None,
        })
        .collect()
}

/// Frame events are contiguous and in order.
fn assert_contiguous(events: &[FrameEvent]) {
    let idx: Vec<u64> = events.iter().map(FrameEvent::frame).collect();
    assert!(idx.windows(2).all(|w| w[1] == w[0] + 1), "frames not contiguous: {idx:?}");
}

/// The main end-to-end check: +100 ppm, 1 ppm/s, 20 ps jitter, per-frame sync, a gap in frame
/// 6: lock at once (frame 0 is the first frame), exact detections, the gap's frame dropped.
#[test]
fn end_to_end_exact_with_offset_drift_and_gap() {
    let seed = 1;
    let gcfg = GeneratorConfig {
        gaps: vec![(6 * F + F / 3, 6 * F + F / 3 + 50_000)],
        p_second: 0.05,
        ..generator(100.0, 1.0, 10 * F + 5000, seed)
    };
    let clock = gcfg.clock;
    let (records, clicks) = Generator::new(gcfg).generate_all();
    let t = truth(&clicks, F);
    // The synthetic tagger starts at 0, before the first pulse.
    let cfg = PipelineConfig { stream_start_ps: Some(0), ..PipelineConfig::default() };
    let (events, p) = run(cfg, &map(), &records);
    assert_contiguous(&events);
    let kinds: Vec<(u64, Option<DropReason>)> = events
        .iter()
        .map(|e| match e {
            FrameEvent::Ready(f) => (f.index, None),
            FrameEvent::Dropped { frame, reason } => (*frame, Some(*reason)),
        })
        .collect();
    let mut want: Vec<(u64, Option<DropReason>)> = (0..10).map(|f| (f, None)).collect();
    want[6].1 = Some(DropReason::Gap);
    want.push((10, Some(DropReason::StreamEnd)));
    assert_eq!(kinds, want, "seed {seed}");
    assert_eq!(p.first_frame(), Some(0), "seed {seed}: lock must not cost a frame");
    // The clock estimate matches the truth at the last sync.
    let est = p.clock_estimate().unwrap();
    let true_ppm = (clock.period_at(10 * F) / crate::clock::PERIOD_76MHZ_PS - 1.0) * 1e6;
    assert!((est.offset_ppm - true_ppm).abs() < 0.01, "seed {seed}: {} vs {true_ppm} ppm", est.offset_ppm);
    let mut total = Cmp::default();
    for f in ready(&events) {
        let c = compare(f, F, &t, 0);
        assert_eq!((c.missing, c.wrong, c.multi_bad), (0, 0, 0), "seed {seed}, frame {}: {c:?}", f.index);
        // Dark counts within a few ps of a window edge may be labelled differently.
        assert!(c.extra <= 1, "seed {seed}, frame {}: {c:?}", f.index);
        let side = t.side.get(&f.index).copied().unwrap_or(0);
        assert!(
            f.counters.x_slots.side.abs_diff(side) <= 1,
            "seed {seed}, frame {}: side {} vs {side}",
            f.index,
            f.counters.x_slots.side
        );
        let multi = t.multi.get(&f.index).copied().unwrap_or(0);
        assert!(
            f.counters.multi_click_pulses.abs_diff(multi) <= 1,
            "seed {seed}, frame {}: {multi}, {:?}",
            f.index,
            f.counters
        );
        assert!(f.counters.basis_conflicts > 0);
        total.add(c);
    }
    assert!(total.single_ok > 9 * 190_000, "seed {seed}: {total:?}");
    assert!(total.multi_ok > 1000, "seed {seed}: {total:?}");
    let s = p.stats();
    assert_eq!(s.sync_tags, 11);
    assert_eq!((s.syncs_rejected, s.discarded_late, s.unknown_channel), (0, 0, 0));
    assert!(s.discarded_dropped > 100_000, "{s:?}");
    assert_eq!((s.frames_ready, s.frames_dropped), (9, 2));
}

/// Jitter comparable to the windows: misses bounded by the Gaussian tail, no mis-assignment;
/// -100 ppm, frequent syncs, a gap across a frame boundary drops both frames.
#[test]
fn end_to_end_large_jitter_and_boundary_gap() {
    let seed = 2;
    let gcfg = GeneratorConfig {
        jitter_ps: 90.0,
        sync_every: 1 << 16,
        gaps: vec![(3 * F - 1000, 3 * F + 1000)],
        ..generator(-100.0, 1.0, 6 * F + 5000, seed)
    };
    let (records, clicks) = Generator::new(gcfg).generate_all();
    let t = truth(&clicks, F);
    let cfg = PipelineConfig {
        clock: ClockMode::Sync(SyncConfig { sync_every: 1 << 16, ..SyncConfig::default() }),
        stream_start_ps: Some(0),
        ..PipelineConfig::default()
    };
    let (events, p) = run(cfg, &map(), &records);
    assert_contiguous(&events);
    assert_eq!(p.first_frame(), Some(0));
    let dropped: Vec<u64> = events
        .iter()
        .filter(|e| matches!(e, FrameEvent::Dropped { reason: DropReason::Gap, .. }))
        .map(FrameEvent::frame)
        .collect();
    assert_eq!(dropped, vec![2, 3], "seed {seed}");
    let mut total = Cmp::default();
    for f in ready(&events) {
        total.add(compare(f, F, &t, 0));
    }
    let n = (total.single_ok + total.missing + total.wrong) as f64;
    // P(|N(0, 90 ps)| > 200 ps) = 2.6 %; into a neighbouring window needs 600 ps (6.7 sigma).
    let miss = total.missing as f64 / n;
    assert!(miss > 0.015 && miss < 0.04, "seed {seed}: miss rate {miss}, {total:?}");
    assert!(total.wrong as f64 / n < 1e-4, "seed {seed}: {total:?}");
    assert_eq!(total.multi_bad, 0, "seed {seed}: {total:?}");
    assert!((total.extra as f64) < 1e-4 * n, "seed {seed}: {total:?}");
}

/// Without a sync: the clock comes from the Z clicks, pulse indices are relative; after
/// aligning them once, the detections match.
#[test]
fn end_to_end_data_only_mode() {
    let seed = 3;
    let fp = 1u64 << 20;
    let gcfg = GeneratorConfig { sync_every: 0, frame_pulses: fp, ..generator(-80.0, 1.0, 24 * fp, seed) };
    let (records, clicks) = Generator::new(gcfg).generate_all();
    let t = truth(&clicks, fp);
    let map = ChannelMap::without_sync(&[(Role::Z, 1), (Role::XPlus, 2), (Role::XMinus, 3)]).unwrap();
    let cfg =
        PipelineConfig { frame_pulses: fp, clock: ClockMode::Data(DataConfig::default()), ..PipelineConfig::default() };
    let (events, p) = run(cfg, &map, &records);
    assert_contiguous(&events);
    let frames = ready(&events);
    assert!(frames.len() >= 20, "seed {seed}: {} frames, first {:?}", frames.len(), p.first_frame());
    // Pulse 0 is the pulse of the first Z click, give or take one (the pattern's centring).
    let first_z = clicks.iter().find(|c| matches!(c.outcome, TrueOutcome::Early | TrueOutcome::Late)).unwrap().pulse;
    let offset = (-2..=2).map(|d| first_z as i64 + d).max_by_key(|&o| compare(frames[0], fp, &t, o).single_ok).unwrap();
    let mut total = Cmp::default();
    for f in &frames {
        let c = compare(f, fp, &t, offset);
        assert_eq!((c.wrong, c.multi_bad), (0, 0), "seed {seed}, frame {}: {c:?}", f.index);
        total.add(c);
    }
    assert!(total.missing as f64 <= 1e-4 * total.single_ok as f64, "seed {seed}: {total:?}");
    assert!(total.extra <= frames.len() as u64, "seed {seed}: {total:?}");
}

/// The stream begins inside frame 2 and the first sync marks pulse 3F: frame 2 is reported
/// dropped, frame 3 onwards are exact; a given calibration gives the same detections as the
/// one found from histograms.
#[test]
fn stream_starting_mid_frame_and_fixed_calibration() {
    let seed = 4;
    let gcfg = generator(40.0, -1.0, 7 * F + 5000, seed);
    let cut = gcfg.clock.time_ps(2 * F + F / 2, 0.0) as u64;
    let (records, clicks) = Generator::new(gcfg).generate_all();
    let records: Vec<Record> = records.into_iter().filter(|r| r.time_ps() >= cut).collect();
    let t = truth(&clicks, F);
    let cfg = PipelineConfig {
        clock: ClockMode::Sync(SyncConfig { first_sync_pulse: 3 * F as i64, ..SyncConfig::default() }),
        stream_start_ps: Some(cut),
        ..PipelineConfig::default()
    };
    let (events, p) = run(cfg.clone(), &map(), &records);
    assert_contiguous(&events);
    assert_eq!(events[0], FrameEvent::Dropped { frame: 2, reason: DropReason::StreamStart });
    assert_eq!(events[1].frame(), 3);
    let frames = ready(&events);
    assert_eq!(frames.len(), 4);
    for f in &frames {
        let c = compare(f, F, &t, 0);
        assert_eq!((c.missing, c.wrong, c.multi_bad), (0, 0, 0), "seed {seed}, frame {}: {c:?}", f.index);
    }
    // Same windows given up front: the same frames, detection for detection.
    let cal = p.calibration().unwrap().clone();
    let (again, _) = run(PipelineConfig { calibration: Some(cal), ..cfg }, &map(), &records);
    assert_eq!(again, events);
}

/// Clock-channel tags, markers and unmapped channels are counted and do not disturb the
/// frames; a missing detector in the calibration is refused.
#[test]
fn other_records_are_counted() {
    let seed = 5;
    let (records, _) = Generator::new(generator(0.0, 0.0, 4 * F + 5000, seed)).generate_all();
    let mut mixed = Vec::with_capacity(records.len() + 300);
    for (i, r) in records.iter().enumerate() {
        mixed.push(*r);
        if i % 10_000 == 0 {
            let t = r.time_ps();
            mixed.push(Record::Tag(Tag::new(9, t)));
            mixed.push(Record::Tag(Tag::new(5, t)));
            mixed.push(Record::Marker { marker: 1, time_ps: t });
        }
    }
    let m = ChannelMap::new(&[(Role::Sync, 0), (Role::Z, 1), (Role::XPlus, 2), (Role::XMinus, 3), (Role::Clock, 5)])
        .unwrap();
    let (events, p) = run(PipelineConfig::default(), &m, &mixed);
    let (base, _) = run(PipelineConfig::default(), &map(), &records);
    assert_eq!(events, base);
    let extra = records.len().div_ceil(10_000) as u64;
    let s = p.stats();
    assert_eq!((s.unknown_channel, s.clock_tags, s.markers), (extra, extra, extra));
    let cal = Calibration { peaks_ps: vec![(Role::Z, vec![1000.0, 1800.0])] };
    let err = Pipeline::new(PipelineConfig { calibration: Some(cal), ..PipelineConfig::default() }, &map(), coin(1));
    assert!(matches!(err, Err(PipelineError::Config(_))), "{err:?}");
    let no_sync = ChannelMap::without_sync(&[(Role::Z, 1)]).unwrap();
    assert!(matches!(Pipeline::new(PipelineConfig::default(), &no_sync, coin(1)), Err(PipelineError::Config(_))));
}

/// A detector without peaks (only dark counts) cannot be calibrated: a clear error once the
/// calibration span is exhausted.
#[test]
fn detector_without_peaks_is_an_error() {
    let seed = 6;
    let gcfg = GeneratorConfig { q_z: 1.0, p_dark: 2e-3, ..generator(0.0, 0.0, 8 * F, seed) };
    let (records, _) = Generator::new(gcfg).generate_all();
    let mut p = Pipeline::new(PipelineConfig::default(), &map(), coin(1)).unwrap();
    let mut err = None;
    for chunk in records.chunks(10_000) {
        if let Err(e) = p.push_records(chunk) {
            err = Some(e);
            break;
        }
    }
    let err = err.or_else(|| p.finish().err());
    assert!(matches!(err, Some(PipelineError::Window(WindowError::NoPeaks { role: Role::XPlus, .. }))), "{err:?}");
    // The error sticks.
    assert!(p.push(&Record::Tag(Tag::new(1, u64::MAX / 2))).is_err());
}

/// Replayed files go through the same library: the stream written as a HydraHarp T2 PTU file
/// (overflow records included) and as a text file, read back and processed, gives the same
/// frames as the stream fed directly.
#[test]
fn replayed_ptu_and_text_files_give_the_same_frames() {
    use crate::ptu::testing::{Writer, encode_hh_v2_t2};
    use crate::ptu::{PtuOptions, PtuReader};
    use crate::text::TextReader;
    let seed = 8;
    let (records, _) = Generator::new(generator(-30.0, 0.5, 5 * F + 5000, seed)).generate_all();
    let cfg = PipelineConfig { stream_start_ps: Some(0), ..PipelineConfig::default() };
    let (direct, _) = run(cfg.clone(), &map(), &records);
    assert_eq!(ready(&direct).len(), 5);
    // PTU: the tags' times span many 2^25 ps wraps.
    let raw = encode_hh_v2_t2(&records);
    assert!(raw.iter().filter(|&&r| r >> 25 == 0x7F).count() > 100, "overflow records expected");
    let bytes = Writer::header(0x0101_0204, Some(raw.len() as i64), 1e-12, None).records(&raw);
    let from_ptu: Vec<Record> =
        PtuReader::new(bytes.as_slice(), "replay.ptu", PtuOptions::default()).unwrap().map(Result::unwrap).collect();
    assert_eq!(from_ptu, records);
    let (replayed, _) = run(cfg.clone(), &map(), &from_ptu);
    assert_eq!(replayed, direct);
    // Text.
    let mut text = String::from("# channel, time_ps\n");
    for r in &records {
        if let Record::Tag(t) = r {
            text.push_str(&format!("{},{}\n", t.channel, t.time_ps));
        }
    }
    let from_text: Vec<Record> = TextReader::new(text.as_bytes(), "replay.txt").map(Result::unwrap).collect();
    let (replayed, _) = run(cfg, &map(), &from_text);
    assert_eq!(replayed, direct);
}
