//! Bob's estimate of where the remaining errors are, which places the splits of his binary
//! searches.
//!
//! A binary search costs one parity per level, so it pays to split a range where the odd error is
//! equally likely to lie on either side rather than in the middle of its positions. After pass 1
//! Bob knows much about where errors are: a bit he corrected is now right, and the bits of a
//! pass-1 block that had c corrections and is even again hold on average
//! E[T - c | T >= c, T = c mod 2] / (k1 - c) errors each, T ~ Binomial(k1, Q) being the block's
//! initial number of errors (the remaining errors of a block that was even from the start come in
//! pairs, and are about three times denser at high QBER than those of a block that was odd and
//! had its error fixed). [`ErrorDensity::median_cut`] splits a range at the weighted median of
//! these probabilities. Measured effect on the leak: docs/postprocessing.md.

/// Smallest error probability of the density table (positive: 0 marks corrected bits).
const MIN_DENSITY: f32 = 1e-12;

/// Largest number of corrections per pass-1 block that the error-density table distinguishes.
pub(super) const MAX_TABLE_CORRECTIONS: usize = 24;

/// Bob's estimate of where the remaining errors are (see the module documentation).
pub(super) struct ErrorDensity {
    /// Per class: the error probability of a bit of that class. Classes 0 to
    /// [`MAX_TABLE_CORRECTIONS`] are the uncorrected bits of a pass-1 block with that many
    /// corrections (floored at a tiny positive number); [`CORRECTED`] weighs exactly 0.
    per_class: [f32; 256],
    /// Per pass-1 block: the number of corrections made in it.
    pub(super) corrections: Vec<u32>,
    /// Per original bit: its class (one byte a bit, so that the table costs a quarter of a
    /// per-bit probability).
    class: Vec<u8>,
}

/// The class of a corrected bit (see [`ErrorDensity`]).
const CORRECTED: u8 = u8::MAX;
const _: () = assert!(MAX_TABLE_CORRECTIONS < CORRECTED as usize);

impl ErrorDensity {
    /// The estimate before any correction, for a QBER estimate `qber`, pass-1 blocks of `k1`
    /// bits and a key of `n_bits` bits.
    pub(super) fn new(qber: f64, k1: usize, n_bits: usize) -> Self {
        let mut per_class = [0.0f32; 256];
        for (c, density) in residual_error_density(qber, k1).into_iter().enumerate() {
            per_class[c] = density;
        }
        Self { per_class, corrections: vec![0; n_bits.div_ceil(k1.max(1))], class: vec![0; n_bits] }
    }

    /// The current error probability of original bit `i`.
    #[inline]
    fn weight(&self, i: u32) -> f32 {
        self.per_class[usize::from(self.class[i as usize])]
    }

    /// True when original bit `original` was corrected (a corrected bit is known to be right).
    #[inline]
    pub(super) fn is_corrected(&self, original: u32) -> bool {
        self.class[original as usize] == CORRECTED
    }

    /// Records the correction of original bit `original`, which lies in pass-1 block `block`
    /// whose bits are `block_bits` (original indices): the bit weighs 0 from now on, and the
    /// block's uncorrected bits move to the class of its new number of corrections.
    pub(super) fn record_correction(&mut self, original: usize, block: usize, block_bits: &[u32]) {
        self.corrections[block] += 1;
        let c = (self.corrections[block] as usize).min(MAX_TABLE_CORRECTIONS) as u8;
        self.class[original] = CORRECTED;
        for &i in block_bits {
            let class = &mut self.class[i as usize];
            if *class != CORRECTED {
                *class = c;
            }
        }
    }

    /// Where to cut the range whose bits are `originals` (original indices, in the pass's
    /// order; at least 2 bits) so that the error probability is split evenly: the number of
    /// bits left of the cut, at the first cut where the left mass reaches half or the one before
    /// it if closer. None when the bits weigh nothing.
    pub(super) fn median_cut(&self, originals: &[u32]) -> Option<usize> {
        /// Weights summed per chunk first, so that the sums run in parallel.
        const CHUNK: usize = 16;
        let chunk_sums: Vec<f32> =
            originals.chunks(CHUNK).map(|chunk| chunk.iter().map(|&i| self.weight(i)).sum()).collect();
        let total: f32 = chunk_sums.iter().sum();
        if total > 0.0 {
            let mut acc = 0.0f32;
            let mut chunk = 0;
            while chunk + 1 < chunk_sums.len() && 2.0 * (acc + chunk_sums[chunk]) < total {
                acc += chunk_sums[chunk];
                chunk += 1;
            }
            for (j, &i) in originals.iter().enumerate().skip(chunk * CHUNK) {
                let before = acc;
                acc += self.weight(i);
                if 2.0 * acc >= total || j + 1 == originals.len() {
                    let take_before = j > 0 && total - 2.0 * before < 2.0 * acc - total;
                    return Some(if take_before { j } else { j + 1 });
                }
            }
        }
        None
    }
}

/// Per number of corrections c (0 to [`MAX_TABLE_CORRECTIONS`]): the probability that an
/// uncorrected bit of a `k`-bit block with c corrections and even parity (as Alice's) is wrong,
/// E[T - c | T >= c, T = c mod 2] / (k - c) with T ~ Binomial(k, q).
pub(super) fn residual_error_density(q: f64, k: usize) -> Vec<f32> {
    let q = q.clamp(1e-6, 0.5);
    // Binomial pmf by the ratio recurrence, in logs to survive k up to thousands.
    let mut ln_pmf = Vec::with_capacity(k + 1);
    let mut ln = k as f64 * (1.0 - q).ln();
    ln_pmf.push(ln);
    for t in 0..k {
        ln += ((k - t) as f64 / (t + 1) as f64).ln() + (q / (1.0 - q)).ln();
        ln_pmf.push(ln);
    }
    let max_ln = ln_pmf.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let pmf: Vec<f64> = ln_pmf.iter().map(|l| (l - max_ln).exp()).collect();
    (0..=MAX_TABLE_CORRECTIONS)
        .map(|c| {
            if c >= k {
                return MIN_DENSITY;
            }
            let (mut mass, mut residual) = (0.0, 0.0);
            for t in (c..=k).step_by(2) {
                mass += pmf[t];
                residual += (t - c) as f64 * pmf[t];
            }
            let density = if mass > 0.0 { residual / mass / (k - c) as f64 } else { 0.0 };
            (density as f32).max(MIN_DENSITY)
        })
        .collect()
}
