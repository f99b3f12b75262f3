//! The simulated fibre as a byte stream: frames of photons, length-prefixed protobuf.
//!
//! Only Alice's source, Bob's receiver and an eavesdropper use this connection; the classical
//! channel never carries photons. The connection is deliberately unauthenticated and in clear:
//! a physical fibre is too, and anything an eavesdropper can do to photons she can do here.

use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use qkd_core::wire::{WireError, decode_deltas, encode_deltas};
use qkd_sim::{Photon, State};

/// Largest frame accepted from the fibre, in bytes (a 2^22-pulse frame at 0 km is about 10 MB).
pub const MAX_FRAME_BYTES: usize = 64 << 20;

/// Errors on the fibre connection.
#[derive(Debug, thiserror::Error)]
pub enum FibreError {
    /// The connection failed or closed.
    #[error("fibre connection: {0}")]
    Io(#[from] std::io::Error),
    /// A frame does not decode.
    #[error("malformed frame: {0}")]
    Decode(#[from] prost::DecodeError),
    /// A frame's contents are inconsistent.
    #[error("malformed frame: {0}")]
    Wire(#[from] WireError),
    /// A frame exceeds [`MAX_FRAME_BYTES`].
    #[error("frame of {0} bytes exceeds the limit")]
    TooLarge(usize),
}

/// Packs photons into a wire frame.
pub fn encode_frame(frame_idx: u64, n_pulses: u64, photons: &[Photon]) -> proto::fibre::Frame {
    proto::fibre::Frame {
        frame_idx,
        n_pulses,
        pulse_deltas: encode_deltas(photons.iter().map(|p| p.pulse_idx)),
        photons: photons.iter().map(|p| p.state as u8 | if p.two_photons { 4 } else { 0 }).collect(),
    }
}

/// Unpacks a wire frame, validating every field.
pub fn decode_frame(frame: &proto::fibre::Frame) -> Result<Vec<Photon>, WireError> {
    let indices = decode_deltas(&frame.pulse_deltas, frame.n_pulses)?;
    if indices.len() != frame.photons.len() {
        return Err(WireError::Length { what: "photons", expected: indices.len(), got: frame.photons.len() });
    }
    indices
        .into_iter()
        .zip(&frame.photons)
        .map(|(pulse_idx, &code)| {
            let state = State::from_code(code & 3).ok_or(WireError::Code { what: "photon", code })?;
            if code & !7 != 0 {
                return Err(WireError::Code { what: "photon", code });
            }
            Ok(Photon { pulse_idx, state, two_photons: code & 4 != 0 })
        })
        .collect()
}

/// Writes one frame, prefixed by its length (u32, big-endian).
pub async fn write_frame<W: AsyncWriteExt + Unpin>(out: &mut W, frame: &proto::fibre::Frame) -> Result<(), FibreError> {
    let bytes = frame.encode_to_vec();
    out.write_u32(bytes.len() as u32).await?;
    out.write_all(&bytes).await?;
    Ok(())
}

/// Reads one frame; `Ok(None)` when the peer closed the connection between frames.
pub async fn read_frame<R: AsyncReadExt + Unpin>(input: &mut R) -> Result<Option<proto::fibre::Frame>, FibreError> {
    let len = match input.read_u32().await {
        Ok(len) => len as usize,
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    if len > MAX_FRAME_BYTES {
        return Err(FibreError::TooLarge(len));
    }
    let mut bytes = vec![0u8; len];
    input.read_exact(&mut bytes).await?;
    Ok(Some(proto::fibre::Frame::decode(bytes.as_slice())?))
}

/// An intercept-resend eavesdropper on the fibre: accepts the receiver's connection on
/// `listener`, connects to the source at `source_addr`, and measures and resends `fraction` of
/// the photons of every frame (see [`qkd_sim::InterceptResend`]), until `stop`.
pub async fn intercept_resend_tap(
    listener: tokio::net::TcpListener,
    source_addr: String,
    fraction: f64,
    seed: u64,
    stop: tokio_util::sync::CancellationToken,
) {
    use rand::SeedableRng;
    let eve = qkd_sim::InterceptResend { fraction };
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed);
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        let Ok((mut to_bob, bob_addr)) = accepted else { continue };
        let Ok(mut from_alice) = tokio::net::TcpStream::connect(&source_addr).await else {
            tracing::warn!(source = %source_addr, "eve: cannot reach the source");
            continue;
        };
        tracing::info!(receiver = %bob_addr, source = %source_addr, fraction, "eve: on the fibre");
        loop {
            let frame = tokio::select! {
                () = stop.cancelled() => return,
                f = read_frame(&mut from_alice) => f,
            };
            let Ok(Some(frame)) = frame else { break };
            let Ok(mut photons) = decode_frame(&frame) else { break };
            eve.attack(&mut photons, &mut rng);
            if write_frame(&mut to_bob, &encode_frame(frame.frame_idx, frame.n_pulses, &photons)).await.is_err() {
                break;
            }
        }
    }
}
