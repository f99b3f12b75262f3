//! The family of codes for one key length, one per mother rate, and the choice of the code and
//! of the initial puncturing that start a blind reconciliation (see "Rate adaptation and blind
//! protocol" in the parent module's documentation).

use std::sync::OnceLock;

use super::code::LdpcCode;
use crate::postproc::binary_entropy;

/// Mother code rates available (rate of the mother code over all its columns).
pub const MOTHER_RATES: [f64; 12] = [0.40, 0.45, 0.50, 0.55, 0.60, 0.65, 0.70, 0.75, 0.80, 0.85, 0.90, 0.95];

/// Adaptation bits per key bit of the codes of an [`LdpcFamily`].
const ADAPTATION: f64 = 0.1;

/// The codes of every mother rate in [`MOTHER_RATES`] for one key length, built on first use
/// (a construction is costly, so a link builds its family once; timings:
/// docs/postprocessing.md).
pub struct LdpcFamily {
    key_bits: usize,
    codes: Vec<OnceLock<LdpcCode>>,
}

impl LdpcFamily {
    /// The family for `key_bits`-bit keys, adaptation bits about 10 % of the key.
    pub fn new(key_bits: usize) -> Self {
        Self { key_bits, codes: MOTHER_RATES.iter().map(|_| OnceLock::new()).collect() }
    }

    /// Length of the keys, in bits.
    pub fn key_bits(&self) -> usize {
        self.key_bits
    }

    /// The code of mother rate `MOTHER_RATES[rate_index]`.
    pub fn code(&self, rate_index: usize) -> &LdpcCode {
        self.codes[rate_index].get_or_init(|| LdpcCode::new(self.key_bits, MOTHER_RATES[rate_index], ADAPTATION))
    }

    /// The start of a blind reconciliation for Bob's QBER estimate (floored at 0.5 %): the
    /// highest-rate mother code that can start at a leak of `start_efficiency` n h(Q) with at
    /// least half its adaptation bits left to reveal, and the number of adaptation bits to
    /// puncture for that start. Returns (rate index, punctured bits).
    pub fn select(&self, qber_estimate: f64, start_efficiency: f64) -> (usize, usize) {
        self.select_for_length(qber_estimate, start_efficiency, self.key_bits)
    }

    /// [`LdpcFamily::select`] for a key of `n_bits` bits (at most the family's length; the
    /// missing bits are shortened, zeros known to both ends): the start leak is
    /// `start_efficiency` n_bits h(Q), so a short last frame pays only for its own bits.
    pub fn select_for_length(&self, qber_estimate: f64, start_efficiency: f64, n_bits: usize) -> (usize, usize) {
        let q = if qber_estimate.is_nan() { 0.005 } else { qber_estimate.clamp(0.005, 0.3) };
        let target = start_efficiency * n_bits.min(self.key_bits) as f64 * binary_entropy(q);
        for index in (0..MOTHER_RATES.len()).rev() {
            let code = self.code(index);
            let (m, d) = (code.n_checks() as f64, code.n_adaptation() as f64);
            if m >= target + 0.5 * d || index == 0 {
                let punctured = (m - target).clamp(0.0, d) as usize;
                return (index, punctured);
            }
        }
        (0, 0)
    }
}

/// A starting efficiency for the blind protocol at QBER `qber` (fraction): a little below the
/// decoding threshold of this module's codes at 2^14 bits (the measured thresholds:
/// docs/postprocessing.md), so that most frames need one or two reveals and few pay for more
/// than they need.
pub fn default_start_efficiency(qber: f64) -> f64 {
    const POINTS: [(f64, f64); 6] =
        [(0.01, 1.30), (0.02, 1.22), (0.03, 1.17), (0.05, 1.12), (0.08, 1.08), (0.11, 1.06)];
    let q = qber.clamp(POINTS[0].0, POINTS[POINTS.len() - 1].0);
    for w in POINTS.windows(2) {
        let ((q0, f0), (q1, f1)) = (w[0], w[1]);
        if q <= q1 {
            return f0 + (f1 - f0) * (q - q0) / (q1 - q0);
        }
    }
    POINTS[POINTS.len() - 1].1
}
