//! The hardware boundary of the QKD link: how the daemons talk to the quantum devices, whatever
//! they are.
//!
//! A device is either Alice's **transmitter** (a pulsed source whose encoder prepares a state per
//! pulse from the device's own random source) or Bob's **receiver** (detectors read out by a time
//! tagger). The daemons see them through two traits:
//!
//! * [`TransmitterDevice`]: frames in index order ([`TxEvent`]): per frame its index, its start on
//!   the device clock, the states actually prepared ([`TxStates`], `state(pulse_idx)`) and the
//!   source monitor's reading; or the indices of frames whose states were lost.
//! * [`ReceiverDevice`]: per-frame detections in index order ([`RxEvent`]: ready with its
//!   `Detection`s and side-slot counts, or dropped with the reason); phase stabilisation by
//!   reporting each sifted frame's X-basis errors; monitors.
//!
//! Three drivers implement them ([`AnyTransmitter`], [`AnyReceiver`] choose at run time):
//!
//! * [`sim`]: today's in-process simulator (`qkd_sim` physics, photons handed over in memory or
//!   by the daemon's simulated fibre);
//! * [`grpc`]: a device process serving `proto/device.proto` (a vendor driver, or the
//!   [`emulator`]) at a TCP address or a Unix socket; time tags go through `qkd_timetag`;
//! * [`replay`]: recorded runs ([`record`] files, both sides), and for the receiver PicoQuant PTU
//!   and text tag files with a channel-map sidecar.
//!
//! Time-tag-level receivers share [`tagrx::TagReceiver`] (the `qkd_timetag` pipeline set up from
//! the device's description). The [`emulator`] serves both services from the simulator's physics
//! at the time-tag level (clocks with offset and drift, jitter, sync tags, injected gaps) and can
//! record what it serves. docs/devices.md describes the API for driver writers.

pub mod emulator;
pub mod frames;
pub mod grpc;
pub mod info;
pub mod record;
pub mod replay;
pub mod sim;
pub mod tagrx;
pub mod tagwire;

use std::future::Future;

pub use frames::{LockState, Monitors, PackedStates, RxEvent, RxFrame, TxEvent, TxFrame, TxStates};
pub use info::{DeviceInfo, DeviceRole};
pub use record::RecordError;

/// Anything that goes wrong between a daemon and its device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The device's description is unusable.
    #[error("device description: {0}")]
    Description(String),
    /// The device cannot be reached.
    #[error("cannot connect to the device at {address}: {reason}")]
    Connect {
        /// Where it was looked for.
        address: String,
        /// Why it failed.
        reason: String,
    },
    /// A call to the device failed.
    #[error("device call {call} failed: {code:?}: {message}")]
    Rpc {
        /// The RPC.
        call: &'static str,
        /// The gRPC status code.
        code: tonic::Code,
        /// The status message.
        message: String,
    },
    /// The device sent something that breaks the API's rules.
    #[error("malformed data from the device: {0}")]
    Malformed(String),
    /// The time-tag pipeline stopped (clock lost, windows not found).
    #[error("time-tag pipeline: {0}")]
    Pipeline(#[from] qkd_timetag::pipeline::PipelineError),
    /// A recording file is unreadable.
    #[error(transparent)]
    Record(#[from] RecordError),
    /// A tag file (PTU, text, channel map) is unreadable.
    #[error("tag file: {0}")]
    TagFile(String),
    /// The device cannot do what was asked.
    #[error("not supported by this device: {0}")]
    Unsupported(String),
    /// The device (or the in-process peer) went away.
    #[error("the device stream closed: {0}")]
    Closed(String),
}

impl DeviceError {
    /// The error of a failed RPC.
    pub(crate) fn rpc(call: &'static str, status: &tonic::Status) -> Self {
        DeviceError::Rpc { call, code: status.code(), message: status.message().to_owned() }
    }
}

/// Alice's source, as her daemon uses it.
pub trait TransmitterDevice: Send {
    /// The device's (validated) description.
    fn info(&self) -> &DeviceInfo;

    /// The next frame (or lost frames), in index order; `Ok(None)` when the device's stream has
    /// ended (a replay's end, the device stopping).
    fn next_event(&mut self) -> impl Future<Output = Result<Option<TxEvent>, DeviceError>> + Send;

    /// The slow monitors.
    fn monitors(&mut self) -> impl Future<Output = Result<Monitors, DeviceError>> + Send;
}

/// Bob's receiver, as his daemon uses it.
pub trait ReceiverDevice: Send {
    /// The device's (validated) description.
    fn info(&self) -> &DeviceInfo;

    /// The next frame's detections (or a frame to drop), in index order, each frame once;
    /// `Ok(None)` when the stream has ended.
    fn next_event(&mut self) -> impl Future<Output = Result<Option<RxEvent>, DeviceError>> + Send;

    /// Phase stabilisation: frame `frame`'s X-basis test outcomes, reported once per sifted frame
    /// in frame order: `test_events` pulses where Alice sent |+> and Bob measured X, of which
    /// `errors` gave D-. Frames never reported count as zero events. A device without a phase
    /// actuator ignores the reports.
    fn report_phase_errors(
        &mut self,
        frame: u64,
        test_events: u64,
        errors: u64,
    ) -> impl Future<Output = Result<(), DeviceError>> + Send;

    /// The slow monitors.
    fn monitors(&mut self) -> impl Future<Output = Result<Monitors, DeviceError>> + Send;
}

/// A transmitter of any driver (what the daemon's configuration chooses).
// One per daemon: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum AnyTransmitter {
    /// The in-process simulator.
    Sim(sim::SimTransmitter),
    /// A device process over gRPC.
    Grpc(grpc::GrpcTransmitter),
    /// A recording.
    Replay(replay::ReplayTransmitter),
}

impl TransmitterDevice for AnyTransmitter {
    fn info(&self) -> &DeviceInfo {
        match self {
            AnyTransmitter::Sim(d) => d.info(),
            AnyTransmitter::Grpc(d) => d.info(),
            AnyTransmitter::Replay(d) => d.info(),
        }
    }

    async fn next_event(&mut self) -> Result<Option<TxEvent>, DeviceError> {
        match self {
            AnyTransmitter::Sim(d) => d.next_event().await,
            AnyTransmitter::Grpc(d) => d.next_event().await,
            AnyTransmitter::Replay(d) => d.next_event().await,
        }
    }

    async fn monitors(&mut self) -> Result<Monitors, DeviceError> {
        match self {
            AnyTransmitter::Sim(d) => d.monitors().await,
            AnyTransmitter::Grpc(d) => d.monitors().await,
            AnyTransmitter::Replay(d) => d.monitors().await,
        }
    }
}

/// A receiver of any driver (what the daemon's configuration chooses).
// One per daemon: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum AnyReceiver {
    /// The in-process simulator.
    Sim(sim::SimReceiver),
    /// A device process over gRPC.
    Grpc(grpc::GrpcReceiver),
    /// A recording, or PTU / text tag files.
    Replay(replay::ReplayReceiver),
}

impl ReceiverDevice for AnyReceiver {
    fn info(&self) -> &DeviceInfo {
        match self {
            AnyReceiver::Sim(d) => d.info(),
            AnyReceiver::Grpc(d) => d.info(),
            AnyReceiver::Replay(d) => d.info(),
        }
    }

    async fn next_event(&mut self) -> Result<Option<RxEvent>, DeviceError> {
        match self {
            AnyReceiver::Sim(d) => d.next_event().await,
            AnyReceiver::Grpc(d) => d.next_event().await,
            AnyReceiver::Replay(d) => d.next_event().await,
        }
    }

    async fn report_phase_errors(&mut self, frame: u64, test_events: u64, errors: u64) -> Result<(), DeviceError> {
        match self {
            AnyReceiver::Sim(d) => d.report_phase_errors(frame, test_events, errors).await,
            AnyReceiver::Grpc(d) => d.report_phase_errors(frame, test_events, errors).await,
            AnyReceiver::Replay(d) => d.report_phase_errors(frame, test_events, errors).await,
        }
    }

    async fn monitors(&mut self) -> Result<Monitors, DeviceError> {
        match self {
            AnyReceiver::Sim(d) => d.monitors().await,
            AnyReceiver::Grpc(d) => d.monitors().await,
            AnyReceiver::Replay(d) => d.monitors().await,
        }
    }
}

#[cfg(test)]
mod tests;
