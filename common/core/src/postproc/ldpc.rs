//! One-way error correction: blind, rate-adaptive reconciliation with quasi-cyclic LDPC codes.
//!
//! An alternative to [`crate::postproc::cascade`] that needs one message from Alice plus a few
//! short follow-ups instead of hundreds of round trips, at a higher leak (see the benchmark).
//!
//! # Codes
//! A quasi-cyclic LDPC code is a base matrix (protograph) of `n_base_rows` x [`BASE_COLUMNS`]
//! entries, each either empty or a z x z circulant permutation (the identity shifted by `shift`):
//! check `r z + i` involves bit `c z + (i + shift) mod z` for every entry (r, c, shift). The
//! lifting size z is the smallest that fits the key and the adaptation bits, so one construction
//! serves frames from 10^4 to 10^6 bits and more. [`LdpcCode::new`] builds the code of a key
//! length and mother rate deterministically (no randomness is shared: both ends build the same
//! public code):
//! * column degrees from an irregular profile (degree-2, degree-3 and high-degree columns, see
//!   [`column_degrees`]), rows as even as possible, placed by a progressive-edge-growth pass over
//!   the base graph (each new edge goes to the least used row among the farthest ones,
//!   Hu, Eleftheriou and Arnold, IEEE Trans. Inf. Theory 51, 386 (2005));
//! * shifts drawn at random under the condition that no 4-cycle appears in the lifted graph
//!   (s1 - s2 + s3 - s4 != 0 mod z around every base rectangle, Fossorier, IEEE Trans. Inf. Theory
//!   50, 1788 (2004)), falling back to the shift with the fewest 4-cycles when z is too small.
//!
//! # Rate adaptation and blind protocol
//! Martinez-Mateo, Elkouss and Martin, "Blind reconciliation", Quantum Inf. Comput. 12, 791
//! (2012), and Elkouss, Martinez-Mateo, Martin, "Untainted puncturing for irregular LDPC codes",
//! IEEE Wireless Commun. Lett. 1, 585 (2012). The word Alice encodes is her key, then `d`
//! *adaptation* bits, then zero padding. The adaptation bits sit on degree-2 base columns with
//! pairwise disjoint checks ("untainted": no check sees two of them). Each is either
//! * punctured: a fresh random bit of Alice's that Bob does not know (his LLR is 0), or
//! * shortened: a bit whose value Bob knows (a zero, for the adaptation bits not punctured at the
//!   start, or a punctured bit Alice has revealed).
//!
//! Alice sends the m-bit syndrome. Bob decodes (layered normalized min-sum); when decoding fails he
//! asks for the values of more punctured bits, which Alice reveals, and decodes again, up to a few
//! times. With more punctured bits the code's rate for the key is higher and the leak smaller, so
//! the protocol starts optimistic and pays only for what the frame needs. [`LdpcFamily`] holds one
//! code per mother rate ([`MOTHER_RATES`]) for a key length; [`LdpcFamily::select`] picks the
//! mother code and the initial puncturing for Bob's QBER estimate and a starting efficiency
//! ([`default_start_efficiency`]).
//!
//! Driving it over the link (Bob drives, as for Cascade): both ends build the family of the block
//! length once; Bob sends (rate index, punctured bits) from `select`; Alice answers with
//! [`LdpcAlice::new`]'s syndrome; Bob runs [`LdpcBob::decode`] and, on
//! [`LdpcStep::NeedReveal`], asks Alice for [`LdpcAlice::reveal`] of that many bits, feeds them
//! to [`LdpcBob::receive_revealed`] and decodes again, until [`LdpcStep::Decoded`] (or
//! [`LdpcStep::Failed`], which aborts the block). The leak for the key-length formula is
//! [`LdpcAlice::leak_bits`], equal to Bob's [`LdpcOutcome::leak_bits`].
//!
//! # Leak accounting
//! The syndrome is H_K k + H_P r, k the key and r the uniformly random punctured bits. Because the
//! punctured columns are untainted, H_P's columns have disjoint supports, so H_P has full column
//! rank p and H_P r is uniform on a p-dimensional subspace: the syndrome tells about k only the
//! coset of H_K k modulo that subspace, m - p bits. Each revealed punctured bit then costs one bit
//! (p decreases). So the leak is exactly m - p_initial + revealed, which [`LdpcAlice`] counts as
//! she sends, and Bob's outcome reports the same number. (Counting all m syndrome bits would also
//! be a valid, looser bound; it would make puncturing useless.) The padding bits are zeros known
//! to both and carry nothing.
//!
//! # Decoding
//! Layered normalized min-sum (scaling [`MIN_SUM_SCALE`]) on the LLRs of Bob's bits,
//! ln((1 - Q) / Q) with his QBER estimate Q; the syndrome bit of a check flips the sign of its
//! messages. A layer is one base row: its z checks touch disjoint bits, and each base entry's bits
//! are a rotated contiguous run, so the update runs over contiguous arrays of length z (which the
//! compiler vectorizes). Decoding stops as soon as the hard decisions satisfy the syndrome, or when
//! the number of unsatisfied checks has not improved for a dozen iterations (the frame then needs
//! more reveals, and the next attempt continues from the current messages instead of starting
//! over). A decoded word that satisfies the syndrome but differs from Alice's (an undetected
//! error, rare) is caught by the verification hash like a Cascade failure.

use std::sync::OnceLock;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use thiserror::Error;

use crate::bits::BitVec;
use crate::postproc::binary_entropy;

/// Number of base-matrix columns; the lifting size z is about (key + adaptation bits) / 256.
pub const BASE_COLUMNS: usize = 256;

/// Mother code rates available (rate of the mother code over all its columns).
pub const MOTHER_RATES: [f64; 12] = [0.40, 0.45, 0.50, 0.55, 0.60, 0.65, 0.70, 0.75, 0.80, 0.85, 0.90, 0.95];

/// Scaling of the normalized min-sum check-node update.
pub const MIN_SUM_SCALE: f32 = 0.8;

/// Maximum decoding iterations per attempt.
pub const MAX_ITERATIONS: u32 = 60;

/// Largest magnitude of an LLR (known bits get it; keeps sums finite).
const LLR_CAP: f32 = 1.0e4;

/// Why an LDPC message was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LdpcError {
    /// The key length does not match the code.
    #[error("key of {got} bits for a code of {expected}-bit keys")]
    KeyLength {
        /// The code's key length, in bits.
        expected: usize,
        /// The key's length, in bits.
        got: usize,
    },
    /// The syndrome length does not match the code.
    #[error("syndrome of {got} bits for a code with {expected} checks")]
    SyndromeLength {
        /// The code's number of checks.
        expected: usize,
        /// The syndrome's length, in bits.
        got: usize,
    },
    /// Bob asked for more punctured bits than remain.
    #[error("{asked} punctured bits requested but only {remaining} remain")]
    NothingToReveal {
        /// Bits requested.
        asked: usize,
        /// Punctured bits not yet revealed.
        remaining: usize,
    },
    /// The revealed values do not match the outstanding request.
    #[error("expected {expected} revealed bits, got {got}")]
    RevealCount {
        /// Bits requested.
        expected: usize,
        /// Bits received.
        got: usize,
    },
}

/// The column degrees of a mother code of rate `rate` over `n_cols` columns and `n_rows` rows:
/// degree-2 columns for 0.9 of the checks (fewer than the checks, so that they form no cycle of
/// their own), 12 % of degree-8 columns at rate 0.5 growing to 20 % of degree 8 plus 12 % of
/// degree 14 at rate 0.9 (high-rate codes have long checks whose messages are weak; the strong
/// messages of high-degree columns start the decoding), degree 3 for the rest. Sorted by degree,
/// low first. Chosen by simulation at 2^14 bits (decoding thresholds f = 1.15 at rate 0.5 to
/// 1.4 at rate 0.9 with layered min-sum); regular degree-3 codes are much worse at high rate
/// (density evolution of (3, 30) on the BSC gives f = 1.53).
pub fn column_degrees(rate: f64, n_cols: usize, n_rows: usize) -> Vec<usize> {
    let rate = rate.clamp(0.05, 0.98);
    // 0 at rate 0.5 and below, 1 at 0.9 and above: the share of high-degree columns grows with
    // the rate, because high-rate codes have long checks whose messages are weak.
    let t = ((rate - 0.5) / 0.4).clamp(0.0, 1.0);
    let deg2_share = 0.9 * (1.0 - rate);
    let (deg_a, share_a) = (8, 0.12 + 0.08 * t);
    let (deg_b, share_b) = (14, 0.12 * t);
    let n_deg2 = ((deg2_share * n_cols as f64) as usize).min(n_rows.saturating_sub(1)).min(n_cols / 2);
    let n_a = ((share_a * n_cols as f64).round() as usize).min(n_cols - n_deg2);
    let n_b = ((share_b * n_cols as f64).round() as usize).min(n_cols - n_deg2 - n_a);
    let n_deg3 = n_cols - n_deg2 - n_a - n_b;
    let mut degrees = vec![2; n_deg2];
    degrees.extend(std::iter::repeat_n(3.min(n_rows), n_deg3));
    degrees.extend(std::iter::repeat_n(deg_a.min(n_rows), n_a));
    degrees.extend(std::iter::repeat_n(deg_b.min(n_rows), n_b));
    degrees
}

/// A quasi-cyclic LDPC code for keys of a given length, with its adaptation columns.
#[derive(Debug, Clone)]
pub struct LdpcCode {
    key_bits: usize,
    z: usize,
    n_rows_base: usize,
    n_cols_base: usize,
    /// Per base row: its entries (base column, shift), by column.
    rows: Vec<Vec<(u32, u32)>>,
    /// Base columns that hold the key, in key order (the last may be partly padding).
    key_cols: Vec<u32>,
    /// Untainted degree-2 base columns holding the adaptation bits, in reveal order.
    adapt_cols: Vec<u32>,
    mother_rate: f64,
}

impl LdpcCode {
    /// The code of mother rate `mother_rate` (one of [`MOTHER_RATES`] or any rate in (0, 1)) for
    /// `key_bits`-bit keys, with adaptation bits worth about `adaptation` of the key (0.1 is a
    /// good choice; fewer at high rates, where degree-2 columns with disjoint checks run out).
    /// Deterministic: both ends build the same code.
    ///
    /// Panics when `key_bits` is 0 or above 2^31.
    pub fn new(key_bits: usize, mother_rate: f64, adaptation: f64) -> Self {
        assert!(key_bits > 0 && key_bits < 1 << 31, "ldpc keys have 1 to 2^31 bits");
        let nb = BASE_COLUMNS;
        let n_rows_base = (((1.0 - mother_rate) * nb as f64).round() as usize).clamp(2, nb - 1);
        let degrees = column_degrees(mother_rate, nb, n_rows_base);
        let mut rng = ChaCha20Rng::seed_from_u64(0x1dbc_0de0 ^ key_bits as u64 ^ ((n_rows_base as u64) << 40));
        let columns = peg_base_graph(&degrees, n_rows_base, &mut rng);
        // Untainted adaptation columns: degree-2 base columns with pairwise disjoint rows.
        let mut used_rows = vec![false; n_rows_base];
        let mut adapt_cols = Vec::new();
        let max_adapt = ((adaptation / (1.0 + adaptation)) * nb as f64).round() as usize;
        for (c, rows) in columns.iter().enumerate() {
            if adapt_cols.len() >= max_adapt {
                break;
            }
            if rows.len() == 2 && rows.iter().all(|&r| !used_rows[r]) {
                rows.iter().for_each(|&r| used_rows[r] = true);
                adapt_cols.push(c as u32);
            }
        }
        let n_key_cols = nb - adapt_cols.len();
        let z = key_bits.div_ceil(n_key_cols);
        let key_cols: Vec<u32> = (0..nb as u32).filter(|c| !adapt_cols.contains(c)).collect();
        let shifts = lift(&columns, n_rows_base, z, &mut rng);
        let mut rows = vec![Vec::new(); n_rows_base];
        for (c, col_rows) in columns.iter().enumerate() {
            for (k, &r) in col_rows.iter().enumerate() {
                rows[r].push((c as u32, shifts[c][k]));
            }
        }
        Self { key_bits, z, n_rows_base, n_cols_base: nb, rows, key_cols, adapt_cols, mother_rate }
    }

    /// Length of the keys this code reconciles, in bits.
    pub fn key_bits(&self) -> usize {
        self.key_bits
    }

    /// Lifting size z.
    pub fn lifting(&self) -> usize {
        self.z
    }

    /// Number of checks, i.e. syndrome bits (m).
    pub fn n_checks(&self) -> usize {
        self.n_rows_base * self.z
    }

    /// Number of code bits (key, adaptation and padding), n_cols = 256 z.
    pub fn n_bits(&self) -> usize {
        self.n_cols_base * self.z
    }

    /// Number of adaptation bits (d).
    pub fn n_adaptation(&self) -> usize {
        self.adapt_cols.len() * self.z
    }

    /// The nominal mother rate.
    pub fn mother_rate(&self) -> f64 {
        self.mother_rate
    }

    /// Number of edges of the lifted graph.
    pub fn n_edges(&self) -> usize {
        self.rows.iter().map(Vec::len).sum::<usize>() * self.z
    }

    /// The leak (bits) when `n_punctured` adaptation bits are punctured: m - p.
    pub fn leak_with_punctured(&self, n_punctured: usize) -> u64 {
        (self.n_checks() - n_punctured.min(self.n_adaptation())) as u64
    }

    /// Code bit of key bit `i`.
    fn key_position(&self, i: usize) -> usize {
        self.key_cols[i / self.z] as usize * self.z + i % self.z
    }

    /// Code bit of adaptation bit `j` (in reveal order).
    fn adapt_position(&self, j: usize) -> usize {
        self.adapt_cols[j / self.z] as usize * self.z + j % self.z
    }

    /// True when code bit `b` is padding (a key column position past the key).
    fn padding_positions(&self) -> impl Iterator<Item = usize> + '_ {
        (self.key_bits..self.key_cols.len() * self.z).map(|i| self.key_position(i))
    }

    /// The syndrome H x of a full code word (one byte, 0 or 1, per code bit).
    fn syndrome_of(&self, word: &[u8]) -> BitVec {
        let z = self.z;
        let mut syndrome = BitVec::zeros(self.n_checks());
        let mut acc = vec![0u8; z];
        for (r, entries) in self.rows.iter().enumerate() {
            acc.fill(0);
            for &(c, shift) in entries {
                let column = &word[c as usize * z..(c as usize + 1) * z];
                let s = shift as usize;
                // acc[i] ^= column[(i + s) mod z].
                for (a, &b) in acc[..z - s].iter_mut().zip(&column[s..]) {
                    *a ^= b;
                }
                for (a, &b) in acc[z - s..].iter_mut().zip(&column[..s]) {
                    *a ^= b;
                }
            }
            for (i, &bit) in acc.iter().enumerate() {
                if bit == 1 {
                    syndrome.set(r * z + i, true);
                }
            }
        }
        syndrome
    }

    /// Number of 4-cycles of the lifted graph: for every two base rows sharing two columns, the
    /// lifted checks where the alternating sum of the four shifts vanishes modulo z (each such
    /// base rectangle with a zero sum closes z 4-cycles).
    pub fn count_four_cycles(&self) -> usize {
        let mut count = 0;
        for r1 in 0..self.n_rows_base {
            for r2 in r1 + 1..self.n_rows_base {
                let shared: Vec<(i64, i64)> = self.rows[r1]
                    .iter()
                    .filter_map(|&(c, s1)| {
                        self.rows[r2].iter().find(|e| e.0 == c).map(|&(_, s2)| (i64::from(s1), i64::from(s2)))
                    })
                    .collect();
                for (i, &(a1, a2)) in shared.iter().enumerate() {
                    for &(b1, b2) in &shared[i + 1..] {
                        if (a1 - b1 + b2 - a2).rem_euclid(self.z as i64) == 0 {
                            count += self.z;
                        }
                    }
                }
            }
        }
        count
    }

    /// Checks that the adaptation columns are untainted (no check sees two adaptation bits) and
    /// that no row holds two entries of one column: the conditions of the leak accounting.
    pub fn adaptation_is_untainted(&self) -> bool {
        let mut seen_rows = vec![0u32; self.n_rows_base];
        for (r, entries) in self.rows.iter().enumerate() {
            let mut cols: Vec<u32> = entries.iter().map(|e| e.0).collect();
            cols.sort_unstable();
            if cols.windows(2).any(|w| w[0] == w[1]) {
                return false;
            }
            seen_rows[r] = entries.iter().filter(|e| self.adapt_cols.contains(&e.0)).count() as u32;
        }
        seen_rows.iter().all(|&n| n <= 1)
    }
}

/// Progressive edge growth over the base graph: for each column (low degree first), each new edge
/// goes to a row not yet reachable from the column within the current tree if there is one (the
/// farthest rows), the least used among them, ties broken at random. Returns each column's rows.
fn peg_base_graph(degrees: &[usize], n_rows: usize, rng: &mut ChaCha20Rng) -> Vec<Vec<usize>> {
    let n_cols = degrees.len();
    let mut col_rows: Vec<Vec<usize>> = vec![Vec::new(); n_cols];
    let mut row_cols: Vec<Vec<usize>> = vec![Vec::new(); n_rows];
    for c in 0..n_cols {
        for _ in 0..degrees[c].min(n_rows) {
            // Breadth-first search from c over the graph so far: rows by depth.
            let mut row_depth = vec![usize::MAX; n_rows];
            let mut col_seen = vec![false; n_cols];
            col_seen[c] = true;
            let mut frontier = vec![c];
            let mut depth = 0;
            while !frontier.is_empty() {
                let mut next = Vec::new();
                for &col in &frontier {
                    for &r in &col_rows[col] {
                        if row_depth[r] == usize::MAX {
                            row_depth[r] = depth;
                            for &c2 in &row_cols[r] {
                                if !col_seen[c2] {
                                    col_seen[c2] = true;
                                    next.push(c2);
                                }
                            }
                        }
                    }
                }
                frontier = next;
                depth += 1;
            }
            // Candidates: unreachable rows if any, else the deepest; never a row already used.
            let far = row_depth.iter().enumerate().filter(|&(r, _)| !col_rows[c].contains(&r));
            let max_depth = far.clone().map(|(_, &d)| d).max().unwrap_or(0);
            let candidates: Vec<usize> = far.filter(|&(_, &d)| d == max_depth).map(|(r, _)| r).collect();
            let min_load = candidates.iter().map(|&r| row_cols[r].len()).min().unwrap_or(0);
            let least: Vec<usize> = candidates.into_iter().filter(|&r| row_cols[r].len() == min_load).collect();
            let r = least[rng.random_range(0..least.len())];
            col_rows[c].push(r);
            row_cols[r].push(c);
        }
    }
    col_rows
}

/// Circulant shifts (per column, per edge in `columns` order) that avoid 4-cycles in the lifted
/// graph where possible: for every pair of rows shared by two columns, the alternating sum of the
/// four shifts must not vanish modulo z.
fn lift(columns: &[Vec<usize>], n_rows: usize, z: usize, rng: &mut ChaCha20Rng) -> Vec<Vec<u32>> {
    const TRIES: usize = 64;
    // shift_at[r][c] for assigned entries.
    let mut shift_at: Vec<Vec<Option<u32>>> = vec![vec![None; columns.len()]; n_rows];
    let mut shifts: Vec<Vec<u32>> = columns.iter().map(|rows| vec![0; rows.len()]).collect();
    for (c, rows) in columns.iter().enumerate() {
        for (k, &r) in rows.iter().enumerate() {
            let mut best = (usize::MAX, 0u32);
            for _ in 0..TRIES {
                let s = rng.random_range(0..z as u32);
                // Count 4-cycles through (r, c) with other assigned entries: rows r2 of column c
                // and columns c2 of row r with (r2, c2) assigned.
                let mut cycles = 0;
                for &r2 in &rows[..k] {
                    let s_r2_c = shift_at[r2][c].expect("earlier edges of the column are assigned");
                    for (c2, s_r_c2) in shift_at[r].iter().enumerate() {
                        let (Some(s_r_c2), Some(s_r2_c2)) = (*s_r_c2, shift_at[r2][c2]) else {
                            continue;
                        };
                        if c2 == c {
                            continue;
                        }
                        let sum = (s as i64 - s_r_c2 as i64 + s_r2_c2 as i64 - s_r2_c as i64).rem_euclid(z as i64);
                        if sum == 0 {
                            cycles += 1;
                        }
                    }
                }
                if cycles < best.0 {
                    best = (cycles, s);
                    if cycles == 0 {
                        break;
                    }
                }
            }
            shifts[c][k] = best.1;
            shift_at[r][c] = Some(best.1);
        }
    }
    shifts
}

/// The codes of every mother rate in [`MOTHER_RATES`] for one key length, built on first use
/// (a construction takes milliseconds to a second, so a link builds its family once).
pub struct LdpcFamily {
    key_bits: usize,
    codes: Vec<OnceLock<LdpcCode>>,
}

impl LdpcFamily {
    /// The family for `key_bits`-bit keys, adaptation bits about 10 % of the key.
    pub fn new(key_bits: usize) -> Self {
        Self { key_bits, codes: MOTHER_RATES.iter().map(|_| OnceLock::new()).collect() }
    }

    /// Length of the keys, in bits.
    pub fn key_bits(&self) -> usize {
        self.key_bits
    }

    /// The code of mother rate `MOTHER_RATES[rate_index]`.
    pub fn code(&self, rate_index: usize) -> &LdpcCode {
        self.codes[rate_index].get_or_init(|| LdpcCode::new(self.key_bits, MOTHER_RATES[rate_index], ADAPTATION))
    }

    /// The start of a blind reconciliation for Bob's QBER estimate (floored at 0.5 %): the
    /// highest-rate mother code that can start at a leak of `start_efficiency` n h(Q) with at
    /// least half its adaptation bits left to reveal, and the number of adaptation bits to
    /// puncture for that start. Returns (rate index, punctured bits).
    pub fn select(&self, qber_estimate: f64, start_efficiency: f64) -> (usize, usize) {
        self.select_for_length(qber_estimate, start_efficiency, self.key_bits)
    }

    /// [`LdpcFamily::select`] for a key of `n_bits` bits (at most the family's length; the
    /// missing bits are shortened, zeros known to both ends): the start leak is
    /// `start_efficiency` n_bits h(Q), so a short last frame pays only for its own bits.
    pub fn select_for_length(&self, qber_estimate: f64, start_efficiency: f64, n_bits: usize) -> (usize, usize) {
        let q = if qber_estimate.is_nan() { 0.005 } else { qber_estimate.clamp(0.005, 0.3) };
        let target = start_efficiency * n_bits.min(self.key_bits) as f64 * binary_entropy(q);
        for index in (0..MOTHER_RATES.len()).rev() {
            let code = self.code(index);
            let (m, d) = (code.n_checks() as f64, code.n_adaptation() as f64);
            if m >= target + 0.5 * d || index == 0 {
                let punctured = (m - target).clamp(0.0, d) as usize;
                return (index, punctured);
            }
        }
        (0, 0)
    }
}

/// A starting efficiency for the blind protocol at QBER `qber` (fraction): a little below the
/// decoding threshold of this module's codes at 2^14 bits (measured: f about 1.4 at Q = 1 %,
/// 1.3 at 2 %, 1.25 at 3 %, 1.2 at 5 %, 1.15 at 8 to 11 %), so that most frames need one or two
/// reveals and few pay for more than they need.
pub fn default_start_efficiency(qber: f64) -> f64 {
    const POINTS: [(f64, f64); 6] =
        [(0.01, 1.30), (0.02, 1.22), (0.03, 1.17), (0.05, 1.12), (0.08, 1.08), (0.11, 1.06)];
    let q = qber.clamp(POINTS[0].0, POINTS[POINTS.len() - 1].0);
    for w in POINTS.windows(2) {
        let ((q0, f0), (q1, f1)) = (w[0], w[1]);
        if q <= q1 {
            return f0 + (f1 - f0) * (q - q0) / (q1 - q0);
        }
    }
    POINTS[POINTS.len() - 1].1
}

/// Adaptation bits per key bit of the codes of an [`LdpcFamily`].
const ADAPTATION: f64 = 0.1;

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

/// Iterations without a new best count of unsatisfied checks after which an attempt gives up
/// (it would only burn time: the frame needs more reveals).
const STALL_ITERATIONS: u32 = 12;

/// The state of layered normalized min-sum decoding: posterior LLRs and check-to-bit messages,
/// kept across attempts so that a reveal continues from where the last attempt stopped (the
/// posterior of a revealed bit moves by the change of its channel LLR, which keeps
/// posterior = channel + incoming messages exact).
struct Decoder {
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
    hard: Vec<u8>,
    check_scratch: Vec<u8>,
    scale: f32,
}

impl Decoder {
    fn new(code: &LdpcCode, channel: &[f32], syndrome: &BitVec) -> Self {
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
    fn update_channel(&mut self, position: usize, old: f32, new: f32) {
        self.posterior[position] = (self.posterior[position] - old + new).clamp(-LLR_CAP, LLR_CAP);
    }

    /// Runs up to `max_iterations` iterations; stops when the hard decisions satisfy the
    /// syndrome (returns true) or when the number of unsatisfied checks has not improved for
    /// [`STALL_ITERATIONS`]. Returns (satisfied, iterations run).
    fn run(&mut self, code: &LdpcCode, max_iterations: u32) -> (bool, u32) {
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

/// Runs both ends in memory (tests, simulation, benches): Alice punctures `n_punctured`
/// adaptation bits; Bob decodes and asks for reveals in `n_reveal_steps` steps.
pub fn reconcile_in_memory(
    code: &LdpcCode,
    alice_key: &BitVec,
    bob_key: &BitVec,
    qber_estimate: f64,
    n_punctured: usize,
    n_reveal_steps: usize,
    rng: &mut impl Rng,
) -> Result<LdpcOutcome, LdpcError> {
    let mut alice = LdpcAlice::new(code, alice_key, n_punctured, rng)?;
    let mut bob =
        LdpcBob::new(code, bob_key, qber_estimate, alice.syndrome().clone(), alice.n_punctured(), n_reveal_steps)?;
    loop {
        match bob.decode() {
            LdpcStep::Decoded | LdpcStep::Failed => break,
            LdpcStep::NeedReveal(count) => {
                let values = alice.reveal(count)?;
                bob.receive_revealed(&values)?;
            }
        }
    }
    debug_assert_eq!(bob.leak_bits(), alice.leak_bits());
    Ok(bob.finish())
}

#[cfg(test)]
mod tests;
