//! Sifting and the test data of one frame: the rules both sides apply, so that both derive the
//! same key-bit positions and the same parameter-estimation counts.
//!
//! Bob announces, per frame, which pulses clicked and in which basis; for X-basis clicks he
//! also announces the outcome (test data, never key). Alice answers with her basis for each
//! click, and reveals her full state for the clicks Bob measured in X (also never key). Key bits
//! are the clicks where Alice sent Z and Bob measured Z, in pulse order: Alice's bit is
//! 0 for |E>, 1 for |L>; Bob's is 0 for an early arrival, 1 for a late one. Z-sent/X-measured
//! and X-sent/X-measured clicks are counted by (state sent, outcome) into [`XCounts`], which the
//! phase-error estimate needs (the model of the reference experiment, Wang et al. 2026).

use crate::bits::BitVec;
use crate::postproc::finite_key::XCounts;
use crate::prepared::TxStates;
use crate::quantum::{Detection, Measurement, State};
use crate::wire::{WireError, decode_deltas, encode_deltas};
use zeroize::Zeroize;

/// Bob's announcement code: measured in Z (outcome kept secret).
const BOB_Z: u8 = 0;
/// Bob's announcement code: measured in X, detector D+.
const BOB_X_PLUS: u8 = 1;
/// Bob's announcement code: measured in X, detector D-.
const BOB_X_MINUS: u8 = 2;

/// Alice's answer code: she sent a Z state (Bob measured Z).
const ALICE_Z: u8 = 0;
/// Alice's answer code: she sent |+> (Bob measured Z).
const ALICE_X: u8 = 1;
/// Alice's answer code for a Bob-X click: she sent |E>.
const ALICE_REVEAL_E: u8 = 2;
/// Alice's answer code for a Bob-X click: she sent |L>.
const ALICE_REVEAL_L: u8 = 3;
/// Alice's answer code for a Bob-X click: she sent |+>.
const ALICE_REVEAL_PLUS: u8 = 4;

/// What one side takes from a sifted frame.
#[derive(Debug, Default)]
pub struct FrameSift {
    /// Sifted key bits (Z sent, Z measured), in pulse order.
    pub key_bits: BitVec,
    /// Test-data counts (X measured) by state sent and outcome.
    pub x_counts: XCounts,
}

/// Bob's announcement of one frame's detections: gap-encoded pulse indices and one code per
/// detection.
pub fn announce(detections: &[Detection]) -> (Vec<u8>, Vec<u8>) {
    let deltas = encode_deltas(detections.iter().map(|d| d.pulse_idx));
    let codes = detections
        .iter()
        .map(|d| match d.measurement {
            Measurement::Z { .. } => BOB_Z,
            Measurement::X { minus: false } => BOB_X_PLUS,
            Measurement::X { minus: true } => BOB_X_MINUS,
        })
        .collect();
    (deltas, codes)
}

/// Detections whose states [`alice_sift`] computes per batch ([`TxStates::fill_states`]).
const CHUNK: usize = 256;

/// Alice's answer code by Bob's announcement code (row) and her state's wire code (column).
const ALICE_ANSWER: [[u8; 4]; 3] = [
    [ALICE_Z, ALICE_Z, ALICE_X, ALICE_X],
    [ALICE_REVEAL_E, ALICE_REVEAL_L, ALICE_REVEAL_PLUS, ALICE_REVEAL_PLUS],
    [ALICE_REVEAL_E, ALICE_REVEAL_L, ALICE_REVEAL_PLUS, ALICE_REVEAL_PLUS],
];

/// Alice's side: answers Bob's announcement from the states she prepared and takes her sifted bits and
/// the test counts.
pub fn alice_sift(
    frame: &TxStates,
    n_pulses: u64,
    click_deltas: &[u8],
    bob_codes: &[u8],
) -> Result<(Vec<u8>, FrameSift), WireError> {
    let indices = decode_deltas(click_deltas, n_pulses)?;
    if indices.len() != bob_codes.len() {
        return Err(WireError::Length { what: "bob_measurements", expected: indices.len(), got: bob_codes.len() });
    }
    if let Some(&code) = bob_codes.iter().find(|&&code| code > BOB_X_MINUS) {
        return Err(WireError::Code { what: "bob_measurements", code });
    }
    let mut answer = vec![0u8; indices.len()];
    let mut key_bits = BitPacker::with_capacity(indices.len());
    // tally[Bob's code][Alice's state code]: every detection counted once, without branches.
    let mut tally = [[0u64; 4]; 3];
    let mut states = [State::Plus; CHUNK];
    for ((indices, codes), answers) in indices.chunks(CHUNK).zip(bob_codes.chunks(CHUNK)).zip(answer.chunks_mut(CHUNK))
    {
        let states = &mut states[..indices.len()];
        frame.fill_states(indices, states);
        for ((&state, &code), answer) in states.iter().zip(codes).zip(answers.iter_mut()) {
            let (code, state_code) = (usize::from(code), usize::from(state.code()));
            *answer = ALICE_ANSWER[code][state_code];
            tally[code][state_code] += 1;
            // Key bit: Bob measured Z and Alice sent |E> (0) or |L> (1).
            key_bits.push_if(code == usize::from(BOB_Z) && state_code <= 1, state_code == 1);
        }
    }
    let [_, plus, minus] = tally;
    let x_counts = XCounts {
        e_plus: plus[0],
        e_minus: minus[0],
        l_plus: plus[1],
        l_minus: minus[1],
        plus_plus: plus[2] + plus[3],
        plus_minus: minus[2] + minus[3],
    };
    Ok((answer, FrameSift { key_bits: key_bits.finish(), x_counts }))
}

/// The answer codes valid for Bob's Z clicks, X+ clicks and X- clicks, as bit masks.
const VALID_ANSWERS: [u16; 3] = [
    1 << ALICE_Z | 1 << ALICE_X,
    1 << ALICE_REVEAL_E | 1 << ALICE_REVEAL_L | 1 << ALICE_REVEAL_PLUS,
    1 << ALICE_REVEAL_E | 1 << ALICE_REVEAL_L | 1 << ALICE_REVEAL_PLUS,
];

/// Bob's side: applies Alice's answer to his own detections.
pub fn bob_sift(detections: &[Detection], alice_answer: &[u8]) -> Result<FrameSift, WireError> {
    if detections.len() != alice_answer.len() {
        return Err(WireError::Length { what: "alice_info", expected: detections.len(), got: alice_answer.len() });
    }
    let mut key_bits = BitPacker::with_capacity(detections.len());
    // tally[0: Bob measured Z, 1: X and +, 2: X and -][Alice's answer code]; each pair is valid
    // (Z with ALICE_Z or ALICE_X, X with a reveal) or the answer is rejected.
    let mut tally = [[0u64; 5]; 3];
    for (detection, &code) in detections.iter().zip(alice_answer) {
        let (bob, late) = match detection.measurement {
            Measurement::Z { late } => (0, late),
            Measurement::X { minus } => (1 + usize::from(minus), false),
        };
        if (VALID_ANSWERS[bob] >> code.min(15)) & 1 == 0 {
            return Err(WireError::Code { what: "alice_info", code });
        }
        tally[bob][usize::from(code)] += 1;
        key_bits.push_if(bob == 0 && code == ALICE_Z, late);
    }
    let [_, plus, minus] = tally;
    let (e, l, p) = (usize::from(ALICE_REVEAL_E), usize::from(ALICE_REVEAL_L), usize::from(ALICE_REVEAL_PLUS));
    let x_counts = XCounts {
        e_plus: plus[e],
        e_minus: minus[e],
        l_plus: plus[l],
        l_minus: minus[l],
        plus_plus: plus[p],
        plus_minus: minus[p],
    };
    Ok(FrameSift { key_bits: key_bits.finish(), x_counts })
}

/// Appends bits to a packed bit string a word at a time, a bit only where a condition holds,
/// without a branch per bit; wiped on drop like [`BitVec`].
struct BitPacker {
    words: Vec<u64>,
    /// Bits not yet in `words`, the first at bit 0.
    current: u64,
    /// Bits in `current` (below 64).
    fill: u32,
}

impl BitPacker {
    fn with_capacity(n_bits: usize) -> Self {
        Self { words: Vec::with_capacity(n_bits.div_ceil(64)), current: 0, fill: 0 }
    }

    /// Appends `bit` when `keep` holds.
    #[inline]
    fn push_if(&mut self, keep: bool, bit: bool) {
        self.current |= u64::from(keep & bit) << self.fill;
        self.fill += u32::from(keep);
        if self.fill == 64 {
            self.words.push(self.current);
            self.current = 0;
            self.fill = 0;
        }
    }

    fn finish(mut self) -> BitVec {
        let n_bits = 64 * self.words.len() + self.fill as usize;
        if self.fill > 0 {
            self.words.push(self.current);
        }
        BitVec::from_words(std::mem::take(&mut self.words), n_bits)
    }
}

impl Drop for BitPacker {
    /// Wipes the key bits of an unfinished string (an answer rejected halfway).
    fn drop(&mut self) {
        self.words.zeroize();
        self.current.zeroize();
    }
}

#[cfg(test)]
mod tests;
