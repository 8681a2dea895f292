//! Dense f32 kernels: dot product, `y += a x`, row-block mat-vec, and a checked wrapper
//! around the `gemm` crate.
//!
//! The scalar functions are the references: plain sequential f32 sums. The SIMD variants
//! split the sum over lanes and accumulators, so they agree with the reference within
//! [`DOT_REL_TOL`] of `sum |a_i b_i|`, not bit for bit.

use super::Isa;

/// Tolerance of a SIMD dot product against the sequential reference, relative to
/// `sum |a_i * b_i|` (f32 summation in a different order; a few ulps per term at most).
pub const DOT_REL_TOL: f32 = 1e-5;

/// `sum a_i b_i`, sequentially (the reference).
pub fn dot_scalar(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).fold(0.0f32, |s, (x, y)| s + x * y)
}

/// `sum a_i b_i` over `min(a.len(), b.len())` elements with `isa`.
#[inline]
pub fn dot(isa: Isa, a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    match isa {
        // SAFETY (both arms): callers obtain `isa` from `Isa::detect`/`or_scalar`, which
        // only return an ISA the CPU supports; the kernels read `n` elements of each slice.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if Isa::Avx512.is_available() => unsafe { x86::dot_avx512(a, b) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if Isa::Avx2.is_available() => unsafe { x86::dot_avx2(a, b) },
        _ => dot_scalar(a, b),
    }
}

/// `y_i += alpha x_i` (the reference).
pub fn axpy_scalar(alpha: f32, x: &[f32], y: &mut [f32]) {
    y.iter_mut().zip(x).for_each(|(y, x)| *y += alpha * x);
}

/// `y_i += alpha x_i` over `min(x.len(), y.len())` elements with `isa`. Element-wise,
/// so every variant gives the reference's bits when it does not fuse the multiply-add;
/// the SIMD ones do (FMA), within one rounding of the reference.
#[inline]
pub fn axpy(isa: Isa, alpha: f32, x: &[f32], y: &mut [f32]) {
    let n = x.len().min(y.len());
    let (x, y) = (&x[..n], &mut y[..n]);
    match isa {
        // SAFETY: as in `dot`.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if Isa::Avx512.is_available() => unsafe { x86::axpy_avx512(alpha, x, y) },
        // SAFETY: as in `dot`.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if Isa::Avx2.is_available() => unsafe { x86::axpy_avx2(alpha, x, y) },
        _ => axpy_scalar(alpha, x, y),
    }
}

/// `y[r] = W[r, :] . x` for the `y.len()` rows of `w` (row-major, `cols` wide).
pub fn matvec(isa: Isa, w: &[f32], cols: usize, x: &[f32], y: &mut [f32]) {
    assert!(
        w.len() >= y.len() * cols && x.len() >= cols,
        "matvec: buffers too short"
    );
    for (r, out) in y.iter_mut().enumerate() {
        *out = dot(isa, &w[r * cols..(r + 1) * cols], &x[..cols]);
    }
}

/// A matrix operand for [`gemm`]: element `(i, j)` is `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub struct Mat<'a> {
    /// Backing storage.
    pub data: &'a [f32],
    /// Row stride (elements).
    pub rs: usize,
    /// Column stride (elements).
    pub cs: usize,
}

impl<'a> Mat<'a> {
    /// Row-major with leading dimension `ld`.
    pub fn rows(data: &'a [f32], ld: usize) -> Self {
        Mat {
            data,
            rs: ld,
            cs: 1,
        }
    }

    /// The transpose of a row-major matrix with leading dimension `ld`.
    pub fn rows_t(data: &'a [f32], ld: usize) -> Self {
        Mat {
            data,
            rs: 1,
            cs: ld,
        }
    }

    /// Whether an `m x n` matrix with these strides lies inside `data`.
    fn fits(&self, m: usize, n: usize) -> bool {
        if m == 0 || n == 0 {
            return true;
        }
        let last = (m - 1)
            .checked_mul(self.rs)
            .and_then(|a| (n - 1).checked_mul(self.cs).and_then(|b| a.checked_add(b)));
        last.is_some_and(|l| l < self.data.len())
    }
}

/// `C (m x n, row-major, leading dim ldc) (+)= A (m x k) . B (k x n)`, single-threaded
/// (callers parallelise over independent tiles). Panics if an operand does not fit its
/// slice -- a shape bug, never input-dependent.
// A BLAS-shaped signature: splitting it into structs would only rename the same fields.
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    m: usize,
    n: usize,
    k: usize,
    a: Mat,
    b: Mat,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    let c_fits = (m - 1)
        .checked_mul(ldc)
        .and_then(|x| x.checked_add(n))
        .is_some_and(|e| e <= c.len());
    assert!(c_fits && n <= ldc, "gemm: output out of bounds");
    // SAFETY: the output lies inside `c` (checked), which is borrowed mutably.
    unsafe { gemm_raw(m, n, k, a, b, c.as_mut_ptr(), ldc, accumulate) }
}

/// `C (m x n, row-major, leading dim ldc) = A (m x k) . B (k x n)` on all the threads of
/// the current rayon pool (the `gemm` crate splits the work).
pub fn gemm_par(m: usize, n: usize, k: usize, a: Mat, b: Mat, c: &mut [f32], ldc: usize) {
    if m == 0 || n == 0 {
        return;
    }
    let c_fits = (m - 1)
        .checked_mul(ldc)
        .and_then(|x| x.checked_add(n))
        .is_some_and(|e| e <= c.len());
    assert!(c_fits && n <= ldc, "gemm_par: output out of bounds");
    assert!(
        a.fits(m, k) && b.fits(k, n),
        "gemm_par: input out of bounds"
    );
    if k == 0 {
        c.iter_mut().for_each(|v| *v = 0.0);
        return;
    }
    let threads = rayon::current_num_threads().max(1);
    // SAFETY: every element read or written lies inside the slices (checked above), and
    // `c` is borrowed mutably.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            ldc as isize,
            false,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(threads),
        )
    }
}

/// # Safety
/// `c` must be valid for writes at `i * ldc + j` for `i < m, j < n`, and no other
/// thread may access those elements during the call.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_raw(
    m: usize,
    n: usize,
    k: usize,
    a: Mat,
    b: Mat,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    assert!(a.fits(m, k) && b.fits(k, n), "gemm: input out of bounds");
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                std::slice::from_raw_parts_mut(c.add(i * ldc), n).fill(0.0);
            }
        }
        return;
    }
    gemm::gemm(
        m,
        n,
        k,
        c,
        1,
        ldc as isize,
        accumulate,
        a.data.as_ptr(),
        a.cs as isize,
        a.rs as isize,
        b.data.as_ptr(),
        b.cs as isize,
        b.rs as isize,
        1.0,
        1.0,
        false,
        false,
        false,
        gemm::Parallelism::None,
    )
}

/// Columns `c0 .. c0 + len` of an `(n, ld)` row-major output that several threads fill
/// at once, each owning a disjoint column range. Made only by [`split_columns`].
pub struct ColBlock<'a> {
    ptr: *mut f32,
    ld: usize,
    n: usize,
    c0: usize,
    len: usize,
    _borrow: std::marker::PhantomData<&'a mut [f32]>,
}

// SAFETY: a ColBlock is the exclusive owner of its elements (split_columns hands out
// disjoint column ranges of a buffer it borrows mutably for 'a).
unsafe impl Send for ColBlock<'_> {}

/// Splits `y` (`n` rows of `ld`) into column blocks at `bounds` (ascending, within
/// `0..=ld`): block `i` is columns `bounds[i] .. bounds[i + 1]`.
pub fn split_columns<'a>(
    y: &'a mut [f32],
    n: usize,
    ld: usize,
    bounds: &[usize],
) -> Vec<ColBlock<'a>> {
    assert!(y.len() == n * ld, "split_columns: buffer is not n x ld");
    assert!(
        bounds.windows(2).all(|w| w[0] <= w[1]) && bounds.last().is_none_or(|&b| b <= ld),
        "split_columns: bounds"
    );
    let ptr = y.as_mut_ptr();
    bounds
        .windows(2)
        .map(|w| ColBlock {
            ptr,
            ld,
            n,
            c0: w[0],
            len: w[1] - w[0],
            _borrow: std::marker::PhantomData,
        })
        .collect()
}

impl<'a> ColBlock<'a> {
    /// First column.
    pub fn first(&self) -> usize {
        self.c0
    }

    /// Width.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the block has no columns.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Rows (tokens).
    pub fn n(&self) -> usize {
        self.n
    }

    /// Splits the block into row ranges of `step` rows (the last may be shorter), each
    /// owning the same columns of its rows. Returns `(first row, block)` pairs.
    pub fn split_rows(self, step: usize) -> Vec<(usize, ColBlock<'a>)> {
        let step = step.max(1);
        (0..self.n)
            .step_by(step)
            .map(|t0| {
                let rows = step.min(self.n - t0);
                // SAFETY: t0 < n, so the offset stays inside the split buffer.
                let ptr = unsafe { self.ptr.add(t0 * self.ld) };
                (
                    t0,
                    ColBlock {
                        ptr,
                        ld: self.ld,
                        n: rows,
                        c0: self.c0,
                        len: self.len,
                        _borrow: std::marker::PhantomData,
                    },
                )
            })
            .collect()
    }

    /// Row `t` of the block, `len` elements.
    pub fn row_mut(&mut self, t: usize) -> &mut [f32] {
        assert!(t < self.n, "ColBlock::row_mut: row out of range");
        // SAFETY: in bounds (t < n, c0 + len <= ld, buffer is n x ld) and exclusively
        // owned by this block (split_columns gives disjoint ranges); the returned borrow
        // ties up `self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(t * self.ld + self.c0), self.len) }
    }

    /// Every row of the block at once: `n` disjoint slices of `len` elements.
    pub fn rows_mut(&mut self) -> Vec<&mut [f32]> {
        // SAFETY: as `row_mut`; rows t != t' are disjoint (ld >= c0 + len), and all the
        // returned borrows tie up `self`.
        (0..self.n)
            .map(|t| unsafe {
                std::slice::from_raw_parts_mut(self.ptr.add(t * self.ld + self.c0), self.len)
            })
            .collect()
    }

    /// `block (+)= A (n x k) . B (k x len)`.
    pub fn gemm(&mut self, k: usize, a: Mat, b: Mat, accumulate: bool) {
        if self.len == 0 || self.n == 0 {
            return;
        }
        // SAFETY: rows t < n at columns c0 .. c0 + len are inside the split buffer and
        // owned by this block alone.
        unsafe {
            gemm_raw(
                self.n,
                self.len,
                k,
                a,
                b,
                self.ptr.add(self.c0),
                self.ld,
                accumulate,
            )
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU must support AVX-512F; `a.len() == b.len()`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len();
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut i = 0;
        while i + 64 <= n {
            for (u, acc) in acc.iter_mut().enumerate() {
                let o = i + 16 * u;
                *acc =
                    _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(o)), _mm512_loadu_ps(pb.add(o)), *acc);
            }
            i += 64;
        }
        while i + 16 <= n {
            acc[0] = _mm512_fmadd_ps(
                _mm512_loadu_ps(pa.add(i)),
                _mm512_loadu_ps(pb.add(i)),
                acc[0],
            );
            i += 16;
        }
        if i < n {
            let m: __mmask16 = ((1u32 << (n - i)) - 1) as u16;
            acc[1] = _mm512_fmadd_ps(
                _mm512_maskz_loadu_ps(m, pa.add(i)),
                _mm512_maskz_loadu_ps(m, pb.add(i)),
                acc[1],
            );
        }
        let s = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
        _mm512_reduce_add_ps(s)
    }

    /// # Safety
    /// The CPU must support AVX-512F; `x.len() == y.len()`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn axpy_avx512(alpha: f32, x: &[f32], y: &mut [f32]) {
        let n = x.len();
        let (px, py) = (x.as_ptr(), y.as_mut_ptr());
        let a = _mm512_set1_ps(alpha);
        let mut i = 0;
        while i + 16 <= n {
            _mm512_storeu_ps(
                py.add(i),
                _mm512_fmadd_ps(a, _mm512_loadu_ps(px.add(i)), _mm512_loadu_ps(py.add(i))),
            );
            i += 16;
        }
        if i < n {
            let m: __mmask16 = ((1u32 << (n - i)) - 1) as u16;
            let v = _mm512_fmadd_ps(
                a,
                _mm512_maskz_loadu_ps(m, px.add(i)),
                _mm512_maskz_loadu_ps(m, py.add(i)),
            );
            _mm512_mask_storeu_ps(py.add(i), m, v);
        }
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA; `x.len() == y.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn axpy_avx2(alpha: f32, x: &[f32], y: &mut [f32]) {
        let n = x.len();
        let (px, py) = (x.as_ptr(), y.as_mut_ptr());
        let a = _mm256_set1_ps(alpha);
        let mut i = 0;
        while i + 8 <= n {
            _mm256_storeu_ps(
                py.add(i),
                _mm256_fmadd_ps(a, _mm256_loadu_ps(px.add(i)), _mm256_loadu_ps(py.add(i))),
            );
            i += 8;
        }
        while i < n {
            *py.add(i) = alpha.mul_add(*px.add(i), *py.add(i));
            i += 1;
        }
    }

    /// Horizontal sum of 8 lanes.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum256(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA; `a.len() == b.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len();
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            for (u, acc) in acc.iter_mut().enumerate() {
                let o = i + 8 * u;
                *acc =
                    _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(o)), _mm256_loadu_ps(pb.add(o)), *acc);
            }
            i += 32;
        }
        while i + 8 <= n {
            acc[0] = _mm256_fmadd_ps(
                _mm256_loadu_ps(pa.add(i)),
                _mm256_loadu_ps(pb.add(i)),
                acc[0],
            );
            i += 8;
        }
        let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let mut total = hsum256(s);
        while i < n {
            total += *pa.add(i) * *pb.add(i);
            i += 1;
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 2001) as f32 / 1000.0 - 1.0)
            .collect()
    }

    #[test]
    fn simd_dot_matches_scalar_reference_within_tolerance_for_every_length() {
        for n in [0, 1, 7, 15, 16, 17, 63, 64, 65, 100, 576, 1536] {
            let (a, b) = (data(n, 1), data(n, 7));
            let want = dot_scalar(&a, &b);
            let scale: f32 = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (x * y).abs())
                .sum::<f32>()
                .max(1e-30);
            for isa in Isa::ALL.into_iter().filter(|i| i.is_available()) {
                let got = dot(isa, &a, &b);
                assert!(
                    (got - want).abs() <= DOT_REL_TOL * scale,
                    "{isa:?} n={n}: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn simd_axpy_matches_scalar_reference_within_one_rounding() {
        for n in [1, 15, 16, 33, 577] {
            let x = data(n, 3);
            let mut want = data(n, 5);
            let mut got = want.clone();
            axpy_scalar(0.37, &x, &mut want);
            axpy(Isa::detect(), 0.37, &x, &mut got);
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() <= 1e-6 * (1.0 + w.abs()), "{g} vs {w}");
            }
        }
    }

    #[test]
    fn gemm_matches_naive_product_with_strides() {
        let (m, n, k) = (5, 7, 9);
        let a = data(m * k, 1);
        let bt = data(n * k, 2); // B^T stored row-major (n x k)
        let mut c = vec![1.0f32; m * 8];
        gemm(
            m,
            n,
            k,
            Mat::rows(&a, k),
            Mat::rows_t(&bt, k),
            &mut c,
            8,
            true,
        );
        for i in 0..m {
            for j in 0..n {
                let want = 1.0 + dot_scalar(&a[i * k..(i + 1) * k], &bt[j * k..(j + 1) * k]);
                assert!((c[i * 8 + j] - want).abs() < 1e-5, "({i},{j})");
            }
        }
    }
}
