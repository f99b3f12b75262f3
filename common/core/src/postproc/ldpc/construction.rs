//! The construction of a code's base graph: the column degree profile, the placement of the
//! edges by progressive edge growth, and the circulant shifts of the lifting, chosen to avoid
//! 4-cycles (see "Codes" in the parent module's documentation). Deterministic given the
//! generator, so both ends build the same code.

use rand::Rng;
use rand_chacha::ChaCha20Rng;

/// The column degrees of a mother code of rate `rate` over `n_cols` columns and `n_rows` rows:
/// degree-2 columns for 0.9 of the checks (fewer than the checks, so that they form no cycle of
/// their own), 12 % of degree-8 columns at rate 0.5 growing to 20 % of degree 8 plus 12 % of
/// degree 14 at rate 0.9 (high-rate codes have long checks whose messages are weak; the strong
/// messages of high-degree columns start the decoding), degree 3 for the rest. Sorted by degree,
/// low first. Chosen by simulation; regular degree-3 codes are much worse at high rate (figures:
/// docs/postprocessing.md).
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

/// Progressive edge growth over the base graph: for each column (low degree first), each new edge
/// goes to a row not yet reachable from the column within the current tree if there is one (the
/// farthest rows), the least used among them, ties broken at random. Returns each column's rows.
pub(super) fn peg_base_graph(degrees: &[usize], n_rows: usize, rng: &mut ChaCha20Rng) -> Vec<Vec<usize>> {
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
pub(super) fn lift(columns: &[Vec<usize>], n_rows: usize, z: usize, rng: &mut ChaCha20Rng) -> Vec<Vec<u32>> {
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
