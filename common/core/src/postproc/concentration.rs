//! Concentration bounds that hold against coherent attacks: sums of indicators whose
//! conditional probabilities (given everything before) are chosen by an adversary.
//!
//! Round i of a block (a pulse) yields an indicator xi_i in {0, 1} (or any value in [0, 1]) with
//! conditional expectation p_i = E[xi_i | F_{i-1}] given the history F_{i-1}; an eavesdropper
//! who correlates pulses chooses p_i as she likes. Write L = sum xi_i (observed or not) and
//! P = sum p_i (never observed). For s > 0, 1 + x <= e^x and convexity of e^(s xi) on [0, 1]
//! give E[e^(s xi_i) | F_{i-1}] <= exp((e^s - 1) p_i) and
//! E[e^(-s xi_i) | F_{i-1}] <= exp(-(1 - e^(-s)) p_i), so
//!   M+_n = exp(s L_n - (e^s - 1) P_n)   and   M-_n = exp((1 - e^(-s)) P_n - s L_n)
//! are non-negative supermartingales with M_0 = 1 (the exponential supermartingales behind
//! Freedman's inequality, D. A. Freedman, "On tail probabilities for martingales", Ann. Probab.
//! 3, 100 (1975), Section 1; Bennett's/Chernoff's bound is their special case for independent
//! rounds). Markov's inequality on E[M_tau] <= 1 at any stopping time tau (optional stopping for
//! non-negative supermartingales; a block ends at a stopping time: when enough key bits are
//! sifted) gives, each with probability at least 1 - eps, for a parameter s fixed in advance:
//! * (1) P <= (s L + ln(1/eps)) / (1 - e^(-s))        [`expectation_upper`], from M-;
//! * (2) P >= (s L - ln(1/eps)) / (e^s - 1)           [`expectation_lower`], from M+;
//! * (3) L <= ((e^s - 1) P + ln(1/eps)) / s           [`count_upper`], from M+, with any upper
//!   bound on P in place of P (the right side grows with P).
//!
//! For a weighted sum of several such counts, [`freedman_deviation`] bounds the deviation with
//! the predictable variance instead (Freedman's inequality), which adds the counts' variances
//! rather than their deviations.
//!
//! The parameter s must not depend on the data, so each bound is taken over a fixed grid of
//! [`GRID_POINTS`] values of s, each failing with eps / [`GRID_POINTS`] (a union bound), and
//! the tightest is used. Unlike the Chernoff and Bernstein forms for independent pulses (Yin et
//! al., Sci. Rep. 10, 14312 (2020)), these hold against coherent attacks; they play the role of
//! Kato's inequality (G. Kato, arXiv:2002.04357), which needs a prediction of L fixed before the
//! block and a fixed number of rounds, where these need neither. The tests compare them with
//! exact binomial tails (independent rounds are one strategy of the adversary, so the bounds
//! must hold there too).

/// Number of values of the free parameter s in each bound's grid.
pub const GRID_POINTS: u32 = 32;

/// The grid of s: s_j = 2 * 1.4^(-j), j = 0..GRID_POINTS, from 2 down to about 6e-5, so that the
/// optimum s ~ sqrt(2 ln(1/eps) / L) is within a factor 1.2 of a grid point for counts L from
/// about 10 to 10^10 (a factor c off the optimum widens the deviation by (c + 1/c) / 2, under
/// 2 % at c = 1.2).
fn grid() -> impl Iterator<Item = f64> {
    (0..GRID_POINTS).map(|j| 2.0 * 1.4f64.powi(-(j as i32)))
}

/// ln(GRID_POINTS / eps): the exponent each grid point is given.
fn log_term(eps: f64) -> f64 {
    (f64::from(GRID_POINTS) / eps).ln()
}

/// Upper bound on the sum of the conditional expectations of indicators whose sum was observed
/// to be `observed`, failing with probability at most `eps` against any adversary (bound (1) of
/// the module documentation, tightest over the grid).
pub fn expectation_upper(observed: f64, eps: f64) -> f64 {
    let beta = log_term(eps);
    grid().map(|s| (s * observed + beta) / -(-s).exp_m1()).fold(f64::INFINITY, f64::min)
}

/// Lower bound on the sum of the conditional expectations of indicators whose sum was observed
/// to be `observed`, failing with probability at most `eps` against any adversary (bound (2),
/// tightest over the grid, and at least 0).
pub fn expectation_lower(observed: f64, eps: f64) -> f64 {
    let beta = log_term(eps);
    grid().map(|s| (s * observed - beta) / s.exp_m1()).fold(0.0, f64::max)
}

/// Upper bound on the sum of indicators whose conditional expectations sum to at most
/// `expected_upper`, failing with probability at most `eps` against any adversary (bound (3),
/// tightest over the grid).
pub fn count_upper(expected_upper: f64, eps: f64) -> f64 {
    let beta = log_term(eps);
    grid().map(|s| (s.exp_m1() * expected_upper.max(0.0) + beta) / s).fold(f64::INFINITY, f64::min)
}

/// Number of values in the grid of variance bounds of [`freedman_deviation`].
pub const VARIANCE_GRID_POINTS: u32 = 300;

/// Ratio between successive variance bounds of the grid: v_j = 1.1^j, j = 0..300 (up to about
/// 2.6e12), so a variance bound is rounded up by at most 10 %.
const VARIANCE_GRID_RATIO: f64 = 1.1;

/// Deviation `a` such that, for a martingale whose differences are at most `increment_bound`
/// (c > 0) and whose predictable quadratic variation is at most `variance_upper` at the block's
/// end, the sum of differences exceeds `a` with probability at most `eps`, against any adversary.
///
/// Freedman's inequality (D. A. Freedman, Ann. Probab. 3, 100 (1975), Theorem 1.6, scaled to
/// differences at most c): P(S_n >= a and V_n <= v for some n) <= exp(-(v / c^2) h(a c / v)), with
/// h(u) = (1 + u) ln(1 + u) - u (Bennett's form, which implies the Bernstein form
/// exp(-a^2 / (2 (v + c a / 3)))). It holds for some n, so at a stopping time. The variance bound
/// is itself data-dependent (an upper bound computed from the block's counts), so the inequality
/// is applied at every point v_j of a fixed geometric grid, each with eps /
/// [`VARIANCE_GRID_POINTS`]; on the event that none fails, the smallest v_j at or above the
/// data's bound gives the deviation. `a` solves (v_j / c^2) h(a c / v_j) = ln(G / eps) by
/// bisection (the left side grows with a), rounded up.
pub fn freedman_deviation(variance_upper: f64, increment_bound: f64, eps: f64) -> f64 {
    assert!(increment_bound > 0.0 && eps > 0.0 && eps < 1.0);
    let beta = (f64::from(VARIANCE_GRID_POINTS) / eps).ln();
    let top = VARIANCE_GRID_RATIO.powi(VARIANCE_GRID_POINTS as i32 - 1);
    assert!(variance_upper <= top, "variance bound {variance_upper} is beyond the grid");
    // The smallest grid point at or above the bound (v_0 = 1 covers anything below 1).
    let mut v = 1.0f64;
    while v < variance_upper {
        v *= VARIANCE_GRID_RATIO;
    }
    let c = increment_bound;
    let exponent = |a: f64| {
        let u = a * c / v;
        v / (c * c) * ((1.0 + u) * u.ln_1p() - u)
    };
    // Bernstein's form gives an upper bracket: a^2 / (2 (v + c a / 3)) = beta at
    // a = c beta / 3 + sqrt((c beta / 3)^2 + 2 v beta), and Bennett's exponent is at least
    // Bernstein's.
    let (mut lo, mut hi) = (0.0f64, c * beta / 3.0 + ((c * beta / 3.0).powi(2) + 2.0 * v * beta).sqrt());
    for _ in 0..100 {
        let mid = 0.5 * (lo + hi);
        if exponent(mid) >= beta {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    hi
}

#[cfg(test)]
mod tests;
