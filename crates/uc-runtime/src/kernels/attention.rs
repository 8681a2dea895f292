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
