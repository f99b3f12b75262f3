//! The pass schedule: how many passes Cascade makes and the block size of each (the optimized
//! schedule of Martinez-Mateo et al., see "Schedule" in the parent module's documentation).

/// Number of Cascade passes (the optimized schedule uses 14).
pub const N_PASSES: u32 = 14;

/// Smallest QBER estimate (dimensionless) used to choose the block sizes.
pub const QBER_FLOOR: f64 = 0.001;

/// Block size of the third pass, in bits (Martinez-Mateo et al., optimized schedule).
const K3_BITS: usize = 4096;

/// Keys longer than this (bits) get the intermediate passes of 2^14 and 2^16 bits.
const LONG_KEY_BITS: usize = 1 << 16;

/// Block sizes (bits) of the [`N_PASSES`] passes for a QBER estimate and a key of `n_bits` bits,
/// following the optimized schedule described in the module documentation.
pub fn block_sizes(qber_estimate: f64, n_bits: usize) -> Vec<usize> {
    let q = clamped_qber(qber_estimate);
    // Martinez-Mateo et al. (arXiv:1407.3257), optimized Cascade: alpha = ceil(log2(1/Q) - 1/2),
    // k1 = 2^alpha, k2 = 2^ceil((alpha + 12) / 2) (rounded down here, see the module
    // documentation), k3 = 4096, then n/2.
    let alpha = ((1.0 / q).log2() - 0.5).ceil().max(1.0) as u32;
    let k1 = 1usize << alpha;
    let mut k2_log = (alpha + 12) / 2;
    if alpha == 4 && q >= 0.07 {
        k2_log -= 1;
    }
    let k2 = 1usize << k2_log;
    let long = n_bits > LONG_KEY_BITS;
    let max_size = n_bits.max(1);
    (0..N_PASSES)
        .map(|pass| match pass {
            0 => k1,
            1 => k2,
            2 => K3_BITS,
            3 if long => 1 << 14,
            4 if long => 1 << 16,
            _ => n_bits / 2,
        })
        .map(|k| k.clamp(1, max_size))
        .collect()
}

/// The QBER estimate used for the schedule: NaN becomes [`QBER_FLOOR`], the rest is clamped to
/// [`QBER_FLOOR`, 0.5].
pub(super) fn clamped_qber(qber_estimate: f64) -> f64 {
    if qber_estimate.is_nan() { QBER_FLOOR } else { qber_estimate.clamp(QBER_FLOOR, 0.5) }
}

/// The first pass (0-based) whose shuffle is a random split rather than a Fisher-Yates shuffle:
/// the first pass of [`block_sizes`] whose blocks are n/2 bits (3, or 5 for keys of more than
/// 2^16 bits). It depends only on the key length, which Alice knows, not on Bob's QBER estimate.
pub fn first_split_pass(n_bits: usize) -> u32 {
    if n_bits > LONG_KEY_BITS { 5 } else { 3 }
}
