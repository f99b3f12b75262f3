//! Interactive error correction: the optimized Cascade protocol.
//!
//! Bob drives; Alice is a parity oracle that answers [`ParityQuery`]s about her key and counts
//! every answered parity as disclosed. Both ends derive the same per-pass shuffles from a shared
//! 32-byte seed, so the only traffic is queries (Bob to Alice) and one parity bit per query back.
//!
//! # Schedule
//! The optimized Cascade of Martinez-Mateo, Pacher, Peev, Ciurana, Pedersen, "Demystifying the
//! information reconciliation protocol Cascade", Quantum Inf. Comput. 15, 453 (2015),
//! arXiv:1407.3257 (as summarised in the project's post-processing notes): with
//! alpha = ceil(log2(1/Q) - 0.5), pass 1 uses blocks of k1 = 2^alpha bits, pass 2 of
//! k2 = 2^ceil((alpha + 12) / 2), pass 3 of k3 = 4096, and passes 4 to 14 of n/2 bits; every block
//! size is clamped to [1, n]. Q is Bob's QBER estimate, floored at [`QBER_FLOOR`] (and capped at
//! 0.5) so that a zero, negative or NaN estimate still gives a sane schedule.
//!
//! # Shuffles
//! Every pass, the first included, works on a shuffled copy of the key: position i of pass p holds
//! original bit `perm_p[i]`, with `perm_p` a Fisher-Yates shuffle driven by
//! `ChaCha20Rng::from_seed(seed)` with `set_stream(p)` and an unbiased bounded draw (Lemire's
//! multiply-and-reject on `next_u32`), see [`pass_permutation`]. Shuffling pass 1 too protects
//! against bursts of errors in the sifted key.
//!
//! # Parity reuse
//! Alice's key never changes, so every parity she discloses stays valid; Bob keeps, per pass, a
//! map from range to Alice's parity. He never asks for a parity he can deduce:
//! * the second half of a split range: parity(right) = parity(node) xor parity(left) (and the left
//!   half from the right one when only that is known), for every node of every binary search,
//!   including searches of blocks that become odd again later through the cascade effect, which
//!   then mostly replay known parities for free;
//! * the last top-level block of every pass after the first: Alice's parity of the whole key is
//!   known once pass 1's block parities are, so the last block's parity is the xor of that total
//!   and of the other blocks' parities (a pass whose single block is the whole key costs nothing).
//!
//! # Cascade effect and batching
//! Correcting a bit flips the parity of the block holding it in every pass started so far; each
//! block that becomes odd is searched again (in the earliest such pass first, like the sequential
//! protocol, so that two passes do not hunt the same error in parallel). All searches that may run
//! at the same time advance in lockstep, one level per round trip, and their queries go out as one
//! batch. A search whose range stops being odd (another search fixed its error) is dropped and its
//! block checked again.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use thiserror::Error;

use crate::bits::BitVec;

/// Number of Cascade passes (the optimized schedule uses 14).
pub const N_PASSES: u32 = 14;

/// Smallest QBER estimate (dimensionless) used to choose the block sizes.
pub const QBER_FLOOR: f64 = 0.001;

/// Block size of the third pass, in bits (Martinez-Mateo et al., optimized schedule).
const K3_BITS: usize = 4096;

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

/// Block sizes (bits) of the [`N_PASSES`] passes for a QBER estimate and a key of `n_bits` bits,
/// following the optimized schedule described in the module documentation.
pub fn block_sizes(qber_estimate: f64, n_bits: usize) -> Vec<usize> {
    let q = if qber_estimate.is_nan() { QBER_FLOOR } else { qber_estimate.clamp(QBER_FLOOR, 0.5) };
    // Martinez-Mateo et al. (arXiv:1407.3257), optimized Cascade: alpha = ceil(log2(1/Q) - 1/2),
    // k1 = 2^alpha, k2 = 2^ceil((alpha + 12) / 2), k3 = 4096, then n/2.
    let alpha = ((1.0 / q).log2() - 0.5).ceil().max(1.0) as u32;
    let k1 = 1usize << alpha;
    let k2 = 1usize << (alpha + 12).div_ceil(2);
    let max_size = n_bits.max(1);
    (0..N_PASSES)
        .map(|pass| match pass {
            0 => k1,
            1 => k2,
            2 => K3_BITS,
            _ => n_bits / 2,
        })
        .map(|k| k.clamp(1, max_size))
        .collect()
}

/// The shuffle of pass `pass` for an `n_bits`-bit key: element i is the original index of the bit
/// at position i of the pass's order. Fisher-Yates over `ChaCha20Rng::from_seed(seed)` with
/// `set_stream(pass)`, each swap index drawn uniformly by [`uniform_below`].
///
/// Panics when `n_bits` does not fit in a `u32` (Cascade positions are 32-bit).
pub fn pass_permutation(seed: &[u8; 32], pass: u32, n_bits: usize) -> Vec<u32> {
    let n = u32::try_from(n_bits).expect("cascade keys are shorter than 2^32 bits");
    let mut rng = ChaCha20Rng::from_seed(*seed);
    rng.set_stream(u64::from(pass));
    let mut perm: Vec<u32> = (0..n).collect();
    fisher_yates(&mut rng, &mut perm);
    perm
}

/// Shuffles `items` in place by Fisher-Yates, drawing swap indices with [`uniform_below`].
fn fisher_yates(rng: &mut ChaCha20Rng, items: &mut [u32]) {
    for i in (1..items.len()).rev() {
        let j = uniform_below(rng, i as u32 + 1);
        items.swap(i, j as usize);
    }
}

/// A uniform integer in `0..bound` (bound > 0) from 32-bit draws, by Lemire's multiply-and-reject
/// ("Fast random integer generation in an interval", ACM TOMACS 29, 3 (2019)). Written out here
/// rather than taken from `rand` so that the shuffle cannot change with a `rand` upgrade.
fn uniform_below(rng: &mut ChaCha20Rng, bound: u32) -> u32 {
    debug_assert!(bound > 0);
    let mut product = u64::from(rng.next_u32()) * u64::from(bound);
    if (product as u32) < bound {
        let threshold = bound.wrapping_neg() % bound;
        while (product as u32) < threshold {
            product = u64::from(rng.next_u32()) * u64::from(bound);
        }
    }
    (product >> 32) as u32
}

/// `key` reordered by `perm`: bit i of the result is bit `perm[i]` of `key`.
fn permute_bits(key: &BitVec, perm: &[u32]) -> BitVec {
    let source = key.words();
    let mut words = vec![0u64; perm.len().div_ceil(64)];
    for (chunk, word) in perm.chunks(64).zip(words.iter_mut()) {
        let mut acc = 0u64;
        for (k, &src) in chunk.iter().enumerate() {
            acc |= ((source[src as usize / 64] >> (src % 64)) & 1) << k;
        }
        *word = acc;
    }
    BitVec::from_words(words, perm.len())
}

/// Alice's end: answers parity queries about her key and counts what she disclosed.
pub struct CascadeAlice {
    key: BitVec,
    seed: [u8; 32],
    /// Her key in each pass's order, built when the pass is first queried.
    shuffled: Vec<Option<BitVec>>,
    leak_bits: u64,
}

impl CascadeAlice {
    /// Alice's end for `key`, with the shuffle seed shared with Bob.
    pub fn new(key: &BitVec, seed: [u8; 32]) -> Self {
        Self { key: key.clone(), seed, shuffled: vec![None; N_PASSES as usize], leak_bits: 0 }
    }

    /// Answers a batch of queries, one parity per query in order; every answered bit counts as
    /// disclosed (leak). A batch with any invalid query is refused whole and discloses nothing.
    pub fn answer(&mut self, queries: &[ParityQuery]) -> Result<Vec<bool>, CascadeError> {
        let n_bits = self.key.len();
        for q in queries {
            if q.pass >= N_PASSES {
                return Err(CascadeError::PassOutOfRange { pass: q.pass, n_passes: N_PASSES });
            }
            if q.start >= q.end || q.end as usize > n_bits {
                return Err(CascadeError::BadRange { start: q.start, end: q.end, n_bits });
            }
        }
        let mut parities = Vec::with_capacity(queries.len());
        for q in queries {
            let shuffled = self.shuffled[q.pass as usize].get_or_insert_with(|| {
                permute_bits(&self.key, &pass_permutation(&self.seed, q.pass, n_bits))
            });
            parities.push(shuffled.parity_range(q.start as usize, q.end as usize));
        }
        self.leak_bits += queries.len() as u64;
        Ok(parities)
    }

    /// Number of parities answered so far, in bits.
    pub fn leak_bits(&self) -> u64 {
        self.leak_bits
    }
}

/// Hasher for the (start, end) keys of the parity maps: a 64-bit mixer (the keys are not
/// attacker-chosen in a way that matters: a slow map only slows Bob down).
#[derive(Default, Clone, Copy)]
struct RangeHasher(u64);

impl Hasher for RangeHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, x: u64) {
        let mut h = (self.0 ^ x).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        h ^= h >> 32;
        self.0 = h.wrapping_mul(0xD6E8_FEB8_6659_FD93) ^ (h >> 29);
    }
}

/// Alice's known parities of one pass, keyed by `start << 32 | end`.
type ParityMap = HashMap<u64, bool, BuildHasherDefault<RangeHasher>>;

fn range_key(start: u32, end: u32) -> u64 {
    (u64::from(start) << 32) | u64::from(end)
}

/// Bob's state for one started pass.
struct PassState {
    block_size: usize,
    n_blocks: usize,
    /// Position in this pass -> original index.
    perm: Vec<u32>,
    /// Original index -> position in this pass.
    inverse: Vec<u32>,
    /// Bob's current key in this pass's order.
    bits: BitVec,
    /// Alice's parities known (asked or deduced) for ranges of this pass.
    known: ParityMap,
    /// Per top-level block: a search is running on it.
    searching: Vec<bool>,
    /// Blocks whose parity may have changed since they were last checked.
    dirty: Vec<u32>,
}

impl PassState {
    fn block_range(&self, block: usize) -> (u32, u32) {
        let start = block * self.block_size;
        let end = (start + self.block_size).min(self.bits.len());
        (start as u32, end as u32)
    }

    fn alice_parity(&self, start: u32, end: u32) -> Option<bool> {
        self.known.get(&range_key(start, end)).copied()
    }

    fn bob_parity(&self, start: u32, end: u32) -> bool {
        self.bits.parity_range(start as usize, end as usize)
    }
}

/// A binary search in progress: range `lo..hi` of pass `pass` has a known Alice parity that
/// differs from Bob's, so it holds an odd number of errors.
#[derive(Debug, Clone, Copy)]
struct Search {
    pass: u32,
    block: u32,
    lo: u32,
    hi: u32,
}

/// What one search does next.
enum Advance {
    /// It needs this parity from Alice.
    Ask(ParityQuery),
    /// It narrowed its range to the single erroneous position given.
    Found(u32),
    /// Its range is no longer odd; its block must be checked again.
    Dropped,
}

/// Bob's end: drives the protocol over his noisy key.
pub struct CascadeBob {
    key: BitVec,
    seed: [u8; 32],
    block_sizes: Vec<usize>,
    passes: Vec<PassState>,
    searches: Vec<Search>,
    /// The batch last returned by `next_queries` and not yet answered.
    outstanding: Option<Vec<ParityQuery>>,
    /// Pass whose top-level block parities the outstanding batch asks for.
    initialising_pass: Option<usize>,
    /// Alice's parity of her whole key, known after the first pass's block parities.
    total_parity: Option<bool>,
    finished: bool,
    leak_bits: u64,
    n_corrected: u64,
    round_trips: u32,
}

impl CascadeBob {
    /// Bob's end for his `noisy_key`, with his QBER estimate (fraction, used only to pick block
    /// sizes) and the shuffle seed shared with Alice.
    ///
    /// Panics when the key has 2^32 bits or more.
    pub fn new(noisy_key: BitVec, qber_estimate: f64, seed: [u8; 32]) -> Self {
        let n_bits = noisy_key.len();
        assert!(u32::try_from(n_bits).is_ok(), "cascade keys are shorter than 2^32 bits");
        Self {
            block_sizes: block_sizes(qber_estimate, n_bits),
            finished: n_bits == 0,
            key: noisy_key,
            seed,
            passes: Vec::new(),
            searches: Vec::new(),
            outstanding: None,
            initialising_pass: None,
            total_parity: None,
            leak_bits: 0,
            n_corrected: 0,
            round_trips: 0,
        }
    }

    /// The next batch of queries (all binary searches that can run at the same time are batched
    /// together, to minimise round trips), or None when reconciliation is finished. Until the
    /// batch is answered through [`CascadeBob::receive`], calling this again returns the same
    /// batch.
    pub fn next_queries(&mut self) -> Option<Vec<ParityQuery>> {
        if let Some(batch) = &self.outstanding {
            return Some(batch.clone());
        }
        loop {
            if self.finished {
                return None;
            }
            let queries = self.run_searches();
            if !queries.is_empty() {
                return Some(self.send(queries));
            }
            // Nothing left to search in the started passes: start the next pass.
            if self.passes.len() == N_PASSES as usize {
                self.finished = true;
                return None;
            }
            let queries = self.begin_pass();
            if !queries.is_empty() {
                self.initialising_pass = Some(self.passes.len() - 1);
                return Some(self.send(queries));
            }
            self.end_pass_initialisation(self.passes.len() - 1);
        }
    }

    /// Feeds Alice's answers to the batch last returned by [`CascadeBob::next_queries`], in the
    /// same order. A batch of the wrong size is refused and stays outstanding.
    pub fn receive(&mut self, parities: &[bool]) -> Result<(), CascadeError> {
        let Some(queries) = self.outstanding.take() else {
            return Err(CascadeError::NoOutstandingQueries);
        };
        if queries.len() != parities.len() {
            let expected = queries.len();
            self.outstanding = Some(queries);
            return Err(CascadeError::AnswerCountMismatch { expected, got: parities.len() });
        }
        for (q, &parity) in queries.iter().zip(parities) {
            self.passes[q.pass as usize].known.insert(range_key(q.start, q.end), parity);
        }
        self.leak_bits += parities.len() as u64;
        if let Some(pass) = self.initialising_pass.take() {
            self.end_pass_initialisation(pass);
        }
        Ok(())
    }

    /// Number of parities received from Alice so far, in bits.
    pub fn leak_bits(&self) -> u64 {
        self.leak_bits
    }

    /// Bob's key and counters; call it once [`CascadeBob::next_queries`] has returned None.
    pub fn finish(self) -> CascadeOutcome {
        CascadeOutcome {
            key: self.key,
            leak_bits: self.leak_bits,
            n_corrected: self.n_corrected,
            round_trips: self.round_trips,
        }
    }

    fn send(&mut self, queries: Vec<ParityQuery>) -> Vec<ParityQuery> {
        self.round_trips += 1;
        self.outstanding = Some(queries.clone());
        queries
    }

    /// Starts the next pass; returns the queries for the top-level block parities that cannot be
    /// deduced.
    fn begin_pass(&mut self) -> Vec<ParityQuery> {
        let pass = self.passes.len();
        let n_bits = self.key.len();
        let block_size = self.block_sizes[pass];
        let perm = pass_permutation(&self.seed, pass as u32, n_bits);
        let mut inverse = vec![0u32; n_bits];
        for (position, &original) in perm.iter().enumerate() {
            inverse[original as usize] = position as u32;
        }
        let bits = permute_bits(&self.key, &perm);
        let n_blocks = n_bits.div_ceil(block_size);
        let state = PassState {
            block_size,
            n_blocks,
            perm,
            inverse,
            bits,
            known: ParityMap::default(),
            searching: vec![false; n_blocks],
            dirty: Vec::new(),
        };
        // After the first pass the total parity is known: the last block's parity is deduced.
        let n_asked = if self.total_parity.is_some() { n_blocks - 1 } else { n_blocks };
        let queries = (0..n_asked)
            .map(|block| {
                let (start, end) = state.block_range(block);
                ParityQuery { pass: pass as u32, start, end }
            })
            .collect();
        self.passes.push(state);
        queries
    }

    /// Once a pass's block parities are known: deduces the missing one (or records the total
    /// parity after the first pass) and marks every block for checking.
    fn end_pass_initialisation(&mut self, pass: usize) {
        let state = &mut self.passes[pass];
        let mut xor_known = false;
        for block in 0..state.n_blocks {
            let (start, end) = state.block_range(block);
            if let Some(parity) = state.alice_parity(start, end) {
                xor_known ^= parity;
            }
        }
        match self.total_parity {
            None => self.total_parity = Some(xor_known),
            Some(total) => {
                let (start, end) = state.block_range(state.n_blocks - 1);
                if state.alice_parity(start, end).is_none() {
                    state.known.insert(range_key(start, end), total ^ xor_known);
                }
            }
        }
        state.dirty = (0..state.n_blocks as u32).collect();
    }

    /// Advances every search as far as known parities allow, applies the corrections found and
    /// starts the searches that became possible, until all running searches wait for Alice.
    /// Returns their queries (empty when no search is left).
    fn run_searches(&mut self) -> Vec<ParityQuery> {
        loop {
            self.start_searches();
            let mut queries = Vec::new();
            let mut found = Vec::new();
            let mut changed = false;
            let mut idx = 0;
            while idx < self.searches.len() {
                let mut search = self.searches[idx];
                match self.advance(&mut search) {
                    Advance::Ask(query) => {
                        self.searches[idx] = search;
                        queries.push(query);
                        idx += 1;
                    }
                    outcome => {
                        changed = true;
                        self.searches.swap_remove(idx);
                        let state = &mut self.passes[search.pass as usize];
                        state.searching[search.block as usize] = false;
                        match outcome {
                            Advance::Found(position) => found.push((search.pass, position)),
                            _ => state.dirty.push(search.block),
                        }
                    }
                }
            }
            for (pass, position) in found {
                let state = &self.passes[pass as usize];
                // Another search of this round may have fixed the same bit already.
                let alice = state.alice_parity(position, position + 1);
                if alice.is_some_and(|a| a != state.bits.get(position as usize)) {
                    let original = state.perm[position as usize];
                    self.flip(original as usize);
                }
            }
            if !changed {
                return queries;
            }
        }
    }

    /// Starts searches on the odd dirty blocks of the earliest pass that has any, as in the
    /// sequential protocol where the smaller blocks of earlier passes are searched first: never in
    /// a pass after the earliest pass with a running search (a cheaper search there may be after
    /// the very error that makes the later block odd). Blocks of later passes stay dirty; dirty
    /// blocks found even are forgotten (a later flip inside them marks them again).
    fn start_searches(&mut self) {
        let limit = self
            .searches
            .iter()
            .map(|s| s.pass as usize)
            .min()
            .unwrap_or(self.passes.len().saturating_sub(1));
        for pass in 0..self.passes.len().min(limit + 1) {
            let state = &mut self.passes[pass];
            let mut started = false;
            for block in std::mem::take(&mut state.dirty) {
                let b = block as usize;
                if state.searching[b] {
                    continue;
                }
                let (start, end) = state.block_range(b);
                if state.alice_parity(start, end).is_some_and(|a| a != state.bob_parity(start, end)) {
                    state.searching[b] = true;
                    self.searches.push(Search { pass: pass as u32, block, lo: start, hi: end });
                    started = true;
                }
            }
            if started {
                return;
            }
        }
    }

    /// Moves one search down its binary tree while the parities it needs are known.
    fn advance(&mut self, search: &mut Search) -> Advance {
        let state = &mut self.passes[search.pass as usize];
        loop {
            let (lo, hi) = (search.lo, search.hi);
            // Invariant: a search's range always has a known Alice parity.
            let Some(alice_node) = state.alice_parity(lo, hi) else {
                return Advance::Dropped;
            };
            if alice_node == state.bob_parity(lo, hi) {
                return Advance::Dropped;
            }
            if hi - lo == 1 {
                return Advance::Found(lo);
            }
            let mid = lo + (hi - lo) / 2;
            let left = state.alice_parity(lo, mid);
            let right = state.alice_parity(mid, hi);
            let left = match (left, right) {
                (Some(left), right) => {
                    if right.is_none() {
                        state.known.insert(range_key(mid, hi), alice_node ^ left);
                    }
                    left
                }
                (None, Some(right)) => {
                    state.known.insert(range_key(lo, mid), alice_node ^ right);
                    alice_node ^ right
                }
                (None, None) => {
                    return Advance::Ask(ParityQuery { pass: search.pass, start: lo, end: mid });
                }
            };
            if state.bob_parity(lo, mid) != left {
                search.hi = mid;
            } else {
                search.lo = mid;
            }
        }
    }

    /// Flips original bit `original` in Bob's key and in every started pass, marking the block
    /// that holds it in each pass for checking (the cascade effect).
    fn flip(&mut self, original: usize) {
        self.key.flip(original);
        self.n_corrected += 1;
        for state in &mut self.passes {
            let position = state.inverse[original] as usize;
            state.bits.flip(position);
            state.dirty.push((position / state.block_size) as u32);
        }
    }
}

/// Runs both ends in memory (for tests, simulation and benches) and returns Bob's outcome; its
/// `leak_bits` equals what Alice counted.
pub fn reconcile_in_memory(
    alice_key: &BitVec,
    bob_key: BitVec,
    qber_estimate: f64,
    seed: [u8; 32],
) -> CascadeOutcome {
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
