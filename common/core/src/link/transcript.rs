//! Canonical transcripts of a block's rounds.
//!
//! prost encodes a message deterministically (fields in tag order, no unknown fields), so the
//! exact bytes of each request and answer are the same at both ends. Both sides absorb them in
//! the same order; at the commit Bob sends his digest and Alice refuses a mismatch. An
//! information-theoretic Wegman-Carter tag over the same bytes can later replace the digest
//! comparison without changing the protocol's shape.

use prost::Message;
use sha2::{Digest, Sha256};

/// A running SHA-256 over a block's messages.
#[derive(Clone, Default)]
pub struct Transcript {
    hasher: Sha256,
}

impl Transcript {
    /// Absorbs one round: the method name, the request and the answer, each length-prefixed.
    pub fn absorb(&mut self, method: &str, request: &impl Message, answer: &impl Message) {
        for part in [method.as_bytes(), &request.encode_to_vec(), &answer.encode_to_vec()] {
            self.hasher.update((part.len() as u64).to_be_bytes());
            self.hasher.update(part);
        }
    }

    /// The digest so far.
    pub fn digest(&self) -> [u8; 32] {
        self.hasher.clone().finalize().into()
    }
}
