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
//!
//! [`decode`] (one query) and [`rows`] (the query heads of a GQA group for a block of
//! tokens, the generation paths' prefill) share one arithmetic: every query row gets
//! the bits [`decode`] gives it alone, whatever the other rows of the call. So a prompt
//! prefilled in pieces (a reused prefix, then the rest) leaves the same keys, values
//! and logits as one cold prefill; rows of one KV head share each key and value load.

use super::dense::{self, Mat};
use super::{math, Isa};
use half::f16;
use half::slice::HalfFloatSliceExt;

/// An element of the KV cache the generation kernels ([`decode`], [`rows`]) read: f32,
/// or f16 (K and V rounded to nearest-even binary16 when written, so each decode step
/// reads half the bytes). Elements are widened to f32 exactly on load; everything after
/// the load is the same arithmetic for both.
pub trait KvElem: Copy + Send + Sync + 'static {
    /// Whether the element is binary16 (the kernels branch on it at compile time).
    const F16: bool;
    /// `x` widened to f32: `x` itself for f32, else converted into `buf`.
    fn widen<'b>(x: &'b [Self], buf: &'b mut Vec<f32>) -> &'b [f32];
}

impl KvElem for f32 {
    const F16: bool = false;
    fn widen<'b>(x: &'b [f32], _: &'b mut Vec<f32>) -> &'b [f32] {
        x
    }
}

impl KvElem for f16 {
    const F16: bool = true;
    fn widen<'b>(x: &'b [f16], buf: &'b mut Vec<f32>) -> &'b [f32] {
        buf.clear();
        buf.resize(x.len(), 0.0);
        x.convert_to_f32_slice(buf);
        buf
    }
}

/// Whether [`decode`] and [`rows`] run their SIMD kernel for head dimension `hd` on
/// `isa` (elsewhere an f16 cache is widened per call, which costs more than it saves).
pub fn fast_kernels(isa: Isa, hd: usize) -> bool {
    isa == Isa::Avx512 && avx512_fits(hd)
}

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
/// dimensions 16..=256 in steps of 16) is [`rows`]' with one row: `q` and the context
/// accumulator in registers, so each key costs its row loads and FMAs only (the generic
/// path calls `dense::dot` and `dense::axpy` per key: a dispatch, a reload and a store
/// of the accumulator each), and agrees within [`FLASH_REL_TOL`].
#[allow(clippy::too_many_arguments)]
pub fn decode<E: KvElem>(
    isa: Isa,
    q: &[f32],
    keys: &[E],
    vals: &[E],
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
        // kernel reads rows lo..hi of keys and vals and head_dim values of q.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if avx512_fits(hd) => unsafe {
            let range = move |_: usize| (lo, hi);
            let g = Group {
                tokens: 1,
                heads: 1,
                head_dim: hd,
                q,
                q_stride: hd,
                keys,
                vals,
                scale,
                softcap,
                range: &range,
            };
            let mut ctx = [0f32; 256];
            x86::rows_avx512(&g, s, &mut ctx, &mut |_, _, c| out.copy_from_slice(c))
        },
        _ => {
            let (mut kb, mut vb) = (Vec::new(), Vec::new());
            let (keys, vals) = (
                E::widen(&keys[..hi * hd], &mut kb),
                E::widen(&vals[..hi * hd], &mut vb),
            );
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

/// Whether the AVX-512 kernels take head dimension `hd` (16..=256 in steps of 16).
fn avx512_fits(hd: usize) -> bool {
    Isa::Avx512.is_available() && hd.is_multiple_of(16) && (16..=256).contains(&hd)
}

/// The query rows of one KV head for [`rows`]: `tokens` consecutive tokens, each with
/// the `heads` query heads of the GQA group that reads this KV head (row `r` is token
/// `r / heads`, head `r % heads`).
#[derive(Clone, Copy)]
pub struct Group<'a, E: KvElem = f32> {
    /// Tokens in the block.
    pub tokens: usize,
    /// Query heads per token reading this KV head.
    pub heads: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Token `t`'s head `h` is `q[t * q_stride + h * head_dim ..][..head_dim]`.
    pub q: &'a [f32],
    /// Floats from one token's queries to the next's.
    pub q_stride: usize,
    /// Keys `(positions, head_dim)`.
    pub keys: &'a [E],
    /// Values `(positions, head_dim)`.
    pub vals: &'a [E],
    /// Score scale.
    pub scale: f32,
    /// Soft-cap of the scaled scores, when set.
    pub softcap: Option<f32>,
    /// The keys token `t` may see, `lo .. hi`, never empty; `lo` and `hi` ascend in `t`.
    pub range: &'a (dyn Fn(usize) -> (usize, usize) + Sync),
}

/// Scratch of [`rows`], reused across calls on one thread.
#[derive(Default)]
pub struct RowsScratch {
    /// Scores, then probabilities: `(rows, width)`.
    s: Vec<f32>,
    /// One register tile's contexts.
    ctx: Vec<f32>,
}

/// Attention of every row of `g`, handing token `t`'s head `h` context to `emit(t, h,
/// ctx)`. Each row's bits are those [`decode`] gives that query alone (scores per key,
/// the row's softmax, values summed in key order), so they depend on neither the other
/// rows nor the block split.
pub fn rows<E: KvElem>(
    isa: Isa,
    g: &Group<E>,
    sc: &mut RowsScratch,
    emit: &mut dyn FnMut(usize, usize, &[f32]),
) {
    let hd = g.head_dim;
    if g.tokens == 0 || g.heads == 0 {
        return;
    }
    let last = (g.tokens - 1) * g.q_stride + g.heads * hd;
    let (_, hi) = (g.range)(g.tokens - 1);
    assert!(
        g.q.len() >= last && g.keys.len() >= hi * hd && g.vals.len() >= hi * hd,
        "attention::rows: inconsistent operands"
    );
    match isa {
        // SAFETY: AVX-512 F available (guard); q holds every row (checked above) and the
        // kernel reads keys and values below the last token's hi only.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if avx512_fits(hd) => unsafe {
            sc.ctx.resize(x86::MAX_TILE * hd, 0.0);
            x86::rows_avx512(g, &mut sc.s, &mut sc.ctx, emit)
        },
        _ => {
            sc.ctx.resize(hd, 0.0);
            for t in 0..g.tokens {
                for h in 0..g.heads {
                    let q = &g.q[t * g.q_stride + h * hd..][..hd];
                    let (s, ctx) = (&mut sc.s, &mut sc.ctx);
                    decode(
                        isa,
                        q,
                        g.keys,
                        g.vals,
                        (g.range)(t),
                        g.scale,
                        g.softcap,
                        s,
                        ctx,
                    );
                    emit(t, h, ctx);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{math, softcap as cap, Group, Isa, KvElem};
    use std::arch::x86_64::*;

    /// 16 cache elements from `p`, widened to f32 (exact).
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn load16<E: KvElem>(p: *const E) -> __m512 {
        if E::F16 {
            _mm512_cvtph_ps(_mm256_loadu_si256(p.cast()))
        } else {
            _mm512_loadu_ps(p.cast())
        }
    }

    /// Most rows in one register tile of the value sums.
    pub(super) const MAX_TILE: usize = 8;

    /// [`super::rows`] on AVX-512 (and [`super::decode`], one row).
    ///
    /// 1. Scores: for each tile of 16 keys (loaded once, read from L1 by every row),
    ///    each row's 16 dot products -- per key, 16 lanes `q[l] k[l]` then an FMA per
    ///    further 16 dimensions -- are summed across lanes by one halving tree for all
    ///    16 keys ([`tree16`]), then scaled: per key the same additions in the same
    ///    order whatever the tile, the row or its neighbours.
    /// 2. Per row: soft-cap, then [`math::softmax`] of its live scores.
    /// 3. Values: rows in register tiles; each value row loaded once per tile and added
    ///    into each row's accumulators with its probability (FMA), in key order, only
    ///    over the row's own keys.
    ///
    /// `s` is score scratch; `ctx` holds at least `min(rows, MAX_TILE) * head_dim`
    /// floats (one register tile's contexts).
    ///
    /// # Safety
    /// AVX-512 F available; `head_dim % 16 == 0`, `16 <= head_dim <= 256`; `g.q` holds
    /// every row; `g.keys` and `g.vals` hold at least the last token's `hi` rows.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn rows_avx512<E: KvElem>(
        g: &Group<E>,
        s: &mut Vec<f32>,
        ctx: &mut [f32],
        emit: &mut dyn FnMut(usize, usize, &[f32]),
    ) {
        // Compile-time register counts (the head dimension's, exactly, and the value
        // tile's rows) keep q and the accumulators in registers; with runtime counts or
        // closures (which do not inherit the target features) they went to the stack.
        macro_rules! by_width {
            ($($c:literal => $r:literal),*) => {
                match g.head_dim / 16 {
                    $($c => run::<E, $c, $r>(g, s, ctx, emit),)*
                    _ => unreachable!("head_dim checked by the caller"),
                }
            };
        }
        by_width!(1 => 8, 2 => 8, 3 => 6, 4 => 6, 5 => 4, 6 => 3, 7 => 3, 8 => 2,
                  9 => 2, 10 => 2, 11 => 1, 12 => 1, 13 => 1, 14 => 1, 15 => 1, 16 => 1)
    }

    /// [`rows_avx512`] for head dimension `16 C`, value tiles of up to `R` rows.
    #[target_feature(enable = "avx512f")]
    unsafe fn run<E: KvElem, const C: usize, const R: usize>(
        g: &Group<E>,
        s: &mut Vec<f32>,
        ctx: &mut [f32],
        emit: &mut dyn FnMut(usize, usize, &[f32]),
    ) {
        let (hd, heads) = (g.head_dim, g.heads);
        let n = g.tokens * heads;
        let ranges: Vec<(usize, usize)> = (0..g.tokens).map(|t| (g.range)(t)).collect();
        let base = ranges.iter().map(|r| r.0).min().unwrap_or(0);
        let top = ranges.iter().map(|r| r.1).max().unwrap_or(0);
        // Row r's scores: s[r * width ..][.. hi - lo], key j at j - lo.
        let width = ranges.iter().map(|r| r.1 - r.0).max().unwrap_or(0);
        // Only written entries are read: grow, never clear (zeroing 100 KB per task
        // showed in prefill profiles).
        if s.len() < n * width {
            s.resize(n * width, 0.0);
        }
        let (kp, vp, sp, qp) = (
            g.keys.as_ptr(),
            g.vals.as_ptr(),
            s.as_mut_ptr(),
            g.q.as_ptr(),
        );
        let scale = _mm512_set1_ps(g.scale);
        // Lane 4k + m of a tree16 result holds key 4m + k.
        let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
        let mut j0 = base;
        while j0 < top {
            let nk = 16.min(top - j0);
            for r in 0..n {
                let (lo, hi) = ranges[r / heads];
                if hi <= j0 || lo >= j0 + nk {
                    continue;
                }
                let q = qp.add((r / heads) * g.q_stride + (r % heads) * hd);
                let tot = tree16::<E, C>(q, kp.add(j0 * hd), nk);
                // Lanes of this row's keys, stored at j - lo (masked lanes are neither
                // read nor written, so the wrapped base pointer is never dereferenced).
                let (a, b) = (lo.max(j0) - j0, hi.min(j0 + nk) - j0);
                let mask: __mmask16 = (((1u32 << b) - 1) & !((1u32 << a) - 1)) as u16;
                let dst = sp.add(r * width).wrapping_add(j0).wrapping_sub(lo);
                let v = _mm512_mul_ps(_mm512_permutexvar_ps(order, tot), scale);
                _mm512_mask_storeu_ps(dst, mask, v);
            }
            j0 += nk;
        }
        for r in 0..n {
            let (lo, hi) = ranges[r / heads];
            let row = &mut s[r * width..r * width + (hi - lo)];
            if let Some(c) = g.softcap {
                row.iter_mut().for_each(|v| *v = cap(*v, c));
            }
            math::softmax(Isa::Avx512, row);
        }
        let sp = s.as_ptr();
        let mut r0 = 0;
        while r0 < n {
            let nr = R.min(n - r0);
            // p of row r at key j: prob(r).add(j), for lo_r <= j < hi_r.
            let rows: [(usize, usize, *const f32); R] = std::array::from_fn(|i| {
                let r = r0 + i.min(nr - 1);
                let (lo, hi) = ranges[r / heads];
                (lo, hi, sp.add(r * width).wrapping_sub(lo))
            });
            if nr == R {
                values::<E, C, R>(&rows, vp, ctx.as_mut_ptr());
            } else {
                for (i, row) in rows[..nr].iter().enumerate() {
                    values::<E, C, 1>(&[*row], vp, ctx.as_mut_ptr().add(i * hd));
                }
            }
            for i in 0..nr {
                let r = r0 + i;
                emit(r / heads, r % heads, &ctx[i * hd..(i + 1) * hd]);
            }
            r0 += nr;
        }
    }

    /// `q . k` in 16 lanes: lane `l` is `q[l] k[l]`, then an FMA per further 16
    /// dimensions, in order.
    #[target_feature(enable = "avx512f")]
    #[inline]
    // Index loops over register arrays: `C` is a constant, so they unroll.
    #[allow(clippy::needless_range_loop)]
    unsafe fn dot<E: KvElem, const C: usize>(qv: &[__m512; C], row: *const E) -> __m512 {
        let mut acc = _mm512_mul_ps(qv[0], load16(row));
        for k in 1..C {
            acc = _mm512_fmadd_ps(qv[k], load16(row.add(16 * k)), acc);
        }
        acc
    }

    /// The scores of the query at `q` against `nk <= 16` keys from `keys`, unscaled; key
    /// `4m + k` in lane `4k + m`. Per key, [`dot`]'s lanes summed by the halving tree
    /// `v[i] += v[i + w]` for `w` = 8, 4, 2, 1, computed for 16 keys at once with two
    /// shuffles and one add per pair of vectors and level.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn tree16<E: KvElem, const C: usize>(
        q: *const f32,
        keys: *const E,
        nk: usize,
    ) -> __m512 {
        let mut qv = [_mm512_setzero_ps(); C];
        for (k, v) in qv.iter_mut().enumerate() {
            *v = _mm512_loadu_ps(q.add(16 * k));
        }
        let zero = _mm512_setzero_ps();
        // w = 8: keys (2m, 2m + 1) -> 128-bit chunks [a 0..4, a 4..8, b 0..4, b 4..8] of
        // v[i] + v[i + 8].
        let mut l8 = [zero; 8];
        for (m, l) in l8.iter_mut().enumerate() {
            let a = if 2 * m < nk {
                dot::<E, C>(&qv, keys.add(2 * m * 16 * C))
            } else {
                zero
            };
            let b = if 2 * m + 1 < nk {
                dot::<E, C>(&qv, keys.add((2 * m + 1) * 16 * C))
            } else {
                zero
            };
            *l = _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x44>(a, b),
                _mm512_shuffle_f32x4::<0xEE>(a, b),
            );
        }
        // w = 4: chunk k of l4[m] is key 4m + k's v[i] + v[i + 4], i < 4.
        let mut l4 = [zero; 4];
        for (m, l) in l4.iter_mut().enumerate() {
            let (u, w) = (l8[2 * m], l8[2 * m + 1]);
            *l = _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x88>(u, w),
                _mm512_shuffle_f32x4::<0xDD>(u, w),
            );
        }
        // w = 2: chunk k of l2[m] is [key 8m + k, key 8m + 4 + k] x (i = 0, 1).
        let l2 = [
            _mm512_add_ps(
                _mm512_shuffle_ps::<0x44>(l4[0], l4[1]),
                _mm512_shuffle_ps::<0xEE>(l4[0], l4[1]),
            ),
            _mm512_add_ps(
                _mm512_shuffle_ps::<0x44>(l4[2], l4[3]),
                _mm512_shuffle_ps::<0xEE>(l4[2], l4[3]),
            ),
        ];
        // w = 1: lane 4k + m is key 4m + k's total.
        _mm512_add_ps(
            _mm512_shuffle_ps::<0x88>(l2[0], l2[1]),
            _mm512_shuffle_ps::<0xDD>(l2[0], l2[1]),
        )
    }

    /// For each of the `R` rows `(lo, hi, p)`: `out[i] = sum_{lo <= j < hi} p[j] v_j`
    /// (head dimension `16 C`) in ascending `j`; each value row is loaded once for all
    /// rows that take it. Keys inside every row's range run without per-row tests.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::needless_range_loop)]
    unsafe fn values<E: KvElem, const C: usize, const R: usize>(
        rows: &[(usize, usize, *const f32); R],
        vals: *const E,
        out: *mut f32,
    ) {
        let (mut jlo, mut jhi, mut flo, mut fhi) = (usize::MAX, 0, 0, usize::MAX);
        for &(lo, hi, _) in rows {
            (jlo, jhi, flo, fhi) = (jlo.min(lo), jhi.max(hi), flo.max(lo), fhi.min(hi));
        }
        let segments = if flo < fhi {
            [(jlo, flo, false), (flo, fhi, true), (fhi, jhi, false)]
        } else {
            [(jlo, jhi, false), (0, 0, false), (0, 0, false)]
        };
        let mut o = [[_mm512_setzero_ps(); C]; R];
        for (a, b, full) in segments {
            for j in a..b {
                let row = vals.add(j * 16 * C);
                let mut v = [_mm512_setzero_ps(); C];
                for k in 0..C {
                    v[k] = load16(row.add(16 * k));
                }
                for i in 0..R {
                    let (lo, hi, p) = rows[i];
                    if full || (lo <= j && j < hi) {
                        let p = _mm512_set1_ps(*p.wrapping_add(j));
                        for k in 0..C {
                            o[i][k] = _mm512_fmadd_ps(p, v[k], o[i][k]);
                        }
                    }
                }
            }
        }
        for i in 0..R {
            for k in 0..C {
                _mm512_storeu_ps(out.add(i * 16 * C + 16 * k), o[i][k]);
            }
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
            // An f16 cache: the reference on the same values, widened.
            let (k16, v16) = (to_f16(&k), to_f16(&vals));
            let (kw, vw) = (widened(&k16), widened(&v16));
            let mut want16 = vec![0f32; hd];
            flash_scalar(
                &Problem {
                    keys: &kw,
                    vals: &vw,
                    ..prob
                },
                &mut |_, ctx| want16.copy_from_slice(ctx),
            );
            let big = want.iter().fold(0f32, |a, v| a.max(v.abs()));
            for isa in Isa::ALL.into_iter().filter(|i| i.is_available()) {
                let mut got = vec![0f32; hd];
                let range = (lo, n);
                let mut s = Vec::new();
                decode(isa, &q, &k, &vals, range, 0.125, softcap, &mut s, &mut got);
                let mut got16 = vec![0f32; hd];
                decode(
                    isa, &q, &k16, &v16, range, 0.125, softcap, &mut s, &mut got16,
                );
                for (got, want, what) in [(&got, &want, "f32"), (&got16, &want16, "f16")] {
                    let worst = got
                        .iter()
                        .zip(want)
                        .map(|(a, b)| (a - b).abs())
                        .fold(0f32, f32::max);
                    assert!(
                        worst <= FLASH_REL_TOL * big,
                        "{isa:?} {what} hd {hd} pos {pos}: {worst} vs {big}"
                    );
                }
                // Rounding K and V to f16 moves the context, but only by about f16's
                // relative step (not a wrong reading of the halves).
                let moved = got16
                    .iter()
                    .zip(&got)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(
                    moved > 0.0 && moved <= 4e-3 * big,
                    "{isa:?} f16 moved {moved}"
                );
            }
        }
    }

    fn to_f16(x: &[f32]) -> Vec<f16> {
        x.iter().map(|&v| f16::from_f32(v)).collect()
    }

    fn widened(x: &[f16]) -> Vec<f32> {
        x.iter().map(|v| v.to_f32()).collect()
    }

    /// `rows` gives every query row the bits `decode` gives it alone: any head
    /// dimension the kernels take, GQA groups, ragged causal blocks, a cache offset,
    /// sliding windows, soft-capping.
    #[test]
    fn rows_give_every_query_the_bits_of_decode() {
        let mut rng = SplitMix64(9);
        for (hd, heads, tokens, pos, window, softcap) in [
            (64, 3, 16, 0, None, None),
            (64, 3, 17, 37, None, None),
            (64, 1, 5, 300, Some(20), None),
            (32, 4, 9, 70, None, Some(30.0)),
            (48, 2, 13, 3, None, None),
            (80, 3, 7, 50, Some(33), None),
            (128, 2, 6, 90, None, None),
            (256, 1, 3, 20, None, None),
            (16, 8, 4, 0, None, None),
            (24, 2, 4, 10, None, None),
        ] {
            let keys_n = pos + tokens;
            let mut v = |n: usize, s: f32| -> Vec<f32> { (0..n).map(|_| rng.sym() * s).collect() };
            let (q, k, vals) = (
                v(tokens * heads * hd, 3.0),
                v(keys_n * hd, 3.0),
                v(keys_n * hd, 1.0),
            );
            let range = move |t: usize| {
                let p = pos + t;
                (
                    window.map_or(0, |w: usize| (p + 1).saturating_sub(w)),
                    p + 1,
                )
            };
            let g = Group {
                tokens,
                heads,
                head_dim: hd,
                q: &q,
                q_stride: heads * hd,
                keys: &k,
                vals: &vals,
                scale: 0.125,
                softcap,
                range: &range,
            };
            let (k16, v16) = (to_f16(&k), to_f16(&vals));
            let g16 = Group {
                keys: &k16,
                vals: &v16,
                tokens,
                heads,
                head_dim: hd,
                q: &q,
                q_stride: heads * hd,
                scale: 0.125,
                softcap,
                range: &range,
            };
            for isa in Isa::ALL.into_iter().filter(|i| i.is_available()) {
                same_as_decode(isa, &g, range);
                same_as_decode(isa, &g16, range);
            }
        }
    }

    /// Every row of `rows(g)` has the bits of `decode` of that row alone.
    fn same_as_decode<E: KvElem>(isa: Isa, g: &Group<E>, range: impl Fn(usize) -> (usize, usize)) {
        let (tokens, heads, hd) = (g.tokens, g.heads, g.head_dim);
        let mut got = vec![f32::NAN; tokens * heads * hd];
        let mut sc = RowsScratch::default();
        // Twice through one scratch: stale scores must not leak into a call.
        for _ in 0..2 {
            rows(isa, g, &mut sc, &mut |t, h, ctx| {
                got[(t * heads + h) * hd..][..hd].copy_from_slice(ctx)
            });
        }
        for t in 0..tokens {
            for h in 0..heads {
                let r = (t * heads + h) * hd;
                let mut want = vec![0f32; hd];
                let q = &g.q[r..r + hd];
                let (scale, cap) = (g.scale, g.softcap);
                decode(
                    isa,
                    q,
                    g.keys,
                    g.vals,
                    range(t),
                    scale,
                    cap,
                    &mut Vec::new(),
                    &mut want,
                );
                let same = got[r..r + hd]
                    .iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                let f16 = E::F16;
                assert!(
                    same,
                    "{isa:?} f16 {f16} hd {hd} heads {heads} token {t} head {h}"
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
