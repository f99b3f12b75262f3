//! One-way error correction: blind, rate-adaptive reconciliation with quasi-cyclic LDPC codes.
//!
//! An alternative to [`crate::postproc::cascade`] that needs one message from Alice plus a few
//! short follow-ups instead of hundreds of round trips, at a higher leak (figures:
//! docs/postprocessing.md).
//!
//! # Codes
//! A quasi-cyclic LDPC code is a base matrix (protograph) of `n_base_rows` x [`BASE_COLUMNS`]
//! entries, each either empty or a z x z circulant permutation (the identity shifted by `shift`):
//! check `r z + i` involves bit `c z + (i + shift) mod z` for every entry (r, c, shift). The
//! lifting size z is the smallest that fits the key and the adaptation bits, so one construction
//! serves frames from 10^4 to 10^6 bits and more. [`LdpcCode::new`] builds the code of a key
//! length and mother rate deterministically (no randomness is shared: both ends build the same
//! public code):
//! * column degrees from an irregular profile (degree-2, degree-3 and high-degree columns, see
//!   [`column_degrees`]), rows as even as possible, placed by a progressive-edge-growth pass over
//!   the base graph (each new edge goes to the least used row among the farthest ones,
//!   Hu, Eleftheriou and Arnold, IEEE Trans. Inf. Theory 51, 386 (2005));
//! * shifts drawn at random under the condition that no 4-cycle appears in the lifted graph
//!   (s1 - s2 + s3 - s4 != 0 mod z around every base rectangle, Fossorier, IEEE Trans. Inf. Theory
//!   50, 1788 (2004)), falling back to the shift with the fewest 4-cycles when z is too small.
//!
//! # Rate adaptation and blind protocol
//! Martinez-Mateo, Elkouss and Martin, "Blind reconciliation", Quantum Inf. Comput. 12, 791
//! (2012), and Elkouss, Martinez-Mateo, Martin, "Untainted puncturing for irregular LDPC codes",
//! IEEE Wireless Commun. Lett. 1, 585 (2012). The word Alice encodes is her key, then `d`
//! *adaptation* bits, then zero padding. The adaptation bits sit on degree-2 base columns with
//! pairwise disjoint checks ("untainted": no check sees two of them). Each is either
//! * punctured: a fresh random bit of Alice's that Bob does not know (his LLR is 0), or
//! * shortened: a bit whose value Bob knows (a zero, for the adaptation bits not punctured at the
//!   start, or a punctured bit Alice has revealed).
//!
//! Alice sends the m-bit syndrome. Bob decodes (layered normalized min-sum); when decoding fails he
//! asks for the values of more punctured bits, which Alice reveals, and decodes again, up to a few
//! times. With more punctured bits the code's rate for the key is higher and the leak smaller, so
//! the protocol starts optimistic and pays only for what the frame needs. [`LdpcFamily`] holds one
//! code per mother rate ([`MOTHER_RATES`]) for a key length; [`LdpcFamily::select`] picks the
//! mother code and the initial puncturing for Bob's QBER estimate and a starting efficiency
//! ([`default_start_efficiency`]).
//!
//! Driving it over the link (Bob drives, as for Cascade): both ends build the family of the block
//! length once; Bob sends (rate index, punctured bits) from `select`; Alice answers with
//! [`LdpcAlice::new`]'s syndrome; Bob runs [`LdpcBob::decode`] and, on
//! [`LdpcStep::NeedReveal`], asks Alice for [`LdpcAlice::reveal`] of that many bits, feeds them
//! to [`LdpcBob::receive_revealed`] and decodes again, until [`LdpcStep::Decoded`] (or
//! [`LdpcStep::Failed`], which aborts the block). The leak for the key-length formula is
//! [`LdpcAlice::leak_bits`], equal to Bob's [`LdpcOutcome::leak_bits`].
//!
//! # Leak accounting
//! The syndrome is H_K k + H_P r, k the key and r the uniformly random punctured bits. Because the
//! punctured columns are untainted, H_P's columns have disjoint supports, so H_P has full column
//! rank p and H_P r is uniform on a p-dimensional subspace: the syndrome tells about k only the
//! coset of H_K k modulo that subspace, m - p bits. Each revealed punctured bit then costs one bit
//! (p decreases). So the leak is exactly m - p_initial + revealed, which [`LdpcAlice`] counts as
//! she sends, and Bob's outcome reports the same number. (Counting all m syndrome bits would also
//! be a valid, looser bound; it would make puncturing useless.) The padding bits are zeros known
//! to both and carry nothing.
//!
//! # Decoding
//! Bob decodes by layered normalized min-sum (the `decoder` module). A decoded word that
//! satisfies the syndrome but differs from Alice's (an undetected error, rare) is caught by the
//! verification hash like a Cascade failure.
//!
//! The code follows these parts: `code` (one code and its syndrome), `construction` (its base
//! graph and lifting), `family` (the codes of one key length and the start of the blind
//! protocol), `protocol` (Alice's and Bob's ends) and `decoder` (Bob's belief propagation).

use rand::Rng;
use thiserror::Error;

use crate::bits::BitVec;

mod code;
mod construction;
mod decoder;
mod family;
mod protocol;

pub use code::{BASE_COLUMNS, LdpcCode};
pub use construction::column_degrees;
pub use decoder::{MAX_ITERATIONS, MIN_SUM_SCALE};
pub use family::{LdpcFamily, MOTHER_RATES, default_start_efficiency};
pub use protocol::{LdpcAlice, LdpcBob, LdpcOutcome, LdpcStep};

/// Why an LDPC message was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LdpcError {
    /// The key length does not match the code.
    #[error("key of {got} bits for a code of {expected}-bit keys")]
    KeyLength {
        /// The code's key length, in bits.
        expected: usize,
        /// The key's length, in bits.
        got: usize,
    },
    /// The syndrome length does not match the code.
    #[error("syndrome of {got} bits for a code with {expected} checks")]
    SyndromeLength {
        /// The code's number of checks.
        expected: usize,
        /// The syndrome's length, in bits.
        got: usize,
    },
    /// Bob asked for more punctured bits than remain.
    #[error("{asked} punctured bits requested but only {remaining} remain")]
    NothingToReveal {
        /// Bits requested.
        asked: usize,
        /// Punctured bits not yet revealed.
        remaining: usize,
    },
    /// The revealed values do not match the outstanding request.
    #[error("expected {expected} revealed bits, got {got}")]
    RevealCount {
        /// Bits requested.
        expected: usize,
        /// Bits received.
        got: usize,
    },
}

/// Runs both ends in memory (tests, simulation, benches): Alice punctures `n_punctured`
/// adaptation bits; Bob decodes and asks for reveals in `n_reveal_steps` steps.
pub fn reconcile_in_memory(
    code: &LdpcCode,
    alice_key: &BitVec,
    bob_key: &BitVec,
    qber_estimate: f64,
    n_punctured: usize,
    n_reveal_steps: usize,
    rng: &mut impl Rng,
) -> Result<LdpcOutcome, LdpcError> {
    let mut alice = LdpcAlice::new(code, alice_key, n_punctured, rng)?;
    let mut bob =
        LdpcBob::new(code, bob_key, qber_estimate, alice.syndrome().clone(), alice.n_punctured(), n_reveal_steps)?;
    loop {
        match bob.decode() {
            LdpcStep::Decoded | LdpcStep::Failed => break,
            LdpcStep::NeedReveal(count) => {
                let values = alice.reveal(count)?;
                bob.receive_revealed(&values)?;
            }
        }
    }
    debug_assert_eq!(bob.leak_bits(), alice.leak_bits());
    Ok(bob.finish())
}

#[cfg(test)]
mod tests;
