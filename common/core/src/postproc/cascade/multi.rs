//! Many frames in one exchange: Bob's [`MultiCascadeBob`] merges the query batches of all his
//! frames into one per round trip, Alice's [`MultiCascadeAlice`] answers them frame by frame.
//! Both ends pad every frame to the longest one's length, so that one set of shuffles serves
//! them all.

use std::sync::Arc;

use super::alice::CascadeAlice;
use super::bob::CascadeBob;
use super::shuffles::CascadeShuffles;
use super::{CascadeError, CascadeOutcome, FrameParityQuery};
use crate::bits::BitVec;

/// Bob's end of a multi-frame exchange: several frames reconciled at once, their query batches
/// merged so that each round trip serves every frame that still has questions.
///
/// All frames use one shuffle seed (the shuffles are computed once per key length and shared);
/// the batch is the concatenation, in frame order, of each unfinished frame's batch, every query
/// tagged with its frame index.
pub struct MultiCascadeBob {
    frames: Vec<CascadeBob>,
    /// Per frame: its length before padding, in bits.
    lengths: Vec<usize>,
    /// Per frame: the number of queries it has in the outstanding batch.
    outstanding_counts: Option<Vec<usize>>,
    round_trips: u32,
}

impl MultiCascadeBob {
    /// Bob's end for `noisy_keys` (any lengths), one QBER estimate for all, and the shuffle seed
    /// shared with Alice. Every frame is reconciled at the length of the longest one, shorter
    /// frames padded with zeros (see [`pad_frames`]).
    ///
    /// Panics when a key has 2^32 bits or more, or when there are 2^32 frames or more.
    pub fn new(noisy_keys: Vec<BitVec>, qber_estimate: f64, seed: [u8; 32]) -> Self {
        assert!(u32::try_from(noisy_keys.len()).is_ok(), "fewer than 2^32 frames");
        let lengths: Vec<usize> = noisy_keys.iter().map(BitVec::len).collect();
        let (padded, shuffles) = pad_frames(noisy_keys, seed);
        let frames =
            padded.into_iter().map(|key| CascadeBob::with_shuffles(key, qber_estimate, shuffles.clone())).collect();
        Self { frames, lengths, outstanding_counts: None, round_trips: 0 }
    }

    /// Number of frames.
    pub fn n_frames(&self) -> usize {
        self.frames.len()
    }

    /// The next merged batch, or None when every frame is finished. Until the batch is answered
    /// through [`MultiCascadeBob::receive`], calling this again returns the same batch.
    pub fn next_queries(&mut self) -> Option<Vec<FrameParityQuery>> {
        let mut batch = Vec::new();
        let mut counts = Vec::with_capacity(self.frames.len());
        for (frame, bob) in self.frames.iter_mut().enumerate() {
            let queries = bob.next_queries().unwrap_or_default();
            counts.push(queries.len());
            batch.extend(queries.iter().map(|q| FrameParityQuery {
                frame: frame as u32,
                pass: q.pass,
                start: q.start,
                end: q.end,
            }));
        }
        if batch.is_empty() {
            return None;
        }
        if self.outstanding_counts.is_none() {
            self.round_trips += 1;
        }
        self.outstanding_counts = Some(counts);
        Some(batch)
    }

    /// Feeds Alice's answers to the batch last returned by [`MultiCascadeBob::next_queries`], in
    /// the same order. A batch of the wrong size is refused and stays outstanding.
    pub fn receive(&mut self, parities: &[bool]) -> Result<(), CascadeError> {
        let Some(counts) = self.outstanding_counts.take() else {
            return Err(CascadeError::NoOutstandingQueries);
        };
        let expected: usize = counts.iter().sum();
        if expected != parities.len() {
            self.outstanding_counts = Some(counts);
            return Err(CascadeError::AnswerCountMismatch { expected, got: parities.len() });
        }
        let mut offset = 0;
        for (bob, &count) in self.frames.iter_mut().zip(&counts) {
            if count > 0 {
                bob.receive(&parities[offset..offset + count])?;
                offset += count;
            }
        }
        Ok(())
    }

    /// Parities received so far over all frames, in bits.
    pub fn leak_bits(&self) -> u64 {
        self.frames.iter().map(CascadeBob::leak_bits).sum()
    }

    /// Number of merged batches sent so far, i.e. round trips of the exchange.
    pub fn round_trips(&self) -> u32 {
        self.round_trips
    }

    /// Each frame's outcome, in frame order; call it once [`MultiCascadeBob::next_queries`] has
    /// returned None. A frame's `round_trips` counts the batches it took part in.
    pub fn finish(self) -> Vec<CascadeOutcome> {
        self.frames
            .into_iter()
            .zip(self.lengths)
            .map(|(bob, len)| {
                let mut outcome = bob.finish();
                if outcome.key.len() != len {
                    outcome.key = outcome.key.slice(0, len);
                }
                outcome
            })
            .collect()
    }
}

/// The frames of a multi-frame exchange, each padded with zero bits at its end to the length of
/// the longest, and the one set of shuffles they share.
///
/// Both ends pad alike, so the padding bits agree and never hold an error; a parity over them
/// discloses nothing more than one over the frame's own bits. Sharing one length matters for
/// memory: a block cut into frames of two lengths (n and n + 1 bits, see the link's
/// `cascade_frames`) would otherwise build two sets of shuffles, about 40 bytes per bit each.
fn pad_frames(keys: Vec<BitVec>, seed: [u8; 32]) -> (Vec<BitVec>, Arc<CascadeShuffles>) {
    let n_bits = keys.iter().map(BitVec::len).max().unwrap_or(0);
    let shuffles = Arc::new(CascadeShuffles::new(seed, n_bits));
    let padded = keys
        .into_iter()
        .map(|mut key| {
            while key.len() < n_bits {
                key.push(false);
            }
            key
        })
        .collect();
    (padded, shuffles)
}

/// Alice's end of a multi-frame exchange: answers [`FrameParityQuery`]s about her frames.
pub struct MultiCascadeAlice {
    frames: Vec<CascadeAlice>,
}

impl MultiCascadeAlice {
    /// Alice's end for `keys` (in the frame order Bob uses) and the shuffle seed shared with Bob.
    /// Frames shorter than the longest are padded with zeros, as Bob's (see [`pad_frames`]).
    pub fn new(keys: &[BitVec], seed: [u8; 32]) -> Self {
        let (padded, shuffles) = pad_frames(keys.to_vec(), seed);
        let frames = padded.iter().map(|key| CascadeAlice::with_shuffles(key, shuffles.clone())).collect();
        Self { frames }
    }

    /// Answers a merged batch, one parity per query in order; every answered bit counts as
    /// disclosed for its frame. A batch with any invalid query is refused whole and discloses
    /// nothing.
    pub fn answer(&mut self, queries: &[FrameParityQuery]) -> Result<Vec<bool>, CascadeError> {
        for q in queries {
            let frame = self
                .frames
                .get(q.frame as usize)
                .ok_or(CascadeError::FrameOutOfRange { frame: q.frame, n_frames: self.frames.len() })?;
            frame.check(&q.query())?;
        }
        let parities = queries.iter().map(|q| self.frames[q.frame as usize].disclose(&q.query())).collect();
        Ok(parities)
    }

    /// Parities answered so far for frame `frame`, in bits (None for an unknown frame).
    pub fn frame_leak_bits(&self, frame: usize) -> Option<u64> {
        self.frames.get(frame).map(CascadeAlice::leak_bits)
    }

    /// Parities answered so far over all frames, in bits.
    pub fn leak_bits(&self) -> u64 {
        self.frames.iter().map(CascadeAlice::leak_bits).sum()
    }
}
