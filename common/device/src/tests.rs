//! End-to-end tests of the device boundary: the emulator served over real loopback sockets, the
//! `grpc` drivers and the time-tag pipeline, compared with the in-process simulator under the
//! same seed; recording and replay; damaged recordings.
//!
//! Frames are the daemons' 2^22 pulses of the `lab-10km` preset (about 5 000 detections and
//! 2 000 sifted Z bits per frame). Every run is unpaced and seeded: the streams are exact
//! functions of the configuration.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use qkd_core::quantum::{Detection, FrameStates, Measurement, State};
use qkd_sim::{LinkParams, Source};
use qkd_timetag::pipeline::DropReason;

use crate::emulator::{Emulator, EmulatorConfig, EmulatorSummary, GapSpec, Listener};
use crate::frames::pack_derived;
use crate::grpc::{DeviceAddress, GrpcReceiver, GrpcTransmitter};
use crate::record::{RecordErrorKind, RecordingReader, RecordingWriter};
use crate::replay::{ReplayReceiver, ReplayTransmitter, TagFileSpec, TagFileTiming};
use crate::sim::{SimRngs, alice_frame};
use crate::tagrx::PipelineOptions;
use crate::*;

const PRESET: &str = "lab-10km";
const F: u64 = 1 << 22;

/// A directory under the system's temporary directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "qkd-device-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An unpaced emulator configuration of `frames` frames.
fn config(seed: u64, frames: u64) -> EmulatorConfig {
    EmulatorConfig { speed: 0.0, max_frames: Some(frames), ..EmulatorConfig::from_preset(PRESET, seed).unwrap() }
}

fn options(coin_seed: u64) -> PipelineOptions {
    PipelineOptions { coin_seed: Some(coin_seed), ..PipelineOptions::default() }
}

async fn tcp_emulator(cfg: EmulatorConfig) -> Emulator {
    let any = DeviceAddress::Tcp("127.0.0.1:0".into());
    let (alice, bob) = (Listener::bind(&any).await.unwrap(), Listener::bind(&any).await.unwrap());
    Emulator::start(cfg, alice, bob).await.unwrap()
}

/// What a run delivered to the two drivers.
struct Run {
    tx: Vec<TxEvent>,
    rx: Vec<RxEvent>,
    summary: EmulatorSummary,
    first_frame: Option<u64>,
    clock: Option<qkd_timetag::clock::ClockEstimate>,
}

/// Reads both devices to the end, concurrently (the engine keeps their streams in step).
async fn drain(mut t: impl TransmitterDevice, mut r: impl ReceiverDevice) -> (Vec<TxEvent>, Vec<RxEvent>) {
    let tx = async {
        let mut v = Vec::new();
        while let Some(e) = t.next_event().await.unwrap() {
            v.push(e);
        }
        v
    };
    let rx = async {
        let mut v = Vec::new();
        while let Some(e) = r.next_event().await.unwrap() {
            v.push(e);
        }
        v
    };
    tokio::join!(tx, rx)
}

/// Runs the emulator over loopback TCP and the `grpc` drivers to the end.
async fn run_grpc(cfg: EmulatorConfig, coin_seed: u64) -> Run {
    let mut emu = tcp_emulator(cfg).await;
    let mut t = GrpcTransmitter::connect(emu.alice_address()).await.unwrap();
    let mut r = GrpcReceiver::connect(emu.bob_address(), options(coin_seed)).await.unwrap();
    assert!(t.info().simulated() && r.info().simulated());
    let collect_tx = async {
        let mut v = Vec::new();
        while let Some(e) = t.next_event().await.unwrap() {
            v.push(e);
        }
        v
    };
    let collect_rx = async {
        let mut v = Vec::new();
        while let Some(e) = r.next_event().await.unwrap() {
            v.push(e);
        }
        v
    };
    let (tx, rx) = tokio::join!(collect_tx, collect_rx);
    let summary = emu.finished().await.unwrap();
    emu.shutdown().await.unwrap();
    Run { tx, rx, summary, first_frame: r.tags().first_frame(), clock: r.tags().clock_estimate() }
}

/// The in-process simulator (`Source` + `Receiver` directly) under the same seed: per frame,
/// Alice's expanded frame key and Bob's detections.
fn reference(params: &LinkParams, seed: u64, frames: u64) -> Vec<(FrameStates, Vec<Detection>, u64)> {
    let source = Source::new(params);
    let mut receiver = qkd_sim::Receiver::new(params);
    let mut rngs = SimRngs::from_seed(seed);
    (0..frames)
        .map(|_| {
            let (secret, photons, _) = alice_frame(&source, F, &mut rngs.alice);
            let d = receiver.detect_frame(&photons, F, &mut rngs.bob);
            (FrameStates::new(&secret), d, receiver.x_slot_counts().side)
        })
        .collect()
}

/// Z-basis errors and sifted bits: Z detections where Alice sent Z, Alice's bit (|L> = 1)
/// against Bob's `late`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Sifted {
    bits: u64,
    errors: u64,
}

impl Sifted {
    fn add(&mut self, state: impl Fn(u64) -> State, detections: &[Detection]) {
        for d in detections {
            if let Measurement::Z { late } = d.measurement {
                let s = state(d.pulse_idx);
                if s.basis() == qkd_core::quantum::Basis::Z {
                    self.bits += 1;
                    self.errors += u64::from((s == State::Late) != late);
                }
            }
        }
    }

    fn qber(&self) -> f64 {
        self.errors as f64 / self.bits as f64
    }
}

fn ready(rx: &[RxEvent]) -> Vec<&RxFrame> {
    rx.iter()
        .filter_map(|e| match e {
            RxEvent::Ready(f) => Some(f),
            RxEvent::Dropped { .. } => None,
        })
        .collect()
}

fn tx_frames(tx: &[TxEvent]) -> Vec<&TxFrame> {
    tx.iter()
        .filter_map(|e| match e {
            TxEvent::Frame(f) => Some(f),
            TxEvent::Lost { .. } => None,
        })
        .collect()
}

/// Checks a run against the in-process simulator: Alice's states bit for bit, Bob's detections
/// frame for frame, and the sifted QBER over the frames the pipeline delivered within 0.3
/// points. Returns (emulated, in-process) sifted counts.
fn compare_with_reference(run: &Run, cfg: &EmulatorConfig, frames: u64) -> (Sifted, Sifted) {
    let seed = cfg.seed;
    let refs = reference(&cfg.params, seed, frames);
    let tx = tx_frames(&run.tx);
    assert_eq!(tx.len() as u64, frames, "seed {seed}: transmitter frames");
    for (f, (frame, (states, _, _))) in tx.iter().zip(&refs).enumerate() {
        assert_eq!(frame.index, f as u64);
        let TxStates::Packed(p) = &frame.states else { panic!("a device sends packed states") };
        assert!(
            p.as_bytes() == pack_derived(states, cfg.params.p_z, F).as_bytes(),
            "seed {seed}, frame {f}: transmitted states differ from the simulator's"
        );
    }
    let (mut emulated, mut direct) = (Sifted::default(), Sifted::default());
    for frame in ready(&run.rx) {
        let (states, detections, side) = &refs[frame.index as usize];
        let alice = &tx[frame.index as usize].states;
        emulated.add(|i| alice.state(i), &frame.detections);
        direct.add(|i| states.state(i, cfg.params.p_z), detections);
        assert_eq!(frame.detections.len(), detections.len(), "seed {seed}, frame {}: detections", frame.index);
        assert!(frame.detections == *detections, "seed {seed}, frame {}: detections differ", frame.index);
        assert_eq!(frame.x_slots.side, *side, "seed {seed}, frame {}: side-slot clicks", frame.index);
    }
    assert!(direct.bits > 1000 * ready(&run.rx).len() as u64, "seed {seed}: {direct:?}");
    let diff = (emulated.qber() - direct.qber()).abs();
    assert!(diff < 0.003, "seed {seed}: QBER {} emulated vs {} in-process", emulated.qber(), direct.qber());
    (emulated, direct)
}

/// Emulator -> gRPC over loopback TCP -> qkd-timetag, in step clocks: Alice's states and Bob's
/// detections are the in-process simulator's, frame for frame, and so is the QBER; the last
/// frame is completed by the emulator's closing syncs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emulator_over_grpc_matches_the_in_process_simulator() {
    let frames = 12;
    let cfg = config(31, frames);
    let run = run_grpc(cfg.clone(), 1).await;
    assert_eq!(run.summary.frames, frames);
    let kinds: Vec<(u64, bool)> = run.rx.iter().map(|e| (e.index(), matches!(e, RxEvent::Ready(_)))).collect();
    let mut want: Vec<(u64, bool)> = (0..frames).map(|f| (f, true)).collect();
    want.push((frames, false));
    assert_eq!(kinds, want, "seed {}: every frame ready, then the one the stream ended in", cfg.seed);
    assert_eq!(run.first_frame, Some(0));
    let (emulated, direct) = compare_with_reference(&run, &cfg, frames);
    eprintln!(
        "in step: QBER Z emulated {:.4} % ({} bits), in-process {:.4} % ({} bits)",
        100.0 * emulated.qber(),
        emulated.bits,
        100.0 * direct.qber(),
        direct.bits
    );
}

/// Bob's tagger +-100 ppm off Alice's clock and drifting by 1 ppm/s: the pipeline locks at
/// once (frame 0 is the first frame), the clock estimate follows the truth, and the detections
/// and QBER are still the in-process simulator's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clock_offset_and_drift_lock_at_once() {
    let frames = 10;
    for (seed, ppm, drift) in [(32, 100.0, 1.0), (33, -100.0, 1.0)] {
        let cfg = EmulatorConfig { clock_offset_ppm: ppm, drift_ppm_per_s: drift, ..config(seed, frames) };
        let run = run_grpc(cfg.clone(), 2).await;
        assert_eq!(run.first_frame, Some(0), "seed {seed}: lock must not cost a frame");
        assert_eq!(ready(&run.rx).len() as u64, frames, "seed {seed}");
        let est = run.clock.expect("a clock estimate");
        // The tagger's offset at the last sync (the emulator's closing syncs just after the last
        // frame): the initial one plus the drift.
        let t_end = (frames * F) as f64 / cfg.params.clock_hz;
        let truth = ppm + drift * t_end;
        assert!(est.locked, "seed {seed}: {est:?}");
        assert!((est.offset_ppm - truth).abs() < 0.05, "seed {seed}: {} ppm vs {truth}", est.offset_ppm);
        let (emulated, direct) = compare_with_reference(&run, &cfg, frames);
        eprintln!(
            "{ppm:+} ppm, {drift} ppm/s: estimate {:.3} ppm (truth {truth:.3}); QBER Z emulated {:.4} % ({} bits), \
             in-process {:.4} % ({} bits)",
            est.offset_ppm,
            100.0 * emulated.qber(),
            emulated.bits,
            100.0 * direct.qber(),
            direct.bits
        );
    }
}

/// Gaps injected every 4 frames: exactly those frames are dropped, by index and reason, at
/// Bob's end; the others are the simulator's; Alice's stream is complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_gaps_drop_their_frames() {
    let frames = 12;
    let cfg = EmulatorConfig { gaps: Some(GapSpec { every_frames: 4, duration_ms: 2.0 }), ..config(34, frames) };
    let run = run_grpc(cfg.clone(), 3).await;
    let injected: Vec<u64> = run.summary.gaps.iter().map(|g| g.frame).collect();
    assert_eq!(injected, vec![3, 7, 11]);
    let dropped: Vec<(u64, DropReason)> = run
        .rx
        .iter()
        .filter_map(|e| match e {
            RxEvent::Dropped { index, reason } => Some((*index, *reason)),
            RxEvent::Ready(_) => None,
        })
        .collect();
    assert_eq!(
        dropped,
        vec![(3, DropReason::Gap), (7, DropReason::Gap), (11, DropReason::Gap), (12, DropReason::StreamEnd)],
        "seed {}",
        cfg.seed
    );
    assert_eq!(ready(&run.rx).len(), 9);
    compare_with_reference(&run, &cfg, frames);
}

/// A recorded emulation replays bit for bit: the transmitter's frames and the receiver's
/// detections (with gaps) equal the live run's; Bob's tags written as a text file with a
/// channel-map sidecar give the same frames too; `inspect` counts the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_then_replay_is_bit_for_bit() {
    let dir = TempDir::new("replay");
    let path = dir.path("run.qkdrec");
    let frames = 8;
    let cfg = EmulatorConfig {
        gaps: Some(GapSpec { every_frames: 5, duration_ms: 1.0 }),
        record: Some(path.clone()),
        clock_offset_ppm: 20.0,
        ..config(35, frames)
    };
    let live = run_grpc(cfg.clone(), 4).await;
    let counts = live.summary.recording.expect("recorded");
    assert_eq!(counts.transmitter_events, frames);

    let t = ReplayTransmitter::open(&path).unwrap();
    let r = ReplayReceiver::open_recording(&path, options(4)).unwrap();
    assert!(t.info().simulated() && r.info().simulated());
    let (tx, rx) = drain(t, r).await;
    type Key = (u64, u64, Vec<u8>, Option<(f64, f64)>);
    let key = |events: &[TxEvent]| -> Vec<Key> {
        tx_frames(events)
            .iter()
            .map(|f| {
                let TxStates::Packed(p) = &f.states else { panic!("packed") };
                (f.index, f.start_ps, p.as_bytes().to_vec(), f.reading.map(|r| (r.mu, r.g2)))
            })
            .collect()
    };
    assert!(key(&tx) == key(&live.tx), "replayed transmitter frames differ");
    assert_eq!(rx, live.rx, "replayed receiver frames differ");
    assert!(rx.iter().any(|e| matches!(e, RxEvent::Dropped { index: 4, reason: DropReason::Gap })));

    // The same tags as a text file with a channel map.
    let text = dir.path("bob.txt");
    let map = dir.path("bob.map");
    write_text_tags(&path, &text);
    std::fs::write(&map, "sync = 0\nz = 1\nx_plus = 2\nx_minus = 3\n").unwrap();
    // The tagger started at 0, before the first pulse.
    let timing = TagFileTiming::from_params(&cfg.params, F, cfg.sync_every, true);
    let spec = TagFileSpec { path: text, channel_map: map, timing, ptu: Default::default() };
    let mut r = ReplayReceiver::open_tag_file(&spec, options(4)).unwrap();
    let mut from_text = Vec::new();
    while let Some(e) = r.next_event().await.unwrap() {
        from_text.push(e);
    }
    // A text file has no pipeline counters' source of difference: the same frames.
    assert_eq!(from_text, live.rx, "frames from the text file differ");

    let ins = crate::record::inspect(&path).unwrap();
    assert!(ins.complete && ins.error.is_none(), "{ins:?}");
    assert_eq!((ins.frames, ins.frame_range, ins.gaps), (frames, Some((0, frames - 1)), 1));
    assert_eq!(ins.stream_starts, 1);
    assert_eq!(ins.tags, live.summary.tags + crate::emulator::TRAILER_SYNCS);
}

/// Writes the receiver's records of a recording as a text tag file.
fn write_text_tags(recording: &Path, out: &Path) {
    use std::fmt::Write as _;
    let mut reader = RecordingReader::open(recording).unwrap();
    let mut text = String::from("# channel, time_ps\n");
    let mut records = Vec::new();
    while let Some(e) = reader.next_entry().unwrap() {
        if let crate::record::Entry::Tags(b) = e {
            records.clear();
            crate::tagwire::decode_batch(&b, &mut records).unwrap();
            for r in &records {
                match *r {
                    qkd_timetag::tags::Record::Tag(t) => writeln!(text, "{},{}", t.channel, t.time_ps).unwrap(),
                    qkd_timetag::tags::Record::Gap { from_ps, to_ps } => {
                        writeln!(text, "gap {from_ps} {to_ps}").unwrap()
                    }
                    qkd_timetag::tags::Record::Marker { marker, time_ps } => {
                        writeln!(text, "marker {marker} {time_ps}").unwrap()
                    }
                }
            }
        }
    }
    std::fs::write(out, text).unwrap();
}

/// A small recording written directly (no emulator): 3 frames of 1000 pulses and 3 batches.
fn small_recording(path: &Path) {
    use proto::device as pb;
    let cfg = config(36, 1);
    let header = pb::RecordingHeader {
        transmitter: Some(cfg.transmitter_description()),
        receiver: Some(cfg.receiver_description()),
        details: "test".into(),
        ..Default::default()
    };
    let mut w = RecordingWriter::create(path, header).unwrap();
    for f in 0..3u64 {
        let states: Vec<State> = (0..1000).map(|i| State::from_code(((i * 7 + f) % 3) as u8).unwrap()).collect();
        let ev = pb::TransmitterEvent {
            event: Some(pb::transmitter_event::Event::Frame(pb::TransmitterFrame {
                frame_idx: f,
                n_pulses: 1000,
                start_ps: f * 13_000_000,
                states: PackedStates::from_states(&states).as_bytes().to_vec(),
                source: None,
            })),
        };
        w.write_transmitter(&ev).unwrap();
        let records: Vec<qkd_timetag::tags::Record> = (0..500)
            .map(|i| {
                qkd_timetag::tags::Record::Tag(qkd_timetag::tags::Tag::new((i % 4) as u8, f * 1_000_000 + i * 977))
            })
            .collect();
        w.write_tags(&crate::tagwire::encode_batch(&records, pb::LossReason::Overflow)).unwrap();
        w.flush().unwrap();
    }
    w.finish().unwrap();
}

/// Reads a recording to the end: its header and entries, or the error.
fn read_entries(path: &Path) -> Result<(proto::device::RecordingHeader, Vec<crate::record::Entry>), RecordError> {
    let mut r = RecordingReader::open(path)?;
    let mut v = Vec::new();
    while let Some(e) = r.next_entry()? {
        v.push(e);
    }
    Ok((r.header().clone(), v))
}

/// Reads a recording to the end: the number of entries, or the error.
fn read_all(path: &Path) -> Result<usize, RecordError> {
    read_entries(path).map(|(_, v)| v.len())
}

/// Damaged recordings: every truncation and a flipped byte anywhere give an error that names
/// the file and an offset; a wrong magic or version is named as such; a writer that died
/// leaves a file readable up to its last flush, then reported truncated.
#[test]
fn damaged_recordings_name_the_file_and_offset() {
    let dir = TempDir::new("damaged");
    let good = dir.path("good.qkdrec");
    small_recording(&good);
    assert_eq!(read_all(&good).unwrap(), 6);
    let bytes = std::fs::read(&good).unwrap();
    let name = good.display().to_string();
    let bad = dir.path("bad.qkdrec");
    let bad_name = bad.display().to_string();

    // Every cut.
    let step = (bytes.len() / 97).max(1);
    for cut in (0..bytes.len()).step_by(step).chain([bytes.len() - 1, 5, 9]) {
        std::fs::write(&bad, &bytes[..cut]).unwrap();
        let e = read_all(&bad).expect_err(&format!("cut at {cut} must fail"));
        let msg = e.to_string();
        assert!(msg.starts_with(&bad_name), "cut {cut}: {msg}");
        assert!(msg.contains("offset"), "cut {cut}: {msg}");
        assert!(matches!(e.kind, RecordErrorKind::Truncated(_) | RecordErrorKind::Compressed(_)), "cut {cut}: {msg}");
    }
    // A flipped bit anywhere after the prefix: an error naming the place, or (a bit deflate
    // ignores, such as the padding before a flush's empty stored block) the same contents.
    let original = read_entries(&good).unwrap();
    let mut harmless = 0;
    for pos in (12..bytes.len()).step_by(step) {
        let mut b = bytes.clone();
        b[pos] ^= 0x10;
        std::fs::write(&bad, &b).unwrap();
        let e = match read_entries(&bad) {
            Ok(same) => {
                assert!(same == original, "flip at {pos}: read without error but different");
                harmless += 1;
                continue;
            }
            Err(e) => e,
        };
        let msg = e.to_string();
        assert!(msg.starts_with(&bad_name) && msg.contains("offset"), "flip at {pos}: {msg}");
        assert!(e.stream_offset.is_some(), "flip at {pos}: {msg}");
    }
    assert!(harmless <= 3, "{harmless} flips went unnoticed");
    // Magic and version.
    let mut b = bytes.clone();
    b[1] = b'X';
    std::fs::write(&bad, &b).unwrap();
    let e = read_all(&bad).unwrap_err();
    assert!(matches!(e.kind, RecordErrorKind::BadMagic(_)), "{e}");
    assert!(e.to_string().contains("file offset 0"), "{e}");
    let mut b = bytes.clone();
    b[8] = 2;
    std::fs::write(&bad, &b).unwrap();
    let e = read_all(&bad).unwrap_err();
    assert_eq!(e.kind, RecordErrorKind::UnsupportedVersion { found: 2, supported: 1 });
    assert!(e.to_string().contains(&format!("{bad_name}: file offset 8")), "{e}");

    // A writer that died after two frames (dropped without finish).
    {
        use proto::device as pb;
        let cfg = config(36, 1);
        let header = pb::RecordingHeader { transmitter: Some(cfg.transmitter_description()), ..Default::default() };
        let mut w = RecordingWriter::create(&bad, header).unwrap();
        let batch = crate::tagwire::encode_batch(&[], pb::LossReason::Overflow);
        w.write_tags(&batch).unwrap();
        w.write_tags(&batch).unwrap();
        w.flush().unwrap();
    }
    let mut r = RecordingReader::open(&bad).unwrap();
    assert!(r.next_entry().unwrap().is_some() && r.next_entry().unwrap().is_some());
    let e = r.next_entry().unwrap_err();
    assert!(e.to_string().contains("without its end record"), "{e}");
    let ins = crate::record::inspect(&bad).unwrap();
    assert_eq!((ins.tag_batches, ins.complete), (2, false));
    assert!(ins.error.is_some());
    assert!(name.ends_with("good.qkdrec"));
}

/// The emulator on Unix sockets, and the receiver's phase reports: accepted once per frame in
/// order, refused out of order or for frames not yet produced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_sockets_and_phase_reports() {
    let dir = TempDir::new("unix");
    let (a, b) = (DeviceAddress::Unix(dir.path("alice.sock")), DeviceAddress::Unix(dir.path("bob.sock")));
    let frames = 3;
    let mut emu =
        Emulator::start(config(37, frames), Listener::bind(&a).await.unwrap(), Listener::bind(&b).await.unwrap())
            .await
            .unwrap();
    let mut t = GrpcTransmitter::connect(&a).await.unwrap();
    let mut r = GrpcReceiver::connect(&b, options(5)).await.unwrap();
    assert!(r.info().capabilities().phase_feedback);
    let (tx, rx) = {
        let collect_tx = async {
            let mut v = Vec::new();
            while let Some(e) = t.next_event().await.unwrap() {
                v.push(e);
            }
            v
        };
        let collect_rx = async {
            let mut v = Vec::new();
            while let Some(e) = r.next_event().await.unwrap() {
                // Report each frame's X-basis test outcomes as the daemon would.
                if let RxEvent::Ready(f) = &e {
                    let n = f.detections.iter().filter(|d| matches!(d.measurement, Measurement::X { .. })).count();
                    r.report_phase_errors(f.index, n as u64, 0).await.unwrap();
                }
                v.push(e);
            }
            v
        };
        tokio::join!(collect_tx, collect_rx)
    };
    assert_eq!(tx_frames(&tx).len() as u64, frames);
    assert_eq!(ready(&rx).len() as u64, frames);
    // Out of order, and not yet produced.
    let e = r.report_phase_errors(1, 1, 0).await.unwrap_err();
    assert!(matches!(e, DeviceError::Rpc { code: tonic::Code::InvalidArgument, .. }), "{e}");
    let e = r.report_phase_errors(frames + 5, 1, 0).await.unwrap_err();
    assert!(matches!(e, DeviceError::Rpc { code: tonic::Code::FailedPrecondition, .. }), "{e}");
    let m = r.monitors().await.unwrap();
    assert_eq!(m.frames, frames);
    assert!(m.phase_error_rad.is_some() && m.rates.iter().any(|&(c, rate)| c == 1 && rate > 1e4), "{m:?}");
    let m = t.monitors().await.unwrap();
    assert!(m.source.is_some_and(|s| s.mu > 0.0), "{m:?}");
    emu.finished().await.unwrap();
    emu.shutdown().await.unwrap();
    assert!(!dir.path("alice.sock").exists(), "the socket is removed at shutdown");
}

/// The `sim` driver: a seeded in-memory pair gives the reference's frames; its phase loop
/// takes the reports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sim_pair_is_the_reference() {
    let seed = 38;
    let params = LinkParams::preset(PRESET).unwrap();
    let (mut t, mut r) = sim::pair(&params, F, SimRngs::from_seed(seed)).unwrap();
    let refs = reference(&params, seed, 3);
    for (f, (states, detections, side)) in refs.iter().enumerate() {
        let Some(TxEvent::Frame(frame)) = t.next_event().await.unwrap() else { panic!("a frame") };
        assert_eq!(frame.index, f as u64);
        assert!((0..1000).all(|i| frame.states.state(i) == states.state(i, params.p_z)));
        let Some(RxEvent::Ready(rf)) = r.next_event().await.unwrap() else { panic!("a frame") };
        assert_eq!((rf.index, &rf.detections, rf.x_slots.side), (f as u64, detections, *side), "seed {seed}");
        r.report_phase_errors(rf.index, 100, 3).await.unwrap();
    }
    assert!(r.report_phase_errors(0, 1, 0).await.is_err(), "a frame reported twice");
    let m = r.monitors().await.unwrap();
    assert_eq!(m.frames, 3);
    assert!(t.info().simulated() && r.info().simulated());
}
