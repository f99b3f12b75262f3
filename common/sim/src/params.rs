//! Physical parameters of the simulated link, their presets, and the quantities derived from them.
//!
//! Every field is a default that a user can change in a TOML file: most values of the reference
//! experiment (J. Wang et al., Light Sci. Appl. (2026), arXiv:2506.15520) are not published, and
//! each preset file explains where its numbers come from.

use serde::{Deserialize, Serialize};

use super::math::normal_cdf;

/// An invalid parameter set or an unknown preset.
#[derive(Debug, thiserror::Error)]
pub enum ParamsError {
    /// The preset name is not one of [`LinkParams::preset_names`].
    #[error("unknown link preset {name:?}; known presets: {known}")]
    UnknownPreset {
        /// The name that was asked for.
        name: String,
        /// The known names, comma separated.
        known: String,
    },
    /// The TOML text does not parse into [`LinkParams`] (syntax, a missing or an unknown field).
    #[error("invalid link parameters: {0}")]
    Toml(#[from] toml::de::Error),
    /// A field is outside its physical range.
    #[error("link parameter {field} = {value} is out of range: {expected}")]
    OutOfRange {
        /// The field's name as written in TOML.
        field: &'static str,
        /// The offending value.
        value: f64,
        /// The allowed range, in words.
        expected: &'static str,
    },
}

/// Every physical parameter of the simulated link: source, fibre, receiver, drift and feedback.
///
/// Units are in the field names or their docs. Deserialised from TOML with every field required and
/// unknown fields rejected, so a preset file is always the complete description of a link.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkParams {
    /// Pulse repetition rate of the source, in Hz (the paper: 75.947 MHz).
    pub clock_hz: f64,
    /// Mean photon number per pulse leaving Alice's lab (after her encoder and any attenuation),
    /// dimensionless.
    pub mu: f64,
    /// Second-order autocorrelation g2(0) of the source, dimensionless (the paper: 0.85 %).
    pub g2: f64,
    /// Probability that Alice sends a Z-basis state (|E> or |L>, each with half of it); she sends
    /// |+> otherwise and never |->.
    pub p_z: f64,
    /// Length of the fibre between Alice and Bob, in km.
    pub distance_km: f64,
    /// Attenuation of the fibre, in dB/km (the paper: 0.1956 dB/km).
    pub fibre_loss_db_per_km: f64,
    /// Loss inside Bob's receiver before the detectors (connectors, basis splitter excess loss,
    /// interferometer insertion loss), in dB. Applied to both bases.
    pub bob_loss_db: f64,
    /// Probability that Bob's passive beam splitter sends a photon to the Z (arrival-time) branch;
    /// it goes to the X (interferometer) branch otherwise.
    pub q_z: f64,
    /// Detection efficiency of each single-photon detector, dimensionless (the paper: 74 %).
    pub detector_efficiency: f64,
    /// Dark-count rate of each detector, in counts per second (the paper: about 100 /s).
    pub dark_count_rate_hz: f64,
    /// Width of each detection window (gate), in ns. A dark count falls in a window with
    /// probability `dark_count_rate_hz * window_ns * 1e-9`.
    pub window_ns: f64,
    /// Separation between the early and the late time bin, and the delay of Bob's unbalanced
    /// interferometer, in ps.
    pub bin_separation_ps: f64,
    /// Radiative lifetime T1 of the quantum-dot transition, in ps (the paper: 1018 ps): the photon's
    /// emission time after the excitation pulse is exponential with this mean.
    pub t1_ps: f64,
    /// Timing jitter of detector and electronics, as the standard deviation of a Gaussian, in ps
    /// (the full width at half maximum is 2.355 times this).
    pub jitter_ps: f64,
    /// Visibility V of the interference in Bob's X branch, dimensionless: |+> goes to D+ with
    /// probability (1 + V cos(dphi)) / 2 for a phase error dphi. It absorbs every imperfection of
    /// the X measurement (encoder, interferometer, indistinguishability, overlapping time bins).
    pub visibility: f64,
    /// Dead time of each detector after a click, in ns (non-paralysable: clicks during it are lost).
    pub dead_time_ns: f64,
    /// Probability that a click is followed by an after-pulse, a spurious click of the same
    /// detector in its first window after the dead time.
    pub afterpulse_probability: f64,
    /// Efficiency of the X detectors in the interferometer's side slots relative to the central
    /// slot, dimensionless (default 1: no mismatch). Below 1 models a detection-efficiency
    /// mismatch in time (a detector gated or recovering unevenly, or light an eavesdropper shifts
    /// in time); Bob's side-slot monitor sees it.
    #[serde(default = "default_x_side_slot_efficiency")]
    pub x_side_slot_efficiency: f64,
    /// Strength of the random walk of the interferometer phase, in rad/sqrt(s): after t seconds
    /// without correction the walk has standard deviation `phase_drift_rad_per_sqrt_s * sqrt(t)`.
    pub phase_drift_rad_per_sqrt_s: f64,
    /// Amplitude of the slow, temperature-like sinusoidal phase drift, in rad.
    pub slow_drift_amplitude_rad: f64,
    /// Period of the slow sinusoidal phase drift, in s.
    pub slow_drift_period_s: f64,
    /// Whether Bob's phase-stabilisation loop runs (see `Receiver::feedback`).
    pub feedback_enabled: bool,
    /// Half amplitude of the dither the loop adds to Bob's phase shifter, in rad.
    pub feedback_dither_rad: f64,
    /// Number of test events (|+> sent, X measured) the loop collects at each dither setting before
    /// it switches; one correction step uses two such half-cycles.
    pub feedback_events_per_half_cycle: u64,
    /// Proportional gain of the loop, dimensionless: the fraction of the measured phase error
    /// corrected at each step.
    pub feedback_proportional_gain: f64,
    /// Integral gain of the loop, dimensionless: the fraction of the measured phase error added to
    /// the loop's drift-rate estimate at each step (lets it follow a steady ramp without lag).
    pub feedback_integral_gain: f64,
}

/// The preset names and their embedded TOML text.
const PRESETS: &[(&str, &str)] = &[
    ("wang2026-120km", include_str!("../../../presets/wang2026-120km.toml")),
    ("lab-10km", include_str!("../../../presets/lab-10km.toml")),
];

/// The preset names, in the order of [`PRESETS`].
const PRESET_NAMES: &[&str] = &["wang2026-120km", "lab-10km"];

/// Probabilities that a photon emitted in one time bin is registered in a Z window.
///
/// The windows open at the nominal emission time of their bin and are `window_ns` wide; the
/// photon's arrival time after its bin's excitation is Exp(T1) + N(0, jitter^2). With F the
/// distribution function of that sum (an exponentially modified Gaussian), a photon of bin E lands
/// in window E with probability `F(w) - F(0)` and in window L with `F(tau + w) - F(tau)`; a photon
/// of bin L lands in window L with `F(w) - F(0)` and in window E with `F(w - tau) - F(-tau)`
/// (module docs, eq. T1). Tails into the next clock period are neglected (the period is 13 T1).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TimingModel {
    /// Probability that a photon of bin E arrives in window E (also the probability that a photon
    /// of bin L arrives in window L, and that a photon of Bob's central X slot arrives in it).
    pub p_own: f64,
    /// Probability that a photon of bin E arrives in window L (the T1 tail).
    pub p_e_to_l: f64,
    /// Probability that a photon of bin L arrives in window E (jitter only).
    pub p_l_to_e: f64,
}

impl TimingModel {
    /// Intrinsic Z error e_Z0: the fraction of Z-window arrivals that are in the wrong window, for
    /// |E> and |L> sent equally often, `(p_e_to_l + p_l_to_e) / (2 p_own + p_e_to_l + p_l_to_e)`
    /// (module docs, eq. T2).
    pub fn intrinsic_z_error(&self) -> f64 {
        let wrong = self.p_e_to_l + self.p_l_to_e;
        wrong / (2.0 * self.p_own + wrong)
    }
}

fn default_x_side_slot_efficiency() -> f64 {
    1.0
}

/// Calibrated upper bounds on the source, as a preset file's `[security]` table gives them for
/// its hardware: what a calibration with confidence intervals would state (the key length uses
/// these, never the model's `mu` and `g2`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceBounds {
    /// Upper bound on the mean photon number per pulse leaving Alice's lab (dimensionless).
    pub mu_max: f64,
    /// Upper bound on g2(0) (dimensionless).
    pub g2_max: f64,
}

impl LinkParams {
    /// The named preset, parsed from the TOML file embedded at build time.
    pub fn preset(name: &str) -> Result<Self, ParamsError> {
        let text = PRESETS
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, t)| *t)
            .ok_or_else(|| ParamsError::UnknownPreset { name: name.to_owned(), known: PRESET_NAMES.join(", ") })?;
        Self::from_toml_str(text)
    }

    /// The names [`LinkParams::preset`] accepts.
    pub fn preset_names() -> &'static [&'static str] {
        PRESET_NAMES
    }

    /// Parses a complete parameter set from TOML and validates it (a `[security]` table, the
    /// source calibration a preset may ship, is ignored here: see [`LinkParams::with_bounds_from_toml_str`]).
    pub fn from_toml_str(s: &str) -> Result<Self, ParamsError> {
        Self::with_bounds_from_toml_str(s).map(|(params, _)| params)
    }

    /// Parses a preset file: the link model and, when the file has a `[security]` table, the
    /// calibrated source bounds that go with that hardware. The bounds are not part of the model:
    /// the simulator never reads them, and the key length reads only them.
    pub fn with_bounds_from_toml_str(s: &str) -> Result<(Self, Option<SourceBounds>), ParamsError> {
        let mut table: toml::Table = toml::from_str(s)?;
        let bounds = match table.remove("security") {
            Some(value) => Some(value.try_into::<SourceBounds>()?),
            None => None,
        };
        let params: Self = table.try_into()?;
        params.validate()?;
        Ok((params, bounds))
    }

    /// The named preset with its source calibration (see [`LinkParams::with_bounds_from_toml_str`]).
    pub fn preset_with_bounds(name: &str) -> Result<(Self, Option<SourceBounds>), ParamsError> {
        let text = PRESETS
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, t)| *t)
            .ok_or_else(|| ParamsError::UnknownPreset { name: name.to_owned(), known: PRESET_NAMES.join(", ") })?;
        Self::with_bounds_from_toml_str(text)
    }

    /// Serialises the parameters to TOML (without the explanatory comments of a preset file).
    pub fn to_toml_string(&self) -> String {
        toml::to_string(self).expect("link parameters always serialise")
    }

    /// Checks that every field is finite and in its physical range; the error names the field.
    pub fn validate(&self) -> Result<(), ParamsError> {
        fn check(field: &'static str, value: f64, ok: bool, expected: &'static str) -> Result<(), ParamsError> {
            if value.is_finite() && ok { Ok(()) } else { Err(ParamsError::OutOfRange { field, value, expected }) }
        }
        let unit = |v: f64| (0.0..=1.0).contains(&v);
        check("clock_hz", self.clock_hz, self.clock_hz > 0.0, "> 0")?;
        check("mu", self.mu, unit(self.mu), "in [0, 1]")?;
        check("g2", self.g2, unit(self.g2), "in [0, 1]")?;
        check("p_z", self.p_z, unit(self.p_z), "in [0, 1]")?;
        check("distance_km", self.distance_km, self.distance_km >= 0.0, ">= 0")?;
        check("fibre_loss_db_per_km", self.fibre_loss_db_per_km, self.fibre_loss_db_per_km >= 0.0, ">= 0")?;
        check("bob_loss_db", self.bob_loss_db, self.bob_loss_db >= 0.0, ">= 0")?;
        check("q_z", self.q_z, unit(self.q_z), "in [0, 1]")?;
        check("detector_efficiency", self.detector_efficiency, unit(self.detector_efficiency), "in [0, 1]")?;
        check("dark_count_rate_hz", self.dark_count_rate_hz, self.dark_count_rate_hz >= 0.0, ">= 0")?;
        check("t1_ps", self.t1_ps, self.t1_ps > 0.0, "> 0")?;
        check("jitter_ps", self.jitter_ps, self.jitter_ps >= 0.0, ">= 0")?;
        check(
            "bin_separation_ps",
            self.bin_separation_ps,
            self.bin_separation_ps > 0.0
                && 2.0 * self.bin_separation_ps + 1e3 * self.window_ns <= 1e12 * self.pulse_period_s(),
            "> 0, with the three X slots (2 separations + one window) fitting in the clock period",
        )?;
        check(
            "window_ns",
            self.window_ns,
            self.window_ns > 0.0 && 1e3 * self.window_ns <= self.bin_separation_ps,
            "> 0 and at most bin_separation_ps (the early and late windows must not overlap)",
        )?;
        check(
            "window_ns",
            self.dark_probability(),
            self.dark_probability() <= 1.0,
            "dark_count_rate_hz * window_ns * 1e-9 <= 1",
        )?;
        check("visibility", self.visibility, unit(self.visibility), "in [0, 1]")?;
        check("dead_time_ns", self.dead_time_ns, self.dead_time_ns >= 0.0, ">= 0")?;
        check("x_side_slot_efficiency", self.x_side_slot_efficiency, unit(self.x_side_slot_efficiency), "in [0, 1]")?;
        check(
            "afterpulse_probability",
            self.afterpulse_probability,
            (0.0..0.5).contains(&self.afterpulse_probability),
            "in [0, 0.5)",
        )?;
        check(
            "phase_drift_rad_per_sqrt_s",
            self.phase_drift_rad_per_sqrt_s,
            self.phase_drift_rad_per_sqrt_s >= 0.0,
            ">= 0",
        )?;
        check("slow_drift_amplitude_rad", self.slow_drift_amplitude_rad, self.slow_drift_amplitude_rad >= 0.0, ">= 0")?;
        check("slow_drift_period_s", self.slow_drift_period_s, self.slow_drift_period_s > 0.0, "> 0")?;
        check(
            "feedback_dither_rad",
            self.feedback_dither_rad,
            self.feedback_dither_rad > 0.0 && self.feedback_dither_rad <= std::f64::consts::FRAC_PI_2,
            "in (0, pi/2]",
        )?;
        check(
            "feedback_events_per_half_cycle",
            self.feedback_events_per_half_cycle as f64,
            self.feedback_events_per_half_cycle >= 1,
            ">= 1",
        )?;
        check(
            "feedback_proportional_gain",
            self.feedback_proportional_gain,
            (0.0..=1.0).contains(&self.feedback_proportional_gain),
            "in [0, 1]",
        )?;
        check(
            "feedback_integral_gain",
            self.feedback_integral_gain,
            (0.0..=1.0).contains(&self.feedback_integral_gain),
            "in [0, 1]",
        )?;
        Ok(())
    }

    /// Fibre transmission T(L) = 10^(-alpha L / 10) (the model of the reference experiment, Wang et al. 2026); at
    /// 120 km and 0.1956 dB/km this is 23.472 dB, T = 4.496e-3.
    pub fn fibre_transmission(&self) -> f64 {
        10f64.powf(-self.fibre_loss_db() / 10.0)
    }

    /// Total fibre loss alpha L, in dB.
    pub fn fibre_loss_db(&self) -> f64 {
        self.fibre_loss_db_per_km * self.distance_km
    }

    /// Transmission of Bob's receiver before the detectors, eta_B = 10^(-bob_loss_db / 10).
    pub fn bob_transmission(&self) -> f64 {
        10f64.powf(-self.bob_loss_db / 10.0)
    }

    /// Time between two pulses, in s.
    pub fn pulse_period_s(&self) -> f64 {
        1.0 / self.clock_hz
    }

    /// Probability p_dc = d w of a dark count in one window of one detector
    /// (the model of the reference experiment, Wang et al. 2026).
    pub fn dark_probability(&self) -> f64 {
        self.dark_count_rate_hz * self.window_ns * 1e-9
    }

    /// Probability that a pulse holds exactly two photons, p_2 = mu^2 g2 / 2, the bound on
    /// multi-photon pulses of the reference experiment (Wang et al. 2026) taken as the
    /// model's value.
    pub fn p_two_photons(&self) -> f64 {
        self.mu * self.mu * self.g2 / 2.0
    }

    /// Probability that a pulse holds exactly one photon, p_1 = mu - 2 p_2, so that the mean photon
    /// number is exactly `mu` (no pulse holds more than two photons in this model).
    pub fn p_one_photon(&self) -> f64 {
        (self.mu - 2.0 * self.p_two_photons()).max(0.0)
    }

    /// Dead time expressed in clock periods (a real number).
    pub fn dead_time_periods(&self) -> f64 {
        self.dead_time_ns * 1e-9 * self.clock_hz
    }

    /// Arrival-time model of the Z windows (see [`TimingModel`]).
    pub fn timing(&self) -> TimingModel {
        let (t1, sigma) = (self.t1_ps, self.jitter_ps);
        let (tau, w) = (self.bin_separation_ps, 1e3 * self.window_ns);
        let f = |t: f64| arrival_cdf(t, t1, sigma);
        TimingModel { p_own: f(w) - f(0.0), p_e_to_l: f(tau + w) - f(tau), p_l_to_e: f(w - tau) - f(-tau) }
    }

    /// What Bob's side-slot monitor expects from this receiver (its calibration: the timing
    /// model and the dark counts; `x_side_slot_efficiency` is a fault the calibration does not
    /// know, so it is left out), with a 5 % tolerance for dead time, squashing and after-pulses.
    pub fn side_slot_calibration(&self) -> qkd_core::postproc::finite_key::SideSlotCalibration {
        let tm = self.timing();
        let (c_min, c_max) = (tm.p_e_to_l.min(tm.p_l_to_e), tm.p_e_to_l.max(tm.p_l_to_e));
        qkd_core::postproc::finite_key::SideSlotCalibration {
            ratio_low: tm.p_own / (tm.p_own + c_max),
            ratio_high: tm.p_own / (tm.p_own + c_min),
            p_dark: self.dark_probability(),
            tolerance: 0.05,
        }
    }

    /// Intrinsic Z error e_Z0 derived from T1, jitter, window and bin separation
    /// ([`TimingModel::intrinsic_z_error`]).
    pub fn intrinsic_z_error(&self) -> f64 {
        self.timing().intrinsic_z_error()
    }
}

/// Distribution function of an arrival time Exp(mean `t1`) + N(0, `sigma`^2), evaluated at `t`
/// (all in the same unit): the exponentially modified Gaussian,
/// `F(t) = Phi(t/sigma) - exp(sigma^2 / (2 t1^2) - t/t1) Phi(t/sigma - sigma/t1)`
/// (module docs, eq. T1), and `1 - exp(-t/t1)` for `t >= 0` without jitter.
pub(crate) fn arrival_cdf(t: f64, t1: f64, sigma: f64) -> f64 {
    if sigma <= 0.0 {
        return if t <= 0.0 { 0.0 } else { -(-t / t1).exp_m1() };
    }
    let tail = (sigma * sigma / (2.0 * t1 * t1) - t / t1).exp() * normal_cdf(t / sigma - sigma / t1);
    (normal_cdf(t / sigma) - tail).clamp(0.0, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_parse_and_validate() {
        for name in LinkParams::preset_names() {
            let p = LinkParams::preset(name).unwrap_or_else(|e| panic!("{name}: {e}"));
            p.validate().unwrap();
            let round = LinkParams::from_toml_str(&p.to_toml_string()).unwrap();
            assert_eq!(round, p, "{name} round trip");
        }
    }

    #[test]
    fn unknown_preset_lists_names() {
        let e = LinkParams::preset("nope").unwrap_err().to_string();
        assert!(e.contains("wang2026-120km") && e.contains("lab-10km"), "{e}");
    }

    #[test]
    fn fibre_loss_at_120_km_is_23_47_db() {
        let p = LinkParams::preset("wang2026-120km").unwrap();
        assert_eq!(p.distance_km, 120.0);
        let db = -10.0 * p.fibre_transmission().log10();
        assert!((db - 23.472).abs() / 23.472 < 1e-9, "loss {db} dB");
        assert!((p.fibre_transmission() - 4.4957e-3).abs() < 1e-7);
    }

    #[test]
    fn lab_preset_is_same_hardware_at_10_km() {
        let lab = LinkParams::preset("lab-10km").unwrap();
        let mut far = LinkParams::preset("wang2026-120km").unwrap();
        far.distance_km = 10.0;
        assert_eq!(lab, far);
    }

    #[test]
    fn validation_names_the_field() {
        let mut p = LinkParams::preset("wang2026-120km").unwrap();
        p.q_z = 1.5;
        let e = p.validate().unwrap_err().to_string();
        assert!(e.contains("q_z"), "{e}");
        let mut p = LinkParams::preset("wang2026-120km").unwrap();
        p.mu = f64::NAN;
        assert!(p.validate().unwrap_err().to_string().contains("mu"));
        let mut p = LinkParams::preset("wang2026-120km").unwrap();
        p.window_ns = 5.0;
        assert!(p.validate().unwrap_err().to_string().contains("window_ns"));
    }

    #[test]
    fn unknown_toml_field_is_rejected() {
        let p = LinkParams::preset("wang2026-120km").unwrap();
        let text = format!("{}\nbogus = 1.0\n", p.to_toml_string());
        let e = LinkParams::from_toml_str(&text).unwrap_err().to_string();
        assert!(e.contains("bogus"), "{e}");
    }

    #[test]
    fn arrival_cdf_matches_jitter_free_limit() {
        // With tiny jitter the exponentially modified Gaussian approaches 1 - exp(-t/T1).
        for t in [100.0, 1000.0, 3000.0] {
            let a = arrival_cdf(t, 1018.0, 1e-3);
            let b = arrival_cdf(t, 1018.0, 0.0);
            assert!((a - b).abs() < 1e-6, "t={t}: {a} vs {b}");
        }
        assert!(arrival_cdf(-500.0, 1018.0, 30.0) < 1e-12);
        assert!((arrival_cdf(1e6, 1018.0, 30.0) - 1.0).abs() < 1e-9);
    }

    #[test]
    fn intrinsic_error_follows_t1_tail() {
        // Without jitter e_Z0 = x / (2 + x) with x = exp(-tau/T1) (module docs, eq. T2).
        let mut p = LinkParams::preset("wang2026-120km").unwrap();
        p.jitter_ps = 0.0;
        let x = (-p.bin_separation_ps / p.t1_ps).exp();
        assert!((p.intrinsic_z_error() - x / (2.0 + x)).abs() < 1e-12);
    }
}
