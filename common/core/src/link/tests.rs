//! The whole protocol in memory, without the simulator, a runtime or a database: a synthetic
//! channel (random clicks with a fixed error rate), Alice's core and Bob's driver over
//! [`MemoryAlice`], [`MemoryStore`]s at both ends, and crashes injected at each step of the
//! two-ended commit. (`common`'s link tests run the same protocol with the simulated source and
//! receiver and sled stores.)

use std::sync::{Arc, Mutex};

use proto::link::{AmplifyRequest, ParityRequest};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

use super::alice::{AliceCore, AliceEvent, BlockPhase, BlockRequest, PreparedFrame};
use super::bob::{BobLink, LinkPeer};
use super::memory::MemoryAlice;
use super::reconcile::LDPC_REVEAL_STEPS;
use super::request::{Request, Response};
use super::testing::{Crash, FlakyAlice};
use super::{AbortReason, LinkError, ProtocolParams, Reconciliation};
use crate::auth::{AuthPool, AuthPoolError, AuthState, MemoryAuthPool};
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

/// An authentication pool that logs every pad and hash key it hands out, to check that no pad
/// bit is ever used twice.
pub(super) struct LoggedPool {
    pool: MemoryAuthPool,
    pub(super) pads: Mutex<Vec<(u64, u64)>>,
    pub(super) keys: Mutex<Vec<u64>>,
}

impl LoggedPool {
    pub(super) fn new(secret: &[u8]) -> Arc<Self> {
        Arc::new(Self { pool: MemoryAuthPool::new(secret), pads: Mutex::default(), keys: Mutex::default() })
    }

    /// Panics if two pads overlap, or a pad overlaps a hash key.
    pub(super) fn assert_no_reuse(&self, end: &str) {
        let mut pads = self.pads.lock().unwrap().clone();
        pads.sort();
        for w in pads.windows(2) {
            assert!(w[0].0 + w[0].1 <= w[1].0, "{end}: pads {:?} and {:?} overlap", w[0], w[1]);
        }
        for &key in self.keys.lock().unwrap().iter() {
            for &(offset, n) in &pads {
                assert!(key + 128 <= offset || key >= offset + n, "{end}: hash key at {key} overlaps pad {offset}+{n}");
            }
        }
    }
}

impl AuthPool for LoggedPool {
    fn state(&self) -> Result<AuthState, AuthPoolError> {
        self.pool.state()
    }
    fn set_state(&self, state: AuthState) -> Result<(), AuthPoolError> {
        self.pool.set_state(state)
    }
    fn total_bits(&self) -> Result<u64, AuthPoolError> {
        self.pool.total_bits()
    }
    fn hash_key(&self, offset: u64) -> Result<zeroize::Zeroizing<[u8; 16]>, AuthPoolError> {
        // A pad read below the watermark would be a reuse in waiting: the caller moves it first.
        assert!(self.pool.watermark()? >= offset + 128, "hash key read above the watermark");
        self.keys.lock().unwrap().push(offset);
        self.pool.hash_key(offset)
    }
    fn pad(&self, offset: u64, n_bits: u64) -> Result<zeroize::Zeroizing<Vec<u8>>, AuthPoolError> {
        assert!(self.pool.watermark()? >= offset + n_bits, "pad read above the watermark");
        self.pads.lock().unwrap().push((offset, n_bits));
        self.pool.pad(offset, n_bits)
    }
    fn stage_refill(&self, block_id: uuid::Uuid, bytes: &[u8]) -> Result<(), AuthPoolError> {
        self.pool.stage_refill(block_id, bytes)
    }
    fn settle_refill(&self, block_id: uuid::Uuid, keep: bool) -> Result<(), AuthPoolError> {
        self.pool.settle_refill(block_id, keep)
    }
    fn staged_refills(&self) -> Result<Vec<uuid::Uuid>, AuthPoolError> {
        self.pool.staged_refills()
    }
    fn stage_secret(&self, id: uuid::Uuid, bytes: &[u8]) -> Result<(), AuthPoolError> {
        self.pool.stage_secret(id, bytes)
    }
    fn staged_secrets(&self) -> Result<Vec<uuid::Uuid>, AuthPoolError> {
        self.pool.staged_secrets()
    }
    fn apply_secret(&self, id: uuid::Uuid) -> Result<(), AuthPoolError> {
        self.pool.apply_secret(id)
    }
    fn applied_secrets(&self) -> Result<Vec<crate::auth::AppliedSecret>, AuthPoolError> {
        self.pool.applied_secrets()
    }
}

/// The pre-shared secret of the tests' pools.
fn secret(seed: u64, n_bytes: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; n_bytes];
    ChaCha20Rng::seed_from_u64(seed ^ 0x5EC).fill_bytes(&mut bytes);
    bytes
}

pub(super) struct Rig {
    security: SecurityParams,
    params: ProtocolParams,
    alice: MemoryAlice,
    alice_store: Arc<MemoryStore>,
    bob_store: MemoryStore,
    alice_pool: Arc<LoggedPool>,
    bob_pool: Arc<LoggedPool>,
    rng: ChaCha20Rng,
    frame_idx: u64,
    seed: u64,
}

impl Rig {
    fn new(seed: u64) -> Self {
        Self::with_params(seed, ProtocolParams { block_bits: 100_000, ..ProtocolParams::default() })
    }

    fn with_params(seed: u64, params: ProtocolParams) -> Self {
        Self::with_secret(seed, params, 4096)
    }

    /// A rig whose pools start with a pre-shared secret of `secret_bytes` bytes.
    fn with_secret(seed: u64, params: ProtocolParams, secret_bytes: usize) -> Self {
        // The lab preset's calibrated bounds.
        let security = SecurityParams::with_bounds(4.0e-3, 0.009, P_Z);
        let alice_store = Arc::new(MemoryStore::new());
        let psk = secret(seed, secret_bytes);
        let (alice_pool, bob_pool) = (LoggedPool::new(&psk), LoggedPool::new(&psk));
        let core = AliceCore::new(
            "alice".into(),
            params.clone(),
            security.clone(),
            ChaCha20Rng::seed_from_u64(seed),
            alice_pool.clone(),
        );
        Self {
            alice: MemoryAlice::new(core, alice_store.clone()),
            alice_store,
            bob_store: MemoryStore::new(),
            alice_pool,
            bob_pool,
            rng: ChaCha20Rng::seed_from_u64(seed ^ 0xB0B),
            security,
            params,
            frame_idx: 0,
            seed,
        }
    }

    async fn open(&mut self, crash: Crash) -> BobLink<FlakyAlice> {
        let peer = FlakyAlice { alice: self.alice.clone(), crash };
        self.open_with(peer).await
    }

    async fn open_with<P: LinkPeer>(&mut self, peer: P) -> BobLink<P> {
        BobLink::open(
            peer,
            "bob",
            self.params.clone(),
            self.security.clone(),
            &self.bob_store,
            true,
            self.bob_pool.clone(),
        )
        .await
        .unwrap()
        .0
    }

    /// Alice's process restarts: a new core over the same store and pool (her frames and
    /// session are lost).
    fn restart_alice(&mut self) {
        self.seed += 1000;
        let core = AliceCore::new(
            "alice".into(),
            self.params.clone(),
            self.security.clone(),
            ChaCha20Rng::seed_from_u64(self.seed),
            self.alice_pool.clone(),
        );
        self.alice.lock().core = core;
    }

    /// Emits, detects and sifts frames until a block is ready.
    async fn fill_block<P: LinkPeer>(&mut self, bob: &mut BobLink<P>) {
        self.try_fill_block(bob).await.unwrap();
    }

    /// [`Rig::fill_block`], returning a failed sift's error.
    async fn try_fill_block<P: LinkPeer>(&mut self, bob: &mut BobLink<P>) -> Result<(), LinkError> {
        while !bob.block_ready() {
            let n_pulses = self.params.frame_pulses;
            let secret = FrameSecret::random(&mut self.rng);
            let detections = detect(&secret, n_pulses, &mut self.rng);
            let frame = PreparedFrame { n_pulses, states: TxStates::derived(secret, P_Z), reading: Some(READING) };
            self.alice.lock().core.register_frame(self.frame_idx, frame);
            self.frame_idx += 1;
            bob.sift_frame(self.frame_idx - 1, n_pulses, &detections).await?;
        }
        Ok(())
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
        let err = BobLink::open(
            peer,
            "bob",
            rig.params.clone(),
            rig.security.clone(),
            &rig.bob_store,
            true,
            rig.bob_pool.clone(),
        )
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
        let (mut bob, _) = BobLink::open(
            peer,
            "bob",
            rig.params.clone(),
            rig.security.clone(),
            &rig.bob_store,
            true,
            rig.bob_pool.clone(),
        )
        .await
        .unwrap();
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
            let (mut bob, _) = BobLink::open(
                peer,
                "bob",
                rig.params.clone(),
                rig.security.clone(),
                &rig.bob_store,
                bob_simulated,
                rig.bob_pool.clone(),
            )
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

// ---------------------------------------------------------------------------------------------
// Wegman-Carter authentication: a man in the middle who alters, replays or drops messages.

/// Which way a message goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Way {
    Request,
    Response,
}

/// What the man in the middle does to the first message named `name` going `way`.
#[derive(Clone, Debug)]
enum Fault {
    /// Nothing.
    None,
    /// Flips the bit at this fraction of the encoded message (0: the first, 1: the last).
    Flip(&'static str, Way, f64),
    /// Lets Alice answer the request, then loses the answer (a crash or a broken connection).
    LoseAnswer(&'static str),
    /// Replaces the answer by this one (recorded earlier).
    ReplayAnswer(Response),
    /// Replaces the request by this one, with the current block's ID.
    ReplayRequest(Request),
}

/// A peer between Bob and Alice that records every exchange and applies one fault.
struct Mitm {
    alice: MemoryAlice,
    fault: Fault,
    /// Whether the fault fired, and whether it changed the message's meaning (a flipped bit
    /// prost decodes to the same message, such as a boolean 1 read as 3, changes nothing).
    fired: Arc<Mutex<Option<bool>>>,
    log: Arc<Mutex<Vec<(Request, Response)>>>,
}

impl Mitm {
    fn new(alice: &MemoryAlice, fault: Fault) -> Self {
        Self { alice: alice.clone(), fault, fired: Arc::default(), log: Arc::default() }
    }

    fn fire(&self, changed: bool) {
        *self.fired.lock().unwrap() = Some(changed);
    }
}

fn flip<M: prost::Message + Default + Clone>(message: &M, fraction: f64) -> Result<M, LinkError> {
    let mut bytes = message.encode_to_vec();
    if bytes.is_empty() {
        return Ok(message.clone());
    }
    let bit = ((bytes.len() * 8 - 1) as f64 * fraction) as usize;
    bytes[bit / 8] ^= 1 << (bit % 8);
    M::decode(bytes.as_slice()).map_err(|e| LinkError::Malformed(format!("undecodable message: {e}")))
}

macro_rules! flip_any {
    ($value:expr, $fraction:expr, $enum:ident: $($variant:ident),*) => {
        match $value {
            $($enum::$variant(m) => flip(m, $fraction).map($enum::$variant),)*
        }
    };
}

fn flip_request(request: &Request, fraction: f64) -> Result<Request, LinkError> {
    flip_any!(request, fraction, Request: Hello, Sift, StartBlock, Parities, Syndromes, Reveal, Verify, Amplify, Commit, Abort)
}

fn flip_response(response: &Response, fraction: f64) -> Result<Response, LinkError> {
    flip_any!(response, fraction, Response: Hello, Sift, StartBlock, Parities, Syndromes, Reveal, Verify, Amplify, Commit, Abort)
}

/// The block a request names, if any.
fn block_of(request: &Request) -> Option<&str> {
    Some(match request {
        Request::Parities(r) => &r.block_id,
        Request::Syndromes(r) => &r.block_id,
        Request::Reveal(r) => &r.block_id,
        Request::Verify(r) => &r.block_id,
        Request::Amplify(r) => &r.block_id,
        Request::Commit(r) => &r.block_id,
        Request::Abort(r) => &r.block_id,
        _ => return None,
    })
}

fn with_block(mut request: Request, block_id: &str) -> Request {
    match &mut request {
        Request::Parities(r) => r.block_id = block_id.into(),
        Request::Syndromes(r) => r.block_id = block_id.into(),
        Request::Reveal(r) => r.block_id = block_id.into(),
        Request::Verify(r) => r.block_id = block_id.into(),
        Request::Amplify(r) => r.block_id = block_id.into(),
        Request::Commit(r) => r.block_id = block_id.into(),
        Request::Abort(r) => r.block_id = block_id.into(),
        _ => {}
    }
    request
}

impl LinkPeer for Mitm {
    async fn call(&mut self, request: Request) -> Result<Response, LinkError> {
        let first = self.fired.lock().unwrap().is_none();
        let mut request = request;
        let mut replace_answer = None;
        let mut lose_answer = false;
        match &self.fault {
            Fault::Flip(name, Way::Request, fraction) if first && request.name() == *name => {
                let tampered = flip_request(&request, *fraction);
                self.fire(tampered.as_ref().map_or(true, |t| *t != request));
                request = tampered?;
            }
            Fault::ReplayRequest(old) if first && request.name() == old.name() => {
                let old = match block_of(&request) {
                    Some(block_id) => with_block(old.clone(), block_id),
                    None => old.clone(),
                };
                self.fire(old != request);
                request = old;
            }
            Fault::ReplayAnswer(old) if first && request.name() == old.name() => replace_answer = Some(old.clone()),
            Fault::LoseAnswer(name) if first && request.name() == *name => lose_answer = true,
            _ => {}
        }
        let mut response = self.alice.call(request.clone()).await?;
        if lose_answer {
            self.fire(true);
            return Err(LinkError::Transport("connection lost".into()));
        }
        if let Some(old) = replace_answer {
            self.fire(old != response);
            response = old;
        }
        if let Fault::Flip(name, Way::Response, fraction) = &self.fault
            && first
            && request.name() == *name
        {
            let tampered = flip_response(&response, *fraction);
            self.fire(tampered.as_ref().map_or(true, |t| *t != response));
            response = tampered?;
        }
        self.log.lock().unwrap().push((request, response.clone()));
        Ok(response)
    }
}

/// What became of a block: Bob's report's abort reason, or his error.
#[derive(Debug)]
enum Outcome {
    Committed,
    Aborted(AbortReason),
    Failed(String),
}

impl Rig {
    /// One block through `fault`; afterwards a new session (Hello) settles whatever a failure
    /// left pending. Returns what happened and whether the fault changed a message.
    async fn block_through(&mut self, fault: Fault) -> (Outcome, Option<bool>) {
        let peer = Mitm::new(&self.alice, fault);
        let fired = peer.fired.clone();
        let mut bob = self.open_with(peer).await;
        let outcome = match self.try_fill_block(&mut bob).await {
            // A Sift message altered into one the other end refuses (undecodable, inconsistent).
            Err(e) => Outcome::Failed(e.to_string()),
            Ok(()) => match bob.process_block(&self.bob_store, 0).await {
                Ok(report) => match report.abort_reason {
                    None => Outcome::Committed,
                    Some(abort) => Outcome::Aborted(abort.reason),
                },
                Err(e) => Outcome::Failed(e.to_string()),
            },
        };
        let fired = *fired.lock().unwrap();
        drop(bob);
        let _settled = self.open(Crash::None).await;
        assert_eq!(self.alice.lock().core.blocks_in_progress(), 0);
        assert!(self.bob_pool.staged_refills().unwrap().is_empty());
        assert!(self.alice_pool.staged_refills().unwrap().is_empty());
        (outcome, fired)
    }

    /// Both ends hold the same keys and their pools the same bits (spent or not).
    fn assert_consistent(&self) {
        assert_eq!(self.alice_store.summary().unwrap(), self.bob_store.summary().unwrap());
        assert_eq!(self.alice_pool.total_bits().unwrap(), self.bob_pool.total_bits().unwrap());
        assert!(self.bob_pool.watermark().unwrap() <= self.alice_pool.watermark().unwrap());
    }
}

/// Acceptance 1 of issue 14: one flipped bit in any message of a block, either way, and the
/// block yields no key at either end; where the altered message decodes and error correction
/// still agrees, the reason is the failed authentication.
#[test]
fn a_flipped_bit_in_any_message_of_a_block_stores_no_key_at_either_end() {
    let cascade = ProtocolParams { block_bits: 60_000, ..ProtocolParams::default() };
    let ldpc = ProtocolParams {
        block_bits: 60_000,
        reconciliation: Reconciliation::Ldpc,
        ldpc_frame_bits: 16_384,
        // A low first estimate makes the first block ask for reveals.
        initial_qber: 0.01,
        ..ProtocolParams::default()
    };
    let mut cases = Vec::new();
    for name in ["Sift", "StartBlock", "Parities", "Verify", "Amplify", "Commit"] {
        cases.push((cascade.clone(), name));
    }
    for name in ["Syndromes", "Reveal"] {
        cases.push((ldpc.clone(), name));
    }
    let mut auth_failures = std::collections::BTreeMap::<(&str, Way), usize>::new();
    for (params, name) in cases {
        for way in [Way::Request, Way::Response] {
            for fraction in (0..=10).map(|i| f64::from(i) / 10.0) {
                block_on(async {
                    let mut rig = Rig::with_params(31, params.clone());
                    let (outcome, fired) = rig.block_through(Fault::Flip(name, way, fraction)).await;
                    let case = format!("{name} {way:?} bit at {fraction}: {outcome:?}");
                    let changed = fired.unwrap_or_else(|| panic!("{case}: no such message"));
                    rig.assert_consistent();
                    if !changed {
                        // The bit decodes to the same message: nothing was altered.
                        return;
                    }
                    if (name, way) == ("Commit", Way::Response) {
                        // Both tags were checked and Alice stored the block; her answer only says
                        // so. Bob keeps the block pending on an altered answer (as on a lost one)
                        // and the next Hello settles it: the same keys at both ends.
                        assert!(matches!(outcome, Outcome::Failed(_)), "{case}");
                        assert!(rig.bob_store.summary().unwrap().n_keys > 0, "{case}");
                        return;
                    }
                    assert_eq!(rig.alice_store.summary().unwrap().n_keys, 0, "{case}");
                    assert_eq!(rig.bob_store.summary().unwrap().n_keys, 0, "{case}");
                    match outcome {
                        Outcome::Committed => panic!("{case}: an altered block committed"),
                        Outcome::Aborted(AbortReason::AuthenticationFailed) => {
                            *auth_failures.entry((name, way)).or_default() += 1;
                        }
                        Outcome::Aborted(reason) => panic!("{case}: aborted for {reason}"),
                        Outcome::Failed(e) => {
                            let authenticated = e.contains("authentication failed");
                            if authenticated {
                                *auth_failures.entry((name, way)).or_default() += 1;
                            }
                        }
                    }
                });
            }
        }
    }
    // The tags catch what no other check does: altered monitor readings or pad positions, parity
    // queries that still make sense, the Amplify parameters, Bob's tag itself. (An altered
    // AmplifyRequest can only change its block ID or say "not verified": both drop the block.)
    for case in [
        ("Sift", Way::Request),
        ("Sift", Way::Response),
        ("StartBlock", Way::Response),
        ("Parities", Way::Request),
        ("Parities", Way::Response),
        ("Amplify", Way::Response),
        ("Commit", Way::Request),
    ] {
        assert!(auth_failures.get(&case).copied().unwrap_or(0) > 0, "{case:?}: {auth_failures:?}");
    }
}

/// Acceptance 1, replays: messages of an earlier block, or of an earlier round of the same
/// block, are refused and store nothing.
#[test]
fn replayed_messages_from_an_earlier_block_or_round_are_refused() {
    block_on(async {
        let mut rig = Rig::new(41);
        // Block 1, recorded.
        let peer = Mitm::new(&rig.alice, Fault::None);
        let log = peer.log.clone();
        let mut bob = rig.open_with(peer).await;
        rig.fill_block(&mut bob).await;
        assert_eq!(bob.process_block(&rig.bob_store, 0).await.unwrap().abort_reason, None);
        drop(bob);
        let recorded = log.lock().unwrap().clone();
        let find = |name: &str| recorded.iter().find(|(req, _)| req.name() == name).cloned().unwrap();
        let keys_after_one = rig.alice_store.summary().unwrap();
        assert!(keys_after_one.n_keys > 0);

        let (start, amplify, commit) = (find("StartBlock"), find("Amplify"), find("Commit"));
        for (what, fault) in [
            // Block 1's StartBlock answer: its pad positions are below Bob's watermark.
            ("StartBlock answer", Fault::ReplayAnswer(start.1)),
            // Block 1's Amplify answer (seed, key IDs, Alice's tag) in block 2.
            ("Amplify answer", Fault::ReplayAnswer(amplify.1)),
            // Block 1's Commit (Bob's tag) for block 2.
            ("Commit request", Fault::ReplayRequest(commit.0)),
        ] {
            let (outcome, fired) = rig.block_through(fault).await;
            assert_eq!(fired, Some(true), "{what}");
            match &outcome {
                Outcome::Aborted(AbortReason::AuthenticationFailed) => {}
                Outcome::Failed(e) if e.contains("authentication failed") => {}
                other => panic!("{what}: {other:?}"),
            }
            rig.assert_consistent();
            assert_eq!(rig.alice_store.summary().unwrap(), keys_after_one, "{what} stored keys");
        }
        // An earlier round of the same block: an earlier parity answer given again as the answer
        // to a later parity request of the same length.
        let peer = Mitm::new(&rig.alice, Fault::None);
        let fired = peer.fired.clone();
        struct Echo(Mitm);
        impl LinkPeer for Echo {
            async fn call(&mut self, request: Request) -> Result<Response, LinkError> {
                let response = self.0.call(request.clone()).await?;
                let log = self.0.log.lock().unwrap();
                let earlier: Vec<_> = log.iter().filter(|(r, _)| r.name() == "Parities").collect();
                let Some(((_, current), rounds)) = earlier.split_last() else { return Ok(response) };
                let length = |r: &Response| match r {
                    Response::Parities(p) => p.parities.len(),
                    _ => 0,
                };
                if self.0.fired.lock().unwrap().is_none()
                    && let Some((_, old)) =
                        rounds.iter().find(|(_, old)| old != current && length(old) == length(current))
                {
                    *self.0.fired.lock().unwrap() = Some(true);
                    return Ok(old.clone());
                }
                Ok(response)
            }
        }
        let mut bob = rig.open_with(Echo(peer)).await;
        rig.fill_block(&mut bob).await;
        let outcome = bob.process_block(&rig.bob_store, 0).await;
        drop(bob);
        let _settle = rig.open(Crash::None).await;
        assert_eq!(*fired.lock().unwrap(), Some(true), "no parity answer of the same length to replay");
        {
            let reason = outcome.unwrap().abort_reason.map(|a| a.reason);
            assert!(
                matches!(
                    reason,
                    Some(
                        AbortReason::AuthenticationFailed | AbortReason::VerificationFailed | AbortReason::NoSecretKey
                    )
                ),
                "{reason:?}"
            );
            assert_eq!(rig.alice_store.summary().unwrap(), keys_after_one);
        }
        rig.assert_consistent();
    });
}

/// Acceptance 2 of issue 14: across committed blocks, aborted ones (tampering: the hash key is
/// replaced) and crashes at each point of pad consumption (Alice's StartBlock answer lost after
/// her watermark moved, Bob's Commit lost, Alice's Commit answer lost; each end restarted over
/// its durable pool), no pad bit is ever handed out twice at either end, and the two pools stay
/// identical.
#[test]
fn no_pad_bit_is_used_twice_across_blocks_aborts_and_crashes() {
    block_on(async {
        let mut rig = Rig::new(51);
        let mut committed = 0;
        let steps: Vec<(&str, Fault, Crash)> = vec![
            ("plain", Fault::None, Crash::None),
            ("Alice's tag altered", Fault::Flip("Amplify", Way::Response, 1.0), Crash::None),
            ("StartBlock answer lost", Fault::LoseAnswer("StartBlock"), Crash::None),
            ("plain", Fault::None, Crash::None),
            ("Bob's tag altered", Fault::Flip("Commit", Way::Request, 1.0), Crash::None),
            ("Commit lost before Alice", Fault::None, Crash::BeforeAliceCommits),
            ("Commit answer lost", Fault::None, Crash::AfterAliceCommits),
            ("Amplify answer lost", Fault::LoseAnswer("Amplify"), Crash::None),
            ("plain", Fault::None, Crash::None),
        ];
        for (what, fault, crash) in steps {
            struct Both(Mitm, FlakyAlice);
            impl LinkPeer for Both {
                async fn call(&mut self, request: Request) -> Result<Response, LinkError> {
                    if matches!(request, Request::Commit(_)) && self.1.crash != Crash::None {
                        return self.1.call(request).await;
                    }
                    self.0.call(request).await
                }
            }
            let peer = Both(Mitm::new(&rig.alice, fault), FlakyAlice { alice: rig.alice.clone(), crash });
            let mut bob = rig.open_with(peer).await;
            rig.fill_block(&mut bob).await;
            let outcome = bob.process_block(&rig.bob_store, 0).await;
            if matches!(&outcome, Ok(r) if r.abort_reason.is_none()) {
                committed += 1;
            }
            // Both processes restart: new cores over the same stores and pools.
            drop(bob);
            rig.restart_alice();
            let _settled = rig.open(Crash::None).await;
            rig.assert_consistent();
            assert!(rig.bob_pool.staged_refills().unwrap().is_empty(), "{what}");
            rig.alice_pool.assert_no_reuse("alice");
            rig.bob_pool.assert_no_reuse("bob");
        }
        assert!(committed >= 3, "{committed}");
        let summary = rig.alice_store.summary().unwrap();
        // The crash after Alice's commit is settled ready at both ends.
        assert!(summary.n_ready_blocks >= 4, "{summary:?}");
        // Three failed authentications, three fresh hash keys after the first.
        let keys: std::collections::BTreeSet<u64> = rig.alice_pool.keys.lock().unwrap().iter().copied().collect();
        assert!(keys.len() >= 3, "{keys:?}");
    });
}

/// Acceptance 3 of issue 14: an exhausted pool stops key distillation with the typed reason at
/// both ends, and installing a new secret at both ends resumes it; the report and Alice's event
/// give the pool's level and what the block cost.
#[test]
fn pool_exhaustion_stops_blocks_and_a_new_secret_resumes_them() {
    block_on(async {
        // 320 bits: less than a first block's 384 (hash key and two pads).
        let mut rig = Rig::with_secret(61, ProtocolParams { block_bits: 100_000, ..ProtocolParams::default() }, 40);
        let mut bob = rig.open(Crash::None).await;
        rig.fill_block(&mut bob).await;
        let report = bob.process_block(&rig.bob_store, 0).await.unwrap();
        let abort = report.abort_reason.clone().expect("an exhausted pool aborts");
        assert_eq!(abort.reason, AbortReason::AuthPoolExhausted);
        assert!(abort.to_string().contains("320 unused bits, a block needs 384"), "{abort}");
        match rig.alice.lock().events.last() {
            Some(AliceEvent::Aborted { abort, by_bob: false, .. }) => {
                assert_eq!(abort.reason, AbortReason::AuthPoolExhausted);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(rig.alice_store.summary().unwrap().n_keys, 0);
        assert_eq!((rig.alice_pool.watermark().unwrap(), rig.bob_pool.watermark().unwrap()), (0, 0));

        // The operator installs a new secret at Alice: nothing changes until Bob holds it too.
        let more = secret(62, 32);
        let id = uuid::Uuid::from_u128(62);
        rig.alice_pool.stage_secret(id, &more).unwrap();
        rig.fill_block(&mut bob).await;
        let report = bob.process_block(&rig.bob_store, 0).await.unwrap();
        assert_eq!(report.abort_reason.map(|a| a.reason), Some(AbortReason::AuthPoolExhausted));
        // ... and at Bob: the next StartBlock applies it at both ends and the block commits.
        rig.bob_pool.stage_secret(id, &more).unwrap();
        rig.fill_block(&mut bob).await;
        let report = bob.process_block(&rig.bob_store, 0).await.unwrap();
        assert_eq!(report.abort_reason, None, "{report:?}");
        // 320 + 256 bits installed, 384 spent, 512 refilled.
        assert_eq!(report.auth.spent_bits, 384);
        assert_eq!(report.auth.refill_bits, 512);
        assert_eq!(report.auth.pool_bits, 320 + 256 - 384 + 512);
        assert_eq!(report.final_bits, report.n_keys * 256);
        let security = report.security.as_ref().unwrap();
        assert!(security.final_bits >= report.final_bits + 512);
        assert_eq!(security.eps.eps_auth, crate::auth::eps_auth_per_block());
        match rig.alice.lock().events.last() {
            Some(AliceEvent::Committed(meta, _, auth)) => {
                assert_eq!(*auth, report.auth);
                assert_eq!(meta.final_bits, report.final_bits);
            }
            other => panic!("{other:?}"),
        }
        rig.assert_consistent();
        // The next block recycles the hash key: 256 bits.
        rig.fill_block(&mut bob).await;
        let report = bob.process_block(&rig.bob_store, 0).await.unwrap();
        assert_eq!(report.abort_reason, None, "{report:?}");
        assert_eq!(report.auth.spent_bits, 256);
        assert_eq!(report.auth.pool_bits, 320 + 256 - 384 + 512 - 256 + 512);
        rig.assert_consistent();
    });
}

/// Both stores hold the same keys (Alice keeps the records of blocks a lost store lacks).
fn assert_same_keys(rig: &Rig) {
    let (a, b) = (rig.alice_store.summary().unwrap(), rig.bob_store.summary().unwrap());
    assert_eq!((a.n_keys, a.digest, a.n_pending_blocks), (b.n_keys, b.digest, b.n_pending_blocks));
}

/// The units a store holds in ready blocks.
fn ready_units(store: &dyn KeyStore) -> std::collections::BTreeSet<uuid::Uuid> {
    let holdings = store.holdings().unwrap();
    let mut units = std::collections::BTreeSet::new();
    for block in holdings.blocks.iter().filter(|b| b.state == crate::store::BlockState::Ready) {
        units.extend(block.key_ids.iter().zip(&block.held).filter(|(_, held)| **held).map(|(id, _)| *id));
    }
    units
}

impl Rig {
    /// Commits `n` blocks in one session.
    async fn commit_blocks(&mut self, n: usize) {
        let mut bob = self.open(Crash::None).await;
        for _ in 0..n {
            self.fill_block(&mut bob).await;
            let report = bob.process_block(&self.bob_store, 0).await.unwrap();
            assert_eq!(report.abort_reason, None, "{report:?}");
        }
    }

    /// Delivers `n` units through the KMEs (every third one held): the master's KME takes them
    /// and the peer's reserves them, so both stores lose them. Returns them.
    fn deliver(&self, n: usize) -> Vec<uuid::Uuid> {
        let units: Vec<uuid::Uuid> = ready_units(self.alice_store.as_ref()).into_iter().step_by(3).take(n).collect();
        assert_eq!(units.len(), n);
        assert_eq!(self.alice_store.discard_units(&units).unwrap(), n as u64);
        assert_eq!(self.bob_store.discard_units(&units).unwrap(), n as u64);
        units
    }

    /// What Alice's last Hello dropped at her end.
    fn alice_reagreement(&self) -> super::Reagreement {
        match self.alice.lock().events.iter().rev().find(|e| matches!(e, AliceEvent::SessionOpened { .. })) {
            Some(AliceEvent::SessionOpened { reagreement, .. }) => reagreement.clone(),
            other => panic!("no session opened: {other:?}"),
        }
    }

    /// Ends `bob`'s session and opens a new one: stores that agree, its Hello drops nothing at
    /// either end.
    async fn assert_next_hello_drops_nothing(&mut self, bob: BobLink<FlakyAlice>) {
        drop(bob);
        let bob = self.open(Crash::None).await;
        assert_eq!(bob.reagreement(), &super::Reagreement::default());
        assert_eq!(self.alice_reagreement(), super::Reagreement::default());
    }
}

/// Issue 15, acceptance 4, in memory: Bob's store is lost (a new, empty one) after keys were
/// delivered; after Hello both stores hold the same units (none), Alice having dropped hers, and
/// both ends know that the stores differed.
#[test]
fn a_lost_store_at_bob_makes_alice_drop_every_unit_at_hello() {
    block_on(async {
        let mut rig = Rig::new(51);
        rig.commit_blocks(2).await;
        let delivered = rig.deliver(5);
        let held_at_alice = ready_units(rig.alice_store.as_ref());
        assert!(!held_at_alice.is_empty());
        rig.bob_store = MemoryStore::new();
        let bob = rig.open(Crash::None).await;
        assert!(ready_units(rig.alice_store.as_ref()).is_empty());
        assert_same_keys(&rig);
        let at_alice = rig.alice_reagreement();
        assert_eq!(at_alice.units_dropped, held_at_alice.len() as u64);
        assert_eq!(at_alice.blocks.len(), 2);
        assert!(at_alice.stores_differed);
        assert_eq!((bob.reagreement().units_dropped, bob.reagreement().stores_differed), (0, true));
        assert!(delivered.iter().all(|u| !held_at_alice.contains(u)));
        // The link goes on: the next block commits at both ends.
        drop(bob);
        rig.commit_blocks(1).await;
        assert!(!ready_units(&rig.bob_store).is_empty());
        assert_same_keys(&rig);
    });
}

/// Issue 15, acceptance 4, in memory: Bob's store restored from a copy taken before some
/// deliveries and before the last block. After Hello both stores hold exactly the units both
/// held: the delivered units are held nowhere (Bob's copy still had them: he drops them), the
/// last block's units are dropped at Alice (Bob's copy lacks them), and both know the stores
/// differed.
#[test]
fn a_store_restored_from_an_older_copy_keeps_only_the_units_both_hold() {
    block_on(async {
        let mut rig = Rig::new(52);
        rig.commit_blocks(1).await;
        let backup = rig.bob_store.snapshot();
        let in_backup = ready_units(&backup);
        let delivered = rig.deliver(4);
        rig.commit_blocks(1).await;
        let newer: Vec<uuid::Uuid> = ready_units(rig.alice_store.as_ref()).difference(&in_backup).copied().collect();
        assert!(!newer.is_empty());
        rig.bob_store = backup;
        assert!(delivered.iter().all(|u| ready_units(&rig.bob_store).contains(u)), "the copy holds them");
        let bob = rig.open(Crash::None).await;
        let (alice, bob_units) = (ready_units(rig.alice_store.as_ref()), ready_units(&rig.bob_store));
        assert_eq!(alice, bob_units);
        let expected: std::collections::BTreeSet<uuid::Uuid> =
            in_backup.iter().filter(|u| !delivered.contains(u)).copied().collect();
        assert_eq!(alice, expected);
        assert_same_keys(&rig);
        assert_eq!(bob.reagreement().units_dropped, delivered.len() as u64);
        assert!(bob.reagreement().stores_differed);
        let at_alice = rig.alice_reagreement();
        assert_eq!(at_alice.units_dropped, newer.len() as u64);
        assert!(at_alice.stores_differed);
        // A second Hello finds nothing to drop.
        rig.assert_next_hello_drops_nothing(bob).await;
    });
}

/// A copy that differs only by deliveries made since (no block committed in between) is still
/// found different, by the units it holds that Alice delivered; a unit removed at one end only (a
/// master's removal lost in a crash at Alice) is dropped at the other.
#[test]
fn units_delivered_since_a_copy_or_at_one_end_only_are_dropped_at_the_other() {
    block_on(async {
        let mut rig = Rig::new(53);
        rig.commit_blocks(1).await;
        let backup = rig.bob_store.snapshot();
        let delivered = rig.deliver(3);
        rig.bob_store = backup;
        let bob = rig.open(Crash::None).await;
        assert_eq!(bob.reagreement().units_dropped, 3);
        assert!(bob.reagreement().stores_differed && rig.alice_reagreement().stores_differed);
        assert_eq!(rig.alice_reagreement().units_dropped, 0);
        assert!(delivered.iter().all(|u| !ready_units(&rig.bob_store).contains(u)));
        assert_eq!(rig.alice_store.summary().unwrap(), rig.bob_store.summary().unwrap());
        drop(bob);
        // Bob's KME reserved a unit for Alice's master; Alice's removal was lost in a crash.
        let unit = *ready_units(&rig.bob_store).first().unwrap();
        assert_eq!(rig.bob_store.discard_units(&[unit]).unwrap(), 1);
        let bob = rig.open(Crash::None).await;
        assert_eq!(rig.alice_reagreement().units_dropped, 1);
        assert_eq!(rig.alice_reagreement().blocks.len(), 1);
        assert!(!ready_units(rig.alice_store.as_ref()).contains(&unit));
        assert_eq!(bob.reagreement().units_dropped, 0);
        assert!(bob.reagreement().stores_differed);
        assert_eq!(rig.alice_store.summary().unwrap(), rig.bob_store.summary().unwrap());
        // Stores that agree keep everything, reservations included.
        rig.assert_next_hello_drops_nothing(bob).await;
    });
}

/// Alice's store is the one restored from an older copy: she drops the units Bob delivered since,
/// and both know the stores differed.
#[test]
fn alices_store_restored_from_an_older_copy_is_re_agreed_too() {
    block_on(async {
        let mut rig = Rig::new(54);
        rig.commit_blocks(1).await;
        let backup = rig.alice_store.snapshot();
        let delivered = rig.deliver(2);
        rig.alice_store = Arc::new(backup);
        rig.alice.lock().store = rig.alice_store.clone();
        let bob = rig.open(Crash::None).await;
        let at_alice = rig.alice_reagreement();
        assert_eq!(at_alice.units_dropped, 2);
        assert!(at_alice.stores_differed && bob.reagreement().stores_differed);
        assert!(delivered.iter().all(|u| !ready_units(rig.alice_store.as_ref()).contains(u)));
        assert_eq!(rig.alice_store.summary().unwrap(), rig.bob_store.summary().unwrap());
    });
}

/// A peer that alters Bob's Hello on its way to Alice (his node ID, which nothing checks).
struct AlteredHello(MemoryAlice);

impl LinkPeer for AlteredHello {
    async fn call(&mut self, mut request: Request) -> Result<Response, LinkError> {
        if let Request::Hello(hello) = &mut request {
            hello.bob_id.push('!');
        }
        self.0.call(request).await
    }
}

/// The session's first block authenticates its Hello: an altered Hello makes that block fail
/// authentication, and the next session's blocks commit again.
#[test]
fn an_altered_hello_fails_the_authentication_of_the_sessions_first_block() {
    block_on(async {
        let mut rig = Rig::new(55);
        let mut bob = rig.open_with(AlteredHello(rig.alice.clone())).await;
        rig.fill_block(&mut bob).await;
        let report = bob.process_block(&rig.bob_store, 0).await.unwrap();
        assert_eq!(report.abort_reason.map(|a| a.reason), Some(AbortReason::AuthenticationFailed));
        assert_eq!(rig.alice_store.summary().unwrap().n_keys, 0);
        drop(bob);
        rig.commit_blocks(1).await;
        rig.assert_consistent();
        assert!(rig.alice_store.summary().unwrap().n_keys > 0);
    });
}
