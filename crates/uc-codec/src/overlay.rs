//! Low-rank overlay fit in the activation metric.
//!
//! After a weight `W'` (rows x cols) is encoded to `Q`, the residual `R = W' - Q` is
//! what the codes could not express. The overlay `A B` (A: rows x r, B: r x cols) that
//! best removes it from the layer's outputs on the calibration activations `X` minimises
//! `|| (R - A B) X^T ||_F^2 = tr((R - A B) H (R - A B)^T)` with `H = X^T X`. With
//! `H = L L^T` (Cholesky of the damped `H`) this is `|| R L - A B L ||_F`, so the best
//! rank-r fit is the truncated SVD of the whitened residual `R L = U S V^T`: the overlay's
//! column space is `U_r` ("activation-whitened SVD", as in the starting design).
//!
//! Storage is bf16, so the factors are fitted in two steps that keep the rounding in
//! view: `A = U_r sqrt(S_r)` is rounded first, then `B` is solved for the rounded `A`
//! (for a fixed `A`, `B = (A^T A)^-1 A^T R` minimises the H-weighted error whatever `H`
//! is, since every column of the error is then orthogonal to `A`'s span) and rounded.
//!
//! Deterministic: the factorisations run on faer's sequential paths and every loop
//! has a fixed order.

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, Par, Side};

use crate::tensor::bf16_to_f32;
use crate::{CodecError, Overlay, Result};

/// f32 -> bf16 bits, round to nearest even (finite inputs).
fn bf16_bits(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}

/// Fits a rank-`rank` overlay to `resid` (rows x cols, row-major) in the metric of `h`
/// (cols x cols Gram matrix of the inputs; `None`: plain Frobenius norm). `damp` is the
/// fraction of the mean diagonal added to `h` before factorising (raised tenfold up to
/// three times if `h` is still not positive definite).
pub fn fit_overlay(
    resid: &[f32],
    rows: usize,
    cols: usize,
    rank: usize,
    h: Option<&[f64]>,
    damp: f64,
) -> Result<Overlay> {
    if resid.len() != rows * cols {
        return Err(CodecError::LengthMismatch {
            tensor: String::new(),
            what: "residual",
            expected: rows * cols,
            found: resid.len(),
        });
    }
    if rank == 0 || rank > rows.min(cols) {
        return Err(CodecError::BadGram {
            tensor: String::new(),
            reason: format!("overlay rank {rank} outside 1..={}", rows.min(cols)),
        });
    }
    let r = Mat::<f64>::from_fn(rows, cols, |i, j| f64::from(resid[i * cols + j]));
    // The whitened residual R L (rows x cols).
    let whitened = match h {
        None => r.clone(),
        Some(h) => {
            let l = cholesky_lower(h, cols, damp)?;
            let mut m = Mat::<f64>::zeros(rows, cols);
            matmul(
                m.as_mut(),
                Accum::Replace,
                r.as_ref(),
                l.as_ref(),
                1.0,
                Par::Seq,
            );
            m
        }
    };
    let svd = whitened.thin_svd().map_err(|e| CodecError::BadGram {
        tensor: String::new(),
        reason: format!("SVD of the whitened residual failed: {e:?}"),
    })?;
    let (u, s) = (svd.U(), svd.S());
    // Singular values in descending order (ties by index), whatever order faer returns.
    let k = rows.min(cols);
    let mut order: Vec<usize> = (0..k).collect();
    order.sort_by(|&a, &b| s[b].total_cmp(&s[a]).then(a.cmp(&b)));
    // A = U_r sqrt(S_r), rounded to bf16: (rows, rank).
    let mut a_bits = vec![0u16; rows * rank];
    for i in 0..rows {
        for (c, &o) in order[..rank].iter().enumerate() {
            a_bits[i * rank + c] = bf16_bits((u[(i, o)] * s[o].max(0.0).sqrt()) as f32);
        }
    }
    let a = Mat::<f64>::from_fn(rows, rank, |i, c| {
        f64::from(bf16_to_f32(a_bits[i * rank + c]))
    });
    // B = (A^T A)^-1 A^T R for the rounded A: (rank, cols).
    let mut ata = Mat::<f64>::zeros(rank, rank);
    matmul(
        ata.as_mut(),
        Accum::Replace,
        a.transpose(),
        a.as_ref(),
        1.0,
        Par::Seq,
    );
    let mut atr = Mat::<f64>::zeros(rank, cols);
    matmul(
        atr.as_mut(),
        Accum::Replace,
        a.transpose(),
        r.as_ref(),
        1.0,
        Par::Seq,
    );
    // A tiny ridge keeps a rank-deficient A (a residual of rank < r) solvable.
    let ridge = 1e-12
        * (0..rank)
            .map(|c| ata[(c, c)])
            .fold(0f64, f64::max)
            .max(1e-300);
    for c in 0..rank {
        ata[(c, c)] += ridge;
    }
    let llt = ata.llt(Side::Lower).map_err(|e| CodecError::BadGram {
        tensor: String::new(),
        reason: format!("overlay normal equations: {e:?}"),
    })?;
    let b = faer::linalg::solvers::Solve::solve(&llt, &atr);
    let mut b_bits = vec![0u16; rank * cols];
    for c in 0..rank {
        for j in 0..cols {
            let v = b[(c, j)];
            if !v.is_finite() {
                return Err(CodecError::BadGram {
                    tensor: String::new(),
                    reason: "overlay factor B is not finite".into(),
                });
            }
            b_bits[c * cols + j] = bf16_bits(v as f32);
        }
    }
    Ok(Overlay {
        rank,
        a: a_bits,
        b: b_bits,
    })
}

/// Lower Cholesky factor of `h + lambda I` (`lambda = damp * mean diag`, zero diagonal
/// entries read as 1), damping raised tenfold up to three times if needed.
fn cholesky_lower(h: &[f64], n: usize, damp: f64) -> Result<Mat<f64>> {
    if h.len() != n * n {
        return Err(CodecError::LengthMismatch {
            tensor: String::new(),
            what: "gram matrix",
            expected: n * n,
            found: h.len(),
        });
    }
    let diag: Vec<f64> = (0..n)
        .map(|j| {
            if h[j * n + j] > 0.0 {
                h[j * n + j]
            } else {
                1.0
            }
        })
        .collect();
    let lambda = damp * (diag.iter().sum::<f64>() / n as f64);
    crate::chol::damped_llt(&diag, lambda, |i, j| h[i * n + j])
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::testutil::{h_trace as h_err, noise};

    fn apply(o: &Overlay, rows: usize, cols: usize) -> Vec<f32> {
        let mut out = vec![0f32; rows * cols];
        for i in 0..rows {
            for j in 0..cols {
                for k in 0..o.rank {
                    out[i * cols + j] +=
                        bf16_to_f32(o.a[i * o.rank + k]) * bf16_to_f32(o.b[k * cols + j]);
                }
            }
        }
        out
    }

    #[test]
    fn recovers_a_low_rank_residual_to_bf16_precision() {
        let (rows, cols, rank) = (24, 16, 2);
        let u = noise(rows * rank, 1);
        let v = noise(rank * cols, 2);
        let mut r = vec![0f32; rows * cols];
        for i in 0..rows {
            for j in 0..cols {
                for k in 0..rank {
                    r[i * cols + j] += u[i * rank + k] * v[k * cols + j];
                }
            }
        }
        let o = fit_overlay(&r, rows, cols, rank, None, 0.0).unwrap();
        let fit = apply(&o, rows, cols);
        let num: f32 = r.iter().zip(&fit).map(|(a, b)| (a - b).powi(2)).sum();
        let den: f32 = r.iter().map(|a| a * a).sum();
        assert!(
            (num / den).sqrt() < 1e-2,
            "relative error {}",
            (num / den).sqrt()
        );
    }

    #[test]
    fn the_activation_metric_beats_the_plain_fit_where_inputs_are_uneven() {
        // Inputs with one loud channel: the fit must spend its rank where H is large.
        let (rows, cols, rank, n) = (16, 12, 2, 64);
        let mut x = noise(n * cols, 3);
        for t in 0..n {
            x[t * cols + 5] *= 30.0;
        }
        let mut h = vec![0f64; cols * cols];
        for t in 0..n {
            for p in 0..cols {
                for q in 0..cols {
                    h[p * cols + q] += f64::from(x[t * cols + p]) * f64::from(x[t * cols + q]);
                }
            }
        }
        let r = noise(rows * cols, 4);
        let weighted = apply(
            &fit_overlay(&r, rows, cols, rank, Some(&h), 0.0).unwrap(),
            rows,
            cols,
        );
        let plain = apply(
            &fit_overlay(&r, rows, cols, rank, None, 0.0).unwrap(),
            rows,
            cols,
        );
        let none = vec![0f32; rows * cols];
        let (ew, ep, e0) = (
            h_err(&r, &weighted, cols, &h),
            h_err(&r, &plain, cols, &h),
            h_err(&r, &none, cols, &h),
        );
        assert!(ew < ep && ep <= e0, "weighted {ew}, plain {ep}, none {e0}");
        assert!(
            ew < 0.5 * e0,
            "the loud channel's error is mostly removed: {ew} vs {e0}"
        );
    }

    #[test]
    fn rejects_a_rank_above_the_matrix_rank_bound() {
        assert!(fit_overlay(&[0.0; 6], 2, 3, 3, None, 0.0).is_err());
        assert!(fit_overlay(&[0.0; 6], 2, 3, 0, None, 0.0).is_err());
    }

    #[test]
    fn a_zero_residual_gives_a_zero_overlay() {
        let o = fit_overlay(&[0.0; 12], 3, 4, 1, None, 0.0).unwrap();
        assert!(apply(&o, 3, 4).iter().all(|&v| v == 0.0));
    }
}
