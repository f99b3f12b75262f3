//! Device descriptions: the `DeviceDescription` a device answers to `Describe`, validated once
//! ([`DeviceInfo`]), so that the drivers and the daemons can rely on its timing and channel map.
//! Also the conversions between the API's enums and the crate's types (channel roles, locks,
//! monitor readings).

use proto::device as pb;
use qkd_core::postproc::finite_key::SourceReading;
use qkd_timetag::tags::{ChannelMap, Role};

use crate::DeviceError;
use crate::frames::{LockState, Monitors};

pub use pb::{Capabilities, DeviceDescription};

/// Which side of the link a device is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceRole {
    /// Alice's source.
    Transmitter,
    /// Bob's detectors and time tagger.
    Receiver,
}

impl std::fmt::Display for DeviceRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DeviceRole::Transmitter => "transmitter",
            DeviceRole::Receiver => "receiver",
        })
    }
}

/// Largest frame the API accepts, in pulses (as `qkd_timetag`'s pipeline).
pub const MAX_FRAME_PULSES: u64 = 1 << 40;

/// A validated device description.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceInfo {
    desc: DeviceDescription,
    role: DeviceRole,
    period_ps: f64,
    map: Option<ChannelMap>,
}

impl DeviceInfo {
    /// Validates `desc`: a role; a positive pulse rate (and, if given, an exact period that
    /// agrees with it to 1e-9); 1..=2^40 pulses per frame; a sync period that divides the
    /// frame; for a transmitter p_z in [0, 1]; for a receiver a positive bin separation, a
    /// window within it, and a valid channel map (with a sync channel when syncs are announced).
    pub fn new(desc: DeviceDescription) -> Result<Self, DeviceError> {
        fn bad<T>(m: String) -> Result<T, DeviceError> {
            Err(DeviceError::Description(m))
        }
        let role = match pb::DeviceRole::try_from(desc.role) {
            Ok(pb::DeviceRole::Transmitter) => DeviceRole::Transmitter,
            Ok(pb::DeviceRole::Receiver) => DeviceRole::Receiver,
            _ => return bad(format!("role {} is neither transmitter nor receiver", desc.role)),
        };
        let rate = desc.pulse_rate_hz;
        if !(rate.is_finite() && rate > 0.0) {
            return bad(format!("pulse_rate_hz {rate} must be a positive number"));
        }
        let nominal = 1e12 / rate;
        let period_ps = match &desc.pulse_period {
            Some(p) if p.numerator_ps > 0 && p.denominator > 0 => {
                let exact = p.numerator_ps as f64 / p.denominator as f64;
                if (exact - nominal).abs() > 1e-9 * nominal {
                    return bad(format!(
                        "pulse_period {}/{} ps = {exact} ps disagrees with pulse_rate_hz {rate} ({nominal} ps)",
                        p.numerator_ps, p.denominator
                    ));
                }
                exact
            }
            Some(p) => {
                return bad(format!("pulse_period {}/{} must have positive terms", p.numerator_ps, p.denominator));
            }
            None => nominal,
        };
        if !(1..=MAX_FRAME_PULSES).contains(&desc.frame_pulses) {
            return bad(format!("frame_pulses {} must be in 1..=2^40", desc.frame_pulses));
        }
        if desc.sync_every_pulses > 0 && !desc.frame_pulses.is_multiple_of(desc.sync_every_pulses) {
            return bad(format!(
                "sync_every_pulses {} must divide frame_pulses {}",
                desc.sync_every_pulses, desc.frame_pulses
            ));
        }
        let finite_nonneg = |name: &str, v: f64| -> Result<(), DeviceError> {
            if v.is_finite() && v >= 0.0 { Ok(()) } else { bad(format!("{name} {v} must be a finite number >= 0")) }
        };
        finite_nonneg("max_clock_offset_ppm", desc.max_clock_offset_ppm)?;
        finite_nonneg("max_clock_drift_ppm_per_s", desc.max_clock_drift_ppm_per_s)?;
        finite_nonneg("timestamp_resolution_ps", desc.timestamp_resolution_ps)?;
        let map = match role {
            DeviceRole::Transmitter => {
                if !(0.0..=1.0).contains(&desc.p_z) {
                    return bad(format!("p_z {} must be in [0, 1]", desc.p_z));
                }
                None
            }
            DeviceRole::Receiver => {
                let (tau, w) = (desc.bin_separation_ps, desc.window_ps);
                if !(tau.is_finite() && tau > 0.0 && 2.0 * tau < period_ps) {
                    return bad(format!("bin_separation_ps {tau} must be positive and below half the period"));
                }
                if !(w.is_finite() && w > 0.0 && w <= tau) {
                    return bad(format!("window_ps {w} must be positive and at most bin_separation_ps {tau}"));
                }
                let mut entries = Vec::with_capacity(desc.channels.len());
                for c in &desc.channels {
                    let channel = u8::try_from(c.channel)
                        .map_err(|_| DeviceError::Description(format!("channel {} is above 255", c.channel)))?;
                    let role = role_from_proto(c.role).ok_or_else(|| {
                        DeviceError::Description(format!("channel {} has no role ({})", c.channel, c.role))
                    })?;
                    entries.push((role, channel));
                }
                let map = if desc.sync_every_pulses > 0 {
                    ChannelMap::new(&entries)
                } else {
                    ChannelMap::without_sync(&entries)
                };
                Some(map.map_err(|e| DeviceError::Description(format!("channel map: {e}")))?)
            }
        };
        Ok(Self { desc, role, period_ps, map })
    }

    /// The description as the device sent it.
    pub fn description(&self) -> &DeviceDescription {
        &self.desc
    }

    /// Transmitter or receiver.
    pub fn role(&self) -> DeviceRole {
        self.role
    }

    /// Whether the device is an emulator or simulator (keys made from it are simulated).
    pub fn simulated(&self) -> bool {
        self.desc.simulated
    }

    /// The pulse period, ps (exact rational when the device gave one).
    pub fn period_ps(&self) -> f64 {
        self.period_ps
    }

    /// Pulses per frame.
    pub fn frame_pulses(&self) -> u64 {
        self.desc.frame_pulses
    }

    /// Pulses between sync tags (0: no sync).
    pub fn sync_every_pulses(&self) -> u64 {
        self.desc.sync_every_pulses
    }

    /// The receiver's channel map (`None` for a transmitter).
    pub fn channel_map(&self) -> Option<&ChannelMap> {
        self.map.as_ref()
    }

    /// What the device can do.
    pub fn capabilities(&self) -> Capabilities {
        self.desc.capabilities.unwrap_or_default()
    }

    /// A one-line summary for logs.
    pub fn summary(&self) -> String {
        let d = &self.desc;
        format!(
            "{} {} {} (serial {}, driver {}){}: {:.6} MHz, frames of {} pulses",
            self.role,
            d.vendor,
            d.model,
            if d.serial.is_empty() { "-" } else { &d.serial },
            if d.driver.is_empty() { "-" } else { &d.driver },
            if d.simulated { ", SIMULATED" } else { "" },
            d.pulse_rate_hz / 1e6,
            d.frame_pulses
        )
    }
}

/// The exact period of a rate that is a whole number of Hz: 10^12 / rate ps as a reduced
/// fraction; `None` for a fractional rate.
pub fn exact_period(rate_hz: f64) -> Option<pb::PulsePeriod> {
    if !(rate_hz.is_finite() && rate_hz >= 1.0 && rate_hz.fract() == 0.0 && rate_hz < 9e15) {
        return None;
    }
    let (mut num, mut den) = (1_000_000_000_000u64, rate_hz as u64);
    let g = gcd(num, den);
    num /= g;
    den /= g;
    Some(pb::PulsePeriod { numerator_ps: num, denominator: den })
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// The tag role of an API channel role (`None` for unspecified or unknown).
pub fn role_from_proto(role: i32) -> Option<Role> {
    match pb::ChannelRole::try_from(role).ok()? {
        pb::ChannelRole::Z => Some(Role::Z),
        pb::ChannelRole::XPlus => Some(Role::XPlus),
        pb::ChannelRole::XMinus => Some(Role::XMinus),
        pb::ChannelRole::Sync => Some(Role::Sync),
        pb::ChannelRole::Clock => Some(Role::Clock),
        pb::ChannelRole::Unspecified => None,
    }
}

/// The API channel role of a tag role.
pub fn role_to_proto(role: Role) -> pb::ChannelRole {
    match role {
        Role::Z => pb::ChannelRole::Z,
        Role::XPlus => pb::ChannelRole::XPlus,
        Role::XMinus => pb::ChannelRole::XMinus,
        Role::Sync => pb::ChannelRole::Sync,
        Role::Clock => pb::ChannelRole::Clock,
    }
}

/// A lock state from the API.
pub fn lock_from_proto(v: i32) -> LockState {
    match pb::LockState::try_from(v) {
        Ok(pb::LockState::Locked) => LockState::Locked,
        Ok(pb::LockState::Unlocked) => LockState::Unlocked,
        Ok(pb::LockState::Absent) => LockState::Absent,
        _ => LockState::Unknown,
    }
}

/// A lock state for the API.
pub fn lock_to_proto(v: LockState) -> pb::LockState {
    match v {
        LockState::Unknown => pb::LockState::Unknown,
        LockState::Locked => pb::LockState::Locked,
        LockState::Unlocked => pb::LockState::Unlocked,
        LockState::Absent => pb::LockState::Absent,
    }
}

/// A source reading from the API.
pub fn reading_from_proto(r: &pb::SourceReading) -> SourceReading {
    SourceReading { mu: r.mu, g2: r.g2 }
}

/// A source reading for the API.
pub fn reading_to_proto(r: &SourceReading) -> pb::SourceReading {
    pb::SourceReading { mu: r.mu, g2: r.g2 }
}

impl Monitors {
    /// From the API's message (channels above 255 are skipped).
    pub fn from_proto(m: &pb::MonitorReadings) -> Self {
        Self {
            source: m.source.as_ref().map(reading_from_proto),
            rates: m.rates.iter().filter_map(|r| Some((u8::try_from(r.channel).ok()?, r.counts_per_s))).collect(),
            temperatures: m.temperatures.iter().map(|t| (t.sensor.clone(), t.kelvin)).collect(),
            reference_clock: lock_from_proto(m.reference_clock),
            sync: lock_from_proto(m.sync),
            phase: lock_from_proto(m.phase),
            phase_error_rad: m.phase_error_rad,
            frames: m.frames,
        }
    }

    /// For the API.
    pub fn to_proto(&self) -> pb::MonitorReadings {
        pb::MonitorReadings {
            source: self.source.as_ref().map(reading_to_proto),
            rates: self
                .rates
                .iter()
                .map(|&(channel, counts_per_s)| pb::ChannelRate { channel: u32::from(channel), counts_per_s })
                .collect(),
            temperatures: self
                .temperatures
                .iter()
                .map(|(sensor, kelvin)| pb::Temperature { sensor: sensor.clone(), kelvin: *kelvin })
                .collect(),
            reference_clock: lock_to_proto(self.reference_clock) as i32,
            sync: lock_to_proto(self.sync) as i32,
            phase: lock_to_proto(self.phase) as i32,
            phase_error_rad: self.phase_error_rad,
            frames: self.frames,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receiver() -> DeviceDescription {
        let ch = |channel, role: pb::ChannelRole| pb::Channel { channel, role: role as i32, ..Default::default() };
        DeviceDescription {
            role: pb::DeviceRole::Receiver as i32,
            pulse_rate_hz: 75.947e6,
            pulse_period: exact_period(75.947e6),
            bin_separation_ps: 2641.0,
            window_ps: 1500.0,
            frame_pulses: 1 << 22,
            sync_every_pulses: 1 << 16,
            channels: vec![
                ch(0, pb::ChannelRole::Sync),
                ch(1, pb::ChannelRole::Z),
                ch(2, pb::ChannelRole::XPlus),
                ch(3, pb::ChannelRole::XMinus),
            ],
            ..Default::default()
        }
    }

    #[test]
    fn exact_period_of_76_mhz() {
        let p = exact_period(75.947e6).unwrap();
        assert_eq!((p.numerator_ps, p.denominator), (1_000_000_000, 75_947));
        assert!(exact_period(75.947_5e6 + 0.25).is_none());
        let info = DeviceInfo::new(receiver()).unwrap();
        assert!((info.period_ps() - 1e12 / 75.947e6).abs() < 1e-9);
        assert_eq!(info.channel_map().unwrap().channel(Role::XMinus), Some(3));
    }

    #[test]
    fn invalid_descriptions_are_named() {
        type Change = Box<dyn Fn(&mut DeviceDescription)>;
        let cases: Vec<(Change, &str)> = vec![
            (Box::new(|d| d.role = 0), "role"),
            (Box::new(|d| d.pulse_rate_hz = f64::NAN), "pulse_rate_hz"),
            (
                Box::new(|d| d.pulse_period = Some(pb::PulsePeriod { numerator_ps: 13_000, denominator: 1 })),
                "disagrees",
            ),
            (Box::new(|d| d.frame_pulses = 0), "frame_pulses"),
            (Box::new(|d| d.sync_every_pulses = 3), "divide"),
            (Box::new(|d| d.window_ps = 3000.0), "window_ps"),
            (Box::new(|d| drop(d.channels.remove(0))), "sync"),
            (Box::new(|d| d.channels[1].channel = 300), "above 255"),
            (Box::new(|d| d.channels[1].role = 0), "no role"),
        ];
        for (change, want) in cases {
            let mut d = receiver();
            change(&mut d);
            let e = DeviceInfo::new(d).unwrap_err().to_string();
            assert!(e.contains(want), "{e} lacks {want}");
        }
        let mut d = receiver();
        d.sync_every_pulses = 0;
        d.channels.remove(0);
        assert!(DeviceInfo::new(d).unwrap().channel_map().unwrap().channel(Role::Sync).is_none());
    }

    #[test]
    fn monitors_round_trip() {
        let m = Monitors {
            source: Some(SourceReading { mu: 0.004, g2: 0.008 }),
            rates: vec![(1, 5e4), (2, 2e4)],
            temperatures: vec![("snspd".into(), 0.85)],
            reference_clock: LockState::Locked,
            sync: LockState::Unlocked,
            phase: LockState::Absent,
            phase_error_rad: Some(0.1),
            frames: 7,
        };
        assert_eq!(Monitors::from_proto(&m.to_proto()), m);
    }
}
