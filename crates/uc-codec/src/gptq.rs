//! Error-feedback encoder (GPTQ-style) onto the codec's learned grid.
//!
//! Given a weight `W` (rows x cols) and the Gram matrix `H = X^T X` (cols x cols) of the
//! activations that multiply it, pick codes column by column and push each column's
//! rounding error onto the columns not yet quantized, in the proportions that minimise
//! the output error `|| (W - W_hat) X^T ||^2` (Frantar et al., GPTQ, 2022). The grid is
//! fixed first: codebook and group scales come from [`crate::encode_rtn`] with the square root
//! of the diagonal of `H` as column importance, so only the code choice uses error
//! feedback and every group's scale is known before any of its columns is visited,
//! whatever the column order.
//!
//! Choices (documented in docs/format.md's encoder notes as well):
//! - damping: `H += damp * mean(diag H) * I` (default 1%), raised tenfold up to three
//!   times if `H` is still not positive definite; columns with `H_jj = 0` (inputs always
//!   zero) get `H_jj = 1`;
//! - order: descending `H_jj` ("act-order"), ties by index;
//! - update: rows are independent, so each row runs the whole recursion on its own
//!   (rayon over rows); `U` is the upper Cholesky factor of `H^-1` in visiting order:
//!   after column `i`, `w[j] -= (w[i] - q[i]) / U[i,i] * U[i,j]` for `j > i`;
//! - refit: after the pass, each row's group scales are re-solved by least squares in
//!   the H norm for the chosen codes and the codes chosen again against them; each
//!   candidate is kept only if its H-weighted error is lower
//!   ([`GptqOptions::refit_rounds`]).
//!
//! Deterministic: every row's arithmetic is sequential and the factorisation runs on
//! one thread, so the codes do not depend on the thread count.

use std::borrow::Cow;

use faer::linalg::solvers::Solve;
use faer::{Mat, MatRef, Side};
use rayon::prelude::*;

use crate::tensor::{pack_codes, scale_from_f32, scale_to_f32};
use crate::trellis::TRELLIS_ROWS;
use crate::{CodecError, CodecSpec, QuantTensor, Result};
use uc_format::ScaleDtype;

/// Settings of the error-feedback encoder.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GptqOptions {
    /// Damping as a fraction of the mean diagonal of `H`.
    pub damp: f64,
    /// Visit columns by descending `H_jj` instead of left to right.
    pub act_order: bool,
    /// Rounds of (scale refit to the chosen codes, then codes chosen again against the
    /// refitted scales) after the first error-feedback pass, each candidate kept only if
    /// it lowers the H-weighted error; 0 keeps the grid scales.
    pub refit_rounds: usize,
    /// Shrinkage of `H` towards its diagonal, in [0, 1]: the off-diagonal entries are
    /// scaled by `1 - shrink` before anything else. The diagonal (each input channel's
    /// energy) carries over to text unlike the calibration's better than the
    /// cross-channel structure does; error feedback dumps rounding error into directions
    /// the calibration never excites, and shrinkage limits how far it trusts that.
    /// 0 is plain GPTQ, 1 is importance-weighted rounding without cross-column feedback.
    pub shrink: f64,
    /// Passes of coordinate descent on the codes after the refit: each column's codes
    /// re-chosen, all other columns fixed, against the exact minimiser of the H-weighted
    /// error ([`descend_codes`]). 0 keeps error feedback's codes.
    pub descent_passes: usize,
}

/// The default error-feedback damping (`GptqOptions::damp`): 0.3 of the mean Gram
/// diagonal, thirty times GPTQ's customary 0.01. It trusts the calibration's
/// cross-channel structure less, which lowered KLD on text unlike the calibration
/// (KLD -9% on the Devil's Dictionary and -17% on technical prose at 4.0 bpw) for
/// at most +2% on the calibration's own genre; 1.0 was worse again
/// (docs/research-log.md, 2026-12-04 "a third genre" and "a default that generalizes").
pub const DEFAULT_DAMP: f64 = 0.3;

impl Default for GptqOptions {
    fn default() -> Self {
        GptqOptions {
            damp: DEFAULT_DAMP,
            act_order: true,
            refit_rounds: 1,
            shrink: 0.0,
            descent_passes: 0,
        }
    }
}

/// Encodes `w` (rows x cols, row-major) under `spec` with error feedback weighted by
/// `h` (cols x cols, row-major, symmetric positive semi-definite).
///
/// With a rotated spec (`spec.rot > 0`) `w` and `h` are the model's: both are rotated
/// first (`W R^T`, `R H R^T`, [`crate::rotation`]) and the codes describe `W R^T`.
///
/// `h` may be borrowed (`&[f64]`, `&Vec<f64>`) or handed over (`Vec<f64>`): an owned
/// matrix is rotated, damped and used in its own storage, so the encoder's peak holds no
/// copy of it (512 MiB per copy at an 8192-wide input); a borrowed one is copied where it
/// has to change. The codes are the same either way.
pub fn encode_gptq<'h>(
    w: &[f32],
    rows: usize,
    cols: usize,
    spec: &CodecSpec,
    h: impl Into<Cow<'h, [f64]>>,
    opts: GptqOptions,
) -> Result<QuantTensor> {
    let h = h.into();
    spec.layout(rows, cols)?;
    if spec.rot == 0 || w.len() != rows * cols || h.len() != cols * cols {
        return encode_gptq_stored(w, rows, cols, spec, h, opts);
    }
    let b = spec.rot as usize;
    let mut wr = w.to_vec();
    crate::rotation::rotate(&mut wr, cols, b, &crate::rotation::signs(cols));
    let mut hr = h.into_owned();
    crate::rotation::rotate_gram_in_place(&mut hr, cols, b);
    encode_gptq_stored(&wr, rows, cols, spec, Cow::Owned(hr), opts)
}

/// [`encode_gptq`] of a weight and Gram matrix already in the stored basis.
fn encode_gptq_stored(
    w: &[f32],
    rows: usize,
    cols: usize,
    spec: &CodecSpec,
    h: Cow<'_, [f64]>,
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
    if !(0.0..=1.0).contains(&opts.shrink) {
        return Err(CodecError::BadGram {
            tensor: String::new(),
            reason: format!("shrinkage {} outside [0, 1]", opts.shrink),
        });
    }
    let mut h = h;
    if opts.shrink > 0.0 {
        let keep = 1.0 - opts.shrink;
        for (p, v) in h.to_mut().iter_mut().enumerate() {
            if p / cols != p % cols {
                *v *= keep;
            }
        }
    }
    let mut diag: Vec<f64> = (0..cols).map(|j| h[j * cols + j]).collect();
    for d in diag.iter_mut() {
        if *d <= 0.0 {
            *d = 1.0;
        }
    }
    // Grid first: codebook and scales fitted with column importance sqrt(H_jj). Plain
    // H_jj lets a few outlier input channels own the whole codebook (KLD 0.042 vs 0.027
    // with sqrt, 0.030 with none: docs/research-log.md).
    let dmax = diag.iter().copied().fold(0f64, f64::max);
    let importance: Vec<f32> = diag.iter().map(|&d| (d / dmax).sqrt() as f32).collect();
    // A trellis codec's grid is its expanded codec's: a codebook of 2^(bits+1) levels.
    let grid_spec = crate::trellis::expanded_spec(spec);
    let grid_spec = if spec.trellis { &grid_spec } else { spec };
    let mut qt = crate::encode::encode_rtn_stored(w, rows, cols, grid_spec, Some(&importance))?;

    let order: Vec<usize> = if opts.act_order {
        let mut o: Vec<usize> = (0..cols).collect();
        o.sort_by(|&a, &b| diag[b].total_cmp(&diag[a]).then(a.cmp(&b)));
        o
    } else {
        (0..cols).collect()
    };
    let u = inverse_cholesky_upper(&h, &diag, &order, opts.damp)?;

    let g = spec.group as usize;
    let mut scales: Vec<f32> = qt
        .scales
        .iter()
        .map(|&b| scale_to_f32(b, spec.scale_dtype))
        .collect();
    let tr = spec.trellis;
    let mut codes = feedback_codes(w, cols, g, &order, &u, &scales, &qt.codebook, tr);
    if opts.refit_rounds > 0 || opts.descent_passes > 0 {
        let mean = diag.iter().sum::<f64>() / cols as f64;
        // hd(i, j) = h[i * cols + j] off the diagonal, the damped diagonal on it, as a
        // column-major view of h's storage (transposed in place: a rotated `h` is
        // symmetric only up to rounding), so no second matrix is allocated.
        let mut hbuf = h.into_owned();
        for i in 0..cols {
            for j in i + 1..cols {
                hbuf.swap(i * cols + j, j * cols + i);
            }
            hbuf[i * cols + i] = diag[i] + opts.damp * mean;
        }
        let hd = MatRef::from_column_major_slice(&hbuf, cols, cols);
        let dt = spec.scale_dtype;
        // Neither step is guaranteed to help once scales are rounded to the stored dtype
        // and codes re-chosen greedily, so every candidate is scored by its H-weighted
        // error and the best one kept.
        let mut best_err = h_error(w, cols, g, hd, &codes, &qt.codebook, &scales);
        for _ in 0..opts.refit_rounds {
            let mut refit = scales.clone();
            refit_scales_h(w, cols, g, hd, &codes, &qt.codebook, dt, &mut refit);
            let stored = store_scales(&refit, dt);
            let refit: Vec<f32> = stored.iter().map(|&b| scale_to_f32(b, dt)).collect();
            let recoded = feedback_codes(w, cols, g, &order, &u, &refit, &qt.codebook, tr);
            let mut improved = false;
            for cand in [None, Some(recoded)] {
                let c = cand.as_ref().unwrap_or(&codes);
                let e = h_error(w, cols, g, hd, c, &qt.codebook, &refit);
                if e < best_err {
                    best_err = e;
                    qt.scales.clone_from(&stored);
                    scales.clone_from(&refit);
                    if let Some(c) = cand {
                        codes = c;
                    }
                    improved = true;
                }
            }
            if !improved {
                break;
            }
        }
        if opts.descent_passes > 0 {
            let mut cand = codes.clone();
            descend_codes(
                w,
                cols,
                g,
                &hbuf,
                &order,
                &scales,
                &qt.codebook,
                tr,
                opts.descent_passes,
                &mut cand,
            );
            // Every step lowers the error exactly, but the running sums are updated in
            // place; the final score decides, as for the refit.
            if h_error(w, cols, g, hd, &cand, &qt.codebook, &scales) < best_err {
                codes = cand;
            }
        }
    }
    qt.codes = if tr {
        crate::trellis::store(&codes, rows, cols, spec.bits)?
    } else {
        pack_codes(&codes, rows, cols, spec.bits.into())
    };
    qt.spec = *spec;
    Ok(qt)
}

/// Codes of `w` (rows x cols) with error feedback: columns visited in `order`, each
/// column's rounding error pushed onto the unvisited ones through `u` (see the module
/// notes). Returns (rows, cols) code indices in natural column order (union indices of
/// the expanded codec when `trellis`).
#[allow(clippy::too_many_arguments)]
fn feedback_codes(
    w: &[f32],
    cols: usize,
    g: usize,
    order: &[usize],
    u: &[f32],
    scales: &[f32],
    cb: &[f32],
    trellis: bool,
) -> Vec<u8> {
    if trellis {
        return feedback_codes_trellis(w, cols, g, order, u, scales, cb);
    }
    let ng = cols.div_ceil(g);
    let mut codes = vec![0u8; w.len()];
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
                crate::simd::sub_scaled(&mut x[i + 1..], err, &urow[i + 1..]);
            }
        });
    codes
}

/// [`feedback_codes`] for a trellis codec: the rows advance together column by column;
/// each column's values (with the feedback received so far) are coded by a Viterbi
/// search over each run of [`TRELLIS_ROWS`] rows ([`crate::trellis::quantize_run`]),
/// then every row pushes its error onward as in the plain case. Returns union indices
/// (codes of the expanded codec). Work items are runs of rows, so the result does not
/// depend on the thread count.
fn feedback_codes_trellis(
    w: &[f32],
    cols: usize,
    g: usize,
    order: &[usize],
    u: &[f32],
    scales: &[f32],
    cb: &[f32],
) -> Vec<u8> {
    let ng = cols.div_ceil(g);
    let mut codes = vec![0u8; w.len()];
    codes
        .par_chunks_mut(TRELLIS_ROWS * cols)
        .zip(w.par_chunks(TRELLIS_ROWS * cols))
        .zip(scales.par_chunks(TRELLIS_ROWS * ng))
        .for_each(|((cblk, wblk), sblk)| {
            let m = wblk.len() / cols;
            // (m, cols): the rows in visiting order; they absorb the error feedback.
            let mut x: Vec<f32> = (0..m)
                .flat_map(|r| order.iter().map(move |&c| wblk[r * cols + c]))
                .collect();
            let (mut xs, mut ss, mut ks) = (vec![0f32; m], vec![0f32; m], vec![0u8; m]);
            for i in 0..cols {
                let c = order[i];
                for r in 0..m {
                    xs[r] = x[r * cols + i];
                    ss[r] = sblk[r * ng + c / g];
                }
                crate::trellis::quantize_run(&xs, &ss, cb, &mut ks);
                let urow = &u[i * cols..(i + 1) * cols];
                for r in 0..m {
                    cblk[r * cols + c] = ks[r];
                    let xr = &mut x[r * cols..(r + 1) * cols];
                    let err = (xs[r] - ss[r] * cb[usize::from(ks[r])]) / urow[i];
                    crate::simd::sub_scaled(&mut xr[i + 1..], err, &urow[i + 1..]);
                }
            }
        });
    codes
}

/// Coordinate descent on the codes (QuantEase-style), `passes` sweeps over the columns
/// in `order`. With every other column fixed, a row's H-weighted error `e H e^T` as a
/// function of its entry `e_c` is `H_cc e_c^2 + 2 e_c S` (`S = sum_{k != c} H_ck e_k`),
/// least at `e_c = -S / H_cc`: the column's ideal values are `w_c + S / H_cc`, and every
/// row weighs its miss by the same `H_cc`, so rounding them to nearest (or, for a
/// trellis, the Viterbi search down each run of rows) minimises the error over that
/// column exactly. Each step can only lower the error; error feedback, deciding each
/// column before the later ones exist, cannot revisit its choices. `G = E H` is kept per
/// work item and updated by one row of `H` per changed code, so a pass costs one pass
/// over the codes plus the changes. Work items are runs of [`TRELLIS_ROWS`] rows, so the
/// codes do not depend on the thread count. `hbuf` is the damped Gram matrix (cols x
/// cols, symmetric, column-major); `codes` are (rows, cols) indices into `cb` (union indices for a
/// trellis).
#[allow(clippy::too_many_arguments)]
fn descend_codes(
    w: &[f32],
    cols: usize,
    g: usize,
    hbuf: &[f64],
    order: &[usize],
    scales: &[f32],
    cb: &[f32],
    trellis: bool,
    passes: usize,
    codes: &mut [u8],
) {
    use faer::linalg::matmul::matmul;
    use faer::{Accum, Par};
    let ng = cols.div_ceil(g);
    let hd = MatRef::from_column_major_slice(hbuf, cols, cols);
    codes
        .par_chunks_mut(TRELLIS_ROWS * cols)
        .zip(w.par_chunks(TRELLIS_ROWS * cols))
        .zip(scales.par_chunks(TRELLIS_ROWS * ng))
        .for_each(|((cblk, wblk), sblk)| {
            let m = wblk.len() / cols;
            let recon = |r: usize, c: usize, k: u8| sblk[r * ng + c / g] * cb[usize::from(k)];
            // (m, cols) row-major: E = W - Q, and G = E H (from faer's column-major
            // product, copied so that a changed code updates one contiguous row).
            let mut e: Vec<f64> = (0..m * cols)
                .map(|p| f64::from(wblk[p] - recon(p / cols, p % cols, cblk[p])))
                .collect();
            let mut gm = Mat::<f64>::zeros(m, cols);
            let em = MatRef::from_row_major_slice(&e, m, cols);
            matmul(gm.as_mut(), Accum::Replace, em, hd, 1.0, Par::Seq);
            let mut grow: Vec<f64> = (0..m * cols).map(|p| gm[(p / cols, p % cols)]).collect();
            drop(gm);
            let (mut xs, mut ss, mut ks) = (vec![0f32; m], vec![0f32; m], vec![0u8; m]);
            for _ in 0..passes {
                let mut changed = false;
                for &c in order {
                    let hcc = hbuf[c * cols + c];
                    for r in 0..m {
                        let p = r * cols + c;
                        let s = grow[p] - hcc * e[p];
                        xs[r] = (f64::from(wblk[p]) + s / hcc) as f32;
                        ss[r] = sblk[r * ng + c / g];
                    }
                    if trellis {
                        crate::trellis::quantize_run(&xs, &ss, cb, &mut ks);
                    } else {
                        for r in 0..m {
                            ks[r] = nearest(xs[r], ss[r], cb) as u8;
                        }
                    }
                    // Column c of the symmetric H, contiguous in column-major storage.
                    let hc = &hbuf[c * cols..(c + 1) * cols];
                    for r in 0..m {
                        let p = r * cols + c;
                        if ks[r] == cblk[p] {
                            continue;
                        }
                        changed = true;
                        cblk[p] = ks[r];
                        let new = f64::from(wblk[p] - recon(r, c, ks[r]));
                        let delta = new - e[p];
                        e[p] = new;
                        for (gj, &hj) in grow[r * cols..(r + 1) * cols].iter_mut().zip(hc) {
                            *gj += delta * hj;
                        }
                    }
                }
                if !changed {
                    break;
                }
            }
        });
}

/// f32 scales rounded to the stored dtype's bits.
fn store_scales(scales: &[f32], dt: ScaleDtype) -> Vec<u16> {
    scales.iter().map(|&s| scale_from_f32(s, dt)).collect()
}

/// The H-weighted error `sum_i e_i H e_i^T` of `e = w - s o cb[codes]` (rows x cols),
/// summed over fixed row chunks in order, so it does not depend on the thread count.
fn h_error(
    w: &[f32],
    cols: usize,
    g: usize,
    hd: MatRef<'_, f64>,
    codes: &[u8],
    cb: &[f32],
    scales: &[f32],
) -> f64 {
    use faer::linalg::matmul::matmul;
    use faer::{Accum, Par};
    let ng = cols.div_ceil(g);
    let parts: Vec<f64> = w
        .par_chunks(REFIT_ROWS * cols)
        .zip(codes.par_chunks(REFIT_ROWS * cols))
        .zip(scales.par_chunks(REFIT_ROWS * ng))
        .map(|((wc, cc), sc)| {
            let m = wc.len() / cols;
            let e = Mat::<f64>::from_fn(m, cols, |i, j| {
                let q = cb[usize::from(cc[i * cols + j])];
                f64::from(wc[i * cols + j] - sc[i * ng + j / g] * q)
            });
            let mut eh = Mat::<f64>::zeros(m, cols);
            matmul(eh.as_mut(), Accum::Replace, e.as_ref(), hd, 1.0, Par::Seq);
            let mut total = 0.0;
            for i in 0..m {
                for j in 0..cols {
                    total += e[(i, j)] * eh[(i, j)];
                }
            }
            total
        })
        .collect();
    parts.iter().sum()
}

/// Rows per work item of [`refit_scales_h`]: fixed, so the arithmetic (and the bytes)
/// do not depend on the thread count.
const REFIT_ROWS: usize = 32;

/// Refits every row's group scales to its chosen codes, minimising the row's H-weighted
/// error `e H e^T` with `e = w - s o c` (`c_j = cb[q_j]`, `s` spread over its group): the
/// output error on the calibration activations, exactly what the codes were chosen for.
/// Per row that is the `(ng, ng)` system `B s = r` with `B_ab = c[a]^T H[a,b] c[b]` and
/// `r_a = c[a]^T (H w)[a]` over group column ranges `a`, `b`. The old scales are a
/// feasible point, so the error can only fall (up to the stored rounding). A row whose
/// system is singular or whose solution has a non-positive or non-finite scale keeps
/// its scales (as does one whose scales would overflow `dt`). `hd` is the damped Gram
/// matrix (cols x cols).
#[allow(clippy::too_many_arguments)]
fn refit_scales_h(
    w: &[f32],
    cols: usize,
    g: usize,
    hd: MatRef<'_, f64>,
    codes: &[u8],
    cb: &[f32],
    dt: ScaleDtype,
    scales: &mut [f32],
) {
    use faer::linalg::matmul::matmul;
    use faer::{Accum, Par};
    let ng = cols.div_ceil(g);
    let range = |a: usize| a * g..((a + 1) * g).min(cols);
    scales
        .par_chunks_mut(REFIT_ROWS * ng)
        .zip(w.par_chunks(REFIT_ROWS * cols))
        .zip(codes.par_chunks(REFIT_ROWS * cols))
        .for_each(|((schunk, wchunk), cchunk)| {
            let m = wchunk.len() / cols;
            let wm = Mat::<f64>::from_fn(m, cols, |i, j| f64::from(wchunk[i * cols + j]));
            let cm = Mat::<f64>::from_fn(m, cols, |i, j| {
                f64::from(cb[usize::from(cchunk[i * cols + j])])
            });
            // (m, cols): rows of W H, and per group b rows of C[:, b] H[b, :].
            let mut hw = Mat::<f64>::zeros(m, cols);
            matmul(hw.as_mut(), Accum::Replace, wm.as_ref(), hd, 1.0, Par::Seq);
            // bmat[i][a * ng + b]; rhs[i][a].
            let mut bmat = vec![0f64; m * ng * ng];
            let mut rhs = vec![0f64; m * ng];
            for i in 0..m {
                for a in 0..ng {
                    rhs[i * ng + a] = range(a).map(|j| cm[(i, j)] * hw[(i, j)]).sum();
                }
            }
            let mut z = Mat::<f64>::zeros(m, cols);
            for b in 0..ng {
                let rb = range(b);
                matmul(
                    z.as_mut(),
                    Accum::Replace,
                    cm.as_ref().subcols(rb.start, rb.len()),
                    hd.subrows(rb.start, rb.len()),
                    1.0,
                    Par::Seq,
                );
                for i in 0..m {
                    for a in 0..ng {
                        bmat[(i * ng + a) * ng + b] =
                            range(a).map(|j| cm[(i, j)] * z[(i, j)]).sum();
                    }
                }
            }
            for i in 0..m {
                let srow = &mut schunk[i * ng..(i + 1) * ng];
                let bi = &bmat[i * ng * ng..(i + 1) * ng * ng];
                // A group whose codes are all zero has an empty row and column in B:
                // pin its scale to the old value.
                let dead: Vec<bool> = (0..ng).map(|a| bi[a * ng + a] <= 0.0).collect();
                let sys = Mat::<f64>::from_fn(ng, ng, |a, b| {
                    if dead[a] || dead[b] {
                        if a == b {
                            1.0
                        } else {
                            0.0
                        }
                    } else {
                        bi[a * ng + b]
                    }
                });
                let r = Mat::<f64>::from_fn(ng, 1, |a, _| {
                    if dead[a] {
                        f64::from(srow[a])
                    } else {
                        rhs[i * ng + a]
                    }
                });
                let Ok(llt) = sys.llt(Side::Lower) else {
                    continue;
                };
                let sol = llt.solve(&r);
                let new: Vec<f32> = (0..ng).map(|a| sol[(a, 0)] as f32).collect();
                let storable = store_scales(&new, dt)
                    .iter()
                    .all(|&b| scale_to_f32(b, dt).is_finite());
                if storable && new.iter().all(|s| s.is_finite() && *s > 0.0) {
                    srow.copy_from_slice(&new);
                }
            }
        });
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
    // The mean over the diagonal in its own order (not the visiting order), as before.
    let mean = diag.iter().sum::<f64>() / n as f64;
    let permuted: Vec<f64> = order.iter().map(|&a| diag[a]).collect();
    // Factor, inverse and factor of the inverse share one matrix's storage (plus the
    // inverse's scratch): bit-identical to faer's `Llt`, a third of its peak
    // (crate::chol).
    let l = crate::chol::damped_llt(&permuted, damp * mean, |i, j| h[order[i] * n + order[j]])?;
    let mut l = crate::chol::llt_inverse(l);
    crate::chol::llt_in_place(&mut l).map_err(|e| CodecError::BadGram {
        tensor: String::new(),
        reason: format!("Cholesky of the inverse failed: {e:?}"),
    })?;
    // U = L2^T: U[i][j] = L2[j][i].
    let mut u = vec![0f32; n * n];
    for i in 0..n {
        for j in i..n {
            u[i * n + j] = l[(j, i)] as f32;
        }
    }
    Ok(u)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::encode_rtn;
    use crate::testutil::{h_trace, noise};

    /// Output error trace((W - W_hat) H (W - W_hat)^T).
    fn output_error(w: &[f32], qt: &QuantTensor, h: &[f64]) -> f64 {
        h_trace(w, &crate::reconstruct_scalar(qt).unwrap(), qt.cols, h)
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
    fn full_shrinkage_ignores_the_cross_channel_structure() {
        let (rows, cols) = (8, 64);
        let w = noise(rows * cols, 5);
        let h = gram(cols, 256);
        // Same diagonal, off-diagonal entries halved: irrelevant at shrink = 1.
        let h2: Vec<f64> = (0..cols * cols)
            .map(|p| {
                if p / cols == p % cols {
                    h[p]
                } else {
                    0.5 * h[p]
                }
            })
            .collect();
        let spec = CodecSpec::parse("q3g32").unwrap();
        let o = GptqOptions {
            shrink: 1.0,
            ..GptqOptions::default()
        };
        let a = encode_gptq(&w, rows, cols, &spec, &h, o).unwrap();
        let b = encode_gptq(&w, rows, cols, &spec, &h2, o).unwrap();
        assert_eq!(a, b);
        let plain = encode_gptq(&w, rows, cols, &spec, &h, GptqOptions::default()).unwrap();
        assert_ne!(a, plain, "shrinkage changes the codes");
        let bad = GptqOptions {
            shrink: 1.5,
            ..GptqOptions::default()
        };
        assert!(encode_gptq(&w, rows, cols, &spec, &h, bad).is_err());
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
    fn scale_refit_lowers_the_output_error() {
        let (rows, cols) = (48, 160); // two refit chunks; a short last group
        let w = noise(rows * cols, 13);
        let h = gram(cols, 256);
        for name in ["q3g32", "q5g64"] {
            let spec = CodecSpec::parse(name).unwrap();
            let enc = |refit_rounds| {
                let o = GptqOptions {
                    refit_rounds,
                    ..GptqOptions::default()
                };
                let qt = encode_gptq(&w, rows, cols, &spec, &h, o).unwrap();
                qt.validate().unwrap();
                output_error(&w, &qt, &h)
            };
            let (e0, e1) = (enc(0), enc(1));
            assert!(e1 < 0.97 * e0, "{name}: refit {e1} vs none {e0}");
        }
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
    fn coordinate_descent_lowers_the_output_error_on_any_thread_count() {
        // Two trellis runs (64 + 16 rows), a short last group.
        let (rows, cols) = (80, 112);
        let w = noise(rows * cols, 17);
        let h = gram(cols, 256);
        for name in ["q3g32", "t5g64-e8", "q5g64-e8"] {
            let spec = CodecSpec::parse(name).unwrap();
            let enc = |descent_passes, threads| {
                let o = GptqOptions {
                    damp: 0.01,
                    descent_passes,
                    ..GptqOptions::default()
                };
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap()
                    .install(|| encode_gptq(&w, rows, cols, &spec, &h, o).unwrap())
            };
            let (plain, one, four) = (enc(0, 2), enc(1, 2), enc(4, 2));
            four.validate().unwrap();
            assert_eq!(four, enc(4, 1), "{name}: thread count changed the codes");
            assert_eq!(
                plain.scales, four.scales,
                "{name}: descent moves codes only"
            );
            let e = |qt: &QuantTensor| output_error(&w, qt, &h);
            let (e0, e1, e4) = (e(&plain), e(&one), e(&four));
            assert!(e1 < 0.995 * e0, "{name}: one pass {e1} vs none {e0}");
            assert!(e4 <= e1, "{name}: four passes {e4} vs one {e1}");
        }
    }

    /// SHA-256 over everything an encoding stores (codebook, scale bits, codes).
    fn digest(qt: &QuantTensor) -> String {
        use sha2::{Digest, Sha256};
        let mut d = Sha256::new();
        for c in &qt.codebook {
            d.update(c.to_le_bytes());
        }
        for s in &qt.scales {
            d.update(s.to_le_bytes());
        }
        d.update(&qt.codes);
        hex::encode(d.finalize())
    }

    /// Golden bytes: a refactoring that changes any rounding step of the encoder (the
    /// damping lambda, the Cholesky, the visiting order, the refit) changes these
    /// digests, and with them every pack. Packs are promised byte-identical for the same
    /// inputs; an intended change updates the digests here and says why in the commit.
    /// (This test was missing when a refactor handed the Cholesky an absolute damping.)
    /// Recorded on x86-64 with AVX2 + FMA (faer picks its SIMD path at run time; another
    /// instruction set may round the factorisation differently and must re-record).
    #[test]
    fn encodings_are_byte_identical_to_the_recorded_ones() {
        let (rows, cols) = (24, 96);
        let w = noise(rows * cols, 3);
        let h = gram(cols, 256);
        // Recorded at GPTQ's customary damping, the default of that time (now
        // DEFAULT_DAMP): the digests pin the arithmetic, not the default.
        let classic = GptqOptions {
            damp: 0.01,
            ..GptqOptions::default()
        };
        let shrunk = GptqOptions {
            shrink: 0.5,
            ..classic
        };
        let cases = [("q5g64", classic), ("q3g32", classic), ("q4g32-e8", shrunk)];
        let got: Vec<String> = cases
            .iter()
            .map(|(name, o)| {
                let spec = CodecSpec::parse(name).unwrap();
                digest(&encode_gptq(&w, rows, cols, &spec, &h, *o).unwrap())
            })
            .collect();
        let want = [
            "a0459fd1da80d8ac263a0fffd5a8e16b91f12a88ca3ad3f55926ec1cdf6fd3c6",
            "baabb6fd53d6f4a087aeddaa98d2b0b9cb52ac95b8a1bba2d5b4842fcfe8eed7",
            "f1aa96a9e52caf82b330925f5b96e841adfbcfd8c7c27ce9e8282a886b1b8292",
        ];
        assert_eq!(got, want);
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
        let e = encode_gptq(
            &[0.0; 64],
            1,
            64,
            &spec,
            &[1.0; 10][..],
            GptqOptions::default(),
        )
        .unwrap_err();
        assert!(matches!(e, CodecError::LengthMismatch { .. }), "{e}");
    }
}
