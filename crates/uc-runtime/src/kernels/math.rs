//! Element-wise math of the forward pass: exp (softmax, SiLU), RMSNorm, rotary, and the
//! randomized Hadamard rotation of activations ([`rotate`]).
//!
//! The scalar functions use `f32::exp` and are the references. The AVX-512 exp is a
//! Cephes-style polynomial (range reduction by ln 2, degree-6 polynomial, `vscalefps`),
//! within [`EXP_REL_TOL`] of `f32::exp` over the range softmax and SiLU feed it. The
//! AVX2 exp is the same polynomial with the power of two built in the exponent bits
//! (two factors, so that 2^128 at the top of the range does not overflow); without it
//! decode on AVX2 called libm's `expf` once per attention score (~3% of a token).

use super::Isa;
use rayon::prelude::*;

/// Rows from which [`rms_norm`] splits its rows over the rayon pool (prefill; decode's
/// few rows stay on the caller's thread).
const PAR_ROWS: usize = 64;

/// Relative tolerance of the SIMD exp against `f32::exp` for arguments in [-87, 88].
pub const EXP_REL_TOL: f32 = 4e-7;

/// `xs[i] = exp(xs[i] - shift)`, returns the sum of the results (f32, in order for the
/// reference; lane-wise for SIMD).
pub fn exp_shifted_sum(isa: Isa, xs: &mut [f32], shift: f32) -> f32 {
    match isa {
        // SAFETY: the guard checked the CPU supports AVX-512F.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if Isa::Avx512.is_available() => unsafe { x86::exp_shifted_sum(xs, shift) },
        // SAFETY: the guard checked the CPU supports AVX2 and FMA.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if Isa::Avx2.is_available() => unsafe { x86::exp_shifted_sum_avx2(xs, shift) },
        _ => exp_shifted_sum_scalar(xs, shift),
    }
}

/// Reference for [`exp_shifted_sum`].
pub fn exp_shifted_sum_scalar(xs: &mut [f32], shift: f32) -> f32 {
    let mut s = 0.0f32;
    for x in xs.iter_mut() {
        *x = (*x - shift).exp();
        s += *x;
    }
    s
}

/// In-place softmax of `xs` (numerically stable: the maximum is subtracted first).
pub fn softmax(isa: Isa, xs: &mut [f32]) {
    if xs.is_empty() {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 && Isa::Avx512.is_available() {
        // SAFETY: the guard checked the CPU supports AVX-512F. The maximum is exact in
        // any order and the scaling is per element: the scalar path's bits (inputs
        // without NaN).
        unsafe {
            let max = x86::max(xs);
            let inv = 1.0 / x86::exp_shifted_sum(xs, max);
            x86::scale(xs, inv);
        }
        return;
    }
    let max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum = exp_shifted_sum(isa, xs, max);
    let inv = 1.0 / sum;
    xs.iter_mut().for_each(|x| *x *= inv);
}

/// `gate[i] = silu(gate[i]) * up[i]` with `silu(v) = v / (1 + exp(-v))`.
pub fn silu_mul(isa: Isa, gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "silu_mul: lengths");
    match isa {
        // SAFETY: the guard checked the CPU supports AVX-512F; lengths are equal.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if Isa::Avx512.is_available() => unsafe { x86::silu_mul(gate, up) },
        // SAFETY: the guard checked the CPU supports AVX2 and FMA; lengths are equal.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if Isa::Avx2.is_available() => unsafe { x86::silu_mul_avx2(gate, up) },
        _ => silu_mul_scalar(gate, up),
    }
}

/// Reference for [`silu_mul`].
pub fn silu_mul_scalar(gate: &mut [f32], up: &[f32]) {
    gate.iter_mut()
        .zip(up)
        .for_each(|(g, u)| *g = *g / (1.0 + (-*g).exp()) * u);
}

/// `gate[i] = gelu_tanh(gate[i]) * up[i]` (GeGLU), with PyTorch's tanh approximation
/// `gelu_tanh(v) = 0.5 v (1 + tanh(sqrt(2 / pi) (v + 0.044715 v^3)))` in f32. Scalar
/// only: Gemma is the one family that uses it.
pub fn gelu_tanh_mul(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "gelu_tanh_mul: lengths");
    // sqrt(2 / pi), as PyTorch's kBeta = M_SQRT2 * M_2_SQRTPI * 0.5.
    const BETA: f32 = (std::f64::consts::SQRT_2 * std::f64::consts::FRAC_2_SQRT_PI * 0.5) as f32;
    gate.iter_mut().zip(up).for_each(|(g, u)| {
        let v = *g;
        let inner = BETA * (v + 0.044715 * v * v * v);
        *g = 0.5 * v * (1.0 + inner.tanh()) * u;
    });
}

/// RMSNorm of each `w.len()`-wide row of `x` into `out`: `x / sqrt(mean(x^2) + eps) * w`,
/// with candle's rounding sequence (f32 sum of squares, divide, then multiply).
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let n = w.len();
    assert!(
        n > 0 && x.len() == out.len() && x.len().is_multiple_of(n),
        "rms_norm: shapes"
    );
    let rows = |x: &[f32], out: &mut [f32]| {
        for (src, dst) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
            let sum2: f32 = src.iter().map(|v| v * v).sum();
            let m = (sum2 / n as f32 + eps).sqrt();
            dst.iter_mut()
                .zip(src)
                .zip(w)
                .for_each(|((d, s), a)| *d = s / m * a);
        }
    };
    // Each row's bits are its own: splitting rows over threads changes none.
    if x.len() / n >= PAR_ROWS {
        x.par_chunks(16 * n)
            .zip(out.par_chunks_mut(16 * n))
            .for_each(|(x, out)| rows(x, out));
    } else {
        rows(x, out);
    }
}

/// `R x` for every row of `x (n, cols)`: [`uc_codec::rotation::rotate`] (its scalar code
/// is the specification), with the same butterflies on AVX-512 for blocks of 16, 64 and
/// 256 (every sum and difference is the reference's, so the bits are too). Rows in
/// parallel from 64 rows (prefill).
pub fn rotate(isa: Isa, x: &mut [f32], cols: usize, b: usize, signs: &[f32]) {
    assert!(
        cols > 0 && x.len().is_multiple_of(cols) && signs.len() == cols,
        "rotate: shapes"
    );
    let rows = |x: &mut [f32]| match isa {
        // SAFETY: AVX-512F available (guard); `b` is 16, 64 or 256 and divides `cols`
        // (asserted by the callee's contract below), every block is read and written
        // in bounds.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512
            if Isa::Avx512.is_available()
                && matches!(b, 16 | 64 | 256)
                && cols.is_multiple_of(b) =>
        unsafe { x86::rotate(x, cols, b, signs) },
        _ => uc_codec::rotation::rotate(x, cols, b, signs),
    };
    if x.len() / cols >= PAR_ROWS {
        x.par_chunks_mut(16 * cols).for_each(rows);
    } else {
        rows(x);
    }
}

/// In-place RMSNorm of each `w.len()`-wide row (per-head q/k norm).
pub fn rms_norm_inplace(x: &mut [f32], w: &[f32], eps: f32) {
    let n = w.len();
    for row in x.chunks_exact_mut(n) {
        let sum2: f32 = row.iter().map(|v| v * v).sum();
        let m = (sum2 / n as f32 + eps).sqrt();
        row.iter_mut().zip(w).for_each(|(d, a)| *d = *d / m * a);
    }
}

/// Rotary embedding of one head vector (`x.len() == 2 * cos.len()`), transformers'
/// rotate-half layout: `(x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)`.
#[inline]
pub fn rope(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = cos.len();
    let (a, b) = x.split_at_mut(half);
    for i in 0..half {
        let (x1, x2) = (a[i], b[i]);
        a[i] = x1 * cos[i] - x2 * sin[i];
        b[i] = x1 * sin[i] + x2 * cos[i];
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Every row of `x (n, cols)`: signs, the Walsh-Hadamard butterflies of span 1, 2,
    /// 4, ... in that order (spans below 16 within a vector: the partner lane by a
    /// permute, `x + y` kept in the lower lane and `x - y` in the upper; spans from 16
    /// between vectors), then `1 / sqrt(b)` (a power of two).
    ///
    /// # Safety
    /// AVX-512F; `b` in {16, 64, 256} divides `cols`; `signs.len() == cols`;
    /// `x.len()` a multiple of `cols`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn rotate(x: &mut [f32], cols: usize, b: usize, signs: &[f32]) {
        let k = _mm512_set1_ps(1.0 / (1u64 << (b.trailing_zeros() / 2)) as f32);
        let nv = b / 16;
        for row in x.chunks_exact_mut(cols) {
            for (blk, sb) in row.chunks_exact_mut(b).zip(signs.chunks_exact(b)) {
                let mut v = [_mm512_setzero_ps(); 16];
                for (i, v) in v.iter_mut().enumerate().take(nv) {
                    let x = _mm512_loadu_ps(blk.as_ptr().add(16 * i));
                    let s = _mm512_loadu_ps(sb.as_ptr().add(16 * i));
                    *v = _mm512_mul_ps(x, s);
                }
                for v in v.iter_mut().take(nv) {
                    let mut a = *v;
                    a = butterfly(a, _mm512_permute_ps::<0xb1>(a), 0xaaaa);
                    a = butterfly(a, _mm512_permute_ps::<0x4e>(a), 0xcccc);
                    a = butterfly(a, _mm512_shuffle_f32x4::<0xb1>(a, a), 0xf0f0);
                    a = butterfly(a, _mm512_shuffle_f32x4::<0x4e>(a, a), 0xff00);
                    *v = a;
                }
                let mut h = 1;
                while h < nv {
                    for base in (0..nv).step_by(2 * h) {
                        for i in base..base + h {
                            let (a, c) = (v[i], v[i + h]);
                            v[i] = _mm512_add_ps(a, c);
                            v[i + h] = _mm512_sub_ps(a, c);
                        }
                    }
                    h *= 2;
                }
                for (i, v) in v.iter().enumerate().take(nv) {
                    _mm512_storeu_ps(blk.as_mut_ptr().add(16 * i), _mm512_mul_ps(*v, k));
                }
            }
        }
    }

    /// One in-vector butterfly stage: `v` and its partners `p`; lanes in `upper` hold
    /// the second of each pair (`p - v = x - y`), the others the first (`v + p = x + y`).
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn butterfly(v: __m512, p: __m512, upper: __mmask16) -> __m512 {
        _mm512_mask_blend_ps(upper, _mm512_add_ps(v, p), _mm512_sub_ps(p, v))
    }

    /// exp of 16 lanes (Cephes expf polynomial; inputs clamped to [-87.3, 88.7]).
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub(super) unsafe fn exp512(x: __m512) -> __m512 {
        let x = _mm512_min_ps(
            _mm512_max_ps(x, _mm512_set1_ps(-87.336_55)),
            _mm512_set1_ps(88.722_83),
        );
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm512_set1_ps(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            1.666_666_5e-1,
            5e-1,
        ] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        let y = _mm512_add_ps(
            _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r),
            _mm512_set1_ps(1.0),
        );
        _mm512_scalef_ps(y, n)
    }

    /// exp of 8 lanes: [`exp512`]'s polynomial; `2^n` as two factors `2^(n>>1)` and
    /// `2^(n - (n>>1))` built in the exponent bits (each within the normal range).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub(super) unsafe fn exp256(x: __m256) -> __m256 {
        let x = _mm256_min_ps(
            _mm256_max_ps(x, _mm256_set1_ps(-87.336_55)),
            _mm256_set1_ps(88.722_83),
        );
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            1.666_666_5e-1,
            5e-1,
        ] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let y = _mm256_add_ps(
            _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r),
            _mm256_set1_ps(1.0),
        );
        let ni = _mm256_cvtps_epi32(n);
        let n1 = _mm256_srai_epi32(ni, 1);
        let n2 = _mm256_sub_epi32(ni, n1);
        let bias = _mm256_set1_epi32(127);
        let p1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
        let p2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
        _mm256_mul_ps(_mm256_mul_ps(y, p1), p2)
    }

    /// # Safety
    /// AVX2 + FMA available.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn exp_shifted_sum_avx2(xs: &mut [f32], shift: f32) -> f32 {
        let n = xs.len();
        let p = xs.as_mut_ptr();
        let s = _mm256_set1_ps(shift);
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        while i + 8 <= n {
            let e = exp256(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), s));
            _mm256_storeu_ps(p.add(i), e);
            acc = _mm256_add_ps(acc, e);
            i += 8;
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
        let mut total = lanes.iter().sum::<f32>();
        while i < n {
            *p.add(i) = (*p.add(i) - shift).exp();
            total += *p.add(i);
            i += 1;
        }
        total
    }

    /// # Safety
    /// AVX2 + FMA available; `gate.len() == up.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn silu_mul_avx2(gate: &mut [f32], up: &[f32]) {
        let n = gate.len();
        let (pg, pu) = (gate.as_mut_ptr(), up.as_ptr());
        let one = _mm256_set1_ps(1.0);
        let mut i = 0;
        while i + 8 <= n {
            let g = _mm256_loadu_ps(pg.add(i));
            let e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), g));
            let v = _mm256_mul_ps(
                _mm256_div_ps(g, _mm256_add_ps(one, e)),
                _mm256_loadu_ps(pu.add(i)),
            );
            _mm256_storeu_ps(pg.add(i), v);
            i += 8;
        }
        super::silu_mul_scalar(&mut gate[i..], &up[i..]);
    }

    #[inline(always)]
    fn lanes(n: usize) -> __mmask16 {
        if n >= 16 {
            0xffff
        } else {
            ((1u32 << n) - 1) as u16
        }
    }

    /// # Safety
    /// AVX-512F available.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn max(xs: &[f32]) -> f32 {
        let (n, p) = (xs.len(), xs.as_ptr());
        let low = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut m = low;
        let mut i = 0;
        while i < n {
            m = _mm512_max_ps(m, _mm512_mask_loadu_ps(low, lanes(n - i), p.add(i)));
            i += 16;
        }
        _mm512_reduce_max_ps(m)
    }

    /// # Safety
    /// AVX-512F available.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn scale(xs: &mut [f32], a: f32) {
        let (n, p) = (xs.len(), xs.as_mut_ptr());
        let a = _mm512_set1_ps(a);
        let mut i = 0;
        while i < n {
            let m = lanes(n - i);
            _mm512_mask_storeu_ps(
                p.add(i),
                m,
                _mm512_mul_ps(_mm512_maskz_loadu_ps(m, p.add(i)), a),
            );
            i += 16;
        }
    }

    /// # Safety
    /// AVX-512F available.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn exp_shifted_sum(xs: &mut [f32], shift: f32) -> f32 {
        let n = xs.len();
        let p = xs.as_mut_ptr();
        let s = _mm512_set1_ps(shift);
        let mut acc = _mm512_setzero_ps();
        let mut i = 0;
        while i < n {
            let m = lanes(n - i);
            let e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, p.add(i)), s));
            let e = _mm512_maskz_mov_ps(m, e);
            _mm512_mask_storeu_ps(p.add(i), m, e);
            acc = _mm512_add_ps(acc, e);
            i += 16;
        }
        _mm512_reduce_add_ps(acc)
    }

    /// # Safety
    /// AVX-512F available; `gate.len() == up.len()`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn silu_mul(gate: &mut [f32], up: &[f32]) {
        let n = gate.len();
        let (pg, pu) = (gate.as_mut_ptr(), up.as_ptr());
        let one = _mm512_set1_ps(1.0);
        let mut i = 0;
        while i < n {
            let m = lanes(n - i);
            let g = _mm512_maskz_loadu_ps(m, pg.add(i));
            let e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), g));
            let v = _mm512_mul_ps(
                _mm512_div_ps(g, _mm512_add_ps(one, e)),
                _mm512_maskz_loadu_ps(m, pu.add(i)),
            );
            _mm512_mask_storeu_ps(pg.add(i), m, v);
            i += 16;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simd_exp_is_within_named_tolerance_of_std_exp() {
        let xs: Vec<f32> = (0..20001)
            .map(|i| -87.0 + i as f32 * (175.0 / 20000.0))
            .collect();
        let mut want = xs.clone();
        let mut got = xs.clone();
        exp_shifted_sum_scalar(&mut want, 0.0);
        exp_shifted_sum(Isa::detect(), &mut got, 0.0);
        for ((g, w), x) in got.iter().zip(&want).zip(&xs) {
            assert!(
                (g - w).abs() <= EXP_REL_TOL * w.abs(),
                "exp({x}) = {g}, std {w}"
            );
        }
    }

    /// The SIMD rotation is the codec's, bit for bit, for every block size, on a few
    /// rows (decode) and on many (prefill, rows in parallel).
    #[test]
    fn rotation_is_bit_identical_to_the_codec_reference() {
        for b in uc_codec::ROTATIONS {
            let b = b as usize;
            for (cols, n) in [(b, 1), (3 * b, 2), (4 * b, PAR_ROWS + 3)] {
                let signs = uc_codec::rotation::signs(cols);
                let x: Vec<f32> = (0..n * cols)
                    .map(|i| ((i * 7919) % 1000) as f32 / 37.0 - 13.0)
                    .collect();
                let mut want = x.clone();
                uc_codec::rotation::rotate(&mut want, cols, b, &signs);
                for isa in Isa::ALL.into_iter().filter(|i| i.is_available()) {
                    let mut got = x.clone();
                    rotate(isa, &mut got, cols, b, &signs);
                    let same = got
                        .iter()
                        .zip(&want)
                        .all(|(g, w)| g.to_bits() == w.to_bits());
                    assert!(same, "b {b} cols {cols} rows {n} {isa:?}");
                }
            }
        }
    }

    #[test]
    fn softmax_sums_to_one_and_masks_nothing() {
        for n in [1, 5, 16, 17, 100] {
            let mut v: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin() * 5.0).collect();
            softmax(Isa::detect(), &mut v);
            let s: f32 = v.iter().sum();
            assert!((s - 1.0).abs() < 1e-5, "n={n}: {s}");
            assert!(v.iter().all(|p| *p > 0.0));
        }
    }

    #[test]
    fn simd_silu_matches_reference() {
        let g: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) / 25.0).collect();
        let u: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.1).cos()).collect();
        let (mut a, mut b) = (g.clone(), g.clone());
        silu_mul_scalar(&mut a, &u);
        silu_mul(Isa::detect(), &mut b, &u);
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-6 * (1.0 + x.abs()), "{x} vs {y}");
        }
    }
}
