//! The bounds against exact binomial tails: independent rounds with a fixed probability are one
//! strategy an adversary may choose, so every bound must fail at most eps of the time there.

use super::*;

/// ln P(X = x) for X binomial(n, p), log-factorials summed (independent of the code under test).
struct Binomial {
    n: u64,
    p: f64,
    ln_fact: Vec<f64>,
}

impl Binomial {
    fn new(n: u64, p: f64) -> Self {
        let mut ln_fact = vec![0.0f64; n as usize + 1];
        for i in 1..=n as usize {
            ln_fact[i] = ln_fact[i - 1] + (i as f64).ln();
        }
        Self { n, p, ln_fact }
    }

    fn pmf(&self, x: u64) -> f64 {
        let (n, x) = (self.n as usize, x as usize);
        (self.ln_fact[n] - self.ln_fact[x] - self.ln_fact[n - x]
            + x as f64 * self.p.ln()
            + (n - x) as f64 * (-self.p).ln_1p())
        .exp()
    }

    /// P(failing(X)), summed over the range where the pmf is not negligible.
    fn probability(&self, failing: impl Fn(f64) -> bool) -> f64 {
        let mean = self.n as f64 * self.p;
        let hi = ((mean + 30.0 * mean.sqrt() + 200.0) as u64).min(self.n);
        (0..=hi).filter(|&x| failing(x as f64)).map(|x| self.pmf(x)).sum()
    }
}

const EPS: f64 = 1e-9;

#[test]
fn each_bound_fails_at_most_eps_against_independent_rounds() {
    for mean in [30.0, 1_000.0, 20_000.0] {
        let binomial = Binomial::new(1_000_000, mean / 1e6);
        let upper = binomial.probability(|x| expectation_upper(x, EPS) < mean);
        let lower = binomial.probability(|x| expectation_lower(x, EPS) > mean);
        let count = binomial.probability(|x| x > count_upper(mean, EPS));
        for (name, failure) in [("expectation_upper", upper), ("expectation_lower", lower), ("count_upper", count)] {
            assert!(failure <= EPS, "{name} at mean {mean}: fails with {failure:e}");
        }
    }
}

#[test]
fn bounds_are_close_to_the_gaussian_deviation() {
    // For large counts each bound sits within 10 % of sqrt(2 L ln(GRID_POINTS / eps)) of L.
    let beta = (f64::from(GRID_POINTS) / EPS).ln();
    for observed in [1e4, 1e6, 1e8] {
        let width = (2.0 * observed * beta).sqrt();
        let up = expectation_upper(observed, EPS) - observed;
        let down = observed - expectation_lower(observed, EPS);
        let count = count_upper(observed, EPS) - observed;
        for (name, deviation) in [("upper", up), ("lower", down), ("count", count)] {
            assert!(deviation > 0.0, "{name} at {observed}: {deviation}");
            assert!(deviation < 1.1 * width + beta, "{name} at {observed}: {deviation} vs {width}");
        }
    }
}

#[test]
fn bounds_are_monotone_and_safe_at_zero() {
    assert!(expectation_upper(0.0, EPS) > 0.0);
    assert_eq!(expectation_lower(0.0, EPS), 0.0);
    assert!(count_upper(0.0, EPS) > 0.0);
    let mut previous = (0.0, 0.0, 0.0);
    for x in [1.0, 10.0, 100.0, 1e4, 1e6] {
        let now = (expectation_upper(x, EPS), expectation_lower(x, EPS), count_upper(x, EPS));
        assert!(now.0 > previous.0 && now.1 >= previous.1 && now.2 > previous.2, "{x}: {now:?}");
        previous = now;
    }
}

#[test]
fn freedman_deviation_holds_against_exact_binomial_tails() {
    // Differences d_i = c (p - xi_i) with xi_i Bernoulli(p): at most c p <= c, predictable
    // variance c^2 N p (1 - p). P(sum d_i >= a) = P(L <= N p - a / c), exactly.
    for (mean, c) in [(1_000.0, 1.0), (20_000.0, 1.0), (5_000.0, 2.0), (200.0, 3.0)] {
        let n = 1_000_000u64;
        let p = mean / n as f64;
        let binomial = Binomial::new(n, p);
        let variance = c * c * n as f64 * p * (1.0 - p);
        let a = freedman_deviation(variance, c, EPS);
        let failure = binomial.probability(|x| c * (mean - x) >= a);
        assert!(failure <= EPS, "mean {mean}, c {c}: deviation {a} fails with {failure:e}");
        // Not loose: within 25 % of the Gaussian deviation at the grid's eps.
        let beta = (f64::from(VARIANCE_GRID_POINTS) / EPS).ln();
        assert!(a < 1.25 * (2.0 * variance * beta).sqrt() + c * beta, "mean {mean}: {a}");
    }
}

#[test]
fn freedman_deviation_grows_with_the_variance() {
    let mut previous = 0.0;
    for v in [0.5, 10.0, 1e3, 1e6, 1e9] {
        let a = freedman_deviation(v, 1.5, EPS);
        assert!(a > previous, "{v}: {a}");
        previous = a;
    }
}
