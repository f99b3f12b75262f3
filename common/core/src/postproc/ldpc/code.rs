//! One quasi-cyclic LDPC code: its base matrix lifted by circulant shifts, its key, adaptation
//! and padding columns, and the syndrome of a word (see "Codes" in the parent module's
//! documentation; the base graph is built by the `construction` module).

use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

use super::construction::{column_degrees, lift, peg_base_graph};
use crate::bits::BitVec;

/// Number of base-matrix columns; the lifting size z is about (key + adaptation bits) / 256.
pub const BASE_COLUMNS: usize = 256;

/// A quasi-cyclic LDPC code for keys of a given length, with its adaptation columns.
#[derive(Debug, Clone)]
pub struct LdpcCode {
    key_bits: usize,
    /// Lifting size z.
    pub(super) z: usize,
    n_rows_base: usize,
    n_cols_base: usize,
    /// Per base row: its entries (base column, shift), by column.
    pub(super) rows: Vec<Vec<(u32, u32)>>,
    /// Base columns that hold the key, in key order (the last may be partly padding).
    pub(super) key_cols: Vec<u32>,
    /// Untainted degree-2 base columns holding the adaptation bits, in reveal order.
    adapt_cols: Vec<u32>,
    mother_rate: f64,
}

impl LdpcCode {
    /// The code of mother rate `mother_rate` (one of [`MOTHER_RATES`](super::MOTHER_RATES) or any
    /// rate in (0, 1)) for `key_bits`-bit keys, with adaptation bits worth about `adaptation` of
    /// the key (0.1 is a good choice; fewer at high rates, where degree-2 columns with disjoint
    /// checks run out).
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

    /// The leak (bits) when `n_punctured` adaptation bits are punctured: m - p.
    pub fn leak_with_punctured(&self, n_punctured: usize) -> u64 {
        (self.n_checks() - n_punctured.min(self.n_adaptation())) as u64
    }

    /// Code bit of key bit `i`.
    pub(super) fn key_position(&self, i: usize) -> usize {
        self.key_cols[i / self.z] as usize * self.z + i % self.z
    }

    /// Code bit of adaptation bit `j` (in reveal order).
    pub(super) fn adapt_position(&self, j: usize) -> usize {
        self.adapt_cols[j / self.z] as usize * self.z + j % self.z
    }

    /// The code bits that are padding (key column positions past the key).
    pub(super) fn padding_positions(&self) -> impl Iterator<Item = usize> + '_ {
        (self.key_bits..self.key_cols.len() * self.z).map(|i| self.key_position(i))
    }

    /// The syndrome H x of a full code word (one byte, 0 or 1, per code bit).
    pub(super) fn syndrome_of(&self, word: &[u8]) -> BitVec {
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
