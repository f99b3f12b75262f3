//! Why a block is dropped: a typed reason (the wire's `AbortReason`) and a bounded free-text
//! detail (the measured values, the bounds they broke).
//!
//! Both ends build an [`Abort`] where they give up a block and carry it to the reports, the
//! events and the logs; the wire carries it as a `BlockAbort` message. The detail is cut to
//! [`MAX_DETAIL_BYTES`] (on a character boundary) when an abort is built and again when one is
//! received, so a peer cannot make the other end log or store an unbounded string. A reason
//! this end does not know (a newer peer's) is kept as [`AbortReason::Unknown`] and reads
//! "unknown reason N"; it still aborts the block.

use std::fmt;

use proto::link::{AbortReason as WireReason, BlockAbort};

use crate::postproc::finite_key::KeyLengthError;

/// Longest detail kept, in bytes.
pub const MAX_DETAIL_BYTES: usize = 256;

/// Why a block yields no key. Each reason but [`AbortReason::Unknown`] is one value of the
/// wire's `AbortReason`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AbortReason {
    /// The transmitter's monitored mean photon number or g2(0) exceeds its calibrated bound, or
    /// the block has no readings (Alice, at StartBlock).
    SourceMonitorOutOfBounds,
    /// Bob's detector side-slot monitor saw clicks outside the calibrated range: a detection
    /// efficiency mismatch or light outside the two time bins (Bob, after StartBlock).
    DetectorSideSlots,
    /// The block lacks the test data the phase-error estimate needs.
    NotEnoughTestData,
    /// The phase-error upper bound reaches the abort threshold.
    PhaseErrorBound,
    /// The finite-key analysis leaves no key unit (no key left, too few single photons, or a
    /// length below one key unit).
    NoSecretKey,
    /// The key-basis QBER measured by error correction exceeds `max_qber_z`.
    QberTooHigh,
    /// Bob's corrected key does not match Alice's verification tags.
    VerificationFailed,
    /// Alice's final key length differs from Bob's own evaluation of the same formula.
    KeyLengthMismatch,
    /// The two ends' transcripts of the block differ at the commit.
    TranscriptMismatch,
    /// Bob's key store holds `max_stored_units` key units: no key is distilled until keys are
    /// fetched.
    StoreFull,
    /// A security parameter is outside its range.
    InvalidSecurityParameters,
    /// A Wegman-Carter tag does not match the transcript (a message was altered, replayed or
    /// lost on the way), or a pad offset would reuse pad bits ([`crate::auth`]).
    AuthenticationFailed,
    /// The authentication key pool holds too few unused bits for the block's tags.
    AuthPoolExhausted,
    /// The two ends' authentication key pools hold different streams (a secret installed at one
    /// end only, or different secrets).
    AuthPoolsDiffer,
    /// A value of the wire's enumeration this end does not know (or an unspecified one).
    Unknown(i32),
}

impl AbortReason {
    /// The wire's value.
    pub fn to_wire(self) -> i32 {
        let wire = match self {
            AbortReason::SourceMonitorOutOfBounds => WireReason::SourceMonitorOutOfBounds,
            AbortReason::DetectorSideSlots => WireReason::DetectorSideSlots,
            AbortReason::NotEnoughTestData => WireReason::NotEnoughTestData,
            AbortReason::PhaseErrorBound => WireReason::PhaseErrorBound,
            AbortReason::NoSecretKey => WireReason::NoSecretKey,
            AbortReason::QberTooHigh => WireReason::QberTooHigh,
            AbortReason::VerificationFailed => WireReason::VerificationFailed,
            AbortReason::KeyLengthMismatch => WireReason::KeyLengthMismatch,
            AbortReason::TranscriptMismatch => WireReason::TranscriptMismatch,
            AbortReason::StoreFull => WireReason::StoreFull,
            AbortReason::InvalidSecurityParameters => WireReason::InvalidSecurityParameters,
            AbortReason::AuthenticationFailed => WireReason::AuthenticationFailed,
            AbortReason::AuthPoolExhausted => WireReason::AuthPoolExhausted,
            AbortReason::AuthPoolsDiffer => WireReason::AuthPoolsDiffer,
            AbortReason::Unknown(value) => return value,
        };
        wire as i32
    }

    /// The reason of a wire value; one this end does not know (or 0, unspecified) is
    /// [`AbortReason::Unknown`], never an error.
    pub fn from_wire(value: i32) -> Self {
        match WireReason::try_from(value) {
            Ok(WireReason::SourceMonitorOutOfBounds) => AbortReason::SourceMonitorOutOfBounds,
            Ok(WireReason::DetectorSideSlots) => AbortReason::DetectorSideSlots,
            Ok(WireReason::NotEnoughTestData) => AbortReason::NotEnoughTestData,
            Ok(WireReason::PhaseErrorBound) => AbortReason::PhaseErrorBound,
            Ok(WireReason::NoSecretKey) => AbortReason::NoSecretKey,
            Ok(WireReason::QberTooHigh) => AbortReason::QberTooHigh,
            Ok(WireReason::VerificationFailed) => AbortReason::VerificationFailed,
            Ok(WireReason::KeyLengthMismatch) => AbortReason::KeyLengthMismatch,
            Ok(WireReason::TranscriptMismatch) => AbortReason::TranscriptMismatch,
            Ok(WireReason::StoreFull) => AbortReason::StoreFull,
            Ok(WireReason::InvalidSecurityParameters) => AbortReason::InvalidSecurityParameters,
            Ok(WireReason::AuthenticationFailed) => AbortReason::AuthenticationFailed,
            Ok(WireReason::AuthPoolExhausted) => AbortReason::AuthPoolExhausted,
            Ok(WireReason::AuthPoolsDiffer) => AbortReason::AuthPoolsDiffer,
            Ok(WireReason::Unspecified) | Err(_) => AbortReason::Unknown(value),
        }
    }
}

impl fmt::Display for AbortReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Named after the check that failed, so that "reason: detail" reads as one sentence.
        let text = match self {
            AbortReason::SourceMonitorOutOfBounds => "source monitor",
            AbortReason::DetectorSideSlots => "detector side-slot monitor",
            AbortReason::NotEnoughTestData => "not enough test data",
            AbortReason::PhaseErrorBound => "phase error bound",
            AbortReason::NoSecretKey => "no secret key",
            AbortReason::QberTooHigh => "QBER too high",
            AbortReason::VerificationFailed => "verification failed",
            AbortReason::KeyLengthMismatch => "key length mismatch",
            AbortReason::TranscriptMismatch => "transcript mismatch",
            AbortReason::StoreFull => "key store full",
            AbortReason::InvalidSecurityParameters => "invalid security parameters",
            AbortReason::AuthenticationFailed => "authentication failed",
            AbortReason::AuthPoolExhausted => "authentication key pool exhausted",
            AbortReason::AuthPoolsDiffer => "authentication key pools differ",
            AbortReason::Unknown(value) => return write!(f, "unknown reason {value}"),
        };
        f.write_str(text)
    }
}

/// A block given up: why, and the particulars (at most [`MAX_DETAIL_BYTES`] bytes). Displays as
/// "reason: detail" (as the detail alone when it already starts with the reason's text, as the
/// messages of the checks do); serializes as that string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Abort {
    /// Why.
    pub reason: AbortReason,
    /// The particulars, bounded.
    detail: String,
}

impl Abort {
    /// An abort for `reason`, its detail cut to [`MAX_DETAIL_BYTES`].
    pub fn new(reason: AbortReason, detail: impl Into<String>) -> Self {
        Self { reason, detail: bounded(detail.into()) }
    }

    /// The particulars (bounded).
    pub fn detail(&self) -> &str {
        &self.detail
    }

    /// The abort a failed finite-key step (parameter estimation or the key length) stands for;
    /// the error's message is the detail.
    pub fn from_key_length_error(error: &KeyLengthError) -> Self {
        let reason = match error {
            KeyLengthError::MonitorExceeded { .. } => AbortReason::SourceMonitorOutOfBounds,
            KeyLengthError::NotEnoughTestData { .. } => AbortReason::NotEnoughTestData,
            KeyLengthError::InvalidParams { .. } => AbortReason::InvalidSecurityParameters,
            KeyLengthError::PhaseErrorTooHigh { .. } => AbortReason::PhaseErrorBound,
            KeyLengthError::NoSinglePhotons { .. } | KeyLengthError::NoKeyLeft { .. } => AbortReason::NoSecretKey,
        };
        Abort::new(reason, error.to_string())
    }

    /// The wire message.
    pub fn to_wire(&self) -> BlockAbort {
        BlockAbort { reason: self.reason.to_wire(), detail: self.detail.clone() }
    }

    /// From the wire: an unknown reason is kept as such, the detail is cut to
    /// [`MAX_DETAIL_BYTES`].
    pub fn from_wire(wire: &BlockAbort) -> Self {
        Abort::new(AbortReason::from_wire(wire.reason), wire.detail.as_str())
    }
}

impl fmt::Display for Abort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let reason = self.reason.to_string();
        if self.detail.is_empty() {
            f.write_str(&reason)
        } else if self.detail.starts_with(&reason) {
            f.write_str(&self.detail)
        } else {
            write!(f, "{reason}: {}", self.detail)
        }
    }
}

impl serde::Serialize for Abort {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// `detail` cut to at most [`MAX_DETAIL_BYTES`] bytes, on a character boundary.
fn bounded(mut detail: String) -> String {
    if detail.len() > MAX_DETAIL_BYTES {
        let mut end = MAX_DETAIL_BYTES;
        while !detail.is_char_boundary(end) {
            end -= 1;
        }
        detail.truncate(end);
    }
    detail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_survives_the_wire_and_unknown_values_are_named() {
        let reasons = [
            AbortReason::SourceMonitorOutOfBounds,
            AbortReason::DetectorSideSlots,
            AbortReason::NotEnoughTestData,
            AbortReason::PhaseErrorBound,
            AbortReason::NoSecretKey,
            AbortReason::QberTooHigh,
            AbortReason::VerificationFailed,
            AbortReason::KeyLengthMismatch,
            AbortReason::TranscriptMismatch,
            AbortReason::StoreFull,
            AbortReason::InvalidSecurityParameters,
            AbortReason::AuthenticationFailed,
            AbortReason::AuthPoolExhausted,
            AbortReason::AuthPoolsDiffer,
        ];
        for reason in reasons {
            assert_ne!(reason.to_wire(), 0, "{reason}");
            assert_eq!(AbortReason::from_wire(reason.to_wire()), reason);
        }
        let unknown = Abort::from_wire(&BlockAbort { reason: 9999, detail: "from the future".into() });
        assert_eq!(unknown.reason, AbortReason::Unknown(9999));
        assert_eq!(unknown.to_string(), "unknown reason 9999: from the future");
        assert_eq!(AbortReason::from_wire(0).to_string(), "unknown reason 0");
        assert_eq!(Abort::new(AbortReason::StoreFull, "").to_string(), "key store full");
        assert_eq!(Abort::new(AbortReason::QberTooHigh, "QBER in Z 12 %").to_string(), "QBER too high: QBER in Z 12 %");
        let monitor = KeyLengthError::MonitorExceeded { reason: "measured g2(0) 1 exceeds g2_max 0.1".into() };
        let abort = Abort::from_key_length_error(&monitor);
        assert_eq!(abort.reason, AbortReason::SourceMonitorOutOfBounds);
        assert_eq!(abort.to_string(), "source monitor: measured g2(0) 1 exceeds g2_max 0.1");
    }

    #[test]
    fn details_are_bounded_on_a_character_boundary_both_ways() {
        // 'é' is two bytes: 129 of them straddle the limit at byte 256.
        let long = "é".repeat(200);
        let sent = Abort::new(AbortReason::QberTooHigh, long.clone());
        assert_eq!(sent.detail().len(), MAX_DETAIL_BYTES);
        let odd = format!("x{long}");
        let cut = Abort::new(AbortReason::QberTooHigh, odd.clone());
        assert_eq!(cut.detail().len(), MAX_DETAIL_BYTES - 1);
        assert!(odd.starts_with(cut.detail()));
        let received = Abort::from_wire(&BlockAbort { reason: AbortReason::QberTooHigh.to_wire(), detail: odd });
        assert_eq!(received, cut);
        assert_eq!(serde_json::to_value(&received).unwrap(), serde_json::Value::String(received.to_string()));
    }
}
