//! Time-tag throughput: detector tags per second through clock recovery and assignment (the
//! whole pipeline: channel lookup, buffering, the tracking loop, the per-tag fixed-point map,
//! windows, frames, squashing), on a synthetic stream: 76 MHz, frames of 2^22 pulses, a click
//! in 5 % of the pulses, +100 ppm and 1 ppm/s, 20 ps jitter, one sync per frame.
//!
//! `cargo bench -p qkd-timetag --bench timetag` (release profile). A plain `harness = false`
//! binary: the workspace carries no benchmark framework. The stream is generated in chunks
//! outside the timed region; the timing is the thread's CPU time (`/proc/thread-self/schedstat`,
//! wall time where it is missing), so the figure is per core even on a shared machine.
//! Environment: `QKD_BENCH_TAGS` (default 50 000 000) sets the stream length.

use std::time::{Duration, Instant};

use qkd_timetag::clock::{DataConfig, PERIOD_76MHZ_PS};
use qkd_timetag::pipeline::{ClockMode, FrameEvent, Pipeline, PipelineConfig};
use qkd_timetag::synth::{Generator, GeneratorConfig, SplitMix64, TaggerClock};
use qkd_timetag::tags::{ChannelMap, Record, Role};

/// The thread's CPU time (Linux), else wall time since the first call.
fn clock() -> Duration {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let cpu = std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse::<u64>().ok());
    match cpu {
        Some(nanos) => Duration::from_nanos(nanos),
        None => START.get_or_init(Instant::now).elapsed(),
    }
}

/// Runs `tags` detector tags of a synthetic stream through a pipeline; returns (detector tags,
/// CPU seconds in the pipeline, ready frames, detections).
fn run(name: &str, cfg: PipelineConfig, map: &ChannelMap, sync_every: u64, tags: u64) -> (u64, f64, u64, u64) {
    let p_click = 0.05;
    let pulses = (tags as f64 / p_click) as u64;
    let gcfg = GeneratorConfig {
        clock: TaggerClock { period_ps: PERIOD_76MHZ_PS, start_ps: 1e6, offset_ppm: 100.0, drift_ppm_per_s: 1.0 },
        pulses,
        p_click,
        p_second: 0.01,
        sync_every,
        seed: 1,
        ..GeneratorConfig::default()
    };
    let mut generator = Generator::new(gcfg);
    let mut rng = SplitMix64::new(2);
    let mut pipeline = Pipeline::new(cfg, map, Box::new(move || rng.coin())).expect("valid configuration");
    let (mut records, mut truth): (Vec<Record>, Vec<_>) = (Vec::new(), Vec::new());
    let (mut busy, mut frames, mut detections) = (Duration::ZERO, 0u64, 0u64);
    while !generator.done() {
        records.clear();
        truth.clear();
        generator.next_chunk(1 << 22, &mut records, &mut truth);
        let t0 = clock();
        pipeline.push_records(&records).expect("pipeline runs");
        while let Some(e) = pipeline.next_event() {
            if let FrameEvent::Ready(f) = e {
                frames += 1;
                detections += f.detections.len() as u64;
            }
        }
        busy += clock() - t0;
    }
    let t0 = clock();
    pipeline.finish().expect("pipeline finishes");
    while let Some(e) = pipeline.next_event() {
        if let FrameEvent::Ready(f) = e {
            frames += 1;
            detections += f.detections.len() as u64;
        }
    }
    busy += clock() - t0;
    let n = pipeline.stats().detector_tags;
    let s = busy.as_secs_f64();
    println!(
        "{name:<10} {n:>12} {s:>9.3} {:>14.1} {:>9.1} {frames:>7} {detections:>12}",
        n as f64 / s / 1e6,
        s * 1e9 / n as f64
    );
    (n, s, frames, detections)
}

fn main() {
    let tags: u64 = std::env::var("QKD_BENCH_TAGS").ok().and_then(|s| s.parse().ok()).unwrap_or(50_000_000);
    println!(
        "{:<10} {:>12} {:>9} {:>14} {:>9} {:>7} {:>12}",
        "clock", "tags", "cpu s", "M tags/s/core", "ns/tag", "frames", "detections"
    );
    let map =
        ChannelMap::new(&[(Role::Sync, 0), (Role::Z, 1), (Role::XPlus, 2), (Role::XMinus, 3)]).expect("valid map");
    run("sync", PipelineConfig::default(), &map, 1 << 22, tags);
    let data_map = ChannelMap::without_sync(&[(Role::Z, 1), (Role::XPlus, 2), (Role::XMinus, 3)]).expect("valid map");
    let data = PipelineConfig { clock: ClockMode::Data(DataConfig::default()), ..PipelineConfig::default() };
    run("data-only", data, &data_map, 0, tags / 5);
}
