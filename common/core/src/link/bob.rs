//! Bob's side of the post-processing protocol: drives sifting and every block's rounds through
//! a [`LinkPeer`], and commits blocks to his store.

use std::sync::Arc;

use proto::link::*;
use uuid::Uuid;
use zeroize::Zeroizing;

use super::abort::{Abort, AbortReason};
use super::reconcile::{LDPC_QBER_MARGIN, LDPC_REVEAL_STEPS, cascade_frames, join_frames, ldpc_family, ldpc_frames};
use super::request::{Request, Response};
use super::transcript::Transcript;
use super::{LinkError, ProtocolParams, parse_uuid};
use super::{Reagreement, Reconciliation, UnitMap};
use crate::auth::{AuthPool, AuthReport, Direction, bob_accept, bob_apply_secrets, retire_hash_key};
use crate::bits::BitVec;
use crate::postproc::binary_entropy;
use crate::postproc::cascade::MultiCascadeBob;
use crate::postproc::finite_key::{
    BlockStats, EpsBudget, KeyLength, SecurityParams, SideSlotCalibration, TAG_BITS, XCounts, XSlotCounts, n_tags_for,
    secret_key_length,
};
use crate::postproc::ldpc::{LdpcBob, LdpcStep, default_start_efficiency};
use crate::postproc::toeplitz::toeplitz_hash;
use crate::postproc::verify::{poly_hash_tag, tags_match};
use crate::quantum::Detection;
use crate::sifting::{announce, bob_sift};
use crate::store::{BlockMeta, KeyStore, KeyUnit};

/// Alice as Bob sees her: one method, [`LinkPeer::call`], carries any request. The daemon
/// implements it over gRPC with mutual TLS; the planning tool and tests with an in-memory
/// [`AliceCore`](super::alice::AliceCore) ([`MemoryAlice`](super::memory::MemoryAlice)). The
/// typed helpers, one per RPC, are provided.
#[allow(async_fn_in_trait)]
pub trait LinkPeer {
    /// Sends one request to Alice and returns her answer.
    async fn call(&mut self, request: Request) -> Result<Response, LinkError>;

    /// Opens a session.
    async fn hello(&mut self, req: HelloRequest) -> Result<HelloResponse, LinkError> {
        self.call(req.into()).await?.try_into()
    }
    /// Sifts a frame.
    async fn sift(&mut self, req: SiftRequest) -> Result<SiftResponse, LinkError> {
        self.call(req.into()).await?.try_into()
    }
    /// Starts a block.
    async fn start_block(&mut self, req: StartBlockRequest) -> Result<StartBlockResponse, LinkError> {
        self.call(req.into()).await?.try_into()
    }
    /// Asks parities (Cascade).
    async fn parities(&mut self, req: ParityRequest) -> Result<ParityResponse, LinkError> {
        self.call(req.into()).await?.try_into()
    }
    /// Asks the frames' syndromes (LDPC).
    async fn syndromes(&mut self, req: SyndromeRequest) -> Result<SyndromeResponse, LinkError> {
        self.call(req.into()).await?.try_into()
    }
    /// Asks more punctured bits (LDPC).
    async fn reveal(&mut self, req: RevealRequest) -> Result<RevealResponse, LinkError> {
        self.call(req.into()).await?.try_into()
    }
    /// Asks Alice's verification tag.
    async fn verify(&mut self, req: VerifyRequest) -> Result<VerifyResponse, LinkError> {
        self.call(req.into()).await?.try_into()
    }
    /// Asks the privacy-amplification parameters.
    async fn amplify(&mut self, req: AmplifyRequest) -> Result<AmplifyResponse, LinkError> {
        self.call(req.into()).await?.try_into()
    }
    /// Acknowledges the pending block.
    async fn commit(&mut self, req: CommitRequest) -> Result<CommitResponse, LinkError> {
        self.call(req.into()).await?.try_into()
    }
    /// Gives up a block.
    async fn abort(&mut self, req: AbortRequest) -> Result<AbortResponse, LinkError> {
        self.call(req.into()).await?.try_into()
    }
}

/// The public outcome of one block (no key material).
#[derive(Clone, Debug, serde::Serialize)]
pub struct BlockReport {
    /// Block ID from Alice.
    pub block_id: Uuid,
    /// Sifted key bits in the block.
    pub n_bits: u64,
    /// Pulses sent during the block's frames.
    pub n_pulses: u64,
    /// Key-basis QBER measured by error correction (0 when aborted before it).
    pub qber_z: f64,
    /// Test-basis QBER (Alice sent |+>).
    pub qber_x: f64,
    /// Finite-size upper bound on the phase error (0 when not computed).
    pub phase_error_upper: f64,
    /// Bits disclosed by error correction and verification.
    pub leak_bits: u64,
    /// Error-correction round trips (Cascade batches, or LDPC syndrome and reveal messages).
    pub round_trips: u32,
    /// Final key bits stored (0 when aborted).
    pub final_bits: u64,
    /// Key units stored.
    pub n_keys: u64,
    /// Why no key was stored, if none was.
    pub abort_reason: Option<Abort>,
    /// The transmitter's monitored mean photon number over the block (mean of frame readings).
    pub monitor_mu: f64,
    /// The transmitter's monitored g2(0) over the block.
    pub monitor_g2: f64,
    /// The finite-key security report (sample sizes, bounds, eps terms, leaks, key length) when
    /// the analysis ran to a key length.
    pub security: Option<Box<KeyLength>>,
    /// What authentication cost: pool bits spent, bits refilled, the pool's level (Bob's).
    pub auth: AuthReport,
}

/// Counters of a running link, for progress output.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct LinkCounters {
    /// Frames sifted.
    pub frames: u64,
    /// Frames dropped at both ends (lost by Bob's receiver or by Alice's source).
    pub frames_dropped: u64,
    /// Detections announced.
    pub detections: u64,
    /// Sifted key bits.
    pub sifted_bits: u64,
    /// Blocks committed.
    pub blocks_committed: u64,
    /// Blocks aborted.
    pub blocks_aborted: u64,
    /// Key units stored.
    pub keys_stored: u64,
    /// Secret bits stored.
    pub secret_bits: u64,
}

/// Bob's session with Alice.
pub struct BobLink<P: LinkPeer> {
    peer: P,
    params: ProtocolParams,
    security: SecurityParams,
    session_id: String,
    acc_bits: BitVec,
    acc_counts: XCounts,
    acc_pulses: u64,
    acc_frames: u64,
    qber_estimate: f64,
    /// Most key units the store may hold before new blocks are refused (0: no limit).
    max_stored_units: u64,
    /// The side-slot monitor's calibration (None: not monitored).
    side_slots: Option<SideSlotCalibration>,
    /// X-branch clicks by slot since the last block.
    acc_x_slots: XSlotCounts,
    /// Running counters.
    pub counters: LinkCounters,
    /// Either end's quantum channel is simulated: blocks are stored marked so.
    simulated: bool,
    /// Bob's authentication key pool.
    auth: Arc<dyn AuthPool>,
    /// The Sift rounds since the last block (and the session's Hello, until the first block):
    /// the start of the next block's transcript.
    acc_transcript: Transcript,
    /// What the re-agreement at Hello dropped here.
    reagreement: Reagreement,
}

impl<P: LinkPeer> BobLink<P> {
    /// Opens a session and settles blocks left pending by an earlier session: those Alice holds
    /// as ready become ready here, the others are dropped (step 3 of the two-ended commit); then
    /// re-agrees the two stores unit by unit ([`super::reagree`]): the units Alice does not hold
    /// are dropped here, as she dropped those Bob does not hold ([`BobLink::reagreement`] says
    /// what was dropped).
    /// Returns the link and the number of blocks (made ready, dropped). `simulated`: Bob's
    /// receiver is simulated; if it is, or Alice's source is, every block of the session is
    /// marked simulated in the store. `auth` is Bob's authentication key pool (the same
    /// pre-shared secret as Alice's); the refills of blocks settled here are settled with them.
    pub async fn open(
        mut peer: P,
        bob_id: &str,
        params: ProtocolParams,
        security: SecurityParams,
        store: &dyn KeyStore,
        simulated: bool,
        auth: Arc<dyn AuthPool>,
    ) -> Result<(Self, (usize, usize)), LinkError> {
        let pending = store.pending_blocks()?;
        let holdings = store.holdings()?;
        let claimed = UnitMap::from_holdings(&holdings);
        let request = HelloRequest {
            bob_id: bob_id.to_owned(),
            params_digest: params.digest(&security),
            pending_block_ids: pending.iter().map(Uuid::to_string).collect(),
            simulated_channel: simulated,
            auth_placeholder: auth.is_placeholder(),
            held_units: claimed.encode()?,
        };
        let hello = peer.hello(request.clone()).await?;
        // The session's first block authenticates its Hello too (see `reagree`).
        let mut acc_transcript = Transcript::default();
        acc_transcript.absorb("Hello", &request, &hello);
        drop(request);
        let agreed = UnitMap::decode(&hello.held_units)?;
        if hello.auth_placeholder != auth.is_placeholder() {
            let (with, without) = if auth.is_placeholder() { ("Alice's", "Bob's") } else { ("Bob's", "Alice's") };
            tracing::warn!(
                "{with} authentication key pool holds a pre-shared secret and {without} only the public placeholder: \
                 blocks will fail authentication until the same secret is installed at both ends \
                 (`qkdctl auth-secret install`)"
            );
        }
        let mut ready = 0;
        for id in &hello.ready_block_ids {
            let block_id = parse_uuid(id, "ready block id")?;
            if !pending.contains(&block_id) {
                return Err(LinkError::Malformed(format!("Alice confirmed block {block_id} that was not pending")));
            }
            store.mark_ready(block_id)?;
            ready += 1;
        }
        let mut dropped = 0;
        for block_id in pending {
            if !hello.ready_block_ids.contains(&block_id.to_string()) {
                store.drop_pending(block_id)?;
                dropped += 1;
            }
        }
        // Re-agreement (see `reagree`): the units outside Alice's answer are dropped here too.
        let mut reagreement = Reagreement::default();
        for (block_id, units) in super::reagree::bob_side(&holdings, &claimed, &agreed)? {
            if store.block_state(block_id)? == Some(crate::store::BlockState::Ready) {
                reagreement.units_dropped += store.discard_units(&units)?;
                reagreement.blocks.push((block_id, units.len() as u64));
            }
        }
        if hello.stores_differed {
            reagreement.stores_differed = true;
            reagreement.reservations_dropped = store.drop_reservations()?;
        }
        store.reagreed();
        reagreement.log("bob");
        // A refill joins the pool only when its block is ready here (as at Alice, in the same
        // order), so both pools hold the same bits.
        auth.settle_all(&mut |block_id| Ok(store.block_state(block_id)? == Some(crate::store::BlockState::Ready)))?;
        let qber_estimate = params.initial_qber;
        let link = Self {
            peer,
            params,
            security,
            session_id: hello.session_id,
            acc_bits: BitVec::new(),
            acc_counts: XCounts::default(),
            acc_pulses: 0,
            acc_frames: 0,
            qber_estimate,
            max_stored_units: 0,
            side_slots: None,
            acc_x_slots: XSlotCounts::default(),
            counters: LinkCounters::default(),
            simulated: simulated || hello.simulated_channel,
            auth,
            acc_transcript,
            reagreement,
        };
        Ok((link, (ready, dropped)))
    }

    /// What the re-agreement of the stores at this session's `Hello` dropped at Bob.
    pub fn reagreement(&self) -> &Reagreement {
        &self.reagreement
    }

    /// Sifts one frame of detections with Alice; returns the frame's test counts (for the
    /// phase-stabilisation feedback), or `None` when Alice does not hold the frame (her source
    /// lost it, or it expired): the frame is then dropped at both ends.
    pub async fn sift_frame(
        &mut self,
        frame_idx: u64,
        n_pulses: u64,
        detections: &[Detection],
    ) -> Result<Option<XCounts>, LinkError> {
        let (click_deltas, bob_measurements) = announce(detections);
        let request = SiftRequest {
            session_id: self.session_id.clone(),
            frame_idx,
            click_deltas,
            bob_measurements,
            dropped: false,
        };
        let response = self.peer.sift(request.clone()).await?;
        self.acc_transcript.absorb("Sift", &request, &response);
        if response.unavailable {
            self.counters.frames_dropped += 1;
            return Ok(None);
        }
        let sift = bob_sift(detections, &response.alice_info)?;
        self.acc_bits.extend_from(&sift.key_bits);
        self.acc_counts.add(&sift.x_counts);
        self.acc_pulses += n_pulses;
        self.acc_frames += 1;
        self.counters.frames += 1;
        self.counters.detections += detections.len() as u64;
        self.counters.sifted_bits += sift.key_bits.len() as u64;
        Ok(Some(sift.x_counts))
    }

    /// Drops a frame at both ends (Bob's receiver lost part of it): Alice erases its states
    /// unused, and neither end counts it in a block.
    pub async fn drop_frame(&mut self, frame_idx: u64) -> Result<(), LinkError> {
        let request = SiftRequest {
            session_id: self.session_id.clone(),
            frame_idx,
            click_deltas: Vec::new(),
            bob_measurements: Vec::new(),
            dropped: true,
        };
        let response = self.peer.sift(request.clone()).await?;
        self.acc_transcript.absorb("Sift", &request, &response);
        self.counters.frames_dropped += 1;
        Ok(())
    }

    /// True once enough sifted bits wait for a block.
    pub fn block_ready(&self) -> bool {
        self.acc_bits.len() as u64 >= self.params.block_bits
    }

    /// Sifted bits waiting for the next block.
    pub fn pending_bits(&self) -> u64 {
        self.acc_bits.len() as u64
    }

    /// Limits the key store to `max_units` key units, ready or pending (0: no limit; the block
    /// that reaches the limit is stored whole, so the store may exceed it by one block). While the
    /// store holds that many, each block is started (so that Alice cuts the same sifted bits)
    /// and aborted at once with the reason, and no key is distilled: the key pool, and the
    /// memory and disk it takes, stop growing until applications fetch keys.
    pub fn set_max_stored_units(&mut self, max_units: u64) {
        self.max_stored_units = max_units;
    }

    /// Turns on the detector side-slot monitor: each block's X-branch side-slot clicks (see
    /// [`BobLink::add_x_slot_counts`]) are checked against `calibration`, and a block outside it is
    /// aborted at both ends with the reason.
    pub fn set_side_slot_monitor(&mut self, calibration: SideSlotCalibration) {
        self.side_slots = Some(calibration);
    }

    /// Adds one frame's X-branch clicks by slot, from the receiver, to the current block.
    pub fn add_x_slot_counts(&mut self, counts: &XSlotCounts) {
        self.acc_x_slots.add(counts);
    }

    /// Post-processes the accumulated block: Cascade, verification, privacy amplification and
    /// the two-ended commit. A block that does not complete stores nothing.
    pub async fn process_block(&mut self, store: &dyn KeyStore, now_unix_ms: u64) -> Result<BlockReport, LinkError> {
        let key = std::mem::take(&mut self.acc_bits);
        let stats = BlockStats {
            n_key_bits: key.len() as u64,
            n_pulses: std::mem::take(&mut self.acc_pulses),
            x_counts: std::mem::take(&mut self.acc_counts),
            leak_ec_bits: 0,
        };
        let start = StartBlockRequest {
            session_id: self.session_id.clone(),
            n_bits: stats.n_key_bits,
            n_frames: self.acc_frames,
            auth_pool_total_bits: self.auth.total_bits()?,
            auth_staged_secrets: self.auth.staged_secrets()?.iter().map(Uuid::to_string).collect(),
        };
        self.acc_frames = 0;
        let x_slots = std::mem::take(&mut self.acc_x_slots);
        let sift_rounds = std::mem::take(&mut self.acc_transcript);
        let started = self.peer.start_block(start.clone()).await?;
        let block_id = parse_uuid(&started.block_id, "block id")?;
        let mut report = BlockReport {
            block_id,
            n_bits: stats.n_key_bits,
            n_pulses: stats.n_pulses,
            qber_z: 0.0,
            qber_x: stats.x_counts.qber_x(),
            phase_error_upper: 0.0,
            leak_bits: 0,
            round_trips: 0,
            final_bits: 0,
            n_keys: 0,
            abort_reason: None,
            monitor_mu: started.monitor_mu,
            monitor_g2: started.monitor_g2,
            security: None,
            auth: AuthReport { pool_bits: self.auth.available_bits()?, ..AuthReport::default() },
        };
        // Pre-shared secrets Alice applied: applied here too, whatever becomes of the block.
        if let Err(abort) = bob_apply_secrets(self.auth.as_ref(), &started.auth_apply_secrets)? {
            tracing::error!(block = %block_id, "{abort}");
            if started.abort.is_none() {
                self.abort(&started.block_id, &abort).await?;
            }
            report.abort_reason = Some(abort);
            self.counters.blocks_aborted += 1;
            return Ok(report);
        }
        report.auth.pool_bits = self.auth.available_bits()?;
        if let Some(wire) = &started.abort
            && !started.alice_tag.is_empty()
        {
            // A tagged refusal (the block boundary differs): altered Sift messages, or honest ends
            // that disagree.
            let alice = Abort::from_wire(wire);
            let abort = match bob_accept(self.auth.as_ref(), started.auth_key_offset, started.auth_pad_offset)? {
                Err(refused) => refused,
                Ok(auth) => {
                    let mut answer = started.clone();
                    answer.alice_tag = Vec::new();
                    let mut transcript = sift_rounds;
                    transcript.absorb("StartBlock", &start, &answer);
                    let authentic = !transcript.too_long()
                        && auth.verify(Direction::AliceToBob, transcript.bytes(), &started.alice_tag);
                    self.attribute_abort(&started.block_id, auth.key_offset, authentic, alice, None).await?
                }
            };
            tracing::warn!(block = %block_id, "{abort}");
            report.abort_reason = Some(abort);
            self.counters.blocks_aborted += 1;
            return Ok(report);
        }
        if let Some(abort) = &started.abort {
            let abort = Abort::from_wire(abort);
            if matches!(abort.reason, AbortReason::AuthPoolExhausted | AbortReason::AuthPoolsDiffer) {
                tracing::error!(block = %block_id, "{abort}");
            }
            report.abort_reason = Some(abort);
            self.counters.blocks_aborted += 1;
            return Ok(report);
        }
        // The block's hash key and pads: Bob's watermark moves past them (durably) before he uses
        // them; positions below it are refused.
        let auth = match bob_accept(self.auth.as_ref(), started.auth_key_offset, started.auth_pad_offset)? {
            Ok(auth) => auth,
            Err(abort) => {
                tracing::warn!(block = %block_id, "{abort}");
                self.abort(&started.block_id, &abort).await?;
                report.abort_reason = Some(abort);
                self.counters.blocks_aborted += 1;
                return Ok(report);
            }
        };
        tracing::debug!(
            block = %block_id,
            key_offset = auth.key_offset,
            pad_offset = auth.pad_offset,
            "authentication positions accepted (watermark moved past them)"
        );
        report.auth = AuthReport::new(auth.spent_bits, 0, self.auth.available_bits()?);
        if let Some(calibration) = &self.side_slots
            && let Err(detail) = calibration.check(&x_slots, stats.n_pulses)
        {
            let abort = Abort::new(AbortReason::DetectorSideSlots, detail);
            self.abort(&started.block_id, &abort).await?;
            report.abort_reason = Some(abort);
            self.counters.blocks_aborted += 1;
            return Ok(report);
        }
        if self.max_stored_units > 0 {
            let held = store.n_units()?;
            if held >= self.max_stored_units {
                let abort = Abort::new(
                    AbortReason::StoreFull,
                    format!(
                        "Bob's key store is full ({held} key units held, limit {}): no key distilled until keys are \
                         fetched or max_stored_units is raised",
                        self.max_stored_units
                    ),
                );
                self.abort(&started.block_id, &abort).await?;
                report.abort_reason = Some(abort);
                self.counters.blocks_aborted += 1;
                return Ok(report);
            }
        }
        let mut transcript = sift_rounds;
        transcript.absorb("StartBlock", &start, &started);
        let seed: [u8; 32] = started
            .cascade_seed
            .as_slice()
            .try_into()
            .map_err(|_| LinkError::Malformed("cascade seed is not 32 bytes".into()))?;

        // Error correction: Bob asks, Alice discloses parities or syndromes.
        let outcome = match self.params.reconciliation {
            Reconciliation::Cascade => self.cascade(&started.block_id, key, seed, &mut transcript).await?,
            Reconciliation::Ldpc => Some(self.ldpc(&started.block_id, key, &mut transcript).await?),
        };
        let Some(outcome) = outcome else {
            // Answers that contradict each other (a channel far noisier than the estimate, or
            // altered messages) would keep Cascade searching: it stops once it has disclosed as
            // many bits as the block holds, which leaves no key anyway.
            let gave_up = Abort::new(
                AbortReason::NoSecretKey,
                format!(
                    "error correction disclosed more than the block's {} bits; no key can remain",
                    stats.n_key_bits
                ),
            );
            // Verify and Amplify (not verified) all the same: Alice's tagged abort tells a noisy
            // channel from altered answers.
            let req = VerifyRequest { block_id: started.block_id.clone(), n_corrected: stats.n_key_bits };
            let verify = self.peer.verify(req.clone()).await?;
            transcript.absorb("Verify", &req, &verify);
            let req = AmplifyRequest { block_id: started.block_id.clone(), verified: false };
            let mut amplify = self.peer.amplify(req.clone()).await?;
            let alice_tag = std::mem::take(&mut amplify.alice_tag);
            transcript.absorb("Amplify", &req, &amplify);
            let authentic =
                !transcript.too_long() && auth.verify(Direction::AliceToBob, transcript.bytes(), &alice_tag);
            let alice = amplify.abort.as_ref().map_or(gave_up.clone(), Abort::from_wire);
            let abort =
                self.attribute_abort(&started.block_id, auth.key_offset, authentic, alice, Some(gave_up)).await?;
            report.abort_reason = Some(abort);
            self.counters.blocks_aborted += 1;
            return Ok(report);
        };
        report.round_trips = outcome.round_trips;
        report.qber_z = outcome.n_corrected as f64 / stats.n_key_bits.max(1) as f64;
        let eps_cor = EpsBudget::from_total(self.security.eps_qkd).eps_cor;
        let n_tags = n_tags_for(stats.n_key_bits, eps_cor) as usize;
        report.leak_bits = outcome.leak_bits + TAG_BITS * n_tags as u64;
        // The next block's estimate: the QBER measured when every frame was corrected. When
        // some LDPC frames did not decode, the estimate was too low (and the frames that did
        // decode are the ones with fewer errors, so their QBER is low too): raise it.
        self.qber_estimate = match outcome.observed_qber {
            Some(q) => q.clamp(0.002, 0.2),
            None => (self.qber_estimate * 1.5).min(0.2),
        };

        // Verification: Alice's tag under a hash key chosen after error correction.
        let req = VerifyRequest { block_id: started.block_id.clone(), n_corrected: outcome.n_corrected };
        let verify = self.peer.verify(req.clone()).await?;
        transcript.absorb("Verify", &req, &verify);
        // Every tag must match (each is checked in constant time; all are computed).
        let verified = verify.hash_keys.len() == n_tags
            && verify.tags.len() == n_tags
            && verify
                .hash_keys
                .iter()
                .zip(&verify.tags)
                .fold(true, |all, (&hash_key, &tag)| all & tags_match(poly_hash_tag(&outcome.key, hash_key), tag));

        let req = AmplifyRequest { block_id: started.block_id.clone(), verified };
        let mut amplify = self.peer.amplify(req.clone()).await?;
        // Alice's tag, before anything else of her answer is used (an abort carries one too).
        let alice_tag = std::mem::take(&mut amplify.alice_tag);
        transcript.absorb("Amplify", &req, &amplify);
        let authentic = !transcript.too_long() && auth.verify(Direction::AliceToBob, transcript.bytes(), &alice_tag);
        if let Some(abort) = &amplify.abort {
            let abort = Abort::from_wire(abort);
            let abort = self.attribute_abort(&started.block_id, auth.key_offset, authentic, abort, None).await?;
            report.abort_reason = Some(abort);
            self.counters.blocks_aborted += 1;
            return Ok(report);
        }
        if !authentic {
            retire_hash_key(self.auth.as_ref(), auth.key_offset)?;
            let abort = Abort::new(
                AbortReason::AuthenticationFailed,
                "Alice's tag does not match Bob's transcript of the block (a message was altered, replayed or lost); \
                 the hash key is replaced",
            );
            tracing::warn!(block = %block_id, "{abort}");
            self.abort(&started.block_id, &abort).await?;
            report.abort_reason = Some(abort);
            self.counters.blocks_aborted += 1;
            return Ok(report);
        }

        // Bob checks Alice's key length against his own evaluation of the same formula.
        let security = self.security.clone();
        let unit_bits = u64::from(self.params.key_unit_bits);
        let refill_bits = self.params.auth_refill_bits;
        let own = BlockStats { leak_ec_bits: outcome.leak_bits, ..stats };
        let expected =
            secret_key_length(&own, &security).map_err(|e| LinkError::Refused(format!("finite-key analysis: {e}")))?;
        report.phase_error_upper = expected.phase_error_upper();
        let (expected_bits, expected_units) = self.params.split_final_key(expected.final_bits).unwrap_or((0, 0));
        report.security = Some(Box::new(expected));
        if expected_units == 0 || amplify.final_bits != expected_bits || amplify.key_ids.len() as u64 != expected_units
        {
            let abort = Abort::new(
                AbortReason::KeyLengthMismatch,
                format!("Alice's final length {} differs from Bob's {expected_bits}", amplify.final_bits),
            );
            self.abort(&started.block_id, &abort).await?;
            report.abort_reason = Some(abort);
            self.counters.blocks_aborted += 1;
            return Ok(report);
        }
        let seed_bits = (stats.n_key_bits + amplify.final_bits - 1) as usize;
        let seed = unpack(&amplify.toeplitz_seed, seed_bits, "Toeplitz seed")?;
        let final_key = toeplitz_hash(&outcome.key, &seed, amplify.final_bits as usize);
        let key_bytes = Zeroizing::new(final_key.to_bytes());
        let (refill, unit_bytes) = key_bytes.split_at((refill_bits / 8) as usize);
        let keys = unit_bytes
            .chunks_exact((unit_bits / 8) as usize)
            .zip(&amplify.key_ids)
            .map(|(chunk, id)| Ok(KeyUnit { key_id: parse_uuid(id, "key id")?, key: Zeroizing::new(chunk.to_vec()) }))
            .collect::<Result<Vec<_>, LinkError>>()?;
        let meta = BlockMeta {
            block_id,
            created_unix_ms: now_unix_ms,
            n_sifted_bits: stats.n_key_bits,
            qber_z: report.qber_z,
            qber_x: report.qber_x,
            phase_error_upper: report.phase_error_upper,
            leak_bits: report.leak_bits,
            final_bits: amplify.final_bits - refill_bits,
            simulated: self.simulated,
        };

        // Two-ended commit: the refill aside and the keys pending here (durably), then Alice
        // checks Bob's tag and stores ready, then ready here (and the refill joins the pool).
        self.auth.stage_refill(block_id, refill)?;
        store.put_pending(&meta, &keys)?;
        tracing::debug!(block = %block_id, keys = keys.len(), "block stored as pending; asking Alice to commit");
        let bob_tag = auth.tag(Direction::BobToAlice, transcript.bytes()).to_vec();
        let commit = self.peer.commit(CommitRequest { block_id: started.block_id.clone(), bob_tag }).await?;
        if !commit.ready {
            // Alice's refusal is not authenticated: the block stays pending, like a lost answer,
            // and the next Hello settles it at both ends (dropped unless Alice holds it).
            let abort = commit.abort.as_ref().map_or(Abort::new(AbortReason::Unknown(0), ""), Abort::from_wire);
            if abort.reason == AbortReason::AuthenticationFailed {
                retire_hash_key(self.auth.as_ref(), auth.key_offset)?;
            }
            tracing::warn!(block = %block_id, "Alice refused the commit: {abort}");
            return Err(LinkError::Refused(format!(
                "Alice refused the commit of block {block_id} ({abort}); it stays pending until the next Hello \
                 settles it"
            )));
        }
        store.mark_ready(block_id)?;
        self.auth.settle_refill(block_id, true)?;
        report.auth = AuthReport::new(auth.spent_bits, refill_bits, self.auth.available_bits()?);
        report.final_bits = meta.final_bits;
        report.n_keys = keys.len() as u64;
        self.counters.blocks_committed += 1;
        self.counters.keys_stored += report.n_keys;
        self.counters.secret_bits += report.final_bits;
        Ok(report)
    }

    /// Alice aborted the block in her Amplify answer (`alice`): with her tag matching Bob's
    /// transcript (`authentic`) the block truly failed, for Bob's own reason if he has one (`own`,
    /// told to Alice) or hers; otherwise a message was altered, and the block is named an
    /// authentication failure at both ends and the hash key replaced.
    async fn attribute_abort(
        &mut self,
        block_id: &str,
        key_offset: u64,
        authentic: bool,
        alice: Abort,
        own: Option<Abort>,
    ) -> Result<Abort, LinkError> {
        if authentic || alice.reason == AbortReason::AuthenticationFailed {
            if let Some(own) = own {
                self.abort(block_id, &own).await?;
                return Ok(own);
            }
            return Ok(alice);
        }
        retire_hash_key(self.auth.as_ref(), key_offset)?;
        let abort = Abort::new(
            AbortReason::AuthenticationFailed,
            format!(
                "Alice aborted the block ({alice}), and her tag does not match Bob's transcript: a message was \
                 altered; the hash key is replaced"
            ),
        );
        tracing::warn!(block = %block_id, "{abort}");
        self.abort(block_id, &abort).await?;
        Ok(abort)
    }

    /// Cascade over the block's frames, all frames' queries in each round trip.
    async fn cascade(
        &mut self,
        block_id: &str,
        key: BitVec,
        seed: [u8; 32],
        transcript: &mut Transcript,
    ) -> Result<Option<Reconciled>, LinkError> {
        let n_bits = key.len() as u64;
        let mut cascade =
            MultiCascadeBob::new(cascade_frames(&key, self.params.cascade_frame_bits), self.qber_estimate, seed);
        drop(key);
        while let Some(queries) = cascade.next_queries() {
            if cascade.leak_bits() > n_bits {
                return Ok(None);
            }
            let req = ParityRequest {
                block_id: block_id.to_owned(),
                queries: queries
                    .iter()
                    .map(|q| proto::link::ParityQuery { pass: q.pass, start: q.start, end: q.end, frame: q.frame })
                    .collect(),
            };
            let resp = self.peer.parities(req.clone()).await?;
            let answers = unpack(&resp.parities, queries.len(), "parity answer")?.to_bools();
            transcript.absorb("Parities", &req, &resp);
            cascade.receive(&answers).map_err(|e| LinkError::Malformed(e.to_string()))?;
        }
        let round_trips = cascade.round_trips();
        let leak_bits = cascade.leak_bits();
        let frames = cascade.finish();
        let n_corrected: u64 = frames.iter().map(|f| f.n_corrected).sum();
        if n_corrected > n_bits {
            return Ok(None);
        }
        let keys: Vec<BitVec> = frames.into_iter().map(|f| f.key).collect();
        let key = join_frames(&keys);
        let observed_qber = Some(n_corrected as f64 / key.len().max(1) as f64);
        Ok(Some(Reconciled { key, n_corrected, leak_bits, round_trips, observed_qber }))
    }

    /// Blind LDPC over the block's frames: one syndrome message, then reveal rounds for the
    /// frames not decoded yet. A frame that fails keeps Bob's best guess; verification rejects it.
    async fn ldpc(
        &mut self,
        block_id: &str,
        key: BitVec,
        transcript: &mut Transcript,
    ) -> Result<Reconciled, LinkError> {
        let family = ldpc_family(self.params.ldpc_frame_bits);
        let frames = ldpc_frames(&key, self.params.ldpc_frame_bits);
        let q = self.qber_estimate;
        let efficiency = default_start_efficiency(q);
        // The mother code is chosen for a QBER LDPC_QBER_MARGIN times the estimate, so that with
        // every punctured bit revealed it still decodes when the estimate (the previous block's
        // QBER) is somewhat low; the puncturing starts from the estimate itself.
        let starts: Vec<(usize, usize)> = frames
            .iter()
            .map(|f| {
                let (rate_index, _) = family.select_for_length(q * LDPC_QBER_MARGIN, efficiency, f.len());
                let code = family.code(rate_index);
                let target = efficiency * f.len() as f64 * binary_entropy(q);
                let punctured = (code.n_checks() as f64 - target).clamp(0.0, code.n_adaptation() as f64);
                (rate_index, punctured as usize)
            })
            .collect();
        let req = SyndromeRequest {
            block_id: block_id.to_owned(),
            frames: starts
                .iter()
                .map(|&(rate_index, n_punctured)| LdpcFrameStart {
                    rate_index: rate_index as u32,
                    n_punctured: n_punctured as u32,
                })
                .collect(),
        };
        let resp = self.peer.syndromes(req.clone()).await?;
        if resp.syndromes.len() != frames.len() {
            return Err(LinkError::Malformed("syndrome answer for the wrong number of frames".into()));
        }
        transcript.absorb("Syndromes", &req, &resp);
        let mut decoders = Vec::with_capacity(frames.len());
        for ((frame, &(rate_index, n_punctured)), syndrome) in frames.iter().zip(&starts).zip(&resp.syndromes) {
            let code = family.code(rate_index);
            let syndrome = unpack(syndrome, code.n_checks(), "syndrome")?;
            let bob = LdpcBob::new(code, frame, q, syndrome, n_punctured, LDPC_REVEAL_STEPS)
                .map_err(|e| LinkError::Malformed(e.to_string()))?;
            decoders.push(bob);
        }
        let mut done = vec![false; decoders.len()];
        let mut round_trips = 1;
        loop {
            let mut counts = vec![0u32; decoders.len()];
            for (i, bob) in decoders.iter_mut().enumerate() {
                if done[i] {
                    continue;
                }
                match bob.decode() {
                    LdpcStep::Decoded | LdpcStep::Failed => done[i] = true,
                    LdpcStep::NeedReveal(count) => counts[i] = count as u32,
                }
            }
            if counts.iter().all(|&c| c == 0) {
                break;
            }
            let req = RevealRequest { block_id: block_id.to_owned(), counts: counts.clone() };
            let resp = self.peer.reveal(req.clone()).await?;
            if resp.values.len() != decoders.len() {
                return Err(LinkError::Malformed("reveal answer for the wrong number of frames".into()));
            }
            transcript.absorb("Reveal", &req, &resp);
            round_trips += 1;
            for ((bob, &count), values) in decoders.iter_mut().zip(&counts).zip(&resp.values) {
                if count == 0 {
                    continue;
                }
                let bits = unpack(values, count as usize, "revealed bits")?.to_bools();
                bob.receive_revealed(&bits).map_err(|e| LinkError::Malformed(e.to_string()))?;
            }
        }
        let leak_bits = decoders.iter().map(LdpcBob::leak_bits).sum();
        let outcomes: Vec<_> = decoders.into_iter().map(LdpcBob::finish).collect();
        let (mut decoded_bits, mut decoded_errors) = (0u64, 0u64);
        for (frame, outcome) in frames.iter().zip(&outcomes) {
            if outcome.decoded {
                decoded_bits += frame.len() as u64;
                decoded_errors += outcome.key.hamming_distance(frame);
            }
        }
        let corrected: Vec<BitVec> = outcomes.into_iter().map(|o| o.key).collect();
        let corrected = join_frames(&corrected);
        let n_corrected = corrected.hamming_distance(&key);
        let observed_qber =
            (decoded_bits == key.len() as u64).then(|| decoded_errors as f64 / decoded_bits.max(1) as f64);
        Ok(Reconciled { key: corrected, n_corrected, leak_bits, round_trips, observed_qber })
    }

    async fn abort(&mut self, block_id: &str, abort: &Abort) -> Result<(), LinkError> {
        self.peer.abort(AbortRequest { block_id: block_id.to_owned(), abort: Some(abort.to_wire()) }).await?;
        Ok(())
    }
}

/// `bytes` as a bit string of `n_bits` bits (LSB first); a wrong length is a malformed `what`.
fn unpack(bytes: &[u8], n_bits: usize, what: &str) -> Result<BitVec, LinkError> {
    if bytes.len() != n_bits.div_ceil(8) {
        return Err(LinkError::Malformed(format!("{what} of the wrong length")));
    }
    Ok(BitVec::from_bytes(bytes, n_bits))
}

/// Bob's corrected block and what error correction cost.
struct Reconciled {
    key: BitVec,
    /// Bits that differ between Bob's sifted and corrected keys.
    n_corrected: u64,
    /// Bits disclosed (parities, or syndromes and revealed bits).
    leak_bits: u64,
    round_trips: u32,
    /// The QBER measured, when every frame is known to be corrected (None otherwise).
    observed_qber: Option<f64>,
}
