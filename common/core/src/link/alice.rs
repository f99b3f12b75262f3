//! Alice's side of the post-processing protocol: answers Bob's requests.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use proto::link::*;
use rand::{Rng, RngCore};
use rand_chacha::ChaCha20Rng;
use uuid::Uuid;
use zeroize::Zeroizing;

use super::abort::{Abort, AbortReason};
use super::reconcile::AliceReconciler;
use super::request::{HandleContext, Request, Response};
use super::transcript::Transcript;
use super::{LinkError, ProtocolParams, parse_uuid};
use crate::auth::{AuthPool, AuthReport, BlockAuth, Direction, alice_allocate, alice_sync_secrets, retire_hash_key};
use crate::bits::BitVec;
use crate::postproc::cascade::FrameParityQuery;
use crate::postproc::finite_key::{
    BlockStats, EpsBudget, KeyLength, SecurityParams, SourceMonitor, SourceReading, XCounts, n_tags_for,
    phase_error_upper, secret_key_length,
};
use crate::postproc::toeplitz::toeplitz_hash;
use crate::postproc::verify::poly_hash_tag;
use crate::prepared::TxStates;
use crate::sifting::alice_sift;
use crate::store::{BlockMeta, KeyStore, KeyUnit};

/// Frames whose states Alice keeps while waiting for Bob to sift them (at 55 ms a frame, about
/// 7.5 minutes). Older states are erased: their frames can no longer be sifted.
pub const MAX_UNSIFTED_FRAMES: usize = 8192;

/// One frame as Alice's source prepared it, kept until Bob sifts or drops it.
#[derive(Debug)]
pub struct PreparedFrame {
    /// Pulses in the frame.
    pub n_pulses: u64,
    /// The state of every pulse: the device's (explicit), or the simulator's (derived).
    pub states: TxStates,
    /// The source monitor's reading over the frame; a block needs readings of its frames
    /// ([`SourceMonitor::check`]), so frames of a source without a monitor give no key.
    pub reading: Option<SourceReading>,
}

/// Alice's protocol state: the secrets of frames not yet sifted and the current session with Bob.
pub struct AliceCore {
    alice_id: String,
    params: ProtocolParams,
    security: SecurityParams,
    digest: Vec<u8>,
    rng: ChaCha20Rng,
    frames: BTreeMap<u64, PreparedFrame>,
    session: Option<Session>,
    draining: bool,
    /// Alice's quantum channel is simulated (module docs of `qkd_core::store::BlockMeta`).
    simulated: bool,
    /// One past the newest frame the source has reported, prepared or lost.
    next_frame: u64,
    /// The authentication key pool (shared with nothing else at this end; durable).
    auth: Arc<dyn AuthPool>,
}

/// Sifted material accumulated since the last block, and the blocks in progress.
struct Session {
    id: Uuid,
    acc_bits: BitVec,
    acc_counts: XCounts,
    acc_pulses: u64,
    acc_frames: u64,
    acc_monitor: SourceMonitor,
    /// The Sift rounds since the last block: the start of the next block's transcript, so that
    /// the tags cover the sifting data (bases, test outcomes) the block is made of.
    acc_transcript: Transcript,
    blocks: HashMap<Uuid, Block>,
    /// Either end's quantum channel is simulated: every block of the session is marked so.
    simulated: bool,
}

struct Block {
    stats: BlockStats,
    key: BitVec,
    reconciler: AliceReconciler,
    transcript: Transcript,
    /// The block's hash key and pads.
    auth: BlockAuth,
    stage: Stage,
}

/// A block's phase at Alice. StartBlock opens it in [`BlockPhase::Reconciling`]; Verify closes
/// error correction ([`BlockPhase::Verified`]); Amplify fixes the final key
/// ([`BlockPhase::Amplified`]); Commit stores it. A committed block, and one dropped by Abort, a
/// failed Amplify or a refused Commit, leaves the session. Each request about a block is
/// accepted in one phase only ([`BlockRequest::expects`]); any other is refused with
/// [`LinkError::Phase`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockPhase {
    /// Error correction is open: parities, syndromes and reveals are answered.
    Reconciling,
    /// Error correction is closed and the verification tags are sent.
    Verified,
    /// The final key is computed and waits for Bob's commit.
    Amplified,
}

impl std::fmt::Display for BlockPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BlockPhase::Reconciling => "reconciling",
            BlockPhase::Verified => "verified",
            BlockPhase::Amplified => "amplified",
        })
    }
}

/// The requests about a block in progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockRequest {
    /// Cascade parities.
    Parities,
    /// LDPC syndromes.
    Syndromes,
    /// LDPC reveals.
    Reveal,
    /// Closing error correction.
    Verify,
    /// Privacy amplification.
    Amplify,
    /// The two-ended commit.
    Commit,
}

impl BlockRequest {
    /// The phase the request needs: the block's transitions in one table (Verify moves a
    /// reconciling block to verified, Amplify a verified one to amplified, Commit stores an
    /// amplified one).
    pub fn expects(self) -> BlockPhase {
        match self {
            BlockRequest::Parities | BlockRequest::Syndromes | BlockRequest::Reveal | BlockRequest::Verify => {
                BlockPhase::Reconciling
            }
            BlockRequest::Amplify => BlockPhase::Verified,
            BlockRequest::Commit => BlockPhase::Amplified,
        }
    }
}

/// A block's phase with what the phase holds.
enum Stage {
    Reconciling,
    Verified {
        /// Bits Bob's error correction flipped.
        n_corrected: u64,
    },
    Amplified {
        meta: BlockMeta,
        keys: Vec<KeyUnit>,
        length: Box<KeyLength>,
        /// The first `auth_refill_bits` of the final key, for the authentication pool.
        refill: Zeroizing<Vec<u8>>,
    },
}

impl Stage {
    fn phase(&self) -> BlockPhase {
        match self {
            Stage::Reconciling => BlockPhase::Reconciling,
            Stage::Verified { .. } => BlockPhase::Verified,
            Stage::Amplified { .. } => BlockPhase::Amplified,
        }
    }
}

/// What Alice reports about a session she opened or a block she finished (for logs and
/// progress).
#[derive(Clone, Debug)]
pub enum AliceEvent {
    /// Bob opened a session.
    SessionOpened {
        /// Bob's node identifier, as he announced it.
        bob_id: String,
        /// The new session.
        session_id: Uuid,
        /// How many of Bob's pending blocks Alice holds as ready.
        settled_ready: usize,
        /// What the re-agreement of the stores dropped at Alice.
        reagreement: super::Reagreement,
    },
    /// A block was committed with its keys, its security report and what authentication cost.
    Committed(BlockMeta, Box<KeyLength>, AuthReport),
    /// A block was dropped, with the reason.
    Aborted {
        /// The block.
        block_id: Uuid,
        /// Why.
        abort: Abort,
        /// Bob gave the block up (his Abort request), rather than Alice.
        by_bob: bool,
    },
}

impl AliceCore {
    /// A core with no frames and no session. `rng` must be a CSPRNG seeded from the OS: it
    /// draws block IDs, key IDs, hash keys and Toeplitz seeds. `auth` is Alice's
    /// authentication key pool (the same pre-shared secret as Bob's).
    pub fn new(
        alice_id: String,
        params: ProtocolParams,
        security: SecurityParams,
        rng: ChaCha20Rng,
        auth: Arc<dyn AuthPool>,
    ) -> Self {
        let digest = params.digest(&security);
        Self {
            alice_id,
            params,
            security,
            digest,
            rng,
            frames: BTreeMap::new(),
            session: None,
            draining: false,
            simulated: false,
            next_frame: 0,
            auth,
        }
    }

    /// Unused bits in Alice's authentication key pool.
    pub fn auth_pool_bits(&self) -> Result<u64, LinkError> {
        Ok(self.auth.available_bits()?)
    }

    /// The security parameters in use.
    pub fn security_params(&self) -> &SecurityParams {
        &self.security
    }

    /// Stops accepting new blocks (shutdown): blocks in progress may still finish.
    pub fn drain(&mut self) {
        self.draining = true;
    }

    /// Number of blocks started and not yet committed or aborted.
    pub fn blocks_in_progress(&self) -> usize {
        self.session.as_ref().map_or(0, |s| s.blocks.len())
    }

    /// Says that Alice's source is simulated (the in-process simulator, an emulator, a replay):
    /// every block is then marked simulated in the store, at both ends.
    pub fn set_simulated(&mut self, simulated: bool) {
        self.simulated = simulated;
    }

    /// Records the states of a frame just prepared, before its photons leave, erasing the
    /// oldest frames beyond [`MAX_UNSIFTED_FRAMES`]. A frame the source lost is simply never
    /// registered: Bob's sift request for it is answered "unavailable" and both ends drop it.
    pub fn register_frame(&mut self, frame_idx: u64, frame: PreparedFrame) {
        self.next_frame = self.next_frame.max(frame_idx.saturating_add(1));
        self.frames.insert(frame_idx, frame);
        while self.frames.len() > MAX_UNSIFTED_FRAMES {
            self.frames.pop_first();
        }
    }

    /// Notes that the source lost frames `first..first + count` (their states never reached
    /// the core): they are answered "unavailable" without waiting for them.
    pub fn frames_lost(&mut self, first: u64, count: u64) {
        self.next_frame = self.next_frame.max(first.saturating_add(count));
    }

    /// True while frame `frame_idx` is newer than anything the source reported (prepared or
    /// lost): a driver whose receiver can run ahead of the transmitter (two device streams) may
    /// hold Bob's request for it until the frame arrives, instead of answering "unavailable".
    pub fn awaits_frame(&self, frame_idx: u64) -> bool {
        frame_idx >= self.next_frame
    }

    /// Answers one of Bob's requests: the one entry point of every driver (the gRPC service,
    /// the in-memory peer). Returns the answer and what Alice has to report, if anything.
    pub fn handle(
        &mut self,
        request: Request,
        ctx: &HandleContext<'_>,
    ) -> Result<(Response, Option<AliceEvent>), LinkError> {
        Ok(match request {
            Request::Hello(req) => {
                let (resp, event) = self.hello(&req, ctx.store)?;
                (resp.into(), Some(event))
            }
            Request::Sift(req) => (self.sift(&req)?.into(), None),
            Request::StartBlock(req) => {
                let (resp, event) = self.start_block(&req)?;
                (resp.into(), event)
            }
            Request::Parities(req) => (self.parities(&req)?.into(), None),
            Request::Syndromes(req) => (self.syndromes(&req)?.into(), None),
            Request::Reveal(req) => (self.reveal(&req)?.into(), None),
            Request::Verify(req) => (self.verify(&req)?.into(), None),
            Request::Amplify(req) => {
                let (resp, event) = self.amplify(&req, ctx.now_unix_ms)?;
                (resp.into(), event)
            }
            Request::Commit(req) => {
                let (resp, event) = self.commit(&req, ctx.store)?;
                (resp.into(), Some(event))
            }
            Request::Abort(req) => {
                let (resp, event) = self.abort(&req)?;
                (resp.into(), Some(event))
            }
        })
    }

    /// Opens a new session, dropping every unfinished block of the previous one, and says which
    /// of Bob's pending blocks are ready here.
    fn hello(&mut self, req: &HelloRequest, store: &dyn KeyStore) -> Result<(HelloResponse, AliceEvent), LinkError> {
        if req.params_digest != self.digest {
            return Err(LinkError::ParamsMismatch(
                "protocol version, [protocol] or [security] settings (block size, key unit, frame length, eps_qkd, p_z, mu_max, g2_max) differ; run the same release and use the same preset, [protocol] and [security] sections at both ends".into(),
            ));
        }
        // Refills of blocks a crash left unsettled: kept if the block is ready here.
        self.auth
            .settle_all(&mut |block_id| Ok(store.block_state(block_id)? == Some(crate::store::BlockState::Ready)))?;
        let mut ready_block_ids = Vec::new();
        let mut bob_pending = Vec::new();
        for id in &req.pending_block_ids {
            let block_id = parse_uuid(id, "pending block id")?;
            bob_pending.push(block_id);
            if store.block_state(block_id)? == Some(crate::store::BlockState::Ready) {
                ready_block_ids.push(id.clone());
            }
        }
        let (held_units, stores_differed, reagreement) = reagree(store, req, &bob_pending)?;
        if req.auth_placeholder != self.auth.is_placeholder() {
            tracing::warn!(
                bob = %req.bob_id,
                alice_placeholder = self.auth.is_placeholder(),
                bob_placeholder = req.auth_placeholder,
                "one end's authentication key pool holds a pre-shared secret and the other's only the public \
                 placeholder: blocks will fail authentication until the same secret is installed at both ends"
            );
        }
        let id = self.uuid();
        let settled_ready = ready_block_ids.len();
        let response = HelloResponse {
            session_id: id.to_string(),
            alice_id: self.alice_id.clone(),
            ready_block_ids,
            next_frame_idx: self.frames.last_key_value().map_or(0, |(k, _)| k + 1),
            auth_placeholder: self.auth.is_placeholder(),
            simulated_channel: self.simulated,
            held_units,
            stores_differed,
        };
        // The session's first block authenticates its Hello too (see `reagree`).
        let mut acc_transcript = Transcript::default();
        acc_transcript.absorb("Hello", req, &response);
        self.session = Some(Session {
            id,
            acc_bits: BitVec::new(),
            acc_counts: XCounts::default(),
            acc_pulses: 0,
            acc_frames: 0,
            acc_monitor: SourceMonitor::default(),
            acc_transcript,
            blocks: HashMap::new(),
            simulated: self.simulated || req.simulated_channel,
        });
        reagreement.log("alice");
        let event =
            AliceEvent::SessionOpened { bob_id: req.bob_id.clone(), session_id: id, settled_ready, reagreement };
        Ok((response, event))
    }

    /// Sifts one frame against Bob's announcement; the frame's states are erased afterwards. A
    /// frame Bob drops (his receiver lost part of it) is erased unused; a frame Alice does not
    /// hold (her source lost it, or it expired) is answered "unavailable", and Bob drops it too:
    /// either way neither end uses any of it.
    fn sift(&mut self, req: &SiftRequest) -> Result<SiftResponse, LinkError> {
        let session = session_mut(&mut self.session, &req.session_id)?;
        let Some(frame) = self.frames.remove(&req.frame_idx) else {
            let response = SiftResponse { alice_info: Vec::new(), unavailable: true };
            session.acc_transcript.absorb("Sift", req, &response);
            return Ok(response);
        };
        if req.dropped {
            let response = SiftResponse { alice_info: Vec::new(), unavailable: false };
            session.acc_transcript.absorb("Sift", req, &response);
            return Ok(response);
        }
        let (alice_info, sift) = alice_sift(&frame.states, frame.n_pulses, &req.click_deltas, &req.bob_measurements)?;
        session.acc_bits.extend_from(&sift.key_bits);
        session.acc_counts.add(&sift.x_counts);
        session.acc_pulses += frame.n_pulses;
        session.acc_frames += 1;
        if let Some(reading) = frame.reading {
            session.acc_monitor.add_frame(reading);
        }
        let response = SiftResponse { alice_info, unavailable: false };
        session.acc_transcript.absorb("Sift", req, &response);
        Ok(response)
    }

    /// Cuts a block from the sifted bits, checks the phase-error bound, and starts Cascade.
    fn start_block(&mut self, req: &StartBlockRequest) -> Result<(StartBlockResponse, Option<AliceEvent>), LinkError> {
        if self.draining {
            return Err(LinkError::State("alice is shutting down; no new block".into()));
        }
        let block_id = self.uuid();
        let mut cascade_seed = [0u8; 32];
        self.rng.fill_bytes(&mut cascade_seed);
        let security = self.security.clone();
        let auth_pool = self.auth.clone();
        let session = session_mut(&mut self.session, &req.session_id)?;
        if req.n_bits != session.acc_bits.len() as u64 || req.n_frames != session.acc_frames {
            let abort = Abort::new(
                AbortReason::TranscriptMismatch,
                format!(
                    "block boundary differs: Bob has {} bits from {} frames, Alice {} bits from {} frames",
                    req.n_bits,
                    req.n_frames,
                    session.acc_bits.len(),
                    session.acc_frames
                ),
            );
            // The sifted data since the last block is dropped; the refusal is tagged over it, so
            // that Bob tells altered Sift messages from honest ends that disagree.
            let mut transcript = std::mem::take(&mut session.acc_transcript);
            session.acc_bits = BitVec::new();
            session.acc_counts = XCounts::default();
            session.acc_pulses = 0;
            session.acc_frames = 0;
            session.acc_monitor = SourceMonitor::default();
            let mut response = StartBlockResponse {
                block_id: block_id.to_string(),
                abort: Some(abort.to_wire()),
                auth_pool_bits: auth_pool.available_bits()?,
                ..Default::default()
            };
            if let Ok(auth) = alice_allocate(auth_pool.as_ref())? {
                response.auth_pad_offset = auth.pad_offset;
                response.auth_key_offset = auth.key_offset;
                response.auth_pool_bits = auth_pool.available_bits()?;
                transcript.absorb("StartBlock", req, &response);
                if !transcript.too_long() {
                    response.alice_tag = auth.tag(Direction::AliceToBob, transcript.bytes()).to_vec();
                }
            }
            tracing::warn!(block = %block_id, "{abort}");
            return Ok((response, Some(AliceEvent::Aborted { block_id, abort, by_bob: false })));
        }
        let key = std::mem::take(&mut session.acc_bits);
        let stats = BlockStats {
            n_key_bits: key.len() as u64,
            n_pulses: std::mem::take(&mut session.acc_pulses),
            x_counts: std::mem::take(&mut session.acc_counts),
            leak_ec_bits: 0,
        };
        session.acc_frames = 0;
        // The block's transcript starts with its Sift rounds (dropped with an aborted block).
        let sift_rounds = std::mem::take(&mut session.acc_transcript);
        let monitor = std::mem::take(&mut session.acc_monitor);
        let (monitor_mu, monitor_g2) = (monitor.mu_mean(), monitor.g2_mean());
        let estimate = monitor.check(&security).and_then(|()| phase_error_upper(&stats, &security));
        // Pre-shared secrets installed since the last block, at both ends or at Alice only, go
        // into the streams first (whatever becomes of the block).
        let synced = alice_sync_secrets(auth_pool.as_ref(), req.auth_pool_total_bits, &req.auth_staged_secrets)?;
        let auth_apply_secrets =
            synced.as_ref().map(|ids| ids.iter().map(Uuid::to_string).collect()).unwrap_or_default();
        // The block's hash key and pads: Alice's watermark moves past them (durably) before she
        // answers, so no crash makes her use them again.
        let auth = match (synced, estimate) {
            (Err(abort), _) => Err(abort),
            (Ok(_), Err(e)) => Err(Abort::from_key_length_error(&e)),
            (Ok(_), Ok(_)) => alice_allocate(auth_pool.as_ref())?,
        };
        let auth = match auth {
            Ok(auth) => auth,
            Err(abort) => {
                if matches!(abort.reason, AbortReason::AuthPoolExhausted | AbortReason::AuthPoolsDiffer) {
                    tracing::error!(block = %block_id, "{abort}");
                }
                let response = StartBlockResponse {
                    block_id: block_id.to_string(),
                    abort: Some(abort.to_wire()),
                    monitor_mu,
                    monitor_g2,
                    auth_pool_bits: auth_pool.available_bits()?,
                    auth_apply_secrets,
                    ..Default::default()
                };
                return Ok((response, Some(AliceEvent::Aborted { block_id, abort, by_bob: false })));
            }
        };
        tracing::debug!(
            block = %block_id,
            key_offset = auth.key_offset,
            pad_offset = auth.pad_offset,
            "authentication positions taken (watermark moved past them)"
        );
        let response = StartBlockResponse {
            block_id: block_id.to_string(),
            cascade_seed: cascade_seed.to_vec(),
            abort: None,
            monitor_mu,
            monitor_g2,
            auth_pad_offset: auth.pad_offset,
            auth_key_offset: auth.key_offset,
            auth_pool_bits: auth_pool.available_bits()?,
            auth_apply_secrets,
            alice_tag: Vec::new(),
        };
        let mut transcript = sift_rounds;
        transcript.absorb("StartBlock", req, &response);
        let reconciler = AliceReconciler::new(&self.params, &key, cascade_seed);
        session.blocks.insert(block_id, Block { stats, key, reconciler, transcript, auth, stage: Stage::Reconciling });
        Ok((response, None))
    }

    /// Discloses the parities Bob asks for (each one counted as leak).
    fn parities(&mut self, req: &ParityRequest) -> Result<ParityResponse, LinkError> {
        let (_, block) = block_for(&mut self.session, &req.block_id, BlockRequest::Parities)?;
        let queries: Vec<FrameParityQuery> = req
            .queries
            .iter()
            .map(|q| FrameParityQuery { frame: q.frame, pass: q.pass, start: q.start, end: q.end })
            .collect();
        let bits = block.reconciler.parities(&queries)?;
        let response = ParityResponse { parities: BitVec::from_bools(&bits).to_bytes() };
        block.transcript.absorb("Parities", req, &response);
        Ok(response)
    }

    /// Blind LDPC: the syndrome of every frame under the codes Bob names (leak m - p each).
    fn syndromes(&mut self, req: &SyndromeRequest) -> Result<SyndromeResponse, LinkError> {
        let Self { session, rng, .. } = self;
        let (_, block) = block_for(session, &req.block_id, BlockRequest::Syndromes)?;
        let starts: Vec<(u32, u32)> = req.frames.iter().map(|f| (f.rate_index, f.n_punctured)).collect();
        let syndromes = block.reconciler.syndromes(&starts, rng)?;
        let response = SyndromeResponse { syndromes: syndromes.iter().map(BitVec::to_bytes).collect() };
        block.transcript.absorb("Syndromes", req, &response);
        Ok(response)
    }

    /// Blind LDPC: reveals more punctured bits of the frames Bob names (one bit of leak each).
    fn reveal(&mut self, req: &RevealRequest) -> Result<RevealResponse, LinkError> {
        let (_, block) = block_for(&mut self.session, &req.block_id, BlockRequest::Reveal)?;
        let values = block.reconciler.reveal(&req.counts)?;
        let response = RevealResponse { values: values.iter().map(|v| BitVec::from_bools(v).to_bytes()).collect() };
        block.transcript.absorb("Reveal", req, &response);
        Ok(response)
    }

    /// Closes error correction and reveals Alice's verification tags, each under a fresh hash key
    /// (as many as keep eps_cor for the block's length).
    fn verify(&mut self, req: &VerifyRequest) -> Result<VerifyResponse, LinkError> {
        let eps_cor = EpsBudget::from_total(self.security.eps_qkd).eps_cor;
        let Self { session, rng, .. } = self;
        let (_, block) = block_for(session, &req.block_id, BlockRequest::Verify)?;
        let n_tags = n_tags_for(block.stats.n_key_bits, eps_cor);
        let hash_keys: Vec<u64> = (0..n_tags).map(|_| rng.next_u64()).collect();
        if req.n_corrected > block.stats.n_key_bits {
            return Err(LinkError::Malformed("more corrections than bits".into()));
        }
        block.stage = Stage::Verified { n_corrected: req.n_corrected };
        let tags = hash_keys.iter().map(|&hash_key| poly_hash_tag(&block.key, hash_key)).collect();
        let response = VerifyResponse { hash_keys, tags };
        block.transcript.absorb("Verify", req, &response);
        Ok(response)
    }

    /// Computes the final key length and the Toeplitz seed, and prepares the block's key units.
    fn amplify(
        &mut self,
        req: &AmplifyRequest,
        now_unix_ms: u64,
    ) -> Result<(AmplifyResponse, Option<AliceEvent>), LinkError> {
        let security = self.security.clone();
        let params = self.params.clone();
        let (max_qber_z, unit_bits) = (self.params.max_qber_z, u64::from(self.params.key_unit_bits));
        let refill_bits = self.params.auth_refill_bits;
        let Self { session, rng, .. } = self;
        let simulated = session.as_ref().is_some_and(|s| s.simulated);
        let (block_id, block) = block_for(session, &req.block_id, BlockRequest::Amplify)?;
        let Stage::Verified { n_corrected } = block.stage else {
            return Err(phase_error(block_id, block, BlockRequest::Amplify));
        };
        let n = block.stats.n_key_bits;
        let qber_z = n_corrected as f64 / n.max(1) as f64;
        let qber_x = block.stats.x_counts.qber_x();
        let stats = BlockStats {
            n_key_bits: block.stats.n_key_bits,
            n_pulses: block.stats.n_pulses,
            x_counts: block.stats.x_counts,
            leak_ec_bits: block.reconciler.leak_bits(),
        };
        let outcome = if !req.verified {
            Err(Abort::new(AbortReason::VerificationFailed, "the corrected keys differ"))
        } else if qber_z > max_qber_z {
            Err(Abort::new(
                AbortReason::QberTooHigh,
                format!("QBER in Z {:.2} % exceeds the limit {:.2} %", 100.0 * qber_z, 100.0 * max_qber_z),
            ))
        } else {
            match secret_key_length(&stats, &security) {
                Ok(length) if params.split_final_key(length.final_bits).is_some() => Ok(length),
                Ok(length) => Err(Abort::new(
                    AbortReason::NoSecretKey,
                    format!(
                        "finite-key length {} bits leaves no key unit of {unit_bits} bits after the {refill_bits} \
                         bits that refill the authentication pool",
                        length.final_bits
                    ),
                )),
                Err(e) => Err(Abort::from_key_length_error(&e)),
            }
        };
        let length = match outcome {
            Ok(length) => length,
            Err(abort) => {
                // Her tag on the abort too, over the transcript with this answer (tag field
                // empty): Bob tells an altered transcript (an authentication failure) from a block
                // that truly failed. The block's pads were spent at StartBlock either way.
                let mut response = AmplifyResponse { abort: Some(abort.to_wire()), ..Default::default() };
                block.transcript.absorb("Amplify", req, &response);
                if !block.transcript.too_long() {
                    response.alice_tag = block.auth.tag(Direction::AliceToBob, block.transcript.bytes()).to_vec();
                }
                remove_block(session, block_id);
                return Ok((response, Some(AliceEvent::Aborted { block_id, abort, by_bob: false })));
            }
        };
        let Some((hashed_bits, _)) = params.split_final_key(length.final_bits) else {
            unreachable!("checked above");
        };
        let final_bits = hashed_bits - refill_bits;
        let seed_bits = (n + hashed_bits - 1) as usize;
        let mut seed_bytes = vec![0u8; seed_bits.div_ceil(8)];
        rng.fill_bytes(&mut seed_bytes);
        let seed = BitVec::from_bytes(&seed_bytes, seed_bits);
        let final_key = toeplitz_hash(&block.key, &seed, hashed_bits as usize);
        let key_bytes = Zeroizing::new(final_key.to_bytes());
        let (refill, unit_bytes) = key_bytes.split_at((refill_bits / 8) as usize);
        let refill = Zeroizing::new(refill.to_vec());
        let mut keys = Vec::new();
        for chunk in unit_bytes.chunks_exact((unit_bits / 8) as usize) {
            let mut id = [0u8; 16];
            rng.fill_bytes(&mut id);
            keys.push(KeyUnit {
                key_id: uuid::Builder::from_random_bytes(id).into_uuid(),
                key: Zeroizing::new(chunk.to_vec()),
            });
        }
        let meta = BlockMeta {
            block_id,
            created_unix_ms: now_unix_ms,
            n_sifted_bits: n,
            qber_z,
            qber_x,
            phase_error_upper: length.phase_error_upper(),
            leak_bits: stats.leak_ec_bits + length.leak_verification_bits,
            final_bits,
            simulated,
        };
        let mut response = AmplifyResponse {
            final_bits: hashed_bits,
            toeplitz_seed: seed.to_bytes(),
            key_ids: keys.iter().map(|k| k.key_id.to_string()).collect(),
            abort: None,
            alice_tag: Vec::new(),
        };
        // Alice's tag covers the transcript up to here, this answer included (its tag field
        // empty).
        block.transcript.absorb("Amplify", req, &response);
        if block.transcript.too_long() {
            remove_block(session, block_id);
            let abort = Abort::new(AbortReason::AuthenticationFailed, "the block's transcript exceeds 1 GiB");
            let response = AmplifyResponse { abort: Some(abort.to_wire()), ..Default::default() };
            return Ok((response, Some(AliceEvent::Aborted { block_id, abort, by_bob: false })));
        }
        response.alice_tag = block.auth.tag(Direction::AliceToBob, block.transcript.bytes()).to_vec();
        block.stage = Stage::Amplified { meta, keys, length: Box::new(length), refill };
        Ok((response, None))
    }

    /// Bob holds the block as pending: store it as ready (durably) and confirm.
    fn commit(&mut self, req: &CommitRequest, store: &dyn KeyStore) -> Result<(CommitResponse, AliceEvent), LinkError> {
        let (block_id, _) = block_for(&mut self.session, &req.block_id, BlockRequest::Commit)?;
        // The block leaves the session whatever the outcome (a store failure included).
        let Some(Block { stage: Stage::Amplified { meta, keys, length, refill }, transcript, auth, .. }) =
            remove_block(&mut self.session, block_id)
        else {
            return Err(LinkError::State(format!("block {block_id} vanished during its commit")));
        };
        // Bob's tag, before anything is stored.
        if !auth.verify(Direction::BobToAlice, transcript.bytes(), &req.bob_tag) {
            retire_hash_key(self.auth.as_ref(), auth.key_offset)?;
            let abort = Abort::new(
                AbortReason::AuthenticationFailed,
                "Bob's tag does not match Alice's transcript of the block (a message was altered, replayed or \
                 lost); the hash key is replaced",
            );
            tracing::warn!(block = %block_id, "{abort}");
            let response = CommitResponse { ready: false, abort: Some(abort.to_wire()) };
            return Ok((response, AliceEvent::Aborted { block_id, abort, by_bob: false }));
        }
        // The refill first (kept aside until the block is ready here), then the keys.
        self.auth.stage_refill(block_id, &refill)?;
        if let Err(e) = store.put_ready(&meta, &keys) {
            self.auth.settle_refill(block_id, false)?;
            return Err(e.into());
        }
        self.auth.settle_refill(block_id, true)?;
        let report = AuthReport::new(auth.spent_bits, refill.len() as u64 * 8, self.auth.available_bits()?);
        Ok((CommitResponse { ready: true, abort: None }, AliceEvent::Committed(meta, length, report)))
    }

    /// Bob gave up on a block: forget it.
    fn abort(&mut self, req: &AbortRequest) -> Result<(AbortResponse, AliceEvent), LinkError> {
        let block_id = parse_uuid(&req.block_id, "block id")?;
        let block = self.session.as_mut().and_then(|session| session.blocks.remove(&block_id));
        let abort = req.abort.as_ref().map_or(Abort::new(AbortReason::Unknown(0), ""), Abort::from_wire);
        // Bob saw an authentication fail: the hash key is replaced at both ends. (A forged abort
        // only costs 128 pool bits.)
        if abort.reason == AbortReason::AuthenticationFailed {
            let key_offset = match block {
                Some(block) => Some(block.auth.key_offset),
                None => self.auth.state()?.hash_key_offset,
            };
            if let Some(key_offset) = key_offset {
                retire_hash_key(self.auth.as_ref(), key_offset)?;
            }
        }
        Ok((AbortResponse {}, AliceEvent::Aborted { block_id, abort, by_bob: true }))
    }

    fn uuid(&mut self) -> Uuid {
        uuid::Builder::from_random_bytes(self.rng.random()).into_uuid()
    }
}

/// Alice's part of the re-agreement at `Hello` (see [`super::reagree`]): drops, durably, her units
/// that Bob does not hold, and her KME reservations if the stores differ; returns the packed
/// intersection for her answer, whether the stores differed, and what she dropped. `bob_pending`:
/// Bob's pending blocks.
fn reagree(
    store: &dyn KeyStore,
    req: &HelloRequest,
    bob_pending: &[Uuid],
) -> Result<(Vec<u8>, bool, super::Reagreement), LinkError> {
    let bob = super::UnitMap::decode(&req.held_units)?;
    let own = store.holdings()?;
    let side = super::reagree::alice_side(&own, &bob, bob_pending, |block_id| Ok(store.block_state(block_id)?))?;
    let mut reagreement = super::Reagreement::default();
    for (block_id, units) in &side.discard {
        reagreement.units_dropped += store.discard_units(units)?;
        reagreement.blocks.push((*block_id, units.len() as u64));
    }
    reagreement.stores_differed = side.differ;
    if side.differ {
        reagreement.reservations_dropped = store.drop_reservations()?;
    }
    let agreed = side.agreed.encode()?;
    store.reagreed();
    Ok((agreed, side.differ, reagreement))
}

/// The block `block_id` names, if `request` fits its phase: the one place where a request meets
/// a block's phase.
fn block_for<'a>(
    session: &'a mut Option<Session>,
    block_id: &str,
    request: BlockRequest,
) -> Result<(Uuid, &'a mut Block), LinkError> {
    let block_id = parse_uuid(block_id, "block id")?;
    let session = session.as_mut().ok_or_else(|| LinkError::State("no session".into()))?;
    let block =
        session.blocks.get_mut(&block_id).ok_or_else(|| LinkError::State(format!("unknown block {block_id}")))?;
    if block.stage.phase() != request.expects() {
        return Err(phase_error(block_id, block, request));
    }
    Ok((block_id, block))
}

/// The error for `request` arriving while `block` is in another phase than the one it needs.
fn phase_error(block_id: Uuid, block: &Block, request: BlockRequest) -> LinkError {
    LinkError::Phase { block_id, request, expected: request.expects(), actual: block.stage.phase() }
}

/// Drops a block from the session (committed or aborted), returning it.
fn remove_block(session: &mut Option<Session>, block_id: Uuid) -> Option<Block> {
    session.as_mut().and_then(|s| s.blocks.remove(&block_id))
}

fn session_mut<'a>(session: &'a mut Option<Session>, id: &str) -> Result<&'a mut Session, LinkError> {
    match session {
        Some(s) if s.id.to_string() == id => Ok(s),
        _ => Err(LinkError::State(format!("session {id} is not the current session; say hello again"))),
    }
}
