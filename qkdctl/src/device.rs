//! `qkdctl device ...`: the quantum devices' side: the emulator that serves the device API
//! (`proto/device.proto`) for both ends from the simulator's physics, the recorder of live
//! runs, and the inspection of recording files.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use qkd_device::emulator::{Emulator, EmulatorConfig, GapSpec, Listener};
use qkd_device::grpc::DeviceAddress;
use qkd_device::{DeviceInfo, record};
use tokio_util::sync::CancellationToken;

/// `qkdctl device` subcommands.
#[derive(Subcommand, Debug)]
pub enum DeviceCommand {
    /// Serve the device API for Alice's transmitter and Bob's receiver from the simulator's
    /// physics, at the time-tag level (clock offset and drift, jitter, sync tags, gaps), until
    /// Ctrl-C or --frames. Addresses are HOST:PORT or unix:PATH.
    Emulate(EmulateArgs),
    /// Record a live run: connect to a transmitter and a receiver device (nothing else may be
    /// streaming from them) and write both streams to a recording until Ctrl-C, --duration-s
    /// or the devices' end.
    Record(RecordArgs),
    /// Print a recording's header (both devices' descriptions) and what it holds; exits with an
    /// error if the file is damaged (after printing what precedes the damage).
    Inspect {
        /// The recording.
        file: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// `qkdctl device emulate`.
#[derive(Args, Debug)]
pub struct EmulateArgs {
    /// Where the transmitter (Alice's device) is served.
    #[arg(long, default_value = "127.0.0.1:7201")]
    listen_alice: String,
    /// Where the receiver (Bob's device) is served.
    #[arg(long, default_value = "127.0.0.1:7202")]
    listen_bob: String,
    /// Link preset (presets/*.toml).
    #[arg(long, default_value = "lab-10km")]
    preset: String,
    /// Fibre length, km [default: the preset's].
    #[arg(long)]
    distance_km: Option<f64>,
    /// Seed of every random draw (default: a random one, printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Frequency offset of Bob's tagger against Alice's clock, ppm.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    clock_ppm: f64,
    /// Drift of that offset, ppm/s.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    drift_ppm_per_s: f64,
    /// Jitter added to each detector tag (rms), ps (default: the preset's).
    #[arg(long)]
    jitter_ps: Option<f64>,
    /// Pulses per frame.
    #[arg(long, default_value_t = 1 << 22)]
    frame_pulses: u64,
    /// Pulses between sync tags (a divisor of --frame-pulses).
    #[arg(long, default_value_t = 1 << 16)]
    sync_every: u64,
    /// Inject a gap in every K-th frame (with --gap-ms).
    #[arg(long, requires = "gap_ms")]
    gap_every_frames: Option<u64>,
    /// Length of each injected gap, ms.
    #[arg(long, requires = "gap_every_frames")]
    gap_ms: Option<f64>,
    /// Multiple of real time; 0: as fast as both subscribers read.
    #[arg(long, default_value_t = 1.0)]
    speed: f64,
    /// Stop after this many frames (then wait until both streams have delivered them).
    #[arg(long)]
    frames: Option<u64>,
    /// Write every frame and tag batch to this recording.
    #[arg(long)]
    record: Option<PathBuf>,
}

/// `qkdctl device record`.
#[derive(Args, Debug)]
pub struct RecordArgs {
    /// The transmitter device.
    #[arg(long)]
    alice: String,
    /// The receiver device.
    #[arg(long)]
    bob: String,
    /// Stop after this many seconds.
    #[arg(long)]
    duration_s: Option<f64>,
    /// The recording to write.
    file: PathBuf,
}

/// Runs a `qkdctl device` subcommand.
pub fn run(command: DeviceCommand) -> anyhow::Result<()> {
    match command {
        DeviceCommand::Emulate(args) => tokio::runtime::Runtime::new()?.block_on(emulate(args)),
        DeviceCommand::Record(args) => tokio::runtime::Runtime::new()?.block_on(record_live(args)),
        DeviceCommand::Inspect { file, json } => inspect(&file, json),
    }
}

async fn emulate(args: EmulateArgs) -> anyhow::Result<()> {
    let seed = args.seed.unwrap_or_else(rand::random);
    let mut cfg = EmulatorConfig::from_preset(&args.preset, seed)?;
    if let Some(km) = args.distance_km {
        cfg.params.distance_km = km;
        cfg.params.validate().map_err(|e| anyhow::anyhow!("--distance-km {km}: {e}"))?;
    }
    cfg.clock_offset_ppm = args.clock_ppm;
    cfg.drift_ppm_per_s = args.drift_ppm_per_s;
    if let Some(j) = args.jitter_ps {
        cfg.jitter_ps = j;
    }
    cfg.frame_pulses = args.frame_pulses;
    cfg.sync_every = args.sync_every;
    cfg.gaps = match (args.gap_every_frames, args.gap_ms) {
        (Some(every_frames), Some(duration_ms)) => Some(GapSpec { every_frames, duration_ms }),
        _ => None,
    };
    cfg.speed = args.speed;
    cfg.max_frames = args.frames;
    cfg.record = args.record.clone();
    let alice = Listener::bind(&DeviceAddress::parse(&args.listen_alice)?).await?;
    let bob = Listener::bind(&DeviceAddress::parse(&args.listen_bob)?).await?;
    let mut emu = Emulator::start(cfg, alice, bob).await?;
    println!(
        "emulating preset {} (seed {seed}): transmitter at {}, receiver at {}; waiting for both to subscribe",
        args.preset,
        emu.alice_address(),
        emu.bob_address()
    );
    let stop = emu.stop_token();
    tokio::spawn(common::shutdown_on_signal(stop.clone()));
    let summary = emu.finished().await?;
    emu.shutdown().await?;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    if let (Some(path), Some(c)) = (&args.record, summary.recording) {
        println!(
            "recorded {} transmitter events and {} tag batches to {}",
            c.transmitter_events,
            c.tag_batches,
            path.display()
        );
    }
    Ok(())
}

async fn record_live(args: RecordArgs) -> anyhow::Result<()> {
    let (alice, bob) = (DeviceAddress::parse(&args.alice)?, DeviceAddress::parse(&args.bob)?);
    let stop = CancellationToken::new();
    tokio::spawn(common::shutdown_on_signal(stop.clone()));
    if let Some(s) = args.duration_s {
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_secs_f64(s)).await;
            stop.cancel();
        });
    }
    println!("recording {alice} and {bob} to {} until Ctrl-C", args.file.display());
    let counts = qkd_device::grpc::record_live(&alice, &bob, &args.file, stop).await?;
    println!(
        "recorded {} transmitter events and {} tag batches to {}",
        counts.transmitter_events,
        counts.tag_batches,
        args.file.display()
    );
    Ok(())
}

fn describe(desc: Option<&proto::device::DeviceDescription>) -> String {
    match desc {
        None => "(none)".into(),
        Some(d) => match DeviceInfo::new(d.clone()) {
            Ok(info) => {
                let channels: Vec<String> = d
                    .channels
                    .iter()
                    .map(|c| {
                        let role = proto::device::ChannelRole::try_from(c.role).map_or("?", |r| r.as_str_name());
                        format!("{}={}", c.channel, role.trim_start_matches("CHANNEL_ROLE_").to_lowercase())
                    })
                    .collect();
                let mut s = info.summary();
                if d.sync_every_pulses > 0 {
                    s.push_str(&format!(", sync every {} pulses", d.sync_every_pulses));
                }
                if !channels.is_empty() {
                    s.push_str(&format!(", channels {}", channels.join(" ")));
                }
                s
            }
            Err(e) => format!("(invalid: {e})"),
        },
    }
}

fn inspect(file: &std::path::Path, json: bool) -> anyhow::Result<()> {
    let ins = record::inspect(file).with_context(|| format!("reading {}", file.display()))?;
    if json {
        let channels: Vec<(usize, u64)> =
            ins.tags_per_channel.iter().enumerate().filter(|(_, n)| **n > 0).map(|(c, n)| (c, *n)).collect();
        let v = serde_json::json!({
            "file": file.display().to_string(),
            "version": ins.header.version,
            "created_by": ins.header.created_by,
            "created_unix_ms": ins.header.created_unix_ms,
            "transmitter": describe(ins.header.transmitter.as_ref()),
            "receiver": describe(ins.header.receiver.as_ref()),
            "details": ins.header.details,
            "frames": ins.frames,
            "frame_range": ins.frame_range,
            "lost_events": ins.lost_events,
            "lost_frames": ins.lost_frames,
            "tag_batches": ins.tag_batches,
            "tags": ins.tags,
            "tags_per_channel": channels,
            "gaps": ins.gaps,
            "gap_ps": ins.gap_ps,
            "markers": ins.markers,
            "stream_starts": ins.stream_starts,
            "tag_time_range_ps": ins.tag_time_range,
            "file_bytes": ins.file_bytes,
            "complete": ins.complete,
            "error": ins.error.as_ref().map(ToString::to_string),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("file:            {} ({} bytes)", file.display(), ins.file_bytes);
        println!("format version:  {}", ins.header.version);
        println!("written by:      {} at unix ms {}", ins.header.created_by, ins.header.created_unix_ms);
        println!("transmitter:     {}", describe(ins.header.transmitter.as_ref()));
        println!("receiver:        {}", describe(ins.header.receiver.as_ref()));
        if !ins.header.details.is_empty() {
            println!("details:         {}", ins.header.details);
        }
        match ins.frame_range {
            Some((a, b)) => println!("frames:          {} (indices {a}..={b})", ins.frames),
            None => println!("frames:          0"),
        }
        println!("lost:            {} announcements, {} frames", ins.lost_events, ins.lost_frames);
        println!("tag batches:     {} ({} stream starts)", ins.tag_batches, ins.stream_starts);
        let per: Vec<String> = ins
            .tags_per_channel
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(c, n)| format!("ch{c}: {n}"))
            .collect();
        println!("tags:            {} ({})", ins.tags, per.join(", "));
        if let Some((a, b)) = ins.tag_time_range {
            println!("tag times:       {a} .. {b} ps ({:.3} s)", (b - a) as f64 * 1e-12);
        }
        println!("gaps:            {} ({:.3} ms lost)", ins.gaps, ins.gap_ps as f64 * 1e-9);
        println!("markers:         {}", ins.markers);
        println!("complete:        {}", if ins.complete { "yes (end record found)" } else { "no" });
    }
    match ins.error {
        Some(e) => Err(anyhow::Error::new(e).context("the recording is damaged")),
        None => Ok(()),
    }
}
