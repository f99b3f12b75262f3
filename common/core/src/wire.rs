//! Compact encodings shared by the fibre and the classical channel: LEB128 varints of the
//! gaps between ascending pulse indices.

/// Errors decoding compact encodings from the network.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    /// A varint runs past the end of its buffer or past 64 bits.
    #[error("malformed varint at byte {0}")]
    Varint(usize),
    /// An index lies outside the frame it belongs to.
    #[error("pulse index {index} outside a frame of {n_pulses} pulses")]
    OutOfFrame {
        /// The offending index.
        index: u64,
        /// The frame length.
        n_pulses: u64,
    },
    /// Two parallel arrays disagree in length.
    #[error("{what}: expected {expected} entries, got {got}")]
    Length {
        /// Which field.
        what: &'static str,
        /// Entries expected.
        expected: usize,
        /// Entries present.
        got: usize,
    },
    /// A code byte has no meaning.
    #[error("invalid {what} code {code}")]
    Code {
        /// Which field.
        what: &'static str,
        /// The byte.
        code: u8,
    },
}

/// Appends `value` as an LEB128 varint.
pub fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Encodes ascending indices as varints of their gaps (the first gap is from 0).
pub fn encode_deltas(indices: impl IntoIterator<Item = u64>) -> Vec<u8> {
    let mut out = Vec::new();
    let mut prev = 0u64;
    for index in indices {
        put_varint(&mut out, index - prev);
        prev = index;
    }
    out
}

/// Decodes [`encode_deltas`], checking every index is below `n_pulses` and ascending.
pub fn decode_deltas(bytes: &[u8], n_pulses: u64) -> Result<Vec<u64>, WireError> {
    // Every varint takes at least one byte; gaps below 128 (most of them, in dense frames) take
    // exactly one.
    let mut out = Vec::with_capacity(bytes.len());
    let (mut pos, mut prev) = (0usize, 0u64);
    while let Some(&first) = bytes.get(pos) {
        pos += 1;
        let mut value = u64::from(first & 0x7f);
        if first & 0x80 != 0 {
            let mut shift = 7u32;
            loop {
                let byte = *bytes.get(pos).ok_or(WireError::Varint(pos))?;
                if shift > 63 {
                    return Err(WireError::Varint(pos));
                }
                value |= u64::from(byte & 0x7f) << shift;
                pos += 1;
                if byte & 0x80 == 0 {
                    break;
                }
                shift += 7;
            }
        }
        let index = prev.checked_add(value).ok_or(WireError::Varint(pos))?;
        if index >= n_pulses {
            return Err(WireError::OutOfFrame { index, n_pulses });
        }
        out.push(index);
        prev = index;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn deltas_round_trip(mut v in proptest::collection::vec(0u64..1 << 40, 0..200)) {
            v.sort_unstable();
            prop_assert_eq!(decode_deltas(&encode_deltas(v.iter().copied()), 1 << 40).unwrap(), v);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_deltas(&bytes, u64::MAX);
        }
    }

    #[test]
    fn index_outside_frame_is_refused() {
        assert_eq!(decode_deltas(&encode_deltas([5]), 5), Err(WireError::OutOfFrame { index: 5, n_pulses: 5 }));
    }
}
