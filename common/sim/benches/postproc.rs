//! Post-processing benchmark: reconciliation efficiency, frame error rate, round trips and
//! throughput of Cascade, LDPC, the verification hash, Toeplitz hashing and sifting, beside the
//! published Cascade curve. The same measurements as `qkdctl bench-postproc`
//! (`qkd_sim::bench`).
//!
//! `cargo bench -p qkd-sim --bench postproc` (release profile). A plain `harness = false` binary:
//! the workspace carries no benchmark framework. Timing is the thread's CPU time
//! (`/proc/thread-self/schedstat`, wall time where it is missing), so the throughputs are per
//! core even on a shared machine. Environment:
//! * `QKD_BENCH_FRAME_BITS`: frame sizes (comma-separated) instead of 2^14, 1e5 and 1e6;
//! * `QKD_BENCH_FRAMES`, `QKD_BENCH_LDPC_FRAMES`: frames per point (defaults 100/20/4 and 20/4/1);
//! * `QKD_BENCH_THROUGHPUT_ONLY=1`: only the throughput rows (no Cascade or LDPC simulation);
//! * `QKD_BENCH_JSON=1`: JSON rows instead of the table.

use std::time::{Duration, Instant};

use qkd_sim::bench::{self, BenchOptions};

fn env_usize(name: &str) -> Option<usize> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

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

fn main() {
    let mut options = BenchOptions {
        frames: env_usize("QKD_BENCH_FRAMES"),
        ldpc_frames: env_usize("QKD_BENCH_LDPC_FRAMES"),
        ..BenchOptions::default()
    };
    if let Ok(list) = std::env::var("QKD_BENCH_FRAME_BITS") {
        options.frame_bits = list
            .split(',')
            .map(|n| n.trim().parse().expect("QKD_BENCH_FRAME_BITS: comma-separated integers"))
            .collect();
    }
    if std::env::var("QKD_BENCH_THROUGHPUT_ONLY").is_ok_and(|v| v == "1") {
        options.cascade = false;
        options.ldpc = false;
    }
    let rows = bench::run(&options, &clock, &mut |row| {
        eprintln!("done: {} n={} qber={:?}", row.stage, row.frame_bits, row.qber);
    });
    if std::env::var("QKD_BENCH_JSON").is_ok_and(|v| v == "1") {
        println!("{}", serde_json::to_string_pretty(&rows).expect("rows serialise"));
    } else {
        print!("{}", bench::format_table(&rows));
    }
}
