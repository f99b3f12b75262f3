//! The `grpc` driver: a device process (a vendor driver, or the [`crate::emulator`]) serving
//! `proto/device.proto` at a TCP address or a Unix socket. The transmitter's frames are
//! checked and unpacked; the receiver's tag batches go through [`TagReceiver`] (the
//! `qkd_timetag` pipeline) into per-frame detections.
//!
//! Addresses ([`DeviceAddress`]): `unix:/run/qkd/bob-device.sock` (or `unix:///run/...`) for a
//! Unix socket, `127.0.0.1:7202`, `[::1]:7202` or `tcp://host:port` for TCP. The connection is
//! plain HTTP/2 without TLS: it must stay on the host (module docs of `proto/device.proto`).

use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};

use proto::device as pb;
use proto::device::receiver_client::ReceiverClient;
use proto::device::transmitter_client::TransmitterClient;
use tonic::Streaming;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::frames::{Monitors, RxEvent, TxEvent};
use crate::info::DeviceInfo;
use crate::tagrx::{PipelineOptions, TagReceiver};
use crate::{DeviceError, DeviceRole, ReceiverDevice, TransmitterDevice};

/// Largest message on a device connection, bytes (a frame of 2^26 pulses' states, with room).
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Where a device process listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceAddress {
    /// `host:port`.
    Tcp(String),
    /// A Unix socket's path.
    Unix(PathBuf),
}

impl DeviceAddress {
    /// Parses `unix:PATH`, `unix://PATH`, `tcp://HOST:PORT`, `http://HOST:PORT` or `HOST:PORT`.
    pub fn parse(s: &str) -> Result<Self, DeviceError> {
        let bad =
            || DeviceError::Connect { address: s.into(), reason: "not an address (unix:PATH or HOST:PORT)".into() };
        if let Some(path) = s.strip_prefix("unix:") {
            let path = path.strip_prefix("//").unwrap_or(path);
            if path.is_empty() {
                return Err(bad());
            }
            return Ok(DeviceAddress::Unix(PathBuf::from(path)));
        }
        let hostport = s.strip_prefix("tcp://").or_else(|| s.strip_prefix("http://")).unwrap_or(s);
        match hostport.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                Ok(DeviceAddress::Tcp(hostport.to_owned()))
            }
            _ => Err(bad()),
        }
    }
}

impl std::fmt::Display for DeviceAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceAddress::Tcp(a) => f.write_str(a),
            DeviceAddress::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl std::str::FromStr for DeviceAddress {
    type Err = DeviceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Connects tonic to a Unix socket (a `tower::Service` from URIs to streams; the URI is
/// ignored).
#[derive(Clone, Debug)]
struct UnixConnector(PathBuf);

impl tower::Service<Uri> for UnixConnector {
    type Response = hyper_util::rt::TokioIo<tokio::net::UnixStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let path = self.0.clone();
        Box::pin(async move { Ok(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(path).await?)) })
    }
}

/// A channel to the device at `address`.
pub async fn connect(address: &DeviceAddress) -> Result<Channel, DeviceError> {
    let err = |e: tonic::transport::Error| DeviceError::Connect {
        address: address.to_string(),
        reason: std::error::Error::source(&e).map_or_else(|| e.to_string(), |s| format!("{e}: {s}")),
    };
    match address {
        DeviceAddress::Tcp(hostport) => {
            let endpoint = Endpoint::from_shared(format!("http://{hostport}")).map_err(err)?;
            endpoint.tcp_nodelay(true).connect().await.map_err(err)
        }
        DeviceAddress::Unix(path) => {
            // The authority is a placeholder: the connector ignores it.
            let endpoint = Endpoint::from_static("http://device.local");
            endpoint.connect_with_connector(UnixConnector(path.clone())).await.map_err(err)
        }
    }
}

/// Asks `Describe` and validates the answer as a device of `role`.
fn described(
    desc: pb::DeviceDescription,
    role: DeviceRole,
    address: &DeviceAddress,
) -> Result<DeviceInfo, DeviceError> {
    let info = DeviceInfo::new(desc)?;
    if info.role() != role {
        return Err(DeviceError::Description(format!("the device at {address} is a {}, not a {role}", info.role())));
    }
    Ok(info)
}

/// Alice's source in a device process.
pub struct GrpcTransmitter {
    address: DeviceAddress,
    info: DeviceInfo,
    client: TransmitterClient<Channel>,
    stream: Streaming<pb::TransmitterEvent>,
    next: u64,
}

impl std::fmt::Debug for GrpcTransmitter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcTransmitter")
            .field("address", &self.address)
            .field("next", &self.next)
            .finish_non_exhaustive()
    }
}

impl GrpcTransmitter {
    /// Connects, asks the description and opens the frame stream.
    pub async fn connect(address: &DeviceAddress) -> Result<Self, DeviceError> {
        let channel = connect(address).await?;
        let mut client = TransmitterClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let desc = client.describe(pb::DescribeRequest {}).await.map_err(|s| DeviceError::rpc("Describe", &s))?;
        let info = described(desc.into_inner(), DeviceRole::Transmitter, address)?;
        let stream = client
            .stream_frames(pb::StreamFramesRequest {})
            .await
            .map_err(|s| DeviceError::rpc("StreamFrames", &s))?
            .into_inner();
        Ok(Self { address: address.clone(), info, client, stream, next: 0 })
    }

    /// The device's address.
    pub fn address(&self) -> &DeviceAddress {
        &self.address
    }
}

impl TransmitterDevice for GrpcTransmitter {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    async fn next_event(&mut self) -> Result<Option<TxEvent>, DeviceError> {
        match self.stream.message().await {
            Ok(Some(ev)) => TxEvent::from_proto(&self.info, ev, &mut self.next).map(Some),
            Ok(None) => Ok(None),
            Err(s) => Err(DeviceError::rpc("StreamFrames", &s)),
        }
    }

    async fn monitors(&mut self) -> Result<Monitors, DeviceError> {
        let m = self.client.read_monitors(pb::ReadMonitorsRequest {}).await;
        Ok(Monitors::from_proto(&m.map_err(|s| DeviceError::rpc("ReadMonitors", &s))?.into_inner()))
    }
}

/// Bob's receiver in a device process: its tags through the `qkd_timetag` pipeline.
pub struct GrpcReceiver {
    address: DeviceAddress,
    client: ReceiverClient<Channel>,
    stream: Streaming<pb::TagBatch>,
    rx: TagReceiver,
    ended: bool,
}

impl std::fmt::Debug for GrpcReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcReceiver").field("address", &self.address).field("rx", &self.rx).finish_non_exhaustive()
    }
}

impl GrpcReceiver {
    /// Connects, asks the description, sets up the pipeline with `opts` and opens the tag
    /// stream.
    pub async fn connect(address: &DeviceAddress, opts: PipelineOptions) -> Result<Self, DeviceError> {
        let channel = connect(address).await?;
        let mut client = ReceiverClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let desc = client.describe(pb::DescribeRequest {}).await.map_err(|s| DeviceError::rpc("Describe", &s))?;
        let info = described(desc.into_inner(), DeviceRole::Receiver, address)?;
        let rx = TagReceiver::new(info, opts)?;
        let stream = client
            .stream_tags(pb::StreamTagsRequest {})
            .await
            .map_err(|s| DeviceError::rpc("StreamTags", &s))?
            .into_inner();
        Ok(Self { address: address.clone(), client, stream, rx, ended: false })
    }

    /// The device's address.
    pub fn address(&self) -> &DeviceAddress {
        &self.address
    }

    /// The time-tag pipeline (statistics, clock estimate, first frame).
    pub fn tags(&self) -> &TagReceiver {
        &self.rx
    }
}

impl ReceiverDevice for GrpcReceiver {
    fn info(&self) -> &DeviceInfo {
        self.rx.info()
    }

    async fn next_event(&mut self) -> Result<Option<RxEvent>, DeviceError> {
        loop {
            if let Some(ev) = self.rx.next_event() {
                return Ok(Some(ev));
            }
            if self.ended {
                return Ok(None);
            }
            match self.stream.message().await {
                Ok(Some(batch)) => self.rx.push_batch(&batch)?,
                Ok(None) => {
                    self.ended = true;
                    self.rx.finish()?;
                }
                Err(s) => return Err(DeviceError::rpc("StreamTags", &s)),
            }
        }
    }

    async fn report_phase_errors(&mut self, frame: u64, test_events: u64, errors: u64) -> Result<(), DeviceError> {
        if !self.rx.info().capabilities().phase_feedback {
            return Ok(());
        }
        let report = pb::PhaseErrorReport { frame_idx: frame, test_events, errors };
        self.client.report_phase_errors(report).await.map_err(|s| DeviceError::rpc("ReportPhaseErrors", &s))?;
        Ok(())
    }

    async fn monitors(&mut self) -> Result<Monitors, DeviceError> {
        let m = self.client.read_monitors(pb::ReadMonitorsRequest {}).await;
        Ok(Monitors::from_proto(&m.map_err(|s| DeviceError::rpc("ReadMonitors", &s))?.into_inner()))
    }
}

/// Records a live run: connects to the transmitter at `alice` and the receiver at `bob` as
/// their one client, and writes both streams to a recording at `path` (the descriptions in its
/// header, the messages in arrival order, flushed after every frame) until both streams end or
/// `stop` is cancelled. Blocking file writes run on the calling task (a frame's compression takes
/// milliseconds).
pub async fn record_live(
    alice: &DeviceAddress,
    bob: &DeviceAddress,
    path: &std::path::Path,
    stop: tokio_util::sync::CancellationToken,
) -> Result<crate::record::RecordingCounts, DeviceError> {
    let mut tx = TransmitterClient::new(connect(alice).await?)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let mut rx = ReceiverClient::new(connect(bob).await?)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let tx_desc = tx.describe(pb::DescribeRequest {}).await.map_err(|s| DeviceError::rpc("Describe", &s))?.into_inner();
    let rx_desc = rx.describe(pb::DescribeRequest {}).await.map_err(|s| DeviceError::rpc("Describe", &s))?.into_inner();
    described(tx_desc.clone(), DeviceRole::Transmitter, alice)?;
    described(rx_desc.clone(), DeviceRole::Receiver, bob)?;
    let mut writer = crate::record::RecordingWriter::create(
        path,
        pb::RecordingHeader {
            version: 0,
            created_by: format!("qkd-device recorder {}", env!("CARGO_PKG_VERSION")),
            created_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            transmitter: Some(tx_desc),
            receiver: Some(rx_desc),
            details: format!("live recording of {alice} and {bob}"),
        },
    )?;
    let mut frames = tx
        .stream_frames(pb::StreamFramesRequest {})
        .await
        .map_err(|s| DeviceError::rpc("StreamFrames", &s))?
        .into_inner();
    let mut tags =
        rx.stream_tags(pb::StreamTagsRequest {}).await.map_err(|s| DeviceError::rpc("StreamTags", &s))?.into_inner();
    let (mut frames_done, mut tags_done) = (false, false);
    while !(frames_done && tags_done) {
        tokio::select! {
            () = stop.cancelled() => break,
            m = frames.message(), if !frames_done => match m {
                Ok(Some(ev)) => {
                    writer.write_transmitter(&ev)?;
                    writer.flush()?;
                }
                Ok(None) => frames_done = true,
                Err(s) => return Err(DeviceError::rpc("StreamFrames", &s)),
            },
            m = tags.message(), if !tags_done => match m {
                Ok(Some(b)) => writer.write_tags(&b)?,
                Ok(None) => tags_done = true,
                Err(s) => return Err(DeviceError::rpc("StreamTags", &s)),
            },
        }
    }
    Ok(writer.finish()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse() {
        assert_eq!(DeviceAddress::parse("unix:/run/x.sock").unwrap(), DeviceAddress::Unix("/run/x.sock".into()));
        assert_eq!(DeviceAddress::parse("unix:///run/x.sock").unwrap(), DeviceAddress::Unix("/run/x.sock".into()));
        assert_eq!(DeviceAddress::parse("127.0.0.1:7202").unwrap(), DeviceAddress::Tcp("127.0.0.1:7202".into()));
        assert_eq!(DeviceAddress::parse("tcp://[::1]:7").unwrap(), DeviceAddress::Tcp("[::1]:7".into()));
        assert_eq!(DeviceAddress::parse("http://h:1").unwrap().to_string(), "h:1");
        for bad in ["", "unix:", "host", "host:99999", ":80"] {
            assert!(DeviceAddress::parse(bad).is_err(), "{bad}");
        }
    }
}
