//! The planning tool's engine: a whole link (source, fibre, optional eavesdropper, receiver,
//! Alice's core and Bob's driver, both stores) in one process, in simulated time, as fast as
//! the CPU allows. The same code as the daemons: only the transport (in memory) and the clock
//! (frames counted, never read from the OS) differ.

use std::sync::Arc;

use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

use crate::link::alice::AliceCore;
use crate::link::bob::{BlockReport, BobLink};
use crate::link::memory::MemoryAlice;
use crate::link::{LinkError, ProtocolParams};
use crate::sim::{analytic, FrameSecret, InterceptResend, LinkParams, Receiver, Source};
use crate::store::{KeyStore, SledStore};

/// What to simulate.
#[derive(Clone, Debug)]
pub struct Scenario {
    /// Physical parameters.
    pub link: LinkParams,
    /// Post-processing parameters.
    pub protocol: ProtocolParams,
    /// Simulated duration, seconds.
    pub duration_s: f64,
    /// Fraction of photons an intercept-resend eavesdropper measures (0 = none).
    pub intercept_fraction: f64,
    /// Seed of every random choice (Alice's secrets, the physics, the eavesdropper).
    pub seed: u64,
}

/// The outcome of a simulated run. Rates are per simulated second.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SimulationReport {
    /// Fibre length, km.
    pub distance_km: f64,
    /// Simulated seconds.
    pub duration_s: f64,
    /// Key-basis QBER over all blocks that reached error correction (corrected bits / bits).
    pub qber_z: f64,
    /// Test-basis QBER (Alice sent |+>, Bob measured X) over all blocks.
    pub qber_x: f64,
    /// Largest finite-size phase-error bound among the committed blocks.
    pub phase_error_upper: f64,
    /// Detections per second.
    pub detections_per_s: f64,
    /// Sifted key bits per second.
    pub sifted_bits_per_s: f64,
    /// Asymptotic key rate of the analytic model (f = 1.0 and no finite-size effects), bit/s.
    pub asymptotic_key_rate_bps: f64,
    /// Finite-key secret key rate: final key bits stored / simulated seconds.
    pub secret_key_rate_bps: f64,
    /// Finite-key block size, sifted bits.
    pub block_size: u64,
    /// Blocks post-processed.
    pub blocks: u64,
    /// Blocks aborted (no key).
    pub aborted_blocks: u64,
    /// Secret key bits stored (identical at both ends).
    pub secret_bits: u64,
    /// Mean reconciliation efficiency f = leak / (n h(QBER)) over committed blocks (0 if none).
    pub reconciliation_efficiency: f64,
    /// Each block's report.
    pub block_reports: Vec<BlockReport>,
}

/// Errors of a simulation.
#[derive(Debug, thiserror::Error)]
pub enum PlannerError {
    /// The protocol failed (a bug, or inconsistent parameters).
    #[error(transparent)]
    Link(#[from] LinkError),
    /// The stores could not be created.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The two ends' stores differ at the end (never expected).
    #[error("alice's and bob's stores differ after the run")]
    StoresDiffer,
}

/// Runs a scenario; `progress(done_fraction)` is called about a hundred times.
pub fn simulate(scenario: &Scenario, mut progress: impl FnMut(f64)) -> Result<SimulationReport, PlannerError> {
    let runtime = tokio::runtime::Builder::new_current_thread().build().map_err(|e| LinkError::Transport(e.to_string()))?;
    runtime.block_on(simulate_async(scenario, &mut progress))
}

async fn simulate_async(scenario: &Scenario, progress: &mut dyn FnMut(f64)) -> Result<SimulationReport, PlannerError> {
    let Scenario { link, protocol, duration_s, intercept_fraction, seed } = scenario;
    let alice_store = Arc::new(SledStore::temporary()?);
    let bob_store = SledStore::temporary()?;
    let core = AliceCore::new("alice".into(), protocol.clone(), link.clone(), ChaCha20Rng::seed_from_u64(*seed));
    let alice = MemoryAlice::new(core, alice_store.clone());
    let (mut bob, _) = BobLink::open(alice.clone(), "bob", protocol.clone(), link.clone(), &bob_store).await?;
    let source = Source::new(link);
    let mut receiver = Receiver::new(link);
    let eve = InterceptResend { fraction: *intercept_fraction };
    let mut rng = ChaCha20Rng::seed_from_u64(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 1);

    let frame_pulses = protocol.frame_pulses;
    let frame_s = frame_pulses as f64 / link.clock_hz;
    let n_frames = (duration_s / frame_s).ceil().max(1.0) as u64;
    let mut reports = Vec::new();
    let mut next_progress = 0u64;
    for frame_idx in 0..n_frames {
        if frame_idx >= next_progress {
            progress(frame_idx as f64 / n_frames as f64);
            next_progress += (n_frames / 100).max(1);
        }
        let secret = FrameSecret::random(&mut rng);
        let mut photons = source.emit_frame(&secret, frame_pulses, &mut rng);
        alice.lock().core.register_frame(frame_idx, secret, frame_pulses);
        if eve.fraction > 0.0 {
            eve.attack(&mut photons, &mut rng);
        }
        let detections = receiver.detect_frame(&photons, frame_pulses, &mut rng);
        let x_counts = bob.sift_frame(frame_idx, frame_pulses, &detections).await?;
        receiver.feedback(x_counts.plus_plus + x_counts.plus_minus, x_counts.plus_minus);
        if bob.block_ready() {
            let now_ms = ((frame_idx + 1) as f64 * frame_s * 1000.0) as u64;
            alice.lock().now_unix_ms = now_ms;
            reports.push(bob.process_block(&bob_store, now_ms).await?);
        }
    }
    progress(1.0);
    let simulated_s = n_frames as f64 * frame_s;
    let (a, b) = (alice_store.summary()?, bob_store.summary()?);
    if a != b {
        return Err(PlannerError::StoresDiffer);
    }
    Ok(report(scenario, simulated_s, &bob.counters, reports, b.n_key_bits))
}

fn report(
    scenario: &Scenario,
    simulated_s: f64,
    counters: &crate::link::bob::LinkCounters,
    reports: Vec<BlockReport>,
    secret_bits: u64,
) -> SimulationReport {
    let corrected: Vec<&BlockReport> = reports.iter().filter(|r| r.qber_z > 0.0 || r.abort_reason.is_none()).collect();
    let z_bits: u64 = corrected.iter().map(|r| r.n_bits).sum();
    let qber_z = if z_bits > 0 { corrected.iter().map(|r| r.qber_z * r.n_bits as f64).sum::<f64>() / z_bits as f64 } else { 0.0 };
    let all_bits: u64 = reports.iter().map(|r| r.n_bits).sum();
    let qber_x = if all_bits > 0 { reports.iter().map(|r| r.qber_x * r.n_bits as f64).sum::<f64>() / all_bits as f64 } else { 0.0 };
    let committed: Vec<&BlockReport> = reports.iter().filter(|r| r.abort_reason.is_none()).collect();
    let efficiency = if committed.is_empty() {
        0.0
    } else {
        committed
            .iter()
            .map(|r| {
                let h = crate::postproc::binary_entropy(r.qber_z);
                if h > 0.0 { (r.leak_bits - crate::link::alice::TAG_BITS) as f64 / (r.n_bits as f64 * h) } else { 0.0 }
            })
            .sum::<f64>()
            / committed.len() as f64
    };
    let expected = analytic::expected(&scenario.link);
    SimulationReport {
        distance_km: scenario.link.distance_km,
        duration_s: simulated_s,
        qber_z,
        qber_x,
        phase_error_upper: committed.iter().map(|r| r.phase_error_upper).fold(0.0, f64::max),
        detections_per_s: counters.detections as f64 / simulated_s,
        sifted_bits_per_s: counters.sifted_bits as f64 / simulated_s,
        asymptotic_key_rate_bps: expected.asymptotic_key_per_pulse * scenario.link.clock_hz,
        secret_key_rate_bps: secret_bits as f64 / simulated_s,
        block_size: scenario.protocol.block_bits,
        blocks: reports.len() as u64,
        aborted_blocks: reports.iter().filter(|r| r.abort_reason.is_some()).count() as u64,
        secret_bits,
        reconciliation_efficiency: efficiency,
        block_reports: reports,
    }
}
