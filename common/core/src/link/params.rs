//! Protocol parameters both ends must agree on.

use sha2::{Digest, Sha256};

use super::Reconciliation;
use crate::postproc::finite_key::SecurityParams;

/// Version of what the two ends compute alike beyond these parameters (the Cascade shuffles,
/// how a block is cut into frames and padded, the hashes' layouts). It is part of the session
/// digest, so a pair of daemons of different versions is refused when the session opens instead
/// of failing block after block; raise it with any such change.
/// 2: Cascade frames of one exchange padded to one length.
/// 3: the rigorous finite-key analysis (one eps_QKD, calibrated source bounds, verification tags
///    per block size, source monitor readings checked at StartBlock).
/// 4: typed abort reasons on the wire (`BlockAbort`: an `AbortReason` and a bounded detail).
/// 5: frames dropped at both ends (`SiftRequest.dropped`, `SiftResponse.unavailable`) and the
///    simulated-channel flag at `Hello`.
/// 6: Wegman-Carter authentication of every block (`alice_tag` in Amplify, `bob_tag` in Commit,
///    pad positions at StartBlock) and the authentication pool's refill from each block's key.
/// 7: pre-shared secrets applied at StartBlock at both ends (`auth_staged_secrets`,
///    `auth_apply_secrets`, the pool's size checked), the placeholder flag at `Hello`, and
///    tagged refusals (a differing block boundary at StartBlock, Alice's aborts at Amplify).
/// 8: the stores re-agreed unit by unit at `Hello` (`held_units`, `stores_differed`), and `Hello` absorbed into the transcript of the session's first block.
pub const LINK_PROTOCOL_VERSION: u32 = 8;

/// Post-processing parameters. Alice and Bob compare a digest of these (and of the physical
/// parameters the security analysis uses) when a session opens.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProtocolParams {
    /// Sifted key bits after which a block is closed and post-processed (the finite-key block
    /// size; a block closes at the first frame boundary at or after this many bits).
    pub block_bits: u64,
    /// Bits per stored key unit; final keys are cut into units of this size, each with a UUID.
    pub key_unit_bits: u32,
    /// Pulses per frame on the fibre (2^22 is 55 ms at 76 MHz).
    pub frame_pulses: u64,
    /// QBER assumed for the first block's Cascade schedule, before any block was corrected.
    pub initial_qber: f64,
    /// Error correction: "cascade" (interactive, smallest leak) or "ldpc" (one-way blind
    /// LDPC: a syndrome and a few reveals, for links where round trips are expensive).
    pub reconciliation: Reconciliation,
    /// Cascade: the block is cut into frames of about this many bits, all reconciled in the
    /// same round trips (0: one frame, the whole block). Longer frames leak a little less but
    /// are slower (figures: docs/postprocessing.md). The default 2^20 keeps blocks of up to
    /// about 1.5 10^6 bits (the 120 km preset's 10^6) in one frame, where the key rate at high
    /// QBER gains most from the smaller leak, and bounds the shuffles' memory (about 30 bytes per
    /// bit of a frame at each end) for longer blocks.
    pub cascade_frame_bits: u64,
    /// LDPC: frame length in bits (the last frame of a block is shorter); one code family
    /// per length is built when the first block starts.
    pub ldpc_frame_bits: u64,
    /// Largest key-basis QBER accepted after error correction; above it the block is aborted.
    pub max_qber_z: f64,
    /// Bits of each block's final key that refill the authentication key pool at both ends
    /// before anything else is stored (the stored key is net of them). A block spends 256 pad
    /// bits, and 128 more when it takes a fresh hash key, so the default 512 keeps the pool
    /// growing; a multiple of 128, at least 384.
    pub auth_refill_bits: u64,
}

impl Default for ProtocolParams {
    fn default() -> Self {
        Self {
            block_bits: 100_000,
            key_unit_bits: 256,
            frame_pulses: 1 << 22,
            initial_qber: 0.03,
            reconciliation: Reconciliation::Cascade,
            cascade_frame_bits: 1 << 20,
            ldpc_frame_bits: 1 << 16,
            max_qber_z: 0.11,
            auth_refill_bits: 512,
        }
    }
}

impl ProtocolParams {
    /// Checks ranges; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.block_bits < 1000 {
            return Err(format!("block_bits = {} is below 1000", self.block_bits));
        }
        if self.key_unit_bits == 0 || !self.key_unit_bits.is_multiple_of(8) {
            return Err(format!("key_unit_bits = {} is not a positive multiple of 8", self.key_unit_bits));
        }
        if self.cascade_frame_bits != 0 && self.cascade_frame_bits < 1024 {
            return Err(format!("cascade_frame_bits = {} is below 1024 (0 means one frame)", self.cascade_frame_bits));
        }
        if !(1024..=1 << 24).contains(&self.ldpc_frame_bits) {
            return Err(format!("ldpc_frame_bits = {} is not between 1024 and 2^24", self.ldpc_frame_bits));
        }
        if self.frame_pulses == 0 {
            return Err("frame_pulses must be positive".into());
        }
        if !(self.initial_qber > 0.0 && self.initial_qber < 0.5) {
            return Err(format!("initial_qber = {} is not in (0, 0.5)", self.initial_qber));
        }
        if !(self.max_qber_z > 0.0 && self.max_qber_z < 0.5) {
            return Err(format!("max_qber_z = {} is not in (0, 0.5)", self.max_qber_z));
        }
        if self.auth_refill_bits < 384 || !self.auth_refill_bits.is_multiple_of(128) {
            return Err(format!(
                "auth_refill_bits = {} is not a multiple of 128 of at least 384 (a block spends up to 384 \
                 authentication bits)",
                self.auth_refill_bits
            ));
        }
        Ok(())
    }

    /// The Toeplitz output length and the number of key units of a block whose finite-key
    /// length is `secret_bits`: the first [`ProtocolParams::auth_refill_bits`] refill the
    /// authentication pool, the rest is cut into whole key units. `None` when no key unit is
    /// left after the refill.
    pub fn split_final_key(&self, secret_bits: u64) -> Option<(u64, u64)> {
        let unit_bits = u64::from(self.key_unit_bits);
        let n_units = secret_bits.checked_sub(self.auth_refill_bits)? / unit_bits;
        (n_units > 0).then(|| (self.auth_refill_bits + n_units * unit_bits, n_units))
    }

    /// SHA-256 over everything both ends must share: the [`LINK_PROTOCOL_VERSION`], these
    /// parameters and the security parameters (eps_QKD, p_Z and the calibrated source bounds).
    /// (`Hello` carries it: Alice refuses a session whose digest differs from hers, so two ends
    /// of different protocol versions or settings never start a block.)
    pub fn digest(&self, security: &SecurityParams) -> Vec<u8> {
        let shared = serde_json::json!({
            "version": LINK_PROTOCOL_VERSION,
            "protocol": self,
            "security": security,
        });
        Sha256::digest(shared.to_string().as_bytes()).to_vec()
    }
}
