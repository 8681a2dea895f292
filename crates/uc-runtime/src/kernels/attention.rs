//! Causal attention of a block of queries against one KV head, flash-style: keys are
//! visited in tiles of [`KEY_TILE`] with an online softmax (running max `m`, running
//! sum `l`, context accumulator rescaled when the max grows), so no `(queries, keys)`
//! score matrix is ever held -- only one `(queries, KEY_TILE)` tile.
//!
//! [`flash_scalar`] is the reference: per query, the plain softmax of transformers'
//! eager path (all live scores, max subtracted, `f32::exp`, normalised), then the
//! weighted sum of values. [`flash`] is the tiled version; both products of a tile
//! (`S = Q K^T`, `O += P V`) are GEMMs, and exp is the SIMD `exp_shifted_sum`. It agrees
//! with the reference within [`FLASH_REL_TOL`] (relative to the largest `|value|`):
//! the sums run in a different order and the exp is a polynomial.
//!
//! Determinism: tiles are visited in a fixed order and every query row's arithmetic
//! depends only on its own scores, so the result does not depend on how callers split
//! (head, query block) tasks over threads.

use super::dense::{self, Mat};
use super::{math, Isa};

/// Keys per tile: a `(64 queries, 128 keys)` score tile is 32 KiB, inside L1 + L2 with
/// the tile's K and V `(128, head_dim)`.
pub const KEY_TILE: usize = 128;

/// Tolerance of [`flash`] against [`flash_scalar`], relative to `max |v|`.
pub const FLASH_REL_TOL: f32 = 2e-5;

/// One (KV head, query block) problem.
///
/// - `q`: query `r` is `q.data[r * q.rs .. r * q.rs + head_dim]` (`q.cs == 1`)
/// - `keys`, `vals`: `(positions, head_dim)` row-major (the KV cache of the head)
/// - `range(r)`: the keys query `r` may see, `lo .. hi` (causal and windowed); never
///   empty, ascending in `r` for `hi`
#[derive(Clone, Copy)]
pub struct Problem<'a> {
    /// Queries in the block.
    pub rows: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Query rows (see above).
    pub q: Mat<'a>,
    /// Keys `(positions, head_dim)`.
    pub keys: &'a [f32],
    /// Values `(positions, head_dim)`.
    pub vals: &'a [f32],
    /// Score scale, `1 / sqrt(head_dim)` (or gemma's `1 / sqrt(query_pre_attn_scalar)`).
    pub scale: f32,
    /// Soft-cap of the scaled scores, `c * tanh(s / c)` (gemma2), when set.
    pub softcap: Option<f32>,
    /// The visible keys of query `r`.
    pub range: &'a (dyn Fn(usize) -> (usize, usize) + Sync),
}

/// Scratch of [`flash`], reused across calls on one thread.
#[derive(Default)]
pub struct Scratch {
    /// Score / probability tile `(rows, KEY_TILE)`.
    s: Vec<f32>,
    /// Context accumulator `(rows, head_dim)`.
    o: Vec<f32>,
    /// Running max and sum per row.
    m: Vec<f32>,
    l: Vec<f32>,
}

/// Gemma-2's attention soft-cap of a scaled score, `c * tanh(s / c)` in f32 as
/// transformers computes it (divide, tanh, multiply).
#[inline]
pub fn softcap(s: f32, c: f32) -> f32 {
    (s / c).tanh() * c
}

/// The reference: hands query `r`'s context (`head_dim` values) to `emit(r, ctx)`.
pub fn flash_scalar(p: &Problem, emit: &mut dyn FnMut(usize, &[f32])) {
    let hd = p.head_dim;
    for r in 0..p.rows {
        let (lo, hi) = (p.range)(r);
        let qr = &p.q.data[r * p.q.rs..r * p.q.rs + hd];
        let mut s: Vec<f32> = (lo..hi)
            .map(|j| dense::dot_scalar(qr, &p.keys[j * hd..(j + 1) * hd]) * p.scale)
            .map(|v| p.softcap.map_or(v, |c| softcap(v, c)))
            .collect();
        let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum = math::exp_shifted_sum_scalar(&mut s, max);
        let mut ctx = vec![0f32; hd];
        for (j, w) in (lo..hi).zip(&s) {
            dense::axpy_scalar(w / sum, &p.vals[j * hd..(j + 1) * hd], &mut ctx);
        }
        emit(r, &ctx);
    }
}

/// The tiled online-softmax attention; hands query `r`'s context to `emit(r, ctx)`.
pub fn flash(isa: Isa, p: &Problem, sc: &mut Scratch, emit: &mut dyn FnMut(usize, &[f32])) {
    let (rows, hd) = (p.rows, p.head_dim);
    if rows == 0 {
        return;
    }
    sc.s.resize(rows * KEY_TILE, 0.0);
    sc.o.clear();
    sc.o.resize(rows * hd, 0.0);
    sc.m.clear();
    sc.m.resize(rows, f32::NEG_INFINITY);
    sc.l.clear();
    sc.l.resize(rows, 0.0);
    // Keys any row of the block sees: min lo .. max hi (hi ascends with r).
    let lo = (0..rows).map(|r| (p.range)(r).0).min().unwrap_or(0);
    let hi = (p.range)(rows - 1).1;
    let mut k0 = lo;
    while k0 < hi {
        let kt = KEY_TILE.min(hi - k0);
        let s = &mut sc.s[..rows * kt];
        // S (rows, kt) = Q (rows, hd) . K_tile^T (hd, kt)
        dense::gemm(
            rows,
            kt,
            hd,
            p.q,
            Mat::rows_t(&p.keys[k0 * hd..(k0 + kt) * hd], hd),
            s,
            kt,
            false,
        );
        for (r, row) in s.chunks_exact_mut(kt).enumerate() {
            let (rlo, rhi) = (p.range)(r);
            let (a, b) = (rlo.max(k0), rhi.min(k0 + kt));
            if a >= b {
                row.fill(0.0); // no visible key in this tile: P row is zero
                continue;
            }
            let (a, b) = (a - k0, b - k0);
            row[..a].fill(0.0);
            row[b..].fill(0.0);
            let live = &mut row[a..b];
            live.iter_mut().for_each(|v| *v *= p.scale);
            if let Some(c) = p.softcap {
                live.iter_mut().for_each(|v| *v = softcap(*v, c));
            }
            let tmax = live.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let m_old = sc.m[r];
            let m_new = m_old.max(tmax);
            let sum = math::exp_shifted_sum(isa, live, m_new);
            if m_new > m_old && m_old > f32::NEG_INFINITY {
                // The max grew: earlier terms were exp(s - m_old); rescale them.
                let alpha = (m_old - m_new).exp();
                sc.l[r] *= alpha;
                sc.o[r * hd..(r + 1) * hd]
                    .iter_mut()
                    .for_each(|v| *v *= alpha);
            }
            sc.m[r] = m_new;
            sc.l[r] += sum;
        }
        // O (rows, hd) += P (rows, kt) . V_tile (kt, hd)
        dense::gemm(
            rows,
            hd,
            kt,
            Mat::rows(s, kt),
            Mat::rows(&p.vals[k0 * hd..(k0 + kt) * hd], hd),
            &mut sc.o,
            hd,
            true,
        );
        k0 += kt;
    }
    for r in 0..rows {
        let inv = 1.0 / sc.l[r];
        let ctx = &mut sc.o[r * hd..(r + 1) * hd];
        ctx.iter_mut().for_each(|v| *v *= inv);
        emit(r, ctx);
    }
}

/// One decode query against its KV head: `out = softmax(scale * K[lo..hi] q) V[lo..hi]`
/// (`q`, `out`: `head_dim`; `keys`, `vals`: `(positions, head_dim)`), with the scores
/// soft-capped when `softcap` is set. `s` is scratch for the `hi - lo` scores.
///
/// The reference is [`flash_scalar`] with one query row; the AVX-512 kernel (head
/// dimensions 16..=256 in steps of 16) keeps `q` and the context accumulator in
/// registers, so each key costs its row loads and FMAs only (the generic path calls
/// `dense::dot` and `dense::axpy` per key: a dispatch, a reload and a store of the
/// accumulator each), and agrees within [`FLASH_REL_TOL`].
#[allow(clippy::too_many_arguments)]
pub fn decode(
    isa: Isa,
    q: &[f32],
    keys: &[f32],
    vals: &[f32],
    (lo, hi): (usize, usize),
    scale: f32,
    softcap: Option<f32>,
    s: &mut Vec<f32>,
    out: &mut [f32],
) {
    let hd = q.len();
    assert!(
        out.len() == hd && keys.len() >= hi * hd && vals.len() >= hi * hd && lo < hi,
        "attention::decode: inconsistent operands"
    );
    s.clear();
    match isa {
        // SAFETY: AVX-512 F available (guard); the lengths were checked above, and the
        // kernel reads rows lo..hi of keys and vals and head_dim values of q and out.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if Isa::Avx512.is_available() && hd.is_multiple_of(16) && hd <= 256 => unsafe {
            x86::decode_avx512(q, keys, vals, (lo, hi), scale, softcap, s, out)
        },
        _ => {
            s.extend((lo..hi).map(|j| dense::dot(isa, q, &keys[j * hd..(j + 1) * hd]) * scale));
            if let Some(c) = softcap {
                s.iter_mut().for_each(|v| *v = self::softcap(*v, c));
            }
            math::softmax(isa, s);
            out.fill(0.0);
            for (j, p) in (lo..hi).zip(s.iter()) {
                dense::axpy(isa, *p, &vals[j * hd..(j + 1) * hd], out);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{math, softcap as cap, Isa};
    use std::arch::x86_64::*;

    /// # Safety
    /// AVX-512 F available; `q.len() == out.len() == hd`, `hd % 16 == 0`, `hd <= 256`,
    /// `keys` and `vals` hold at least `hi` rows of `hd`.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn decode_avx512(
        q: &[f32],
        keys: &[f32],
        vals: &[f32],
        range: (usize, usize),
        scale: f32,
        softcap: Option<f32>,
        s: &mut Vec<f32>,
        out: &mut [f32],
    ) {
        // A compile-time register count per head dimension, so that q and the context
        // accumulator stay in registers (a runtime count spilled them to the stack).
        match q.len() / 16 {
            1 => head::<1>(q, keys, vals, range, scale, softcap, s, out),
            2 => head::<2>(q, keys, vals, range, scale, softcap, s, out),
            3 => head::<3>(q, keys, vals, range, scale, softcap, s, out),
            4 => head::<4>(q, keys, vals, range, scale, softcap, s, out),
            5 => head::<5>(q, keys, vals, range, scale, softcap, s, out),
            6 => head::<6>(q, keys, vals, range, scale, softcap, s, out),
            8 => head::<8>(q, keys, vals, range, scale, softcap, s, out),
            c if c <= 12 => head::<12>(q, keys, vals, range, scale, softcap, s, out),
            _ => head::<16>(q, keys, vals, range, scale, softcap, s, out),
        }
    }

    /// [`decode_avx512`] for head dimensions up to `16 C` (registers past `hd / 16` are
    /// neither loaded nor stored).
    #[target_feature(enable = "avx512f")]
    // Index loops over the register arrays: `C` is a constant, so they unroll fully.
    #[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
    unsafe fn head<const C: usize>(
        q: &[f32],
        keys: &[f32],
        vals: &[f32],
        (lo, hi): (usize, usize),
        scale: f32,
        softcap: Option<f32>,
        s: &mut Vec<f32>,
        out: &mut [f32],
    ) {
        let hd = q.len();
        let c = hd / 16;
        let qv: [__m512; C] = std::array::from_fn(|k| {
            if k < c {
                _mm512_loadu_ps(q.as_ptr().add(16 * k))
            } else {
                _mm512_setzero_ps()
            }
        });
        let kp = keys.as_ptr();
        s.reserve(hi - lo);
        for j in lo..hi {
            let row = kp.add(j * hd);
            let mut acc = _mm512_mul_ps(qv[0], _mm512_loadu_ps(row));
            for k in 1..C {
                if k < c {
                    acc = _mm512_fmadd_ps(qv[k], _mm512_loadu_ps(row.add(16 * k)), acc);
                }
            }
            s.push(_mm512_reduce_add_ps(acc) * scale);
        }
        if let Some(c) = softcap {
            s.iter_mut().for_each(|v| *v = cap(*v, c));
        }
        math::softmax(Isa::Avx512, s);
        let mut o = [_mm512_setzero_ps(); C];
        let vp = vals.as_ptr();
        for (j, p) in (lo..hi).zip(s.iter()) {
            let (row, p) = (vp.add(j * hd), _mm512_set1_ps(*p));
            for k in 0..C {
                if k < c {
                    o[k] = _mm512_fmadd_ps(p, _mm512_loadu_ps(row.add(16 * k)), o[k]);
                }
            }
        }
        for k in 0..c {
            _mm512_storeu_ps(out.as_mut_ptr().add(16 * k), o[k]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uc_format::SplitMix64;

    fn run(isa: Option<Isa>, rows: usize, pos: usize, window: Option<usize>) -> Vec<f32> {
        let hd = 64;
        let keys_n = pos + rows;
        let mut rng = SplitMix64(rows as u64 * 1000 + pos as u64);
        let mut v = |n: usize, s: f32| -> Vec<f32> { (0..n).map(|_| rng.sym() * s).collect() };
        let (q, k, vals) = (v(rows * hd, 3.0), v(keys_n * hd, 3.0), v(keys_n * hd, 1.0));
        let range = move |r: usize| {
            let p = pos + r;
            (window.map_or(0, |w| (p + 1).saturating_sub(w)), p + 1)
        };
        let prob = Problem {
            rows,
            head_dim: hd,
            q: Mat::rows(&q, hd),
            keys: &k,
            vals: &vals,
            scale: 0.125,
            softcap: None,
            range: &range,
        };
        let mut out = vec![0f32; rows * hd];
        let mut row = |r: usize, ctx: &[f32]| out[r * hd..(r + 1) * hd].copy_from_slice(ctx);
        match isa {
            None => flash_scalar(&prob, &mut row),
            Some(isa) => flash(isa, &prob, &mut Scratch::default(), &mut row),
        }
        out
    }

    #[test]
    fn decode_matches_the_plain_softmax_reference() {
        let mut rng = SplitMix64(5);
        for (hd, pos, window, softcap) in [
            (64, 0, None, None),
            (64, 700, None, None),
            (32, 300, Some(100), Some(5.0)),
            (256, 90, None, None),
            (80, 40, None, None),
            (24, 40, None, None),
        ] {
            let n = pos + 1;
            let mut v = |n: usize, s: f32| -> Vec<f32> { (0..n).map(|_| rng.sym() * s).collect() };
            let (q, k, vals) = (v(hd, 3.0), v(n * hd, 3.0), v(n * hd, 1.0));
            let lo = window.map_or(0, |w: usize| n.saturating_sub(w));
            let range = move |_: usize| (lo, n);
            let prob = Problem {
                rows: 1,
                head_dim: hd,
                q: Mat::rows(&q, hd),
                keys: &k,
                vals: &vals,
                scale: 0.125,
                softcap,
                range: &range,
            };
            let mut want = vec![0f32; hd];
            flash_scalar(&prob, &mut |_, ctx| want.copy_from_slice(ctx));
            let big = want.iter().fold(0f32, |a, v| a.max(v.abs()));
            for isa in Isa::ALL.into_iter().filter(|i| i.is_available()) {
                let mut got = vec![0f32; hd];
                decode(
                    isa,
                    &q,
                    &k,
                    &vals,
                    (lo, n),
                    0.125,
                    softcap,
                    &mut Vec::new(),
                    &mut got,
                );
                let worst = got
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(
                    worst <= FLASH_REL_TOL * big,
                    "{isa:?} hd {hd} pos {pos}: {worst} vs {big}"
                );
            }
        }
    }

    #[test]
    fn tiled_attention_matches_the_plain_softmax_reference() {
        // Awkward sizes: fewer keys than a tile, several tiles with a ragged last one,
        // a cache offset (chunked prefill), a sliding window that skips whole tiles.
        for (rows, pos, window) in [
            (1, 0, None),
            (37, 0, None),
            (64, 200, None),
            (64, 0, Some(50)),
            (13, 300, Some(140)),
        ] {
            let want = run(None, rows, pos, window);
            let big = want.iter().fold(0f32, |a, v| a.max(v.abs()));
            for isa in Isa::ALL.into_iter().filter(|i| i.is_available()) {
                let got = run(Some(isa), rows, pos, window);
                let worst = got
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(
                    worst <= FLASH_REL_TOL * big,
                    "{isa:?} rows {rows} pos {pos} window {window:?}: {worst} vs {big}"
                );
            }
        }
    }
}
