//! Bob's decoder: layered normalized min-sum (scaling [`MIN_SUM_SCALE`]) on the LLRs of his
//! bits, ln((1 - Q) / Q) with his QBER estimate Q; the syndrome bit of a check flips the sign of
//! its messages. A layer is one base row: its z checks touch disjoint bits, and each base
//! entry's bits are a rotated contiguous run, so the update runs over contiguous arrays of length
//! z (which the compiler vectorizes). Decoding stops as soon as the hard decisions satisfy the
//! syndrome, or when the number of unsatisfied checks has not improved for a dozen iterations
//! (the frame then needs more reveals, and the next attempt continues from the current messages
//! instead of starting over).

use super::code::LdpcCode;
use crate::bits::BitVec;

/// Scaling of the normalized min-sum check-node update.
pub const MIN_SUM_SCALE: f32 = 0.8;

/// Maximum decoding iterations per attempt.
pub const MAX_ITERATIONS: u32 = 60;

/// Largest magnitude of an LLR (known bits get it; keeps sums finite).
pub(super) const LLR_CAP: f32 = 1.0e4;

/// Iterations without a new best count of unsatisfied checks after which an attempt gives up
/// (it would only burn time: the frame needs more reveals).
const STALL_ITERATIONS: u32 = 12;

/// The state of layered normalized min-sum decoding: posterior LLRs and check-to-bit messages,
/// kept across attempts so that a reveal continues from where the last attempt stopped (the
/// posterior of a revealed bit moves by the change of its channel LLR, which keeps
/// posterior = channel + incoming messages exact).
pub(super) struct Decoder {
    z: usize,
    posterior: Vec<f32>,
    /// Check-to-bit messages, per base entry (row-major) and lifted check.
    messages: Vec<f32>,
    /// Syndrome bit per check, as 0 or 1.
    syndrome: Vec<u8>,
    /// Scratch: incoming messages of a layer, per entry and lifted check.
    incoming: Vec<f32>,
    min1: Vec<f32>,
    min2: Vec<f32>,
    argmin: Vec<f32>,
    parity: Vec<f32>,
    /// Hard decisions (0/1 per code bit) after the last iteration.
    pub(super) hard: Vec<u8>,
    check_scratch: Vec<u8>,
    scale: f32,
}

impl Decoder {
    /// The decoder of `code` for the channel LLRs `channel` (one per code bit) and Alice's
    /// `syndrome`, before any iteration.
    pub(super) fn new(code: &LdpcCode, channel: &[f32], syndrome: &BitVec) -> Self {
        let z = code.z;
        let n_entries: usize = code.rows.iter().map(Vec::len).sum();
        let max_weight = code.rows.iter().map(Vec::len).max().unwrap_or(0);
        Self {
            z,
            posterior: channel.to_vec(),
            messages: vec![0f32; n_entries * z],
            syndrome: (0..code.n_checks()).map(|i| u8::from(syndrome.get(i))).collect(),
            incoming: vec![0f32; max_weight * z],
            min1: vec![0f32; z],
            min2: vec![0f32; z],
            argmin: vec![0f32; z],
            parity: vec![0f32; z],
            hard: vec![0u8; channel.len()],
            check_scratch: vec![0u8; z],
            scale: MIN_SUM_SCALE,
        }
    }

    /// Changes the channel LLR of bit `position` from `old` to `new`.
    pub(super) fn update_channel(&mut self, position: usize, old: f32, new: f32) {
        self.posterior[position] = (self.posterior[position] - old + new).clamp(-LLR_CAP, LLR_CAP);
    }

    /// Runs up to `max_iterations` iterations; stops when the hard decisions satisfy the
    /// syndrome (returns true) or when the number of unsatisfied checks has not improved for
    /// [`STALL_ITERATIONS`]. Returns (satisfied, iterations run).
    pub(super) fn run(&mut self, code: &LdpcCode, max_iterations: u32) -> (bool, u32) {
        let mut best = usize::MAX;
        let mut since_best = 0;
        for iteration in 1..=max_iterations {
            self.iterate(code);
            let unsatisfied = self.unsatisfied_checks(code);
            if unsatisfied == 0 {
                return (true, iteration);
            }
            if unsatisfied < best {
                best = unsatisfied;
                since_best = 0;
            } else {
                since_best += 1;
                if since_best >= STALL_ITERATIONS {
                    return (false, iteration);
                }
            }
        }
        (false, max_iterations)
    }

    /// One layered iteration over every base row. Signs are carried as floats (0.0 or 1.0,
    /// combined by addition modulo 2 through `abs(a - b)`) so that every loop is a plain
    /// element-wise loop over z values, which the compiler vectorizes.
    fn iterate(&mut self, code: &LdpcCode) {
        let z = self.z;
        let mut entry_base = 0;
        for (r, entries) in code.rows.iter().enumerate() {
            self.min1.fill(f32::MAX);
            self.min2.fill(f32::MAX);
            self.argmin.fill(0.0);
            for (p, &s) in self.parity.iter_mut().zip(&self.syndrome[r * z..(r + 1) * z]) {
                *p = f32::from(s);
            }
            for (k, &(c, shift)) in entries.iter().enumerate() {
                let column = &self.posterior[c as usize * z..(c as usize + 1) * z];
                let message = &self.messages[(entry_base + k) * z..(entry_base + k + 1) * z];
                let t = &mut self.incoming[k * z..(k + 1) * z];
                rotate_into(column, shift as usize, t);
                min_pass(t, message, &mut self.min1, &mut self.min2, &mut self.argmin, &mut self.parity, k as f32);
            }
            for (k, &(c, shift)) in entries.iter().enumerate() {
                let t = &mut self.incoming[k * z..(k + 1) * z];
                let message = &mut self.messages[(entry_base + k) * z..(entry_base + k + 1) * z];
                update_pass(t, message, &self.min1, &self.min2, &self.argmin, &self.parity, k as f32, self.scale);
                let column = &mut self.posterior[c as usize * z..(c as usize + 1) * z];
                rotate_back(t, shift as usize, column);
            }
            entry_base += entries.len();
        }
        for (h, &l) in self.hard.iter_mut().zip(&self.posterior) {
            *h = u8::from(l < 0.0);
        }
    }

    /// Number of checks whose hard-decision parity differs from the syndrome.
    fn unsatisfied_checks(&mut self, code: &LdpcCode) -> usize {
        let z = self.z;
        let mut count = 0;
        for (r, entries) in code.rows.iter().enumerate() {
            let acc = &mut self.check_scratch;
            acc.copy_from_slice(&self.syndrome[r * z..(r + 1) * z]);
            for &(c, shift) in entries {
                let column = &self.hard[c as usize * z..(c as usize + 1) * z];
                let s = shift as usize;
                for (a, &b) in acc[..z - s].iter_mut().zip(&column[s..]) {
                    *a ^= b;
                }
                for (a, &b) in acc[z - s..].iter_mut().zip(&column[..s]) {
                    *a ^= b;
                }
            }
            count += acc.iter().map(|&x| usize::from(x)).sum::<usize>();
        }
        count
    }
}

/// The first half of a layer's check update for one entry (bit-to-check messages `t` minus the
/// old messages, running minimum, second minimum, its entry and the sign parity), written over
/// equal-length slices so that the loop vectorizes.
#[inline]
#[allow(clippy::too_many_arguments)]
fn min_pass(
    t: &mut [f32],
    message: &[f32],
    min1: &mut [f32],
    min2: &mut [f32],
    argmin: &mut [f32],
    parity: &mut [f32],
    k: f32,
) {
    let n = t.len();
    let (message, min1, min2, argmin, parity) =
        (&message[..n], &mut min1[..n], &mut min2[..n], &mut argmin[..n], &mut parity[..n]);
    for i in 0..n {
        let v = t[i] - message[i];
        t[i] = v;
        let a = v.abs();
        let (m1, m2) = (min1[i], min2[i]);
        // Branch-free: min2 = min(min2, max(min1, a)), min1 = min(min1, a), and argmin moves to
        // k exactly when a is below the old min1 (selects written so that they map to the
        // vector min/max instructions).
        let below = if a < m1 { 1.0 } else { 0.0 };
        let high = if m1 > a { m1 } else { a };
        min2[i] = if high < m2 { high } else { m2 };
        min1[i] = if a < m1 { a } else { m1 };
        let old = argmin[i];
        argmin[i] = old + (k - old) * below;
        let negative = if v < 0.0 { 1.0 } else { 0.0 };
        parity[i] = (parity[i] - negative).abs();
    }
}

/// The second half of a layer's check update for one entry: the new check-to-bit messages
/// (scaled minimum of the other entries, sign of the others' parity) and the updated bit
/// LLRs in `t`.
#[inline]
#[allow(clippy::too_many_arguments)]
fn update_pass(
    t: &mut [f32],
    message: &mut [f32],
    min1: &[f32],
    min2: &[f32],
    argmin: &[f32],
    parity: &[f32],
    k: f32,
    scale: f32,
) {
    let n = t.len();
    let (message, min1, min2, argmin, parity) = (&mut message[..n], &min1[..n], &min2[..n], &argmin[..n], &parity[..n]);
    for i in 0..n {
        // argmin and k are small integers held as floats: equal exactly when within 0.5.
        let d = argmin[i] - k;
        let magnitude = scale * if d * d < 0.25 { min2[i] } else { min1[i] };
        let negative = if t[i] < 0.0 { 1.0 } else { 0.0 };
        // The sign of the other bits' product (and of the syndrome bit).
        let value = if (parity[i] - negative).abs() > 0.5 { -magnitude } else { magnitude };
        message[i] = value;
        // Written out rather than `clamp`, whose NaN handling keeps the loop from vectorizing.
        let sum = t[i] + value;
        #[allow(clippy::manual_clamp)]
        let bounded = if sum > LLR_CAP {
            LLR_CAP
        } else if sum < -LLR_CAP {
            -LLR_CAP
        } else {
            sum
        };
        t[i] = bounded;
    }
}

/// `out[i] = column[(i + s) mod z]`.
#[inline]
fn rotate_into(column: &[f32], s: usize, out: &mut [f32]) {
    let z = column.len();
    out[..z - s].copy_from_slice(&column[s..]);
    out[z - s..].copy_from_slice(&column[..s]);
}

/// `column[(i + s) mod z] = t[i]` (the inverse of [`rotate_into`]).
#[inline]
fn rotate_back(t: &[f32], s: usize, column: &mut [f32]) {
    let z = column.len();
    column[s..].copy_from_slice(&t[..z - s]);
    column[..s].copy_from_slice(&t[z - s..]);
}
