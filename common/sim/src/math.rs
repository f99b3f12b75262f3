//! Small numerical helpers: the normal distribution function, binary entropy, and the samplers the
//! simulation needs (uniform, geometric by inversion, standard normal), written here because the
//! crate has no `rand_distr`.

use rand::Rng;

/// Complementary error function, with fractional error below 1.2e-7 everywhere
/// (Chebyshev fit of Numerical Recipes in C, 2nd ed., section 6.2, function `erfcc`).
pub fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98 + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let r = t * poly.exp();
    if x >= 0.0 { r } else { 2.0 - r }
}

/// Standard normal distribution function Phi(x) = erfc(-x / sqrt 2) / 2.
pub fn normal_cdf(x: f64) -> f64 {
    0.5 * erfc(-x / std::f64::consts::SQRT_2)
}

/// Binary entropy h(x) = -x log2 x - (1-x) log2(1-x), with h(0) = h(1) = 0; arguments above 1/2
/// are clamped to 1/2 (h is used as an upper bound on leaked or phase-error information).
pub fn binary_entropy(x: f64) -> f64 {
    let x = x.clamp(0.0, 0.5);
    if x <= 0.0 {
        return 0.0;
    }
    -x * x.log2() - (1.0 - x) * (1.0 - x).log2()
}

/// A uniform sample in (0, 1], from the top 53 bits of a `u64`.
pub fn uniform_open0(rng: &mut impl Rng) -> f64 {
    ((rng.next_u64() >> 11) + 1) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// A uniform sample in [0, 1), from the top 53 bits of a `u64`.
pub fn uniform(rng: &mut impl Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// Number of failures before the first success of independent trials with success probability
/// `p`, by inversion: floor(ln U / ln(1 - p)) with U uniform in (0, 1] (Devroye, Non-Uniform
/// Random Variate Generation, 1986, section X.2). Returns `u64::MAX` when `p <= 0`.
pub fn geometric(rng: &mut impl Rng, p: f64) -> u64 {
    if p >= 1.0 {
        return 0;
    }
    if p <= 0.0 {
        return u64::MAX;
    }
    let k = (uniform_open0(rng).ln() / (-p).ln_1p()).floor();
    // `as` saturates for values beyond u64::MAX.
    k as u64
}

/// Iterator over the indices in `0..n` at which independent trials with success probability `p`
/// succeed, found by geometric skipping: the work is proportional to the number of successes.
pub fn successes<'a, R: Rng>(rng: &'a mut R, n: u64, p: f64) -> impl Iterator<Item = u64> + 'a {
    let mut next: u64 = 0;
    std::iter::from_fn(move || {
        if next >= n {
            return None;
        }
        let idx = next.checked_add(geometric(rng, p))?;
        if idx >= n {
            next = n;
            return None;
        }
        next = idx + 1;
        Some(idx)
    })
}

/// A standard normal sample by the Box-Muller transform (Box & Muller, Ann. Math. Stat. 29, 610,
/// 1958).
pub fn standard_normal(rng: &mut impl Rng) -> f64 {
    let u1 = uniform_open0(rng);
    let u2 = uniform(rng);
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    #[test]
    fn erfc_known_values() {
        for (x, v) in
            [(0.0, 1.0), (0.5, 0.479_500_122), (1.0, 0.157_299_207), (-1.0, 1.842_700_793), (3.0, 2.209_049_7e-5)]
        {
            assert!((erfc(x) - v).abs() <= 1.2e-7 * v, "erfc({x}) = {} vs {v}", erfc(x));
        }
    }

    #[test]
    fn entropy_values() {
        assert_eq!(binary_entropy(0.0), 0.0);
        assert!((binary_entropy(0.5) - 1.0).abs() < 1e-15);
        assert!((binary_entropy(0.11) - 0.4999).abs() < 1e-3);
    }

    #[test]
    fn geometric_skipping_rate() {
        let seed = 7;
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let (n, p) = (10_000_000u64, 1e-3);
        let hits: Vec<u64> = successes(&mut rng, n, p).collect();
        let mean = n as f64 * p;
        assert!((hits.len() as f64 - mean).abs() < 4.0 * mean.sqrt(), "seed {seed}: {} hits", hits.len());
        assert!(hits.windows(2).all(|w| w[0] < w[1]) && hits.iter().all(|&i| i < n));
        assert_eq!(successes(&mut rng, 5, 1.0).collect::<Vec<_>>(), vec![0, 1, 2, 3, 4]);
        assert_eq!(successes(&mut rng, 5, 0.0).count(), 0);
    }

    #[test]
    fn normal_moments() {
        let seed = 8;
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let n = 200_000;
        let xs: Vec<f64> = (0..n).map(|_| standard_normal(&mut rng)).collect();
        let m = xs.iter().sum::<f64>() / n as f64;
        let v = xs.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / n as f64;
        assert!(m.abs() < 0.01 && (v - 1.0).abs() < 0.01, "seed {seed}: mean {m} var {v}");
    }
}
