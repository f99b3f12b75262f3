//! Post-processing stages of the QKD link: pure maths, no IO, no clock, randomness injected.
//!
//! * [`cascade`]: interactive error correction (optimized Cascade); Bob drives, Alice answers
//!   parity queries; [`MultiCascadeBob`] merges many frames into one exchange.
//! * [`ldpc`]: one-way alternative, blind rate-adaptive reconciliation with quasi-cyclic LDPC
//!   codes (syndrome from Alice, layered min-sum at Bob, punctured bits revealed on demand).
//! * [`verify`]: the verification check, a polynomial universal hash over GF(2^64) of the
//!   corrected block, which gives the `eps_cor` of the key-length formula.
//! * [`toeplitz`]: privacy amplification by Toeplitz hashing, computed as a slice of a GF(2)
//!   polynomial product (Karatsuba, or Schönhage's ternary FFT for long blocks).
//! * [`concentration`]: counting bounds valid against coherent attacks (exponential
//!   supermartingales).
//! * [`sampling`]: the random-sampling bound (exact hypergeometric tail, inverted).
//! * [`finite_key`]: parameter estimation (phase error with finite-size bounds) and the secret key
//!   length of the three-state time-bin protocol.

pub mod cascade;
pub mod concentration;
pub mod finite_key;
pub mod ldpc;
pub mod sampling;
pub mod toeplitz;
pub mod verify;

pub use cascade::{
    CascadeAlice, CascadeBob, CascadeError, CascadeOutcome, CascadeShuffles, FrameParityQuery, MultiCascadeAlice,
    MultiCascadeBob, ParityQuery, reconcile_in_memory,
};
pub use finite_key::{
    BlockStats, EpsBudget, KeyLength, KeyLengthError, SecurityParams, SourceMonitor, XCounts, phase_error_upper,
    secret_key_length,
};
pub use ldpc::{LdpcAlice, LdpcBob, LdpcCode, LdpcError, LdpcFamily, LdpcOutcome, LdpcStep};
pub use toeplitz::{
    FFT_THRESHOLD_BITS, toeplitz_hash, toeplitz_hash_fft, toeplitz_hash_karatsuba, toeplitz_hash_reference,
};
pub use verify::{eps_cor_for, poly_hash_tag, tags_match};

/// Binary (Shannon) entropy h(p) = -p log2 p - (1-p) log2(1-p), in bits.
///
/// Defined as 0 at p = 0 and p = 1; arguments outside [0, 1] are clamped to that interval, and a
/// NaN argument gives NaN.
pub fn binary_entropy(p: f64) -> f64 {
    if p.is_nan() {
        return f64::NAN;
    }
    let p = p.clamp(0.0, 1.0);
    if p == 0.0 || p == 1.0 {
        return 0.0;
    }
    -p * p.log2() - (1.0 - p) * (1.0 - p).log2()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_entropy_known_values() {
        assert_eq!(binary_entropy(0.0), 0.0);
        assert_eq!(binary_entropy(1.0), 0.0);
        assert!((binary_entropy(0.5) - 1.0).abs() < 1e-15);
        // h(0.11) = 0.4999157... (the BB84 threshold where 1 - 2 h(Q) = 0).
        assert!((binary_entropy(0.11) - 0.499_915_8).abs() < 1e-6);
        assert!((binary_entropy(0.3) - binary_entropy(0.7)).abs() < 1e-15);
    }
}

#[cfg(test)]
pub(crate) mod test_support;
