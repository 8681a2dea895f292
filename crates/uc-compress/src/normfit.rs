//! Final-norm refit: the closed-form per-channel correction of the final RMSNorm weight
//! that best matches the teacher's logits on the calibration windows.
//!
//! Why: quantization error reaches the last hidden state as noise roughly orthogonal to
//! the signal. RMSNorm rescales the sum to a fixed norm, so the signal part shrinks by
//! `1/sqrt(1 + noise energy)` and every logit with it: the student is a slightly
//! *cooler* (flatter) copy of the teacher, which costs NLL and KL on top of the noise
//! itself. The final norm weight `g` (hidden,) is stored dense anyway, so re-solving it
//! costs no bits.
//!
//! With `n_s`, `n_t` the weight-free RMS-normalised student and teacher hidden states
//! (tokens x hidden) and `E` the (quantized) head (vocab x hidden), the logit error
//! `sum_tokens || E (g' * n_s - g * n_t) ||^2` is quadratic in `g'`:
//! `A = G o S_ss`, `b = (G o S_st) g`, with `G = E^T E`, `S_ss = n_s^T n_s`,
//! `S_st = n_s^T n_t` (o: elementwise product), minimised by `A g' = b`. The fit is kept
//! only if it lowers that error (it always should; the check guards numerics).

use crate::calib::Gram;
use crate::{CompressError, Result};
use candle_core::{DType, Tensor};
use faer::linalg::solvers::Solve;
use faer::{Mat, Side};
use serde::Serialize;

/// Outcome of [`fit_final_norm`].
#[derive(Debug, Clone, Serialize)]
pub struct NormFit {
    /// Logit squared error relative to the teacher logits' energy, with the source
    /// weight.
    pub logit_rel_mse_before: f64,
    /// The same with the fitted weight (equal to before when the fit was not kept).
    pub logit_rel_mse_after: f64,
    /// Mean of fitted / source weight over channels (above 1: the student was cooler).
    pub mean_gain: f64,
    /// Whether the fitted weight is stored.
    pub kept: bool,
}

/// Rows of hidden states per Gram chunk.
const ROWS: usize = 2048;

/// `a^T b` (cols x cols) of `a`, `b` (rows x cols each), summed over row chunks in f64.
fn cross(a: &Tensor, b: &Tensor) -> candle_core::Result<Vec<f64>> {
    let (rows, cols) = a.dims2()?;
    let mut acc = Gram::new(cols);
    for s in (0..rows).step_by(ROWS) {
        let n = ROWS.min(rows - s);
        acc.add_cross(&a.narrow(0, s, n)?, &b.narrow(0, s, n)?)?;
    }
    Ok(acc.h)
}

/// `x` (.., hidden) RMS-normalised without weight, as (tokens, hidden).
fn normed(x: &Tensor, eps: f32) -> candle_core::Result<Tensor> {
    let h = x.dim(x.rank() - 1)?;
    let ones = Tensor::ones(h, DType::F32, x.device())?;
    rms_rows(&x.reshape(((), h))?, &ones, eps)
}

/// RMSNorm of rows: `x / sqrt(mean(x^2) + eps) * w`.
fn rms_rows(x: &Tensor, w: &Tensor, eps: f32) -> candle_core::Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(1)?;
    x.broadcast_div(&(ms + f64::from(eps))?.sqrt()?)?
        .broadcast_mul(w)
}

/// Fits the final norm weight; see the module docs. `student`, `teacher`: last hidden
/// states (.., hidden); `gamma`: source weight (hidden,); `head`: the head as it will
/// be reconstructed, (vocab, hidden) row-major. Returns the weight to store.
pub fn fit_final_norm(
    student: &Tensor,
    teacher: &Tensor,
    gamma: &[f32],
    head: &[f32],
    eps: f32,
) -> Result<(Vec<f32>, NormFit)> {
    let h = gamma.len();
    let f = || -> candle_core::Result<(Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>)> {
        let ns = normed(student, eps)?;
        let nt = normed(teacher, eps)?;
        let e = Tensor::from_slice(head, (head.len() / h, h), student.device())?;
        Ok((
            cross(&e, &e)?,
            cross(&ns, &ns)?,
            cross(&ns, &nt)?,
            cross(&nt, &nt)?,
        ))
    };
    let (g, sss, sst, stt) = f().map_err(uc_model::ModelError::from)?;
    let gam: Vec<f64> = gamma.iter().map(|&x| f64::from(x)).collect();
    let a = Mat::from_fn(h, h, |i, j| g[i * h + j] * sss[i * h + j]);
    let b = Mat::from_fn(h, 1, |i, _| {
        (0..h).map(|j| g[i * h + j] * sst[i * h + j] * gam[j]).sum()
    });
    let teacher_energy: f64 = (0..h)
        .map(|i| {
            (0..h)
                .map(|j| gam[i] * g[i * h + j] * stt[i * h + j] * gam[j])
                .sum::<f64>()
        })
        .sum();
    // err(x) = x^T A x - 2 b^T x + teacher_energy.
    let err = |x: &[f64]| -> f64 {
        let quad: f64 = (0..h)
            .map(|i| x[i] * (0..h).map(|j| a[(i, j)] * x[j]).sum::<f64>())
            .sum();
        let lin: f64 = (0..h).map(|i| b[(i, 0)] * x[i]).sum();
        (quad - 2.0 * lin + teacher_energy) / teacher_energy.max(f64::MIN_POSITIVE)
    };
    let before = err(&gam);
    let fitted: Option<Vec<f64>> = a
        .llt(Side::Lower)
        .ok()
        .map(|llt| {
            let x = llt.solve(&b);
            (0..h).map(|i| x[(i, 0)]).collect::<Vec<f64>>()
        })
        .filter(|x| x.iter().all(|v| v.is_finite()));
    let (weight, after, kept, gain) = match fitted {
        Some(x) if err(&x) < before => {
            let gain = x
                .iter()
                .zip(&gam)
                .map(|(a, b)| if *b != 0.0 { a / b } else { 1.0 })
                .sum::<f64>()
                / h as f64;
            let after = err(&x);
            (x.iter().map(|&v| v as f32).collect(), after, true, gain)
        }
        _ => (gamma.to_vec(), before, false, 1.0),
    };
    if weight.iter().any(|v| !v.is_finite()) {
        return Err(CompressError::Settings(
            "final norm fit produced a non-finite weight".into(),
        ));
    }
    Ok((
        weight,
        NormFit {
            logit_rel_mse_before: before,
            logit_rel_mse_after: after,
            mean_gain: gain,
            kept,
        },
    ))
}
