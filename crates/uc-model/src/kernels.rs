//! Fused CPU kernels for the forward pass where candle's generic ops make several
//! passes over large buffers.
//!
//! [`causal_softmax`]: the attention scores of one window are `(rows, t)` with
//! `rows = batch * heads * t`; row `r` is query position `r % t`. One pass per row:
//! max over the visible keys, `exp(x - max)` for those, 0 for the masked ones (never
//! computed), normalise. This replaces "add a -inf mask, then softmax", which
//! exponentiated the masked half too.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// `exp(x)` for `x <= 0`: `n = round(x / ln 2)`, `r = x - n ln 2` (Cody-Waite: ln 2
/// split in two so `n ln 2` is subtracted without rounding error), `e^r` by a degree-7
/// polynomial on |r| <= ln2/2, times `2^n` built in the exponent field. Relative error
/// below 1e-6 (a few ulp); no calls or branches, so the row loop vectorises.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75; // 0x3f317200: few mantissa bits, n * LN2_HI is exact
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Below -87.3, exp leaves f32's normal range; clamping keeps 2^n normal.
    let x = x.max(-87.0);
    let n = (x * std::f32::consts::LOG2_E).round();
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    let pow2 = f32::from_bits(((n as i32 + 127) as u32) << 23);
    p * pow2
}

/// Softmax of one score row over keys `lo..=hi`; everything else set to 0.
fn softmax_row(row: &[f32], out: &mut [f32], lo: usize, hi: usize) {
    let visible = &row[lo..=hi];
    let max = visible.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    out[..lo].fill(0.0);
    out[hi + 1..].fill(0.0);
    let dst = &mut out[lo..=hi];
    let mut sum = 0f32;
    for (d, &x) in dst.iter_mut().zip(visible) {
        let e = exp_nonpositive(x - max);
        *d = e;
        sum += e;
    }
    let inv = 1.0 / sum;
    dst.iter_mut().for_each(|d| *d *= inv);
}

struct CausalSoftmax {
    t: usize,
    window: usize,
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("causal-softmax: scores must be contiguous")
        };
        let CpuStorage::F32(all) = storage else {
            candle_core::bail!("causal-softmax: scores must be f32")
        };
        let src = &all[start..end];
        let t = self.t;
        if layout.dims().last() != Some(&t) || src.len() % (t * t) != 0 {
            candle_core::bail!(
                "causal-softmax: scores {:?} are not (.., {t}, {t})",
                layout.dims()
            );
        }
        let mut dst = vec![0f32; src.len()];
        dst.par_chunks_mut(t)
            .zip(src.par_chunks(t))
            .enumerate()
            .for_each(|(r, (out, row))| {
                let i = r % t;
                let lo = (i + 1).saturating_sub(self.window);
                softmax_row(row, out, lo, i);
            });
        Ok((CpuStorage::F32(dst), layout.shape().clone()))
    }
}

/// Causal softmax over the last axis of `scores` `(.., t, t)` (query, key), optionally
/// limited to a sliding window of `window` keys (key j visible to query i when
/// `j <= i` and `i - j < window`).
pub fn causal_softmax(scores: &Tensor, window: Option<usize>) -> Result<Tensor> {
    let t = scores.dim(candle_core::D::Minus1)?;
    scores.apply_op1_no_bwd(&CausalSoftmax {
        t,
        window: window.unwrap_or(usize::MAX).max(1),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn fast_exp_is_within_a_few_ulp_of_libm() {
        let mut worst = 0f32;
        for i in 0..200_000 {
            let x = -(i as f32) * 0.0005;
            let (a, b) = (exp_nonpositive(x), x.exp());
            if b > 1e-30 {
                worst = worst.max(((a - b) / b).abs());
            }
        }
        assert!(worst < 1e-6, "relative error {worst}");
        assert_eq!(exp_nonpositive(-1000.0), exp_nonpositive(-87.0));
    }

    #[test]
    fn matches_masked_softmax() {
        let t = 7;
        let v: Vec<f32> = (0..2 * t * t)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.7)
            .collect();
        let s = Tensor::from_vec(v.clone(), (2, t, t), &Device::Cpu).unwrap();
        for window in [None, Some(3)] {
            let got = causal_softmax(&s, window)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for (r, row) in v.chunks(t).enumerate() {
                let i = r % t;
                let w = window.unwrap_or(usize::MAX);
                let vis: Vec<bool> = (0..t).map(|j| j <= i && i - j < w).collect();
                let m = row
                    .iter()
                    .zip(&vis)
                    .filter(|p| *p.1)
                    .map(|p| *p.0)
                    .fold(f32::MIN, f32::max);
                let z: f32 = row
                    .iter()
                    .zip(&vis)
                    .filter(|p| *p.1)
                    .map(|p| (p.0 - m).exp())
                    .sum();
                for j in 0..t {
                    let want = if vis[j] { (row[j] - m).exp() / z } else { 0.0 };
                    assert!((got[r * t + j] - want).abs() < 1e-6, "row {r} col {j}");
                }
            }
        }
    }
}
