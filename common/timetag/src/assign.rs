//! Pulse index and time-bin assignment: from a tag's pulse coordinate (see [`crate::clock`]) to
//! the pulse it belongs to and the window it fell in, and from a frame's clicks to its
//! detections.
//!
//! # Windows
//! Each detector channel sees a fixed pattern of peaks per pulse, at phases set by its cable
//! and detector delays: the Z detector an early and a late peak one bin separation (tau) apart;
//! D+ and D- behind the unbalanced interferometer three slots tau apart (0: early bin through
//! the short arm; 1, the central slot: where the two arms interfere; 2: late bin through the long
//! arm). A window spans [peak - `before_ps`, peak + `after_ps`) (asymmetric windows suit detector
//! responses with a slow tail). The peaks are found from a histogram of the tags' phases
//! ([`PhaseHistogram`], [`find_peaks`]): the pattern position that captures the most tags, then
//! each peak refined alone within `search_ps`; or given directly ([`Calibration`]).
//!
//! Phases are fractions of the local pulse period in the hot path (fixed point, 2^-32 of a
//! period); the public types speak ps of the nominal period (the +-100 ppm between the two move a
//! pattern by less than 1.3 ps).
//!
//! # Which pulse
//! A channel's tags are shifted so that its pattern sits in the middle of a period: a tag at
//! coordinate u belongs to pulse floor(u - s) - `pulse_offset`, with s the pattern's centre
//! minus half a period. With `pulse_offset` 0, pulse k is the one whose first peak (early bin,
//! slot 0) lies in [k, k + 1) of the coordinate: the sync (or the data-only origin) fixes the
//! pulse count only up to whole periods of cable delay, which `pulse_offset` corrects (found by
//! correlating with Alice's states; it cannot be seen in the tags).
//!
//! # Outcomes and squashing
//! A click in the early/late window of the Z detector is a Z measurement; a click in the
//! central-slot window of D+ or D- an X measurement; a click in a side-slot window is counted
//! (for the detection-mismatch monitor, [`qkd_core::postproc::finite_key::XSlotCounts`], as the
//! simulator's receiver counts it: every X click in a used window, before squashing) and never
//! a detection; a click outside every window is discarded and counted. Several clicks on one
//! pulse are squashed exactly as the simulator's receiver (`common::sim::receiver`) does: if
//! both bases clicked, a basis is chosen uniformly at random; within that basis a clicked
//! outcome is chosen uniformly at random (a double click in one basis becomes a random bit).
//! The coin is injected: on real data it must be a cryptographic generator (the random bit of a
//! double click is key).

use qkd_core::postproc::finite_key::XSlotCounts;
use qkd_core::quantum::{Detection, Measurement};

use crate::tags::Role;

/// Outcome codes of a click: the four measurements in the order of [`Measurement`] (Z early,
/// Z late, X plus, X minus), then side slot and outside every window.
pub(crate) const EARLY: u8 = 0;
pub(crate) const LATE: u8 = 1;
pub(crate) const PLUS: u8 = 2;
pub(crate) const MINUS: u8 = 3;
pub(crate) const SIDE: u8 = 4;
pub(crate) const OUTSIDE: u8 = 5;

/// Index of a detector role among the data channels: Z 0, D+ 1, D- 2.
pub(crate) fn detector_index(role: Role) -> Option<usize> {
    match role {
        Role::Z => Some(0),
        Role::XPlus => Some(1),
        Role::XMinus => Some(2),
        _ => None,
    }
}

/// 2^32 as a float (phase fixed point).
const TWO32: f64 = 4_294_967_296.0;

/// Why windows could not be set.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum WindowError {
    /// The window settings cannot work.
    #[error("window configuration: {0}")]
    Config(String),
    /// A channel's histogram shows no usable peaks.
    #[error(
        "no clear {role} peaks: {counts} tags, {in_windows:.1} % in the best windows against {uniform:.1} % for no peaks"
    )]
    NoPeaks {
        /// The channel's role.
        role: Role,
        /// Tags in its histogram.
        counts: u64,
        /// Percentage of them in the best placement of its windows.
        in_windows: f64,
        /// Percentage a flat histogram would put there.
        uniform: f64,
    },
}

/// Window settings.
#[derive(Clone, Debug, PartialEq)]
pub struct WindowConfig {
    /// Alice's nominal pulse period, in ps.
    pub period_ps: f64,
    /// Time-bin separation (and interferometer delay), in ps.
    pub bin_separation_ps: f64,
    /// A window opens this long before its peak, in ps.
    pub before_ps: f64,
    /// And closes this long after it, in ps.
    pub after_ps: f64,
    /// Whole pulses subtracted from every pulse index (module docs, "Which pulse").
    pub pulse_offset: i64,
    /// Histogram bins per period.
    pub histogram_bins: usize,
    /// Each peak is refined alone within +- this, in ps.
    pub search_ps: f64,
    /// Tags a channel's histogram needs before its peaks are trusted.
    pub min_counts: u64,
}

impl Default for WindowConfig {
    /// 76 MHz, 800 ps bins, windows +-200 ps, 4096 bins, search +-100 ps, 2000 tags.
    fn default() -> Self {
        Self {
            period_ps: crate::clock::PERIOD_76MHZ_PS,
            bin_separation_ps: 800.0,
            before_ps: 200.0,
            after_ps: 200.0,
            pulse_offset: 0,
            histogram_bins: 4096,
            search_ps: 100.0,
            min_counts: 2000,
        }
    }
}

impl WindowConfig {
    /// Checks that the windows of one pattern neither overlap nor exceed a period.
    pub fn validate(&self) -> Result<(), WindowError> {
        let bad = |m: &str| Err(WindowError::Config(m.to_string()));
        if ![self.period_ps, self.bin_separation_ps, self.before_ps, self.after_ps, self.search_ps]
            .iter()
            .all(|x| x.is_finite())
        {
            return bad("times must be finite numbers");
        }
        if self.period_ps < 10.0 {
            return bad("period_ps must be at least 10 ps");
        }
        if !(self.before_ps >= 0.0 && self.after_ps >= 0.0 && self.before_ps + self.after_ps > 0.0) {
            return bad("before_ps and after_ps must be non-negative, not both zero");
        }
        if self.before_ps + self.after_ps + 2.0 * self.search_ps.max(0.0) > self.bin_separation_ps {
            return bad("windows (before_ps + after_ps + 2 search_ps) must fit within one bin separation");
        }
        if 2.0 * self.bin_separation_ps + self.before_ps + self.after_ps >= self.period_ps {
            return bad("the X pattern (2 bin_separation_ps + window) must fit within one period");
        }
        if !(64..=1 << 20).contains(&self.histogram_bins) {
            return bad("histogram_bins must be between 64 and 2^20");
        }
        Ok(())
    }

    /// Number of peaks of a detector role's pattern (2 for Z, 3 for X).
    pub fn peaks_of(role: Role) -> usize {
        if role == Role::Z { 2 } else { 3 }
    }
}

/// A histogram of tag phases (fraction of the period), for finding the peaks of one channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PhaseHistogram {
    bins: Vec<u32>,
    shift: u32,
    total: u64,
}

impl PhaseHistogram {
    /// An empty histogram with `bins` bins per period, rounded up to a power of two.
    pub fn new(bins: usize) -> Self {
        let n = bins.next_power_of_two().max(2);
        Self { bins: vec![0; n], shift: 64 - n.trailing_zeros(), total: 0 }
    }

    /// Adds a phase in units of 2^-64 period.
    #[inline]
    pub fn add(&mut self, frac: u64) {
        self.bins[(frac >> self.shift) as usize] += 1;
        self.total += 1;
    }

    /// The counts, bin i covering phases [i, i + 1) / len.
    pub fn counts(&self) -> &[u32] {
        &self.bins
    }

    /// Tags added.
    pub fn total(&self) -> u64 {
        self.total
    }
}

/// The peaks of one channel: phases (fraction of the period) of each peak of its pattern, the
/// first in [0, 1), the next ones about tau later each (module docs, "Windows").
///
/// `counts`: the histogram (circular); `peaks`: 2 or 3; phases in fractions of the period.
/// Returns the peaks and the fraction of the tags inside their windows.
pub fn find_peaks(
    counts: &[u32],
    peaks: usize,
    tau: f64,
    before: f64,
    after: f64,
    search: f64,
) -> Option<(Vec<f64>, f64)> {
    let n = counts.len();
    let total: u64 = counts.iter().map(|&c| u64::from(c)).sum();
    if n == 0 || total == 0 || peaks == 0 {
        return None;
    }
    let nf = n as f64;
    // Prefix sums over two turns, so that any circular window is one difference.
    let mut prefix = Vec::with_capacity(2 * n + 1);
    prefix.push(0u64);
    for i in 0..2 * n {
        prefix.push(prefix[i] + u64::from(counts[i % n]));
    }
    let (lo, hi) = ((before * nf).round() as usize, (after * nf).round() as usize);
    // Tags in the window of a peak at bin b: bins [b - lo, b + hi].
    let window = |b: usize| {
        let start = (b + n - lo % n) % n;
        prefix[start + lo + hi + 1] - prefix[start]
    };
    let tau_bins = tau * nf;
    let peak_bin = |b: usize, j: usize| (b + (j as f64 * tau_bins).round() as usize) % n;
    let template = |b: usize| (0..peaks).map(|j| window(peak_bin(b, j))).sum::<u64>();
    let best = plateau_middle(n, true, &template);
    let r = (search * nf).round() as usize;
    let mut phases = Vec::with_capacity(peaks);
    let mut inside = 0;
    for j in 0..peaks {
        let centre = peak_bin(best, j);
        // The best placement within +-r of the template's, as an offset from centre - r.
        let local = |i: usize| window((centre + n - r % n + i) % n);
        let off = plateau_middle(2 * r + 1, false, &local);
        inside += local(off);
        let bin = (centre + n - r % n + off) % n;
        // Bin centre; unwrap so that peak j lies about j tau after the first.
        let mut phase = (bin as f64 + 0.5) / nf;
        if let Some(&first) = phases.first() {
            let want: f64 = first + j as f64 * tau;
            phase += (want - phase).round();
        }
        phases.push(phase);
    }
    Some((phases, inside as f64 / total as f64))
}

/// The index in 0..n maximising `f`, taken in the middle of the run of near-maximal values
/// (within 0.5 %) around the first maximum, so that a window wider than its peak is centred on
/// it. Indices wrap around when `circular`.
fn plateau_middle(n: usize, circular: bool, f: &impl Fn(usize) -> u64) -> usize {
    let values: Vec<u64> = (0..n).map(f).collect();
    let (best, &max) = values.iter().enumerate().max_by_key(|&(i, v)| (*v, std::cmp::Reverse(i))).expect("n > 0");
    let floor = max - (max / 200).max(1).min(max);
    let at = |i: isize| -> Option<u64> {
        if circular {
            Some(values[i.rem_euclid(n as isize) as usize])
        } else {
            usize::try_from(i).ok().and_then(|i| values.get(i).copied())
        }
    };
    let best = best as isize;
    let (mut a, mut b) = (0isize, 0isize);
    while a + 1 < n as isize && at(best - a - 1).is_some_and(|v| v > floor) {
        a += 1;
    }
    while b + 1 < n as isize && at(best + b + 1).is_some_and(|v| v > floor) {
        b += 1;
    }
    (best + (b - a) / 2).rem_euclid(n as isize) as usize
}

/// Where each detector's peaks are: the phase, in ps within the nominal period, of every peak
/// of its pattern (2 for Z: early, late; 3 for D+ and D-: slots 0, 1, 2). Found from
/// histograms ([`Calibration::from_histograms`]) or given (a previous run's, or a lab
/// calibration).
#[derive(Clone, Debug, PartialEq)]
pub struct Calibration {
    /// (role, peak phases in ps) per detector present.
    pub peaks_ps: Vec<(Role, Vec<f64>)>,
}

impl Calibration {
    /// The calibration of each detector role from its histogram (`None`: role absent).
    pub fn from_histograms(cfg: &WindowConfig, hists: &[(Role, &PhaseHistogram)]) -> Result<Self, WindowError> {
        cfg.validate()?;
        let p = cfg.period_ps;
        let mut peaks_ps = Vec::new();
        for &(role, h) in hists {
            let k = WindowConfig::peaks_of(role);
            let uniform = k as f64 * (cfg.before_ps + cfg.after_ps) / p;
            let found = find_peaks(
                h.counts(),
                k,
                cfg.bin_separation_ps / p,
                cfg.before_ps / p,
                cfg.after_ps / p,
                cfg.search_ps / p,
            );
            let (phases, inside) = found.unwrap_or((Vec::new(), 0.0));
            if h.total() < cfg.min_counts || inside < 2.0 * uniform {
                return Err(WindowError::NoPeaks {
                    role,
                    counts: h.total(),
                    in_windows: 100.0 * inside,
                    uniform: 100.0 * uniform,
                });
            }
            peaks_ps.push((role, phases.iter().map(|f| f * p).collect()));
        }
        Ok(Self { peaks_ps })
    }

    /// The peak phases of `role`, in ps.
    pub fn peaks_of(&self, role: Role) -> Option<&[f64]> {
        self.peaks_ps.iter().find(|e| e.0 == role).map(|e| e.1.as_slice())
    }
}

/// One detector channel's assignment rule (fixed point).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Slot {
    /// Whole pulses of the shift, plus the pulse offset.
    shift_pulses: i64,
    /// Fraction of the shift, in 2^-64 period.
    shift_frac: u64,
    /// Window starts and widths on the shifted phase (2^-32 period), and their outcome codes.
    lo: [u32; 3],
    width: [u32; 3],
    code: [u8; 3],
}

/// Maps a detector tag's pulse coordinate to its pulse and outcome code.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Assigner {
    slots: [Slot; 3],
    /// Smallest shift over the detectors, in pulses (the earliest coordinate a pulse's tag can
    /// have, relative to the pulse): for deciding which frames a model start or gap touches.
    min_shift: f64,
    /// Largest shift plus one (the latest coordinate a pulse's tag can have).
    max_shift: f64,
}

impl Assigner {
    /// The assignment rule for `cal` under `cfg`.
    pub fn new(cfg: &WindowConfig, cal: &Calibration) -> Result<Self, WindowError> {
        cfg.validate()?;
        let p = cfg.period_ps;
        let mut slots = [Slot::default(); 3];
        let (mut min_shift, mut max_shift) = (f64::INFINITY, f64::NEG_INFINITY);
        for (role, peaks) in &cal.peaks_ps {
            let Some(idx) = detector_index(*role) else {
                return Err(WindowError::Config(format!("{role} is not a detector")));
            };
            if peaks.len() != WindowConfig::peaks_of(*role) {
                return Err(WindowError::Config(format!("{role} needs {} peaks", WindowConfig::peaks_of(*role))));
            }
            let f: Vec<f64> = peaks.iter().map(|x| x / p).collect();
            let (start, end) = (f[0] - cfg.before_ps / p, f[f.len() - 1] + cfg.after_ps / p);
            if end - start >= 1.0 || f.windows(2).any(|w| w[1] - w[0] < (cfg.before_ps + cfg.after_ps) / p) {
                return Err(WindowError::Config(format!("{role}: peaks {peaks:?} ps give overlapping windows")));
            }
            let shift = (start + end) / 2.0 - 0.5;
            let whole = shift.floor();
            let codes: [u8; 3] = match role {
                Role::Z => [EARLY, LATE, OUTSIDE],
                Role::XPlus => [SIDE, PLUS, SIDE],
                _ => [SIDE, MINUS, SIDE],
            };
            let mut slot = Slot {
                shift_pulses: whole as i64 + cfg.pulse_offset,
                shift_frac: ((shift - whole) * TWO32 * TWO32) as u64,
                lo: [0; 3],
                width: [0; 3],
                code: [OUTSIDE; 3],
            };
            for (j, &phase) in f.iter().enumerate() {
                let lo = phase - cfg.before_ps / p - shift;
                slot.lo[j] = (lo * TWO32).round() as u32;
                slot.width[j] = ((cfg.before_ps + cfg.after_ps) / p * TWO32).round() as u32;
                slot.code[j] = codes[j];
            }
            slots[idx] = slot;
            min_shift = min_shift.min(shift);
            max_shift = max_shift.max(shift + 1.0);
        }
        if cal.peaks_ps.is_empty() {
            (min_shift, max_shift) = (0.0, 1.0);
        }
        Ok(Self { slots, min_shift, max_shift })
    }

    /// The pulse (before subtracting nothing more: global index) and outcome code of a tag of
    /// detector `det` (0 Z, 1 D+, 2 D-) at pulse coordinate (`pulse`, `frac` in 2^-64).
    #[inline(always)]
    pub(crate) fn classify(&self, det: usize, pulse: i64, frac: u64) -> (i64, u8) {
        let s = &self.slots[det];
        let (f, borrow) = frac.overflowing_sub(s.shift_frac);
        let k = pulse - i64::from(borrow) - s.shift_pulses;
        let ph = (f >> 32) as u32;
        let mut code = OUTSIDE;
        for j in 0..3 {
            if ph.wrapping_sub(s.lo[j]) < s.width[j] {
                code = s.code[j];
            }
        }
        (k, code)
    }

    /// The range of coordinates, relative to a pulse's start plus the pulse offset, that its
    /// tags can have: [min, max).
    pub(crate) fn shift_range(&self) -> (f64, f64) {
        (self.min_shift, self.max_shift)
    }

    /// The pulse-coordinate phase window of detector `det`'s outcome `j`-th window, in
    /// fractions of the period (for tests and reporting): (start, width).
    #[cfg(test)]
    fn window(&self, det: usize, j: usize) -> (f64, f64) {
        let s = &self.slots[det];
        let shift = s.shift_frac as f64 / (TWO32 * TWO32);
        (f64::from(s.lo[j]) / TWO32 + shift, f64::from(s.width[j]) / TWO32)
    }
}

/// What one frame's tags gave, besides its detections.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FrameCounters {
    /// Detector tags mapped into the frame.
    pub tags: u64,
    /// Tags outside every window (discarded).
    pub outside: u64,
    /// Clicks in the early window of the Z detector (before squashing).
    pub z_early: u64,
    /// Clicks in the late window.
    pub z_late: u64,
    /// Clicks of D+ in the central slot.
    pub x_plus: u64,
    /// Clicks of D- in the central slot.
    pub x_minus: u64,
    /// The X branch's side-slot and central-slot clicks (the detection-mismatch monitor's
    /// input).
    pub x_slots: XSlotCounts,
    /// Pulses with more than one click in a used window (squashed).
    pub multi_click_pulses: u64,
    /// Of those, pulses with clicks in both bases.
    pub basis_conflicts: u64,
}

/// Collects one frame's clicks and turns them into detections.
#[derive(Clone, Debug)]
pub(crate) struct FrameBuilder {
    /// (pulse within the frame << 2) | outcome code, for clicks in a measurement window; kept
    /// sorted by insertion while clicks arrive nearly in order (the usual case: detectors with
    /// different delays and dark counts displace a click by a few places at most).
    entries: Vec<u64>,
    /// Whether `entries` is still sorted (false once a click came too far out of order).
    sorted: bool,
    /// Clicks per outcome code.
    by_code: [u64; 6],
}

impl Default for FrameBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameBuilder {
    pub(crate) fn new() -> Self {
        Self { entries: Vec::new(), sorted: true, by_code: [0; 6] }
    }

    /// Adds a click of pulse `pulse` (within the frame) with outcome `code`.
    #[inline(always)]
    pub(crate) fn push(&mut self, pulse: u64, code: u8) {
        self.by_code[usize::from(code)] += 1;
        if code < SIDE {
            let e = (pulse << 2) | u64::from(code);
            match self.entries.last() {
                Some(&last) if last > e => self.insert_back(e),
                _ => self.entries.push(e),
            }
        }
    }

    /// Inserts `e`, smaller than the last entry, in its place if that is near the end; else
    /// appends it and leaves the sorting to [`FrameBuilder::finish`].
    #[cold]
    fn insert_back(&mut self, e: u64) {
        const REACH: usize = 64;
        if self.sorted {
            let n = self.entries.len();
            let floor = n.saturating_sub(REACH);
            let i = floor + self.entries[floor..].partition_point(|&x| x <= e);
            if i > floor || floor == 0 {
                self.entries.insert(i, e);
                return;
            }
            self.sorted = false;
        }
        self.entries.push(e);
    }

    /// Forgets the clicks collected (a dropped frame).
    pub(crate) fn clear(&mut self) {
        self.entries.clear();
        self.sorted = true;
        self.by_code = [0; 6];
    }

    /// The frame's detections, ascending by pulse, with squashing (module docs), and its
    /// counters. Leaves the builder empty (its buffer kept for reuse).
    pub(crate) fn finish(&mut self, coin: &mut dyn FnMut() -> bool) -> (Vec<Detection>, FrameCounters) {
        if !self.sorted {
            self.entries.sort_unstable();
        }
        let c = self.by_code;
        let mut counters = FrameCounters {
            tags: c.iter().sum(),
            outside: c[usize::from(OUTSIDE)],
            z_early: c[usize::from(EARLY)],
            z_late: c[usize::from(LATE)],
            x_plus: c[usize::from(PLUS)],
            x_minus: c[usize::from(MINUS)],
            x_slots: XSlotCounts { side: c[usize::from(SIDE)], central: c[usize::from(PLUS)] + c[usize::from(MINUS)] },
            ..FrameCounters::default()
        };
        const SINGLE: [Measurement; 4] = [
            Measurement::Z { late: false },
            Measurement::Z { late: true },
            Measurement::X { minus: false },
            Measurement::X { minus: true },
        ];
        let mut out = Vec::with_capacity(self.entries.len());
        let n = self.entries.len();
        let mut i = 0;
        while i < n {
            let e = self.entries[i];
            let pulse = e >> 2;
            if i + 1 == n || self.entries[i + 1] >> 2 != pulse {
                // One click: no squashing.
                out.push(Detection { pulse_idx: pulse, measurement: SINGLE[(e & 3) as usize] });
                i += 1;
                continue;
            }
            let mut mask = 0u8;
            let mut clicks = 0;
            while i < self.entries.len() && self.entries[i] >> 2 == pulse {
                mask |= 1 << (self.entries[i] & 3);
                clicks += 1;
                i += 1;
            }
            if clicks > 1 {
                counters.multi_click_pulses += 1;
                counters.basis_conflicts += u64::from(mask & 0b0011 != 0 && mask & 0b1100 != 0);
            }
            out.push(Detection { pulse_idx: pulse, measurement: squash(mask, coin) });
        }
        self.entries.clear();
        self.sorted = true;
        self.by_code = [0; 6];
        (out, counters)
    }
}

/// Squashes the set of clicked outcomes of one pulse (bit k of `mask` = outcome code k: Z
/// early, Z late, X plus, X minus; at least one set) into one measurement, as the simulator's
/// receiver does (module docs, "Outcomes and squashing").
pub fn squash(mask: u8, coin: &mut dyn FnMut() -> bool) -> Measurement {
    let z = mask & 0b0011;
    let x = (mask >> 2) & 0b0011;
    let use_z = match (z != 0, x != 0) {
        (true, true) => coin(),
        (z_clicked, _) => z_clicked,
    };
    let bits = if use_z { z } else { x };
    let second = match bits {
        0b01 => false,
        0b10 => true,
        _ => coin(),
    };
    if use_z { Measurement::Z { late: second } } else { Measurement::X { minus: second } }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::SplitMix64;

    const P: f64 = crate::clock::PERIOD_76MHZ_PS;

    /// A histogram of `n` tags in Gaussian peaks at `centres` (fractions; weights) with jitter
    /// `sigma` ps, plus `dark` uniform tags.
    fn histogram(centres: &[(f64, f64)], sigma: f64, n: usize, dark: usize, seed: u64) -> PhaseHistogram {
        let mut rng = SplitMix64::new(seed);
        let mut h = PhaseHistogram::new(4096);
        let wsum: f64 = centres.iter().map(|c| c.1).sum();
        for _ in 0..n {
            let mut u = rng.uniform() * wsum;
            let mut c = centres[0].0;
            for &(x, w) in centres {
                c = x;
                if u < w {
                    break;
                }
                u -= w;
            }
            let ph = (c + sigma / P * rng.normal()).rem_euclid(1.0);
            h.add((ph * TWO32 * TWO32) as u64);
        }
        for _ in 0..dark {
            h.add(rng.next_u64());
        }
        h
    }

    #[test]
    fn peaks_are_found_where_they_are_even_across_the_period_boundary() {
        let cfg = WindowConfig::default();
        let tau = cfg.bin_separation_ps / P;
        for (seed, first) in [(1u64, 0.3), (2, 0.97), (3, 0.01), (4, 0.5)] {
            let z = histogram(&[(first, 1.0), (first + tau, 1.0)], 25.0, 20_000, 2000, seed);
            let x =
                histogram(&[(first, 1.0), (first + tau, 2.0), (first + 2.0 * tau, 1.0)], 25.0, 20_000, 2000, seed + 10);
            let cal = Calibration::from_histograms(&cfg, &[(Role::Z, &z), (Role::XPlus, &x)]).unwrap();
            for (role, n) in [(Role::Z, 2), (Role::XPlus, 3)] {
                let peaks = cal.peaks_of(role).unwrap();
                assert_eq!(peaks.len(), n);
                for (j, &ph) in peaks.iter().enumerate() {
                    let want = (first + j as f64 * tau) * P;
                    // Same phase modulo the period, and the first peak within [0, P).
                    let d = (ph - want + P / 2.0).rem_euclid(P) - P / 2.0;
                    assert!(d.abs() < 6.0, "seed {seed}, {role} peak {j}: {ph} vs {want}");
                }
                assert!((0.0..P).contains(&peaks[0]));
                assert!((peaks[1] - peaks[0] - cfg.bin_separation_ps).abs() < 10.0);
            }
        }
    }

    #[test]
    fn wide_windows_are_centred_and_asymmetric_windows_respected() {
        // A narrow peak inside a wide window: the window is centred on it.
        let cfg = WindowConfig { before_ps: 300.0, after_ps: 300.0, search_ps: 50.0, ..WindowConfig::default() };
        let tau = cfg.bin_separation_ps / P;
        let h = histogram(&[(0.4, 1.0), (0.4 + tau, 1.0)], 10.0, 20_000, 0, 5);
        let cal = Calibration::from_histograms(&cfg, &[(Role::Z, &h)]).unwrap();
        let z = cal.peaks_of(Role::Z).unwrap();
        assert!((z[0] - 0.4 * P).abs() < 15.0, "{z:?} vs {}", 0.4 * P);
        let a = Assigner::new(&cfg, &cal).unwrap();
        let (start, width) = a.window(0, 0);
        assert!(((start + width / 2.0).rem_euclid(1.0) * P - z[0]).abs() < 1.0);
        assert!((width * P - 600.0).abs() < 0.01);
        // An asymmetric window opens `before` ahead of the peak.
        let cfg = WindowConfig { before_ps: 50.0, after_ps: 500.0, search_ps: 50.0, ..WindowConfig::default() };
        let cal = Calibration { peaks_ps: vec![(Role::Z, vec![1000.0, 1800.0])] };
        let a = Assigner::new(&cfg, &cal).unwrap();
        let (start, width) = a.window(0, 1);
        assert!((start.rem_euclid(1.0) * P - 1750.0).abs() < 0.01, "{}", start * P);
        assert!((width * P - 550.0).abs() < 0.01);
    }

    #[test]
    fn flat_or_thin_histograms_are_refused() {
        let cfg = WindowConfig::default();
        let flat = histogram(&[(0.5, 1.0)], 0.0, 0, 50_000, 6);
        let err = Calibration::from_histograms(&cfg, &[(Role::Z, &flat)]).unwrap_err();
        assert!(matches!(err, WindowError::NoPeaks { role: Role::Z, counts: 50_000, .. }), "{err}");
        let thin = histogram(&[(0.2, 1.0), (0.2 + 800.0 / P, 1.0)], 20.0, 100, 0, 7);
        assert!(matches!(
            Calibration::from_histograms(&cfg, &[(Role::Z, &thin)]),
            Err(WindowError::NoPeaks { counts: 100, .. })
        ));
    }

    #[test]
    fn window_config_is_checked() {
        assert!(WindowConfig::default().validate().is_ok());
        for bad in [
            WindowConfig { before_ps: 500.0, ..WindowConfig::default() },
            WindowConfig { bin_separation_ps: 6600.0, before_ps: 100.0, after_ps: 100.0, ..WindowConfig::default() },
            WindowConfig { before_ps: 0.0, after_ps: 0.0, ..WindowConfig::default() },
            WindowConfig { histogram_bins: 8, ..WindowConfig::default() },
            WindowConfig { search_ps: f64::NAN, ..WindowConfig::default() },
        ] {
            assert!(matches!(bad.validate(), Err(WindowError::Config(_))), "{bad:?}");
        }
        let cfg = WindowConfig::default();
        let overlapping = Calibration { peaks_ps: vec![(Role::Z, vec![1000.0, 1300.0])] };
        assert!(Assigner::new(&cfg, &overlapping).is_err());
        let wrong_count = Calibration { peaks_ps: vec![(Role::XPlus, vec![1000.0, 1800.0])] };
        assert!(Assigner::new(&cfg, &wrong_count).is_err());
    }

    /// The coordinate of phase `ph` (fraction) in pulse `k`, as (pulse, 2^-64 fraction).
    fn coord(k: i64, ph: f64) -> (i64, u64) {
        let u = k as f64 + ph;
        let fl = u.floor();
        (fl as i64, ((u - fl) * TWO32 * TWO32) as u64)
    }

    #[test]
    fn classification_follows_the_windows_and_the_pulse_convention() {
        let cfg = WindowConfig { pulse_offset: 0, ..WindowConfig::default() };
        let tau = 800.0 / P;
        // Z early peak near the end of the period: its late peak lies in the next period of the
        // coordinate but belongs to the same pulse.
        let cal = Calibration {
            peaks_ps: vec![
                (Role::Z, vec![0.95 * P, 0.95 * P + 800.0]),
                (Role::XPlus, vec![0.1 * P, 0.1 * P + 800.0, 0.1 * P + 1600.0]),
                (Role::XMinus, vec![0.6 * P, 0.6 * P + 800.0, 0.6 * P + 1600.0]),
            ],
        };
        let a = Assigner::new(&cfg, &cal).unwrap();
        let k = 1000;
        let cases = [
            (0, 0.95, EARLY),
            (0, 0.95 + tau, LATE),
            (0, 0.95 + 190.0 / P, EARLY),
            (0, 0.95 + 210.0 / P, OUTSIDE),
            (0, 0.95 - 190.0 / P, EARLY),
            (0, 0.95 + tau / 2.0, OUTSIDE),
            (1, 0.1, SIDE),
            (1, 0.1 + tau, PLUS),
            (1, 0.1 + 2.0 * tau, SIDE),
            (1, 0.1 + 3.0 * tau, OUTSIDE),
            (2, 0.6 + tau, MINUS),
            (2, 0.6 + tau + 199.0 / P, MINUS),
            (2, 0.6, SIDE),
        ];
        for (det, ph, want) in cases {
            let (p, f) = coord(k, ph);
            assert_eq!(a.classify(det, p, f), (k, want), "det {det}, phase {ph}");
        }
        // The pulse offset moves every index.
        let b = Assigner::new(&WindowConfig { pulse_offset: 3, ..cfg }, &cal).unwrap();
        let (p, f) = coord(k, 0.95 + tau);
        assert_eq!(b.classify(0, p, f), (k - 3, LATE));
    }

    #[test]
    fn squashing_matches_the_receiver_rule() {
        let mut never = || -> bool { panic!("no coin needed") };
        assert_eq!(squash(0b0001, &mut never), Measurement::Z { late: false });
        assert_eq!(squash(0b0010, &mut never), Measurement::Z { late: true });
        assert_eq!(squash(0b0100, &mut never), Measurement::X { minus: false });
        assert_eq!(squash(0b1000, &mut never), Measurement::X { minus: true });
        let seed = 9;
        let mut rng = SplitMix64::new(seed);
        let mut coin = || rng.coin();
        let mut counts = std::collections::HashMap::new();
        for _ in 0..40_000 {
            *counts.entry(squash(0b1111, &mut coin)).or_insert(0u32) += 1;
            assert!(matches!(squash(0b0011, &mut coin), Measurement::Z { .. }));
            let m = squash(0b0101, &mut coin);
            assert!(m == Measurement::Z { late: false } || m == Measurement::X { minus: false });
        }
        for m in [
            Measurement::Z { late: false },
            Measurement::Z { late: true },
            Measurement::X { minus: false },
            Measurement::X { minus: true },
        ] {
            let n = f64::from(counts[&m]);
            assert!((n - 10_000.0).abs() < 400.0, "seed {seed}: {m:?} {n}");
        }
    }

    #[test]
    fn frame_builder_sorts_squashes_and_counts() {
        let mut b = FrameBuilder::new();
        for (p, c) in [(7, LATE), (3, PLUS), (3, EARLY), (9, SIDE), (2, OUTSIDE), (5, MINUS), (5, PLUS), (1, SIDE)] {
            b.push(p, c);
        }
        let mut rng = SplitMix64::new(1);
        let (d, c) = b.finish(&mut || rng.coin());
        let idx: Vec<u64> = d.iter().map(|x| x.pulse_idx).collect();
        assert_eq!(idx, vec![3, 5, 7]);
        assert_eq!(d[2].measurement, Measurement::Z { late: true });
        assert!(matches!(d[1].measurement, Measurement::X { .. }));
        assert_eq!(c.tags, 8);
        assert_eq!(c.outside, 1);
        assert_eq!(c.x_slots, XSlotCounts { side: 2, central: 3 });
        assert_eq!((c.z_early, c.z_late, c.x_plus, c.x_minus), (1, 1, 2, 1));
        assert_eq!((c.multi_click_pulses, c.basis_conflicts), (2, 1));
        // Reusable and empty afterwards.
        let (d, c) = b.finish(&mut || rng.coin());
        assert!(d.is_empty());
        assert_eq!(c, FrameCounters::default());
    }

    #[test]
    fn frame_builder_orders_clicks_near_and_far_out_of_order() {
        let mut rng = SplitMix64::new(2);
        for far in [false, true] {
            let mut b = FrameBuilder::new();
            let mut pulses: Vec<u64> = (0..300).map(|i| 10 * i).collect();
            // Local disorder (swapped neighbours), and optionally one click 250 places late.
            for i in (0..298).step_by(7) {
                pulses.swap(i, i + 1);
            }
            if far {
                let p = pulses.remove(20);
                pulses.insert(270, p);
            }
            for &p in &pulses {
                b.push(p, EARLY);
            }
            assert_eq!(b.sorted, !far);
            let (d, _) = b.finish(&mut || rng.coin());
            let got: Vec<u64> = d.iter().map(|x| x.pulse_idx).collect();
            assert_eq!(got, (0..300).map(|i| 10 * i).collect::<Vec<_>>(), "far {far}");
        }
    }
}
