//! The prefill GEMM on integer lanes (AVX-512 VNNI + VBMI): `Y (n, rows) = X (n, cols)
//! W^T` for a packed weight and many tokens at once.
//!
//! Numerics: the decode mat-vec's ([`super::qint`]; its scalar reference
//! [`qint::dot_rows_i16_scalar`] is this kernel's specification too), with the
//! activations rounded to [`X_LEVELS`] per scale group instead of 16383. Then a whole
//! 64-column span's products (`|cbq| <= 16383`, `|xq| <= 2047`, 64 of them:
//! `64 * 16383 * 2047 < 2^31`) sum in one int32 lane without overflow, and a lane can
//! take `vpdpwssd` (two products per lane per instruction) for a whole span before it
//! is converted. Each token's outputs are bit for bit the reference applied to that token
//! alone ([`PackedX::token`] gives the reference its rounded activations), whatever the
//! number of tokens.
//!
//! Error against the f32 reference: as the decode kernel's, with `xs_G = max|x| / 2047`:
//! each product is off by at most
//! `|s| max|cb| max_G|x| (1/32766 + 1/4094 + 1/(4 16383 2047))`, hence [`PREFILL_TOL`] relative to `sum_j |s(j)| max|cb| max_G|x|` (plus the
//! f32 summation tolerance). llama.cpp's prefill rounds activations to 8 bits per 256.
//!
//! Layout and loop (`n` tokens in blocks of 16, one per zmm lane):
//! - weights: rows decoded to `cbq[code]` (int16, [`qint::lookup_rows`]) in the
//!   Planes64 order of the decode kernel; dword `u` of a 64-column chunk holds the
//!   pair of columns at positions `2u`, `2u + 1`;
//! - activations ([`PackedX`], once per call and input): per block of 16 tokens and per
//!   dword unit, the 16 tokens' pairs, so `vpdpwssd acc, x_unit, broadcast(w_unit)` adds
//!   `w[2u] x[2u] + w[2u + 1] x[2u + 1]` to every token's lane;
//! - a register tile of 8 rows x 3 blocks (48 tokens): 24 int32 accumulators, reset per
//!   span; after each span they convert to f32, times `scale(row, G) xs_G` per lane, and
//!   are added to the f32 totals; the totals times `cs` are the outputs.
//!
//! Why: per zmm instruction `vpdpwssd` does 32 multiply-adds where an f32 FMA does 16;
//! against the f32 prefill (tiles dequantized, then the `gemm` crate) this kernel is
//! 1.4-1.8x at 512 tokens, packing included (results/qgemm_speed.json; research log,
//! 2026-12-04 evening).

use super::qint::{self, I16Lut, Order, PreparedX};
use super::quant::QuantRows;
use super::Isa;
use rayon::prelude::*;
use std::cell::RefCell;

/// Largest magnitude of a rounded activation in the prefill GEMM (see the module
/// documentation): `64 * 16383 * 2047 < 2^31`.
pub const X_LEVELS: f32 = 2047.0;

/// Tolerance of the prefill GEMM against the f32 reference, relative to
/// `sum_j |s(j)| max|cb| max_G|x|` (1/32766 + 1/4094 = 2.75e-4, see the module
/// documentation); the f32 summation tolerance comes on top.
pub const PREFILL_TOL: f32 = 2.8e-4;

/// Tokens per lane block (one zmm of int32).
const LANES: usize = 16;
/// Rows of the register tile.
const TILE_ROWS: usize = 8;
/// Token blocks of the register tile.
const TILE_BLOCKS: usize = 3;

/// Whether this CPU runs the integer prefill GEMM: AVX-512 with VBMI (the weight
/// lookup) and VNNI (`vpdpwssd`). Elsewhere prefill keeps the f32 tiles.
pub fn available(isa: Isa) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        isa == Isa::Avx512 && qint::vbmi_available() && is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = isa;
        false
    }
}

/// Whether the prefill GEMM handles a weight of this shape: whole 64-column chunks, a
/// group the integer kernels take (a multiple of 32), any width 2..=8.
pub fn supports(bits: usize, group: usize, cols: usize) -> bool {
    qint::supports(bits, group) && cols.is_multiple_of(64) && cols > 0
}

/// `n` tokens' activations rounded for the prefill GEMM and laid out by lane blocks.
pub struct PackedX {
    n: usize,
    cols: usize,
    group: usize,
    /// `[block][unit][lane]`: token `16 block + lane`'s dword `unit` (chunk `unit / 32`,
    /// Planes64 positions `2 (unit % 32)` and `+ 1`, as two int16); zero past `n`.
    xq: Vec<i32>,
    /// `[block][group][lane]`: each token's `xs_G`; zero past `n`.
    xs: Vec<f32>,
}

impl PackedX {
    /// Activation values the buffers can hold without reallocating.
    pub fn capacity(&self) -> usize {
        self.xq.capacity()
    }

    /// Tokens.
    pub fn n(&self) -> usize {
        self.n
    }

    fn blocks(&self) -> usize {
        self.n.div_ceil(LANES)
    }

    fn units(&self) -> usize {
        self.cols / 2
    }

    fn groups(&self) -> usize {
        self.cols.div_ceil(self.group)
    }

    /// Whether this packing serves a weight with `group` and `cols`.
    pub fn fits(&self, group: usize, cols: usize) -> bool {
        self.group == group && self.cols == cols
    }

    /// Token `t`'s rounded activations as the decode kernel's reference reads them
    /// ([`Order::Planes64`]).
    pub fn token(&self, t: usize) -> PreparedX {
        assert!(t < self.n, "PackedX::token: token out of range");
        let (b, lane, units, groups) = (t / LANES, t % LANES, self.units(), self.groups());
        let mut xq = Vec::with_capacity(self.cols);
        for u in 0..units {
            let d = self.xq[(b * units + u) * LANES + lane];
            xq.push(d as i16);
            xq.push((d >> 16) as i16);
        }
        let xs = (0..groups)
            .map(|g| self.xs[(b * groups + g) * LANES + lane])
            .collect();
        PreparedX::from_parts(self.group, Order::Planes64, self.cols, xq, xs, X_LEVELS)
    }
}

/// Rounds and packs `x (n, cols)` for weights of group `group` (token blocks in parallel
/// on the rayon pool when there are several).
pub fn pack_x(isa: Isa, x: &[f32], n: usize, cols: usize, group: usize) -> PackedX {
    pack_x_reusing(isa, x, n, cols, group, None)
}

/// [`pack_x`] into the buffers of `spare` (an earlier call's packing): at prefill sizes
/// (megabytes), fresh allocations come back from the kernel zeroed page by page.
pub fn pack_x_reusing(
    isa: Isa,
    x: &[f32],
    n: usize,
    cols: usize,
    group: usize,
    spare: Option<PackedX>,
) -> PackedX {
    assert!(
        cols.is_multiple_of(64) && group.is_multiple_of(32) && group > 0 && x.len() >= n * cols,
        "pack_x: columns must be whole 64-column chunks, groups multiples of 32"
    );
    let blocks = n.div_ceil(LANES);
    let (units, groups) = (cols / 2, cols.div_ceil(group));
    let (mut xq, mut xs) = spare.map_or_else(Default::default, |p| (p.xq, p.xs));
    // Every lane of a full block is written below; a partial block is zeroed first
    // (lanes past `n` must read zero). Not clearing the rest saves a memset of the
    // whole buffer per call.
    xq.resize(blocks * units * LANES, 0);
    xs.resize(blocks * groups * LANES, 0.0);
    let simd = available(isa);
    let pack_block = |(b, (xq, xs)): (usize, (&mut [i32], &mut [f32]))| {
        let (t0, valid) = (b * LANES, LANES.min(n - b * LANES));
        if valid < LANES {
            xq.fill(0);
            xs.fill(0.0);
        }
        let xb = &x[t0 * cols..(t0 + valid) * cols];
        if simd {
            // SAFETY: AVX-512 F+BW available (`available`); `xb` holds `valid <= 16`
            // tokens of `cols` (a multiple of 64) values, `xq` and `xs` one block.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                x86::pack_block(xb, cols, group, xq, xs)
            };
            return;
        }
        for (lane, xt) in xb.chunks_exact(cols).enumerate() {
            let p = qint::prepare_x_levels(xt, group, Order::Planes64, X_LEVELS);
            for (u, pair) in p.xq().chunks_exact(2).enumerate() {
                xq[u * LANES + lane] =
                    i32::from(pair[0] as u16) | (i32::from(pair[1] as u16) << 16);
            }
            for (g, &s) in p.xs().iter().enumerate() {
                xs[g * LANES + lane] = s;
            }
        }
    };
    if blocks > 1 {
        xq.par_chunks_mut(units * LANES)
            .zip(xs.par_chunks_mut(groups * LANES))
            .enumerate()
            .for_each(pack_block);
    } else {
        xq.chunks_mut(units * LANES)
            .zip(xs.chunks_mut(groups * LANES))
            .enumerate()
            .for_each(pack_block);
    }
    PackedX {
        n,
        cols,
        group,
        xq,
        xs,
    }
}

fn check(q: &QuantRows, lut: &I16Lut, px: &PackedX, first: usize, ys: &[&mut [f32]]) {
    let rows = ys.first().map_or(0, |y| y.len());
    assert!(
        supports(q.bits(), q.group(), q.cols())
            && px.fits(q.group(), q.cols())
            && ys.len() == px.n
            && ys.iter().all(|y| y.len() == rows)
            && first + rows <= q.rows()
            && lut.scale() >= 0.0,
        "qgemm: inconsistent operands"
    );
}

/// Reference: every token through [`qint::dot_rows_i16_scalar`] with its rounded
/// activations. `ys[t]` gets token `t`'s outputs for rows `first .. first + len`.
pub fn gemm_rows_scalar(
    q: &QuantRows,
    lut: &I16Lut,
    px: &PackedX,
    first: usize,
    ys: &mut [&mut [f32]],
) {
    check(q, lut, px, first, ys);
    // Whole 64-column chunks: the reference's f32 tail (read from `x`) is empty.
    let zeros = vec![0f32; q.cols()];
    for (t, y) in ys.iter_mut().enumerate() {
        qint::dot_rows_i16_scalar(q, lut, &px.token(t), &zeros, first, y);
    }
}

thread_local! {
    /// The weight tile of the current task, `(rows, cols)` int16.
    static TILE: RefCell<Vec<i16>> = const { RefCell::new(Vec::new()) };
}

/// [`gemm_rows_scalar`] with the VNNI kernel when [`available`] (same bits).
pub fn gemm_rows(
    isa: Isa,
    q: &QuantRows,
    lut: &I16Lut,
    px: &PackedX,
    first: usize,
    ys: &mut [&mut [f32]],
) {
    check(q, lut, px, first, ys);
    if !available(isa) {
        return gemm_rows_scalar(q, lut, px, first, ys);
    }
    let rows = ys.first().map_or(0, |y| y.len());
    TILE.with(|tile| {
        let mut tile = tile.borrow_mut();
        tile.resize(rows * q.cols(), 0);
        qint::lookup_rows(isa, q, lut, first, &mut tile);
        // SAFETY: AVX-512 F+BW+VNNI available (`available`); `check` verified the
        // shapes: the tile holds `rows` rows of `cols` (whole chunks), `px` holds
        // `blocks` blocks of `cols / 2` units and its groups, and every row's scales
        // are in range.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            x86::gemm(q, lut, px, first, &tile, ys)
        };
    });
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{PackedX, LANES, TILE_BLOCKS, TILE_ROWS, X_LEVELS};
    use crate::kernels::qint::I16Lut;
    use crate::kernels::quant::QuantRows;
    use std::arch::x86_64::*;

    /// Rounds and packs one block of at most 16 tokens (`x`, row-major) exactly as the
    /// scalar path does (`qint::prepare_x_levels(.., Planes64, X_LEVELS)` per token,
    /// then dword `u` of token `lane` to `xq[u * 16 + lane]`): per 64-column chunk, each
    /// token's values are rounded into a small buffer, then 16 x 16 dwords are
    /// transposed in registers (the scalar scatter touched one cache line per dword).
    ///
    /// # Safety
    /// AVX-512 F+BW; `x` holds at most 16 rows of `cols` (a multiple of 64),
    /// `group` a multiple of 32; `xq` holds `cols / 2 * 16` dwords and `xs` `groups * 16`.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn pack_block(
        x: &[f32],
        cols: usize,
        group: usize,
        xq: &mut [i32],
        xs: &mut [f32],
    ) {
        let groups = cols.div_ceil(group);
        // `inv[lane * groups + g]`: 1 / xs_G (0 when xs_G is 0), as the scalar rounding.
        let mut inv = vec![0f32; LANES * groups];
        for (lane, xt) in x.chunks_exact(cols).enumerate() {
            for g in 0..groups {
                let (a, b) = (g * group, ((g + 1) * group).min(cols));
                let mut m = _mm512_setzero_ps();
                for j in (a..b).step_by(16) {
                    m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(xt.as_ptr().add(j))));
                }
                let m = _mm512_reduce_max_ps(m);
                let s = if m > 0.0 && m.is_finite() {
                    m / X_LEVELS
                } else {
                    0.0
                };
                xs[g * LANES + lane] = s;
                inv[lane * groups + g] = if s > 0.0 { 1.0 / s } else { 0.0 };
            }
        }
        let (lo, hi) = (_mm512_set1_ps(-X_LEVELS), _mm512_set1_ps(X_LEVELS));
        let half = _mm512_set1_ps(0.5);
        let sign = _mm512_set1_epi32(i32::MIN);
        // 16 values of `xt` from column `j`, rounded as `round_i16(v * inv, X_LEVELS)`:
        // clamp, then `v + copysign(0.5, v)` truncated (half away from zero).
        let round = |xt: &[f32], inv: f32, j: usize| {
            let v = _mm512_mul_ps(_mm512_loadu_ps(xt.as_ptr().add(j)), _mm512_set1_ps(inv));
            let v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
            let h = _mm512_castsi512_ps(_mm512_or_si512(
                _mm512_and_si512(_mm512_castps_si512(v), sign),
                _mm512_castps_si512(half),
            ));
            _mm512_cvtepi32_epi16(_mm512_cvttps_epi32(_mm512_add_ps(v, h)))
        };
        // `chunk[lane]`: the token's 64 values of the current chunk in Planes64 order
        // (32 dwords); lanes past `valid` stay zero.
        let mut chunk = [[_mm512_setzero_si512(); 2]; LANES];
        for c in 0..cols / 64 {
            let j = 64 * c;
            for (lane, xt) in x.chunks_exact(cols).enumerate() {
                let iv = |k: usize| inv[lane * groups + (j + 16 * k) / group];
                // Columns 16 k .. 16 k + 16 as int16; Planes64 takes each one's low 8
                // columns (128-bit lane 0) into the first half, its high 8 into the second.
                let a = _mm512_inserti64x4::<1>(
                    _mm512_castsi256_si512(round(xt, iv(0), j)),
                    round(xt, iv(1), j + 16),
                );
                let b = _mm512_inserti64x4::<1>(
                    _mm512_castsi256_si512(round(xt, iv(2), j + 32)),
                    round(xt, iv(3), j + 48),
                );
                chunk[lane] = [
                    _mm512_shuffle_i64x2::<0x88>(a, b),
                    _mm512_shuffle_i64x2::<0xdd>(a, b),
                ];
            }
            for h in [0, 1] {
                let mut r: [__m512i; LANES] = std::array::from_fn(|lane| chunk[lane][h]);
                transpose16(&mut r);
                for (k, v) in r.iter().enumerate() {
                    let u = 32 * c + 16 * h + k;
                    _mm512_storeu_si512(xq.as_mut_ptr().add(u * LANES).cast(), *v);
                }
            }
        }
    }

    /// In-place transpose of a 16 x 16 matrix of dwords (`r[i]` lane `j` -> `r[j]` lane
    /// `i`): 32-bit, then 64-bit interleaves within 128-bit lanes, then two rounds of
    /// 128-bit lane shuffles.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn transpose16(r: &mut [__m512i; 16]) {
        let mut t = [_mm512_setzero_si512(); 16];
        for i in 0..8 {
            t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
        }
        // r[4i + k], 128-bit lane L: rows 4i .. 4i + 4 of column 4L + k.
        for i in 0..4 {
            r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
            r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
            r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
            r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
        }
        for base in [0, 8] {
            for k in 0..4 {
                let (a, b) = (r[base + k], r[base + 4 + k]);
                t[base + k] = _mm512_shuffle_i32x4::<0x88>(a, b);
                t[base + 4 + k] = _mm512_shuffle_i32x4::<0xdd>(a, b);
            }
        }
        for m in 0..8 {
            r[m] = _mm512_shuffle_i32x4::<0x88>(t[m], t[m + 8]);
            r[m + 8] = _mm512_shuffle_i32x4::<0xdd>(t[m], t[m + 8]);
        }
    }

    /// # Safety
    /// AVX-512 F+BW+VNNI; operands checked by `super::check`; `tile` holds
    /// `ys[0].len()` rows of `q.cols()` values.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn gemm(
        q: &QuantRows,
        lut: &I16Lut,
        px: &PackedX,
        first: usize,
        tile: &[i16],
        ys: &mut [&mut [f32]],
    ) {
        let rows = ys.first().map_or(0, |y| y.len());
        let (cols, blocks) = (q.cols(), px.blocks());
        let mut b0 = 0;
        while b0 < blocks {
            let nb = TILE_BLOCKS.min(blocks - b0);
            let mut r0 = 0;
            while r0 < rows {
                let nr = if rows - r0 >= TILE_ROWS { TILE_ROWS } else { 1 };
                macro_rules! go {
                    ($r:literal, $t:literal) => {
                        micro::<$r, $t>(q, lut, px, tile, cols, first, r0, b0, ys)
                    };
                }
                match (nr, nb) {
                    (TILE_ROWS, 3) => go!(8, 3),
                    (TILE_ROWS, 2) => go!(8, 2),
                    (TILE_ROWS, _) => go!(8, 1),
                    (_, 3) => go!(1, 3),
                    (_, 2) => go!(1, 2),
                    _ => go!(1, 1),
                }
                r0 += nr;
            }
            b0 += nb;
        }
    }

    /// `ys[l][r0 .. r0 + 8] = v[r][l] * cs + 0.0` for the 8 rows `v` (lanes = tokens) and
    /// the `ys.len() <= 16` tokens: the reference's `total * cs + tail`, after an
    /// in-register 8 x 16 transpose (unpacks by 32 and 64 bits, then 128-bit lane
    /// interleaves), one 8-float store per token.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn store8x16(v: &[__m512; 8], cs: f32, r0: usize, ys: &mut [&mut [f32]]) {
        let t: [__m512; 8] = std::array::from_fn(|i| {
            let (a, b) = (v[i / 2 * 2], v[i / 2 * 2 + 1]);
            if i % 2 == 0 {
                _mm512_unpacklo_ps(a, b)
            } else {
                _mm512_unpackhi_ps(a, b)
            }
        });
        // u[k] (k < 4), 128-bit lane L: rows 0..4 of token 4 L + k; u[4 + k]: rows 4..8.
        let pd = _mm512_castps_pd;
        let u: [__m512; 8] = std::array::from_fn(|i| {
            let (h, k) = (i / 4, i % 4);
            let (a, b) = (pd(t[4 * h + k / 2]), pd(t[4 * h + 2 + k / 2]));
            _mm512_castpd_ps(if k % 2 == 0 {
                _mm512_unpacklo_pd(a, b)
            } else {
                _mm512_unpackhi_pd(a, b)
            })
        });
        let lo = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
        let hi = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
        let (cs, zero) = (_mm512_set1_ps(cs), _mm512_setzero_ps());
        for k in 0..4 {
            for (h, idx) in [(0, lo), (1, hi)] {
                // Tokens 8 h + k (low 8 floats) and 8 h + 4 + k (high 8).
                let w = _mm512_permutex2var_ps(u[k], idx, u[4 + k]);
                let w = _mm512_add_ps(_mm512_mul_ps(w, cs), zero);
                for (l, half) in [
                    (8 * h + k, _mm512_castps512_ps256(w)),
                    (
                        8 * h + 4 + k,
                        _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(w))),
                    ),
                ] {
                    if let Some(y) = ys.get_mut(l) {
                        _mm256_storeu_ps(y[r0..r0 + 8].as_mut_ptr(), half);
                    }
                }
            }
        }
    }

    /// `acc += vpdpwssd(x, broadcast(*w))`, the broadcast folded into the instruction's
    /// memory operand. In assembly: LLVM's generic tuning rewrites the intrinsic into
    /// `vpmaddwd` + `vpaddd` (two instructions where one does, the kernel's whole
    /// point); the folded broadcast saves a separate `vpbroadcastd` per row and pair.
    ///
    /// # Safety
    /// AVX-512 VNNI available; `w` readable for 4 bytes (any alignment).
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    #[inline]
    unsafe fn dpwssd_bcast(acc: &mut __m512i, x: __m512i, w: *const i32) {
        std::arch::asm!(
            "vpdpwssd {acc}, {x}, dword ptr [{w}]{{1to16}}",
            acc = inout(zmm_reg) *acc,
            x = in(zmm_reg) x,
            w = in(reg) w,
            options(pure, readonly, nostack, preserves_flags)
        )
    }

    /// Rows `r0 .. r0 + R` of the tile (`first + r0 ..` of the weight) against token
    /// blocks `b0 .. b0 + T`: the register tile of the module documentation.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn micro<const R: usize, const T: usize>(
        q: &QuantRows,
        lut: &I16Lut,
        px: &PackedX,
        tile: &[i16],
        cols: usize,
        first: usize,
        r0: usize,
        b0: usize,
        ys: &mut [&mut [f32]],
    ) {
        let (units, groups, group) = (px.units(), px.groups(), q.group());
        let w: [*const i32; R] = std::array::from_fn(|r| tile.as_ptr().add((r0 + r) * cols).cast());
        let sc: [*const f32; R] = std::array::from_fn(|r| q.row_scales(first + r0 + r));
        let xq: [*const i32; T] =
            std::array::from_fn(|t| px.xq.as_ptr().add((b0 + t) * units * LANES));
        let xs: [*const f32; T] =
            std::array::from_fn(|t| px.xs.as_ptr().add((b0 + t) * groups * LANES));
        let mut tot = [[_mm512_setzero_ps(); R]; T];
        // One span: the int32 sums over its units, then scaled by group `g` into `tot`.
        macro_rules! span {
            ($units:expr, $g:expr) => {{
                let g = $g;
                let mut acc = [[_mm512_setzero_si512(); R]; T];
                for u in $units {
                    let xv: [__m512i; T] =
                        std::array::from_fn(|t| _mm512_loadu_si512(xq[t].add(u * LANES).cast()));
                    for r in 0..R {
                        for t in 0..T {
                            dpwssd_bcast(&mut acc[t][r], xv[t], w[r].add(u));
                        }
                    }
                }
                for t in 0..T {
                    let xsv = _mm512_loadu_ps(xs[t].add(g * LANES));
                    for r in 0..R {
                        // The reference's `acc as f32 * (scale * xs)`, then `total +=`: a
                        // product and a sum, each rounded (no FMA).
                        let m = _mm512_mul_ps(_mm512_set1_ps(*sc[r].add(g)), xsv);
                        let f = _mm512_mul_ps(_mm512_cvtepi32_ps(acc[t][r]), m);
                        tot[t][r] = _mm512_add_ps(tot[t][r], f);
                    }
                }
            }};
        }
        for c in 0..units / 32 {
            let u0 = 32 * c;
            if group == 32 {
                // Columns 0..32 of the chunk are Planes64 positions 0..16 and 32..48.
                span!((u0..u0 + 8).chain(u0 + 16..u0 + 24), 2 * c);
                span!((u0 + 8..u0 + 16).chain(u0 + 24..u0 + 32), 2 * c + 1);
            } else {
                span!(u0..u0 + 32, 64 * c / group);
            }
        }
        let cs = lut.scale();
        if let Ok(tot) = tot
            .iter()
            .map(|t| <&[__m512; 8]>::try_from(&t[..]))
            .collect::<Result<Vec<_>, _>>()
        {
            // Eight rows: transposed in registers.
            for (t, v) in tot.into_iter().enumerate() {
                let b = (b0 + t) * LANES;
                store8x16(v, cs, r0, &mut ys[b..(b + LANES).min(px.n)]);
            }
            return;
        }
        for (t, tot) in tot.iter().enumerate() {
            let mut lanes = [[0f32; LANES]; R];
            for (l, v) in lanes.iter_mut().zip(tot) {
                _mm512_storeu_ps(l.as_mut_ptr(), *v);
            }
            let b = (b0 + t) * LANES;
            for lane in 0..LANES.min(px.n.saturating_sub(b)) {
                let y = &mut ys[b + lane][r0..r0 + R];
                for (r, y) in y.iter_mut().enumerate() {
                    // As the reference: `total * cs + tail` with an empty tail.
                    *y = lanes[r][lane] * cs + 0.0;
                }
            }
        }
    }
}
