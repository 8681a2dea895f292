//! Error-feedback encoder (GPTQ-style) onto the codec's learned grid.
//!
//! Given a weight `W` (rows x cols) and the Gram matrix `H = X^T X` (cols x cols) of the
//! activations that multiply it, pick codes column by column and push each column's
//! rounding error onto the columns not yet quantized, in the proportions that minimise
//! the output error `|| (W - W_hat) X^T ||^2` (Frantar et al., GPTQ, 2022). The grid is
//! fixed first: codebook and group scales come from [`encode_rtn`] with the diagonal of
//! `H` as column importance, so only the code choice uses error feedback and every
//! group's scale is known before any of its columns is visited, whatever the column
//! order.
//!
//! Choices (documented in docs/format.md's encoder notes as well):
//! - damping: `H += damp * mean(diag H) * I` (default 1%), raised tenfold up to three
//!   times if `H` is still not positive definite; columns with `H_jj = 0` (inputs always
//!   zero) get `H_jj = 1`;
//! - order: descending `H_jj` ("act-order"), ties by index;
//! - update: rows are independent, so each row runs the whole recursion on its own
//!   (rayon over rows); `U` is the upper Cholesky factor of `H^-1` in visiting order:
//!   after column `i`, `w[j] -= (w[i] - q[i]) / U[i,i] * U[i,j]` for `j > i`.
//!
//! Deterministic: every row's arithmetic is sequential and the factorisation runs on
//! one thread, so the codes do not depend on the thread count.

use faer::linalg::solvers::DenseSolveCore;
use faer::{Mat, Side};
use rayon::prelude::*;

use crate::tensor::{pack_codes, scale_to_f32};
use crate::{encode_rtn, CodecError, CodecSpec, QuantTensor, Result};

/// Settings of the error-feedback encoder.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GptqOptions {
    /// Damping as a fraction of the mean diagonal of `H`.
    pub damp: f64,
    /// Visit columns by descending `H_jj` instead of left to right.
    pub act_order: bool,
}

impl Default for GptqOptions {
    fn default() -> Self {
        GptqOptions {
            damp: 0.01,
            act_order: true,
        }
    }
}

/// Encodes `w` (rows x cols, row-major) under `spec` with error feedback weighted by
/// `h` (cols x cols, row-major, symmetric positive semi-definite).
pub fn encode_gptq(
    w: &[f32],
    rows: usize,
    cols: usize,
    spec: &CodecSpec,
    h: &[f64],
    opts: GptqOptions,
) -> Result<QuantTensor> {
    if h.len() != cols * cols {
        return Err(CodecError::LengthMismatch {
            tensor: String::new(),
            what: "gram matrix",
            expected: cols * cols,
            found: h.len(),
        });
    }
    if let Some(p) = h.iter().position(|x| !x.is_finite()) {
        return Err(CodecError::BadGram {
            tensor: String::new(),
            reason: format!("entry ({}, {}) is not finite", p / cols, p % cols),
        });
    }
    let mut diag: Vec<f64> = (0..cols).map(|j| h[j * cols + j]).collect();
    for d in diag.iter_mut() {
        if *d <= 0.0 {
            *d = 1.0;
        }
    }
    // Grid first: codebook and scales fitted with the column importances diag(H).
    let dmax = diag.iter().copied().fold(0f64, f64::max);
    let importance: Vec<f32> = diag.iter().map(|&d| (d / dmax) as f32).collect();
    let imp_mode = std::env::var("UC_EXP_IMP").unwrap_or_default();
    let importance: Vec<f32> = match imp_mode.as_str() {
        "sqrt" => importance.iter().map(|x| x.sqrt()).collect(),
        "none" => vec![1.0; cols],
        _ => importance,
    };
    let mut qt = encode_rtn(w, rows, cols, spec, Some(&importance))?;

    let order: Vec<usize> = if opts.act_order {
        let mut o: Vec<usize> = (0..cols).collect();
        o.sort_by(|&a, &b| diag[b].total_cmp(&diag[a]).then(a.cmp(&b)));
        o
    } else {
        (0..cols).collect()
    };
    let u = inverse_cholesky_upper(h, &diag, &order, opts.damp)?;

    let g = spec.group as usize;
    let ng = cols.div_ceil(g);
    let scales: Vec<f32> = qt.scales.iter().map(|&b| scale_to_f32(b, spec.scale_dtype)).collect();
    let cb = &qt.codebook;
    let mut codes = vec![0u8; rows * cols];
    codes
        .par_chunks_mut(cols)
        .zip(w.par_chunks(cols))
        .zip(scales.par_chunks(ng))
        .for_each(|((crow, wrow), srow)| {
            // The row in visiting order; it absorbs the error feedback.
            let mut x: Vec<f32> = order.iter().map(|&c| wrow[c]).collect();
            for i in 0..cols {
                let c = order[i];
                let s = srow[c / g];
                let code = nearest(x[i], s, cb);
                crow[c] = code as u8;
                let urow = &u[i * cols..(i + 1) * cols];
                let err = (x[i] - s * cb[code]) / urow[i];
                for (xj, &uij) in x[i + 1..].iter_mut().zip(&urow[i + 1..]) {
                    *xj -= err * uij;
                }
            }
        });
    qt.codes = pack_codes(&codes, rows, cols, spec.bits.into());
    Ok(qt)
}

/// Index of the codebook entry whose reconstruction `s * cb[q]` is nearest to `x`
/// (ties to the lower index), computed exactly as reconstruction rounds.
fn nearest(x: f32, s: f32, cb: &[f32]) -> usize {
    let t = if s > 0.0 { x / s } else { 0.0 };
    let guess = cb.partition_point(|&v| v < t);
    let lo = guess.saturating_sub(1);
    let hi = guess.min(cb.len() - 1);
    let err = |q: usize| (x - s * cb[q]).abs();
    if err(hi) < err(lo) {
        hi
    } else {
        lo
    }
}

/// `U` (cols x cols, row-major f32, upper triangular) with `H_p^-1 = U^T U`, where `H_p`
/// is `h` permuted to `order`, its diagonal replaced by `diag` and damped.
fn inverse_cholesky_upper(h: &[f64], diag: &[f64], order: &[usize], damp: f64) -> Result<Vec<f32>> {
    let n = order.len();
    let mean = diag.iter().sum::<f64>() / n as f64;
    let mut lambda = damp * mean;
    for _ in 0..4 {
        let hp = Mat::<f64>::from_fn(n, n, |i, j| {
            let (a, b) = (order[i], order[j]);
            if i == j {
                diag[a] + lambda
            } else {
                h[a * n + b]
            }
        });
        if let Ok(llt) = hp.llt(Side::Lower) {
            let hinv = llt.inverse();
            if let Ok(l2) = hinv.llt(Side::Lower) {
                let l = l2.L();
                // U = L2^T: U[i][j] = L2[j][i].
                let mut u = vec![0f32; n * n];
                for i in 0..n {
                    for j in i..n {
                        u[i * n + j] = l[(j, i)] as f32;
                    }
                }
                return Ok(u);
            }
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

    /// Deterministic pseudo-random values in [-1, 1).
    fn noise(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// Output error trace((W - W_hat) H (W - W_hat)^T).
    fn output_error(w: &[f32], qt: &QuantTensor, h: &[f64]) -> f64 {
        let r = crate::reconstruct_scalar(qt).unwrap();
        let (rows, cols) = (qt.rows, qt.cols);
        let mut total = 0.0;
        for i in 0..rows {
            let d: Vec<f64> = (0..cols).map(|j| f64::from(w[i * cols + j] - r[i * cols + j])).collect();
            for a in 0..cols {
                for b in 0..cols {
                    total += d[a] * h[a * cols + b] * d[b];
                }
            }
        }
        total
    }

    /// Correlated activations: H = X^T X for X with a few dominant directions.
    fn gram(cols: usize, samples: usize) -> Vec<f64> {
        let base = noise(samples * 4, 7);
        let mix = noise(4 * cols, 9);
        let own = noise(samples * cols, 11);
        let x: Vec<f64> = (0..samples * cols)
            .map(|p| {
                let (s, c) = (p / cols, p % cols);
                let shared: f32 = (0..4).map(|k| base[s * 4 + k] * mix[k * cols + c]).sum();
                f64::from(3.0 * shared + 0.3 * own[p])
            })
            .collect();
        let mut h = vec![0f64; cols * cols];
        for s in 0..samples {
            for a in 0..cols {
                for b in 0..cols {
                    h[a * cols + b] += x[s * cols + a] * x[s * cols + b];
                }
            }
        }
        h
    }

    #[test]
    fn error_feedback_beats_rounding_on_correlated_inputs() {
        let (rows, cols) = (24, 96);
        let w = noise(rows * cols, 3);
        let h = gram(cols, 256);
        let spec = CodecSpec::parse("q3g32").unwrap();
        let rtn = encode_rtn(&w, rows, cols, &spec, None).unwrap();
        let gptq = encode_gptq(&w, rows, cols, &spec, &h, GptqOptions::default()).unwrap();
        gptq.validate().unwrap();
        let (e_rtn, e_gptq) = (output_error(&w, &rtn, &h), output_error(&w, &gptq, &h));
        assert!(e_gptq < 0.8 * e_rtn, "gptq {e_gptq} vs rtn {e_rtn}");
    }

    #[test]
    fn codes_do_not_depend_on_thread_count() {
        let (rows, cols) = (40, 64);
        let w = noise(rows * cols, 5);
        let h = gram(cols, 128);
        let spec = CodecSpec::parse("q4g64").unwrap();
        let run = |t| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(t)
                .build()
                .unwrap()
                .install(|| encode_gptq(&w, rows, cols, &spec, &h, GptqOptions::default()).unwrap())
        };
        let (a, b) = (run(1), run(2));
        assert_eq!(a.codes, b.codes);
        assert_eq!(a.scales, b.scales);
    }

    #[test]
    fn rejects_a_non_finite_gram_matrix() {
        let spec = CodecSpec::parse("q4g32").unwrap();
        let mut h = vec![0.0; 32 * 32];
        h[5] = f64::NAN;
        let e = encode_gptq(&[0.5; 32], 1, 32, &spec, &h, GptqOptions::default()).unwrap_err();
        assert!(matches!(e, CodecError::BadGram { .. }), "{e}");
    }

    #[test]
    fn rejects_a_gram_matrix_of_the_wrong_size() {
        let spec = CodecSpec::parse("q4g64").unwrap();
        let e = encode_gptq(&[0.0; 64], 1, 64, &spec, &[1.0; 10], GptqOptions::default()).unwrap_err();
        assert!(matches!(e, CodecError::LengthMismatch { .. }), "{e}");
    }
}
