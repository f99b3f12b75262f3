//! The whole protocol in memory, without the simulator, a runtime or a database: a synthetic
//! channel (random clicks with a fixed error rate), Alice's core and Bob's driver over
//! [`MemoryAlice`], [`MemoryStore`]s at both ends, and crashes injected at each step of the
//! two-ended commit. (`common`'s link tests run the same protocol with the simulated source and
//! receiver and sled stores.)

use std::sync::{Arc, Mutex};

use proto::link::{AmplifyRequest, ParityRequest};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

use super::alice::{AliceCore, AliceEvent, BlockPhase, BlockRequest, PreparedFrame};
use super::bob::{BobLink, LinkPeer};
use super::memory::MemoryAlice;
use super::reconcile::LDPC_REVEAL_STEPS;
use super::request::{Request, Response};
use super::testing::{Crash, FlakyAlice};
use super::{AbortReason, LinkError, ProtocolParams, Reconciliation};
use crate::block_on;
use crate::postproc::binary_entropy;
use crate::postproc::finite_key::{SecurityParams, SourceReading};
use crate::prepared::TxStates;
use crate::quantum::{Basis, Detection, FrameSecret, FrameStates, Measurement, State};
use crate::store::{KeyStore, MemoryStore};

/// A synthetic channel with the rates of the `lab-10km` preset: each pulse clicks with
/// probability `P_CLICK`, Bob measures in Z or X with equal probability, and a measurement in
/// Alice's basis gives the wrong outcome with probability `ERROR` (the other basis gives a
/// random one). The transmitter's monitor reads the preset's mu and g2.
const P_CLICK: f64 = 1.2e-3;
const ERROR: f64 = 0.03;
const READING: SourceReading = SourceReading { mu: 3.89e-3, g2: 0.0085 };
const P_Z: f64 = 0.8;

/// Bob's detections of one frame of `n_pulses` pulses whose states Alice drew from `secret`.
fn detect(secret: &FrameSecret, n_pulses: u64, rng: &mut ChaCha20Rng) -> Vec<Detection> {
    let states = FrameStates::new(secret);
    let mut out = Vec::new();
    let mut pulse_idx = 0u64;
    loop {
        // Geometric gap to the next click.
        let u: f64 = rng.random();
        pulse_idx += ((1.0 - u).ln() / (1.0 - P_CLICK).ln()).floor() as u64;
        if pulse_idx >= n_pulses {
            return out;
        }
        let sent = states.state(pulse_idx, P_Z);
        let basis = if rng.random_bool(0.5) { Basis::Z } else { Basis::X };
        let outcome = if sent.basis() == basis { sent != State::Early && sent != State::Plus } else { rng.random() };
        let outcome = outcome ^ (sent.basis() == basis && rng.random_bool(ERROR));
        let measurement = match basis {
            Basis::Z => Measurement::Z { late: outcome },
            Basis::X => Measurement::X { minus: outcome },
        };
        out.push(Detection { pulse_idx, measurement });
        pulse_idx += 1;
    }
}

struct Rig {
    security: SecurityParams,
    params: ProtocolParams,
    alice: MemoryAlice,
    alice_store: Arc<MemoryStore>,
    bob_store: MemoryStore,
    rng: ChaCha20Rng,
    frame_idx: u64,
}

impl Rig {
    fn new(seed: u64) -> Self {
        Self::with_params(seed, ProtocolParams { block_bits: 100_000, ..ProtocolParams::default() })
    }

    fn with_params(seed: u64, params: ProtocolParams) -> Self {
        // The lab preset's calibrated bounds.
        let security = SecurityParams::with_bounds(4.0e-3, 0.009, P_Z);
        let alice_store = Arc::new(MemoryStore::new());
        let core = AliceCore::new("alice".into(), params.clone(), security.clone(), ChaCha20Rng::seed_from_u64(seed));
        Self {
            alice: MemoryAlice::new(core, alice_store.clone()),
            alice_store,
            bob_store: MemoryStore::new(),
            rng: ChaCha20Rng::seed_from_u64(seed ^ 0xB0B),
            security,
            params,
            frame_idx: 0,
        }
    }

    async fn open(&mut self, crash: Crash) -> BobLink<FlakyAlice> {
        let peer = FlakyAlice { alice: self.alice.clone(), crash };
        BobLink::open(peer, "bob", self.params.clone(), self.security.clone(), &self.bob_store, true).await.unwrap().0
    }

    /// Emits, detects and sifts frames until a block is ready.
    async fn fill_block<P: LinkPeer>(&mut self, bob: &mut BobLink<P>) {
        while !bob.block_ready() {
            let n_pulses = self.params.frame_pulses;
            let secret = FrameSecret::random(&mut self.rng);
            let detections = detect(&secret, n_pulses, &mut self.rng);
            let frame = PreparedFrame { n_pulses, states: TxStates::derived(secret, P_Z), reading: Some(READING) };
            self.alice.lock().core.register_frame(self.frame_idx, frame);
            bob.sift_frame(self.frame_idx, n_pulses, &detections).await.unwrap();
            self.frame_idx += 1;
        }
    }
}

#[test]
fn the_synthetic_channel_has_its_error_rates() {
    let mut rng = ChaCha20Rng::seed_from_u64(5);
    let secret = FrameSecret::random(&mut rng);
    let detections = detect(&secret, 1 << 22, &mut rng);
    let expected = (1u64 << 22) as f64 * P_CLICK;
    assert!((detections.len() as f64 - expected).abs() < 5.0 * expected.sqrt(), "{}", detections.len());
    assert!(detections.windows(2).all(|w| w[0].pulse_idx < w[1].pulse_idx));
    let states = FrameStates::new(&secret);
    let (mut n_z, mut errors_z) = (0u64, 0u64);
    for d in &detections {
        if let (Measurement::Z { late }, State::Early | State::Late) = (d.measurement, states.state(d.pulse_idx, P_Z)) {
            n_z += 1;
            errors_z += u64::from(late != (states.state(d.pulse_idx, P_Z) == State::Late));
        }
    }
    let qber = errors_z as f64 / n_z as f64;
    assert!((qber - ERROR).abs() < 0.01, "QBER Z {qber}");
}

#[test]
fn blocks_commit_with_identical_keys_at_both_ends() {
    block_on(async {
        let mut rig = Rig::new(1);
        let mut bob = rig.open(Crash::None).await;
        for _ in 0..2 {
            rig.fill_block(&mut bob).await;
            let report = bob.process_block(&rig.bob_store, 0).await.unwrap();
            assert_eq!(report.abort_reason, None, "{report:?}");
            assert!(report.n_keys > 0 && report.qber_z > 0.0 && report.qber_z < 0.1, "{report:?}");
        }
        let (a, b) = (rig.alice_store.summary().unwrap(), rig.bob_store.summary().unwrap());
        assert!(a.n_keys > 0);
        assert_eq!(a, b);
    });
}

#[test]
fn a_full_store_aborts_new_blocks_at_both_ends_until_there_is_room() {
    block_on(async {
        let mut rig = Rig::new(11);
        let mut bob = rig.open(Crash::None).await;
        rig.fill_block(&mut bob).await;
        let first = bob.process_block(&rig.bob_store, 0).await.unwrap();
        assert_eq!(first.abort_reason, None, "{first:?}");
        let held = rig.bob_store.n_units().unwrap();
        assert_eq!(held, first.n_keys);
        bob.set_max_stored_units(held);
        rig.fill_block(&mut bob).await;
        let full = bob.process_block(&rig.bob_store, 0).await.unwrap();
        let reason = full.abort_reason.as_ref().map(ToString::to_string).unwrap_or_default();
        assert!(reason.contains("key store is full"), "{full:?}");
        assert_eq!(full.n_keys, 0);
        // The reason is typed at both ends: Bob's report, and Alice's event for his Abort.
        assert_eq!(full.abort_reason.as_ref().map(|a| a.reason), Some(AbortReason::StoreFull));
        match rig.alice.lock().events.last() {
            Some(AliceEvent::Aborted { block_id, abort, by_bob: true }) => {
                assert_eq!((*block_id, abort), (full.block_id, full.abort_reason.as_ref().unwrap()));
            }
            other => panic!("Alice did not report Bob's abort: {other:?}"),
        }
        let (a, b) = (rig.alice_store.summary().unwrap(), rig.bob_store.summary().unwrap());
        assert_eq!(a, b);
        assert_eq!((b.n_keys, b.n_ready_blocks, b.n_pending_blocks), (held, 1, 0));
        bob.set_max_stored_units(held + 1_000_000);
        rig.fill_block(&mut bob).await;
        let next = bob.process_block(&rig.bob_store, 0).await.unwrap();
        assert_eq!(next.abort_reason, None, "{next:?}");
        assert!(next.n_keys > 0);
        assert_eq!(rig.alice_store.summary().unwrap(), rig.bob_store.summary().unwrap());
    });
}

#[test]
fn every_reconciliation_method_commits_identical_keys_and_charges_its_leak() {
    for (reconciliation, cascade_frame_bits, max_round_trips) in [
        (Reconciliation::Cascade, 0, u32::MAX),
        (Reconciliation::Cascade, 16_384, u32::MAX),
        (Reconciliation::Ldpc, 0, 1 + LDPC_REVEAL_STEPS as u32),
    ] {
        block_on(async {
            let params = ProtocolParams {
                block_bits: 60_000,
                reconciliation,
                cascade_frame_bits,
                ldpc_frame_bits: 16_384,
                ..ProtocolParams::default()
            };
            let mut rig = Rig::with_params(4, params);
            let mut bob = rig.open(Crash::None).await;
            rig.fill_block(&mut bob).await;
            let report = bob.process_block(&rig.bob_store, 0).await.unwrap();
            let case = format!("{reconciliation:?} frames of {cascade_frame_bits}: {report:?}");
            assert_eq!(report.abort_reason, None, "{case}");
            assert!(report.n_keys > 0, "{case}");
            assert!(report.round_trips >= 1 && report.round_trips <= max_round_trips, "{case}");
            let shannon = report.n_bits as f64 * binary_entropy(report.qber_z);
            let security = report.security.as_ref().expect("a committed block has its report");
            assert_eq!(report.leak_bits, security.leak_ec_bits + security.leak_verification_bits, "{case}");
            let f = security.leak_ec_bits as f64 / shannon;
            let f_max = if reconciliation == Reconciliation::Ldpc { 1.8 } else { 1.25 };
            assert!(f > 1.0 && f < f_max, "{case}: f = {f}");
            let (a, b) = (rig.alice_store.summary().unwrap(), rig.bob_store.summary().unwrap());
            assert!(a.n_keys > 0);
            assert_eq!(a, b, "{reconciliation:?}");
        });
    }
}

#[test]
fn a_crash_at_any_step_of_the_commit_settles_to_the_same_keys() {
    for crash in [Crash::BeforeAliceCommits, Crash::AfterAliceCommits] {
        block_on(async {
            let mut rig = Rig::new(2);
            let mut bob = rig.open(crash).await;
            rig.fill_block(&mut bob).await;
            let err = bob.process_block(&rig.bob_store, 0).await.unwrap_err();
            assert!(matches!(err, LinkError::Transport(_)), "{crash:?}: {err}");
            assert_eq!(rig.bob_store.pending_blocks().unwrap().len(), 1);
            let alice_keys = rig.alice_store.summary().unwrap().n_keys;
            assert_eq!(alice_keys > 0, crash == Crash::AfterAliceCommits, "{crash:?}");
            drop(bob);
            let _bob = rig.open(Crash::None).await;
            let (a, b) = (rig.alice_store.summary().unwrap(), rig.bob_store.summary().unwrap());
            assert_eq!(a, b, "{crash:?}");
            assert_eq!(b.n_pending_blocks, 0);
        });
    }
}

#[test]
fn mismatched_parameters_are_refused_at_hello() {
    block_on(async {
        let mut rig = Rig::new(3);
        rig.params.block_bits += 1;
        let peer = FlakyAlice { alice: rig.alice.clone(), crash: Crash::None };
        let err = BobLink::open(peer, "bob", rig.params.clone(), rig.security.clone(), &rig.bob_store, true)
            .await
            .err()
            .unwrap();
        assert!(matches!(err, LinkError::ParamsMismatch(_)), "{err}");
    });
}

/// An in-memory Alice to whom requests out of a block's phase are sent alongside Bob's own:
/// before Verify, an Amplify and a Commit; after it, Parities and Verify again; before the
/// Commit, a second Amplify. Each is refused, and it records the refusals.
struct OutOfPhase {
    alice: MemoryAlice,
    refused: Arc<Mutex<Vec<LinkError>>>,
}

impl OutOfPhase {
    async fn probe(&mut self, request: Request) {
        let refusal = self.alice.call(request).await.expect_err("a request out of phase was answered");
        self.refused.lock().unwrap().push(refusal);
    }
}

impl LinkPeer for OutOfPhase {
    async fn call(&mut self, request: Request) -> Result<Response, LinkError> {
        match &request {
            Request::Verify(verify) => {
                let block_id = verify.block_id.clone();
                self.probe(AmplifyRequest { block_id: block_id.clone(), verified: true }.into()).await;
                self.probe(proto::link::CommitRequest { block_id: block_id.clone(), ..Default::default() }.into())
                    .await;
                let response = self.alice.call(request.clone()).await?;
                self.probe(ParityRequest { block_id, queries: vec![] }.into()).await;
                self.probe(request).await;
                Ok(response)
            }
            Request::Commit(commit) => {
                self.probe(AmplifyRequest { block_id: commit.block_id.clone(), verified: true }.into()).await;
                self.alice.call(request).await
            }
            _ => self.alice.call(request).await,
        }
    }
}

#[test]
fn requests_out_of_a_blocks_phase_are_refused_naming_both_phases_and_change_nothing() {
    use BlockPhase::*;
    block_on(async {
        // The same block twice, once with the probes: the same keys at the end.
        let mut plain = Rig::new(6);
        let mut bob = plain.open(Crash::None).await;
        plain.fill_block(&mut bob).await;
        assert_eq!(bob.process_block(&plain.bob_store, 0).await.unwrap().abort_reason, None);

        let mut rig = Rig::new(6);
        let refused = Arc::new(Mutex::new(Vec::new()));
        let peer = OutOfPhase { alice: rig.alice.clone(), refused: refused.clone() };
        let (mut bob, _) =
            BobLink::open(peer, "bob", rig.params.clone(), rig.security.clone(), &rig.bob_store, true).await.unwrap();
        rig.fill_block(&mut bob).await;
        let report = bob.process_block(&rig.bob_store, 0).await.unwrap();
        assert_eq!(report.abort_reason, None, "{report:?}");
        let phases: Vec<_> = refused
            .lock()
            .unwrap()
            .iter()
            .map(|e| match e {
                LinkError::Phase { block_id, request, expected, actual } => {
                    assert_eq!(*block_id, report.block_id);
                    assert!(
                        e.to_string().contains(&format!("expects the block {expected}, but it is {actual}")),
                        "{e}"
                    );
                    (*request, *expected, *actual)
                }
                other => panic!("not a phase error: {other}"),
            })
            .collect();
        assert_eq!(
            phases,
            [
                (BlockRequest::Amplify, Verified, Reconciling),
                (BlockRequest::Commit, Amplified, Reconciling),
                (BlockRequest::Parities, Reconciling, Verified),
                (BlockRequest::Verify, Reconciling, Verified),
                (BlockRequest::Amplify, Verified, Amplified),
            ]
        );
        let summary = rig.alice_store.summary().unwrap();
        assert!(summary.n_keys > 0);
        assert_eq!(summary, rig.bob_store.summary().unwrap());
        assert_eq!(summary, plain.alice_store.summary().unwrap(), "the refused requests changed the keys");
    });
}

/// Frames lost at either end are dropped at both: a frame Alice's source lost is answered
/// "unavailable", a frame Bob's receiver lost is erased unused at Alice (sifting it afterwards
/// finds nothing); neither end counts a dropped frame in a block (StartBlock checks that both
/// counted the same frames and bits), and the block commits identical keys.
#[test]
fn frames_lost_at_either_end_are_dropped_at_both_and_blocks_still_agree() {
    block_on(async {
        let mut rig = Rig::new(21);
        let mut bob = rig.open(Crash::None).await;
        let n_pulses = rig.params.frame_pulses;
        let (mut lost_at_alice, mut lost_at_bob, mut sifted) = (0u64, 0u64, 0u64);
        while !bob.block_ready() {
            let secret = FrameSecret::random(&mut rig.rng);
            let detections = detect(&secret, n_pulses, &mut rig.rng);
            let idx = rig.frame_idx;
            rig.frame_idx += 1;
            if idx % 3 == 1 {
                // Alice's source lost it: she never had its states.
                rig.alice.lock().core.frames_lost(idx, 1);
                assert!(!rig.alice.lock().core.awaits_frame(idx));
                assert_eq!(bob.sift_frame(idx, n_pulses, &detections).await.unwrap(), None);
                lost_at_alice += 1;
                continue;
            }
            let frame = PreparedFrame { n_pulses, states: TxStates::derived(secret, P_Z), reading: Some(READING) };
            rig.alice.lock().core.register_frame(idx, frame);
            if idx % 3 == 2 {
                // Bob's receiver lost part of it.
                bob.drop_frame(idx).await.unwrap();
                lost_at_bob += 1;
                // Erased at Alice: nothing left to sift.
                assert_eq!(bob.sift_frame(idx, n_pulses, &detections).await.unwrap(), None);
                continue;
            }
            assert!(bob.sift_frame(idx, n_pulses, &detections).await.unwrap().is_some());
            sifted += 1;
        }
        assert!(lost_at_alice > 0 && lost_at_bob > 0 && sifted > 0);
        assert_eq!(bob.counters.frames, sifted);
        assert_eq!(bob.counters.frames_dropped, lost_at_alice + 2 * lost_at_bob);
        let report = bob.process_block(&rig.bob_store, 0).await.unwrap();
        assert_eq!(report.abort_reason, None, "{report:?}");
        let (a, b) = (rig.alice_store.summary().unwrap(), rig.bob_store.summary().unwrap());
        assert!(a.n_keys > 0);
        assert_eq!(a, b);
    });
}

/// A block is marked simulated in both stores when either end's channel is simulated, and only
/// then.
#[test]
fn blocks_are_marked_simulated_at_both_ends_when_either_end_is_simulated() {
    block_on(async {
        for (alice_simulated, bob_simulated) in [(false, false), (true, false), (false, true), (true, true)] {
            let mut rig = Rig::new(23);
            rig.alice.lock().core.set_simulated(alice_simulated);
            let peer = FlakyAlice { alice: rig.alice.clone(), crash: Crash::None };
            let (mut bob, _) =
                BobLink::open(peer, "bob", rig.params.clone(), rig.security.clone(), &rig.bob_store, bob_simulated)
                    .await
                    .unwrap();
            rig.fill_block(&mut bob).await;
            let report = bob.process_block(&rig.bob_store, 0).await.unwrap();
            assert_eq!(report.abort_reason, None, "{report:?}");
            let expected = alice_simulated || bob_simulated;
            for (end, store) in [("alice", rig.alice_store.as_ref()), ("bob", &rig.bob_store)] {
                let blocks = store.blocks().unwrap();
                assert_eq!(blocks.len(), 1, "{end}");
                assert_eq!(
                    blocks[0].0.simulated, expected,
                    "{end}: alice simulated {alice_simulated}, bob simulated {bob_simulated}"
                );
            }
        }
    });
}
