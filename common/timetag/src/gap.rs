//! Gap handling: intervals where the tagger lost data (FIFO overflow, a lost USB buffer, a
//! paused acquisition) must never leave a frame half used, because Alice would count the lost
//! pulses as sent and not detected. A frame that overlaps a gap is dropped entirely and
//! reported by its index (so that the daemon can tell Alice to drop the same frame).
//!
//! A gap is given in tagger time ([`crate::tags::Record::Gap`]); which frames it touches
//! depends on the clock, so gaps wait here until the clock model covers their start. A pulse's
//! tags fall within a known range of pulse coordinates relative to the pulse (its *reach*: the
//! detectors' pattern shifts plus the pulse offset, see [`crate::assign`]); a pulse is touched
//! when that range meets the gap's coordinates, widened by one pulse on each side for the
//! model's error, and its frame is dropped.

use std::ops::RangeInclusive;

/// Gaps not yet mapped to frames, in tagger ps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PendingGaps {
    gaps: Vec<(u64, u64)>,
}

impl PendingGaps {
    /// No gaps.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records data lost between `from_ps` and `to_ps` (swapped if given backwards).
    pub fn push(&mut self, from_ps: u64, to_ps: u64) {
        self.gaps.push((from_ps.min(to_ps), from_ps.max(to_ps)));
    }

    /// Gaps waiting.
    pub fn len(&self) -> usize {
        self.gaps.len()
    }

    /// Whether no gap is waiting.
    pub fn is_empty(&self) -> bool {
        self.gaps.is_empty()
    }

    /// Maps the gaps that start before `final_time` to the frames they touch (appended to
    /// `out`) and forgets them; later gaps keep waiting. `coordinate` gives the pulse coordinate
    /// of a tagger time (extrapolated beyond `final_time` if need be); `reach` and
    /// `frame_pulses` as in [`frames_touched`].
    pub fn resolve(
        &mut self,
        final_time: u64,
        coordinate: impl Fn(u64) -> f64,
        reach: (f64, f64),
        frame_pulses: u64,
        out: &mut Vec<RangeInclusive<i64>>,
    ) {
        self.gaps.retain(|&(from, to)| {
            if from >= final_time {
                return true;
            }
            out.push(frames_touched(coordinate(from), coordinate(to), reach, frame_pulses));
            false
        });
    }
}

/// The frames (indices, inclusive) whose pulses may have tags in the pulse coordinates
/// [`u_from`, `u_to`]: a pulse k has its tags in [k + reach.0, k + reach.1), and one pulse of
/// margin is added on each side.
pub fn frames_touched(u_from: f64, u_to: f64, reach: (f64, f64), frame_pulses: u64) -> RangeInclusive<i64> {
    let f = frame_pulses.max(1) as i64;
    let first_pulse = (u_from - reach.1).floor() as i64 - 1;
    let last_pulse = (u_to - reach.0).floor() as i64 + 1;
    first_pulse.div_euclid(f)..=last_pulse.div_euclid(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gap_inside_a_frame_drops_that_frame_only() {
        // Frames of 1000 pulses; tags within [k - 0.2, k + 0.8) of pulse k.
        let reach = (-0.2, 0.8);
        assert_eq!(frames_touched(2100.0, 2500.0, reach, 1000), 2..=2);
        // A gap spanning a boundary drops both frames.
        assert_eq!(frames_touched(2990.0, 3010.0, reach, 1000), 2..=3);
        // Close to a boundary, the margin drops the neighbour too (never half a frame).
        assert_eq!(frames_touched(3000.3, 3005.0, reach, 1000), 2..=3);
        assert_eq!(frames_touched(2995.0, 2998.5, reach, 1000), 2..=2);
        assert_eq!(frames_touched(2995.0, 2998.9, reach, 1000), 2..=3);
        // A long gap drops every frame it covers; negative coordinates give negative frames.
        assert_eq!(frames_touched(-5.0, 10_500.0, reach, 1000), -1..=10);
    }

    #[test]
    fn gaps_wait_until_the_clock_covers_them() {
        let mut g = PendingGaps::new();
        g.push(5_000, 6_000);
        g.push(20_000, 10_000);
        assert_eq!(g.len(), 2);
        let mut out = Vec::new();
        // One pulse per 100 ps, frames of 10 pulses.
        let coord = |t: u64| t as f64 / 100.0;
        g.resolve(8_000, coord, (0.0, 1.0), 10, &mut out);
        assert_eq!(out, vec![4..=6]);
        assert_eq!(g.len(), 1);
        g.resolve(12_000, coord, (0.0, 1.0), 10, &mut out);
        assert_eq!(out[1], 9..=20);
        assert!(g.is_empty());
    }
}
