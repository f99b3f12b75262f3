//! The daemons' quantum devices, as `[device]` chooses them (`qkd_device`'s drivers): opening
//! them, and checking that what they describe fits the configuration.

use anyhow::Context;
use qkd_device::grpc::{DeviceAddress, GrpcReceiver, GrpcTransmitter};
use qkd_device::replay::{ReplayReceiver, ReplayTransmitter};
use qkd_device::sim::{PhotonFrame, SimReceiver, SimRngs, SimTransmitter};
use qkd_device::tagrx::PipelineOptions;
use qkd_device::{AnyReceiver, AnyTransmitter, DeviceInfo, ReceiverDevice, TransmitterDevice};
use qkd_sim::LinkParams;
use tokio::sync::mpsc;

use crate::config::{DeviceDriver, DeviceSection};

/// Photon frames queued between the simulated fibre's reader and the simulated receiver.
pub const PHOTON_QUEUE_FRAMES: usize = 64;

/// Opens Alice's transmitter. For `sim` the daemon drives the returned simulator itself
/// ([`SimTransmitter::emit`]) and sends the photons over the simulated fibre.
pub async fn open_transmitter(
    device: &DeviceSection,
    link: &LinkParams,
    frame_pulses: u64,
) -> anyhow::Result<AnyTransmitter> {
    let tx = match device.driver {
        DeviceDriver::Sim => AnyTransmitter::Sim(SimTransmitter::new(link, frame_pulses, SimRngs::from_os().alice)?),
        DeviceDriver::Grpc => {
            let address = address(device)?;
            AnyTransmitter::Grpc(
                GrpcTransmitter::connect(&address)
                    .await
                    .with_context(|| format!("opening the transmitter at {address}"))?,
            )
        }
        DeviceDriver::Replay => {
            let file = device.file.as_ref().context("device.file is not set")?;
            AnyTransmitter::Replay(
                ReplayTransmitter::open(file)
                    .with_context(|| format!("opening the recording {}", file.display()))?
                    .paced(),
            )
        }
    };
    check_fits(tx.info(), link, frame_pulses)?;
    Ok(tx)
}

/// Opens Bob's receiver. For `sim`, also the sender the simulated fibre's reader feeds with the
/// photon frames it reads.
pub async fn open_receiver(
    device: &DeviceSection,
    link: &LinkParams,
    frame_pulses: u64,
) -> anyhow::Result<(AnyReceiver, Option<mpsc::Sender<PhotonFrame>>)> {
    let (rx, photons) = match device.driver {
        DeviceDriver::Sim => {
            let (tx, rx) = mpsc::channel(PHOTON_QUEUE_FRAMES);
            (AnyReceiver::Sim(SimReceiver::new(link, frame_pulses, SimRngs::from_os().bob, rx)?), Some(tx))
        }
        DeviceDriver::Grpc => {
            let address = address(device)?;
            let rx = GrpcReceiver::connect(&address, PipelineOptions::default())
                .await
                .with_context(|| format!("opening the receiver at {address}"))?;
            (AnyReceiver::Grpc(rx), None)
        }
        DeviceDriver::Replay => {
            let file = device.file.as_ref().context("device.file is not set")?;
            let rx = ReplayReceiver::open_recording(file, PipelineOptions::default())
                .with_context(|| format!("opening the recording {}", file.display()))?;
            (AnyReceiver::Replay(rx), None)
        }
    };
    check_fits(rx.info(), link, frame_pulses)?;
    Ok((rx, photons))
}

fn address(device: &DeviceSection) -> anyhow::Result<DeviceAddress> {
    let address = device.address.as_deref().context("device.address is not set")?;
    Ok(DeviceAddress::parse(address)?)
}

/// Refuses a device whose frames are not the configured frames (both ends must cut the pulse
/// train alike, and the parameter digest covers `protocol.frame_pulses`), or whose pulse rate is
/// not the link's.
fn check_fits(info: &DeviceInfo, link: &LinkParams, frame_pulses: u64) -> anyhow::Result<()> {
    if info.frame_pulses() != frame_pulses {
        anyhow::bail!(
            "the device ({}) cuts frames of {} pulses, but protocol.frame_pulses = {frame_pulses}: set them equal",
            info.summary(),
            info.frame_pulses()
        );
    }
    let rate = 1e12 / info.period_ps();
    if (rate - link.clock_hz).abs() > 1e-6 * link.clock_hz {
        anyhow::bail!(
            "the device ({}) pulses at {rate:.0} Hz, but the link model ([link]) at {:.0} Hz: use the device's \
             link preset",
            info.summary(),
            link.clock_hz
        );
    }
    Ok(())
}
