//! `qkdctl bench-postproc`: reconciliation efficiency, frame error rate, round trips and
//! throughput of every post-processing stage, beside the published Cascade curve.
//!
//! The measuring code lives in `qkd_sim::bench` (shared with
//! `cargo bench -p qkd-sim --bench postproc`); this module parses the flags, supplies the clock
//! (the thread's CPU time, so that "per core" holds on a shared machine) and prints.

use std::time::{Duration, Instant};

use qkd_sim::bench::{self, BenchOptions, BenchRow};

/// Flags of `qkdctl bench-postproc`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Frame size in bits (default: 16384, 100000 and 1000000).
    #[arg(long, value_name = "N")]
    frame_bits: Option<usize>,
    /// Cascade frames per point (default: 100 for frames up to 2^15 bits, 20 up to 2e5 bits,
    /// 4 above).
    #[arg(long, value_name = "N")]
    frames: Option<usize>,
    /// LDPC frames per point (default: 20, 4 and 1 by the same sizes; the blind decoder is slow).
    #[arg(long, value_name = "N")]
    ldpc_frames: Option<usize>,
    /// QBERs to simulate, in percent, comma-separated (default: 1,2,3,5,8,10,11).
    #[arg(long, value_name = "PERCENT", value_delimiter = ',')]
    qber: Option<Vec<f64>>,
    /// Skip Cascade.
    #[arg(long)]
    no_cascade: bool,
    /// Skip LDPC.
    #[arg(long)]
    no_ldpc: bool,
    /// Skip the verification hash, Toeplitz and sifting throughput measurements.
    #[arg(long)]
    no_throughput: bool,
    /// Seed of the simulated keys and errors.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print a JSON list of rows instead of the table.
    #[arg(long)]
    json: bool,
}

/// Runs the benchmark and prints the table (or JSON) on stdout, one progress line per row on
/// stderr.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let mut options = BenchOptions {
        frames: args.frames,
        ldpc_frames: args.ldpc_frames,
        seed: args.seed,
        cascade: !args.no_cascade,
        ldpc: !args.no_ldpc,
        throughput: !args.no_throughput,
        ..BenchOptions::default()
    };
    if let Some(n) = args.frame_bits {
        anyhow::ensure!((64..1 << 31).contains(&n), "--frame-bits {n} is outside 64..2^31");
        options.frame_bits = vec![n];
    }
    if let Some(percent) = args.qber {
        anyhow::ensure!(
            !percent.is_empty() && percent.iter().all(|&p| p > 0.0 && p < 50.0),
            "--qber takes percentages in (0, 50)"
        );
        options.qbers = percent.iter().map(|p| p / 100.0).collect();
    }
    if options.frames.is_none() && options.frame_bits.iter().any(|&n| n > 200_000) {
        eprintln!(
            "note: frames of more than 2e5 bits run {} Cascade and {} LDPC frames per point by default \
             (--frames, --ldpc-frames to change)",
            bench::default_frames(1_000_000),
            bench::default_ldpc_frames(1_000_000)
        );
    }
    let clock = cpu_clock();
    let rows = bench::run(&options, &*clock, &mut |row| eprintln!("{}", progress_line(row)));
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", bench::format_table(&rows));
    }
    Ok(())
}

/// One short line per finished row, for stderr.
fn progress_line(row: &BenchRow) -> String {
    match (row.qber, row.efficiency) {
        (Some(q), Some(e)) => format!(
            "done: {} n={} Q={:.0}% f={:.4} ({} frames, {:.1} Mbit/s)",
            row.stage,
            row.frame_bits,
            q * 100.0,
            e.mean,
            row.frames,
            row.mbit_per_s
        ),
        _ => format!("done: {} n={}", row.stage, row.frame_bits),
    }
}

/// The calling thread's CPU time from `/proc/thread-self/schedstat` (Linux; nanoseconds on CPU,
/// updated at scheduler ticks, which is fine for runs of a fraction of a second and more), or
/// wall time elsewhere.
fn cpu_clock() -> Box<dyn Fn() -> Duration> {
    fn schedstat() -> Option<Duration> {
        let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
        let nanos: u64 = text.split_whitespace().next()?.parse().ok()?;
        Some(Duration::from_nanos(nanos))
    }
    if schedstat().is_some() {
        Box::new(|| schedstat().unwrap_or_default())
    } else {
        let start = Instant::now();
        Box::new(move || start.elapsed())
    }
}
