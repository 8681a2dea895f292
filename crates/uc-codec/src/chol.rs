//! Cholesky factorisation, solve and inverse of large symmetric matrices in the storage
//! the caller already holds.
//!
//! faer's [`faer::linalg::solvers::Llt`] copies the matrix into a new factor, its
//! `solve` copies the right-hand side and its `inverse` allocates the result plus a
//! scratch matrix of the same size: three `n x n` f64 matrices alive at once where one
//! or two suffice. On the 8192-wide down_proj input of a Llama-3.2-1B-shaped model each
//! is 512 MiB (docs/research-log.md, 2026-12-03 night). These functions make the same
//! faer calls, with the same arguments, on the same values and matrix layout (a `Mat`
//! of the same size, hence the same column stride), so their results are
//! bit-identical to `Llt`'s (tested below against it); only where the data lives changes.

use faer::linalg::cholesky::llt;
use faer::linalg::matmul::triangular::{matmul, BlockStructure};
use faer::{get_global_parallelism, Accum, Mat, MatMut};

use crate::{CodecError, Result};

/// Zeros the strictly upper triangle of `a`.
fn zero_upper(a: &mut Mat<f64>) {
    for j in 0..a.ncols() {
        for i in 0..j.min(a.nrows()) {
            a[(i, j)] = 0.0;
        }
    }
}

/// Replaces the square `a` by its lower Cholesky factor `L` (`a = L L^T`), upper
/// triangle zero: exactly `Llt::new(a, Side::Lower)`'s factor (which copies the lower
/// triangle into a zeroed matrix and factors that), computed in `a`. On failure (`a`
/// not positive definite) the contents of `a` are unspecified.
pub fn llt_in_place(a: &mut Mat<f64>) -> std::result::Result<(), llt::factor::LltError> {
    let par = get_global_parallelism();
    let n = a.nrows();
    zero_upper(a);
    let mut mem = faer::dyn_stack::MemBuffer::new(llt::factor::cholesky_in_place_scratch::<f64>(
        n,
        par,
        Default::default(),
    ));
    let stack = faer::dyn_stack::MemStack::new(&mut mem);
    llt::factor::cholesky_in_place(
        a.as_mut(),
        Default::default(),
        par,
        stack,
        Default::default(),
    )?;
    zero_upper(a);
    Ok(())
}

/// Solves `L L^T x = rhs` in place for the factor `l` of [`llt_in_place`]: exactly
/// `Llt::solve` (which copies `rhs` and solves the copy in place).
pub fn llt_solve_in_place(l: &Mat<f64>, rhs: MatMut<'_, f64>) {
    let par = get_global_parallelism();
    let mut mem = faer::dyn_stack::MemBuffer::new(llt::solve::solve_in_place_scratch::<f64>(
        l.nrows(),
        rhs.ncols(),
        par,
    ));
    let stack = faer::dyn_stack::MemStack::new(&mut mem);
    llt::solve::solve_in_place_with_conj(l.as_ref(), faer::Conj::No, rhs, par, stack);
}

/// `(L L^T)^-1` for the factor `l` of [`llt_in_place`], written into `l`'s storage:
/// exactly `Llt::inverse` (`L^-1` by faer's triangular inverse, then the lower triangle
/// of `L^-T L^-1` by its triangular product, then mirrored), holding two `n x n`
/// matrices (`L` or the result, and `L^-1`) instead of three.
pub fn llt_inverse(l: Mat<f64>) -> Mat<f64> {
    let par = get_global_parallelism();
    let n = l.nrows();
    // `Llt::inverse` takes this from uninitialised scratch; the triangular inverse
    // writes it and the product reads only its lower triangle.
    let mut l_inv = Mat::<f64>::zeros(n, n);
    faer::linalg::triangular_inverse::invert_lower_triangular(l_inv.as_mut(), l.as_ref(), par);
    // L is no longer needed: its storage becomes the result, zeroed as `Llt::inverse`'s
    // fresh output is.
    let mut out = l;
    out.as_mut().fill(0.0);
    matmul(
        out.as_mut(),
        BlockStructure::TriangularLower,
        Accum::Replace,
        l_inv.adjoint(),
        BlockStructure::TriangularUpper,
        l_inv.as_ref(),
        BlockStructure::TriangularLower,
        1.0,
        par,
    );
    drop(l_inv);
    // faer's `make_self_adjoint` for a real matrix: the upper triangle mirrors the lower.
    for j in 0..n {
        for i in 0..j {
            out[(i, j)] = out[(j, i)];
        }
    }
    out
}

/// The lower Cholesky factor of the symmetric matrix with diagonal `diag + lambda` and
/// off-diagonal entries `off(i, j)`; if that is not positive definite, `lambda` is
/// raised tenfold, up to three times. Shared by the error-feedback encoder and the
/// overlay fit, so both damp a Gram matrix alike. One `n x n` matrix is alive (the
/// matrix becomes its factor).
pub(crate) fn damped_llt(
    diag: &[f64],
    lambda: f64,
    off: impl Fn(usize, usize) -> f64,
) -> Result<Mat<f64>> {
    let n = diag.len();
    let mut lambda = lambda;
    for _ in 0..4 {
        // Only the lower triangle is factored (`Llt::new(_, Side::Lower)` reads no
        // more), so the upper one is not filled.
        let mut hp = Mat::<f64>::from_fn(n, n, |i, j| {
            if i == j {
                diag[i] + lambda
            } else if i > j {
                off(i, j)
            } else {
                0.0
            }
        });
        if llt_in_place(&mut hp).is_ok() {
            return Ok(hp);
        }
        lambda *= 10.0;
    }
    Err(CodecError::BadGram {
        tensor: String::new(),
        reason: format!("Cholesky failed with damping up to {lambda:e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use faer::linalg::solvers::{DenseSolveCore, Solve};
    use faer::Side;

    /// A symmetric positive definite `n x n` matrix from deterministic noise.
    fn spd(n: usize, seed: u64) -> Mat<f64> {
        let x = crate::testutil::noise(n * (n + 3), seed);
        let m = n + 3;
        let mut a = Mat::<f64>::zeros(n, n);
        for i in 0..n {
            for j in 0..=i {
                let v: f64 = (0..m)
                    .map(|k| f64::from(x[i * m + k]) * f64::from(x[j * m + k]))
                    .sum();
                a[(i, j)] = v;
                a[(j, i)] = v;
            }
        }
        a
    }

    fn bits(m: &Mat<f64>) -> Vec<u64> {
        let mut v = Vec::with_capacity(m.nrows() * m.ncols());
        for j in 0..m.ncols() {
            for i in 0..m.nrows() {
                v.push(m[(i, j)].to_bits());
            }
        }
        v
    }

    /// Sizes around faer's block sizes and SIMD widths, odd ones included (a column
    /// stride padded past the row count).
    #[test]
    fn in_place_results_are_the_bits_of_faers_llt() {
        for (n, seed) in [(1, 1), (7, 2), (64, 3), (129, 4), (300, 5), (577, 6)] {
            let a = spd(n, seed);
            let reference = a.llt(Side::Lower).unwrap();
            let mut l = a.clone();
            llt_in_place(&mut l).unwrap();
            assert_eq!(bits(&l), bits(&reference.L().to_owned()), "factor, n = {n}");

            let rhs = Mat::<f64>::from_fn(n, 5, |i, j| ((i * 7 + j * 3) % 11) as f64 - 5.0);
            let want = reference.solve(&rhs);
            let mut got = rhs.clone();
            llt_solve_in_place(&l, got.as_mut());
            assert_eq!(bits(&got), bits(&want), "solve, n = {n}");

            let inv = llt_inverse(l);
            assert_eq!(bits(&inv), bits(&reference.inverse()), "inverse, n = {n}");
        }
    }

    #[test]
    fn damping_is_raised_until_the_factor_exists() {
        // All off-diagonal entries 2 with unit diagonal: indefinite until damped.
        let l = damped_llt(&[1.0; 4], 0.5, |_, _| 2.0).unwrap();
        assert!(l[(0, 0)] > 0.0 && l[(0, 1)] == 0.0);
        assert!(damped_llt(&[1.0; 4], 0.0, |_, _| f64::NAN).is_err());
    }
}
