//! Parameter estimation and secret key length of the three-state time-bin protocol.
//!
//! Alice sends |E> or |L> (Z basis, the key) with probability p_Z / 2 each and |+> with
//! probability 1 - p_Z; |-> is never sent. Bob measures Z (arrival time) or X (interferometer,
//! outcomes + and -). Key bits come from Z-sent, Z-measured clicks; the test data are Bob's
//! X-measured clicks, for which Alice reveals her state, counted in [`XCounts`].
//!
//! # The estimate, step by step
//! Every count below is a sum over the block's pulses of per-pulse indicators; "expected" means
//! the sum of the per-pulse probabilities. Alice's state choice is random per pulse (|E>, |L>
//! with probability p_Z / 2 each, |+> with p_X = 1 - p_Z), and the source's photon-number
//! distribution does not depend on the state.
//!
//! 1. Phase error by linearity, for the pulses with at most one photon. For vacuum and single
//!    photons |E><E| + |L><L| = |+><+| + |-><-|, so a Z-sent pulse is a 50/50 mixture of |+> and
//!    the never-sent |->, whose yield is Y(+|-) = Y(+|E) + Y(+|L) - Y(+|+). With Y(b|s) the
//!    probability that Bob measures X, gets b and clicks given state s, the expected number of
//!    phase errors among the Z-sent, X-measured clicks of pulses with at most one photon is
//!    N p_Z / 2 [Y(-|+) + Y(+|E) + Y(+|L) - Y(+|+)] (the Z-state analogue of the phase-error
//!    estimate of Tamaki et al., PRA 90, 052314 (2014), and Rusca et al., PRA 98, 052336
//!    (2018), for this protocol); 0 for an ideal channel, (1 - V)/2 of the test clicks for
//!    visibility V. In counts: with r = p_Z / (2 p_X) and the per-pulse score
//!    X_i = r [(+ sent, - seen)] - r [(+ sent, + seen)] + [(E or L sent, + seen)], this is
//!    E(sum X_i) + N (p_Z / 2) p_multi: the last term is the multi-photon part of the subtracted
//!    Y(+|+) term (each |+> pulse holds two photons with probability p_multi <= mu^2 g2 / 2 and
//!    then clicks + with probability at most 1; GLLP, QIC 4, 325 (2004)). The ratio r is the
//!    ratio of Alice's state probabilities, not of realised pulse numbers, so no pulse count is
//!    approximated.
//! 2. Finite size. Bernstein's inequality for independent variables with -X_i <= r
//!    (Boucheron, Lugosi & Massart, *Concentration Inequalities*, OUP 2013, Theorem 2.10 and
//!    Corollary 2.11) bounds the expectation of the observed score
//!    S = sum X_i = r (plus_minus - plus_plus) + e_plus + l_plus:
//!    E(S) <= S + sqrt(2 v beta) + r beta / 3 with beta = ln(1/eps)
//!    and v >= sum E(X_i^2) = r^2 E(plus_plus + plus_minus) + E(e_plus + l_plus); the two
//!    expectations in v are bounded by the Chernoff bound of Yin et al., Sci. Rep. 10, 14312
//!    (2020): E(x) <= x + beta + sqrt(2 beta x + beta^2). Bounding the weighted sum once, rather
//!    than each of its three counts separately, avoids adding three worst cases (with p_Z = 0.9
//!    the |+> counts enter with weight r = 4.5). The expected number of phase errors then gives
//!    the actual number by the expected-to-observed Chernoff bound x <= mu + beta/2 +
//!    sqrt(2 beta mu + beta^2/4) (Yin et al. 2020).
//! 3. Multi-photon tagging (GLLP). The number of multi-photon Z pulses is at most M, the
//!    expected-to-observed bound on its mean N p_Z p_multi; every one is assumed detected and
//!    known to Eve. They may sit in the key sample (m_key) or in the test sample (m_test), with
//!    m_key + m_test <= M, so the single-photon key has n_key - m_key bits and the single-photon
//!    test sample n_test - m_test clicks.
//! 4. From the test sample to the key sample (random sampling without replacement, over the
//!    Z-sent clicks of pulses with at most one photon, split by Bob's passive basis choice):
//!    phi_1 <= e_test + gamma(n_key - m_key, n_test - m_test, e_test, eps), with
//!    e_test = errors / (n_test - m_test), see [`sampling_gamma`].
//! 5. Key length (Rusca et al., APL 112, 171104 (2018), one-decoy bound, with the single-photon
//!    terms of Lim et al., PRA 89, 022307 (2014)):
//!    l = floor( n_Z1 (1 - h(phi_1)) - leak_EC - 6 log2(19/eps_sec) - log2(2/eps_cor) ),
//!    with vacuum contributions dropped (conservative) and leak_EC the bits actually disclosed,
//!    minimised over the unknown split of step 3: n_Z1 (1 - h(phi_1)) grows with both
//!    n_Z1 = n_key - m_key and n_test - m_test, so evaluating every cell of a grid over m_key at
//!    its worst corner gives a lower bound on the minimum ([`SPLIT_GRID_CELLS`] cells).
//!
//! Each of the [`N_PE_BOUNDS`] bounds above fails with probability at most `eps_pe`, so the
//! estimate adds at most `N_PE_BOUNDS * eps_pe` to the failure probability of the protocol.
//! Like the Chernoff bounds of Yin et al., Bernstein's inequality is stated for independent
//! pulses; Freedman's inequality (Ann. Probab. 3, 100 (1975)) gives the same form for
//! martingales.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::binary_entropy;

/// Number of statistical bounds in the estimate, each failing with probability at most `eps_pe`:
/// the two Chernoff bounds on the second moment of the score, Bernstein's bound on the score, the
/// expected-to-observed phase-error bound, the multi-photon bound and the random-sampling bound
/// (module documentation, steps 2 to 4).
pub const N_PE_BOUNDS: u32 = 6;

/// Number of cells of the grid over the unknown split of the multi-photon pulses between the key
/// and the test sample (module documentation, step 5).
pub const SPLIT_GRID_CELLS: u32 = 64;

/// Phase error (fraction) at or above which the block is aborted: h(phi) reaches 1 there.
pub const MAX_PHASE_ERROR: f64 = 0.5;

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

/// Security parameters and source description for the key-length formula.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SecurityParams {
    /// Secrecy parameter of the final key (probability-like, dimensionless), default 1e-10.
    pub eps_sec: f64,
    /// Correctness parameter (probability that the keys differ after verification), default
    /// 1e-15; it must be at least the verification hash's collision probability.
    pub eps_cor: f64,
    /// Failure probability of each statistical bound of the estimate (there are
    /// [`N_PE_BOUNDS`]), default 1e-11.
    pub eps_pe: f64,
    /// Second-order autocorrelation g2(0) of the source, dimensionless; default 0.0085 (the
    /// reference experiment's quantum dot, a secondary-source value).
    pub g2: f64,
    /// Mean photon number per pulse leaving Alice's lab, dimensionless; default 0.01 (a
    /// placeholder: the reference experiment does not publish it).
    pub mu: f64,
    /// Probability that Alice sends a Z-basis state (|E> or |L>), dimensionless; default 0.5.
    pub p_z: f64,
}

impl Default for SecurityParams {
    fn default() -> Self {
        Self { eps_sec: 1e-10, eps_cor: 1e-15, eps_pe: 1e-11, g2: 0.0085, mu: 0.01, p_z: 0.5 }
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
    /// Bits disclosed by error correction and verification: Cascade parities plus the 64-bit tag.
    pub leak_ec_bits: u64,
}

/// The intermediate bounds of the phase-error estimate (module documentation, steps 1 to 5).
#[derive(Clone, Debug, PartialEq)]
pub struct PhaseErrorBounds {
    /// Weight r = p_Z / (2 p_X) of the |+> counts in the score (dimensionless).
    pub plus_weight: f64,
    /// Observed score S = r (plus_minus - plus_plus) + e_plus + l_plus (may be negative).
    pub score: f64,
    /// Upper bound on the second moment of the score, r^2 E[plus_plus + plus_minus] +
    /// E[e_plus + l_plus].
    pub score_second_moment_upper: f64,
    /// Bound on the multi-photon part of the subtracted Y(+|+) term, N (p_Z / 2) p_multi, in
    /// expected phase errors.
    pub multi_photon_correction: f64,
    /// Upper bound on the expected number of phase errors among the test sample's clicks from
    /// pulses with at most one photon.
    pub test_errors_expected_upper: f64,
    /// Upper bound on the actual number of those phase errors.
    pub test_errors_upper: f64,
    /// Test sample size: X-measured clicks from Z-basis states.
    pub n_test: u64,
    /// Upper bound M on the number of multi-photon Z pulses (all counted as detected).
    pub n_multi_photon_upper: f64,
    /// Lower bound on the single-photon test clicks at the worst split of the M multi-photon
    /// pulses.
    pub n_test_single_photon_lower: f64,
    /// Upper bound on the single-photon test sample's phase error rate at the worst split
    /// (fraction).
    pub test_rate_upper: f64,
    /// Random-sampling correction from the test sample to the key sample at the worst split
    /// (fraction).
    pub sampling_gamma: f64,
    /// Lower bound on the number of single-photon key bits at the worst split.
    pub n_single_photon_lower: f64,
    /// Upper bound on the phase error rate of the single-photon key bits at the worst split
    /// (fraction): the value that enters the key-length formula.
    pub single_photon_rate_upper: f64,
}

/// The secret key length of a block and the bounds it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct KeyLength {
    /// Length of the final key, in bits (the Toeplitz output length).
    pub final_bits: u64,
    /// Upper bound on the single-photon phase error rate (fraction).
    pub phase_error_upper: f64,
    /// Lower bound on the number of single-photon key bits.
    pub n_single_photon_lower: f64,
    /// Upper bound on the single-photon test sample's phase error rate, before the sampling
    /// correction (fraction).
    pub phase_error_test_upper: f64,
    /// Upper bound on the number of multi-photon Z pulses.
    pub n_multi_photon_upper: f64,
    /// Bits deducted for error correction and verification.
    pub leak_ec_bits: u64,
    /// Bits deducted for the security parameters: 6 log2(19/eps_sec) + log2(2/eps_cor).
    pub security_cost_bits: f64,
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
         phase error {phase_error_upper:.4}, leak {leak_ec_bits} bits)"
    )]
    NoKeyLeft {
        /// The value of the formula before the floor, in bits.
        length: f64,
        /// Lower bound on the single-photon key bits.
        n_single_photon_lower: f64,
        /// Upper bound on the single-photon phase error rate (fraction).
        phase_error_upper: f64,
        /// Bits disclosed by error correction and verification.
        leak_ec_bits: u64,
    },
}

/// Upper bound on the expectation of a sum of Bernoulli variables observed to be `observed`,
/// failing with probability at most e^(-beta) (Yin et al., Sci. Rep. 10, 14312 (2020), the
/// observed-to-expected form of their Chernoff bound; checked against two independent
/// implementations, equation number not verified): x + beta + sqrt(2 beta x + beta^2).
pub fn chernoff_expected_upper(observed: f64, beta: f64) -> f64 {
    observed + beta + (2.0 * beta * observed + beta * beta).sqrt()
}

/// Lower bound on the expectation of a sum of Bernoulli variables observed to be `observed`,
/// failing with probability at most e^(-beta) (Yin et al. 2020, as [`chernoff_expected_upper`]):
/// max(x - beta/2 - sqrt(2 beta x + beta^2 / 4), 0).
pub fn chernoff_expected_lower(observed: f64, beta: f64) -> f64 {
    (observed - beta / 2.0 - (2.0 * beta * observed + beta * beta / 4.0).sqrt()).max(0.0)
}

/// Upper bound on the observed value of a sum of Bernoulli variables of expectation `expected`,
/// failing with probability at most e^(-beta) (Yin et al. 2020, expected-to-observed form; it is
/// the multiplicative Chernoff bound P(X >= (1 + d) mu) <= exp(-d^2 mu / (2 + d)) solved for
/// (1 + d) mu): mu + beta/2 + sqrt(2 beta mu + beta^2 / 4).
pub fn chernoff_observed_upper(expected: f64, beta: f64) -> f64 {
    expected + beta / 2.0 + (2.0 * beta * expected + beta * beta / 4.0).sqrt()
}

/// Upper bound on the expectation of a sum S of independent variables X_i with -X_i <= `range`
/// (`range` > 0) and sum E[X_i^2] <= `second_moment`, observed to be `observed`, failing with
/// probability at most e^(-beta): Bernstein's inequality applied to -X_i (Boucheron, Lugosi &
/// Massart, *Concentration Inequalities*, OUP 2013, Theorem 2.10 with Corollary 2.11:
/// P(sum (Y_i - E Y_i) >= sqrt(2 v t) + b t / 3) <= e^(-t) for independent Y_i <= b and
/// v = sum E[Y_i^2]): S + sqrt(2 beta v) + range beta / 3.
pub fn bernstein_expected_upper(observed: f64, second_moment: f64, range: f64, beta: f64) -> f64 {
    observed + (2.0 * beta * second_moment.max(0.0)).sqrt() + range * beta / 3.0
}

/// Random-sampling correction
/// gamma(n, k, lambda, eps) = sqrt( (n + k) lambda (1 - lambda) / (n k) ln( (n + k) / (2 pi n k
/// lambda (1 - lambda) eps^2) ) ), the two factors under the root multiplied: with probability at
/// least 1 - eps,
/// the error rate of the n unobserved bits of a random split of n + k bits exceeds the rate
/// lambda observed on the k others by at most gamma.
///
/// This is the form with 2 pi that Fung, Ma & Chau derived for sampling without replacement
/// (PRA 81, 012318 (2010)) and that the project's notes attribute to Lim et al., PRA 89, 022307
/// (2014); Lim et al. use the analogous Serfling-based gamma(a, b, c, d) with 21^2 / eps^2 in the
/// logarithm. Neither equation number could be checked against the papers' text here. Returns 0
/// when the logarithm is not positive, and treats lambda outside (0, 1/2] by clamping it to
/// [1e-12, 1/2].
pub fn sampling_gamma(n: f64, k: f64, lambda: f64, eps: f64) -> f64 {
    let lambda = lambda.clamp(1e-12, 0.5);
    let variance = lambda * (1.0 - lambda);
    let log_term = ((n + k) / (2.0 * std::f64::consts::PI * n * k * variance * eps * eps)).ln();
    if log_term <= 0.0 {
        return 0.0;
    }
    ((n + k) * variance / (n * k) * log_term).sqrt()
}

fn validate(params: &SecurityParams) -> Result<(), KeyLengthError> {
    let in_unit = |x: f64| x > 0.0 && x < 1.0;
    if !in_unit(params.eps_sec) || !in_unit(params.eps_cor) || !in_unit(params.eps_pe) {
        return Err(KeyLengthError::InvalidParams { reason: "epsilons must lie in (0, 1)" });
    }
    if !in_unit(params.p_z) {
        return Err(KeyLengthError::InvalidParams { reason: "p_z must lie in (0, 1)" });
    }
    if !(params.mu >= 0.0 && params.g2 >= 0.0 && params.mu.is_finite() && params.g2.is_finite()) {
        return Err(KeyLengthError::InvalidParams { reason: "mu and g2 must be finite and >= 0" });
    }
    Ok(())
}

/// The bounds of steps 1 to 3, shared by every split of the multi-photon pulses; the fields of
/// steps 4 and 5 are left at 0.
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
    let beta = (1.0 / params.eps_pe).ln();
    let n_pulses = stats.n_pulses as f64;
    let p_multi = params.mu * params.mu * params.g2 / 2.0;

    // Steps 1-2: the score, Bernstein's bound on its expectation, and the multi-photon part of
    // the subtracted |+> term.
    let plus_weight = params.p_z / (2.0 * (1.0 - params.p_z));
    let z_plus = (counts.e_plus + counts.l_plus) as f64;
    let score = plus_weight * (counts.plus_minus as f64 - counts.plus_plus as f64) + z_plus;
    let score_second_moment_upper =
        plus_weight * plus_weight * chernoff_expected_upper(counts.n_plus_sent() as f64, beta)
            + chernoff_expected_upper(z_plus, beta);
    let multi_photon_correction = n_pulses * params.p_z / 2.0 * p_multi;
    let test_errors_expected_upper = (bernstein_expected_upper(score, score_second_moment_upper, plus_weight, beta)
        + multi_photon_correction)
        .max(0.0);
    let test_errors_upper = chernoff_observed_upper(test_errors_expected_upper, beta).min(n_test as f64);

    // Step 3: multi-photon Z pulses, all assumed detected.
    let n_multi_photon_upper =
        if p_multi > 0.0 { chernoff_observed_upper(n_pulses * params.p_z * p_multi, beta) } else { 0.0 };
    let n_key = stats.n_key_bits as f64;
    if n_key <= n_multi_photon_upper || n_test as f64 <= n_multi_photon_upper {
        return Err(KeyLengthError::NoSinglePhotons { n_multi_photon_upper, n_key_bits: stats.n_key_bits });
    }
    let worst_test_rate = test_errors_upper / (n_test as f64 - n_multi_photon_upper);
    if worst_test_rate >= MAX_PHASE_ERROR {
        return Err(KeyLengthError::PhaseErrorTooHigh { upper: worst_test_rate, max: MAX_PHASE_ERROR });
    }
    Ok(PhaseErrorBounds {
        plus_weight,
        score,
        score_second_moment_upper,
        multi_photon_correction,
        test_errors_expected_upper,
        test_errors_upper,
        n_test,
        n_multi_photon_upper,
        n_test_single_photon_lower: 0.0,
        test_rate_upper: 0.0,
        sampling_gamma: 0.0,
        n_single_photon_lower: 0.0,
        single_photon_rate_upper: 0.0,
    })
}

/// Steps 4 and 5 for `m_key` multi-photon pulses in the key sample and `m_test` in the test
/// sample, from the shared bounds and the block's `n_key` sifted bits.
fn bounds_at_split(
    shared: &PhaseErrorBounds,
    n_key: f64,
    m_key: f64,
    m_test: f64,
    eps_pe: f64,
) -> Result<PhaseErrorBounds, KeyLengthError> {
    let n_single_photon_lower = n_key - m_key;
    let n_test_single_photon_lower = shared.n_test as f64 - m_test;
    if n_single_photon_lower <= 0.0 || n_test_single_photon_lower <= 0.0 {
        return Err(KeyLengthError::NoSinglePhotons {
            n_multi_photon_upper: shared.n_multi_photon_upper,
            n_key_bits: n_key as u64,
        });
    }
    let test_rate_upper = shared.test_errors_upper / n_test_single_photon_lower;
    let gamma = sampling_gamma(n_single_photon_lower, n_test_single_photon_lower, test_rate_upper, eps_pe);
    let single_photon_rate_upper = test_rate_upper + gamma;
    if single_photon_rate_upper >= MAX_PHASE_ERROR {
        return Err(KeyLengthError::PhaseErrorTooHigh { upper: single_photon_rate_upper, max: MAX_PHASE_ERROR });
    }
    Ok(PhaseErrorBounds {
        n_test_single_photon_lower,
        test_rate_upper,
        sampling_gamma: gamma,
        n_single_photon_lower,
        single_photon_rate_upper,
        ..shared.clone()
    })
}

/// All the bounds of the phase-error estimate (module documentation, steps 1 to 5) at the split of
/// the multi-photon pulses that leaves the least secret key; fails when the data are missing,
/// when multi-photon pulses may explain every key bit or test click, or when the bound reaches
/// [`MAX_PHASE_ERROR`].
pub fn phase_error_bounds(stats: &BlockStats, params: &SecurityParams) -> Result<PhaseErrorBounds, KeyLengthError> {
    let shared = shared_bounds(stats, params)?;
    let (n_key, m) = (stats.n_key_bits as f64, shared.n_multi_photon_upper);
    // Steps 4-5: the worst split of the multi-photon pulses between key and test sample. Each
    // grid cell [lo, hi] of m_key is evaluated at its worst corner: m_key = hi in the key and
    // m_test = M - lo in the test sample.
    let cells = f64::from(SPLIT_GRID_CELLS);
    let mut worst: Option<(f64, PhaseErrorBounds)> = None;
    for cell in 0..SPLIT_GRID_CELLS {
        let m_key = m * (f64::from(cell) + 1.0) / cells;
        let m_test = m * (1.0 - f64::from(cell) / cells);
        let bounds = bounds_at_split(&shared, n_key, m_key, m_test, params.eps_pe)?;
        let secret = bounds.n_single_photon_lower * (1.0 - binary_entropy(bounds.single_photon_rate_upper));
        if worst.as_ref().is_none_or(|(least, _)| secret < *least) {
            worst = Some((secret, bounds));
        }
    }
    Ok(worst.expect("SPLIT_GRID_CELLS > 0: the grid has a cell").1)
}

/// The bounds of steps 1 to 5 for a given split: `m_key` multi-photon Z pulses in the key sample
/// and `m_test` in the test sample. [`phase_error_bounds`] takes the worst split allowed by the
/// multi-photon bound M; this one lets a simulation that knows the actual split (an eavesdropper
/// who split those pulses) check that the key length at the worst split never exceeds the one at
/// the actual split.
pub fn phase_error_bounds_at_split(
    stats: &BlockStats,
    params: &SecurityParams,
    m_key: f64,
    m_test: f64,
) -> Result<PhaseErrorBounds, KeyLengthError> {
    let shared = shared_bounds(stats, params)?;
    bounds_at_split(&shared, stats.n_key_bits as f64, m_key, m_test, params.eps_pe)
}

/// Upper bound on the phase error rate (fraction) of the block's single-photon key bits, the
/// value that enters h() in the key-length formula (see [`phase_error_bounds`] for the steps).
pub fn phase_error_upper(stats: &BlockStats, params: &SecurityParams) -> Result<f64, KeyLengthError> {
    phase_error_bounds(stats, params).map(|bounds| bounds.single_photon_rate_upper)
}

/// Bits the security parameters cost: 6 log2(19/eps_sec) + log2(2/eps_cor) (Rusca et al., APL
/// 112, 171104 (2018), one-decoy key length).
pub fn security_cost_bits(params: &SecurityParams) -> f64 {
    6.0 * (19.0 / params.eps_sec).log2() + (2.0 / params.eps_cor).log2()
}

/// Secret key length of a block (module documentation, step 5):
/// l = floor( n_Z1 (1 - h(phi_1)) - leak_EC - 6 log2(19/eps_sec) - log2(2/eps_cor) ), with n_Z1
/// and phi_1 at the worst split of the multi-photon pulses ([`phase_error_bounds`]).
/// Every `Err` is an abort with a reason that can be logged as is.
pub fn secret_key_length(stats: &BlockStats, params: &SecurityParams) -> Result<KeyLength, KeyLengthError> {
    let bounds = phase_error_bounds(stats, params)?;
    let security_cost = security_cost_bits(params);
    // Rusca et al. 2018 (one-decoy), single-photon terms as in Lim et al. 2014, vacuum dropped.
    let length = bounds.n_single_photon_lower * (1.0 - binary_entropy(bounds.single_photon_rate_upper))
        - stats.leak_ec_bits as f64
        - security_cost;
    if length < 1.0 {
        return Err(KeyLengthError::NoKeyLeft {
            length,
            n_single_photon_lower: bounds.n_single_photon_lower,
            phase_error_upper: bounds.single_photon_rate_upper,
            leak_ec_bits: stats.leak_ec_bits,
        });
    }
    Ok(KeyLength {
        final_bits: length.floor() as u64,
        phase_error_upper: bounds.single_photon_rate_upper,
        n_single_photon_lower: bounds.n_single_photon_lower,
        phase_error_test_upper: bounds.test_rate_upper,
        n_multi_photon_upper: bounds.n_multi_photon_upper,
        leak_ec_bits: stats.leak_ec_bits,
        security_cost_bits: security_cost,
    })
}

#[cfg(test)]
mod tests;
