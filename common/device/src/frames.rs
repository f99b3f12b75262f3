//! What the devices deliver, as the daemons see it, whichever driver produced it: the
//! transmitter's frames (index, start, the states it prepared, the source monitor's reading),
//! the receiver's per-frame detections (or the index of a frame it must drop, and why), and
//! monitor readings.

use qkd_core::postproc::finite_key::{SourceReading, XSlotCounts};
use qkd_core::quantum::Detection;
use qkd_timetag::assign::FrameCounters;
use qkd_timetag::pipeline::DropReason;

use crate::DeviceError;

pub use qkd_core::prepared::{PackedStates, TxStates, pack_derived};

/// One frame as the transmitter prepared it.
#[derive(Clone, Debug)]
pub struct TxFrame {
    /// Frame index.
    pub index: u64,
    /// Pulses in the frame.
    pub n_pulses: u64,
    /// Emission of the frame's pulse 0 on the transmitter's clock, ps.
    pub start_ps: u64,
    /// The state of every pulse.
    pub states: TxStates,
    /// The source monitor's reading over the frame, if the device has one.
    pub reading: Option<SourceReading>,
}

/// What a transmitter delivers, in frame order.
#[derive(Clone, Debug)]
pub enum TxEvent {
    /// A frame.
    Frame(TxFrame),
    /// Frames whose states the device lost (both ends drop them).
    Lost {
        /// First lost frame.
        first: u64,
        /// Number of frames.
        count: u64,
        /// Why, in words.
        reason: String,
    },
}

impl TxEvent {
    /// The event of an API message from the device `info` (a transmitter): checks the frame's
    /// length against the description and its states' packing, and that indices increase
    /// (`next`: the least index allowed, updated).
    pub fn from_proto(
        info: &crate::DeviceInfo,
        ev: proto::device::TransmitterEvent,
        next: &mut u64,
    ) -> Result<Self, DeviceError> {
        use proto::device::transmitter_event::Event;
        match ev.event {
            Some(Event::Frame(f)) => {
                if f.n_pulses != info.frame_pulses() {
                    return Err(DeviceError::Malformed(format!(
                        "frame {} has {} pulses, the device described {}",
                        f.frame_idx,
                        f.n_pulses,
                        info.frame_pulses()
                    )));
                }
                if f.frame_idx < *next {
                    return Err(DeviceError::Malformed(format!(
                        "frame {} arrived after frame {} (indices must increase)",
                        f.frame_idx,
                        *next - 1
                    )));
                }
                *next = f.frame_idx + 1;
                let states = PackedStates::from_bytes(f.n_pulses, f.states)
                    .map_err(|e| DeviceError::Malformed(format!("frame {}: {e}", f.frame_idx)))?;
                Ok(TxEvent::Frame(TxFrame {
                    index: f.frame_idx,
                    n_pulses: f.n_pulses,
                    start_ps: f.start_ps,
                    states: TxStates::Packed(states),
                    reading: f.source.as_ref().map(crate::info::reading_from_proto),
                }))
            }
            Some(Event::Lost(l)) => {
                if l.first_frame < *next || l.count == 0 {
                    return Err(DeviceError::Malformed(format!(
                        "lost frames {}+{} overlap frames already delivered (next {})",
                        l.first_frame, l.count, *next
                    )));
                }
                *next = l.first_frame.saturating_add(l.count);
                let reason =
                    proto::device::LossReason::try_from(l.reason).map_or("unknown", |r| r.as_str_name()).to_owned();
                Ok(TxEvent::Lost {
                    first: l.first_frame,
                    count: l.count,
                    reason: if l.detail.is_empty() { reason } else { format!("{reason}: {}", l.detail) },
                })
            }
            None => Err(DeviceError::Malformed("a transmitter event without content".into())),
        }
    }
}

/// One frame of detections, ready for sifting.
#[derive(Clone, Debug, PartialEq)]
pub struct RxFrame {
    /// Frame index.
    pub index: u64,
    /// Pulses in the frame.
    pub n_pulses: u64,
    /// Detections, ascending by pulse index, at most one per pulse.
    pub detections: Vec<Detection>,
    /// The X branch's side-slot and central-slot clicks (the detection-mismatch monitor).
    pub x_slots: XSlotCounts,
    /// The time-tag pipeline's counters, for time-tag-level devices.
    pub counters: Option<FrameCounters>,
}

/// What a receiver delivers, in frame order, each frame once.
#[derive(Clone, Debug, PartialEq)]
pub enum RxEvent {
    /// A complete frame.
    Ready(RxFrame),
    /// A frame that must be dropped at both ends.
    Dropped {
        /// Frame index.
        index: u64,
        /// Why.
        reason: DropReason,
    },
}

impl RxEvent {
    /// The frame index.
    pub fn index(&self) -> u64 {
        match self {
            RxEvent::Ready(f) => f.index,
            RxEvent::Dropped { index, .. } => *index,
        }
    }
}

/// The state of a lock (reference clock, sync, interferometer phase).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub enum LockState {
    /// Not reported.
    #[default]
    Unknown,
    /// Locked.
    Locked,
    /// Not locked.
    Unlocked,
    /// The device has no such lock.
    Absent,
}

/// Slow monitor readings of a device (`MonitorReadings` in `proto/device.proto`).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Monitors {
    /// Transmitter: the source monitor's latest reading (mu, g2).
    pub source: Option<SourceReading>,
    /// Receiver: (channel, counts per second).
    pub rates: Vec<(u8, f64)>,
    /// (sensor, kelvin).
    pub temperatures: Vec<(String, f64)>,
    /// The external frequency reference.
    pub reference_clock: LockState,
    /// The sync.
    pub sync: LockState,
    /// The interferometer's phase lock.
    pub phase: LockState,
    /// Simulated devices only: the true phase error, rad.
    pub phase_error_rad: Option<f64>,
    /// Frames produced so far.
    pub frames: u64,
}
