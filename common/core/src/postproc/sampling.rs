//! Random sampling without replacement: from the errors seen in a test sample to a bound on the
//! errors of the unseen key sample, by inverting the exact hypergeometric tail.
//!
//! A population of `n + k` items holds an unknown number `T` of bad ones (here: phase errors of
//! the Z-sent clicks, with every multi-photon click counted as bad). A uniformly random subset
//! of `k` items is observed (the test sample, chosen by Bob's basis choice) and holds `t` bad
//! ones; the other `n` items (the key sample) hold `T - t`. Given the sizes, `t` is
//! hypergeometric: P_T(t = x) = C(T, x) C(n + k - T, k - x) / C(n + k, k).
//!
//! [`key_errors_upper`] returns S(t) = max { T - t : P_T(X <= t) > eps }, the largest number
//! of key-sample errors that the observation does not reject at level eps (a one-sided
//! Clopper-Pearson construction for the hypergeometric law). It is a bound for every `T`:
//! * The failure event for a population with `T` bad items is T - t > S(t), i.e. `T` is
//!   rejected by the observed `t`: P_T(X <= t) <= eps. P_T(X <= x) grows with `x`, so the
//!   failure set is a lower tail {x <= x*} with P_T(X <= x*) <= eps: the bound fails with
//!   probability at most eps, whatever `T` is (no maximisation over `T` is needed, and none is
//!   approximated).
//! * S is non-decreasing in `t`: making one good item bad raises the sample's count by at most
//!   one, so P_{T+1}(X <= t + 1) >= P_T(X <= t), hence max T(t + 1) >= max T(t) + 1. An upper
//!   bound on `t` therefore gives an upper bound on S(t), which is how the phase-error estimate
//!   uses it (it knows the test errors only through an upper bound).
//!
//! The tail is summed in floating point from the pmf at `t` (log-gamma) downwards by the exact
//! ratio of successive terms, with the remainder bounded by a geometric series, so the computed
//! tail is an upper bound of the true one up to rounding; [`NUMERICAL_MARGIN`] absorbs the
//! rounding in the conservative direction (a tail is taken as below eps only when it is below
//! eps (1 - margin)). Cost: about 25 tail sums of a few hundred terms each, even for populations
//! of 10^7 (timing: docs/postprocessing.md).
//!
//! The closed-form Gaussian/Stirling correction of Fung, Ma & Chau, PRA 81, 012318 (2010), is
//! not used: it is an approximation, not a bound; summed exactly, it fails with about 40 times
//! its nominal eps at 10^6-bit blocks (tests: `sampling::tests`).

/// Relative margin on eps that absorbs floating-point rounding in the tail sums: a tail counts
/// as at most eps only when its computed value is at most eps (1 - `NUMERICAL_MARGIN`). The
/// log-gamma values of populations up to 10^8 carry absolute errors near 1e-7, i.e. relative
/// errors of the pmf near 1e-7, far below this margin.
pub const NUMERICAL_MARGIN: f64 = 1e-4;

/// ln C(a, b) for b <= a, from the log-gamma function.
fn ln_choose(a: u64, b: u64) -> f64 {
    debug_assert!(b <= a);
    libm::lgamma(a as f64 + 1.0) - libm::lgamma(b as f64 + 1.0) - libm::lgamma((a - b) as f64 + 1.0)
}

/// True when P(X <= t) > `eps` for X hypergeometric with population `population`, `bad` bad
/// items and `draws` draws (an upper estimate of the tail: when in doubt, true).
fn lower_tail_exceeds(population: u64, bad: u64, draws: u64, t: u64, eps: f64) -> bool {
    // Support of X: max(0, draws - (population - bad)) ..= min(bad, draws).
    let good = population - bad;
    let lowest = draws.saturating_sub(good);
    if t >= bad.min(draws) {
        return true; // P(X <= t) = 1.
    }
    if t < lowest {
        return false; // P(X <= t) = 0.
    }
    let threshold = eps * (1.0 - NUMERICAL_MARGIN);
    let ln_threshold = threshold.ln();
    // ln pmf(t); the sum is kept as exp(ln_scale) * sum with sum in [1, 1e300).
    let mut ln_scale = ln_choose(bad, t) + ln_choose(good, draws - t) - ln_choose(population, draws);
    let mut sum = 1.0f64;
    let mut term = 1.0f64;
    let mut x = t;
    while x > lowest {
        // pmf(x - 1) / pmf(x) = x (good - draws + x) / ((bad - x + 1) (draws - x + 1)).
        let ratio = (x as f64) * ((good + x - draws) as f64) / (((bad - x + 1) as f64) * ((draws - x + 1) as f64));
        term *= ratio;
        x -= 1;
        sum += term;
        if sum > 1e300 {
            ln_scale += sum.ln();
            term /= sum;
            sum = 1.0;
        }
        if ln_scale + sum.ln() > ln_threshold {
            return true;
        }
        // The ratio falls as x falls, so once it is below 1 the rest is at most
        // term * ratio / (1 - ratio) (a geometric series).
        if ratio < 1.0 && term < sum * 1e-18 {
            let rest = term * ratio / (1.0 - ratio);
            return ln_scale + (sum + rest).ln() > ln_threshold;
        }
    }
    ln_scale + sum.ln() > ln_threshold
}

/// Upper bound on the number of bad items among the `n` unobserved items when `t` bad ones were
/// found among `k` observed items of a uniformly random split of `n + k` items (module
/// documentation): max { T - t : P_T(X <= t) > eps }. Fails with probability at most `eps` for
/// every population, and is non-decreasing in `t`. `eps` must lie in (0, 1) and `t <= k`.
pub fn key_errors_upper(n: u64, k: u64, t: u64, eps: f64) -> u64 {
    assert!(eps > 0.0 && eps < 1.0, "eps must lie in (0, 1)");
    assert!(t <= k, "test errors exceed the test sample");
    let population = n + k;
    // P_T(X <= t) falls as T grows; T = t is never rejected. Find the largest T not rejected.
    if lower_tail_exceeds(population, t + n, k, t, eps) {
        return n;
    }
    let (mut accepted, mut rejected) = (t, t + n);
    while rejected - accepted > 1 {
        let mid = accepted + (rejected - accepted) / 2;
        if lower_tail_exceeds(population, mid, k, t, eps) {
            accepted = mid;
        } else {
            rejected = mid;
        }
    }
    accepted - t
}

#[cfg(test)]
mod tests;
