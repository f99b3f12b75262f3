//! The sampling bound against the exact hypergeometric law, computed here independently of the
//! code under test: log-factorials by summation (no log-gamma), every pmf term evaluated on
//! its own (no ratio recursion), and the failure event evaluated by its definition.

use super::*;

/// ln m! for m = 0..=max, by summing ln i.
struct LogFactorials(Vec<f64>);

impl LogFactorials {
    fn new(max: u64) -> Self {
        let mut table = Vec::with_capacity(max as usize + 1);
        let mut acc = 0.0f64;
        table.push(0.0);
        for i in 1..=max {
            acc += (i as f64).ln();
            table.push(acc);
        }
        Self(table)
    }

    fn ln_choose(&self, a: u64, b: u64) -> f64 {
        self.0[a as usize] - self.0[b as usize] - self.0[(a - b) as usize]
    }

    /// P(X = x) for X hypergeometric: population `n + k`, `bad` bad items, `k` draws.
    fn pmf(&self, n: u64, k: u64, bad: u64, x: u64) -> f64 {
        let population = n + k;
        if x > bad || x > k || k - x > population - bad {
            return 0.0;
        }
        (self.ln_choose(bad, x) + self.ln_choose(population - bad, k - x) - self.ln_choose(population, k)).exp()
    }
}

/// Exact probability, for a population of `n + k` items with `bad` bad ones, that the bad items
/// of the key sample exceed `bound(t)` where `t` is the test sample's count: the sum of
/// P(X = t) over every t with bad - t > bound(t). Terms below 1e-30 of the mode are skipped
/// (they cannot change the comparison with eps >= 1e-12).
fn failure_probability(table: &LogFactorials, n: u64, k: u64, bad: u64, bound: &dyn Fn(u64) -> u64) -> f64 {
    let mean = bad as f64 * k as f64 / (n + k) as f64;
    let sd = (mean * (1.0 - k as f64 / (n + k) as f64)).sqrt().max(1.0);
    let lo = (mean - 15.0 * sd).max(0.0) as u64;
    let hi = ((mean + 15.0 * sd) as u64).min(k).min(bad);
    (lo..=hi).filter(|&t| bad > t && bad - t > bound(t)).map(|t| table.pmf(n, k, bad, t)).sum()
}

/// The old correction of Fung, Ma & Chau (2010), the Gaussian/Stirling form, as a bound on the
/// key-sample errors: n (t/k + gamma).
fn old_gaussian_bound(n: u64, k: u64, t: u64, eps: f64) -> u64 {
    let (nf, kf) = (n as f64, k as f64);
    let lambda = (t as f64 / kf).clamp(1e-12, 0.5);
    let variance = lambda * (1.0 - lambda);
    let log_term = ((nf + kf) / (2.0 * std::f64::consts::PI * nf * kf * variance * eps * eps)).ln();
    let gamma = if log_term <= 0.0 { 0.0 } else { ((nf + kf) * variance / (nf * kf) * log_term).sqrt() };
    (nf * (t as f64 / kf + gamma)).floor() as u64
}

/// Worst failure probability of `bound` over the populations at which it is most likely to fail:
/// for each observed t near `rate * k`, the smallest population that t's bound excludes,
/// bad = t + bound(t) + 1 (a larger one makes the lower tail smaller).
fn worst_failure(table: &LogFactorials, n: u64, k: u64, rate: f64, window: u64, bound: &dyn Fn(u64) -> u64) -> f64 {
    let centre = (rate * k as f64).round() as u64;
    let mut worst = 0.0f64;
    for t in centre.saturating_sub(window)..=(centre + window).min(k) {
        let bad = t + bound(t) + 1;
        if bad > n + k {
            continue;
        }
        worst = worst.max(failure_probability(table, n, k, bad, bound));
    }
    worst
}

/// The bound, memoised over the values of t the failure sums can ask for.
fn memoised_bound(n: u64, k: u64, eps: f64) -> impl Fn(u64) -> u64 {
    let cache = std::cell::RefCell::new(std::collections::HashMap::new());
    move |t: u64| *cache.borrow_mut().entry(t).or_insert_with(|| key_errors_upper(n, k, t, eps))
}

/// (key sample, test sample, test error rate, eps): the 120 km operating point of the issue
/// that found the old correction wrong, and blocks of 10^5 bits at test rates of 0.5-1 %.
const POINTS: [(u64, u64, f64, f64); 4] = [
    (999_756, 514_248, 0.131, 1e-11),
    (100_000, 500, 0.05, 1e-11),
    (100_000, 1_000, 0.08, 1e-11),
    (100_000, 20_000, 0.03, 1e-9),
];

#[test]
fn failure_probability_never_exceeds_eps_and_the_bound_is_tight() {
    for &(n, k, rate, eps) in &POINTS {
        let table = LogFactorials::new(n + k);
        let bound = memoised_bound(n, k, eps);
        let worst = worst_failure(&table, n, k, rate, 25, &bound);
        assert!(worst <= eps, "n={n} k={k} rate={rate}: failure {worst:e} > eps {eps:e}");
        // Tight: one more allowed error and the observed t would reject nothing that fails.
        assert!(worst > eps / 20.0, "n={n} k={k} rate={rate}: failure {worst:e} is far below eps {eps:e}");
        // At the boundary: the largest population the bound allows is not rejected.
        let centre = (rate * k as f64).round() as u64;
        let allowed = centre + bound(centre);
        let tail: f64 = (0..=centre).map(|x| table.pmf(n, k, allowed, x)).sum();
        assert!(tail > eps * (1.0 - 1e-3), "n={n} k={k}: P(X <= t) = {tail:e} at the largest allowed population");
    }
}

#[test]
fn the_old_gaussian_correction_fails_this_test() {
    // Replacing the bound by the old approximation makes the exact failure exceed eps at every
    // point (about 40 times at 120 km, thousands of times at 10^5-bit blocks).
    for &(n, k, rate, eps) in &POINTS[..3] {
        let table = LogFactorials::new(n + k);
        let old = |t: u64| old_gaussian_bound(n, k, t, eps);
        let worst = worst_failure(&table, n, k, rate, 25, &old);
        assert!(worst > 10.0 * eps, "n={n} k={k} rate={rate}: old correction fails with {worst:e}, eps {eps:e}");
    }
}

#[test]
fn bound_is_monotone_in_the_test_errors() {
    let (n, k, eps) = (200_000, 50_000, 1e-10);
    let mut previous = 0;
    for t in (0..=2_000).step_by(7) {
        let s = key_errors_upper(n, k, t, eps);
        assert!(s >= previous, "t={t}: {s} < {previous}");
        previous = s;
    }
}

#[test]
fn edge_cases() {
    // Nothing observed wrong in a large test: a few errors may still hide in the key sample.
    let s = key_errors_upper(1_000_000, 500_000, 0, 1e-10);
    assert!(s > 0 && s < 100, "{s}");
    // Every test item bad: the whole key sample may be bad.
    assert_eq!(key_errors_upper(1_000, 1_000, 1_000, 1e-10), 1_000);
    // A tiny test sample says little: the bound is the whole key sample.
    assert_eq!(key_errors_upper(1_000, 3, 1, 1e-10), 1_000);
}
