//! Long GF(2)[x] products by Schönhage's ternary FFT (A. Schönhage, "Schnelle Multiplikation von
//! Polynomen über Körpern der Charakteristik 2", Acta Inf. 7, 395 (1977); as used in gf2x, see
//! Brent, Gaudry, Thomé, Zimmermann, "Faster multiplication in GF(2)[x]", ANTS VIII, LNCS 5011,
//! p. 153 (2008)).
//!
//! The operands are cut into pieces of M bits, the pieces are the coefficients of polynomials in
//! y over the ring R = GF(2)[x] / (x^(2L) + x^L + 1), and their cyclic convolution of length
//! K = 3^k is computed by a radix-3 DFT over R. The point of R: x^(3L) = 1 there and x^L = rho is
//! a cube root of unity (1 + rho + rho^2 = 0), so with 3L a multiple of K, omega = x^(3L/K) is a
//! principal K-th root of unity (x^(2L) + x^L + 1 = Phi_3(x^L), and 3^(k-1) divides L) and every
//! multiplication by a power of omega is a shift with a fold: the transforms need no
//! multiplication at all, only shifts and XORs of bit-packed words. K is odd, so 1/K = 1 in
//! characteristic 2 and the inverse DFT is the DFT with omega^-1. The K pointwise products in R
//! are ordinary (Karatsuba) products of 2L-bit polynomials, reduced. With M <= L a product of two
//! pieces has degree below 2L - 1, so it is exact in R, and the convolution gives the true
//! product's pieces, wrapped around modulo y^K.
//!
//! Everything is exact arithmetic over GF(2): the result is bit for bit the one of any other
//! multiplication algorithm.

use super::karatsuba_equal;

/// Parameters of one transform: K = 3^k points, ring R with L = 3^(k-1) * c, pieces of M <= L
/// bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Number of points, K = 3^k.
    pub(crate) n_points: usize,
    /// L: R = GF(2)[x] / (x^(2L) + x^L + 1); a multiple of K / 3.
    pub(crate) half_bits: usize,
    /// M: bits per piece, at most L.
    pub(crate) piece_bits: usize,
}

impl Plan {
    /// Words per digit (an element is two digits of L bits: d0 + d1 x^L).
    fn digit_words(&self) -> usize {
        self.half_bits.div_ceil(64)
    }

    /// A rough cost (word operations) of a product with this plan, to choose among plans.
    fn cost(&self) -> f64 {
        let lw = self.digit_words() as f64;
        let k = (self.n_points as f64).log(3.0);
        // Three transforms of k levels of K/3 butterflies, each about 24 word operations per digit
        // word (XORs and two twiddle shifts), and K pointwise products of three Karatsuba
        // products of L-bit digits (about 40 word operations per word product).
        let transforms = 3.0 * k * (self.n_points as f64 / 3.0) * 24.0 * lw;
        let pointwise = self.n_points as f64 * 3.0 * 40.0 * lw.powf(1.585);
        transforms + pointwise
    }

    /// The cheapest plan for the part of the product of an `a_bits`-bit and a `b_bits`-bit
    /// operand (a_bits >= b_bits) below bit `a_bits`: the cyclic wrap-around must not reach bit
    /// `b_bits - 1` and above, which is what Toeplitz hashing needs (its output window is bits
    /// b_bits - 1 to a_bits - 1). None for operands too short to be worth it.
    pub(crate) fn for_window(a_bits: usize, b_bits: usize) -> Option<Plan> {
        Self::candidates(a_bits, b_bits).into_iter().min_by(|p, q| p.cost().total_cmp(&q.cost()))
    }

    /// For each K = 3^k (k >= 2, up to the first K above 3 `a_bits`), the plan with the smallest
    /// pieces that fits the window (see [`Plan::for_window`]).
    pub(crate) fn candidates(a_bits: usize, b_bits: usize) -> Vec<Plan> {
        let mut plans = Vec::new();
        if b_bits == 0 || a_bits < b_bits {
            return plans;
        }
        for k in 2..16u32 {
            let n_points = 3usize.pow(k);
            let unit = n_points / 3;
            // Smallest piece size that fits the longer operand in K pieces, then grown until the
            // wrapped pieces stay below the window.
            let mut piece_bits = a_bits.div_ceil(n_points).max(1);
            loop {
                let a_pieces = a_bits.div_ceil(piece_bits);
                let b_pieces = b_bits.div_ceil(piece_bits);
                let wrapped = (a_pieces + b_pieces).saturating_sub(n_points + 1);
                // Wrapped product pieces j' = 0..wrapped cover bits up to (wrapped + 1) M - 1:
                // they must end before bit b_bits - 1.
                if wrapped == 0 || (wrapped + 1) * piece_bits < b_bits {
                    break;
                }
                piece_bits += 1;
            }
            let half_bits = piece_bits.div_ceil(unit) * unit;
            plans.push(Plan { n_points, half_bits, piece_bits });
            if n_points > 3 * a_bits {
                break;
            }
        }
        plans
    }
}

/// Bits `b_bits - 1 .. a_bits` of the product of `a` (`a_bits` bits, packed) and `b` (`b_bits`
/// bits), computed with `plan` (from [`Plan::for_window`] for these lengths): `a_bits - b_bits + 1`
/// bits, packed.
pub(crate) fn product_window(a: &[u64], a_bits: usize, b: &[u64], b_bits: usize, plan: &Plan) -> Vec<u64> {
    let ring = Ring::new(plan);
    let mut fa = ring.load(a, a_bits);
    let mut fb = ring.load(b, b_bits);
    ring.forward(&mut fa);
    ring.forward(&mut fb);
    ring.pointwise(&mut fa, &fb);
    drop(fb);
    ring.inverse(&mut fa);
    ring.window(&fa, b_bits - 1, a_bits - b_bits + 1)
}

/// The ring R of a plan and its element layout: element i occupies words
/// `i * 2 lw .. (i + 1) * 2 lw` of a flat vector, digit 0 first; bits at and above L in each
/// digit's last word are zero.
struct Ring {
    plan: Plan,
    /// L.
    half: usize,
    /// Words per digit.
    lw: usize,
    /// Mask of the valid bits of a digit's last word.
    top_mask: u64,
}

impl Ring {
    fn new(plan: &Plan) -> Self {
        let half = plan.half_bits;
        let rem = half % 64;
        Self { plan: *plan, half, lw: half.div_ceil(64), top_mask: if rem == 0 { u64::MAX } else { (1u64 << rem) - 1 } }
    }

    /// Words per element.
    fn elem_words(&self) -> usize {
        2 * self.lw
    }

    /// The pieces of an `n_bits`-bit operand as K elements (piece i in digit 0 of element i).
    fn load(&self, words: &[u64], n_bits: usize) -> Vec<u64> {
        let ew = self.elem_words();
        let m = self.plan.piece_bits;
        let mut out = vec![0u64; self.plan.n_points * ew];
        for (i, elem) in out.chunks_exact_mut(ew).enumerate() {
            let start = i * m;
            if start >= n_bits {
                break;
            }
            let len = m.min(n_bits - start);
            extract_bits(words, start, len, &mut elem[..self.lw]);
        }
        out
    }

    /// In-place forward DFT (decimation in frequency; output in digit-reversed order).
    fn forward(&self, data: &mut [u64]) {
        let ew = self.elem_words();
        let mut scratch = vec![0u64; 2 * ew];
        let mut span = self.plan.n_points;
        while span >= 3 {
            let third = span / 3;
            let step = 3 * self.half / span;
            for base in (0..self.plan.n_points).step_by(span) {
                for j in 0..third {
                    let (i0, i1, i2) = (base + j, base + j + third, base + j + 2 * third);
                    self.butterfly(data, i0, i1, i2, false);
                    if j > 0 {
                        self.mul_x_pow(&mut data[i1 * ew..(i1 + 1) * ew], j * step, &mut scratch);
                        self.mul_x_pow(&mut data[i2 * ew..(i2 + 1) * ew], 2 * j * step, &mut scratch);
                    }
                }
            }
            span = third;
        }
    }

    /// In-place inverse DFT (decimation in time, from digit-reversed order): the exact reverse
    /// of [`Ring::forward`], each stage untwiddled then inverted (1/3 = 1 in characteristic 2).
    fn inverse(&self, data: &mut [u64]) {
        let ew = self.elem_words();
        let three_l = 3 * self.half;
        let mut scratch = vec![0u64; 2 * ew];
        let mut span = 3;
        while span <= self.plan.n_points {
            let third = span / 3;
            let step = three_l / span;
            for base in (0..self.plan.n_points).step_by(span) {
                for j in 0..third {
                    let (i0, i1, i2) = (base + j, base + j + third, base + j + 2 * third);
                    if j > 0 {
                        self.mul_x_pow(&mut data[i1 * ew..(i1 + 1) * ew], three_l - j * step, &mut scratch);
                        self.mul_x_pow(&mut data[i2 * ew..(i2 + 1) * ew], three_l - 2 * j * step, &mut scratch);
                    }
                    self.butterfly(data, i0, i1, i2, true);
                }
            }
            span *= 3;
        }
    }

    /// The 3-point DFT over R of elements i0, i1, i2 in place, with rho = x^L (rho^2 = rho + 1):
    /// forward (a0, a1, a2) -> (a0 + a1 + a2, a0 + a2 + t, a0 + a1 + t), t = rho (a1 + a2); the
    /// inverse (rho^-1 = rho^2) swaps the last two outputs.
    fn butterfly(&self, data: &mut [u64], i0: usize, i1: usize, i2: usize, inverse: bool) {
        let (ew, lw) = (self.elem_words(), self.lw);
        let (o0, o1, o2) = (i0 * ew, i1 * ew, i2 * ew);
        for w in 0..lw {
            let (a00, a01) = (data[o0 + w], data[o0 + lw + w]);
            let (a10, a11) = (data[o1 + w], data[o1 + lw + w]);
            let (a20, a21) = (data[o2 + w], data[o2 + lw + w]);
            let (s0, s1) = (a10 ^ a20, a11 ^ a21);
            // t = rho (s0 + s1 x^L) = s1 + (s0 + s1) x^L.
            let (t0, t1) = (s1, s0 ^ s1);
            data[o0 + w] = a00 ^ s0;
            data[o0 + lw + w] = a01 ^ s1;
            let (y10, y11) = (a00 ^ a20 ^ t0, a01 ^ a21 ^ t1);
            let (y20, y21) = (a00 ^ a10 ^ t0, a01 ^ a11 ^ t1);
            let (p1, p2) = if inverse { (o2, o1) } else { (o1, o2) };
            data[p1 + w] = y10;
            data[p1 + lw + w] = y11;
            data[p2 + w] = y20;
            data[p2 + lw + w] = y21;
        }
    }

    /// `elem *= x^s` in R, 0 <= s < 3L: x^r with r = s mod L shifts within the digits and folds
    /// the overflow (x^(2L) = x^L + 1), then rho^(s div L) permutes the digits. One pass over
    /// the words into `scratch` (at least an element long), one pass back.
    fn mul_x_pow(&self, elem: &mut [u64], s: usize, scratch: &mut [u64]) {
        let (lw, half) = (self.lw, self.half);
        let (q, r) = (s / half, s % half);
        if r == 0 {
            for _ in 0..q {
                // rho (d0 + d1 x^L) = d1 + (d0 + d1) x^L.
                let (d0, d1) = elem.split_at_mut(lw);
                for w in 0..lw {
                    let (a, b) = (d0[w], d1[w]);
                    d0[w] = b;
                    d1[w] = a ^ b;
                }
            }
            return;
        }
        // d x^r = lo(d << r) + (d >> (L - r)) x^L for each digit d (lo: the bits below L), so
        // e0 = lo(d0 << r) + (d1 >> (L - r)) and e1 = (d0 >> (L - r)) + lo(d1 << r) + (d1 >> (L - r)).
        let (d0, d1) = elem.split_at(lw);
        let (e0, rest) = scratch.split_at_mut(lw);
        let e1 = &mut rest[..lw];
        let (left_words, left_bits) = (r / 64, r % 64);
        let (right_words, right_bits) = ((half - r) / 64, (half - r) % 64);
        let shl = |d: &[u64], w: usize| -> u64 {
            if w < left_words {
                return 0;
            }
            let lo = d[w - left_words] << left_bits;
            if left_bits == 0 || w == left_words { lo } else { lo | (d[w - left_words - 1] >> (64 - left_bits)) }
        };
        let shr = |d: &[u64], w: usize| -> u64 {
            let lo = d.get(w + right_words).copied().unwrap_or(0);
            if right_bits == 0 {
                lo
            } else {
                (lo >> right_bits) | (d.get(w + right_words + 1).copied().unwrap_or(0) << (64 - right_bits))
            }
        };
        for w in 0..lw {
            let (h0, h1) = (shr(d0, w), shr(d1, w));
            e0[w] = shl(d0, w) ^ h1;
            e1[w] = h0 ^ shl(d1, w) ^ h1;
        }
        e0[lw - 1] &= self.top_mask;
        e1[lw - 1] &= self.top_mask;
        // Then rho^q: rho (e0 + e1 X) = e1 + (e0 + e1) X, rho^2 (e0 + e1 X) = (e0 + e1) + e0 X.
        let (d0, d1) = elem.split_at_mut(lw);
        for w in 0..lw {
            let (a, b) = (e0[w], e1[w]);
            let (x, y) = match q {
                0 => (a, b),
                1 => (b, a ^ b),
                _ => (a ^ b, a),
            };
            d0[w] = x;
            d1[w] = y;
        }
    }

    /// `a[i] *= b[i]` in R for every point: with X = x^L and X^2 = X + 1,
    /// (a0 + a1 X)(b0 + b1 X) = (P0 + P2) + (P1 + P0) X, P0 = a0 b0, P2 = a1 b1,
    /// P1 = (a0 + a1)(b0 + b1), each product of L-bit digits split at bit L and folded once more.
    fn pointwise(&self, a: &mut [u64], b: &[u64]) {
        let (ew, lw) = (self.elem_words(), self.lw);
        let mut p0 = vec![0u64; 2 * lw];
        let mut p1 = vec![0u64; 2 * lw];
        let mut p2 = vec![0u64; 2 * lw];
        let mut sa = vec![0u64; lw];
        let mut sb = vec![0u64; lw];
        let mut scratch = Vec::new();
        let mut hi = vec![0u64; 2 * lw];
        for (ea, eb) in a.chunks_exact_mut(ew).zip(b.chunks_exact(ew)) {
            let (a0, a1) = ea.split_at(lw);
            let (b0, b1) = eb.split_at(lw);
            karatsuba_equal(a0, b0, &mut p0, &mut scratch);
            karatsuba_equal(a1, b1, &mut p2, &mut scratch);
            for w in 0..lw {
                sa[w] = a0[w] ^ a1[w];
                sb[w] = b0[w] ^ b1[w];
            }
            karatsuba_equal(&sa, &sb, &mut p1, &mut scratch);
            // T0 = P0 + P2 (into p2), T1 = P1 + P0 (into p1); each has degree < 2L - 1.
            for w in 0..2 * lw {
                p2[w] ^= p0[w];
                p1[w] ^= p0[w];
            }
            // e0 = lo(T0) + hi(T1); e1 = hi(T0) + lo(T1) + hi(T1), hi(T) = T >> L.
            let (e0, e1) = ea.split_at_mut(lw);
            shr_bits(&p2, self.half, &mut hi);
            e0.copy_from_slice(&p2[..lw]);
            e1.copy_from_slice(&hi[..lw]);
            shr_bits(&p1, self.half, &mut hi);
            for w in 0..lw {
                e0[w] ^= hi[w];
                e1[w] ^= p1[w] ^ hi[w];
            }
            e0[lw - 1] &= self.top_mask;
            e1[lw - 1] &= self.top_mask;
        }
    }

    /// Bits `start .. start + len` of the sum over i of element i (a polynomial d0 + d1 x^L of
    /// degree below 2L) times x^(i M): the overlap-add of the convolution's pieces.
    fn window(&self, data: &[u64], start: usize, len: usize) -> Vec<u64> {
        let (ew, lw, m) = (self.elem_words(), self.lw, self.plan.piece_bits);
        let total_bits = (self.plan.n_points + 2) * m + 2 * self.half + 64;
        let mut acc = vec![0u64; total_bits.div_ceil(64) + 1];
        for (i, elem) in data.chunks_exact(ew).enumerate() {
            let offset = i * m;
            // Only pieces that reach into the window matter.
            if offset >= start + len || offset + 2 * self.half <= start {
                continue;
            }
            xor_shifted(&mut acc, &elem[..lw], offset);
            xor_shifted(&mut acc, &elem[lw..], offset + self.half);
        }
        let mut out = vec![0u64; len.div_ceil(64)];
        extract_bits(&acc, start, len, &mut out);
        out
    }
}

/// Writes bits `start .. start + len` of `words` (bits past the slice read as zero) into `out`
/// (at least `len.div_ceil(64)` words), zeroing the rest of `out`.
pub(crate) fn extract_bits(words: &[u64], start: usize, len: usize, out: &mut [u64]) {
    out.fill(0);
    let (first, shift) = (start / 64, start % 64);
    let n_out = len.div_ceil(64);
    for (k, o) in out.iter_mut().enumerate().take(n_out) {
        let lo = words.get(first + k).copied().unwrap_or(0) >> shift;
        let hi = if shift == 0 { 0 } else { words.get(first + k + 1).copied().unwrap_or(0) << (64 - shift) };
        *o = lo | hi;
    }
    if !len.is_multiple_of(64) {
        out[n_out - 1] &= (1u64 << (len % 64)) - 1;
    }
}

/// `out = src >> s` (bits of `src` from s upwards), `out.len()` words.
fn shr_bits(src: &[u64], s: usize, out: &mut [u64]) {
    let (ws, bs) = (s / 64, s % 64);
    for (k, o) in out.iter_mut().enumerate() {
        let lo = src.get(ws + k).copied().unwrap_or(0);
        *o = if bs == 0 { lo } else { (lo >> bs) | (src.get(ws + k + 1).copied().unwrap_or(0) << (64 - bs)) };
    }
}

/// `acc ^= src * x^offset` (src packed; acc long enough).
fn xor_shifted(acc: &mut [u64], src: &[u64], offset: usize) {
    let (ws, bs) = (offset / 64, offset % 64);
    if bs == 0 {
        for (k, &w) in src.iter().enumerate() {
            acc[ws + k] ^= w;
        }
        return;
    }
    for (k, &w) in src.iter().enumerate() {
        acc[ws + k] ^= w << bs;
        acc[ws + k + 1] ^= w >> (64 - bs);
    }
}
