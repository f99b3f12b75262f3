//! Alice's end: a parity oracle over her key. She answers any valid [`ParityQuery`] in the
//! order of its pass and counts every answered parity as disclosed; which ranges to ask is Bob's
//! business alone.

use std::sync::Arc;

use super::schedule::N_PASSES;
use super::shuffles::CascadeShuffles;
use super::{CascadeError, ParityQuery};
use crate::bits::BitVec;

/// Alice's end: answers parity queries about her key and counts what she disclosed.
pub struct CascadeAlice {
    key: BitVec,
    shuffles: Arc<CascadeShuffles>,
    /// Her key in each Fisher-Yates pass's order, built when the pass is first queried.
    shuffled: Vec<Option<BitVec>>,
    leak_bits: u64,
}

impl CascadeAlice {
    /// Alice's end for `key`, with the shuffle seed shared with Bob.
    pub fn new(key: &BitVec, seed: [u8; 32]) -> Self {
        Self::with_shuffles(key, Arc::new(CascadeShuffles::new(seed, key.len())))
    }

    /// Alice's end for `key` with shuffles shared with other frames of the same seed.
    ///
    /// Panics when the shuffles are for another key length (a programming error).
    pub fn with_shuffles(key: &BitVec, shuffles: Arc<CascadeShuffles>) -> Self {
        assert_eq!(shuffles.n_bits(), key.len(), "cascade shuffles are for another key length");
        Self { key: key.clone(), shuffles, shuffled: vec![None; N_PASSES as usize], leak_bits: 0 }
    }

    /// Answers a batch of queries, one parity per query in order; every answered bit counts as
    /// disclosed (leak). A batch with any invalid query is refused whole and discloses nothing.
    pub fn answer(&mut self, queries: &[ParityQuery]) -> Result<Vec<bool>, CascadeError> {
        for q in queries {
            self.check(q)?;
        }
        let parities = queries.iter().map(|q| self.parity(q)).collect();
        self.leak_bits += queries.len() as u64;
        Ok(parities)
    }

    /// Number of parities answered so far, in bits.
    pub fn leak_bits(&self) -> u64 {
        self.leak_bits
    }

    /// Refuses a query whose pass or range is invalid.
    pub(super) fn check(&self, q: &ParityQuery) -> Result<(), CascadeError> {
        let n_bits = self.key.len();
        if q.pass >= N_PASSES {
            return Err(CascadeError::PassOutOfRange { pass: q.pass, n_passes: N_PASSES });
        }
        if q.start >= q.end || q.end as usize > n_bits {
            return Err(CascadeError::BadRange { start: q.start, end: q.end, n_bits });
        }
        Ok(())
    }

    /// Alice's parity for a checked query, counted as disclosed.
    pub(super) fn disclose(&mut self, q: &ParityQuery) -> bool {
        self.leak_bits += 1;
        self.parity(q)
    }

    /// Alice's parity for a checked query (not counted).
    fn parity(&mut self, q: &ParityQuery) -> bool {
        let (key, shuffles) = (&self.key, &self.shuffles);
        let pass = q.pass as usize;
        if self.shuffled[pass].is_none() {
            self.shuffled[pass] = shuffles.shuffled_key(key, q.pass);
        }
        shuffles.parity(key, self.shuffled[pass].as_ref(), q.pass, q.start, q.end)
    }
}
