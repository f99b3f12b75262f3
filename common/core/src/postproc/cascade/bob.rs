//! Bob's end, the correction driver: per pass, binary searches over the blocks whose parity
//! differs from Alice's, batched so that one round trip serves every search that can run.
//!
//! # Parity reuse
//! Alice's key never changes, so every parity she discloses stays valid. Bob keeps, per pass, the
//! binary tree of every block he has searched, with Alice's parity at each node he knows. He never
//! asks for a parity he can deduce:
//! * the second child of a node: parity(right) = parity(node) xor parity(left) (and the left
//!   child from the right one), for every node of every search, including searches of blocks that
//!   become odd again later through the cascade effect, which mostly replay known parities;
//! * the last top-level block of every pass after the first: Alice's parity of the whole key is
//!   known once pass 1's block parities are, so the last block's parity is the xor of that total
//!   and of the other blocks' parities (a pass whose single block is the whole key costs nothing);
//! * a child whose bits were all corrected: a binary search ends on a bit where Bob's key differs
//!   from Alice's, so a corrected bit is known to be right, and Alice's parity of a range of
//!   corrected bits is Bob's own (ranges up to [`KNOWN_CORRECT_MAX_BITS`] bits are checked; longer
//!   ones are practically never all corrected). This matters in the searches that the cascade
//!   effect restarts: a pass-1 block made odd by a correction found in a later pass holds the
//!   corrected bit, and the last split beside it would otherwise ask a parity whose answer is
//!   certain (measured effect on the leak: docs/postprocessing.md).
//!
//! # Weighted splits
//! New tree nodes are split at the weighted median of the error probabilities of Bob's error
//! density (see the `density` module; ranges up to [`WEIGHTED_SPLIT_MAX_BITS`] bits; longer
//! ranges mix the classes evenly and are halved, and pass-1 blocks without corrections are
//! uniform).
//!
//! # Cascade effect and batching
//! Correcting a bit flips the parity of the block holding it in every pass started so far; each
//! block that becomes odd is searched again (in the earliest such pass first, like the sequential
//! protocol, so that two passes do not hunt the same error in parallel). All searches that may run
//! at the same time advance in lockstep, one level per round trip, and their queries go out as one
//! batch. A search whose range stops being odd (another search fixed its error) is dropped and its
//! block checked again. [`MultiCascadeBob`](super::MultiCascadeBob) merges the batches of many
//! frames into one exchange, so that the round-trip latency is paid once for all of them.

use std::sync::Arc;

use super::density::ErrorDensity;
use super::schedule::{N_PASSES, block_sizes, clamped_qber};
use super::shuffles::{CascadeShuffles, PassOrder};
use super::{CascadeError, CascadeOutcome, ParityQuery};
use crate::bits::BitVec;

/// Longest range (bits) whose split point is chosen by weight rather than halved.
pub const WEIGHTED_SPLIT_MAX_BITS: u32 = 256;

/// Longest range (bits) that Bob checks for being all corrected before asking its parity.
const KNOWN_CORRECT_MAX_BITS: u32 = 8;

/// "No child yet" marker of a tree node.
const NO_CHILD: u32 = u32::MAX;

/// One node of a block's search tree: a range of a pass's order and what Bob knows of Alice's
/// parity of it. The children, once created, are the two nodes at `left` and `left + 1`.
#[derive(Debug, Clone, Copy)]
struct Node {
    lo: u32,
    hi: u32,
    left: u32,
    /// Alice's parity, when known.
    alice: Option<bool>,
}

impl Node {
    fn new(lo: u32, hi: u32) -> Self {
        Self { lo, hi, left: NO_CHILD, alice: None }
    }
}

/// Bob's state for one started pass.
struct PassState {
    block_size: usize,
    n_blocks: usize,
    n_bits: usize,
    /// Bob's current key in this pass's order (Fisher-Yates passes; a split pass reads Bob's key
    /// in place).
    bits: Option<BitVec>,
    /// The search trees; node i < n_blocks is the root (whole range) of block i.
    nodes: Vec<Node>,
    /// Per block: Bob's current parity.
    bob_block_parity: Vec<bool>,
    /// Per block: a search is running on it.
    searching: Vec<bool>,
    /// Blocks whose parity may have changed since they were last checked.
    dirty: Vec<u32>,
}

impl PassState {
    fn block_range(&self, block: usize) -> (u32, u32) {
        let start = block * self.block_size;
        let end = (start + self.block_size).min(self.n_bits);
        (start as u32, end as u32)
    }

    /// True when block `block`'s parity is known to differ between Alice and Bob.
    fn block_is_odd(&self, block: usize) -> bool {
        self.nodes[block].alice.is_some_and(|a| a != self.bob_block_parity[block])
    }
}

/// A binary search in progress on `node` of pass `pass`, whose range is known to hold an odd
/// number of errors (as of when the search last advanced).
#[derive(Debug, Clone, Copy)]
struct Search {
    pass: u32,
    block: u32,
    node: u32,
}

/// What one search does next.
enum Advance {
    /// It needs Alice's parity of this node of its pass.
    Ask(u32),
    /// It narrowed its range to the single erroneous position given.
    Found(u32),
    /// Its range is no longer odd; its block must be checked again.
    Dropped,
}

/// Bob's end: drives the protocol over his noisy key.
pub struct CascadeBob {
    key: BitVec,
    shuffles: Arc<CascadeShuffles>,
    pub(super) block_sizes: Vec<usize>,
    passes: Vec<PassState>,
    searches: Vec<Search>,
    /// The batch last returned by `next_queries` and not yet answered.
    outstanding: Option<Vec<ParityQuery>>,
    /// For each query of the outstanding batch: (pass, node) its answer belongs to.
    outstanding_nodes: Vec<(u32, u32)>,
    /// Pass whose top-level block parities the outstanding batch asks for.
    initialising_pass: Option<usize>,
    /// Alice's parity of her whole key, known after the first pass's block parities.
    total_parity: Option<bool>,
    pub(super) density: ErrorDensity,
    finished: bool,
    leak_bits: u64,
    leak_by_pass: Vec<u64>,
    n_corrected: u64,
    round_trips: u32,
    /// Reused buffer for the original indices of a range being split.
    scratch: Vec<u32>,
}

impl CascadeBob {
    /// Bob's end for his `noisy_key`, with his QBER estimate (fraction, used only to pick block
    /// sizes and split points) and the shuffle seed shared with Alice.
    ///
    /// Panics when the key has 2^32 bits or more.
    pub fn new(noisy_key: BitVec, qber_estimate: f64, seed: [u8; 32]) -> Self {
        let shuffles = Arc::new(CascadeShuffles::new(seed, noisy_key.len()));
        Self::with_shuffles(noisy_key, qber_estimate, shuffles)
    }

    /// Bob's end with shuffles shared with other frames of the same seed (see
    /// [`MultiCascadeBob`](super::MultiCascadeBob)).
    ///
    /// Panics when the shuffles are for another key length (a programming error).
    pub fn with_shuffles(noisy_key: BitVec, qber_estimate: f64, shuffles: Arc<CascadeShuffles>) -> Self {
        let sizes = block_sizes(qber_estimate, noisy_key.len());
        Self::with_schedule(noisy_key, qber_estimate, shuffles, sizes)
    }

    /// Bob's end with an explicit block size per pass (one to [`N_PASSES`] sizes, each clamped
    /// to [1, n]), for schedule studies; [`CascadeBob::new`] uses [`block_sizes`].
    pub fn with_schedule(
        noisy_key: BitVec,
        qber_estimate: f64,
        shuffles: Arc<CascadeShuffles>,
        block_sizes: Vec<usize>,
    ) -> Self {
        let n_bits = noisy_key.len();
        assert_eq!(shuffles.n_bits(), n_bits, "cascade shuffles are for another key length");
        assert!(!block_sizes.is_empty() && block_sizes.len() <= N_PASSES as usize, "1 to 14 passes");
        let block_sizes: Vec<usize> = block_sizes.into_iter().map(|k| k.clamp(1, n_bits.max(1))).collect();
        Self {
            density: ErrorDensity::new(clamped_qber(qber_estimate), block_sizes[0], n_bits),
            block_sizes,
            finished: n_bits == 0,
            key: noisy_key,
            shuffles,
            passes: Vec::new(),
            searches: Vec::new(),
            outstanding: None,
            outstanding_nodes: Vec::new(),
            initialising_pass: None,
            total_parity: None,
            leak_bits: 0,
            leak_by_pass: Vec::new(),
            n_corrected: 0,
            round_trips: 0,
            scratch: Vec::new(),
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
            let nodes = self.run_searches();
            if self.finished {
                return None;
            }
            if !nodes.is_empty() {
                return Some(self.send(nodes));
            }
            // Nothing left to search in the started passes: start the next pass.
            if self.passes.len() == self.block_sizes.len() {
                self.finished = true;
                return None;
            }
            let nodes = self.begin_pass();
            if !nodes.is_empty() {
                self.initialising_pass = Some(self.passes.len() - 1);
                return Some(self.send(nodes));
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
        for (&(pass, node), &parity) in self.outstanding_nodes.iter().zip(parities) {
            self.passes[pass as usize].nodes[node as usize].alice = Some(parity);
            self.leak_by_pass[pass as usize] += 1;
        }
        self.outstanding_nodes.clear();
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

    /// Parities received so far per started pass, in bits (for schedule studies).
    pub fn leak_by_pass(&self) -> &[u64] {
        &self.leak_by_pass
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

    /// Records `nodes` as the outstanding batch and returns its queries.
    fn send(&mut self, nodes: Vec<(u32, u32)>) -> Vec<ParityQuery> {
        self.round_trips += 1;
        let queries: Vec<ParityQuery> = nodes
            .iter()
            .map(|&(pass, node)| {
                let n = self.passes[pass as usize].nodes[node as usize];
                ParityQuery { pass, start: n.lo, end: n.hi }
            })
            .collect();
        self.outstanding_nodes = nodes;
        self.outstanding = Some(queries.clone());
        queries
    }

    /// Starts the next pass; returns the (pass, node) of the top-level block parities that cannot
    /// be deduced.
    fn begin_pass(&mut self) -> Vec<(u32, u32)> {
        let pass = self.passes.len();
        let n_bits = self.key.len();
        let block_size = self.block_sizes[pass];
        let bits = self.shuffles.shuffled_key(&self.key, pass as u32);
        let n_blocks = n_bits.div_ceil(block_size);
        let mut state = PassState {
            block_size,
            n_blocks,
            n_bits,
            bob_block_parity: Vec::with_capacity(n_blocks),
            bits,
            nodes: Vec::with_capacity(2 * n_blocks),
            searching: vec![false; n_blocks],
            dirty: Vec::new(),
        };
        for block in 0..n_blocks {
            let (start, end) = state.block_range(block);
            state.nodes.push(Node::new(start, end));
            let parity = self.shuffles.parity(&self.key, state.bits.as_ref(), pass as u32, start, end);
            state.bob_block_parity.push(parity);
        }
        self.passes.push(state);
        self.leak_by_pass.push(0);
        // After the first pass the total parity is known: the last block's parity is deduced.
        let n_asked = if self.total_parity.is_some() { n_blocks - 1 } else { n_blocks };
        (0..n_asked as u32).map(|block| (pass as u32, block)).collect()
    }

    /// Once a pass's block parities are known: deduces the missing one (or records the total
    /// parity after the first pass) and marks every block for checking.
    fn end_pass_initialisation(&mut self, pass: usize) {
        let state = &mut self.passes[pass];
        let mut xor_known = false;
        for block in 0..state.n_blocks {
            if let Some(parity) = state.nodes[block].alice {
                xor_known ^= parity;
            }
        }
        match self.total_parity {
            None => self.total_parity = Some(xor_known),
            Some(total) => {
                let last = state.n_blocks - 1;
                if state.nodes[last].alice.is_none() {
                    state.nodes[last].alice = Some(total ^ xor_known);
                }
            }
        }
        state.dirty = (0..state.n_blocks as u32).collect();
    }

    /// Advances every search as far as known parities allow, applies the corrections found and
    /// starts the searches that became possible, until all running searches wait for Alice.
    /// Returns the (pass, node) they need (empty when no search is left).
    fn run_searches(&mut self) -> Vec<(u32, u32)> {
        loop {
            // Consistent answers never make Bob flip a bit twice, so never more flips than bits;
            // answers that contradict each other (altered on the way, or under another seed)
            // can make the cascade effect flip bits back and forth without asking anything:
            // give up (the key is then wrong, and verification or the QBER check drops it).
            if self.n_corrected > self.key.len() as u64 {
                self.finished = true;
                self.searches.clear();
                return Vec::new();
            }
            self.start_searches();
            let mut asks = Vec::new();
            let mut found = Vec::new();
            let mut changed = false;
            let mut idx = 0;
            while idx < self.searches.len() {
                let mut search = self.searches[idx];
                match self.advance(&mut search) {
                    Advance::Ask(node) => {
                        self.searches[idx] = search;
                        asks.push((search.pass, node));
                        idx += 1;
                    }
                    outcome => {
                        changed = true;
                        self.searches.swap_remove(idx);
                        let state = &mut self.passes[search.pass as usize];
                        state.searching[search.block as usize] = false;
                        match outcome {
                            Advance::Found(position) => found.push((search.pass, search.node, position)),
                            _ => state.dirty.push(search.block),
                        }
                    }
                }
            }
            for (pass, node, position) in found {
                // Another search of this round may have fixed the same bit already.
                let alice = self.passes[pass as usize].nodes[node as usize].alice;
                let original = self.shuffles.order(pass).original(position) as usize;
                if alice.is_some_and(|a| a != self.key.get(original)) {
                    self.flip(original);
                }
            }
            if !changed {
                return asks;
            }
        }
    }

    /// Starts searches on the odd dirty blocks of the earliest pass that has any, as in the
    /// sequential protocol where the smaller blocks of earlier passes are searched first: never in
    /// a pass after the earliest pass with a running search (a cheap search there may be about
    /// to correct the very error that makes the later block odd, or its partner). Blocks of
    /// later passes stay dirty; dirty blocks found even are forgotten (a later flip inside them
    /// marks them again). Letting unrelated blocks of later passes start early would save round
    /// trips on long keys but leaks more (figures: docs/postprocessing.md): their searches then
    /// hunt errors that the cascade effect would have handed to a cheaper, earlier pass.
    fn start_searches(&mut self) {
        let limit = self.searches.iter().map(|s| s.pass as usize).min().unwrap_or(self.passes.len().saturating_sub(1));
        for pass in 0..self.passes.len().min(limit + 1) {
            let state = &mut self.passes[pass];
            let mut started = false;
            for block in std::mem::take(&mut state.dirty) {
                let b = block as usize;
                if state.searching[b] || !state.block_is_odd(b) {
                    continue;
                }
                state.searching[b] = true;
                self.searches.push(Search { pass: pass as u32, block, node: block });
                started = true;
            }
            if started {
                return;
            }
        }
    }

    /// Moves one search down its binary tree while the parities it needs are known.
    fn advance(&mut self, search: &mut Search) -> Advance {
        let pass = search.pass as usize;
        let node = self.passes[pass].nodes[search.node as usize];
        // Invariant: a search's node always has a known Alice parity.
        match node.alice {
            Some(alice) if alice != self.bob_parity(pass, &node) => {}
            _ => return Advance::Dropped,
        }
        loop {
            let id = search.node as usize;
            let node = self.passes[pass].nodes[id];
            if node.hi - node.lo == 1 {
                return Advance::Found(node.lo);
            }
            let left = if node.left == NO_CHILD { self.split(pass, id) } else { node.left as usize };
            let alice_node = node.alice.expect("a searched node has a known alice parity");
            let (l, r) = (self.passes[pass].nodes[left], self.passes[pass].nodes[left + 1]);
            let alice_left = match (l.alice, r.alice) {
                (Some(a), _) => a,
                (None, Some(a)) => alice_node ^ a,
                // A side whose bits were all corrected holds no error: Alice's parity there is
                // Bob's, so nothing is asked (and nothing disclosed).
                (None, None) if self.known_correct(pass, l.lo, l.hi) => self.bob_parity(pass, &l),
                (None, None) if self.known_correct(pass, r.lo, r.hi) => alice_node ^ self.bob_parity(pass, &r),
                (None, None) => return Advance::Ask(left as u32),
            };
            let state = &mut self.passes[pass];
            state.nodes[left].alice = Some(alice_left);
            state.nodes[left + 1].alice = Some(alice_node ^ alice_left);
            search.node = if self.bob_parity(pass, &l) != alice_left { left as u32 } else { left as u32 + 1 };
        }
    }

    /// True when every bit of positions `lo..hi` of pass `pass` is known to be right: each was
    /// corrected (a binary search ends on a bit that differs from Alice's, so the flipped bit
    /// now equals hers). Only short ranges are checked.
    pub(super) fn known_correct(&self, pass: usize, lo: u32, hi: u32) -> bool {
        if hi - lo > KNOWN_CORRECT_MAX_BITS {
            return false;
        }
        let order = self.shuffles.order(pass as u32);
        (lo..hi).all(|position| self.density.is_corrected(order.original(position)))
    }

    /// Bob's current parity of `node`'s range of pass `pass`.
    fn bob_parity(&self, pass: usize, node: &Node) -> bool {
        self.shuffles.parity(&self.key, self.passes[pass].bits.as_ref(), pass as u32, node.lo, node.hi)
    }

    /// Creates the two children of node `id` of pass `pass` and returns the left one's index.
    fn split(&mut self, pass: usize, id: usize) -> usize {
        let node = self.passes[pass].nodes[id];
        let mid = self.split_point(pass, node.lo, node.hi);
        let state = &mut self.passes[pass];
        let left = state.nodes.len();
        state.nodes.push(Node::new(node.lo, mid));
        state.nodes.push(Node::new(mid, node.hi));
        state.nodes[id].left = left as u32;
        left
    }

    /// Where to split `lo..hi` (at least 2 bits) of pass `pass`: at the weighted median of the
    /// error probabilities for short ranges (see "Weighted splits" above), in the middle
    /// otherwise or when the weights say nothing.
    fn split_point(&mut self, pass: usize, lo: u32, hi: u32) -> u32 {
        let half = lo + (hi - lo) / 2;
        let weighted = pass > 0 || self.density.corrections[lo as usize / self.block_sizes[0]] > 0;
        if !weighted || hi - lo > WEIGHTED_SPLIT_MAX_BITS {
            return half;
        }
        let mut originals = std::mem::take(&mut self.scratch);
        originals.clear();
        self.shuffles.order(pass as u32).originals(lo, hi, &mut originals);
        let cut = self.density.median_cut(&originals).unwrap_or((half - lo) as usize);
        self.scratch = originals;
        lo + (cut as u32).clamp(1, hi - lo - 1)
    }

    /// Flips original bit `original` in Bob's key and in every started pass, marking the block
    /// that holds it in each pass for checking (the cascade effect), and updates the error
    /// density of its pass-1 block.
    fn flip(&mut self, original: usize) {
        self.key.flip(original);
        self.n_corrected += 1;
        for (pass, state) in self.passes.iter_mut().enumerate() {
            let position = self.shuffles.order(pass as u32).position(original as u32) as usize;
            if let Some(bits) = &mut state.bits {
                bits.flip(position);
            }
            let block = position / state.block_size;
            state.bob_block_parity[block] ^= true;
            state.dirty.push(block as u32);
        }
        // Pass 1 has started: a flip happens only after a search, which needs pass 1's parities.
        let k1 = self.block_sizes[0];
        let block = self.shuffles.order(0).position(original as u32) as usize / k1;
        let (start, end) = (block * k1, ((block + 1) * k1).min(self.key.len()));
        let PassOrder::Shuffled { perm, .. } = self.shuffles.order(0) else {
            unreachable!("pass 1 is always a Fisher-Yates pass (first_split_pass >= 3)")
        };
        self.density.record_correction(original, block, &perm[start..end]);
    }
}
