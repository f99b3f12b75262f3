//! Raw time tags as a time tagger delivers them, and the map from tagger channels to their roles
//! in Bob's receiver.
//!
//! Conventions: times are integer picoseconds of Bob's tagger clock (`u64`, from an arbitrary
//! origin, normally the start of the acquisition); channels are the tagger's input numbers as a
//! `u8`. The readers of this crate number channels the same way for every source: channel 0 is
//! the sync input of PicoQuant devices, detector input n is channel n + 1 (see
//! [`crate::ptu`]); text files and live devices name their channels freely, and a
//! [`ChannelMap`] says which is which.
//!
//! A stream is a sequence of [`Record`]s in (almost) non-decreasing time: tags, gaps (intervals
//! where the tagger lost data: FIFO overflow, USB buffer loss; the frames they touch must be
//! dropped at both ends) and markers (external marker inputs, passed through, not used for
//! detection).

use std::fmt;

/// One detector or sync event: a tagger channel and its arrival time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Tag {
    /// Tagger channel (see the module docs for the numbering).
    pub channel: u8,
    /// Arrival time on Bob's tagger clock, in ps.
    pub time_ps: u64,
}

impl Tag {
    /// A tag on `channel` at `time_ps`.
    pub fn new(channel: u8, time_ps: u64) -> Self {
        Self { channel, time_ps }
    }
}

/// One element of a time-tag stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Record {
    /// A detector, sync or clock event.
    Tag(Tag),
    /// Data lost between `from_ps` and `to_ps` (tagger clock, ps, `from_ps <= to_ps`): a FIFO
    /// overflow or a lost buffer. Every frame overlapping it is dropped.
    Gap {
        /// First instant of the interval without data, in ps.
        from_ps: u64,
        /// Last instant of the interval without data, in ps.
        to_ps: u64,
    },
    /// An external marker (PicoQuant marker inputs): carried through, not used for detection.
    Marker {
        /// Marker bits or number, as the device reports them.
        marker: u8,
        /// Time of the marker, in ps.
        time_ps: u64,
    },
}

impl Record {
    /// The time the record is ordered by: a tag's or marker's time, a gap's start.
    pub fn time_ps(&self) -> u64 {
        match *self {
            Record::Tag(t) => t.time_ps,
            Record::Gap { from_ps, .. } => from_ps,
            Record::Marker { time_ps, .. } => time_ps,
        }
    }
}

/// What a tagger channel is connected to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// The Z-basis detector (arrival time: early or late window).
    Z,
    /// Detector D+ behind the X-basis interferometer.
    XPlus,
    /// Detector D- behind the X-basis interferometer.
    XMinus,
    /// Alice's sync: one tag every `sync_every` pulses (see [`crate::clock::SyncConfig`]).
    Sync,
    /// A reference clock without frame meaning. Accepted in a map and counted, not used for
    /// clock recovery yet.
    Clock,
}

impl Role {
    /// All roles, in the order of their names in a map file.
    pub const ALL: [Role; 5] = [Role::Z, Role::XPlus, Role::XMinus, Role::Sync, Role::Clock];

    /// The role's name in a channel-map file: `z`, `x_plus`, `x_minus`, `sync`, `clock`.
    pub fn name(self) -> &'static str {
        match self {
            Role::Z => "z",
            Role::XPlus => "x_plus",
            Role::XMinus => "x_minus",
            Role::Sync => "sync",
            Role::Clock => "clock",
        }
    }

    /// The role named `name` (as [`Role::name`] gives it, case-insensitive), else `None`.
    pub fn from_name(name: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.name().eq_ignore_ascii_case(name))
    }

    /// Whether the role is a photon detector (Z, D+ or D-).
    pub fn is_detector(self) -> bool {
        matches!(self, Role::Z | Role::XPlus | Role::XMinus)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a set of channel assignments is not a valid [`ChannelMap`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChannelMapError {
    /// One channel was given two roles (or the same role twice).
    #[error("channel {channel} is assigned twice: as {first} and as {second}")]
    DuplicateChannel {
        /// The channel.
        channel: u8,
        /// Its first role.
        first: Role,
        /// Its second role.
        second: Role,
    },
    /// One role was given two channels.
    #[error("role {role} is assigned twice: to channel {first} and to channel {second}")]
    DuplicateRole {
        /// The role.
        role: Role,
        /// Its first channel.
        first: u8,
        /// Its second channel.
        second: u8,
    },
    /// No channel is the Z detector.
    #[error("no channel is the Z detector (role z)")]
    MissingZ,
    /// No channel is the sync, and the map was built for sync-based clock recovery.
    #[error("no channel is the sync (role sync); clock recovery from the data alone needs a map built for it")]
    MissingSync,
    /// Only one of the two X detectors is present.
    #[error("role {present} is assigned but {missing} is not: the X detectors come in pairs")]
    UnpairedX {
        /// The X detector that is present.
        present: Role,
        /// The one that is missing.
        missing: Role,
    },
}

/// The channels of Bob's receiver: which tagger channel is the Z detector, D+, D-, the sync and
/// the reference clock. Valid by construction: no channel or role twice, a Z detector, X
/// detectors in pairs, and (unless built with [`ChannelMap::without_sync`]) a sync.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelMap {
    /// (role, channel), in the order given.
    entries: Vec<(Role, u8)>,
}

impl ChannelMap {
    /// A map for sync-based clock recovery: requires a Z detector and a sync.
    pub fn new(entries: &[(Role, u8)]) -> Result<Self, ChannelMapError> {
        let map = Self::without_sync(entries)?;
        if map.channel(Role::Sync).is_none() {
            return Err(ChannelMapError::MissingSync);
        }
        Ok(map)
    }

    /// A map that may lack a sync (clock recovery from the data alone); still requires a Z
    /// detector.
    pub fn without_sync(entries: &[(Role, u8)]) -> Result<Self, ChannelMapError> {
        for (i, &(role, channel)) in entries.iter().enumerate() {
            for &(other_role, other_channel) in &entries[..i] {
                if other_channel == channel {
                    return Err(ChannelMapError::DuplicateChannel { channel, first: other_role, second: role });
                }
                if other_role == role {
                    return Err(ChannelMapError::DuplicateRole { role, first: other_channel, second: channel });
                }
            }
        }
        let map = Self { entries: entries.to_vec() };
        if map.channel(Role::Z).is_none() {
            return Err(ChannelMapError::MissingZ);
        }
        match (map.channel(Role::XPlus), map.channel(Role::XMinus)) {
            (Some(_), None) => Err(ChannelMapError::UnpairedX { present: Role::XPlus, missing: Role::XMinus }),
            (None, Some(_)) => Err(ChannelMapError::UnpairedX { present: Role::XMinus, missing: Role::XPlus }),
            _ => Ok(map),
        }
    }

    /// The role of `channel`, if it has one.
    pub fn role(&self, channel: u8) -> Option<Role> {
        self.entries.iter().find(|e| e.1 == channel).map(|e| e.0)
    }

    /// The channel of `role`, if present.
    pub fn channel(&self, role: Role) -> Option<u8> {
        self.entries.iter().find(|e| e.0 == role).map(|e| e.1)
    }

    /// The (role, channel) pairs, in the order given.
    pub fn entries(&self) -> &[(Role, u8)] {
        &self.entries
    }

    /// Whether the X detectors are present.
    pub fn has_x(&self) -> bool {
        self.channel(Role::XPlus).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_maps() {
        let m = ChannelMap::new(&[(Role::Sync, 0), (Role::Z, 1), (Role::XPlus, 2), (Role::XMinus, 3)]).unwrap();
        assert_eq!(m.role(2), Some(Role::XPlus));
        assert_eq!(m.role(9), None);
        assert_eq!(m.channel(Role::Sync), Some(0));
        assert_eq!(m.channel(Role::Clock), None);
        assert!(m.has_x());
        let m = ChannelMap::new(&[(Role::Z, 5), (Role::Sync, 7), (Role::Clock, 8)]).unwrap();
        assert!(!m.has_x());
        assert_eq!(m.entries().len(), 3);
        let m = ChannelMap::without_sync(&[(Role::Z, 5)]).unwrap();
        assert_eq!(m.channel(Role::Sync), None);
    }

    #[test]
    fn invalid_maps_name_the_problem() {
        assert_eq!(
            ChannelMap::new(&[(Role::Sync, 0), (Role::Z, 1), (Role::XPlus, 1)]),
            Err(ChannelMapError::DuplicateChannel { channel: 1, first: Role::Z, second: Role::XPlus })
        );
        assert_eq!(
            ChannelMap::new(&[(Role::Sync, 0), (Role::Z, 1), (Role::Z, 2)]),
            Err(ChannelMapError::DuplicateRole { role: Role::Z, first: 1, second: 2 })
        );
        assert_eq!(ChannelMap::new(&[(Role::Sync, 0), (Role::XPlus, 1)]), Err(ChannelMapError::MissingZ));
        assert_eq!(ChannelMap::new(&[(Role::Z, 1)]), Err(ChannelMapError::MissingSync));
        assert_eq!(ChannelMap::without_sync(&[(Role::Sync, 0)]), Err(ChannelMapError::MissingZ));
        assert_eq!(
            ChannelMap::new(&[(Role::Sync, 0), (Role::Z, 1), (Role::XMinus, 2)]),
            Err(ChannelMapError::UnpairedX { present: Role::XMinus, missing: Role::XPlus })
        );
        let msg = ChannelMap::new(&[(Role::Sync, 3), (Role::Z, 3)]).unwrap_err().to_string();
        assert_eq!(msg, "channel 3 is assigned twice: as sync and as z");
    }

    #[test]
    fn role_names_round_trip() {
        for r in Role::ALL {
            assert_eq!(Role::from_name(r.name()), Some(r));
            assert_eq!(r.to_string(), r.name());
        }
        assert_eq!(Role::from_name("X_PLUS"), Some(Role::XPlus));
        assert_eq!(Role::from_name("d+"), None);
        assert!(Role::Z.is_detector() && Role::XMinus.is_detector() && !Role::Sync.is_detector());
    }

    #[test]
    fn record_time_orders_by_start() {
        assert_eq!(Record::Tag(Tag::new(1, 5)).time_ps(), 5);
        assert_eq!(Record::Gap { from_ps: 7, to_ps: 9 }.time_ps(), 7);
        assert_eq!(Record::Marker { marker: 2, time_ps: 11 }.time_ps(), 11);
    }
}
