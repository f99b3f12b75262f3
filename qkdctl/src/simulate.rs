//! `qkdctl simulate` and `qkdctl sweep`: plan a link in simulated time with the full
//! post-processing (the same code as the daemons).

use std::io::Write;
use std::path::PathBuf;

use std::io::IsTerminal;

use anyhow::{Context, bail};
use common::config::SecuritySection;
use qkd_core::link::{ProtocolParams, Reconciliation};
use qkd_core::postproc::finite_key::SecurityParams;
use qkd_sim::planner::{Eavesdropper, Scenario, SimulationReport, simulate};
use qkd_sim::{InterceptResend, LinkParams, SourceBounds, analytic};

/// The reference experiment's published points (Wang et al., Light Sci. Appl. (2026)): (distance km, secret key
/// rate bit/s) at 120 km, and the maximum distance with positive key.
pub const PAPER_RATE_POINTS: [(f64, f64); 1] = [(120.0, 15.0)];
/// The reference experiment's maximum distance, km.
pub const PAPER_MAX_DISTANCE_KM: f64 = 127.0;
/// The reference experiment's QBER at 120 km (Z, X).
pub const PAPER_QBER_120KM: (f64, f64) = (0.0685, 0.096);

/// Default finite-key block for planning: 2 10^6 sifted bits (about two hours at 120 km with the
/// reference preset, a minute at 10 km). With the rigorous finite-key analysis (coherent-attack
/// bounds, exact sampling, eps_QKD = 1e-9) blocks of 10^6 bits give half the paper's rate at
/// 120 km (7.5 bit/s); 2 10^6 give 14 bit/s (docs/security.md).
pub const DEFAULT_BLOCK_BITS: u64 = 2_000_000;

/// Model and protocol options shared by `simulate` and `sweep`.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// Built-in preset (see presets/ in the repository): wang2026-120km, lab-10km.
    #[arg(long, default_value = "wang2026-120km")]
    preset: String,
    /// A preset file of your own (same format as presets/*.toml); overrides --preset.
    #[arg(long, value_name = "FILE")]
    preset_file: Option<PathBuf>,
    /// Fibre length, km (default: the preset's).
    #[arg(long)]
    distance_km: Option<f64>,
    /// Override any model parameter, e.g. --set visibility=0.98 --set dark_count_rate_hz=50.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Finite-key block size, sifted bits.
    #[arg(long)]
    block_bits: Option<u64>,
    /// Error correction, as `[protocol] reconciliation` of the daemons: cascade or ldpc
    /// (default: the daemons' default, cascade).
    #[arg(long, value_parser = parse_reconciliation)]
    reconciliation: Option<Reconciliation>,
    /// Cascade frame size in bits, 0 for one frame per block (default: the daemons' default).
    #[arg(long)]
    cascade_frame_bits: Option<u64>,
    /// LDPC frame size in bits (default: the daemons' default).
    #[arg(long)]
    ldpc_frame_bits: Option<u64>,
    /// Fraction of photons intercepted and resent by an eavesdropper on the fibre.
    #[arg(long, default_value_t = 0.0, conflicts_with = "pns")]
    intercept: f64,
    /// Photon-number-splitting eavesdropper: keeps one photon of every two-photon pulse and hides
    /// in the fibre loss (the report counts the key bits she learns).
    #[arg(long)]
    pns: bool,
    /// Seed of all random choices (runs are reproducible).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Overall security parameter eps_QKD of every block's key, as `[security] eps_qkd` of the
    /// daemons.
    #[arg(long, default_value_t = qkd_core::postproc::finite_key::DEFAULT_EPS_QKD)]
    eps_qkd: f64,
    /// Calibrated upper bound on the mean photon number that the key length assumes (default:
    /// the preset's `[security]` table). `--set mu=...` changes the simulated source instead,
    /// whose monitor then reports the new value.
    #[arg(long)]
    mu_max: Option<f64>,
    /// Calibrated upper bound on g2(0) that the key length assumes (default: the preset's
    /// `[security]` table).
    #[arg(long)]
    g2_max: Option<f64>,
}

impl ModelArgs {
    fn link(&self) -> anyhow::Result<(LinkParams, Option<SourceBounds>)> {
        let (mut link, bounds) = match &self.preset_file {
            Some(path) => LinkParams::with_bounds_from_toml_str(
                &std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
            )
            .with_context(|| format!("parsing {}", path.display()))?,
            None => LinkParams::preset_with_bounds(&self.preset)?,
        };
        if !self.overrides.is_empty() {
            let mut table = toml::Table::try_from(&link)?;
            for kv in &self.overrides {
                let (key, value) = kv.split_once('=').with_context(|| format!("--set {kv}: expected KEY=VALUE"))?;
                let value: toml::Value = format!("v = {value}")
                    .parse::<toml::Table>()
                    .ok()
                    .and_then(|mut t| t.remove("v"))
                    .unwrap_or_else(|| toml::Value::String(value.to_owned()));
                if !table.contains_key(key.trim()) {
                    bail!(
                        "--set {kv}: unknown parameter {:?}; known: {}",
                        key.trim(),
                        table.keys().cloned().collect::<Vec<_>>().join(", ")
                    );
                }
                table.insert(key.trim().to_owned(), value);
            }
            link = table.try_into().context("--set")?;
        }
        if let Some(km) = self.distance_km {
            link.distance_km = km;
        }
        link.validate()?;
        Ok((link, bounds))
    }

    /// The key length's assumptions: --eps-qkd, --mu-max and --g2-max over the preset's
    /// calibration (never the model's mu and g2).
    fn security(&self, link: &LinkParams, bounds: Option<SourceBounds>) -> anyhow::Result<SecurityParams> {
        let mut section = SecuritySection { eps_qkd: self.eps_qkd, mu_max: self.mu_max, g2_max: self.g2_max };
        section.complete(bounds).map_err(|e| anyhow::anyhow!("{e} (or pass --mu-max and --g2-max)"))?;
        section.params(link.p_z).map_err(|e| anyhow::anyhow!("{e}"))
    }

    fn protocol(&self) -> anyhow::Result<ProtocolParams> {
        let mut protocol =
            ProtocolParams { block_bits: self.block_bits.unwrap_or(DEFAULT_BLOCK_BITS), ..Default::default() };
        protocol.reconciliation = self.reconciliation.unwrap_or(protocol.reconciliation);
        protocol.cascade_frame_bits = self.cascade_frame_bits.unwrap_or(protocol.cascade_frame_bits);
        protocol.ldpc_frame_bits = self.ldpc_frame_bits.unwrap_or(protocol.ldpc_frame_bits);
        protocol.validate().map_err(|e| anyhow::anyhow!("protocol options: {e}"))?;
        Ok(protocol)
    }

    fn eavesdropper(&self) -> anyhow::Result<Eavesdropper> {
        if !(0.0..=1.0).contains(&self.intercept) {
            bail!("--intercept {} is not a fraction in [0, 1]", self.intercept);
        }
        Ok(if self.pns {
            Eavesdropper::PhotonNumberSplitting
        } else if self.intercept > 0.0 {
            Eavesdropper::InterceptResend(InterceptResend { fraction: self.intercept })
        } else {
            Eavesdropper::None
        })
    }

    fn scenario(&self, duration_s: Option<f64>) -> anyhow::Result<Scenario> {
        let (link, bounds) = self.link()?;
        let security = self.security(&link, bounds)?;
        let protocol = self.protocol()?;
        let duration_s = duration_s.unwrap_or_else(|| default_duration(&link, &protocol));
        if !(duration_s > 0.0 && duration_s.is_finite()) {
            bail!("--duration-s {duration_s} is not a positive number of seconds");
        }
        Ok(Scenario { link, protocol, security, duration_s, eavesdropper: self.eavesdropper()?, seed: self.seed })
    }
}

/// Options of `qkdctl simulate`.
#[derive(clap::Args, Debug)]
pub struct SimulateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Simulated duration, seconds (default: long enough for three blocks, from the analytic
    /// sifted-bit rate). Progress goes to stderr when it is a terminal.
    #[arg(long)]
    duration_s: Option<f64>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    /// Include every block's report and finite-key charges (`block_reports`, `block_security`) in
    /// the JSON output.
    #[arg(long)]
    blocks: bool,
}

fn default_duration(link: &LinkParams, protocol: &ProtocolParams) -> f64 {
    let sifted_per_s = analytic::expected(link).p_sifted * link.clock_hz;
    // A quarter block more than three, so that sifting fluctuations do not leave the third
    // block unfinished.
    if sifted_per_s > 0.0 { 3.25 * protocol.block_bits as f64 / sifted_per_s } else { 3600.0 }
}

/// Runs `qkdctl simulate`.
pub fn run_simulate(args: SimulateArgs) -> anyhow::Result<()> {
    let scenario = args.model.scenario(args.duration_s)?;
    let duration_s = scenario.duration_s;
    let started = std::time::Instant::now();
    let show = std::io::stderr().is_terminal();
    let mut report = simulate(&scenario, |done| {
        if show {
            let elapsed = started.elapsed().as_secs_f64();
            eprint!(
                "\rsimulating {:.0} s of operation: {:>3.0} % ({:.0} s simulated per s)",
                duration_s,
                100.0 * done,
                done * duration_s / elapsed.max(1e-3)
            );
            let _ = std::io::stderr().flush();
        }
    })?;
    if show {
        eprintln!(" ({:.1} s wall time)", started.elapsed().as_secs_f64());
    }
    if !args.blocks {
        report.block_reports.clear();
        report.block_security.clear();
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report, scenario.eavesdropper == Eavesdropper::PhotonNumberSplitting);
    }
    Ok(())
}

fn print_report(r: &SimulationReport, pns: bool) {
    println!("distance                 {:.1} km", r.distance_km);
    println!("simulated time           {:.0} s", r.duration_s);
    println!("detections               {:.1} /s", r.detections_per_s);
    println!("sifted key               {:.1} bit/s", r.sifted_bits_per_s);
    println!("QBER Z / X               {:.2} % / {:.2} %", 100.0 * r.qber_z, 100.0 * r.qber_x);
    println!("phase error upper bound  {:.2} %", 100.0 * r.phase_error_upper);
    println!("reconciliation f         {:.3}", r.reconciliation_efficiency);
    println!(
        "blocks                   {} of {} bits ({} aborted) in {:.0} s",
        r.blocks, r.block_size, r.aborted_blocks, r.blocks_span_s
    );
    println!(
        "secret key rate          {:.2} bit/s finite-key ({:.2} bit/s asymptotic, f = 1)",
        r.secret_key_rate_bps, r.asymptotic_key_rate_bps
    );
    if pns {
        println!("key bits known to Eve    {} (photon-number splitting)", r.eve_known_key_bits);
    }
}

/// Options of `qkdctl sweep`.
#[derive(clap::Args, Debug)]
pub struct SweepArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Parameter to sweep (any model parameter; distance_km by default).
    #[arg(long, default_value = "distance_km")]
    param: String,
    /// First value.
    #[arg(long, default_value_t = 0.0)]
    from: f64,
    /// Last value.
    #[arg(long, default_value_t = 140.0)]
    to: f64,
    /// Step.
    #[arg(long, default_value_t = 10.0)]
    step: f64,
    /// After the grid, also simulate every multiple of this step between the last value with a
    /// positive finite key and the next one, to locate the cutoff (0: no refinement).
    #[arg(long, default_value_t = 0.0)]
    refine_step: f64,
    /// Longest simulated duration per point, seconds (six hours, the paper's continuous run).
    #[arg(long, default_value_t = 21600.0)]
    duration_s: f64,
    /// Stop a point earlier, once this many finite-key blocks are expected to have closed (from
    /// the analytic sifted-bit rate, with a quarter block to spare): short links fill a block in
    /// seconds and would otherwise cost hours of CPU. 0: always simulate --duration-s.
    #[arg(long, default_value_t = 3)]
    blocks_per_point: u32,
    /// Output prefix: writes PREFIX.csv, PREFIX.json and PREFIX.svg.
    #[arg(long, default_value = "sweep")]
    out: PathBuf,
}

/// Simulates every scenario on all cores, printing progress; reports in the scenarios' order.
fn run_points(scenarios: &[Scenario]) -> anyhow::Result<Vec<SimulationReport>> {
    let done = std::sync::atomic::AtomicUsize::new(0);
    let total = scenarios.len();
    let started = std::time::Instant::now();
    let run_one = |s: &Scenario| -> anyhow::Result<SimulationReport> {
        let mut r = simulate(s, |_| {})?;
        r.block_reports.clear();
        r.block_security.clear();
        let n = done.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        eprint!("\r{n}/{total} points done ({:.0} s)", started.elapsed().as_secs_f64());
        let _ = std::io::stderr().flush();
        Ok(r)
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(total.max(1));
    let mut reports: Vec<Option<SimulationReport>> = (0..total).map(|_| None).collect();
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let chunks: Vec<Vec<usize>> = (0..threads).map(|t| (t..total).step_by(threads).collect()).collect();
        let handles: Vec<_> = chunks
            .into_iter()
            .map(|idx| {
                let run_one = &run_one;
                scope.spawn(move || {
                    idx.into_iter().map(|i| run_one(&scenarios[i]).map(|r| (i, r))).collect::<anyhow::Result<Vec<_>>>()
                })
            })
            .collect();
        for h in handles {
            for (i, r) in h.join().map_err(|_| anyhow::anyhow!("a sweep worker panicked"))?? {
                reports[i] = Some(r);
            }
        }
        Ok(())
    })?;
    eprintln!();
    Ok(reports.into_iter().map(|r| r.expect("every point simulated")).collect())
}

/// The largest swept value with a positive finite key, if any.
fn last_positive(values: &[f64], reports: &[SimulationReport]) -> Option<f64> {
    values.iter().zip(reports).rev().find(|(_, r)| r.secret_key_rate_bps > 0.0).map(|(v, _)| *v)
}

/// Runs `qkdctl sweep`.
pub fn run_sweep(args: SweepArgs) -> anyhow::Result<()> {
    if args.step.is_nan() || args.step <= 0.0 || args.to < args.from || args.refine_step < 0.0 {
        bail!("--from must not exceed --to, --step must be positive and --refine-step not negative");
    }
    let mut values = Vec::new();
    let mut k = 0u32;
    loop {
        let v = args.from + f64::from(k) * args.step;
        if v > args.to + 1e-9 {
            break;
        }
        values.push(v);
        k += 1;
    }
    let scenario_at = |value: f64| -> anyhow::Result<Scenario> {
        let mut model = args.model.clone();
        if args.param == "distance_km" {
            model.distance_km = Some(value);
        } else {
            model.overrides.push(format!("{}={value}", args.param));
        }
        let mut scenario = model.scenario(Some(args.duration_s))?;
        if args.blocks_per_point > 0 {
            let sifted_per_s = analytic::expected(&scenario.link).p_sifted * scenario.link.clock_hz;
            let enough = (f64::from(args.blocks_per_point) + 0.25) * scenario.protocol.block_bits as f64 / sifted_per_s;
            if enough.is_finite() && enough > 0.0 {
                scenario.duration_s = scenario.duration_s.min(enough);
            }
        }
        Ok(scenario)
    };
    let scenarios = values.iter().map(|&v| scenario_at(v)).collect::<anyhow::Result<Vec<_>>>()?;
    eprintln!(
        "sweeping {} over {} points, up to {:.0} simulated s each ({} blocks per point)",
        args.param,
        scenarios.len(),
        args.duration_s,
        args.blocks_per_point
    );
    let mut reports = run_points(&scenarios)?;

    // Refinement between the last positive value and the next one.
    if args.refine_step > 0.0
        && let Some(last) = last_positive(&values, &reports)
        && let Some(&next) = values.iter().find(|&&v| v > last)
    {
        let extra: Vec<f64> =
            (1..).map(|k| last + f64::from(k) * args.refine_step).take_while(|&v| v < next - 1e-9).collect();
        if !extra.is_empty() {
            eprintln!("refining between {last} and {next}: {} more points", extra.len());
            let scenarios = extra.iter().map(|&v| scenario_at(v)).collect::<anyhow::Result<Vec<_>>>()?;
            let more = run_points(&scenarios)?;
            let mut merged: Vec<(f64, SimulationReport)> =
                values.into_iter().zip(reports).chain(extra.into_iter().zip(more)).collect();
            merged.sort_by(|a, b| a.0.total_cmp(&b.0));
            (values, reports) = merged.into_iter().unzip();
        }
    }

    // Analytic curve on a fine grid.
    let mut analytic_points = Vec::new();
    let n_fine = 200;
    for k in 0..=n_fine {
        let value = args.from + (args.to - args.from) * k as f64 / n_fine as f64;
        let link = scenario_at(value)?.link;
        let e = analytic::expected(&link);
        analytic_points.push((value, e.asymptotic_key_per_pulse * link.clock_hz, e.qber_z, e.qber_x));
    }

    write_outputs(&args, &values, &reports, &analytic_points)?;
    match last_positive(&values, &reports) {
        Some(v) if args.param == "distance_km" => {
            println!("largest distance with positive finite key: {v:.1} km (paper: {PAPER_MAX_DISTANCE_KM} km)")
        }
        Some(v) => println!("largest {} with positive finite key: {v}", args.param),
        None => println!("no value in the sweep gives a positive finite key"),
    }
    Ok(())
}

fn write_outputs(
    args: &SweepArgs,
    values: &[f64],
    reports: &[SimulationReport],
    analytic: &[(f64, f64, f64, f64)],
) -> anyhow::Result<()> {
    let with_ext = |ext: &str| {
        let mut p = args.out.clone().into_os_string();
        p.push(format!(".{ext}"));
        PathBuf::from(p)
    };
    let mut csv = format!(
        "{},qber_z,qber_x,phase_error_upper,detections_per_s,sifted_bits_per_s,asymptotic_key_rate_bps,secret_key_rate_bps,block_size,blocks,aborted_blocks,blocks_span_s,secret_bits\n",
        args.param
    );
    for (v, r) in values.iter().zip(reports) {
        csv.push_str(&format!(
            "{v},{:.6},{:.6},{:.6},{:.3},{:.3},{:.4},{:.4},{},{},{},{:.1},{}\n",
            r.qber_z,
            r.qber_x,
            r.phase_error_upper,
            r.detections_per_s,
            r.sifted_bits_per_s,
            r.asymptotic_key_rate_bps,
            r.secret_key_rate_bps,
            r.block_size,
            r.blocks,
            r.aborted_blocks,
            r.blocks_span_s,
            r.secret_bits
        ));
    }
    std::fs::write(with_ext("csv"), csv)?;
    let json = serde_json::json!({
        "param": args.param,
        "max_duration_s": args.duration_s,
        "blocks_per_point": args.blocks_per_point,
        "values": values,
        "points": reports,
        "analytic": analytic.iter().map(|a| serde_json::json!({ "value": a.0, "asymptotic_key_rate_bps": a.1, "qber_z": a.2, "qber_x": a.3 })).collect::<Vec<_>>(),
        "paper": {
            "secret_key_rate_bps": PAPER_RATE_POINTS.iter().map(|&(d, r)| serde_json::json!({ "distance_km": d, "rate_bps": r })).collect::<Vec<_>>(),
            "qber_120km": { "z": PAPER_QBER_120KM.0, "x": PAPER_QBER_120KM.1 },
            "max_distance_km": PAPER_MAX_DISTANCE_KM,
        },
    });
    std::fs::write(with_ext("json"), serde_json::to_string_pretty(&json)?)?;
    crate::plot::sweep_svg(&with_ext("svg"), &args.param, values, reports, analytic)?;
    println!("wrote {}, {} and {}", with_ext("csv").display(), with_ext("json").display(), with_ext("svg").display());
    Ok(())
}

/// `--reconciliation`: the names of `[protocol] reconciliation`.
fn parse_reconciliation(name: &str) -> Result<Reconciliation, String> {
    serde_json::from_value(serde_json::Value::String(name.to_owned()))
        .map_err(|_| format!("{name:?} is not a reconciliation method; use cascade or ldpc"))
}
