//! Parameter estimation and secret key length of the three-state time-bin protocol, with one
//! composed security parameter.
//!
//! Alice sends |E> or |L> (Z basis, the key) with probability p_Z / 2 each and |+> with
//! probability p_X = 1 - p_Z; |-> is never sent. Bob measures Z (arrival time) or X (interferometer,
//! outcomes + and -). Key bits come from Z-sent, Z-measured clicks; the test data are Bob's
//! X-measured clicks, for which Alice reveals her state, counted in [`XCounts`]. The proof the
//! code follows, with every step's reference, is in `docs/security.md`; in short:
//!
//! # Security statement
//! The keys are eps_QKD-secure in the composable sense (Renner, PhD thesis, ETH Zurich 2005;
//! Tomamichel, Lim, Gisin & Renner, Nat. Commun. 3, 634 (2012)), eps_QKD = eps_cor + eps_sec,
//! configured once ([`SecurityParams::eps_qkd`]) and split by [`EpsBudget::from_total`]:
//! * eps_auth: one of the block's two Wegman-Carter tags accepts a forged or altered transcript
//!   ([`crate::auth`]; Wegman & Carter, JCSS 22, 265 (1981); Portmann, IEEE TIT 60, 4383
//!   (2014) for the recycled hash key); with it the keys are secure against an adversary who
//!   controls the classical channel, without any computational assumption.
//! * eps_cor: the verification tags collide with probability at most eps_cor
//!   ([`crate::postproc::verify`]: as many 64-bit tags as the block needs, [`n_tags_for`]).
//! * eps_sec = 2 sqrt(eps_PE) + eps_PA: every statistical bound below together fails with
//!   probability at most eps_PE; conditioned on passing, that makes the state sqrt(eps_PE / p_pass)
//!   close (purified distance) to one whose phase error is within the bound, which is the
//!   smoothing of the min-entropy (Tomamichel et al. 2012, Supplementary Lemma 3: sampling
//!   failure eps^2 / p_pass, smoothing eps / sqrt(p_pass)); the leftover hash lemma against
//!   quantum side information (Tomamichel, Schaffner, Smith & Renner, IEEE Trans. Inf. Theory
//!   57, 5524 (2011)) adds eps_PA for a key of H_min - 2 log2(1 / (2 eps_PA)) bits (Tomamichel
//!   et al. 2012, Supplementary Theorem 2, Eq. (S3)).
//!
//! # The phase-error estimate, step by step
//! Rounds are pulses. Given the history, the round's photon number and Alice's state are drawn
//! by Alice (photon number independent of the state); what happens next is the adversary's
//! choice. All bounds are of [`crate::postproc::concentration`] (valid against coherent attacks,
//! at the block's end, a stopping time) or [`crate::postproc::sampling`] (exact hypergeometric),
//! each failing with probability at most eps_PE / [`N_PE_BOUNDS`].
//!
//! 1. Phase error by linearity, for rounds with at most one photon. For vacuum and one photon
//!    |E><E| + |L><L| = |+><+| + |-><-|, so a Z-sent pulse is a 50/50 mixture of |+> and the
//!    never-sent |->, and Y(+|-) = Y(+|E) + Y(+|L) - Y(+|+) holds for the conditional yields of
//!    every round given its history (Tamaki et al., PRA 90, 052314 (2014); Rusca et al., PRA 98,
//!    052336 (2018), for this protocol). With q(s, b) the conditional probability that a round
//!    sends state s with at most one photon and Bob measures X with outcome b, the conditional
//!    probability of a phase error among the Z-sent, X-measured clicks of such rounds is
//!    r q(+, -) + q(Z, +) - r q(+, +) with r = p_Z / (2 p_X).
//! 2. Summed over the block, with the per-round score X_i = r [+ sent, - seen] - r [+ sent, +
//!    seen] + [Z sent, + seen] over all photon numbers: its conditional expectations sum to at
//!    most S + a, S the observed score and a Freedman's deviation
//!    ([`concentration::freedman_deviation`](crate::postproc::concentration::freedman_deviation))
//!    for differences at most max(r, 1) + r and predictable variance at most
//!    r^2 U(plus_plus + plus_minus) + U(e_plus + l_plus), U the upper bounds (1) on the counts'
//!    expectations. Restricting to rounds with at most one photon removes the multi-photon
//!    rounds' part, which is at least -r q(+, +, n >= 2) >= -r p_X p_multi per round,
//!    p_multi = mu_max^2 g2_max / 2 (a pulse with n >= 2 photons has n (n - 1) / 2 >= 1, so
//!    P(n >= 2) <= E[n (n - 1)] / 2 = mu^2 g2 / 2): the correction r N p_X p_multi.
//! 3. The actual number of those phase errors: bound (3) from the expectation's upper bound.
//! 4. Multi-photon tagging (GLLP, QIC 4, 325 (2004)): the number M of multi-photon Z pulses,
//!    bound (3) from N p_Z p_multi, all assumed detected, in the key sample and known to Eve: the
//!    single-photon key bits number at least n_Z1 = n_key - M.
//! 5. From the test sample to the key sample: Bob's basis choice splits the Z-sent clicks at
//!    random into key (n_key) and test (n_test) samples, whatever their photon numbers. Marking
//!    a click "bad" when it is single-photon and has a phase error, the test holds at most
//!    t = the bound of step 3 bad clicks, so the key sample holds at most
//!    [`sampling::key_errors_upper`](crate::postproc::sampling::key_errors_upper)(t) (exact
//!    hypergeometric, non-decreasing in t, so an upper bound on t serves).
//! 6. Key length: l = floor( n_Z1 (1 - h(phi_1)) - leak_EC - leak_tags - 2 log2(1 / (2 eps_PA)) ),
//!    phi_1 = S / n_Z1, vacuum contributions dropped (conservative), leak_EC the bits error
//!    correction disclosed and leak_tags the verification tags' bits (chain rule of the
//!    min-entropy for classical information). n (1 - h(e / n)) grows with n and falls with e
//!    (for e / n <= 1/2), so lower bounds on n_Z1 and upper bounds on the errors give a lower
//!    bound on the entropy.
//!
//! The source's mu and g2 enter only as the calibrated upper bounds `mu_max` and `g2_max` of
//! [`SecurityParams`] (the `[security]` section), never as a simulator's model values; a block
//! whose monitored values exceed them is aborted before this analysis runs
//! ([`SourceMonitor`]).

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::binary_entropy;
use super::concentration::{count_upper, expectation_upper, freedman_deviation};
use super::sampling::key_errors_upper;

/// Number of statistical bounds in the estimate, each failing with probability at most
/// eps_PE / `N_PE_BOUNDS`: the upper bounds on the expectations of plus_plus + plus_minus and of
/// e_plus + l_plus, Freedman's bound on the score, the bound on the actual phase errors, the
/// bound on the multi-photon Z pulses, and the random-sampling bound (module documentation,
/// steps 2 to 5).
pub const N_PE_BOUNDS: u32 = 6;

/// Phase error (fraction) at or above which the block is aborted: h(phi) reaches 1 there.
pub const MAX_PHASE_ERROR: f64 = 0.5;

/// Bits of one verification tag (the polynomial hash over GF(2^64)).
pub const TAG_BITS: u64 = 64;

/// Default overall security parameter eps_QKD.
pub const DEFAULT_EPS_QKD: f64 = 1e-9;

/// Bob's X-measured clicks, counted by (state Alice sent, outcome), for one frame or block.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct XCounts {
    /// Alice sent |E>, Bob got +.
    pub e_plus: u64,
    /// Alice sent |E>, Bob got -.
    pub e_minus: u64,
    /// Alice sent |L>, Bob got +.
    pub l_plus: u64,
    /// Alice sent |L>, Bob got -.
    pub l_minus: u64,
    /// Alice sent |+>, Bob got + (no error).
    pub plus_plus: u64,
    /// Alice sent |+>, Bob got - (a bit error in X).
    pub plus_minus: u64,
}

impl XCounts {
    /// Adds `other`'s counts to these (accumulating frames into a block).
    pub fn add(&mut self, other: &XCounts) {
        self.e_plus += other.e_plus;
        self.e_minus += other.e_minus;
        self.l_plus += other.l_plus;
        self.l_minus += other.l_minus;
        self.plus_plus += other.plus_plus;
        self.plus_minus += other.plus_minus;
    }

    /// The X-basis bit error rate plus_minus / (plus_plus + plus_minus), a fraction; 0 when no
    /// |+> was detected.
    pub fn qber_x(&self) -> f64 {
        let total = self.plus_plus + self.plus_minus;
        if total == 0 { 0.0 } else { self.plus_minus as f64 / total as f64 }
    }

    /// Number of X-measured clicks from Z-basis states (|E> or |L>): the test sample's size.
    pub fn n_z_sent(&self) -> u64 {
        self.e_plus + self.e_minus + self.l_plus + self.l_minus
    }

    /// Number of X-measured clicks from |+>.
    pub fn n_plus_sent(&self) -> u64 {
        self.plus_plus + self.plus_minus
    }
}

/// What the key length assumes: the overall security parameter, Alice's basis probability and
/// calibrated upper bounds on the source (the `[security]` section; never a simulator's model
/// values).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SecurityParams {
    /// Overall security parameter eps_QKD = eps_cor + eps_sec (dimensionless), default 1e-9;
    /// split by [`EpsBudget::from_total`].
    pub eps_qkd: f64,
    /// Probability that Alice's transmitter prepares a Z-basis state (|E> or |L>), a setting of
    /// the transmitter (dimensionless).
    pub p_z: f64,
    /// Calibrated upper bound on the mean photon number per pulse leaving Alice's lab
    /// (dimensionless).
    pub mu_max: f64,
    /// Calibrated upper bound on the source's second-order autocorrelation g2(0)
    /// (dimensionless).
    pub g2_max: f64,
}

impl Default for SecurityParams {
    fn default() -> Self {
        Self { eps_qkd: DEFAULT_EPS_QKD, p_z: 0.5, mu_max: 0.01, g2_max: 0.0085 }
    }
}

impl SecurityParams {
    /// The default eps_QKD with calibrated source bounds and Alice's basis probability `p_z`.
    pub fn with_bounds(mu_max: f64, g2_max: f64, p_z: f64) -> Self {
        Self { eps_qkd: DEFAULT_EPS_QKD, p_z, mu_max, g2_max }
    }

    /// Upper bound on the probability that a pulse holds two photons or more: mu_max^2 g2_max / 2
    /// (module documentation, step 2).
    pub fn p_multi_upper(&self) -> f64 {
        self.mu_max * self.mu_max * self.g2_max / 2.0
    }
}

/// The split of eps_QKD into the failure probabilities of each part of the protocol (module
/// documentation, "Security statement"); every term is reported with each block, and
/// `eps_auth + eps_cor + 2 sqrt(eps_pe_total) + eps_pa = eps_qkd`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpsBudget {
    /// The configured total, eps_auth + eps_cor + eps_sec.
    pub eps_qkd: f64,
    /// Authentication: a forged message passes one of the block's two Wegman-Carter tags
    /// ([`crate::auth::eps_auth_per_block`], about 1e-30: taken off eps_QKD first).
    pub eps_auth: f64,
    /// Correctness: probability that keys that differ pass verification (1 % of eps_QKD: the
    /// tags make it cheap).
    pub eps_cor: f64,
    /// Secrecy: eps_QKD - eps_auth - eps_cor.
    pub eps_sec: f64,
    /// Privacy amplification (leftover hash lemma): half of eps_sec.
    pub eps_pa: f64,
    /// All statistical bounds together: (eps_sec / 4)^2, so that the smoothing term
    /// 2 sqrt(eps_pe_total) is the other half of eps_sec.
    pub eps_pe_total: f64,
    /// Each of the [`N_PE_BOUNDS`] statistical bounds: eps_pe_total / N_PE_BOUNDS.
    pub eps_pe_each: f64,
}

impl EpsBudget {
    /// The budget for a total eps_QKD (in (0, 1)).
    pub fn from_total(eps_qkd: f64) -> Self {
        let eps_auth = crate::auth::eps_auth_per_block();
        let eps_cor = eps_qkd / 100.0;
        let eps_sec = eps_qkd - eps_auth - eps_cor;
        let eps_pa = eps_sec / 2.0;
        let eps_pe_total = (eps_sec / 4.0) * (eps_sec / 4.0);
        Self {
            eps_qkd,
            eps_auth,
            eps_cor,
            eps_sec,
            eps_pa,
            eps_pe_total,
            eps_pe_each: eps_pe_total / f64::from(N_PE_BOUNDS),
        }
    }

    /// The composed parameter the terms add up to:
    /// eps_auth + eps_cor + 2 sqrt(eps_pe_total) + eps_pa.
    pub fn composed(&self) -> f64 {
        self.eps_auth + self.eps_cor + 2.0 * self.eps_pe_total.sqrt() + self.eps_pa
    }

    /// Bits privacy amplification costs: 2 log2(1 / (2 eps_pa)).
    pub fn pa_cost_bits(&self) -> f64 {
        2.0 * (1.0 / (2.0 * self.eps_pa)).log2()
    }
}

/// Number of independent 64-bit verification tags that keep the collision probability of an
/// `n_bits`-bit block at or below `eps_cor`: each collides with probability at most
/// (L + 1) / 2^64 ([`crate::postproc::verify::eps_cor_for`]), independent tags multiply.
pub fn n_tags_for(n_bits: u64, eps_cor: f64) -> u32 {
    let per_tag = super::verify::eps_cor_for(n_bits as usize);
    let mut n_tags = 1u32;
    let mut collision = per_tag;
    while collision > eps_cor {
        n_tags += 1;
        collision *= per_tag;
    }
    n_tags
}

/// What the transmitter's monitors reported for a block's frames: the source's mean photon
/// number and g2(0) as measured (in simulation, the simulated source's values with the
/// measurement noise of a calibrated monitor). The key length never uses these; a block whose
/// readings exceed the configured bounds is aborted ([`SourceMonitor::check`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SourceMonitor {
    /// Frames that carried a reading.
    pub n_frames: u64,
    /// Sum over frames of the measured mean photon number.
    pub mu_sum: f64,
    /// Sum over frames of the measured g2(0).
    pub g2_sum: f64,
}

/// One frame's monitor reading of the source.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SourceReading {
    /// Measured mean photon number per pulse (dimensionless).
    pub mu: f64,
    /// Measured g2(0) (dimensionless).
    pub g2: f64,
}

impl SourceMonitor {
    /// Adds one frame's reading.
    pub fn add_frame(&mut self, reading: SourceReading) {
        self.n_frames += 1;
        self.mu_sum += reading.mu;
        self.g2_sum += reading.g2;
    }

    /// Mean measured photon number over the frames (0 without readings).
    pub fn mu_mean(&self) -> f64 {
        if self.n_frames == 0 { 0.0 } else { self.mu_sum / self.n_frames as f64 }
    }

    /// Mean measured g2(0) over the frames (0 without readings).
    pub fn g2_mean(&self) -> f64 {
        if self.n_frames == 0 { 0.0 } else { self.g2_sum / self.n_frames as f64 }
    }

    /// Refuses a block whose mean readings exceed the calibrated bounds, or that has none.
    pub fn check(&self, params: &SecurityParams) -> Result<(), KeyLengthError> {
        if self.n_frames == 0 {
            return Err(KeyLengthError::MonitorExceeded { reason: "no source monitor readings for the block".into() });
        }
        if self.mu_mean().is_nan() || self.mu_mean() > params.mu_max {
            return Err(KeyLengthError::MonitorExceeded {
                reason: format!(
                    "measured mean photon number {:.4e} exceeds mu_max {:.4e}",
                    self.mu_mean(),
                    params.mu_max
                ),
            });
        }
        if self.g2_mean().is_nan() || self.g2_mean() > params.g2_max {
            return Err(KeyLengthError::MonitorExceeded {
                reason: format!("measured g2(0) {:.4e} exceeds g2_max {:.4e}", self.g2_mean(), params.g2_max),
            });
        }
        Ok(())
    }
}

/// Bob's X-branch clicks by interferometer slot (after dead time, before squashing): the
/// side-slot monitor's data.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct XSlotCounts {
    /// Clicks in the windows of the side slots (0 and 2) of both X detectors.
    pub side: u64,
    /// Clicks in the central-slot windows of both X detectors (the X measurements).
    pub central: u64,
}

impl XSlotCounts {
    /// Adds another frame's counts.
    pub fn add(&mut self, other: &XSlotCounts) {
        self.side += other.side;
        self.central += other.central;
    }
}

/// What Bob's receiver calibration says the side slots should see. For any state in the qubit
/// space, half of the X branch's photons leave the interferometer in a side slot (|E>: slots 0
/// and 1; |L>: 1 and 2; |+> and |->: 1/4, 1/2, 1/4), so the side windows catch p_own / 2 of them
/// whatever Alice sent, while the central window catches p_own / 2 plus a timing tail c / 2
/// with c between the two tails of the timing model. Signal clicks in the side windows are then
/// between `ratio_low` and `ratio_high` times the central signal clicks; dark counts add
/// `p_dark` per window, four side windows and two central ones per pulse. Light outside the
/// qubit space, as a time-shift or efficiency-mismatch attack sends, moves clicks between the
/// slots; the monitor aborts the block when the side counts leave the expected range
/// ([`SideSlotCalibration::check`]).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct SideSlotCalibration {
    /// Least ratio of side to central signal clicks: p_own / (p_own + c_max).
    pub ratio_low: f64,
    /// Largest ratio: p_own / (p_own + c_min).
    pub ratio_high: f64,
    /// Dark-count probability per window.
    pub p_dark: f64,
    /// Relative tolerance for what the model leaves out (dead time, squashing, after-pulses).
    pub tolerance: f64,
}

impl SideSlotCalibration {
    /// Checks a block's side-slot clicks against the calibration, for `n_pulses` pulses: the side
    /// count must lie in the expected range widened by the tolerance and by six standard
    /// deviations of a Poisson count. Fails with the reason.
    pub fn check(&self, counts: &XSlotCounts, n_pulses: u64) -> Result<(), String> {
        let n = n_pulses as f64;
        let central_signal = (counts.central as f64 - 2.0 * self.p_dark * n).max(0.0);
        let dark_side = 4.0 * self.p_dark * n;
        let low = (self.ratio_low * central_signal + dark_side) * (1.0 - self.tolerance);
        let high = (self.ratio_high * central_signal + dark_side) * (1.0 + self.tolerance);
        let side = counts.side as f64;
        let (low, high) = (low - 6.0 * low.max(1.0).sqrt(), high + 6.0 * high.max(1.0).sqrt());
        if side < low || side > high {
            return Err(format!(
                "detector side-slot monitor: {} side-slot clicks against {} central, expected {:.0} to {:.0} \
                 (a detection-efficiency mismatch or light outside the two time bins)",
                counts.side,
                counts.central,
                low.max(0.0),
                high
            ));
        }
        Ok(())
    }
}

/// What one block contributes to the key-length formula.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockStats {
    /// Sifted key bits (Z sent, Z measured, clicked) in the block.
    pub n_key_bits: u64,
    /// Pulses Alice sent during the frames of the block.
    pub n_pulses: u64,
    /// X-measured clicks of those frames by (state, outcome).
    pub x_counts: XCounts,
    /// Bits disclosed by error correction (Cascade parities or LDPC syndromes and reveals); the
    /// verification tags are counted apart ([`n_tags_for`]).
    pub leak_ec_bits: u64,
}

/// The intermediate bounds of the phase-error estimate (module documentation, steps 1 to 6).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PhaseErrorBounds {
    /// Weight r = p_Z / (2 p_X) of the |+> counts (dimensionless).
    pub plus_weight: f64,
    /// Observed score S = r (plus_minus - plus_plus) + e_plus + l_plus (may be negative).
    pub score: f64,
    /// Upper bound on the expected plus_plus + plus_minus count (step 2).
    pub plus_expected_upper: f64,
    /// Upper bound on the expected e_plus + l_plus count (step 2).
    pub z_plus_expected_upper: f64,
    /// Upper bound on the score's predictable variance, r^2 U(++ + +-) + U(e+ + l+) (step 2).
    pub score_variance_upper: f64,
    /// Freedman's deviation of the score at that variance (step 2).
    pub score_deviation: f64,
    /// Bound on the multi-photon part of the subtracted |+> term, r N p_X p_multi (step 2).
    pub multi_photon_correction: f64,
    /// Upper bound on the expected phase errors among the single-photon test clicks (step 2).
    pub test_errors_expected_upper: f64,
    /// Upper bound on the actual number of those phase errors (step 3).
    pub test_errors_upper: f64,
    /// Test sample size: X-measured clicks from Z-basis states.
    pub n_test: u64,
    /// Key sample size: sifted key bits.
    pub n_key: u64,
    /// Upper bound M on the number of multi-photon Z pulses (step 4).
    pub n_multi_photon_upper: f64,
    /// Upper bound on the single-photon phase errors of the test sample, an integer (step 5).
    pub test_bad_upper: u64,
    /// Upper bound on the single-photon phase errors of the key sample (step 5).
    pub key_bad_upper: u64,
    /// Lower bound on the number of single-photon key bits, n_key - M (step 4).
    pub n_single_photon_lower: f64,
    /// The test sample's upper phase-error rate, test_bad_upper / n_test (fraction).
    pub test_rate_upper: f64,
    /// Upper bound on the phase error rate of the single-photon key bits (fraction): the value
    /// that enters the key-length formula.
    pub single_photon_rate_upper: f64,
}

impl PhaseErrorBounds {
    /// n_Z1 (1 - h(phi_1)), the single-photon key's smooth min-entropy bound, in bits.
    pub fn entropy_bits(&self) -> f64 {
        self.n_single_photon_lower * (1.0 - binary_entropy(self.single_photon_rate_upper))
    }
}

/// The secret key length of a block and everything it came from: the per-block security report
/// (no key material).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KeyLength {
    /// Length of the final key, in bits (the Toeplitz output length, before cutting into units).
    pub final_bits: u64,
    /// The phase-error estimate.
    pub bounds: PhaseErrorBounds,
    /// Observed X-basis QBER (|+> sent), fraction.
    pub qber_x: f64,
    /// The eps budget and its terms.
    pub eps: EpsBudget,
    /// Bits disclosed by error correction.
    pub leak_ec_bits: u64,
    /// Bits disclosed by the verification tags.
    pub leak_verification_bits: u64,
    /// Bits privacy amplification costs, 2 log2(1 / (2 eps_PA)).
    pub pa_cost_bits: f64,
    /// The calibrated source bounds the estimate used.
    pub mu_max: f64,
    /// The calibrated source bounds the estimate used.
    pub g2_max: f64,
}

impl KeyLength {
    /// Upper bound on the single-photon phase error rate (fraction).
    pub fn phase_error_upper(&self) -> f64 {
        self.bounds.single_photon_rate_upper
    }
}

/// Why a block yields no key: each message is an abort reason for the log.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum KeyLengthError {
    /// A security parameter is outside its range.
    #[error("invalid security parameters: {reason}")]
    InvalidParams {
        /// What is wrong.
        reason: &'static str,
    },
    /// A monitored source value exceeds its calibrated bound (or is missing).
    #[error("source monitor: {reason}")]
    MonitorExceeded {
        /// What was measured against which bound.
        reason: String,
    },
    /// The block lacks the data the estimate needs.
    #[error("not enough test data: {reason}")]
    NotEnoughTestData {
        /// What is missing.
        reason: &'static str,
    },
    /// The phase error bound is too high for any key.
    #[error("phase error upper bound {upper:.4} reaches the abort threshold {max}")]
    PhaseErrorTooHigh {
        /// The phase error upper bound (fraction).
        upper: f64,
        /// The abort threshold (fraction).
        max: f64,
    },
    /// Multi-photon pulses may account for every key bit.
    #[error("up to {n_multi_photon_upper:.0} multi-photon pulses may explain all {n_key_bits} key bits")]
    NoSinglePhotons {
        /// Upper bound on the number of multi-photon Z pulses.
        n_multi_photon_upper: f64,
        /// Sifted key bits in the block.
        n_key_bits: u64,
    },
    /// The formula leaves no key.
    #[error(
        "no key left: formula gives {length:.1} bits ({n_single_photon_lower:.0} single-photon bits, \
         phase error {phase_error_upper:.4}, leak {leak_bits} bits)"
    )]
    NoKeyLeft {
        /// The value of the formula before the floor, in bits.
        length: f64,
        /// Lower bound on the single-photon key bits.
        n_single_photon_lower: f64,
        /// Upper bound on the single-photon phase error rate (fraction).
        phase_error_upper: f64,
        /// Bits disclosed by error correction and verification.
        leak_bits: u64,
    },
}

fn validate(params: &SecurityParams) -> Result<(), KeyLengthError> {
    if !(params.eps_qkd > 0.0 && params.eps_qkd < 1.0) {
        return Err(KeyLengthError::InvalidParams { reason: "eps_qkd must lie in (0, 1)" });
    }
    if !(params.p_z > 0.0 && params.p_z < 1.0) {
        return Err(KeyLengthError::InvalidParams { reason: "p_z must lie in (0, 1)" });
    }
    let finite = |x: f64| x >= 0.0 && x.is_finite();
    if !(finite(params.mu_max) && finite(params.g2_max)) {
        return Err(KeyLengthError::InvalidParams { reason: "mu_max and g2_max must be finite and >= 0" });
    }
    Ok(())
}

/// Steps 1 to 4; the fields of steps 5 and 6 are left at 0.
fn shared_bounds(stats: &BlockStats, params: &SecurityParams) -> Result<PhaseErrorBounds, KeyLengthError> {
    validate(params)?;
    let counts = &stats.x_counts;
    if stats.n_key_bits == 0 {
        return Err(KeyLengthError::NotEnoughTestData { reason: "no sifted key bits" });
    }
    if stats.n_pulses == 0 {
        return Err(KeyLengthError::NotEnoughTestData { reason: "no pulses sent" });
    }
    let n_test = counts.n_z_sent();
    if n_test == 0 {
        return Err(KeyLengthError::NotEnoughTestData { reason: "no x-basis clicks from z-basis states" });
    }
    if counts.n_plus_sent() == 0 {
        return Err(KeyLengthError::NotEnoughTestData { reason: "no x-basis clicks from |+>" });
    }
    let eps = EpsBudget::from_total(params.eps_qkd).eps_pe_each;
    let n_pulses = stats.n_pulses as f64;
    let p_x = 1.0 - params.p_z;
    let p_multi = params.p_multi_upper();

    // Steps 1-2: the score S = sum X_i, X_i = r [+ sent, - seen] - r [+ sent, + seen]
    // + [Z sent, + seen], whose conditional expectations sum to the expected phase errors of
    // the rounds with at most one photon, up to the multi-photon correction.
    let plus_weight = params.p_z / (2.0 * p_x);
    let z_plus = (counts.e_plus + counts.l_plus) as f64;
    let score = plus_weight * (counts.plus_minus as f64 - counts.plus_plus as f64) + z_plus;
    // Var(X_i | past) <= E[X_i^2 | past] = r^2 q(+, +-) + q(Z, +), summed and bounded above.
    let plus_expected_upper = expectation_upper(counts.n_plus_sent() as f64, eps);
    let z_plus_expected_upper = expectation_upper(z_plus, eps);
    let score_variance_upper = plus_weight * plus_weight * plus_expected_upper + z_plus_expected_upper;
    // E[X_i | past] - X_i <= max(r, 1) + r.
    let increment_bound = plus_weight.max(1.0) + plus_weight;
    let score_deviation = freedman_deviation(score_variance_upper, increment_bound, eps);
    let multi_photon_correction = plus_weight * n_pulses * p_x * p_multi;
    let test_errors_expected_upper = (score + score_deviation + multi_photon_correction).max(0.0);
    // Step 3: the actual phase errors.
    let test_errors_upper = count_upper(test_errors_expected_upper, eps).min(n_test as f64);
    // Step 4: multi-photon Z pulses, all assumed detected.
    let n_multi_photon_upper = if p_multi > 0.0 { count_upper(n_pulses * params.p_z * p_multi, eps) } else { 0.0 };
    if stats.n_key_bits as f64 <= n_multi_photon_upper {
        return Err(KeyLengthError::NoSinglePhotons { n_multi_photon_upper, n_key_bits: stats.n_key_bits });
    }
    Ok(PhaseErrorBounds {
        plus_weight,
        score,
        plus_expected_upper,
        z_plus_expected_upper,
        score_variance_upper,
        score_deviation,
        multi_photon_correction,
        test_errors_expected_upper,
        test_errors_upper,
        n_test,
        n_key: stats.n_key_bits,
        n_multi_photon_upper,
        test_bad_upper: 0,
        key_bad_upper: 0,
        n_single_photon_lower: 0.0,
        test_rate_upper: 0.0,
        single_photon_rate_upper: 0.0,
    })
}

/// Steps 5 and 6 with at most `m_key` multi-photon pulses in the key sample.
fn bounds_with_tagged(shared: &PhaseErrorBounds, m_key: f64, eps: f64) -> Result<PhaseErrorBounds, KeyLengthError> {
    let (n_key, n_test) = (shared.n_key, shared.n_test);
    // The multi-photon count is an integer at most the real bound.
    let n_single_photon_lower = n_key as f64 - m_key.floor();
    if n_single_photon_lower <= 0.0 {
        return Err(KeyLengthError::NoSinglePhotons {
            n_multi_photon_upper: shared.n_multi_photon_upper,
            n_key_bits: n_key,
        });
    }
    // Bad test clicks: single-photon phase errors, an integer at most the real bound.
    let test_bad_upper = (shared.test_errors_upper.floor() as u64).min(n_test);
    let key_bad_upper = key_errors_upper(n_key, n_test, test_bad_upper, eps);
    let single_photon_rate_upper = (key_bad_upper as f64 / n_single_photon_lower).min(1.0);
    if single_photon_rate_upper >= MAX_PHASE_ERROR {
        return Err(KeyLengthError::PhaseErrorTooHigh { upper: single_photon_rate_upper, max: MAX_PHASE_ERROR });
    }
    Ok(PhaseErrorBounds {
        test_bad_upper,
        key_bad_upper,
        n_single_photon_lower,
        test_rate_upper: test_bad_upper as f64 / n_test as f64,
        single_photon_rate_upper,
        ..shared.clone()
    })
}

/// All the bounds of the phase-error estimate (module documentation, steps 1 to 6), with every
/// multi-photon pulse the bound M allows counted in the key sample; fails when the data are
/// missing, when multi-photon pulses may explain every key bit, or when the bound reaches
/// [`MAX_PHASE_ERROR`].
pub fn phase_error_bounds(stats: &BlockStats, params: &SecurityParams) -> Result<PhaseErrorBounds, KeyLengthError> {
    let shared = shared_bounds(stats, params)?;
    let eps = EpsBudget::from_total(params.eps_qkd).eps_pe_each;
    let m = shared.n_multi_photon_upper;
    bounds_with_tagged(&shared, m, eps)
}

/// The bounds with `m_key` multi-photon Z pulses known to be in the key sample (a simulation
/// that knows what its eavesdropper did uses this to check that the analysis never gives more
/// key than the actual split allows).
pub fn phase_error_bounds_at_split(
    stats: &BlockStats,
    params: &SecurityParams,
    m_key: f64,
) -> Result<PhaseErrorBounds, KeyLengthError> {
    let shared = shared_bounds(stats, params)?;
    let eps = EpsBudget::from_total(params.eps_qkd).eps_pe_each;
    bounds_with_tagged(&shared, m_key, eps)
}

/// Upper bound on the phase error rate (fraction) of the block's single-photon key bits, the
/// value that enters h() in the key-length formula (see [`phase_error_bounds`] for the steps).
pub fn phase_error_upper(stats: &BlockStats, params: &SecurityParams) -> Result<f64, KeyLengthError> {
    phase_error_bounds(stats, params).map(|bounds| bounds.single_photon_rate_upper)
}

/// The key length from given phase-error bounds (module documentation, step 6).
pub fn key_length_from_bounds(
    bounds: PhaseErrorBounds,
    stats: &BlockStats,
    params: &SecurityParams,
) -> Result<KeyLength, KeyLengthError> {
    let eps = EpsBudget::from_total(params.eps_qkd);
    let leak_verification_bits = TAG_BITS * u64::from(n_tags_for(stats.n_key_bits, eps.eps_cor));
    let pa_cost_bits = eps.pa_cost_bits();
    let length = bounds.entropy_bits() - stats.leak_ec_bits as f64 - leak_verification_bits as f64 - pa_cost_bits;
    if length < 1.0 {
        return Err(KeyLengthError::NoKeyLeft {
            length,
            n_single_photon_lower: bounds.n_single_photon_lower,
            phase_error_upper: bounds.single_photon_rate_upper,
            leak_bits: stats.leak_ec_bits + leak_verification_bits,
        });
    }
    Ok(KeyLength {
        final_bits: length.floor() as u64,
        bounds,
        qber_x: stats.x_counts.qber_x(),
        eps,
        leak_ec_bits: stats.leak_ec_bits,
        leak_verification_bits,
        pa_cost_bits,
        mu_max: params.mu_max,
        g2_max: params.g2_max,
    })
}

/// Secret key length of a block (module documentation, step 6):
/// l = floor( n_Z1 (1 - h(phi_1)) - leak_EC - leak_tags - 2 log2(1 / (2 eps_PA)) ), with n_Z1
/// and phi_1 from [`phase_error_bounds`].
/// Every `Err` is an abort with a reason that can be logged as is.
pub fn secret_key_length(stats: &BlockStats, params: &SecurityParams) -> Result<KeyLength, KeyLengthError> {
    key_length_from_bounds(phase_error_bounds(stats, params)?, stats, params)
}

#[cfg(test)]
mod tests;
