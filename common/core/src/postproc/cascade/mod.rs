//! Interactive error correction: the optimized Cascade protocol.
//!
//! Bob drives; Alice is a parity oracle that answers [`ParityQuery`]s about her key and counts
//! every answered parity as disclosed. Both ends derive the same per-pass shuffles from a shared
//! 32-byte seed, so the only traffic is queries (Bob to Alice) and one parity bit per query back.
//! Alice answers any valid range, so everything below about *which* ranges Bob asks for is Bob's
//! business alone and can change without touching the protocol.
//!
//! The code follows the protocol's parts: `schedule` (the block size of each pass), `shuffles`
//! (the per-pass orders both ends derive from the seed), `alice` (the parity oracle), `bob` (the
//! correction driver: batched binary searches, parity reuse, the cascade effect), `density`
//! (Bob's estimate of where the remaining errors are, which places his splits) and `multi` (many
//! frames in one exchange). Measured efficiencies and round trips, and the measurements behind
//! the choices below: docs/postprocessing.md.
//!
//! # Schedule
//! The optimized Cascade of Martinez-Mateo, Pacher, Peev, Ciurana, Pedersen, "Demystifying the
//! information reconciliation protocol Cascade", Quantum Inf. Comput. 15, 453 (2015),
//! arXiv:1407.3257: with alpha = ceil(log2(1/Q) - 0.5), pass 1 uses blocks of k1 = 2^alpha bits,
//! pass 2 of k2 = 2^ceil((alpha + 12) / 2), pass 3 of k3 = 4096, and the remaining passes of n/2
//! bits; every block size is clamped to [1, n]. Q is Bob's QBER estimate, floored at
//! [`QBER_FLOOR`] (and capped at 0.5) so that a zero, negative or NaN estimate still gives a sane
//! schedule.
//!
//! Two changes, both chosen with the simulation of the benchmark (`qkd_sim::bench`):
//! * k2 = 2^floor((alpha + 12) / 2), rounded down instead of up: half the published value for
//!   odd alpha (Q around 1, 3 and 10 %), the published one for even alpha. With Bob's weighted
//!   splits, pass-2 searches are cheaper and, for odd alpha, the smaller k2 leaks as little or
//!   less and needs far fewer round trips. For alpha = 4 (Q from 4.4 to 8.8 %) the published
//!   k2 = 256 is best up to about 6 %, and 128 from 7 %, so k2 is halved there from Q = 7 %.
//! * The published schedule was tuned for n = 2^14; for longer keys passes 4 and 5 use
//!   intermediate blocks of 2^14 and 2^16 bits before the n/2 passes, because residual errors
//!   found in a block of n/2 bits cost log2(n/2) parities each and are found one at a time.
//!
//! # Shuffles
//! Every pass, the first included, works on a shuffled copy of the key: position i of pass p holds
//! original bit `perm_p[i]` (see [`pass_permutation`]). Each pass draws from its own generator,
//! xoshiro256++ (Blackman and Vigna) whose 256-bit state is the first four 64-bit words of
//! `ChaCha20Rng::from_seed(seed)` with `set_stream(p)`. The shuffles are public (the seed is sent
//! in the clear), so a fast non-cryptographic generator costs no secrecy; seeding it from ChaCha20
//! keeps distinct passes and seeds independent.
//! * The first passes ([`first_split_pass`]: 3, or 5 for keys over 2^16 bits) use a Fisher-Yates
//!   shuffle, swap indices drawn by Lemire's multiply-and-reject on 64-bit words. Shuffling pass 1
//!   too protects against bursts of errors.
//! * The later passes, whose blocks are n/2 bits, only need a random half of the key in each
//!   block: their order is the bits selected by a uniformly random mask (one generator word per 64
//!   bits) in increasing index order, followed by the unselected bits in increasing index order.
//!   That costs a linear scan instead of n random swaps (these passes rarely find anything, so a
//!   full shuffle would be most of their cost), and their binary searches split the halves into
//!   runs of original indices, which the random shuffles of the earlier passes make as good as
//!   random subsets.
//!
//! [`CascadeShuffles`] computes each pass's permutation once and can be shared by many frames
//! (see [`MultiCascadeBob`]): the error patterns of different frames are independent, so each
//! frame still sees a uniformly random shuffle. Frames of a multi-frame exchange are padded with
//! zeros to the longest frame's length, so that one set of shuffles serves them all.
//!
//! # Frame errors
//! With 14 passes a frame keeps residual errors with probability of the order of 10^-3 at high
//! QBER (the passes after the third find an error pair left by the earlier ones with probability
//! 1/2 each): such frames are caught by verification, like any Cascade failure.

use thiserror::Error;

use crate::bits::BitVec;

mod alice;
mod bob;
mod density;
mod multi;
mod schedule;
mod shuffles;

pub use alice::CascadeAlice;
pub use bob::{CascadeBob, WEIGHTED_SPLIT_MAX_BITS};
pub use multi::{MultiCascadeAlice, MultiCascadeBob};
pub use schedule::{N_PASSES, QBER_FLOOR, block_sizes, first_split_pass};
pub use shuffles::{CascadeShuffles, pass_permutation};

/// A request for the parity of Alice's bits at positions `start..end` (half-open) of the shuffled
/// key of pass `pass` (see the module documentation for the shuffle).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParityQuery {
    /// Pass index, 0-based, below [`N_PASSES`].
    pub pass: u32,
    /// First position of the range in the pass's shuffled order (inclusive).
    pub start: u32,
    /// End of the range in the pass's shuffled order (exclusive).
    pub end: u32,
}

/// A parity query about one frame of a multi-frame exchange ([`MultiCascadeBob`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameParityQuery {
    /// Index of the frame in the exchange, 0-based.
    pub frame: u32,
    /// Pass index, 0-based, below [`N_PASSES`].
    pub pass: u32,
    /// First position of the range in the pass's shuffled order (inclusive).
    pub start: u32,
    /// End of the range in the pass's shuffled order (exclusive).
    pub end: u32,
}

impl FrameParityQuery {
    /// The single-frame query this one carries.
    pub fn query(&self) -> ParityQuery {
        ParityQuery { pass: self.pass, start: self.start, end: self.end }
    }
}

/// Why a Cascade message was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CascadeError {
    /// A query names a pass past the last one.
    #[error("parity query for pass {pass}, but cascade has only {n_passes} passes")]
    PassOutOfRange {
        /// The pass named by the query.
        pass: u32,
        /// Number of passes of the protocol.
        n_passes: u32,
    },
    /// A query's range is empty or runs past the end of the key.
    #[error("parity query range {start}..{end} is empty or outside the {n_bits}-bit key")]
    BadRange {
        /// Start of the range (inclusive).
        start: u32,
        /// End of the range (exclusive).
        end: u32,
        /// Length of the key, in bits.
        n_bits: usize,
    },
    /// The number of parities does not match the number of queries of the outstanding batch.
    #[error("expected {expected} parities for the outstanding batch of queries, got {got}")]
    AnswerCountMismatch {
        /// Number of queries in the outstanding batch.
        expected: usize,
        /// Number of parities received.
        got: usize,
    },
    /// Parities arrived while no batch of queries was outstanding.
    #[error("parities received but no batch of queries is outstanding")]
    NoOutstandingQueries,
    /// A multi-frame query names a frame that the exchange does not have.
    #[error("parity query for frame {frame}, but the exchange has only {n_frames} frames")]
    FrameOutOfRange {
        /// The frame named by the query.
        frame: u32,
        /// Number of frames of the exchange.
        n_frames: usize,
    },
}

/// The result of a reconciliation at Bob's end.
#[derive(Debug, Clone)]
pub struct CascadeOutcome {
    /// Bob's corrected key (equal to Alice's unless Cascade failed, which verification catches).
    pub key: BitVec,
    /// Number of parity bits Alice disclosed (one per answered query), in bits.
    pub leak_bits: u64,
    /// Number of bits Bob flipped.
    pub n_corrected: u64,
    /// Number of query batches, i.e. round trips between Bob and Alice.
    pub round_trips: u32,
}

/// Runs both ends in memory (for tests, simulation and benches) and returns Bob's outcome; its
/// `leak_bits` equals what Alice counted.
pub fn reconcile_in_memory(alice_key: &BitVec, bob_key: BitVec, qber_estimate: f64, seed: [u8; 32]) -> CascadeOutcome {
    let mut alice = CascadeAlice::new(alice_key, seed);
    let mut bob = CascadeBob::new(bob_key, qber_estimate, seed);
    while let Some(queries) = bob.next_queries() {
        // Bob only asks valid ranges of passes below N_PASSES, so Alice always answers.
        let parities = alice.answer(&queries).expect("bob's queries are always valid");
        bob.receive(&parities).expect("alice answers every query of the batch");
    }
    debug_assert_eq!(bob.leak_bits(), alice.leak_bits());
    bob.finish()
}

#[cfg(test)]
mod tests;
