//! The two ends of the blind protocol: Alice sends the syndrome of her key with the adaptation
//! bits punctured or shortened and reveals punctured bits on request; Bob decodes and asks for
//! reveals while decoding fails. Both count the leak alike (see "Leak accounting" in the parent
//! module's documentation).

use rand::Rng;

use super::LdpcError;
use super::code::LdpcCode;
use super::decoder::{Decoder, LLR_CAP, MAX_ITERATIONS};
use crate::bits::BitVec;

/// Alice's end: encodes her key once (syndrome), then reveals punctured bits on request.
pub struct LdpcAlice {
    syndrome: BitVec,
    /// Values of the adaptation bits, in reveal order.
    adaptation: Vec<bool>,
    /// Adaptation bits that were punctured at the start (the rest were shortened).
    n_punctured: usize,
    /// Punctured bits revealed so far.
    n_revealed: usize,
    leak_bits: u64,
}

impl LdpcAlice {
    /// Alice's end for `key` under `code`, with the first `n_punctured` adaptation bits punctured
    /// (fresh random bits from `rng`, which must be a cryptographic generator outside tests) and
    /// the others shortened (zeros, known to Bob). The leak starts at m - p (see the module
    /// documentation).
    ///
    /// A `key` shorter than the code's keys is completed with zeros, shortened bits that Bob
    /// knows (he must be given a key of the same length).
    pub fn new(code: &LdpcCode, key: &BitVec, n_punctured: usize, rng: &mut impl Rng) -> Result<Self, LdpcError> {
        if key.len() > code.key_bits() {
            return Err(LdpcError::KeyLength { expected: code.key_bits(), got: key.len() });
        }
        let n_punctured = n_punctured.min(code.n_adaptation());
        let mut word = vec![0u8; code.n_bits()];
        for i in 0..key.len() {
            word[code.key_position(i)] = u8::from(key.get(i));
        }
        let adaptation: Vec<bool> = (0..code.n_adaptation()).map(|j| j < n_punctured && rng.random()).collect();
        for (j, &bit) in adaptation.iter().enumerate() {
            word[code.adapt_position(j)] = u8::from(bit);
        }
        let syndrome = code.syndrome_of(&word);
        word.fill(0);
        Ok(Self { syndrome, adaptation, n_punctured, n_revealed: 0, leak_bits: code.leak_with_punctured(n_punctured) })
    }

    /// The syndrome to send to Bob (m bits).
    pub fn syndrome(&self) -> &BitVec {
        &self.syndrome
    }

    /// Number of adaptation bits punctured at the start (Bob must know it: it is part of the
    /// message with the syndrome).
    pub fn n_punctured(&self) -> usize {
        self.n_punctured
    }

    /// Reveals the values of the next `count` punctured bits (in reveal order); each counts one
    /// bit of leak.
    pub fn reveal(&mut self, count: usize) -> Result<Vec<bool>, LdpcError> {
        let remaining = self.n_punctured - self.n_revealed;
        if count > remaining {
            return Err(LdpcError::NothingToReveal { asked: count, remaining });
        }
        let start = self.n_revealed;
        self.n_revealed += count;
        self.leak_bits += count as u64;
        Ok(self.adaptation[start..start + count].to_vec())
    }

    /// Punctured bits not revealed yet.
    pub fn remaining_punctured(&self) -> usize {
        self.n_punctured - self.n_revealed
    }

    /// Bits disclosed so far: m - p + revealed.
    pub fn leak_bits(&self) -> u64 {
        self.leak_bits
    }
}

/// What Bob's decoding attempt gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LdpcStep {
    /// The hard decisions satisfy the syndrome: call [`LdpcBob::finish`].
    Decoded,
    /// Decoding failed: ask Alice to reveal this many more punctured bits, then
    /// [`LdpcBob::receive_revealed`] and [`LdpcBob::decode`] again.
    NeedReveal(usize),
    /// Decoding failed and nothing is left to reveal: the frame fails (verification would
    /// reject it anyway).
    Failed,
}

/// The result of a reconciliation at Bob's end.
#[derive(Debug, Clone)]
pub struct LdpcOutcome {
    /// Bob's corrected key (equal to Alice's unless decoding failed or converged to another word,
    /// which verification catches).
    pub key: BitVec,
    /// Bits disclosed: m - p + revealed, equal to what Alice counted.
    pub leak_bits: u64,
    /// Whether the last attempt satisfied the syndrome.
    pub decoded: bool,
    /// Number of messages from Alice: the syndrome plus one per reveal.
    pub messages: u32,
    /// Decoding iterations over all attempts.
    pub iterations: u32,
}

/// Bob's end: decodes, asking for punctured bits while decoding fails.
pub struct LdpcBob<'a> {
    code: &'a LdpcCode,
    /// Length of Bob's key (the code's key bits beyond it are known zeros).
    n_key_bits: usize,
    /// Channel LLR per code bit (positive: 0 more likely).
    channel: Vec<f32>,
    n_punctured: usize,
    n_revealed: usize,
    /// Punctured bits revealed per request.
    reveal_step: usize,
    outstanding: Option<usize>,
    decoder: Decoder,
    decoded: bool,
    leak_bits: u64,
    messages: u32,
    iterations: u32,
}

impl<'a> LdpcBob<'a> {
    /// Bob's end for his `noisy_key`, his QBER estimate (fraction) for the LLRs, Alice's syndrome
    /// and her number of punctured bits. Reveals come in `n_reveal_steps` equal steps. A key
    /// shorter than the code's keys is completed with known zeros, as Alice's is.
    pub fn new(
        code: &'a LdpcCode,
        noisy_key: &BitVec,
        qber_estimate: f64,
        syndrome: BitVec,
        n_punctured: usize,
        n_reveal_steps: usize,
    ) -> Result<Self, LdpcError> {
        if noisy_key.len() > code.key_bits() {
            return Err(LdpcError::KeyLength { expected: code.key_bits(), got: noisy_key.len() });
        }
        if syndrome.len() != code.n_checks() {
            return Err(LdpcError::SyndromeLength { expected: code.n_checks(), got: syndrome.len() });
        }
        let q = if qber_estimate.is_nan() { 0.05 } else { qber_estimate.clamp(1e-4, 0.45) };
        let llr = ((1.0 - q) / q).ln() as f32;
        let mut channel = vec![0f32; code.n_bits()];
        for i in 0..noisy_key.len() {
            channel[code.key_position(i)] = if noisy_key.get(i) { -llr } else { llr };
        }
        for i in noisy_key.len()..code.key_bits() {
            channel[code.key_position(i)] = LLR_CAP;
        }
        for position in code.padding_positions() {
            channel[position] = LLR_CAP;
        }
        let n_punctured = n_punctured.min(code.n_adaptation());
        for j in n_punctured..code.n_adaptation() {
            channel[code.adapt_position(j)] = LLR_CAP;
        }
        Ok(Self {
            code,
            decoder: Decoder::new(code, &channel, &syndrome),
            channel,
            n_punctured,
            n_revealed: 0,
            reveal_step: n_punctured.div_ceil(n_reveal_steps.max(1)).max(1),
            outstanding: None,
            decoded: false,
            n_key_bits: noisy_key.len(),
            leak_bits: code.leak_with_punctured(n_punctured),
            messages: 1,
            iterations: 0,
        })
    }

    /// One decoding attempt (up to [`MAX_ITERATIONS`] layered iterations, fewer when it stalls),
    /// continuing from the previous attempt's messages.
    pub fn decode(&mut self) -> LdpcStep {
        let (ok, iterations) = self.decoder.run(self.code, MAX_ITERATIONS);
        self.iterations += iterations;
        self.decoded = ok;
        if ok {
            return LdpcStep::Decoded;
        }
        let remaining = self.n_punctured - self.n_revealed;
        if remaining == 0 {
            return LdpcStep::Failed;
        }
        let count = self.reveal_step.min(remaining);
        self.outstanding = Some(count);
        LdpcStep::NeedReveal(count)
    }

    /// Takes the values Alice revealed for the outstanding request.
    pub fn receive_revealed(&mut self, values: &[bool]) -> Result<(), LdpcError> {
        let Some(expected) = self.outstanding.take() else {
            return Err(LdpcError::RevealCount { expected: 0, got: values.len() });
        };
        if values.len() != expected {
            self.outstanding = Some(expected);
            return Err(LdpcError::RevealCount { expected, got: values.len() });
        }
        for (k, &bit) in values.iter().enumerate() {
            let position = self.code.adapt_position(self.n_revealed + k);
            let new = if bit { -LLR_CAP } else { LLR_CAP };
            self.decoder.update_channel(position, self.channel[position], new);
            self.channel[position] = new;
        }
        self.n_revealed += expected;
        self.leak_bits += expected as u64;
        self.messages += 1;
        Ok(())
    }

    /// Bits disclosed so far (m - p + revealed).
    pub fn leak_bits(&self) -> u64 {
        self.leak_bits
    }

    /// Bob's key (his last hard decisions) and counters.
    pub fn finish(self) -> LdpcOutcome {
        let mut key = BitVec::zeros(self.n_key_bits);
        for i in 0..self.n_key_bits {
            if self.decoder.hard[self.code.key_position(i)] == 1 {
                key.set(i, true);
            }
        }
        LdpcOutcome {
            key,
            leak_bits: self.leak_bits,
            decoded: self.decoded,
            messages: self.messages,
            iterations: self.iterations,
        }
    }
}
