//! Canonical transcripts of a block's rounds.
//!
//! prost encodes a message deterministically (fields in tag order, no unknown fields), so the
//! exact bytes of each request and answer are the same at both ends. Both sides absorb them in
//! the same order, each part length-prefixed; the Wegman-Carter tags ([`crate::auth`]) are
//! computed over these bytes directly (never over a digest of them, which would make the
//! authentication only computationally secure).

use prost::Message;

use crate::auth::MAX_TRANSCRIPT_BYTES;

/// The bytes of a block's rounds so far.
#[derive(Clone, Default)]
pub struct Transcript {
    bytes: Vec<u8>,
}

impl Transcript {
    /// Absorbs one round: the method name, the request and the answer, each length-prefixed
    /// (64-bit big endian).
    pub fn absorb(&mut self, method: &str, request: &impl Message, answer: &impl Message) {
        for part in [method.as_bytes(), &request.encode_to_vec(), &answer.encode_to_vec()] {
            self.bytes.extend_from_slice(&(part.len() as u64).to_be_bytes());
            self.bytes.extend_from_slice(part);
        }
    }

    /// The transcript so far.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// True when the transcript is longer than the authentication bound allows
    /// ([`MAX_TRANSCRIPT_BYTES`]): the block is then aborted rather than authenticated.
    pub fn too_long(&self) -> bool {
        self.bytes.len() as u64 > MAX_TRANSCRIPT_BYTES
    }
}
