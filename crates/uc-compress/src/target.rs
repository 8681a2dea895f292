//! Teacher-target correction of a linear's weight before error-feedback encoding.
//!
//! The quantized model sees its own, slightly drifted, activations `X_s` where the
//! teacher saw `X_t` (rows: the same calibration tokens). Encoding `W` to minimise
//! `|| X_s (Q - W)^T ||` reproduces the teacher's *weights*; what matters is the
//! teacher's *outputs*, `|| X_s Q^T - X_t W^T ||`. Its least-squares optimum is
//! `W' = W C^T H^-1` with `H = X_s^T X_s`, `C = X_s^T X_t`, and
//! `|| X_s Q^T - X_t W^T ||^2 = || X_s (Q - W')^T ||^2 + const`, so encoding `W'` with
//! the same `H` minimises the output error against the teacher (the asymmetric
//! calibration of GPTAQ, Li et al. 2025, applied as a target rather than inside the
//! column loop).
//!
//! Written as `W' = W + W (C^T - H) (H + lambda I)^-1`: the damping then only tempers
//! the correction, and without drift (`C = H`) `W' = W` exactly.

use faer::Mat;

/// `W'` for each weight of one stage, `ws[k]` = (`w`: rows x cols, row-major; rows),
/// all multiplying the same input: `h` = `X_s^T X_s` (cols x cols, row-major), `c` =
/// `X_s^T X_t` ([`crate::calib::Cross`]), damping `damp` x mean diagonal of `h`. `None`
/// for a weight whose result is not finite, and for all of them when the damped `h`
/// is not positive definite (callers keep `w`).
///
/// Memory: `c` is consumed. Its storage becomes `D = C - H`, every weight's right-hand
/// side `D^T W^T`-style product (`(C - H) W^T`, cols x rows) is formed, and `D` is freed
/// before the damped `H` is built and factored in its own storage
/// ([`uc_codec::chol`]); so at most two cols x cols f64 matrices besides `h` are ever
/// alive, against five when each weight made its own `D`, `H + lambda I`, Cholesky
/// factor and copies. The arithmetic is that of the per-weight form (same products, same
/// factorisation, same solve); the factor is simply computed once per stage.
pub fn teacher_targets(
    ws: &[(&[f32], usize)],
    cols: usize,
    h: &[f64],
    c: Mat<f64>,
    damp: f64,
) -> Vec<Option<Vec<f32>>> {
    let d = drift(c, h);
    let mut rts: Vec<Mat<f64>> = ws
        .iter()
        .map(|&(w, rows)| rhs(&d, w, 0, rows, cols))
        .collect();
    drop(d);
    let Some(l) = damped_factor(h, cols, damp) else {
        return vec![None; ws.len()];
    };
    ws.iter()
        .zip(rts.iter_mut())
        .map(|(&(w, rows), rt)| {
            let mut out = vec![0f32; rows * cols];
            corrected(&l, w, 0, rt, &mut out);
            out.iter().all(|v| v.is_finite()).then_some(out)
        })
        .collect()
}

/// Rows per step of [`teacher_target_rows`].
const TARGET_ROWS: usize = 4096;

/// [`teacher_targets`] of one tall weight (`w`: rows x cols, e.g. a 49152 x 576 head),
/// in place, [`TARGET_ROWS`] rows at a time: `D` and the factor are held together (two
/// cols x cols f64 matrices beside `h`) and the right-hand side only for one step,
/// instead of a cols x rows f64 matrix and a second f32 weight (for a 128256 x 2048
/// head, 2.1 GB and 1.05 GB). Rows are independent, so each gets the same products and
/// solve as in [`teacher_targets`] up to the summation order of the row-block products.
/// Returns false (with `w` partly rewritten: read it again) when the damped `h` is not
/// positive definite or a result is not finite.
pub fn teacher_target_rows(
    w: &mut [f32],
    rows: usize,
    cols: usize,
    h: &[f64],
    c: Mat<f64>,
    damp: f64,
) -> bool {
    let d = drift(c, h);
    let Some(l) = damped_factor(h, cols, damp) else {
        return false;
    };
    let mut out = vec![0f32; TARGET_ROWS.min(rows) * cols];
    for r0 in (0..rows).step_by(TARGET_ROWS) {
        let m = TARGET_ROWS.min(rows - r0);
        let mut rt = rhs(&d, w, r0, m, cols);
        let out = &mut out[..m * cols];
        corrected(&l, w, r0, &mut rt, out);
        if !out.iter().all(|v| v.is_finite()) {
            return false;
        }
        w[r0 * cols..(r0 + m) * cols].copy_from_slice(out);
    }
    true
}

/// `D = C - H` in `c`'s storage (`D^T = C^T - H`: `H` is symmetric).
fn drift(c: Mat<f64>, h: &[f64]) -> Mat<f64> {
    let cols = c.ncols();
    let mut d = c;
    for j in 0..cols {
        for i in 0..cols {
            d[(i, j)] -= h[i * cols + j];
        }
    }
    d
}

/// `R^T = D W^T` (cols x m) for rows `r0 .. r0 + m` of `w`.
fn rhs(d: &Mat<f64>, w: &[f32], r0: usize, m: usize, cols: usize) -> Mat<f64> {
    let wt = Mat::<f64>::from_fn(cols, m, |i, r| f64::from(w[(r0 + r) * cols + i]));
    d * &wt
}

/// The Cholesky factor of `H + lambda I`, `lambda = damp x mean diag H`; `None` if it is
/// not positive definite.
fn damped_factor(h: &[f64], cols: usize, damp: f64) -> Option<Mat<f64>> {
    let mean = (0..cols).map(|i| h[i * cols + i]).sum::<f64>() / cols as f64;
    let lambda = damp * mean;
    let mut hd = Mat::<f64>::from_fn(cols, cols, |i, j| {
        h[i * cols + j]
            + if i == j {
                lambda.max(f64::MIN_POSITIVE)
            } else {
                0.0
            }
    });
    uc_codec::chol::llt_in_place(&mut hd).ok()?;
    Some(hd)
}

/// `out` (m x cols) = rows `r0 ..` of `w` plus `(H + lambda I)^-1 R^T` transposed
/// (`rt` is solved in place).
fn corrected(l: &Mat<f64>, w: &[f32], r0: usize, rt: &mut Mat<f64>, out: &mut [f32]) {
    uc_codec::chol::llt_solve_in_place(l, rt.as_mut()); // (H + lambda I)^-1 R^T
    let cols = rt.nrows();
    for (k, o) in out.iter_mut().enumerate() {
        *o = (f64::from(w[r0 * cols + k]) + rt[(k % cols, k / cols)]) as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random values in [-1, 1).
    fn noise(n: usize, seed: u64) -> Vec<f64> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
            })
            .collect()
    }

    fn gram(a: &[f64], b: &[f64], n: usize, cols: usize) -> Vec<f64> {
        let mut g = vec![0.0; cols * cols];
        for r in 0..n {
            for i in 0..cols {
                for j in 0..cols {
                    g[i * cols + j] += a[r * cols + i] * b[r * cols + j];
                }
            }
        }
        g
    }

    /// The tall-weight form: the same numbers as [`teacher_targets`] (bit for bit when
    /// it takes one step), over several steps of rows too.
    #[test]
    fn row_steps_give_the_targets_of_the_whole() {
        let (n, cols) = (300, 6);
        let xs = noise(n * cols, 4);
        let xt: Vec<f64> = xs
            .iter()
            .zip(noise(n * cols, 5))
            .map(|(a, e)| a + 0.1 * e)
            .collect();
        let h = gram(&xs, &xs, n, cols);
        let c = gram(&xs, &xt, n, cols);
        let cm = || Mat::<f64>::from_fn(cols, cols, |i, j| c[i * cols + j]);
        for rows in [5, 2 * TARGET_ROWS + 3] {
            let w: Vec<f32> = noise(rows * cols, 6).iter().map(|&v| v as f32).collect();
            let whole = teacher_targets(&[(&w, rows)], cols, &h, cm(), 0.3)
                .pop()
                .unwrap()
                .unwrap();
            let mut steps = w.clone();
            assert!(teacher_target_rows(&mut steps, rows, cols, &h, cm(), 0.3));
            assert_ne!(whole, w, "the drift moves the target");
            if rows <= TARGET_ROWS {
                assert_eq!(steps, whole);
            }
            for (k, (a, b)) in steps.iter().zip(&whole).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-6 * (1.0 + b.abs()),
                    "{rows} rows, entry {k}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn no_drift_keeps_the_weight_and_drift_is_undone() {
        let (n, rows, cols) = (200, 3, 6);
        let xs = noise(n * cols, 1);
        let w: Vec<f32> = noise(rows * cols, 2).iter().map(|&v| v as f32).collect();
        let h = gram(&xs, &xs, n, cols);
        let target = |c: &[f64], damp| {
            let c = Mat::<f64>::from_fn(cols, cols, |i, j| c[i * cols + j]);
            teacher_targets(&[(&w, rows)], cols, &h, c, damp)
                .pop()
                .unwrap()
        };
        let same = target(&h, 0.01).unwrap();
        assert_eq!(same, w, "no drift: the target is the weight itself");

        // Teacher inputs: a fixed linear map of the student's, X_t = X_s M^T. Then the
        // exact answer is W' = W M, which reproduces the teacher outputs exactly.
        let m = noise(cols * cols, 3);
        let mut xt = vec![0.0; n * cols];
        for r in 0..n {
            for i in 0..cols {
                xt[r * cols + i] = (0..cols).map(|k| m[i * cols + k] * xs[r * cols + k]).sum();
            }
        }
        let c = gram(&xs, &xt, n, cols);
        let got = target(&c, 0.0).unwrap();
        for r in 0..rows {
            for k in 0..cols {
                let want: f64 = (0..cols)
                    .map(|i| f64::from(w[r * cols + i]) * m[i * cols + k])
                    .sum();
                let g = f64::from(got[r * cols + k]);
                assert!((g - want).abs() < 1e-4, "W'[{r},{k}] = {g}, want {want}");
            }
        }
    }
}
