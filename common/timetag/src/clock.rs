//! Clock recovery: the map from Bob's tagger time to Alice's pulse coordinate.
//!
//! # Conventions
//! The *pulse coordinate* of a tagger time t is a real number u whose integer part is a global
//! pulse index (frame x frame length + index within the frame) and whose fraction is the phase
//! within that pulse period: pulse k spans [k, k + 1). Times are integer ps of Bob's tagger; the
//! pulse period is a real number of ps (1/76 MHz = 13157.894... ps is not an integer), so it
//! is never rounded: models are `f64` polynomials, and the per-tag map is fixed point (below).
//!
//! # Model and tracking loop
//! Between observations the clock is t(k) = t_ref + a + b x + c x^2 with x = k - k_ref: an
//! offset, a period b (ps per pulse) and a curvature c that absorbs a linear frequency drift
//! (1 ppm/s moves the time of a pulse 55 ms away by 1.5 ns against a straight line, far more
//! than a time bin, so a linear model per frame is not enough). [`ClockFit`] is the
//! least-squares fit over a sliding window of the last observations (the tracking loop: each
//! new observation refits, so the model follows drift with the window's memory).
//!
//! Observations ([`Observation`]) come from one of two sources:
//! * [`SyncTracker`]: Alice's sync, one tag every `sync_every` pulses (per frame, or more
//!   often). The count of syncs since the first one comes from the time elapsed divided by the
//!   predicted sync period, so lost syncs (gaps, missed tags) are bridged; a sync whose residual
//!   exceeds the tolerance is rejected as spurious. The first sync marks global pulse
//!   `first_sync_pulse`. Locks after `lock_syncs` (3) syncs: with a period known to
//!   +-`max_offset_ppm` the second sync gives the period, the third the curvature.
//! * [`DataTracker`]: the Z detector's own clicks, when there is no sync (see its docs for the
//!   method and its limits).
//!
//! # Per-tag map: segments
//! A tag must be mapped at tens of millions per second, so the fit is not evaluated per tag:
//! once a stretch of pulses is *final* (enough later observations exist: `lookahead`), it is cut
//! into [`Segment`]s of `segment_pulses` pulses, on each of which the map is linear in fixed
//! point: u = pulse + ((t - start) slope + frac) / 2^64, with slope = 2^64 / (local period) and
//! one 64 x 64 -> 128-bit multiplication per tag. The linearisation error over 2^14 pulses with
//! a drift of 1 ppm/s is below 0.01 ps.

use std::collections::VecDeque;

/// Pulse period of a 76 MHz source, in ps (not an integer).
pub const PERIOD_76MHZ_PS: f64 = 1e12 / 76e6;

/// 2^64 as a float.
const TWO64: f64 = 18_446_744_073_709_551_616.0;

/// A point of the clock: the pulse coordinate `pulse + frac` was at tagger time `time_ps`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Observation {
    /// Integer part of the pulse coordinate (global pulse index).
    pub pulse: i64,
    /// Fractional part, in [0, 1).
    pub frac: f64,
    /// Tagger time, in ps.
    pub time_ps: u64,
}

/// The least-squares clock model t(k) = t_ref + a + b x + c x^2, x = k - k_ref, over a set of
/// observations (module docs).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ClockFit {
    pulse_ref: i64,
    time_ref: u64,
    a: f64,
    b: f64,
    c: f64,
    rms_ps: f64,
    points: usize,
}

impl ClockFit {
    /// The fit of `obs` (at least two, with distinct coordinates): quadratic with three or
    /// more when `quadratic`, else linear. `None` if there are too few points or the fitted
    /// period is not positive.
    pub fn from_observations(obs: &[Observation], quadratic: bool) -> Option<Self> {
        let last = *obs.last()?;
        if obs.len() < 2 {
            return None;
        }
        let (k_ref, t_ref) = (last.pulse, last.time_ps);
        let x = |o: &Observation| (o.pulse - k_ref) as f64 + o.frac;
        let y = |o: &Observation| (o.time_ps as i64 - t_ref as i64) as f64;
        let n = obs.len() as f64;
        let mean = obs.iter().map(x).sum::<f64>() / n;
        let h = obs.iter().map(|o| (x(o) - mean).abs()).fold(0.0, f64::max);
        if h <= 0.0 {
            return None;
        }
        // Normal equations in s = (x - mean) / h, which lies in [-1, 1].
        let mut m = [0.0f64; 5];
        let mut v = [0.0f64; 3];
        for o in obs {
            let s = (x(o) - mean) / h;
            let yy = y(o);
            let mut p = 1.0;
            for (i, mi) in m.iter_mut().enumerate() {
                *mi += p;
                if i < 3 {
                    v[i] += p * yy;
                }
                p *= s;
            }
        }
        let (big_a, big_b, big_c) = if quadratic && obs.len() >= 3 {
            let sol = solve3([[m[0], m[1], m[2]], [m[1], m[2], m[3]], [m[2], m[3], m[4]]], v)?;
            (sol[0], sol[1], sol[2])
        } else {
            let det = m[0] * m[2] - m[1] * m[1];
            if det.abs() < 1e-300 {
                return None;
            }
            ((v[0] * m[2] - v[1] * m[1]) / det, (m[0] * v[1] - m[1] * v[0]) / det, 0.0)
        };
        // Back to x: t = A + B s + C s^2 with s = (x - mean) / h.
        let (q, r) = (mean / h, 1.0 / h);
        let a = big_a - big_b * q + big_c * q * q;
        let b = big_b * r - 2.0 * big_c * q * r;
        let c = big_c * r * r;
        if b.is_nan() || b <= 0.0 {
            return None;
        }
        let mut fit = Self { pulse_ref: k_ref, time_ref: t_ref, a, b, c, rms_ps: 0.0, points: obs.len() };
        let ss: f64 = obs.iter().map(|o| (y(o) - fit.rel(x(o))).powi(2)).sum();
        fit.rms_ps = (ss / n).sqrt();
        Some(fit)
    }

    /// Time of pulse offset `x` (from the reference pulse) relative to the reference time, ps.
    #[inline]
    fn rel(&self, x: f64) -> f64 {
        self.a + x * (self.b + x * self.c)
    }

    /// Tagger time of the start of pulse `pulse` (`f64` ps: for reporting and tests).
    pub fn time_at(&self, pulse: i64) -> f64 {
        self.time_ref as f64 + self.rel((pulse - self.pulse_ref) as f64)
    }

    /// The pulse period around pulse `pulse`, in ps of the tagger.
    pub fn period_at(&self, pulse: i64) -> f64 {
        self.b + 2.0 * self.c * (pulse - self.pulse_ref) as f64
    }

    /// The pulse coordinate of tagger time `time_ps`: (integer part, fraction in [0, 1)).
    pub fn coordinate_at(&self, time_ps: u64) -> (i64, f64) {
        let y = (time_ps as i64 - self.time_ref as i64) as f64;
        let mut x = (y - self.a) / self.b;
        for _ in 0..4 {
            let d = self.b + 2.0 * self.c * x;
            if d <= 0.0 {
                break;
            }
            x -= (self.rel(x) - y) / d;
        }
        let fl = x.floor();
        (self.pulse_ref + fl as i64, x - fl)
    }

    /// Root-mean-square residual of the observations, in ps.
    pub fn rms_ps(&self) -> f64 {
        self.rms_ps
    }

    /// Number of observations fitted.
    pub fn points(&self) -> usize {
        self.points
    }

    /// Appends the segments of pulses [`from`, `to`) to `out`, `segment_pulses` pulses each
    /// (module docs, "Per-tag map").
    pub fn push_segments(&self, from: i64, to: i64, segment_pulses: u64, out: &mut VecDeque<Segment>) {
        let step = segment_pulses.max(1) as i64;
        let mut k = from;
        while k < to {
            let k2 = (k + step).min(to);
            let (xa, xb) = ((k - self.pulse_ref) as f64, (k2 - self.pulse_ref) as f64);
            let (ta, tb) = (self.rel(xa), self.rel(xb));
            let period = (tb - ta) / (k2 - k) as f64;
            // The segment starts at the first whole ps at or after pulse k (never before 0).
            let start_rel = ta.ceil().max(-(self.time_ref as f64));
            let start = (self.time_ref as i64 + start_rel as i64) as u64;
            let lead = (start_rel - ta) / period;
            let whole = lead.floor();
            out.push_back(Segment {
                start_ps: start,
                pulse: k + whole as i64,
                frac: ((lead - whole) * TWO64) as u64,
                slope: (TWO64 / period) as u64,
            });
            k = k2;
        }
    }
}

/// Solves the 3 x 3 system `m` x = `v` (Gaussian elimination with partial pivoting); `None` if
/// singular.
fn solve3(mut m: [[f64; 3]; 3], mut v: [f64; 3]) -> Option<[f64; 3]> {
    for col in 0..3 {
        let piv = (col..3).max_by(|&i, &j| m[i][col].abs().total_cmp(&m[j][col].abs()))?;
        if m[piv][col].abs() < 1e-12 {
            return None;
        }
        m.swap(col, piv);
        v.swap(col, piv);
        for row in col + 1..3 {
            let f = m[row][col] / m[col][col];
            let pivot_row = m[col];
            for (x, p) in m[row][col..].iter_mut().zip(&pivot_row[col..]) {
                *x -= f * p;
            }
            v[row] -= f * v[col];
        }
    }
    let mut x = [0.0; 3];
    for row in (0..3).rev() {
        let s: f64 = (row + 1..3).map(|k| m[row][k] * x[k]).sum();
        x[row] = (v[row] - s) / m[row][row];
    }
    Some(x)
}

/// The clock map on a stretch of tagger time, linear in fixed point: tag time t >= `start_ps`
/// (up to the next segment's start) has pulse coordinate `pulse` + ((t - `start_ps`) `slope` +
/// `frac`) / 2^64.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// First tagger time of the segment, in ps.
    pub start_ps: u64,
    /// Integer pulse coordinate at `start_ps`.
    pub pulse: i64,
    /// Fractional pulse coordinate at `start_ps`, in units of 2^-64 pulse.
    pub frac: u64,
    /// Pulses per ps, in units of 2^-64.
    pub slope: u64,
}

impl Segment {
    /// The pulse coordinate of `time_ps` (at or after `start_ps`): (pulse, fraction in units
    /// of 2^-64).
    #[inline]
    pub fn coordinate(&self, time_ps: u64) -> (i64, u64) {
        let prod = u128::from(time_ps - self.start_ps) * u128::from(self.slope) + u128::from(self.frac);
        (self.pulse + (prod >> 64) as i64, prod as u64)
    }

    /// The local period, in ps.
    pub fn period_ps(&self) -> f64 {
        TWO64 / self.slope as f64
    }
}

/// Why clock recovery gave up.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ClockError {
    /// The configuration cannot work.
    #[error("clock configuration: {0}")]
    Config(String),
    /// The count of pulses since the reference became ambiguous or inconsistent: the frame
    /// alignment is lost and the stream must be restarted.
    #[error("clock lock lost at {time_ps} ps: {reason}")]
    LockLost {
        /// Tagger time, ps.
        time_ps: u64,
        /// What happened.
        reason: String,
    },
}

/// Sync-based clock recovery settings.
#[derive(Clone, Debug, PartialEq)]
pub struct SyncConfig {
    /// Alice's nominal pulse period, in ps.
    pub nominal_period_ps: f64,
    /// Pulses between two sync tags.
    pub sync_every: u64,
    /// Global pulse index of the first (genuine) sync tag.
    pub first_sync_pulse: i64,
    /// Largest frequency offset of the tagger against the nominal period, in ppm (acquisition).
    pub max_offset_ppm: f64,
    /// Largest frequency drift, in ppm/s (tolerance when bridging lost syncs).
    pub max_drift_ppm_per_s: f64,
    /// Largest residual of an accepted sync against the prediction, in ps (sync jitter plus
    /// model error).
    pub max_residual_ps: f64,
    /// Syncs in the fitting window.
    pub window: usize,
    /// Syncs needed before the clock is locked (at least 2; 3 also fits the drift).
    pub lock_syncs: usize,
    /// Later syncs required before a stretch is final (interpolation, not extrapolation).
    pub lookahead: usize,
    /// Consecutive rejected syncs after which the lock is lost (before lock: acquisition
    /// restarts).
    pub max_rejected: usize,
    /// Pulses per linear segment.
    pub segment_pulses: u64,
}

impl Default for SyncConfig {
    /// 76 MHz, one sync per frame of 2^22 pulses, +-200 ppm, 2 ppm/s, 1 ns residual, window 8,
    /// lock after 3, lookahead 2, 4 rejections, segments of 2^14 pulses.
    fn default() -> Self {
        Self {
            nominal_period_ps: PERIOD_76MHZ_PS,
            sync_every: 1 << 22,
            first_sync_pulse: 0,
            max_offset_ppm: 200.0,
            max_drift_ppm_per_s: 2.0,
            max_residual_ps: 1000.0,
            window: 8,
            lock_syncs: 3,
            lookahead: 2,
            max_rejected: 4,
            segment_pulses: 1 << 14,
        }
    }
}

impl SyncConfig {
    /// Checks that the settings can work.
    pub fn validate(&self) -> Result<(), ClockError> {
        let bad = |m: &str| Err(ClockError::Config(m.to_string()));
        let numbers = [self.nominal_period_ps, self.max_offset_ppm, self.max_drift_ppm_per_s, self.max_residual_ps];
        if !numbers.iter().all(|x| x.is_finite()) {
            return bad("settings must be finite numbers");
        }
        if self.nominal_period_ps < 10.0 {
            return bad("nominal_period_ps must be at least 10 ps");
        }
        if self.sync_every == 0 {
            return bad("sync_every must be positive");
        }
        if self.lock_syncs < 2 || self.window < self.lock_syncs {
            return bad("need 2 <= lock_syncs <= window");
        }
        if self.lookahead + 1 >= self.window {
            return bad("lookahead must be below window - 1");
        }
        let slip = self.max_offset_ppm * 1e-6 * self.sync_every as f64 * self.nominal_period_ps;
        if self.max_offset_ppm < 0.0
            || slip + self.max_residual_ps >= 0.4 * self.sync_every as f64 * self.nominal_period_ps
        {
            return bad("max_offset_ppm and max_residual_ps leave the sync count ambiguous");
        }
        if self.segment_pulses == 0 {
            return bad("segment_pulses must be positive");
        }
        Ok(())
    }
}

/// The state shared by both trackers: the observation window, its fit, and how far the map is
/// final.
#[derive(Clone, Debug)]
struct Track {
    window: usize,
    obs: VecDeque<Observation>,
    fit: Option<ClockFit>,
    /// First pulse not yet covered by segments (once locked).
    final_pulse: Option<i64>,
    /// Tagger time of `final_pulse` under the fit that made the last segments.
    final_time: Option<u64>,
    segment_pulses: u64,
}

impl Track {
    fn new(window: usize, segment_pulses: u64) -> Self {
        Self { window, obs: VecDeque::new(), fit: None, final_pulse: None, final_time: None, segment_pulses }
    }

    /// Adds an observation and refits.
    fn push(&mut self, o: Observation) {
        self.obs.push_back(o);
        while self.obs.len() > self.window {
            self.obs.pop_front();
        }
        let slice = self.obs.make_contiguous();
        self.fit = ClockFit::from_observations(slice, true).or(self.fit);
    }

    /// Makes pulses below `to` final: appends their segments to `out`.
    fn finalise_to(&mut self, to: i64, out: &mut VecDeque<Segment>) {
        let (Some(fit), Some(from)) = (self.fit, self.final_pulse) else { return };
        if to > from {
            fit.push_segments(from, to, self.segment_pulses, out);
            self.final_pulse = Some(to);
            self.final_time = Some(fit.time_at(to).ceil().max(0.0) as u64);
        }
    }

    /// Tagger time up to which the map is final (start of the first pulse not final).
    fn final_time(&self) -> Option<u64> {
        self.final_time
    }

    fn estimate(&self, nominal: f64, locked: bool) -> Option<ClockEstimate> {
        let fit = self.fit?;
        let last = self.obs.back()?.pulse;
        let period = fit.period_at(last);
        Some(ClockEstimate {
            period_ps: period,
            offset_ppm: (period / nominal - 1.0) * 1e6,
            // d(period)/d(pulse) = 2c; per second: times the pulses per second.
            drift_ppm_per_s: 2.0 * fit.c / period * 1e6 * (1e12 / period),
            rms_ps: fit.rms_ps,
            observations: fit.points,
            locked,
        })
    }
}

/// What the tracking loop currently believes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ClockEstimate {
    /// Pulse period at the last observation, in tagger ps.
    pub period_ps: f64,
    /// Frequency offset of the tagger against the nominal period, in ppm.
    pub offset_ppm: f64,
    /// Rate of change of that offset, in ppm/s (from the fit's curvature).
    pub drift_ppm_per_s: f64,
    /// Root-mean-square residual of the fit, in ps.
    pub rms_ps: f64,
    /// Observations in the fit.
    pub observations: usize,
    /// Whether the clock is locked (segments are being produced).
    pub locked: bool,
}

/// What became of one sync tag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncVerdict {
    /// Accepted as the sync of the given global pulse.
    Accepted(i64),
    /// Rejected as inconsistent with the model (spurious, duplicate or out of order).
    Rejected,
    /// Acquisition restarted from this sync (before lock, after too many rejections).
    Restarted,
}

/// Sync-based clock recovery (module docs).
#[derive(Clone, Debug)]
pub struct SyncTracker {
    cfg: SyncConfig,
    track: Track,
    locked: bool,
    rejected_in_row: usize,
    /// Syncs accepted, rejected, restarts.
    counts: [u64; 3],
}

impl SyncTracker {
    /// A tracker for `cfg` (validated).
    pub fn new(cfg: SyncConfig) -> Result<Self, ClockError> {
        cfg.validate()?;
        let track = Track::new(cfg.window, cfg.segment_pulses);
        Ok(Self { cfg, track, locked: false, rejected_in_row: 0, counts: [0; 3] })
    }

    /// Whether the clock is locked.
    pub fn locked(&self) -> bool {
        self.locked
    }

    /// The current estimate, once there is a fit.
    pub fn estimate(&self) -> Option<ClockEstimate> {
        self.track.estimate(self.cfg.nominal_period_ps, self.locked)
    }

    /// The current fit.
    pub fn fit(&self) -> Option<&ClockFit> {
        self.track.fit.as_ref()
    }

    /// Syncs accepted, rejected, and acquisition restarts so far.
    pub fn counts(&self) -> (u64, u64, u64) {
        (self.counts[0], self.counts[1], self.counts[2])
    }

    /// Tagger time up to which the map is final (segments exist), once locked.
    pub fn final_time(&self) -> Option<u64> {
        if self.locked { self.track.final_time() } else { None }
    }

    /// First pulse not yet covered by segments, once locked.
    pub fn final_pulse(&self) -> Option<i64> {
        if self.locked { self.track.final_pulse } else { None }
    }

    /// Feeds the sync tag at `time_ps` (syncs in time order); appends newly final segments to
    /// `out`.
    pub fn observe(&mut self, time_ps: u64, out: &mut VecDeque<Segment>) -> Result<SyncVerdict, ClockError> {
        let Some(last) = self.track.obs.back().copied() else {
            self.track.push(Observation { pulse: self.cfg.first_sync_pulse, frac: 0.0, time_ps });
            self.counts[0] += 1;
            return Ok(SyncVerdict::Accepted(self.cfg.first_sync_pulse));
        };
        match self.count_since(&last, time_ps) {
            Ok(n) => {
                self.rejected_in_row = 0;
                let pulse = last.pulse + n * self.cfg.sync_every as i64;
                self.track.push(Observation { pulse, frac: 0.0, time_ps });
                self.counts[0] += 1;
                self.update_lock(out);
                Ok(SyncVerdict::Accepted(pulse))
            }
            Err(reason) => {
                self.rejected_in_row += 1;
                self.counts[1] += 1;
                if self.rejected_in_row <= self.cfg.max_rejected {
                    return Ok(SyncVerdict::Rejected);
                }
                if self.locked {
                    return Err(ClockError::LockLost { time_ps, reason });
                }
                // Before lock: the first sync was probably spurious; start again from this one.
                self.track = Track::new(self.cfg.window, self.cfg.segment_pulses);
                self.track.push(Observation { pulse: self.cfg.first_sync_pulse, frac: 0.0, time_ps });
                self.rejected_in_row = 0;
                self.counts[2] += 1;
                Ok(SyncVerdict::Restarted)
            }
        }
    }

    /// The number of sync periods between `last` and a sync at `time_ps`, or why the sync does
    /// not fit.
    fn count_since(&self, last: &Observation, time_ps: u64) -> Result<i64, String> {
        if time_ps <= last.time_ps {
            return Err(format!("sync at {time_ps} ps is not after the previous one"));
        }
        let dt = (time_ps - last.time_ps) as f64;
        let n_sync = self.cfg.sync_every as f64;
        let (periods, period) = match (&self.track.fit, self.track.obs.len() >= 2) {
            (Some(fit), true) => {
                let (k, f) = fit.coordinate_at(time_ps);
                (((k - last.pulse) as f64 + f) / n_sync, fit.period_at(last.pulse))
            }
            _ => (dt / (self.cfg.nominal_period_ps * n_sync), self.cfg.nominal_period_ps),
        };
        let n = periods.round();
        let residual = (periods - n) * n_sync * period;
        let dt_s = dt * 1e-12;
        let allowance = if self.track.obs.len() < 2 {
            self.cfg.max_offset_ppm * 1e-6 * dt
        } else {
            0.5 * self.cfg.max_drift_ppm_per_s * 1e-6 * dt_s * dt_s * 1e12
        };
        let tol = self.cfg.max_residual_ps + allowance;
        if tol >= 0.4 * n_sync * period {
            return Err(format!("after {dt_s:.3} s without sync the sync count is ambiguous"));
        }
        if n < 1.0 || residual.abs() > tol {
            return Err(format!("sync residual {residual:.0} ps (tolerance {tol:.0} ps)"));
        }
        Ok(n as i64)
    }

    /// Locks once enough syncs agree, then makes final what the lookahead allows.
    fn update_lock(&mut self, out: &mut VecDeque<Segment>) {
        let obs = &self.track.obs;
        if !self.locked {
            let fit_ok = self.track.fit.is_some_and(|f| obs.len() <= 3 || f.rms_ps <= self.cfg.max_residual_ps / 2.0);
            if obs.len() < self.cfg.lock_syncs || !fit_ok {
                return;
            }
            self.locked = true;
            self.track.final_pulse = Some(obs[0].pulse - BACK_PULSES);
        }
        let obs = &self.track.obs;
        if obs.len() > self.cfg.lookahead {
            let to = obs[obs.len() - 1 - self.cfg.lookahead].pulse;
            self.track.finalise_to(to, out);
        }
    }

    /// End of stream: makes final everything up to the pulse of `end_ps` (extrapolating beyond
    /// the last sync by at most the lookahead).
    pub fn finish(&mut self, end_ps: u64, out: &mut VecDeque<Segment>) {
        if !self.locked {
            return;
        }
        if let Some(fit) = self.track.fit {
            let (k, _) = fit.coordinate_at(end_ps);
            self.track.finalise_to(k + 2, out);
        }
    }
}

/// Clock recovery from the Z detector's clicks alone (no sync channel) settings.
#[derive(Clone, Debug, PartialEq)]
pub struct DataConfig {
    /// Alice's nominal pulse period, in ps.
    pub nominal_period_ps: f64,
    /// Time-bin separation, in ps.
    pub bin_separation_ps: f64,
    /// Largest frequency offset against the nominal period, in ppm.
    pub max_offset_ppm: f64,
    /// Half-width around an expected bin within which a click counts as that bin's, in ps.
    pub tolerance_ps: f64,
    /// Z clicks used for acquisition.
    pub acquisition_tags: usize,
    /// Z clicks per observation of the tracking loop.
    pub block_tags: usize,
    /// Least fraction of a block's clicks near an expected bin (below: a bad block).
    pub min_accept_fraction: f64,
    /// Consecutive bad blocks after which the lock is lost.
    pub max_bad_blocks: usize,
    /// Longest gap the loop coasts over, in ps.
    pub max_gap_ps: u64,
    /// Observations in the fitting window.
    pub window: usize,
    /// Later observations required before a stretch is final.
    pub lookahead: usize,
    /// Pulses per linear segment.
    pub segment_pulses: u64,
}

impl Default for DataConfig {
    /// 76 MHz, 800 ps bins, +-200 ppm, 150 ps tolerance, 4096 acquisition clicks, blocks of 512,
    /// window 16, lookahead 2, gaps up to 20 ms.
    fn default() -> Self {
        Self {
            nominal_period_ps: PERIOD_76MHZ_PS,
            bin_separation_ps: 800.0,
            max_offset_ppm: 200.0,
            tolerance_ps: 150.0,
            acquisition_tags: 4096,
            block_tags: 512,
            min_accept_fraction: 0.3,
            max_bad_blocks: 3,
            max_gap_ps: 20_000_000_000,
            window: 16,
            lookahead: 2,
            segment_pulses: 1 << 14,
        }
    }
}

impl DataConfig {
    /// Checks that the settings can work.
    pub fn validate(&self) -> Result<(), ClockError> {
        let bad = |m: &str| Err(ClockError::Config(m.to_string()));
        let p = self.nominal_period_ps;
        let numbers = [p, self.bin_separation_ps, self.max_offset_ppm, self.tolerance_ps, self.min_accept_fraction];
        if !numbers.iter().all(|x| x.is_finite()) {
            return bad("settings must be finite numbers");
        }
        if p < 10.0 {
            return bad("nominal_period_ps must be at least 10 ps");
        }
        if self.tolerance_ps <= 0.0 || self.bin_separation_ps < 2.0 * self.tolerance_ps {
            return bad("need 0 < 2 tolerance_ps <= bin_separation_ps");
        }
        if self.bin_separation_ps + 2.0 * self.tolerance_ps >= p / 2.0 {
            return bad("bin_separation_ps + 2 tolerance_ps must stay below half a period");
        }
        if self.acquisition_tags < 64 || self.block_tags < 16 {
            return bad("need at least 64 acquisition clicks and 16 clicks per block");
        }
        if self.window < 3 || self.lookahead + 1 >= self.window || self.segment_pulses == 0 {
            return bad("need window >= 3, lookahead < window - 1, segment_pulses > 0");
        }
        if self.max_pair_pulses() < 2 {
            return bad("max_offset_ppm too large for acquisition");
        }
        Ok(())
    }

    /// Longest distance between consecutive clicks, in pulses, whose pulse count acquisition can
    /// round without knowing the offset.
    fn max_pair_pulses(&self) -> u64 {
        let p = self.nominal_period_ps;
        let margin = p / 2.0 - self.bin_separation_ps - 2.0 * self.tolerance_ps;
        (margin / (self.max_offset_ppm.max(1e-3) * 1e-6 * p)) as u64
    }
}

/// Pulses before the first observation that the model covers at lock (so that the tags of
/// the first pulses, which may precede the first sync by a fraction of a period, are mapped).
pub const BACK_PULSES: i64 = 2;

/// Phase of the early bin within the pulse period chosen by [`DataTracker`] (the origin of the
/// pulse coordinate is arbitrary without a sync).
pub const DATA_EARLY_PHASE: f64 = 0.25;

/// Clock recovery from the Z detector's clicks alone, for streams without a sync channel.
///
/// # Method
/// 1. *Acquisition* over the first `acquisition_tags` Z clicks. Consecutive clicks a few
///    thousand pulses apart or less are n periods plus a bin difference (0 or +-tau) apart, and
///    n rounds unambiguously within +-`max_offset_ppm`; summing the differences and the n over
///    a chain telescopes the bin differences, so sum(dt) / sum(n) is the period to within
///    (tau + 2 tol) / sum(n) per chain. Folding a first short stretch at that period gives the
///    phase of the strongest bin; a least-squares line through the clicks within `tolerance_ps`
///    of that bin (the same bin, so no tau in the residuals), over growing stretches, refines
///    period and phase; whether that bin is early or late is read from whether the other peak
///    lies tau later or earlier.
/// 2. *Tracking*: every `block_tags` Z clicks give one observation: each click's coordinate is
///    predicted by the current fit, its distance to the nearer expected bin (early at phase
///    [`DATA_EARLY_PHASE`], late tau later) is its phase error, and the block's mean error
///    corrects the coordinate of the block's median click. The fit over the window is the
///    loop filter.
///
/// # Limits
/// * The pulse index is relative: pulse 0 is the pulse of the first click, and frames are
///   counted from there. Frame alignment with Alice needs outside information (a pulse offset
///   found by correlating with her states).
/// * It needs a Z rate of at least about one click per thousand pulses (so that the chains of
///   acquisition are long), bins well apart (tau > 2 tol > jitter), and dark counts well below
///   the signal. It cannot tell Z from X detectors and uses only the Z detector.
/// * A gap is bridged by extrapolation; beyond `max_gap_ps` (default 20 ms: at 1 ppm/s the
///   unmodelled curvature reaches a few ns after about 100 ms) the pulse count is ambiguous and
///   the lock is lost. Bad blocks (too few clicks near a bin) also lose it.
#[derive(Clone, Debug)]
pub struct DataTracker {
    cfg: DataConfig,
    track: Track,
    /// Z click times of the acquisition, or of the current block.
    buf: Vec<u64>,
    locked: bool,
    bad_blocks: usize,
    /// Time of the last Z click seen.
    last_time: Option<u64>,
    /// Tagger time of pulse 0's start, once acquired (for reporting).
    origin: Option<(u64, f64)>,
}

impl DataTracker {
    /// A tracker for `cfg` (validated).
    pub fn new(cfg: DataConfig) -> Result<Self, ClockError> {
        cfg.validate()?;
        let track = Track::new(cfg.window, cfg.segment_pulses);
        Ok(Self { cfg, track, buf: Vec::new(), locked: false, bad_blocks: 0, last_time: None, origin: None })
    }

    /// Whether the clock is locked.
    pub fn locked(&self) -> bool {
        self.locked
    }

    /// The current estimate, once there is a fit.
    pub fn estimate(&self) -> Option<ClockEstimate> {
        self.track.estimate(self.cfg.nominal_period_ps, self.locked)
    }

    /// The current fit.
    pub fn fit(&self) -> Option<&ClockFit> {
        self.track.fit.as_ref()
    }

    /// Tagger time up to which the map is final, once locked.
    pub fn final_time(&self) -> Option<u64> {
        if self.locked { self.track.final_time() } else { None }
    }

    /// First pulse not yet covered by segments, once locked.
    pub fn final_pulse(&self) -> Option<i64> {
        if self.locked { self.track.final_pulse } else { None }
    }

    /// Feeds one Z click (in time order); appends newly final segments to `out`. Returns
    /// whether this click closed an acquisition or a block (only then can segments appear).
    #[inline]
    pub fn observe(&mut self, time_ps: u64, out: &mut VecDeque<Segment>) -> Result<bool, ClockError> {
        if let Some(last) = self.last_time
            && self.locked
            && time_ps.saturating_sub(last) > self.cfg.max_gap_ps
        {
            return Err(ClockError::LockLost {
                time_ps,
                reason: format!("{} ps without a Z click: the pulse count is ambiguous", time_ps - last),
            });
        }
        self.last_time = Some(time_ps);
        self.buf.push(time_ps);
        if !self.locked {
            if self.buf.len() >= self.cfg.acquisition_tags {
                self.acquire(out, time_ps)?;
                return Ok(true);
            }
        } else if self.buf.len() >= self.cfg.block_tags {
            self.block(out, time_ps)?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Data lost from `from_ps` to `to_ps`: closes the current block (if long enough) and
    /// checks that the loop can coast over the gap.
    pub fn gap(&mut self, from_ps: u64, to_ps: u64, out: &mut VecDeque<Segment>) -> Result<(), ClockError> {
        if !self.locked {
            // Acquisition must see contiguous data: start it again after the gap.
            self.buf.clear();
            self.last_time = None;
            return Ok(());
        }
        if self.buf.len() >= self.cfg.block_tags / 4 {
            self.block(out, from_ps)?;
        }
        self.buf.clear();
        if to_ps.saturating_sub(from_ps) > self.cfg.max_gap_ps {
            return Err(ClockError::LockLost {
                time_ps: to_ps,
                reason: format!("gap of {} ps is longer than the loop can coast", to_ps - from_ps),
            });
        }
        self.last_time = Some(to_ps);
        Ok(())
    }

    /// End of stream: closes the last block and makes final everything up to `end_ps`.
    pub fn finish(&mut self, end_ps: u64, out: &mut VecDeque<Segment>) -> Result<(), ClockError> {
        if !self.locked {
            return Ok(());
        }
        if self.buf.len() >= self.cfg.block_tags / 4 {
            self.block(out, end_ps)?;
        }
        self.buf.clear();
        if let Some(fit) = self.track.fit {
            let (k, _) = fit.coordinate_at(end_ps);
            self.track.finalise_to(k + 2, out);
        }
        Ok(())
    }

    /// Acquisition over the buffered clicks (type docs, step 1); on success, feeds them to the
    /// tracking loop as blocks and locks.
    fn acquire(&mut self, out: &mut VecDeque<Segment>, now: u64) -> Result<(), ClockError> {
        let mut times = std::mem::take(&mut self.buf);
        times.sort_unstable();
        let (period, phase0) = match acquire_linear(&self.cfg, &times) {
            Some(r) => r,
            None => {
                // Not enough structure yet: keep the later half and try again later.
                self.buf = times[times.len() / 2..].to_vec();
                return Ok(());
            }
        };
        // Coordinate u(t) = (t - t0) / period + c0 with the early bin at DATA_EARLY_PHASE.
        let t0 = times[0];
        let c0 = (DATA_EARLY_PHASE - phase0).rem_euclid(1.0);
        self.origin = Some((t0, c0));
        let linear = |t: u64| {
            let u = (t - t0) as f64 / period + c0;
            let fl = u.floor();
            (fl as i64, u - fl)
        };
        for chunk in times.chunks(self.cfg.block_tags) {
            if chunk.len() >= self.cfg.block_tags / 4
                && let Some(o) = block_observation(&self.cfg, chunk, &linear)
            {
                self.track.push(o);
            }
        }
        if self.track.fit.is_none() || self.track.obs.len() < 3 {
            return Err(ClockError::LockLost { time_ps: now, reason: "acquisition gave too few observations".into() });
        }
        self.locked = true;
        self.track.final_pulse = Some(-BACK_PULSES);
        self.finalise(out);
        Ok(())
    }

    /// Closes the current block: one observation of the tracking loop (type docs, step 2).
    fn block(&mut self, out: &mut VecDeque<Segment>, now: u64) -> Result<(), ClockError> {
        let fit = self.track.fit.expect("locked implies a fit");
        let Some(&first) = self.buf.first() else { return Ok(()) };
        // The fit, linearised over the block (its curvature moves a block by far below 1 ps).
        let (k0, f0) = fit.coordinate_at(first);
        let period = fit.period_at(k0);
        let local = |t: u64| {
            let u = f0 + (t as i64 - first as i64) as f64 / period;
            let fl = u.floor();
            (k0 + fl as i64, u - fl)
        };
        let obs = block_observation(&self.cfg, &self.buf, &local);
        self.buf.clear();
        match obs {
            Some(o) => {
                self.bad_blocks = 0;
                self.track.push(o);
                self.finalise(out);
                Ok(())
            }
            None => {
                self.bad_blocks += 1;
                if self.bad_blocks >= self.cfg.max_bad_blocks {
                    return Err(ClockError::LockLost {
                        time_ps: now,
                        reason: format!("{} blocks in a row with too few clicks near a time bin", self.bad_blocks),
                    });
                }
                Ok(())
            }
        }
    }

    fn finalise(&mut self, out: &mut VecDeque<Segment>) {
        let obs = &self.track.obs;
        if obs.len() > self.cfg.lookahead {
            let to = obs[obs.len() - 1 - self.cfg.lookahead].pulse;
            self.track.finalise_to(to, out);
        }
    }
}

/// Acquisition (see [`DataTracker`]): the period and the phase of the early bin of
/// (t - times[0]) / period, or `None` if the clicks show no usable structure.
fn acquire_linear(cfg: &DataConfig, times: &[u64]) -> Option<(f64, f64)> {
    let p_nom = cfg.nominal_period_ps;
    // Coarse period from chains of consecutive clicks. A pair counts only if its residual is
    // what two signal clicks can give (a bin difference, tolerance and the largest offset):
    // a dark count breaks the chain instead of ending it at an arbitrary phase.
    let max_n = cfg.max_pair_pulses() as f64;
    let bins_ps = cfg.bin_separation_ps + 2.0 * cfg.tolerance_ps;
    let (mut sum_dt, mut sum_n) = (0.0, 0.0);
    for w in times.windows(2) {
        let dt = w[1].saturating_sub(w[0]) as f64;
        let n = (dt / p_nom).round();
        let allowed = bins_ps + n * cfg.max_offset_ppm * 1e-6 * p_nom;
        if n >= 1.0 && n <= max_n && (dt - n * p_nom).abs() <= allowed {
            sum_dt += dt;
            sum_n += n;
        }
    }
    if sum_n < 1.0 {
        return None;
    }
    let mut period = sum_dt / sum_n;
    let t0 = times[0];
    let tol = cfg.tolerance_ps / p_nom;
    // The strongest bin's phase over a first short stretch (the coarse period's error has not
    // accumulated yet), then least-squares lines through that bin's clicks over stretches that
    // double, each predicted by the previous line.
    let first = &times[..(times.len() / 64).max(16)];
    let mut phase = strongest_phase(first, t0, period, tol)?;
    for frac in [64usize, 32, 16, 8, 4, 2, 1] {
        let span = &times[..(times.len() / frac).max(16)];
        let (mut n, mut sx, mut sy, mut sxx, mut sxy) = (0.0, 0.0, 0.0, 0.0, 0.0);
        for &t in span {
            let u = (t - t0) as f64 / period - phase;
            let k = u.round();
            let d = u - k;
            if d.abs() < tol {
                n += 1.0;
                sx += k;
                sy += d;
                sxx += k * k;
                sxy += k * d;
            }
        }
        let det = n * sxx - sx * sx;
        if n < 8.0 || det <= 0.0 {
            return None;
        }
        // d = alpha + beta k: phase and period corrections.
        let beta = (n * sxy - sx * sy) / det;
        let alpha = (sy - beta * sx) / n;
        phase += alpha;
        period *= 1.0 + beta;
    }
    // Early or late: the other bin is tau later (this is early) or tau earlier (late).
    let tau = cfg.bin_separation_ps / period;
    let count_at = |centre: f64| {
        times
            .iter()
            .filter(|&&t| {
                let d = ((t - t0) as f64 / period - centre).rem_euclid(1.0);
                d < tol || d > 1.0 - tol
            })
            .count()
    };
    let phase = phase.rem_euclid(1.0);
    let early = if count_at(phase + tau) >= count_at(phase - tau) { phase } else { phase - tau };
    Some((period, early.rem_euclid(1.0)))
}

/// The phase (in periods, [0, 1)) whose +-`tol` window holds the most clicks of
/// (t - t0) / period, or `None` if no window stands out.
fn strongest_phase(times: &[u64], t0: u64, period: f64, tol: f64) -> Option<f64> {
    const BINS: usize = 512;
    let mut h = [0u32; BINS];
    for &t in times {
        let ph = ((t - t0) as f64 / period).rem_euclid(1.0);
        h[((ph * BINS as f64) as usize).min(BINS - 1)] += 1;
    }
    let half = ((tol * BINS as f64).ceil() as usize).max(1);
    let window = |c: usize| (0..=2 * half).map(|i| h[(c + BINS + i - half) % BINS]).sum::<u32>();
    let (best, count) = (0..BINS).map(|c| (c, window(c))).max_by_key(|&(_, n)| n)?;
    let expected = times.len() as f64 * (2 * half + 1) as f64 / BINS as f64;
    if f64::from(count) < 3.0 * expected || count < 8 {
        return None;
    }
    // Centroid of the window.
    let (mut s, mut w) = (0.0, 0.0);
    for i in 0..=2 * half {
        let n = f64::from(h[(best + BINS + i - half) % BINS]);
        s += n * (i as f64 - half as f64);
        w += n;
    }
    Some(((best as f64 + s / w + 0.5) / BINS as f64).rem_euclid(1.0))
}

/// One observation of the tracking loop from a block of Z click times, given the predicted
/// coordinate of each: the coordinate of the block's median click corrected by the mean phase
/// error of the clicks near an expected bin. `None` if too few are near one.
fn block_observation(cfg: &DataConfig, times: &[u64], predict: &impl Fn(u64) -> (i64, f64)) -> Option<Observation> {
    let period = cfg.nominal_period_ps;
    let (tau, tol) = (cfg.bin_separation_ps / period, cfg.tolerance_ps / period);
    let (mut sum, mut n) = (0.0, 0usize);
    for &t in times {
        let (_, f) = predict(t);
        for centre in [DATA_EARLY_PHASE, DATA_EARLY_PHASE + tau] {
            let d = f - centre;
            if d.abs() < tol {
                sum += d;
                n += 1;
            }
        }
    }
    if n == 0 || (n as f64) < cfg.min_accept_fraction * times.len() as f64 {
        return None;
    }
    let t_mid = times[times.len() / 2];
    let (k, f) = predict(t_mid);
    let u = f - sum / n as f64;
    let fl = u.floor();
    Some(Observation { pulse: k + fl as i64, frac: u - fl, time_ps: t_mid })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::{SplitMix64, TaggerClock};

    fn clock(offset_ppm: f64, drift: f64) -> TaggerClock {
        TaggerClock { period_ps: PERIOD_76MHZ_PS, start_ps: 7_000_000.0, offset_ppm, drift_ppm_per_s: drift }
    }

    /// The coordinate the segments give for time t, as a float (pulse + fraction).
    fn seg_coordinate(segs: &VecDeque<Segment>, t: u64) -> Option<f64> {
        let i = segs.partition_point(|s| s.start_ps <= t);
        let s = segs.get(i.checked_sub(1)?)?;
        let (k, f) = s.coordinate(t);
        Some(k as f64 + f as f64 / TWO64)
    }

    #[test]
    fn quadratic_fit_is_exact_on_quadratic_data() {
        let c = clock(87.0, 1.0);
        let obs: Vec<Observation> = (0..6)
            .map(|m| {
                let k = 5 + m * 1_000_000;
                Observation { pulse: k as i64, frac: 0.0, time_ps: c.time_ps(k, 0.0).round() as u64 }
            })
            .collect();
        let fit = ClockFit::from_observations(&obs, true).unwrap();
        assert!(fit.rms_ps() < 0.5, "rms {}", fit.rms_ps());
        assert_eq!(fit.points(), 6);
        for k in [5u64, 2_500_000, 5_000_005, 6_000_000] {
            let dt = fit.time_at(k as i64) - c.time_ps(k, 0.0);
            assert!(dt.abs() < 0.6, "pulse {k}: {dt}");
            let dp = fit.period_at(k as i64) - c.period_at(k);
            assert!(dp.abs() < 1e-6, "pulse {k}: {dp}");
            let t = c.time_ps(k, 3000.0).round() as u64;
            let (p, f) = fit.coordinate_at(t);
            let want = k as f64 + 3000.0 / PERIOD_76MHZ_PS;
            let err = ((p as f64 + f) - want) * PERIOD_76MHZ_PS;
            assert!(err.abs() < 1.0, "pulse {k}: {err} ps");
        }
        // Two points give a line; one point, nothing.
        let line = ClockFit::from_observations(&obs[..2], true).unwrap();
        assert!((line.period_at(0) - (obs[1].time_ps - obs[0].time_ps) as f64 / 1e6).abs() < 1e-9);
        assert!(ClockFit::from_observations(&obs[..1], true).is_none());
    }

    #[test]
    fn segments_follow_the_fit() {
        let c = clock(-100.0, 1.0);
        let obs: Vec<Observation> = (0..4)
            .map(|m| {
                let k = m * (1u64 << 22);
                Observation { pulse: k as i64, frac: 0.0, time_ps: c.time_ps(k, 0.0).round() as u64 }
            })
            .collect();
        let fit = ClockFit::from_observations(&obs, true).unwrap();
        let mut segs = VecDeque::new();
        fit.push_segments(0, 3 << 22, 1 << 14, &mut segs);
        assert_eq!(segs.len(), 3 << 8);
        assert!(segs.iter().zip(segs.iter().skip(1)).all(|(a, b)| a.start_ps < b.start_ps));
        let mut rng = SplitMix64::new(4);
        for _ in 0..2000 {
            let k = rng.next_u64() % (3 << 22);
            let t = (c.time_ps(k, 0.0) + rng.uniform() * PERIOD_76MHZ_PS).round() as u64;
            let got = seg_coordinate(&segs, t).unwrap();
            let (p, f) = fit.coordinate_at(t);
            assert!((got - (p as f64 + f)).abs() * PERIOD_76MHZ_PS < 0.05, "pulse {k}");
        }
        assert!((segs[0].period_ps() - c.period_at(0)).abs() < 1e-3);
    }

    /// Feeds sync tags of a clock with `offset_ppm` and 1 ppm/s to a tracker; returns the
    /// tracker and its segments.
    fn run_sync(
        offset_ppm: f64,
        sync_every: u64,
        syncs: u64,
        skip: &[u64],
        seed: u64,
    ) -> (SyncTracker, VecDeque<Segment>, TaggerClock, Vec<SyncVerdict>) {
        let c = clock(offset_ppm, 1.0);
        let cfg = SyncConfig { sync_every, ..SyncConfig::default() };
        let mut tr = SyncTracker::new(cfg).unwrap();
        let mut segs = VecDeque::new();
        let mut rng = SplitMix64::new(seed);
        let mut verdicts = Vec::new();
        for m in 0..syncs {
            if skip.contains(&m) {
                continue;
            }
            let t = (c.time_ps(m * sync_every, 0.0) + 20.0 * rng.normal()).round() as u64;
            verdicts.push(tr.observe(t, &mut segs).unwrap());
        }
        (tr, segs, c, verdicts)
    }

    #[test]
    fn sync_tracker_locks_and_follows_offset_and_drift() {
        for (seed, offset) in [(1, 100.0), (2, -100.0), (3, 0.0), (4, 180.0)] {
            let (tr, segs, c, verdicts) = run_sync(offset, 1 << 22, 12, &[], seed);
            assert!(verdicts.iter().all(|v| matches!(v, SyncVerdict::Accepted(_))), "seed {seed}");
            assert!(tr.locked());
            let est = tr.estimate().unwrap();
            let true_ppm = (c.period_at(11 << 22) / PERIOD_76MHZ_PS - 1.0) * 1e6;
            assert!((est.offset_ppm - true_ppm).abs() < 0.01, "seed {seed}: {} vs {true_ppm}", est.offset_ppm);
            assert!((est.drift_ppm_per_s - 1.0).abs() < 0.05, "seed {seed}: drift {}", est.drift_ppm_per_s);
            // Final up to the third-to-last sync (lookahead 2).
            assert_eq!(tr.final_pulse(), Some(9 << 22));
            let mut rng = SplitMix64::new(seed + 100);
            let mut worst: f64 = 0.0;
            for _ in 0..5000 {
                let k = rng.next_u64() % (9 << 22);
                let delay = rng.uniform() * PERIOD_76MHZ_PS;
                let t = c.time_ps(k, delay).round() as u64;
                let got = seg_coordinate(&segs, t).unwrap();
                let want = k as f64 + delay / PERIOD_76MHZ_PS;
                worst = worst.max((got - want).abs() * PERIOD_76MHZ_PS);
            }
            // 20 ps sync jitter, interpolated: a few tens of ps at worst.
            assert!(worst < 40.0, "seed {seed}, offset {offset}: worst error {worst} ps");
        }
    }

    #[test]
    fn sync_tracker_locks_after_three_syncs_and_bridges_lost_syncs() {
        let (tr, _, _, _) = run_sync(100.0, 1 << 22, 2, &[], 5);
        assert!(!tr.locked());
        assert!(tr.final_time().is_none());
        let (tr, segs, _, _) = run_sync(100.0, 1 << 22, 3, &[], 5);
        assert!(tr.locked());
        // Lookahead 2: final up to the first sync (from BACK_PULSES before it).
        assert_eq!(tr.final_pulse(), Some(0));
        assert_eq!(segs.len(), 1);
        let (tr, segs, _, _) = run_sync(100.0, 1 << 22, 4, &[], 5);
        assert_eq!(tr.final_pulse(), Some(1 << 22));
        assert_eq!(segs.len(), 257);
        // Syncs 3 and 4 lost: the count continues.
        let (tr, _, _, verdicts) = run_sync(-100.0, 1 << 22, 10, &[3, 4], 6);
        assert_eq!(verdicts[3], SyncVerdict::Accepted(5 << 22));
        assert_eq!(tr.counts(), (8, 0, 0));
        // Frequent syncs work the same.
        let (tr, _, _, verdicts) = run_sync(-100.0, 1 << 16, 300, &[100, 101, 102], 7);
        assert!(tr.locked());
        assert_eq!(*verdicts.last().unwrap(), SyncVerdict::Accepted(299 << 16));
    }

    #[test]
    fn spurious_syncs_are_rejected_and_a_spurious_first_sync_restarts_acquisition() {
        let c = clock(50.0, 1.0);
        let n = 1u64 << 20;
        let mut tr = SyncTracker::new(SyncConfig { sync_every: n, ..SyncConfig::default() }).unwrap();
        let mut segs = VecDeque::new();
        let t = |m: u64| c.time_ps(m * n, 0.0).round() as u64;
        // A spurious tag a third of a sync period before the genuine ones: they do not fit it.
        let spurious = t(1) - (n as f64 * PERIOD_76MHZ_PS / 3.0) as u64;
        assert_eq!(tr.observe(spurious, &mut segs).unwrap(), SyncVerdict::Accepted(0));
        let mut verdicts = Vec::new();
        for m in 1..10 {
            verdicts.push(tr.observe(t(m), &mut segs).unwrap());
        }
        let mut expected = vec![SyncVerdict::Rejected; 4];
        expected.push(SyncVerdict::Restarted);
        assert_eq!(verdicts[..5], expected[..]);
        assert_eq!(verdicts[5], SyncVerdict::Accepted(n as i64));
        assert_eq!(tr.counts().2, 1);
        assert!(tr.locked());
        // Once locked, an isolated spurious sync is rejected and the next genuine one accepted.
        let between = t(9) + 1_000_000;
        assert_eq!(tr.observe(between, &mut segs).unwrap(), SyncVerdict::Rejected);
        assert_eq!(tr.observe(t(10), &mut segs).unwrap(), SyncVerdict::Accepted(5 * n as i64));
        // Too many in a row lose the lock.
        let mut err = None;
        for i in 0..6 {
            if let Err(e) = tr.observe(t(10) + 1_000_000 * (i + 1), &mut segs) {
                err = Some(e);
                break;
            }
        }
        assert!(matches!(err, Some(ClockError::LockLost { .. })), "{err:?}");
    }

    #[test]
    fn sync_config_is_checked() {
        assert!(SyncConfig::default().validate().is_ok());
        for bad in [
            SyncConfig { sync_every: 0, ..SyncConfig::default() },
            SyncConfig { nominal_period_ps: 0.5, ..SyncConfig::default() },
            SyncConfig { lock_syncs: 1, ..SyncConfig::default() },
            SyncConfig { lookahead: 7, ..SyncConfig::default() },
            SyncConfig { sync_every: 1, max_residual_ps: 6000.0, ..SyncConfig::default() },
            SyncConfig { max_residual_ps: f64::NAN, ..SyncConfig::default() },
        ] {
            assert!(matches!(SyncTracker::new(bad), Err(ClockError::Config(_))));
        }
    }

    /// Z clicks of a clock: early/late bins tau apart, jitter, dark counts.
    fn z_clicks(c: &TaggerClock, pulses: u64, p: f64, tau: f64, jitter: f64, p_dark: f64, seed: u64) -> Vec<u64> {
        let mut rng = SplitMix64::new(seed);
        let mut out = Vec::new();
        let mut k = rng.geometric(p);
        while k < pulses {
            let late = rng.coin();
            let d = 2000.0 + if late { tau } else { 0.0 } + jitter * rng.normal();
            out.push(c.time_ps(k, d).round() as u64);
            k += 1 + rng.geometric(p);
        }
        let mut k = rng.geometric(p_dark);
        while k < pulses {
            out.push(c.time_ps(k, rng.uniform() * PERIOD_76MHZ_PS).round() as u64);
            k += 1 + rng.geometric(p_dark);
        }
        out.sort_unstable();
        out
    }

    #[test]
    fn data_tracker_recovers_the_clock_without_sync() {
        let tau = 800.0;
        for (seed, offset) in [(11, 100.0), (12, -100.0), (13, 30.0)] {
            let c = clock(offset, 1.0);
            let pulses = 40_000_000;
            let clicks = z_clicks(&c, pulses, 0.02, tau, 25.0, 1e-4, seed);
            let mut tr = DataTracker::new(DataConfig { bin_separation_ps: tau, ..DataConfig::default() }).unwrap();
            let mut segs = VecDeque::new();
            for &t in &clicks {
                tr.observe(t, &mut segs).unwrap();
            }
            tr.finish(*clicks.last().unwrap(), &mut segs).unwrap();
            assert!(tr.locked(), "seed {seed}");
            let est = tr.estimate().unwrap();
            let true_ppm = (c.period_at(pulses) / PERIOD_76MHZ_PS - 1.0) * 1e6;
            assert!((est.offset_ppm - true_ppm).abs() < 0.05, "seed {seed}: {} vs {true_ppm}", est.offset_ppm);
            // The coordinate's pulse origin is arbitrary: learn it from one early click, then
            // every pulse's early bin must sit at DATA_EARLY_PHASE.
            let mut rng = SplitMix64::new(seed + 50);
            let probe = |k: u64| seg_coordinate(&segs, c.time_ps(k, 2000.0).round() as u64).unwrap();
            let k0 = 100_000u64;
            let origin = (probe(k0) - DATA_EARLY_PHASE).round() - k0 as f64;
            let mut worst: f64 = 0.0;
            for _ in 0..3000 {
                let k = k0 + rng.next_u64() % (pulses - k0 - 1000);
                let want = origin + k as f64 + DATA_EARLY_PHASE;
                worst = worst.max((probe(k) - want).abs() * PERIOD_76MHZ_PS);
            }
            assert!(worst < 40.0, "seed {seed}, offset {offset}: worst {worst} ps");
        }
    }

    #[test]
    fn data_tracker_coasts_over_short_gaps_and_loses_lock_over_long_ones() {
        let c = clock(-60.0, 1.0);
        let clicks = z_clicks(&c, 20_000_000, 0.02, 800.0, 25.0, 0.0, 21);
        let mut tr = DataTracker::new(DataConfig::default()).unwrap();
        let mut segs = VecDeque::new();
        let (g0, g1) = (c.time_ps(10_000_000, 0.0) as u64, c.time_ps(10_500_000, 0.0) as u64);
        let mut gap_sent = false;
        for &t in &clicks {
            if t >= g0 && t <= g1 {
                continue;
            }
            if t > g1 && !gap_sent {
                tr.gap(g0, g1, &mut segs).unwrap();
                gap_sent = true;
            }
            tr.observe(t, &mut segs).unwrap();
        }
        // 6.6 ms gap: coasted; after it the early bins still sit at the same phase and count.
        let k0 = 1_000_000u64;
        let probe = |k: u64| seg_coordinate(&segs, c.time_ps(k, 2000.0).round() as u64).unwrap();
        let origin = (probe(k0) - DATA_EARLY_PHASE).round() - k0 as f64;
        let after = probe(15_000_000) - (origin + 15_000_000.0 + DATA_EARLY_PHASE);
        assert!(after.abs() * PERIOD_76MHZ_PS < 40.0, "after the gap: {} ps", after * PERIOD_76MHZ_PS);
        let long = tr.gap(clicks[clicks.len() - 1] + 1, clicks[clicks.len() - 1] + 30_000_000_000, &mut segs);
        assert!(matches!(long, Err(ClockError::LockLost { .. })));
    }

    #[test]
    fn data_config_is_checked() {
        assert!(DataConfig::default().validate().is_ok());
        for bad in [
            DataConfig { tolerance_ps: 500.0, ..DataConfig::default() },
            DataConfig { bin_separation_ps: 6500.0, ..DataConfig::default() },
            DataConfig { block_tags: 4, ..DataConfig::default() },
            DataConfig { max_offset_ppm: 1e6, ..DataConfig::default() },
            DataConfig { tolerance_ps: f64::NAN, ..DataConfig::default() },
        ] {
            assert!(matches!(DataTracker::new(bad), Err(ClockError::Config(_))));
        }
    }
}
