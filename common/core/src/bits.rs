//! Packed bit strings: the representation of sifted, corrected and final key material.

use zeroize::{Zeroize, ZeroizeOnDrop};

/// A string of bits packed 64 to a word, bit `i` at `words[i / 64] >> (i % 64)`.
///
/// Key material lives in this type, so its memory is wiped on drop. Bits past `len` in the last
/// word are always zero (every mutator keeps this invariant), which lets whole-word operations
/// such as [`BitVec::count_ones`] ignore the tail.
#[derive(Clone, Default, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct BitVec {
    words: Vec<u64>,
    len: usize,
}

impl std::fmt::Debug for BitVec {
    /// Never prints the bits: a `BitVec` may hold key material.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BitVec({} bits)", self.len)
    }
}

impl BitVec {
    /// An empty bit string.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty bit string with room for `n_bits` bits.
    pub fn with_capacity(n_bits: usize) -> Self {
        Self { words: Vec::with_capacity(n_bits.div_ceil(64)), len: 0 }
    }

    /// `n_bits` zero bits.
    pub fn zeros(n_bits: usize) -> Self {
        Self { words: vec![0; n_bits.div_ceil(64)], len: n_bits }
    }

    /// Builds a bit string from packed words; bits past `n_bits` are cleared.
    pub fn from_words(mut words: Vec<u64>, n_bits: usize) -> Self {
        words.resize(n_bits.div_ceil(64), 0);
        let mut bits = Self { words, len: n_bits };
        bits.clear_tail();
        bits
    }

    /// Builds a bit string from bytes, bit `i` being bit `i % 8` (LSB first) of byte `i / 8`.
    pub fn from_bytes(bytes: &[u8], n_bits: usize) -> Self {
        let mut words = vec![0u64; n_bits.div_ceil(64)];
        for (i, byte) in bytes.iter().enumerate().take(n_bits.div_ceil(8)) {
            words[i / 8] |= u64::from(*byte) << (8 * (i % 8));
        }
        Self::from_words(words, n_bits)
    }

    /// The bits as bytes, LSB first, the last byte zero-padded.
    pub fn to_bytes(&self) -> Vec<u8> {
        let n_bytes = self.len.div_ceil(8);
        let mut out = Vec::with_capacity(n_bytes);
        for i in 0..n_bytes {
            out.push((self.words[i / 8] >> (8 * (i % 8))) as u8);
        }
        out
    }

    /// Builds a bit string from one `bool` per bit.
    pub fn from_bools(bools: &[bool]) -> Self {
        let mut bits = Self::with_capacity(bools.len());
        for &b in bools {
            bits.push(b);
        }
        bits
    }

    /// One `bool` per bit.
    pub fn to_bools(&self) -> Vec<bool> {
        (0..self.len).map(|i| self.get(i)).collect()
    }

    /// Number of bits.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when there are no bits.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The packed words (bits past `len` are zero).
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Bit `i`. Panics when `i >= len`, like slice indexing.
    #[inline]
    pub fn get(&self, i: usize) -> bool {
        assert!(i < self.len, "bit index {i} out of range for {} bits", self.len);
        (self.words[i / 64] >> (i % 64)) & 1 == 1
    }

    /// Sets bit `i` to `value`.
    #[inline]
    pub fn set(&mut self, i: usize, value: bool) {
        assert!(i < self.len, "bit index {i} out of range for {} bits", self.len);
        let mask = 1u64 << (i % 64);
        if value {
            self.words[i / 64] |= mask;
        } else {
            self.words[i / 64] &= !mask;
        }
    }

    /// Flips bit `i`.
    #[inline]
    pub fn flip(&mut self, i: usize) {
        assert!(i < self.len, "bit index {i} out of range for {} bits", self.len);
        self.words[i / 64] ^= 1u64 << (i % 64);
    }

    /// Appends one bit.
    #[inline]
    pub fn push(&mut self, value: bool) {
        if self.len.is_multiple_of(64) {
            self.words.push(0);
        }
        if value {
            self.words[self.len / 64] |= 1u64 << (self.len % 64);
        }
        self.len += 1;
    }

    /// Appends all bits of `other`.
    pub fn extend_from(&mut self, other: &BitVec) {
        if self.len.is_multiple_of(64) {
            self.words.extend_from_slice(&other.words);
            self.len += other.len;
            return;
        }
        for i in 0..other.len {
            self.push(other.get(i));
        }
    }

    /// Removes and returns the first `n_bits` bits; the rest stays, shifted to the front.
    pub fn split_off_front(&mut self, n_bits: usize) -> BitVec {
        assert!(n_bits <= self.len, "cannot split {n_bits} bits off {} bits", self.len);
        let front = self.slice(0, n_bits);
        let back = self.slice(n_bits, self.len);
        self.zeroize();
        *self = back;
        front
    }

    /// Copy of bits `start..end`.
    pub fn slice(&self, start: usize, end: usize) -> BitVec {
        assert!(start <= end && end <= self.len, "bad slice {start}..{end} of {} bits", self.len);
        let n = end - start;
        let mut words = vec![0u64; n.div_ceil(64)];
        let shift = start % 64;
        let first = start / 64;
        for (k, w) in words.iter_mut().enumerate() {
            let lo = self.words.get(first + k).copied().unwrap_or(0) >> shift;
            let hi = if shift == 0 { 0 } else { self.words.get(first + k + 1).copied().unwrap_or(0) << (64 - shift) };
            *w = lo | hi;
        }
        BitVec::from_words(words, n)
    }

    /// Number of one bits.
    pub fn count_ones(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Parity (XOR) of bits `start..end`.
    pub fn parity_range(&self, start: usize, end: usize) -> bool {
        assert!(start <= end && end <= self.len, "bad range {start}..{end} of {} bits", self.len);
        if start == end {
            return false;
        }
        let (first, last) = (start / 64, (end - 1) / 64);
        let mut acc = 0u64;
        for (k, &w) in self.words[first..=last].iter().enumerate() {
            let mut w = w;
            if k == 0 {
                w &= u64::MAX << (start % 64);
            }
            if first + k == last {
                let top = end - last * 64;
                if top < 64 {
                    w &= (1u64 << top) - 1;
                }
            }
            acc ^= w;
        }
        acc.count_ones() % 2 == 1
    }

    /// Number of positions where `self` and `other` differ. Panics on different lengths.
    pub fn hamming_distance(&self, other: &BitVec) -> u64 {
        assert_eq!(self.len, other.len, "hamming distance of different lengths");
        self.words.iter().zip(&other.words).map(|(a, b)| u64::from((a ^ b).count_ones())).sum()
    }

    fn clear_tail(&mut self) {
        let rem = self.len % 64;
        if rem != 0
            && let Some(last) = self.words.last_mut()
        {
            *last &= (1u64 << rem) - 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn slice_and_parity_match_bitwise(bools in proptest::collection::vec(any::<bool>(), 0..300), a in 0usize..300, b in 0usize..300) {
            let bits = BitVec::from_bools(&bools);
            let (start, end) = (a.min(b).min(bools.len()), a.max(b).min(bools.len()));
            let slice = bits.slice(start, end);
            prop_assert_eq!(slice.len(), end - start);
            for (i, &bit) in bools.iter().enumerate().take(end).skip(start) {
                prop_assert_eq!(slice.get(i - start), bit);
            }
            let parity = bools[start..end].iter().filter(|&&x| x).count() % 2 == 1;
            prop_assert_eq!(bits.parity_range(start, end), parity);
        }

        #[test]
        fn bytes_round_trip(bools in proptest::collection::vec(any::<bool>(), 0..200)) {
            let bits = BitVec::from_bools(&bools);
            prop_assert_eq!(BitVec::from_bytes(&bits.to_bytes(), bools.len()), bits);
        }

        #[test]
        fn split_off_front_keeps_order(bools in proptest::collection::vec(any::<bool>(), 0..200), k in 0usize..200) {
            let k = k.min(bools.len());
            let mut bits = BitVec::from_bools(&bools);
            let front = bits.split_off_front(k);
            prop_assert_eq!(front, BitVec::from_bools(&bools[..k]));
            prop_assert_eq!(bits, BitVec::from_bools(&bools[k..]));
        }
    }
}
