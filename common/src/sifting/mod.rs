//! Sifting and the test data of one frame: the rules both sides apply, so that both derive the
//! same key-bit positions and the same parameter-estimation counts.
//!
//! Bob announces, per frame, which pulses clicked and in which basis; for X-basis clicks he
//! also announces the outcome (test data, never key). Alice answers with her basis for each
//! click, and reveals her full state for the clicks Bob measured in X (also never key). Key bits
//! are the clicks where Alice sent Z and Bob measured Z, in pulse order: Alice's bit is
//! 0 for |E>, 1 for |L>; Bob's is 0 for an early arrival, 1 for a late one. Z-sent/X-measured
//! and X-sent/X-measured clicks are counted by (state sent, outcome) into [`XCounts`], which the
//! phase-error estimate needs (seed-experiment.md, "Phase error of the single-photon Z key").

use crate::bits::BitVec;
use crate::postproc::finite_key::XCounts;
use crate::sim::{Detection, FrameSecret, Measurement, State, alice_state};
use crate::wire::{WireError, decode_deltas, encode_deltas};

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

/// Alice's side: answers Bob's announcement from her frame secret and takes her sifted bits and
/// the test counts.
pub fn alice_sift(
    secret: &FrameSecret,
    p_z: f64,
    n_pulses: u64,
    click_deltas: &[u8],
    bob_codes: &[u8],
) -> Result<(Vec<u8>, FrameSift), WireError> {
    let indices = decode_deltas(click_deltas, n_pulses)?;
    if indices.len() != bob_codes.len() {
        return Err(WireError::Length { what: "bob_measurements", expected: indices.len(), got: bob_codes.len() });
    }
    let mut answer = Vec::with_capacity(indices.len());
    let mut sift = FrameSift::default();
    for (&pulse_idx, &code) in indices.iter().zip(bob_codes) {
        let state = alice_state(secret, pulse_idx, p_z);
        match code {
            BOB_Z => match state {
                State::Early | State::Late => {
                    answer.push(ALICE_Z);
                    sift.key_bits.push(state == State::Late);
                }
                State::Plus | State::Minus => answer.push(ALICE_X),
            },
            BOB_X_PLUS | BOB_X_MINUS => {
                answer.push(match state {
                    State::Early => ALICE_REVEAL_E,
                    State::Late => ALICE_REVEAL_L,
                    State::Plus | State::Minus => ALICE_REVEAL_PLUS,
                });
                count(&mut sift.x_counts, state, code == BOB_X_MINUS);
            }
            code => return Err(WireError::Code { what: "bob_measurements", code }),
        }
    }
    Ok((answer, sift))
}

/// Bob's side: applies Alice's answer to his own detections.
pub fn bob_sift(detections: &[Detection], alice_answer: &[u8]) -> Result<FrameSift, WireError> {
    if detections.len() != alice_answer.len() {
        return Err(WireError::Length { what: "alice_info", expected: detections.len(), got: alice_answer.len() });
    }
    let mut sift = FrameSift::default();
    for (detection, &code) in detections.iter().zip(alice_answer) {
        match (detection.measurement, code) {
            (Measurement::Z { late }, ALICE_Z) => sift.key_bits.push(late),
            (Measurement::Z { .. }, ALICE_X) => {}
            (Measurement::X { minus }, ALICE_REVEAL_E) => count(&mut sift.x_counts, State::Early, minus),
            (Measurement::X { minus }, ALICE_REVEAL_L) => count(&mut sift.x_counts, State::Late, minus),
            (Measurement::X { minus }, ALICE_REVEAL_PLUS) => count(&mut sift.x_counts, State::Plus, minus),
            (_, code) => return Err(WireError::Code { what: "alice_info", code }),
        }
    }
    Ok(sift)
}

fn count(counts: &mut XCounts, state: State, minus: bool) {
    let slot = match (state, minus) {
        (State::Early, false) => &mut counts.e_plus,
        (State::Early, true) => &mut counts.e_minus,
        (State::Late, false) => &mut counts.l_plus,
        (State::Late, true) => &mut counts.l_minus,
        (State::Plus | State::Minus, false) => &mut counts.plus_plus,
        (State::Plus | State::Minus, true) => &mut counts.plus_minus,
    };
    *slot += 1;
}

#[cfg(test)]
mod tests;
