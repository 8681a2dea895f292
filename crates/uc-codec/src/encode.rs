//! Round-to-nearest encoder with a learned codebook: weighted 1-D k-means on the
//! group-normalized weights, then alternating least-squares scale refits and code
//! re-assignment. Deterministic: every reduction has a fixed order, rows are processed
//! independently, and the parallel sort has a total order.

use rayon::prelude::*;
use uc_format::ScaleDtype;

use crate::tensor::{pack_codes, scale_from_f32, scale_to_f32, E8_MAX};
use crate::{CodecError, CodecSpec, QuantTensor, Result};

/// Lloyd iterations of the codebook fit (fixed, for determinism and bounded time).
const KMEANS_ITERS: usize = 24;
/// Rounds of (assign codes, refit scales).
const REFIT_ROUNDS: usize = 4;
/// The codebook is fitted on at most this many values (a fixed-stride subsample of the
/// tensor); enough for 256 centroids, and bounds memory for embedding-sized tensors.
const KMEANS_SAMPLE: usize = 1 << 22;

/// Encodes a (rows, cols) row-major f32 matrix under `spec` (rank must be 0: the overlay
/// is fitted separately). `importance` (len cols, finite, >= 0) weights each column's
/// error; None means all ones.
///
/// Steps: initial scale per (row, group) s = max|w| (the initial codebook spans [-1, 1]);
/// codebook = weighted k-means of w / s over the tensor, weight importance * s^2 (so the
/// objective is the error in w); then REFIT_ROUNDS times: nearest code, s = sum(v w q) /
/// sum(v q q) per group (kept if not finite and positive); finally scales are rounded to
/// the stored dtype and codes re-assigned against the stored scale, minimizing
/// |w - f32(s) * q| exactly as reconstruction computes it.
///
/// With a rotated spec (`spec.rot > 0`) `w` is the model's weight: it is rotated first
/// ([`crate::rotation`]) and the codes describe `W R^T`; `importance` then weights the
/// rotated columns.
pub fn encode_rtn(
    w: &[f32],
    rows: usize,
    cols: usize,
    spec: &CodecSpec,
    importance: Option<&[f32]>,
) -> Result<QuantTensor> {
    spec.layout(rows, cols)?;
    if spec.rot == 0 || w.len() != rows * cols {
        return encode_rtn_stored(w, rows, cols, spec, importance);
    }
    let mut wr = w.to_vec();
    let b = spec.rot as usize;
    crate::rotation::rotate(&mut wr, cols, b, &crate::rotation::signs(cols));
    encode_rtn_stored(&wr, rows, cols, spec, importance)
}

/// [`encode_rtn`] of weights already in the stored basis.
pub(crate) fn encode_rtn_stored(
    w: &[f32],
    rows: usize,
    cols: usize,
    spec: &CodecSpec,
    importance: Option<&[f32]>,
) -> Result<QuantTensor> {
    if spec.trellis {
        // The expanded codec's grid, then a Viterbi search down each column's runs of rows
        // (no error feedback: each column is a plain squared-error problem).
        let mut qt = encode_rtn_stored(
            w,
            rows,
            cols,
            &crate::trellis::expanded_spec(spec),
            importance,
        )?;
        let l = qt.spec.layout(rows, cols)?;
        let scales: Vec<f32> = qt
            .scales
            .iter()
            .map(|&b| scale_to_f32(b, spec.scale_dtype))
            .collect();
        let union = crate::trellis::encode_columns(
            w,
            rows,
            cols,
            spec.group as usize,
            l.n_groups,
            &scales,
            &qt.codebook,
        );
        qt.codes = crate::trellis::store(&union, rows, cols, spec.bits)?;
        qt.spec = *spec;
        return Ok(qt);
    }
    let l = spec.layout(rows, cols)?;
    if spec.rank != 0 {
        return Err(CodecError::OverlayMismatch {
            tensor: String::new(),
            spec_rank: spec.rank,
            overlay_rank: 0,
        });
    }
    let n = rows * cols;
    if w.len() != n {
        return Err(CodecError::LengthMismatch {
            tensor: String::new(),
            what: "weights",
            expected: n,
            found: w.len(),
        });
    }
    if let Some(p) = w.iter().position(|x| !x.is_finite()) {
        return Err(CodecError::NonFiniteWeight {
            tensor: String::new(),
            row: p / cols,
            col: p % cols,
        });
    }
    let ones;
    let imp = match importance {
        Some(v) => {
            if v.len() != cols {
                return Err(CodecError::LengthMismatch {
                    tensor: String::new(),
                    what: "importance",
                    expected: cols,
                    found: v.len(),
                });
            }
            if let Some(col) = v.iter().position(|x| !x.is_finite() || *x < 0.0) {
                return Err(CodecError::BadImportance {
                    tensor: String::new(),
                    col,
                });
            }
            v
        }
        None => {
            ones = vec![1f32; cols];
            &ones
        }
    };
    let g = spec.group as usize;
    let ng = l.n_groups;
    // (rows, ng) scales as f32 while fitting.
    let mut scales: Vec<f32> = w
        .par_chunks(cols)
        .flat_map_iter(|row| {
            row.chunks(g)
                .map(|grp| grp.iter().fold(0f32, |m, x| m.max(x.abs())))
        })
        .collect();

    let mut codebook = fit_codebook(w, cols, g, &scales, imp, spec.codebook_len());
    let mut mids = midpoints(&codebook);

    let mut codes = vec![0u8; n];
    for _ in 0..REFIT_ROUNDS {
        assign(w, cols, g, &scales, &codebook, &mids, &mut codes);
        refit_scales(w, cols, g, &mut scales, &codebook, &codes, imp);
    }

    let dt = spec.scale_dtype;
    if dt == ScaleDtype::E8 {
        // e8 scales are relative (largest E8_MAX): the tensor's magnitude moves into
        // the codebook, which is stored in f32.
        let max = scales.iter().fold(0f32, |m, &s| m.max(s));
        if max > 0.0 && max.is_finite() {
            let base = max / E8_MAX;
            codebook.iter_mut().for_each(|c| *c *= base);
            scales.iter_mut().for_each(|s| *s /= base);
            mids = midpoints(&codebook);
        }
    }
    // Round to the stored dtype, then assign codes against exactly the stored scale.
    let mut stored = Vec::with_capacity(scales.len());
    for (idx, &s) in scales.iter().enumerate() {
        let bits = scale_from_f32(s, dt);
        if !scale_to_f32(bits, dt).is_finite() {
            return Err(CodecError::ScaleOverflow {
                tensor: String::new(),
                row: idx / ng,
                group: idx % ng,
            });
        }
        stored.push(bits);
    }
    let exact: Vec<f32> = stored.iter().map(|&b| scale_to_f32(b, dt)).collect();
    assign(w, cols, g, &exact, &codebook, &mids, &mut codes);

    Ok(QuantTensor {
        rows,
        cols,
        spec: *spec,
        codebook,
        scales: stored,
        codes: pack_codes(&codes, rows, cols, spec.bits.into()),
        overlay: None,
    })
}

/// Weighted 1-D k-means (Lloyd) on normalized values, sorted once so each iteration is
/// K binary searches plus prefix-sum lookups. Initial centroids: weighted quantiles.
fn fit_codebook(
    w: &[f32],
    cols: usize,
    g: usize,
    scales: &[f32],
    imp: &[f32],
    k: usize,
) -> Vec<f32> {
    let ng = cols.div_ceil(g);
    let stride = w.len().div_ceil(KMEANS_SAMPLE).max(1);
    // Weights use s / smax so s^2 cannot underflow f32 for tiny-scale tensors.
    let smax = scales.iter().fold(0f32, |m, &s| m.max(s));
    // (normalized value, weight) pairs; all-zero groups carry no information.
    let mut pts: Vec<(f32, f32)> = w
        .iter()
        .enumerate()
        .step_by(stride)
        .filter_map(|(p, &x)| {
            let (r, c) = (p / cols, p % cols);
            let s = scales[r * ng + c / g];
            (s > 0.0).then(|| (x / s, imp[c] * (s / smax) * (s / smax)))
        })
        .collect();
    if pts.iter().all(|p| p.1 == 0.0) {
        pts.iter_mut().for_each(|p| p.1 = 1.0);
    }
    if pts.is_empty() {
        return (0..k)
            .map(|i| -1.0 + 2.0 * i as f32 / (k - 1) as f32)
            .collect();
    }
    pts.par_sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.total_cmp(&b.1)));
    // Prefix sums (f64) of weight and weight * value: cw[i] = sum over pts[..i].
    let mut cw = Vec::with_capacity(pts.len() + 1);
    let mut cwx = Vec::with_capacity(pts.len() + 1);
    let (mut sw, mut swx) = (0f64, 0f64);
    cw.push(0.0);
    cwx.push(0.0);
    for &(x, wt) in &pts {
        sw += f64::from(wt);
        swx += f64::from(wt) * f64::from(x);
        cw.push(sw);
        cwx.push(swx);
    }
    let total = sw;
    let value_at = |i: usize| f64::from(pts[i.min(pts.len() - 1)].0);
    let mut c: Vec<f64> = (0..k)
        .map(|q| {
            let target = (q as f64 + 0.5) / k as f64 * total;
            value_at(cw.partition_point(|&v| v < target).saturating_sub(1))
        })
        .collect();
    for _ in 0..KMEANS_ITERS {
        let mut lo = 0;
        for q in 0..k {
            let hi = if q + 1 < k {
                let mid = 0.5 * (c[q] + c[q + 1]);
                pts.partition_point(|p| f64::from(p.0) < mid).max(lo)
            } else {
                pts.len()
            };
            let wsum = cw[hi] - cw[lo];
            if wsum > 0.0 {
                c[q] = (cwx[hi] - cwx[lo]) / wsum;
            }
            lo = hi;
        }
        c.sort_by(f64::total_cmp);
    }
    let mut out: Vec<f32> = c.iter().map(|&v| v as f32).collect();
    out.sort_by(f32::total_cmp);
    out
}

/// Decision boundaries between consecutive codebook entries (f64 to avoid ties from
/// rounding the midpoint).
fn midpoints(cb: &[f32]) -> Vec<f64> {
    cb.windows(2)
        .map(|p| 0.5 * (f64::from(p[0]) + f64::from(p[1])))
        .collect()
}

/// Nearest code for every weight: a binary search in the normalized domain, then the
/// neighbours are compared by the exact reconstructed value s * q (f32), ties to the
/// lower index.
fn assign(
    w: &[f32],
    cols: usize,
    g: usize,
    scales: &[f32],
    cb: &[f32],
    mids: &[f64],
    codes: &mut [u8],
) {
    let ng = cols.div_ceil(g);
    codes
        .par_chunks_mut(cols)
        .zip(w.par_chunks(cols))
        .zip(scales.par_chunks(ng))
        .for_each(|((crow, wrow), srow)| {
            for (j, (c, &x)) in crow.iter_mut().zip(wrow).enumerate() {
                let s = srow[j / g];
                let t = if s > 0.0 {
                    f64::from(x) / f64::from(s)
                } else {
                    0.0
                };
                let guess = mids.partition_point(|&m| m < t);
                let err = |q: usize| (f64::from(x) - f64::from(s * cb[q])).abs();
                let mut best = guess.saturating_sub(1);
                for q in guess.saturating_sub(1) + 1..=(guess + 1).min(cb.len() - 1) {
                    if err(q) < err(best) {
                        best = q;
                    }
                }
                *c = best as u8;
            }
        });
}

/// Per-group weighted least-squares scale s = sum(v w q) / sum(v q q), kept only when
/// finite and positive (an all-zero or degenerate group keeps its scale).
fn refit_scales(
    w: &[f32],
    cols: usize,
    g: usize,
    scales: &mut [f32],
    cb: &[f32],
    codes: &[u8],
    imp: &[f32],
) {
    let ng = cols.div_ceil(g);
    scales
        .par_chunks_mut(ng)
        .zip(w.par_chunks(cols))
        .zip(codes.par_chunks(cols))
        .for_each(|((srow, wrow), crow)| {
            for (gi, s) in srow.iter_mut().enumerate() {
                let (mut num, mut den) = (0f64, 0f64);
                let range = gi * g..((gi + 1) * g).min(cols);
                for j in range {
                    let q = f64::from(cb[usize::from(crow[j])]);
                    let v = f64::from(imp[j]);
                    num += v * f64::from(wrow[j]) * q;
                    den += v * q * q;
                }
                let new = (num / den) as f32;
                if den > 0.0 && new.is_finite() && new > 0.0 {
                    *s = new;
                }
            }
        });
}
