//! The emulator's two gRPC services and the delivery of each frame to their subscribers: the
//! listeners (TCP or Unix socket), the shared state the services and the engine meet in, the
//! streams (whose end the engine can await), and the loss accounting of paced streams.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use proto::device as pb;
use proto::device::receiver_server::Receiver as ReceiverService;
use proto::device::transmitter_server::Transmitter as TransmitterService;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::EmulatorConfig;
use super::engine::FrameOutput;
use crate::DeviceError;
use crate::frames::Monitors;
use crate::grpc::DeviceAddress;

/// A listening socket for one of the emulator's services.
#[derive(Debug)]
pub enum Listener {
    /// TCP.
    Tcp(tokio::net::TcpListener),
    /// A Unix socket (and its path, removed when the emulator stops).
    Unix(tokio::net::UnixListener, PathBuf),
}

impl Listener {
    /// Binds `address` (a stale Unix socket file at the path is replaced).
    pub async fn bind(address: &DeviceAddress) -> Result<Self, DeviceError> {
        let err =
            |e: std::io::Error| DeviceError::Connect { address: address.to_string(), reason: format!("bind: {e}") };
        match address {
            DeviceAddress::Tcp(a) => Ok(Listener::Tcp(tokio::net::TcpListener::bind(a).await.map_err(err)?)),
            DeviceAddress::Unix(p) => {
                use std::os::unix::fs::FileTypeExt;
                if std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket()) {
                    std::fs::remove_file(p).map_err(err)?;
                }
                Ok(Listener::Unix(tokio::net::UnixListener::bind(p).map_err(err)?, p.clone()))
            }
        }
    }

    /// The address clients connect to (a TCP port 0 resolved).
    pub fn address(&self) -> Result<DeviceAddress, DeviceError> {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map(|a| DeviceAddress::Tcp(a.to_string()))
                .map_err(|e| DeviceError::Connect { address: "tcp".into(), reason: e.to_string() }),
            Listener::Unix(_, p) => Ok(DeviceAddress::Unix(p.clone())),
        }
    }
}

/// Serves `router` on `listener` until `stop`.
pub(super) async fn serve(
    router: tonic::transport::server::Router,
    listener: Listener,
    stop: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    match listener {
        Listener::Tcp(l) => {
            router
                .serve_with_incoming_shutdown(tonic::transport::server::TcpIncoming::from(l), stop.cancelled_owned())
                .await
        }
        Listener::Unix(l, path) => {
            let r = router
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::UnixListenerStream::new(l),
                    stop.cancelled_owned(),
                )
                .await;
            let _ = std::fs::remove_file(path);
            r
        }
    }
}

/// A server stream that tells, by dropping its `done` sender, when tonic has let go of it (all
/// sent, or the client gone).
pub(super) struct Tracked<T> {
    inner: ReceiverStream<Result<T, Status>>,
    _done: oneshot::Sender<()>,
}

impl<T> tokio_stream::Stream for Tracked<T> {
    type Item = Result<T, Status>;
    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.get_mut().inner).poll_next(cx)
    }
}

/// A stream's subscriber, as the engine sees it.
pub(super) struct Subscriber<T> {
    pub tx: mpsc::Sender<Result<T, Status>>,
    pub done: oneshot::Receiver<()>,
    /// Nothing sent yet (a receiver stream then needs a `StreamStart`).
    fresh: bool,
}

impl<T> Subscriber<T> {
    /// A subscriber with a queue of `queue` messages, and the stream tonic serves it from.
    fn new(queue: usize) -> (Self, Tracked<T>) {
        let (tx, rx) = mpsc::channel(queue);
        let (done_tx, done) = oneshot::channel();
        (Self { tx, done, fresh: true }, Tracked { inner: ReceiverStream::new(rx), _done: done_tx })
    }
}

#[derive(Default)]
pub(super) struct State {
    pub alice: Option<Subscriber<pb::TransmitterEvent>>,
    pub bob: Option<Subscriber<pb::TagBatch>>,
    /// Frames produced (reports are accepted for these).
    pub frames: u64,
    /// The last frame reported to the phase loop.
    pub last_report: Option<u64>,
    /// Reports not yet applied.
    pub reports: VecDeque<(u64, u64, u64)>,
    pub correction_steps: u64,
    pub tx_monitors: Monitors,
    pub rx_monitors: Monitors,
    /// Set when the engine has stopped producing.
    pub finished: bool,
}

pub(super) struct Shared {
    pub tx_desc: pb::DeviceDescription,
    pub rx_desc: pb::DeviceDescription,
    pub queue_frames: usize,
    pub state: Mutex<State>,
    pub subscribed: Notify,
}

impl Shared {
    pub fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Invariant: nothing panics while holding the lock.
        self.state.lock().expect("emulator state lock poisoned")
    }
}

pub(super) struct TxService(pub Arc<Shared>);
pub(super) struct RxService(pub Arc<Shared>);

#[tonic::async_trait]
impl TransmitterService for TxService {
    async fn describe(&self, _: Request<pb::DescribeRequest>) -> Result<Response<pb::DeviceDescription>, Status> {
        Ok(Response::new(self.0.tx_desc.clone()))
    }

    type StreamFramesStream = Tracked<pb::TransmitterEvent>;

    async fn stream_frames(
        &self,
        _: Request<pb::StreamFramesRequest>,
    ) -> Result<Response<Self::StreamFramesStream>, Status> {
        let (sub, stream) = Subscriber::new(self.0.queue_frames);
        {
            let mut st = self.0.lock();
            if st.finished {
                return Err(Status::failed_precondition(format!("the emulation has ended after {} frames", st.frames)));
            }
            if st.alice.replace(sub).is_some() {
                tracing::info!("emulator: a new transmitter stream replaced the previous one");
            }
        }
        self.0.subscribed.notify_one();
        Ok(Response::new(stream))
    }

    async fn read_monitors(
        &self,
        _: Request<pb::ReadMonitorsRequest>,
    ) -> Result<Response<pb::MonitorReadings>, Status> {
        Ok(Response::new(self.0.lock().tx_monitors.to_proto()))
    }
}

#[tonic::async_trait]
impl ReceiverService for RxService {
    async fn describe(&self, _: Request<pb::DescribeRequest>) -> Result<Response<pb::DeviceDescription>, Status> {
        Ok(Response::new(self.0.rx_desc.clone()))
    }

    type StreamTagsStream = Tracked<pb::TagBatch>;

    async fn stream_tags(&self, _: Request<pb::StreamTagsRequest>) -> Result<Response<Self::StreamTagsStream>, Status> {
        let (sub, stream) = Subscriber::new(self.0.queue_frames);
        {
            let mut st = self.0.lock();
            if st.finished {
                return Err(Status::failed_precondition(format!("the emulation has ended after {} frames", st.frames)));
            }
            if st.bob.replace(sub).is_some() {
                tracing::info!("emulator: a new receiver stream replaced the previous one");
            }
        }
        self.0.subscribed.notify_one();
        Ok(Response::new(stream))
    }

    async fn report_phase_errors(
        &self,
        request: Request<pb::PhaseErrorReport>,
    ) -> Result<Response<pb::PhaseErrorAck>, Status> {
        let r = request.into_inner();
        let mut st = self.0.lock();
        if r.frame_idx >= st.frames {
            return Err(Status::failed_precondition(format!(
                "frame {} has not been produced yet ({} so far)",
                r.frame_idx, st.frames
            )));
        }
        if let Some(last) = st.last_report
            && r.frame_idx <= last
        {
            return Err(Status::invalid_argument(format!(
                "phase reports come once per frame in frame order: frame {} after frame {last}",
                r.frame_idx
            )));
        }
        if r.errors > r.test_events {
            return Err(Status::invalid_argument(format!("{} errors in {} test events", r.errors, r.test_events)));
        }
        st.last_report = Some(r.frame_idx);
        st.reports.push_back((r.frame_idx, r.test_events, r.errors));
        Ok(Response::new(pb::PhaseErrorAck { correction_steps: st.correction_steps }))
    }

    async fn read_monitors(
        &self,
        _: Request<pb::ReadMonitorsRequest>,
    ) -> Result<Response<pb::MonitorReadings>, Status> {
        Ok(Response::new(self.0.lock().rx_monitors.to_proto()))
    }
}

/// Data a paced subscriber lost (its queue was full), to announce in its stream.
#[derive(Default)]
pub(super) struct Loss {
    /// Alice: first lost frame and count.
    frames: Option<(u64, u64)>,
    /// Bob: the time span lost, ps.
    tags: Option<(u64, u64)>,
}

/// What became of a message offered to a subscriber.
pub(super) enum Sent {
    Ok,
    /// Paced mode, queue full: dropped.
    Full,
    /// The subscriber is gone.
    Gone,
    /// The emulator is stopping.
    Stopped,
}

pub(super) async fn offer<T>(
    tx: &mpsc::Sender<Result<T, Status>>,
    msg: T,
    paced: bool,
    stop: &CancellationToken,
) -> Sent {
    if paced {
        return match tx.try_send(Ok(msg)) {
            Ok(()) => Sent::Ok,
            Err(mpsc::error::TrySendError::Full(_)) => Sent::Full,
            Err(mpsc::error::TrySendError::Closed(_)) => Sent::Gone,
        };
    }
    tokio::select! {
        r = tx.send(Ok(msg)) => if r.is_ok() { Sent::Ok } else { Sent::Gone },
        () = stop.cancelled() => Sent::Stopped,
    }
}

/// Hands a frame to the subscribers; false when the emulator is stopping.
pub(super) async fn deliver(
    shared: &Shared,
    cfg: &EmulatorConfig,
    out: FrameOutput,
    rx_start: pb::StreamStart,
    lost: &mut Loss,
    stop: &CancellationToken,
) -> bool {
    let paced = cfg.speed > 0.0;
    let (alice, bob) = {
        let mut st = shared.lock();
        let alice = st.alice.as_mut().map(|s| {
            let fresh = std::mem::replace(&mut s.fresh, false);
            (s.tx.clone(), fresh)
        });
        let bob = st.bob.as_mut().map(|s| {
            let fresh = std::mem::replace(&mut s.fresh, false);
            (s.tx.clone(), fresh)
        });
        (alice, bob)
    };
    if let Some((tx, fresh)) = alice {
        if fresh {
            lost.frames = None;
        }
        let mut ok = true;
        if let Some((first, count)) = lost.frames {
            let ev = pb::TransmitterEvent {
                event: Some(pb::transmitter_event::Event::Lost(pb::FramesLost {
                    first_frame: first,
                    count,
                    reason: pb::LossReason::Overflow as i32,
                    detail: "the subscriber fell a queue behind the emulator".into(),
                })),
            };
            match offer(&tx, ev, paced, stop).await {
                Sent::Ok => lost.frames = None,
                Sent::Full => ok = false,
                Sent::Gone => {
                    forget_alice(shared, &tx);
                    ok = false;
                }
                Sent::Stopped => return false,
            }
        }
        let index = out.index;
        let r = if ok { offer(&tx, out.transmitter, paced, stop).await } else { Sent::Full };
        match r {
            Sent::Ok => {}
            Sent::Full => {
                let (first, count) = lost.frames.unwrap_or((index, 0));
                lost.frames = Some((first, count + 1));
            }
            Sent::Gone => forget_alice(shared, &tx),
            Sent::Stopped => return false,
        }
    }
    if let Some((tx, fresh)) = bob {
        if fresh {
            lost.tags = None;
        }
        let mut batches = out.batches;
        if fresh {
            batches[0].start = Some(rx_start);
        }
        for mut b in batches {
            let span = batch_span(&b);
            if let Some((from, to)) = lost.tags {
                b.gaps.insert(
                    0,
                    pb::Gap { position: 0, from_ps: from, to_ps: to, reason: pb::LossReason::Overflow as i32 },
                );
            }
            match offer(&tx, b, paced, stop).await {
                Sent::Ok => lost.tags = None,
                Sent::Full => {
                    if let Some((from, to)) = span {
                        lost.tags = Some(lost.tags.map_or((from, to), |(a, b)| (a.min(from), b.max(to))));
                    }
                }
                Sent::Gone => {
                    forget_bob(shared, &tx);
                    break;
                }
                Sent::Stopped => return false,
            }
        }
    }
    true
}

/// The time span of a batch's tags and gaps, if it has any.
fn batch_span(b: &pb::TagBatch) -> Option<(u64, u64)> {
    let mut records = Vec::new();
    crate::tagwire::decode_batch(b, &mut records).ok()?;
    let first = records.first()?.time_ps();
    let last = records
        .iter()
        .map(|r| match *r {
            qkd_timetag::tags::Record::Gap { to_ps, .. } => to_ps,
            other => other.time_ps(),
        })
        .max()?;
    Some((first, last))
}

/// Removes the transmitter's subscriber whose stream is gone (unless replaced meanwhile).
pub(super) fn forget_alice(shared: &Shared, tx: &mpsc::Sender<Result<pb::TransmitterEvent, Status>>) {
    let mut st = shared.lock();
    if st.alice.as_ref().is_some_and(|s| s.tx.same_channel(tx)) {
        tracing::info!("emulator: transmitter subscriber gone");
        st.alice = None;
    }
}

/// Removes the receiver's subscriber whose stream is gone (unless replaced meanwhile).
pub(super) fn forget_bob(shared: &Shared, tx: &mpsc::Sender<Result<pb::TagBatch, Status>>) {
    let mut st = shared.lock();
    if st.bob.as_ref().is_some_and(|s| s.tx.same_channel(tx)) {
        tracing::info!("emulator: receiver subscriber gone");
        st.bob = None;
    }
}
