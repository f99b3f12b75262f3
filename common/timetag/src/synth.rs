//! Synthetic time-tag streams with known ground truth, for tests and the benchmark: a small
//! deterministic generator ([`SplitMix64`]), the clock of Bob's tagger relative to Alice's pulse
//! train ([`TaggerClock`]: offset, frequency offset in ppm and a linear frequency drift), and a
//! stream generator ([`Generator`]) that emits the tags of known per-pulse clicks (signal
//! photons in both bases, dark counts, jitter, tagger resolution, a sync channel, gaps) together
//! with the outcome each click was generated in.
//!
//! Conventions as in the rest of the crate: times in ps on Bob's tagger clock, pulse indices
//! global (frame x frame length + index within the frame). Nothing here is needed to process
//! real data.

use std::collections::VecDeque;

use crate::tags::{Record, Tag};

/// SplitMix64 (Steele, Lea and Flood, "Fast splittable pseudorandom number generators",
/// OOPSLA 2014): tiny, fast and deterministic; statistical quality is ample for synthetic data.
/// Not a cryptographic generator: never use it for a squashing coin on real data.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// The generator with `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A uniform number in [0, 1) (53 random bits).
    #[inline]
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// A random bit.
    #[inline]
    pub fn coin(&mut self) -> bool {
        self.next_u64() >> 63 == 1
    }

    /// A standard normal number (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// The number of failures before the first success of a Bernoulli(p) sequence (geometric
    /// skipping), `u64::MAX` for p <= 0.
    pub fn geometric(&mut self, p: f64) -> u64 {
        if p <= 0.0 {
            return u64::MAX;
        }
        if p >= 1.0 {
            return 0;
        }
        let u = 1.0 - self.uniform();
        let k = (u.ln() / (1.0 - p).ln()).floor();
        if k >= u64::MAX as f64 { u64::MAX } else { k as u64 }
    }
}

/// The clock of Bob's tagger against Alice's pulse train: pulse k is emitted at k x `period_ps`
/// on Alice's clock, and Bob's tagger reads `start_ps + x (1 + e0) + d x^2 / 2` for an event at
/// Alice time x ps, with e0 = `offset_ppm` 10^-6 and d = `drift_ppm_per_s` 10^-6 / 10^12 per
/// ps (a frequency that changes linearly in time).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TaggerClock {
    /// Alice's pulse period, in ps of her clock.
    pub period_ps: f64,
    /// Bob's reading when Alice emits pulse 0, in ps.
    pub start_ps: f64,
    /// Frequency offset of Bob's tagger, in ppm.
    pub offset_ppm: f64,
    /// Rate of change of that offset, in ppm per second.
    pub drift_ppm_per_s: f64,
}

impl TaggerClock {
    /// Bob's reading, in ps, of an event `delay_ps` after Alice emits pulse `pulse` (the delay
    /// is in Alice's time, so it stretches with the pulse period).
    pub fn time_ps(&self, pulse: u64, delay_ps: f64) -> f64 {
        let x = pulse as f64 * self.period_ps + delay_ps;
        let e0 = self.offset_ppm * 1e-6;
        let d = self.drift_ppm_per_s * 1e-18;
        self.start_ps + x * (1.0 + e0) + 0.5 * d * x * x
    }

    /// Bob's pulse period around pulse `pulse`, in ps of his tagger.
    pub fn period_at(&self, pulse: u64) -> f64 {
        let x = pulse as f64 * self.period_ps;
        self.period_ps * (1.0 + self.offset_ppm * 1e-6 + self.drift_ppm_per_s * 1e-18 * x)
    }
}

/// Outcome of a generated click, as the ideal windows (centred on the generated peaks) see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TrueOutcome {
    /// Z detector, early bin.
    Early,
    /// Z detector, late bin.
    Late,
    /// D+, central slot.
    Plus,
    /// D-, central slot.
    Minus,
    /// D+ or D-, a side slot (0 or 2).
    Side,
    /// A dark count outside every ideal window.
    Outside,
}

/// One generated click: the pulse it belongs to and its outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrueClick {
    /// Global pulse index.
    pub pulse: u64,
    /// Outcome under the ideal windows.
    pub outcome: TrueOutcome,
    /// Whether it is a dark count (uniform in time) rather than a photon.
    pub dark: bool,
}

/// What [`Generator`] produces: tagger channels, optics, detectors and the clock.
#[derive(Clone, Debug)]
pub struct GeneratorConfig {
    /// The tagger clock (Alice's period, offset, drift).
    pub clock: TaggerClock,
    /// Pulses per frame.
    pub frame_pulses: u64,
    /// Pulses to generate.
    pub pulses: u64,
    /// Time-bin separation, in ps.
    pub bin_separation_ps: f64,
    /// Detector jitter (Gaussian, rms), in ps.
    pub jitter_ps: f64,
    /// Tagger resolution (times are floored to multiples), in ps.
    pub resolution_ps: u64,
    /// Probability per pulse of a detected signal photon.
    pub p_click: f64,
    /// Probability that a pulse with a signal click has a second, independent photon click
    /// (a two-photon pulse; the state is the same, the path is drawn again).
    pub p_second: f64,
    /// Probability that a detected photon goes to the Z detector.
    pub q_z: f64,
    /// Probability per pulse of a dark count on each detector (uniform over the period).
    pub p_dark: f64,
    /// Pulses per sync tag (0: no sync channel).
    pub sync_every: u64,
    /// Sync jitter (rms), in ps.
    pub sync_jitter_ps: f64,
    /// Delays of the Z, D+, D- and sync channels after emission, in ps (early bin / slot 0).
    pub delays_ps: [f64; 4],
    /// Tagger channels of the Z, D+, D- and sync signals.
    pub channels: [u8; 4],
    /// Global pulse ranges [from, to) whose data the tagger loses (each becomes a gap record).
    pub gaps: Vec<(u64, u64)>,
    /// Ideal window half-width used to label dark counts, in ps.
    pub label_half_window_ps: f64,
    /// Seed of the generator.
    pub seed: u64,
}

impl Default for GeneratorConfig {
    /// 76 MHz, frames of 2^22 pulses, 8 frames, 800 ps bins, 20 ps jitter, 1 ps resolution, a
    /// click in 5 % of the pulses (q_Z 0.9), dark counts 10^-6 per pulse, one sync per frame.
    fn default() -> Self {
        Self {
            clock: TaggerClock {
                period_ps: crate::clock::PERIOD_76MHZ_PS,
                start_ps: 1_000_000.0,
                offset_ppm: 0.0,
                drift_ppm_per_s: 0.0,
            },
            frame_pulses: 1 << 22,
            pulses: 8 << 22,
            bin_separation_ps: 800.0,
            jitter_ps: 20.0,
            resolution_ps: 1,
            p_click: 0.05,
            p_second: 0.0,
            q_z: 0.9,
            p_dark: 1e-6,
            sync_every: 1 << 22,
            sync_jitter_ps: 10.0,
            delays_ps: [3_000.0, 5_500.0, 5_800.0, 1_000.0],
            channels: [1, 2, 3, 0],
            gaps: Vec::new(),
            label_half_window_ps: 200.0,
            seed: 1,
        }
    }
}

/// A generated tag and its truth (`None` for sync tags).
type Pending = (u64, u8, Option<TrueClick>);

/// Generates a time-sorted synthetic stream in chunks: [`Generator::next_chunk`] appends records
/// and the truth of their clicks. Pulses are visited by geometric skipping, so the work is
/// proportional to clicks, not pulses.
#[derive(Debug)]
pub struct Generator {
    cfg: GeneratorConfig,
    rng: SplitMix64,
    /// Next pulse to generate.
    next_pulse: u64,
    /// Next pulse with a signal click, per detector the next with a dark count, next sync.
    next_signal: u64,
    next_dark: [u64; 3],
    next_sync: u64,
    /// Generated tags not yet emitted (their time may precede later pulses' tags).
    held: Vec<Pending>,
    /// Gaps not yet emitted, with their times.
    gaps: VecDeque<(u64, u64, u64, u64)>,
}

impl Generator {
    /// A generator for `cfg`.
    pub fn new(cfg: GeneratorConfig) -> Self {
        let mut rng = SplitMix64::new(cfg.seed);
        let next_signal = rng.geometric(cfg.p_click);
        let next_dark = [0, 1, 2].map(|_| rng.geometric(cfg.p_dark));
        let mut gaps: Vec<(u64, u64, u64, u64)> = cfg
            .gaps
            .iter()
            .map(|&(a, b)| {
                let from = cfg.clock.time_ps(a, 0.0).floor() as u64;
                let to = cfg.clock.time_ps(b, 0.0).ceil() as u64;
                (from, to, a, b)
            })
            .collect();
        gaps.sort_unstable();
        Self { cfg, rng, next_pulse: 0, next_signal, next_dark, next_sync: 0, held: Vec::new(), gaps: gaps.into() }
    }

    /// Whether every pulse has been generated and emitted.
    pub fn done(&self) -> bool {
        self.next_pulse >= self.cfg.pulses && self.held.is_empty() && self.gaps.is_empty()
    }

    /// Generates the next `pulses` pulses (fewer at the end) and appends the records that are
    /// final (time-sorted, gaps in place, tags inside gaps removed) to `records` and the truth
    /// of their detector clicks to `truth`. Returns the number of records appended.
    pub fn next_chunk(&mut self, pulses: u64, records: &mut Vec<Record>, truth: &mut Vec<TrueClick>) -> usize {
        let end = (self.next_pulse + pulses).min(self.cfg.pulses);
        self.generate(end);
        self.next_pulse = end;
        // Tags of later pulses come at least this late: the smallest delay minus jitter.
        let min_delay = self.cfg.delays_ps.iter().copied().fold(f64::INFINITY, f64::min);
        let safe = if end >= self.cfg.pulses {
            u64::MAX
        } else {
            (self.cfg.clock.time_ps(end, min_delay) - 10.0 * self.cfg.jitter_ps.max(self.cfg.sync_jitter_ps) - 1.0)
                .max(0.0) as u64
        };
        self.held.sort_unstable_by_key(|p| p.0);
        let n_final = self.held.partition_point(|p| p.0 < safe);
        let before = records.len();
        for &(time, channel, click) in &self.held[..n_final] {
            while let Some(&(from, to, _, _)) = self.gaps.front() {
                if from > time {
                    break;
                }
                if to < time {
                    records.push(Record::Gap { from_ps: from, to_ps: to });
                    self.gaps.pop_front();
                    continue;
                }
                break;
            }
            if self.gaps.front().is_some_and(|&(from, to, _, _)| from <= time && time <= to) {
                continue;
            }
            records.push(Record::Tag(Tag::new(channel, time)));
            if let Some(c) = click {
                truth.push(c);
            }
        }
        self.held.drain(..n_final);
        if end >= self.cfg.pulses {
            for (from, to, _, _) in self.gaps.drain(..) {
                records.push(Record::Gap { from_ps: from, to_ps: to });
            }
        }
        records.len() - before
    }

    /// Generates everything: all records and the truth.
    pub fn generate_all(mut self) -> (Vec<Record>, Vec<TrueClick>) {
        let (mut records, mut truth) = (Vec::new(), Vec::new());
        while !self.done() {
            self.next_chunk(1 << 20, &mut records, &mut truth);
        }
        (records, truth)
    }

    /// Generates the clicks and syncs of pulses below `end` into `held`.
    fn generate(&mut self, end: u64) {
        while self.next_sync < end && self.cfg.sync_every > 0 {
            let k = self.next_sync;
            let t = self.cfg.clock.time_ps(k, self.cfg.delays_ps[3]) + self.cfg.sync_jitter_ps * self.rng.normal();
            let t = self.quantise(t);
            self.held.push((t, self.cfg.channels[3], None));
            self.next_sync += self.cfg.sync_every;
        }
        while self.next_signal < end {
            let k = self.next_signal;
            self.signal_click(k);
            self.next_signal = k.saturating_add(1).saturating_add(self.rng.geometric(self.cfg.p_click));
        }
        for det in 0..3 {
            while self.next_dark[det] < end {
                let k = self.next_dark[det];
                self.dark_click(det, k);
                self.next_dark[det] = k.saturating_add(1).saturating_add(self.rng.geometric(self.cfg.p_dark));
            }
        }
    }

    /// A signal photon of pulse `k`: basis, state, slot and detector as in the simulator's
    /// receiver (`common::sim::receiver`): Z gives the bin of |E>, |L> or a random bin of |+>;
    /// X gives slot 0/1 for |E>, 1/2 for |L>, 0/1/2 with 1/4, 1/2, 1/4 for |+>, and the central
    /// slot of |+> always reaches D+ (visibility 1), other slots a random detector.
    fn signal_click(&mut self, k: u64) {
        let state = (self.rng.next_u64() % 3) as u8; // 0 E, 1 L, 2 +
        self.photon(k, state);
        if self.rng.uniform() < self.cfg.p_second {
            self.photon(k, state);
        }
    }

    /// One photon of pulse `k` in `state` (0 |E>, 1 |L>, 2 |+>) through Bob's optics.
    fn photon(&mut self, k: u64, state: u8) {
        let tau = self.cfg.bin_separation_ps;
        let (det, offset, outcome) = if self.rng.uniform() < self.cfg.q_z {
            let late = match state {
                0 => false,
                1 => true,
                _ => self.rng.coin(),
            };
            (0, if late { tau } else { 0.0 }, if late { TrueOutcome::Late } else { TrueOutcome::Early })
        } else {
            let u = self.rng.uniform();
            let slot = match state {
                0 => u64::from(u >= 0.5),
                1 => 1 + u64::from(u >= 0.5),
                _ => u64::from(u >= 0.25) + u64::from(u >= 0.75),
            };
            let plus = if slot == 1 && state == 2 { true } else { self.rng.coin() };
            let det = if plus { 1 } else { 2 };
            let outcome = match (slot, plus) {
                (1, true) => TrueOutcome::Plus,
                (1, false) => TrueOutcome::Minus,
                _ => TrueOutcome::Side,
            };
            (det, slot as f64 * tau, outcome)
        };
        let t = self.cfg.clock.time_ps(k, self.cfg.delays_ps[det] + offset) + self.cfg.jitter_ps * self.rng.normal();
        let t = self.quantise(t);
        self.held.push((t, self.cfg.channels[det], Some(TrueClick { pulse: k, outcome, dark: false })));
    }

    /// A dark count of detector `det` in pulse `k`, uniform over the period, labelled by the
    /// ideal windows (centred on the generated peaks, half-width `label_half_window_ps`).
    fn dark_click(&mut self, det: usize, k: u64) {
        let period = self.cfg.clock.period_ps;
        let (tau, half) = (self.cfg.bin_separation_ps, self.cfg.label_half_window_ps);
        // Uniform over one period, centred on the pulse's pattern so that the label's pulse is k.
        let span = if det == 0 { tau } else { 2.0 * tau };
        let offset = span / 2.0 + (self.rng.uniform() - 0.5) * period;
        let near = |centre: f64| (offset - centre).abs() < half;
        let outcome = match det {
            0 if near(0.0) => TrueOutcome::Early,
            0 if near(tau) => TrueOutcome::Late,
            1 if near(tau) => TrueOutcome::Plus,
            2 if near(tau) => TrueOutcome::Minus,
            1 | 2 if near(0.0) || near(2.0 * tau) => TrueOutcome::Side,
            _ => TrueOutcome::Outside,
        };
        let t = self.quantise(self.cfg.clock.time_ps(k, self.cfg.delays_ps[det] + offset));
        self.held.push((t, self.cfg.channels[det], Some(TrueClick { pulse: k, outcome, dark: true })));
    }

    /// A time floored to the tagger's resolution (never negative).
    fn quantise(&self, t: f64) -> u64 {
        let r = self.cfg.resolution_ps.max(1);
        (t.max(0.0) as u64) / r * r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generator_moments() {
        let seed = 3;
        let mut rng = SplitMix64::new(seed);
        let n = 200_000;
        let (mut s, mut s2, mut ones) = (0.0, 0.0, 0u32);
        for _ in 0..n {
            let x = rng.normal();
            s += x;
            s2 += x * x;
            ones += u32::from(rng.coin());
        }
        let (mean, var) = (s / n as f64, s2 / n as f64);
        assert!(mean.abs() < 0.01 && (var - 1.0).abs() < 0.02, "seed {seed}: mean {mean}, var {var}");
        assert!((f64::from(ones) / n as f64 - 0.5).abs() < 0.01);
        let p = 0.05;
        let m: f64 = (0..n).map(|_| rng.geometric(p) as f64).sum::<f64>() / n as f64;
        assert!((m - (1.0 - p) / p).abs() < 0.3, "seed {seed}: geometric mean {m}");
        assert_eq!(rng.geometric(0.0), u64::MAX);
        assert_eq!(rng.geometric(1.0), 0);
    }

    #[test]
    fn tagger_clock_stretches_and_drifts() {
        let c = TaggerClock { period_ps: 10_000.0, start_ps: 5.0, offset_ppm: 100.0, drift_ppm_per_s: 1.0 };
        assert_eq!(c.time_ps(0, 0.0), 5.0);
        // One second of pulses: 10^8 pulses; offset 100 ppm -> +100 us, drift -> +0.5 us.
        let t = c.time_ps(100_000_000, 0.0);
        assert!((t - (5.0 + 1e12 + 1e8 + 5e5)).abs() < 1.0, "{t}");
        assert!((c.period_at(100_000_000) - 10_000.0 * (1.0 + 101e-6)).abs() < 1e-6);
    }

    #[test]
    fn stream_is_sorted_and_skips_gaps() {
        let cfg = GeneratorConfig {
            pulses: 1 << 20,
            frame_pulses: 1 << 18,
            sync_every: 1 << 16,
            gaps: vec![(300_000, 310_000)],
            ..GeneratorConfig::default()
        };
        let clock = cfg.clock;
        let (records, truth) = Generator::new(cfg).generate_all();
        let times: Vec<u64> = records.iter().map(Record::time_ps).collect();
        assert!(times.windows(2).all(|w| w[0] <= w[1]), "records out of order");
        let gaps: Vec<_> = records.iter().filter(|r| matches!(r, Record::Gap { .. })).collect();
        assert_eq!(gaps.len(), 1);
        let (g0, g1) = (clock.time_ps(300_000, 0.0), clock.time_ps(310_000, 0.0));
        assert!(records.iter().all(|r| match r {
            Record::Tag(t) => (t.time_ps as f64) < g0 - 1.0 || (t.time_ps as f64) > g1 + 1.0,
            _ => true,
        }));
        let syncs = records.iter().filter(|r| matches!(r, Record::Tag(t) if t.channel == 0)).count();
        assert_eq!(syncs, 16);
        let n_tags = records.iter().filter(|r| matches!(r, Record::Tag(t) if t.channel != 0)).count();
        assert_eq!(n_tags, truth.len());
        let expect = (1u64 << 20) as f64 * 0.05 * (1.0 - 10_000.0 / (1u64 << 20) as f64);
        assert!((truth.len() as f64 - expect).abs() < 5.0 * expect.sqrt(), "{} vs {expect}", truth.len());
    }
}
