//! The planning tool's engine: a whole link (source, fibre, optional eavesdropper, receiver,
//! Alice's core and Bob's driver, both stores) in one process, in simulated time, as fast as
//! the CPU allows. The same code as the daemons: only the transport (in memory) and the clock
//! (frames counted, never read from the OS) differ.
//!
//! Frames follow each other in simulated time: frame k covers pulses k 2^22 to (k + 1) 2^22 - 1
//! (with the default frame length), Bob feeds each frame's test counts back to his phase loop
//! right after sifting it, and a block is post-processed as soon as Bob holds `block_bits`
//! sifted bits, stamped with the simulated time at the end of its last frame.

use std::sync::Arc;

use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

use crate::{
    Detection, FrameSecret, FrameStates, InterceptResend, LinkParams, Measurement, PhotonNumberSplitting, Receiver,
    Source, State, analytic,
};
use qkd_core::link::alice::{AliceCore, PreparedFrame};
use qkd_core::link::bob::{BlockReport, BobLink};
use qkd_core::link::memory::MemoryAlice;
use qkd_core::link::{LinkError, ProtocolParams};
use qkd_core::postproc::finite_key::{
    BlockStats, EpsBudget, SecurityParams, XCounts, n_tags_for, phase_error_bounds, phase_error_bounds_at_split,
};
use qkd_core::prepared::TxStates;
use qkd_core::store::{KeyStore, MemoryStore};

/// An eavesdropper on the fibre (see [`crate::eve`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub enum Eavesdropper {
    /// No attack.
    #[default]
    None,
    /// Intercept-resend on a fraction of the photons.
    InterceptResend(InterceptResend),
    /// Photon-number splitting of every two-photon pulse, hidden in the fibre loss.
    PhotonNumberSplitting,
}

/// What to simulate.
#[derive(Clone, Debug)]
pub struct Scenario {
    /// Physical parameters.
    pub link: LinkParams,
    /// Post-processing parameters (block size, frame length, reconciliation).
    pub protocol: ProtocolParams,
    /// What the key length assumes (eps_QKD, p_Z, the calibrated source bounds): never taken from
    /// `link`'s model values, so a simulated source brighter than its calibration is caught by
    /// the monitor, as on hardware.
    pub security: SecurityParams,
    /// Simulated duration, in s (rounded up to whole frames).
    pub duration_s: f64,
    /// The attack on the fibre, if any.
    pub eavesdropper: Eavesdropper,
    /// Seed of every random choice (Alice's secrets, the physics, the eavesdropper).
    pub seed: u64,
}

/// What the finite-key analysis charged for one block, next to what an eavesdropper actually
/// learned (zero without one). No key material.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct BlockSecurity {
    /// Sifted key bits in the block.
    pub n_key_bits: u64,
    /// Upper bound M on the multi-photon Z pulses that the analysis tags as insecure (0 when the
    /// phase-error estimate itself failed).
    pub n_multi_photon_upper: f64,
    /// Lower bound on the single-photon key bits that the key length is computed from (0 when
    /// the estimate failed).
    pub n_single_photon_lower: f64,
    /// Final key bits stored (0 when aborted).
    pub final_bits: u64,
    /// Bits disclosed by error correction and verification.
    pub leak_bits: u64,
    /// Z-state pulses of the block's frames whose second photon a photon-number-splitting Eve
    /// holds (whether Bob detected them or not).
    pub eve_split_z_pulses: u64,
    /// Key bits of the block whose value Eve knows: Z-sent, Z-measured pulses she split (the
    /// multi-photon pulses actually in the key sample).
    pub eve_known_key_bits: u64,
    /// Test clicks (Z sent, X measured) of pulses Eve split: the multi-photon pulses actually in
    /// the test sample.
    pub eve_split_test_clicks: u64,
    /// Under photon-number splitting, the key length (bits, before rounding to key units) that the
    /// finite-key formula gives with only the multi-photon pulses Eve actually holds in the key
    /// (`eve_known_key_bits`) tagged, which the length with every possible multi-photon pulse
    /// tagged must never exceed; `None` without that attack or when the estimate failed.
    pub key_length_at_actual_split: Option<f64>,
}

/// The outcome of a simulated run. Rates are per simulated second.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SimulationReport {
    /// Fibre length, in km.
    pub distance_km: f64,
    /// Simulated time, in s (whole frames).
    pub duration_s: f64,
    /// Key-basis QBER (fraction) over all blocks that reached error correction (corrected bits /
    /// bits).
    pub qber_z: f64,
    /// Test-basis QBER (fraction: Alice sent |+>, Bob measured X) over all blocks.
    pub qber_x: f64,
    /// Largest finite-size phase-error bound (fraction) among the committed blocks.
    pub phase_error_upper: f64,
    /// Bob's detections per second.
    pub detections_per_s: f64,
    /// Sifted key bits per second.
    pub sifted_bits_per_s: f64,
    /// Asymptotic key rate of the analytic model (the finite-key analysis's limit for infinite
    /// blocks, error correction at the Shannon limit f = 1), in bit/s.
    pub asymptotic_key_rate_bps: f64,
    /// Finite-key secret key rate, in bit/s: final key bits stored divided by the simulated time
    /// the processed blocks took (`blocks_span_s`), i.e. the steady-state rate; sifted bits left
    /// over at the end of the run, too few for a block, are not counted. 0 when no block
    /// closed.
    pub secret_key_rate_bps: f64,
    /// Finite-key block size, in sifted bits.
    pub block_size: u64,
    /// Blocks post-processed.
    pub blocks: u64,
    /// Blocks aborted (no key).
    pub aborted_blocks: u64,
    /// Simulated time from the start to the close of the last block, in s (0 when no block
    /// closed).
    pub blocks_span_s: f64,
    /// Secret key bits stored (identical at both ends).
    pub secret_bits: u64,
    /// Mean reconciliation efficiency f = leak / (n h(QBER)) over committed blocks (0 if none).
    pub reconciliation_efficiency: f64,
    /// Key bits known to a photon-number-splitting eavesdropper, over all blocks (0 without
    /// one).
    pub eve_known_key_bits: u64,
    /// Each block's report.
    pub block_reports: Vec<BlockReport>,
    /// Each block's finite-key charges and the eavesdropper's actual knowledge, in block order.
    pub block_security: Vec<BlockSecurity>,
}

/// Errors of a simulation.
#[derive(Debug, thiserror::Error)]
pub enum PlannerError {
    /// The protocol failed (a bug, or inconsistent parameters).
    #[error(transparent)]
    Link(#[from] LinkError),
    /// A store failed.
    #[error(transparent)]
    Store(#[from] qkd_core::store::StoreError),
    /// The two ends' stores differ at the end (never expected).
    #[error("alice's and bob's stores differ after the run")]
    StoresDiffer,
}

/// Runs a scenario; `progress(done_fraction)` is called about a hundred times.
pub fn simulate(scenario: &Scenario, mut progress: impl FnMut(f64)) -> Result<SimulationReport, PlannerError> {
    qkd_core::block_on(simulate_async(scenario, &mut progress))
}

/// The photons of one frame and, under photon-number splitting, the pulses Eve split.
fn fibre_frame(
    scenario: &Scenario,
    source: &Source,
    pns: Option<&PhotonNumberSplitting>,
    secret: &FrameSecret,
    rng: &mut ChaCha20Rng,
) -> (Vec<crate::Photon>, Vec<u64>) {
    let n_pulses = scenario.protocol.frame_pulses;
    if let Some(pns) = pns {
        let frame = pns.emit_frame(secret, n_pulses, rng);
        return (frame.photons, frame.split_pulses);
    }
    let mut photons = source.emit_frame(secret, n_pulses, rng);
    if let Eavesdropper::InterceptResend(attack) = &scenario.eavesdropper
        && attack.fraction > 0.0
    {
        attack.attack(&mut photons, rng);
    }
    (photons, Vec::new())
}

/// What a photon-number-splitting Eve holds after one frame, counted per block.
#[derive(Clone, Copy, Debug, Default)]
struct EveTally {
    /// Split pulses Alice sent in Z.
    split_z: u64,
    /// Key bits (Z sent, Z measured) among them.
    known_key_bits: u64,
    /// Test clicks (Z sent, X measured) among them.
    test_clicks: u64,
}

impl EveTally {
    /// The frame's split pulses (`split`, ascending) against Alice's states and Bob's detections.
    fn of_frame(secret: &FrameSecret, p_z: f64, split: &[u64], detections: &[Detection]) -> Self {
        let split_states = FrameStates::new(secret).states(split, p_z);
        let is_z = |state: State| matches!(state, State::Early | State::Late);
        let split_z = split_states.iter().filter(|&&state| is_z(state)).count() as u64;
        let mut tally = Self { split_z, ..Self::default() };
        for d in detections {
            if let Ok(k) = split.binary_search(&d.pulse_idx)
                && is_z(split_states[k])
            {
                match d.measurement {
                    Measurement::Z { .. } => tally.known_key_bits += 1,
                    Measurement::X { .. } => tally.test_clicks += 1,
                }
            }
        }
        tally
    }

    fn add(&mut self, other: Self) {
        self.split_z += other.split_z;
        self.known_key_bits += other.known_key_bits;
        self.test_clicks += other.test_clicks;
    }
}

async fn simulate_async(scenario: &Scenario, progress: &mut dyn FnMut(f64)) -> Result<SimulationReport, PlannerError> {
    let Scenario { link, protocol, security, duration_s, seed, .. } = scenario;
    let alice_store = Arc::new(MemoryStore::new());
    let bob_store = MemoryStore::new();
    // The simulated link's pre-shared authentication secret (both ends in this process).
    let (alice_auth, bob_auth) = qkd_core::link::testing::auth_pools(*seed);
    let mut core = AliceCore::new(
        "alice".into(),
        protocol.clone(),
        security.clone(),
        ChaCha20Rng::seed_from_u64(*seed),
        alice_auth,
    );
    core.set_simulated(true);
    let alice = MemoryAlice::new(core, alice_store.clone());
    let (mut bob, _) =
        BobLink::open(alice.clone(), "bob", protocol.clone(), security.clone(), &bob_store, true, bob_auth).await?;
    bob.set_side_slot_monitor(link.side_slot_calibration());
    let source = Source::new(link);
    let pns =
        matches!(scenario.eavesdropper, Eavesdropper::PhotonNumberSplitting).then(|| PhotonNumberSplitting::new(link));
    let mut receiver = Receiver::new(link);
    let mut rng = ChaCha20Rng::seed_from_u64(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 1);

    let frame_pulses = protocol.frame_pulses;
    let frame_s = frame_pulses as f64 / link.clock_hz;
    let n_frames = (duration_s / frame_s).ceil().max(1.0) as u64;
    let mut reports = Vec::new();
    let mut block_security = Vec::new();
    let (mut block_counts, mut block_eve) = (XCounts::default(), EveTally::default());
    let mut blocks_span_s = 0.0;
    let mut next_progress = 0u64;
    for frame_idx in 0..n_frames {
        if frame_idx >= next_progress {
            progress(frame_idx as f64 / n_frames as f64);
            next_progress += (n_frames / 100).max(1);
        }
        let secret = FrameSecret::random(&mut rng);
        let (photons, split) = fibre_frame(scenario, &source, pns.as_ref(), &secret, &mut rng);
        let detections = receiver.detect_frame(&photons, frame_pulses, &mut rng);
        if !split.is_empty() {
            block_eve.add(EveTally::of_frame(&secret, link.p_z, &split, &detections));
        }
        let reading = source.monitor_reading(&mut rng);
        let frame = PreparedFrame {
            n_pulses: frame_pulses,
            states: TxStates::derived(secret, link.p_z),
            reading: Some(reading),
        };
        alice.lock().core.register_frame(frame_idx, frame);
        let x_counts = bob
            .sift_frame(frame_idx, frame_pulses, &detections)
            .await?
            .expect("Alice holds every frame of the simulation: it was registered just now");
        bob.add_x_slot_counts(&receiver.x_slot_counts());
        block_counts.add(&x_counts);
        receiver.feedback(x_counts.n_plus_sent(), x_counts.plus_minus);
        if bob.block_ready() {
            let now_s = (frame_idx + 1) as f64 * frame_s;
            let now_ms = (now_s * 1000.0) as u64;
            alice.lock().now_unix_ms = now_ms;
            let report = bob.process_block(&bob_store, now_ms).await?;
            let stats = BlockStats {
                n_key_bits: report.n_bits,
                n_pulses: report.n_pulses,
                x_counts: std::mem::take(&mut block_counts),
                leak_ec_bits: report.security.as_ref().map_or(report.leak_bits, |s| s.leak_ec_bits),
            };
            let bounds = phase_error_bounds(&stats, security).ok();
            let eve = std::mem::take(&mut block_eve);
            let key_length_at_actual_split = pns
                .as_ref()
                .and_then(|_| phase_error_bounds_at_split(&stats, security, eve.known_key_bits as f64).ok())
                .map(|b| {
                    let budget = EpsBudget::from_total(security.eps_qkd);
                    let tags = n_tags_for(stats.n_key_bits, budget.eps_cor);
                    b.entropy_bits()
                        - stats.leak_ec_bits as f64
                        - (qkd_core::postproc::finite_key::TAG_BITS * u64::from(tags)) as f64
                        - budget.pa_cost_bits()
                });
            block_security.push(BlockSecurity {
                n_key_bits: report.n_bits,
                n_multi_photon_upper: bounds.as_ref().map_or(0.0, |b| b.n_multi_photon_upper),
                n_single_photon_lower: bounds.as_ref().map_or(0.0, |b| b.n_single_photon_lower),
                final_bits: report.final_bits,
                leak_bits: report.leak_bits,
                eve_split_z_pulses: eve.split_z,
                eve_known_key_bits: eve.known_key_bits,
                eve_split_test_clicks: eve.test_clicks,
                key_length_at_actual_split,
            });
            blocks_span_s = now_s;
            reports.push(report);
        }
    }
    progress(1.0);
    let simulated_s = n_frames as f64 * frame_s;
    let (a, b) = (alice_store.summary()?, bob_store.summary()?);
    if a != b {
        return Err(PlannerError::StoresDiffer);
    }
    let run = RunTotals {
        simulated_s,
        blocks_span_s,
        detections: bob.counters.detections,
        sifted_bits: bob.counters.sifted_bits,
        secret_bits: b.n_key_bits,
    };
    Ok(report(scenario, run, reports, block_security))
}

/// Totals of a run that the report is computed from.
struct RunTotals {
    simulated_s: f64,
    blocks_span_s: f64,
    detections: u64,
    sifted_bits: u64,
    secret_bits: u64,
}

fn report(
    scenario: &Scenario,
    run: RunTotals,
    reports: Vec<BlockReport>,
    block_security: Vec<BlockSecurity>,
) -> SimulationReport {
    let corrected: Vec<&BlockReport> = reports.iter().filter(|r| r.qber_z > 0.0 || r.abort_reason.is_none()).collect();
    let z_bits: u64 = corrected.iter().map(|r| r.n_bits).sum();
    let qber_z = if z_bits > 0 {
        corrected.iter().map(|r| r.qber_z * r.n_bits as f64).sum::<f64>() / z_bits as f64
    } else {
        0.0
    };
    let all_bits: u64 = reports.iter().map(|r| r.n_bits).sum();
    let qber_x = if all_bits > 0 {
        reports.iter().map(|r| r.qber_x * r.n_bits as f64).sum::<f64>() / all_bits as f64
    } else {
        0.0
    };
    let committed: Vec<&BlockReport> = reports.iter().filter(|r| r.abort_reason.is_none()).collect();
    let efficiency = if committed.is_empty() {
        0.0
    } else {
        committed
            .iter()
            .map(|r| {
                let h = qkd_core::postproc::binary_entropy(r.qber_z);
                let leak_ec = r.security.as_ref().map_or(0, |s| s.leak_ec_bits);
                if h > 0.0 { leak_ec as f64 / (r.n_bits as f64 * h) } else { 0.0 }
            })
            .sum::<f64>()
            / committed.len() as f64
    };
    let expected = analytic::expected(&scenario.link);
    SimulationReport {
        distance_km: scenario.link.distance_km,
        duration_s: run.simulated_s,
        qber_z,
        qber_x,
        phase_error_upper: committed.iter().map(|r| r.phase_error_upper).fold(0.0, f64::max),
        detections_per_s: run.detections as f64 / run.simulated_s,
        sifted_bits_per_s: run.sifted_bits as f64 / run.simulated_s,
        asymptotic_key_rate_bps: expected.asymptotic_key_per_pulse * scenario.link.clock_hz,
        secret_key_rate_bps: if run.blocks_span_s > 0.0 { run.secret_bits as f64 / run.blocks_span_s } else { 0.0 },
        block_size: scenario.protocol.block_bits,
        blocks: reports.len() as u64,
        aborted_blocks: reports.iter().filter(|r| r.abort_reason.is_some()).count() as u64,
        blocks_span_s: run.blocks_span_s,
        secret_bits: run.secret_bits,
        reconciliation_efficiency: efficiency,
        eve_known_key_bits: block_security.iter().map(|b| b.eve_known_key_bits).sum(),
        block_reports: reports,
        block_security,
    }
}
