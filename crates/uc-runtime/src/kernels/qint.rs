//! The decode mat-vec on integer lanes (AVX2): `y[r] = sum_j w(first + r, j) x_j` with the
//! codebook and the activations rounded to 15-bit integers, so that a byte shuffle
//! (`vpshufb`) looks the weights up and `vpmaddwd` multiplies 16 pairs per instruction.
//!
//! Why: on AVX2 the f32 kernel ([`super::quant::dot_rows`]) looks up 5-, 6- and 8-bit
//! codes with `vgatherdps`, which costs ~20 cycles per 8 weights on AMD Zen 3 (the
//! bench machine): 4x the 4-bit path, and 80% of the default pack's weights (research
//! log, 2026-12-03). Looking f32 values up with byte shuffles needs four byte planes and
//! eight unpacks per 32 weights; int16 values need two planes and two unpacks, and
//! `vpmaddwd` does twice the multiply-adds of an f32 FMA.
//!
//! Numerics (the scalar reference [`dot_rows_i16_scalar`] is the specification):
//! - codebook: `cbq[c] = round(cb[c] / cs)`, `cs = max|cb| / I16_LEVELS` (per tensor);
//! - activations, per scale group `G` of the weight: `xq_j = round(x_j / xs_G)`,
//!   `xs_G = max_{j in G} |x_j| / I16_LEVELS` ([`prepare_x`], once per token and call);
//! - per 64 columns (or per group when it is 32): the exact integer sum
//!   `sum cbq[c_j] xq_j` (the kernel's int32 lanes hold at most 8 products of magnitude
//!   < 2^28 each: no overflow), converted to f32
//!   and multiplied by `scale(row, G) * xs_G`; the f32 partials are summed, times `cs`.
//! - columns past the last whole 32 (none in the models we ship) are summed in f32 from
//!   the exact weights.
//!
//! Error against the f32 reference: each product is off by at most
//! `|s| (cs |x_j| / 2 + xs_G |cb| / 2 + cs xs_G / 4) <= |s| max|cb| max_G|x| / 16383`, hence
//! [`I16_MATVEC_TOL`] relative to `sum_j |s(j)| max|cb| max_G|x|`, plus the f32 summation
//! tolerance. For comparison llama.cpp rounds activations to 8 bits for the same kernel.
//!
//! Code unpacking, 32 codes (4b bytes) per step, for every width: two 16-byte windows
//! (codes 0..15 and 16..31, the upper 128-bit lane holding codes 8..15 / 24..31 of the
//! same window) are shuffled into 16-bit words holding each code's two bytes, the word
//! is shifted left by a power-of-two multiply (`vpmullw`; AVX2 has no per-word variable
//! shift) so the code's top bit is bit 15, then right by `16 - b`, and the two vectors
//! are packed to bytes. The 4-bit path reads nibbles directly (one shift, one mask).
//!
//! Lookup of a code c (< 2^b) in 2^b int16 values, per byte plane (low, high byte): with
//! `nt = 2^(b-4)` tables `T_t` of 16 entries (codes 16t .. 16t+15), the chain
//! `T_{nt-1}[c] ^ XOR_t (T_t ^ T_{t+1})[c + 0x80 - 16(t+1)]` telescopes to `T_{c/16}[c]`:
//! `vpshufb` reads the low 4 index bits and returns 0 when bit 7 is set, which the
//! (saturating) offset does exactly when `c >= 16(t+1)`.

use super::quant::QuantRows;
use super::Isa;

/// Largest integer magnitude of a rounded codebook entry or activation: 2^14 - 1, so
/// that 8 products (< 2^28 each) summed in an int32 lane cannot overflow.
pub const I16_LEVELS: f32 = 16383.0;

/// Tolerance of the integer mat-vec against the f32 reference
/// ([`super::quant::dot_rows_scalar`]), relative to `sum_j |s(j)| max|cb| max_G|x|`
/// (see the module documentation: 1/16383 = 6.1e-5 from the two roundings). The f32
/// summation tolerance ([`super::quant::MATVEC_REL_TOL`] of `sum |w x|`) comes on top.
pub const I16_MATVEC_TOL: f32 = 6.2e-5;

/// Tables per XOR chain: offsets `0x80 - 16 (k + 1)` stay non-negative up to 128 codes.
const SEGMENT: usize = 8;
/// Columns per unpack step.
const CHUNK: usize = 32;
/// Columns summed in int32 before converting (8 products per lane, see [`I16_LEVELS`]).
const SPAN: usize = 64;

/// A quantized matrix's codebook rounded to int16, as shuffle tables.
pub struct I16Lut {
    bits: usize,
    /// `cs`: `codebook[c] ~ cbq[c] * scale`.
    scale: f32,
    /// `cbq`, periodic with period 2^bits over 256 entries (the scalar reference).
    cbq: [i16; 256],
    /// `[plane * 16 + t]`: the XOR chain's tables (plane 0 = low bytes, 1 = high bytes),
    /// each 16 bytes repeated in both 128-bit lanes.
    tables: [[u8; 32]; 32],
}

impl I16Lut {
    /// Rounds `codebook` (periodic over 256 entries, period 2^bits) to int16 tables.
    pub fn new(codebook: &[f32; 256], bits: usize) -> Self {
        let period = 1usize << bits;
        let max = codebook[..period]
            .iter()
            .fold(0.0f32, |m, v| m.max(v.abs()));
        let (scale, inv) = if max > 0.0 && max.is_finite() {
            (max / I16_LEVELS, I16_LEVELS / max)
        } else {
            (0.0, 0.0)
        };
        let mut cbq = [0i16; 256];
        for (c, q) in cbq.iter_mut().enumerate() {
            *q = (codebook[c % period] * inv)
                .round()
                .clamp(-I16_LEVELS, I16_LEVELS) as i16;
        }
        let nt = period.div_ceil(16);
        let mut tables = [[0u8; 32]; 32];
        for plane in 0..2 {
            let byte = |c: usize| cbq[c % 256].to_le_bytes()[plane];
            for t in 0..nt {
                for l in 0..16 {
                    // Chains run over segments of 8 tables (128 codes; 8-bit codes are
                    // looked up in two halves, see the kernel).
                    let v = if t + 1 == nt || (t + 1) % SEGMENT == 0 {
                        byte(16 * t + l)
                    } else {
                        byte(16 * t + l) ^ byte(16 * (t + 1) + l)
                    };
                    tables[plane * 16 + t][l] = v;
                    tables[plane * 16 + t][l + 16] = v;
                }
            }
        }
        I16Lut {
            bits,
            scale,
            cbq,
            tables,
        }
    }

    /// `cs`.
    pub fn scale(&self) -> f32 {
        self.scale
    }
}

/// Activations of one token rounded for the integer mat-vec (see the module
/// documentation), for one weight group size and lane order.
pub struct PreparedX {
    group: usize,
    /// Lane order of the 4-bit kernel (see [`prepare_x`]).
    nibble: bool,
    cols: usize,
    /// `(cols / 32) * 32` values, chunk by chunk in the kernel's lane order.
    xq: Vec<i16>,
    /// `xs_G` per group.
    xs: Vec<f32>,
}

impl PreparedX {
    /// Whether this layout serves a weight with `group` and `bits`.
    pub fn fits(&self, group: usize, bits: usize, cols: usize) -> bool {
        self.group == group && self.nibble == (bits == 4) && self.cols == cols
    }
}

/// Whether the integer kernel handles a weight of this shape (group a multiple of the
/// 32-column step; any width 2..=8).
pub fn supports(bits: usize, group: usize) -> bool {
    (2..=8).contains(&bits) && group.is_multiple_of(CHUNK)
}

/// Rounds `x` (`cols`) for weights of group `group` and width `bits`.
///
/// Lane order per 32-column chunk: natural, except for 4 bits, whose kernel unpacks a
/// 16-byte window as low nibbles (even columns) in the lower 128-bit lane and high
/// nibbles (odd columns) in the upper, so that after the byte-to-word unpacks the two
/// 16-value halves are `[0, 2, .., 14, 1, 3, .., 15]` and `[16, 18, .., 30, 17, .., 31]`.
pub fn prepare_x(x: &[f32], group: usize, bits: usize) -> PreparedX {
    let cols = x.len();
    let nibble = bits == 4;
    let n_groups = cols.div_ceil(group);
    let xs: Vec<f32> = (0..n_groups)
        .map(|g| {
            let m = x[g * group..((g + 1) * group).min(cols)]
                .iter()
                .fold(0.0f32, |m, v| m.max(v.abs()));
            if m > 0.0 && m.is_finite() {
                m / I16_LEVELS
            } else {
                0.0
            }
        })
        .collect();
    let full = cols / CHUNK * CHUNK;
    let mut xq = vec![0i16; full];
    for c0 in (0..full).step_by(CHUNK) {
        let s = xs[c0 / group];
        let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
        for p in 0..CHUNK {
            let j = if nibble {
                let (half, k) = (p / 16, p % 16);
                16 * half + if k < 8 { 2 * k } else { 2 * (k - 8) + 1 }
            } else {
                p
            };
            xq[c0 + p] = round_i16(x[c0 + j] * inv);
        }
    }
    PreparedX {
        group,
        nibble,
        cols,
        xq,
        xs,
    }
}

/// `v` rounded half away from zero to an integer in `[-16383, 16383]`. By truncating
/// conversion: `f32::round` is a libm call on the baseline x86-64 target (~1% of a
/// decode step here, once per activation).
#[inline]
fn round_i16(v: f32) -> i16 {
    let v = v.clamp(-I16_LEVELS, I16_LEVELS);
    (v + 0.5f32.copysign(v)) as i16
}

/// Column `j`'s position within its chunk in `px`'s lane order (inverse of the order
/// documented at [`prepare_x`]).
fn lane_of(nibble: bool, j: usize) -> usize {
    if !nibble {
        return j;
    }
    let (half, k) = (j / 16, j % 16);
    16 * half + if k % 2 == 0 { k / 2 } else { 8 + k / 2 }
}

/// Reference: the integer mat-vec exactly as specified in the module documentation
/// (int32 sums exact, f32 partials summed sequentially).
pub fn dot_rows_i16_scalar(
    q: &QuantRows,
    lut: &I16Lut,
    px: &PreparedX,
    x: &[f32],
    first: usize,
    y: &mut [f32],
) {
    check(q, lut, px, x, first, y);
    let (cols, group) = (q.cols(), q.group());
    let full = cols / CHUNK * CHUNK;
    for (r, out) in y.iter_mut().enumerate() {
        let i = first + r;
        let mut total = 0.0f32;
        for s0 in (0..full).step_by(SPAN.min(group)) {
            let s1 = (s0 + SPAN.min(group)).min(full);
            let g = s0 / group;
            // The exact integer sum (i64: a sequential sum of 64 products can exceed
            // i32; the kernel's lanes hold 8 products each and cannot).
            let mut acc = 0i64;
            for j in s0..s1 {
                let c = usize::from(q.code(i, j));
                let xq = px.xq[j / CHUNK * CHUNK + lane_of(px.nibble, j % CHUNK)];
                acc += i64::from(lut.cbq[c]) * i64::from(xq);
            }
            total += acc as f32 * (q.scale(i, g) * px.xs[g]);
        }
        let tail = (full..cols).fold(0.0f32, |t, j| t + q.element(i, j) * x[j]);
        *out = total * lut.scale + tail;
    }
}

fn check(q: &QuantRows, lut: &I16Lut, px: &PreparedX, x: &[f32], first: usize, y: &[f32]) {
    assert!(
        x.len() >= q.cols()
            && first + y.len() <= q.rows()
            && lut.bits == q.bits()
            && px.fits(q.group(), q.bits(), q.cols())
            && supports(q.bits(), q.group()),
        "dot_rows_i16: inconsistent operands"
    );
}

/// The integer mat-vec over rows `first .. first + y.len()` with `isa` (AVX2 when
/// available, also on AVX-512 machines; else the reference).
pub fn dot_rows_i16(
    isa: Isa,
    q: &QuantRows,
    lut: &I16Lut,
    px: &PreparedX,
    x: &[f32],
    first: usize,
    y: &mut [f32],
) {
    check(q, lut, px, x, first, y);
    match isa {
        // SAFETY: AVX2 + FMA available (guard); `check` verified the operands agree
        // (widths, groups, lengths); `QuantRows::new` checked the code buffer, padding
        // included, which covers every 16-byte window the kernel loads (see there).
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512 if Isa::Avx2.is_available() => unsafe {
            x86::dot_i16_avx2(q, lut, px, x, first, y)
        },
        _ => dot_rows_i16_scalar(q, lut, px, x, first, y),
    }
}

/// 8-bit weights looked up once at load: `(rows, cols)` of `cbq[code]` (row-major,
/// natural order). Why: a 256-entry lookup takes 32 byte shuffles per 32 weights (the
/// XOR chain over 16 tables, two planes), ~0.5 ns per weight on the bench machine,
/// which made the 49152 x 576 tied head alone cost as much as llama.cpp's whole token.
/// Reading 2 bytes per weight instead of 1 costs less than that lookup. Same numbers as
/// the lookup kernel (same `cbq`, same sums), so [`dot_rows_i16_scalar`] is its reference.
pub struct Expanded {
    cols: usize,
    w: Vec<i16>,
}

impl Expanded {
    /// `cbq[code]` for every element of `q` (8-bit codes only).
    pub fn new(q: &QuantRows, lut: &I16Lut) -> Self {
        let (rows, cols) = (q.rows(), q.cols());
        let mut w = Vec::with_capacity(rows * cols);
        for i in 0..rows {
            w.extend((0..cols).map(|j| lut.cbq[usize::from(q.code(i, j))]));
        }
        Expanded { cols, w }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.w.len() * 2
    }
}

/// [`dot_rows_i16`] reading the expanded values `e` instead of codes.
#[allow(clippy::too_many_arguments)]
pub fn dot_rows_expanded(
    isa: Isa,
    q: &QuantRows,
    lut: &I16Lut,
    e: &Expanded,
    px: &PreparedX,
    x: &[f32],
    first: usize,
    y: &mut [f32],
) {
    check(q, lut, px, x, first, y);
    assert!(
        e.cols == q.cols() && e.w.len() == q.rows() * q.cols() && !px.nibble,
        "dot_rows_expanded: inconsistent operands"
    );
    match isa {
        // SAFETY: AVX2 + FMA available (guard); `e.w` holds rows x cols values and `px`
        // (checked) cols / 32 whole chunks, which is all the kernel reads.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512 if Isa::Avx2.is_available() => unsafe {
            x86::dot_expanded_avx2(q, lut, e, px, x, first, y)
        },
        _ => dot_rows_i16_scalar(q, lut, px, x, first, y),
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{I16Lut, PreparedX, CHUNK, SEGMENT, SPAN};
    use crate::kernels::quant::QuantRows;
    use std::arch::x86_64::*;

    /// # Safety
    /// AVX2 + FMA available; operands checked by `super::check`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_i16_avx2(
        q: &QuantRows,
        lut: &I16Lut,
        px: &PreparedX,
        x: &[f32],
        first: usize,
        y: &mut [f32],
    ) {
        match q.bits() {
            2 => dot::<2, 1>(q, lut, px, x, first, y),
            3 => dot::<3, 1>(q, lut, px, x, first, y),
            4 => dot::<4, 1>(q, lut, px, x, first, y),
            5 => dot::<5, 2>(q, lut, px, x, first, y),
            6 => dot::<6, 4>(q, lut, px, x, first, y),
            7 => dot::<7, 8>(q, lut, px, x, first, y),
            _ => dot::<8, 16>(q, lut, px, x, first, y),
        }
    }

    /// Shuffle control and multipliers of the generic unpack for `bits`: word k of
    /// 128-bit lane L holds code `8L + k` of a 16-code window, its two bytes, and
    /// `2^(16 - bits - shift)` moves the code's top bit to bit 15.
    fn unpack_consts(bits: usize) -> ([u8; 32], [u16; 16]) {
        let (mut ctrl, mut mul) = ([0x80u8; 32], [0u16; 16]);
        for lane in 0..2 {
            for k in 0..8 {
                let bit = (8 * lane + k) * bits;
                let (byte, shift) = (bit / 8, bit % 8);
                ctrl[16 * lane + 2 * k] = byte as u8;
                if byte + 1 < 16 {
                    ctrl[16 * lane + 2 * k + 1] = (byte + 1) as u8;
                }
                mul[8 * lane + k] = 1u16 << (16 - bits - shift);
            }
        }
        (ctrl, mul)
    }

    /// # Safety
    /// AVX2 + FMA available; operands checked by `super::dot_rows_expanded`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_expanded_avx2(
        q: &QuantRows,
        lut: &I16Lut,
        e: &super::Expanded,
        px: &PreparedX,
        x: &[f32],
        first: usize,
        y: &mut [f32],
    ) {
        let (cols, group) = (q.cols(), q.group());
        let full = cols / CHUNK * CHUNK;
        let span = SPAN.min(group);
        let xq = px.xq.as_ptr();
        for (r, out) in y.iter_mut().enumerate() {
            let i = first + r;
            let w = e.w.as_ptr().add(i * cols);
            let scales = q.row_scales(i);
            let mut acc = _mm256_setzero_ps();
            let mut s0 = 0;
            while s0 < full {
                let s1 = (s0 + span).min(full);
                let g = s0 / group;
                let mut isum = _mm256_setzero_si256();
                let mut j = s0;
                while j < s1 {
                    let w0 = _mm256_loadu_si256(w.add(j).cast());
                    let w1 = _mm256_loadu_si256(w.add(j + 16).cast());
                    let x0 = _mm256_loadu_si256(xq.add(j).cast());
                    let x1 = _mm256_loadu_si256(xq.add(j + 16).cast());
                    isum = _mm256_add_epi32(
                        isum,
                        _mm256_add_epi32(_mm256_madd_epi16(w0, x0), _mm256_madd_epi16(w1, x1)),
                    );
                    j += CHUNK;
                }
                let f = _mm256_set1_ps(*scales.add(g) * *px.xs.get_unchecked(g));
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), f, acc);
                s0 = s1;
            }
            let mut tail = 0.0f32;
            for (j, xj) in (full..cols).zip(&x[full..cols]) {
                tail += q.element(i, j) * xj;
            }
            *out = hsum(acc) * lut.scale + tail;
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }

    /// `BITS`-bit codes, `NT = max(1, 2^(BITS-4))` shuffle tables per byte plane.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot<const BITS: usize, const NT: usize>(
        q: &QuantRows,
        lut: &I16Lut,
        px: &PreparedX,
        x: &[f32],
        first: usize,
        y: &mut [f32],
    ) {
        let (cols, group) = (q.cols(), q.group());
        let full = cols / CHUNK * CHUNK;
        let span = SPAN.min(group);
        let (ctrl, mul) = unpack_consts(BITS);
        let ctrl = _mm256_loadu_si256(ctrl.as_ptr().cast());
        let mul = _mm256_loadu_si256(mul.as_ptr().cast());
        let nib_shift = _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4);
        let low4 = _mm256_set1_epi8(0x0f);
        let t: [[__m256i; NT]; 2] = std::array::from_fn(|plane| {
            std::array::from_fn(|k| _mm256_loadu_si256(lut.tables[plane * 16 + k].as_ptr().cast()))
        });
        // Offsets that set bit 7 (shuffle -> 0) of codes >= 16 (k + 1).
        let offs: [__m256i; NT] =
            std::array::from_fn(|k| _mm256_set1_epi8((0x80 - 16 * (k as i32 + 1)) as i8));
        let xq = px.xq.as_ptr();
        for (r, out) in y.iter_mut().enumerate() {
            let i = first + r;
            let row = q.row_ptr(i);
            let scales = q.row_scales(i);
            let mut acc = _mm256_setzero_ps();
            let mut s0 = 0;
            while s0 < full {
                let s1 = (s0 + span).min(full);
                let g = s0 / group;
                let mut isum = _mm256_setzero_si256();
                let mut j = s0;
                while j < s1 {
                    // Codes of columns j .. j + 32: bytes [j b / 8, j b / 8 + 4 b).
                    let p = row.add(j * BITS / 8);
                    let idx = if BITS == 4 {
                        let v = _mm256_broadcastsi128_si256(_mm_loadu_si128(p.cast()));
                        _mm256_and_si256(_mm256_srlv_epi32(v, nib_shift), low4)
                    } else {
                        let a = _mm256_broadcastsi128_si256(_mm_loadu_si128(p.cast()));
                        let b =
                            _mm256_broadcastsi128_si256(_mm_loadu_si128(p.add(2 * BITS).cast()));
                        let a = _mm256_mullo_epi16(_mm256_shuffle_epi8(a, ctrl), mul);
                        let b = _mm256_mullo_epi16(_mm256_shuffle_epi8(b, ctrl), mul);
                        let sh = _mm_cvtsi32_si128(16 - BITS as i32);
                        _mm256_packus_epi16(_mm256_srl_epi16(a, sh), _mm256_srl_epi16(b, sh))
                    };
                    // 8 bits: codes 0..127 and 128..255 are two chains over the low 7
                    // bits, selected by bit 7 (which `vpblendvb` reads directly).
                    let base = if BITS == 8 {
                        _mm256_and_si256(idx, _mm256_set1_epi8(0x7f))
                    } else {
                        idx
                    };
                    let seg = NT.min(SEGMENT);
                    let mut lo = _mm256_shuffle_epi8(t[0][seg - 1], base);
                    let mut hi = _mm256_shuffle_epi8(t[1][seg - 1], base);
                    let (mut lo2, mut hi2) = (_mm256_setzero_si256(), _mm256_setzero_si256());
                    if NT > SEGMENT {
                        lo2 = _mm256_shuffle_epi8(t[0][NT - 1], base);
                        hi2 = _mm256_shuffle_epi8(t[1][NT - 1], base);
                    }
                    for k in 0..seg - 1 {
                        let ik = _mm256_adds_epu8(base, offs[k]);
                        lo = _mm256_xor_si256(lo, _mm256_shuffle_epi8(t[0][k], ik));
                        hi = _mm256_xor_si256(hi, _mm256_shuffle_epi8(t[1][k], ik));
                        if NT > SEGMENT {
                            let (a, b) = (t[0][SEGMENT + k], t[1][SEGMENT + k]);
                            lo2 = _mm256_xor_si256(lo2, _mm256_shuffle_epi8(a, ik));
                            hi2 = _mm256_xor_si256(hi2, _mm256_shuffle_epi8(b, ik));
                        }
                    }
                    if NT > SEGMENT {
                        lo = _mm256_blendv_epi8(lo, lo2, idx);
                        hi = _mm256_blendv_epi8(hi, hi2, idx);
                    }
                    let w0 = _mm256_unpacklo_epi8(lo, hi);
                    let w1 = _mm256_unpackhi_epi8(lo, hi);
                    let x0 = _mm256_loadu_si256(xq.add(j).cast());
                    let x1 = _mm256_loadu_si256(xq.add(j + 16).cast());
                    isum = _mm256_add_epi32(
                        isum,
                        _mm256_add_epi32(_mm256_madd_epi16(w0, x0), _mm256_madd_epi16(w1, x1)),
                    );
                    j += CHUNK;
                }
                let f = _mm256_set1_ps(*scales.add(g) * *px.xs.get_unchecked(g));
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), f, acc);
                s0 = s1;
            }
            let mut tail = 0.0f32;
            for (j, xj) in (full..cols).zip(&x[full..cols]) {
                tail += q.element(i, j) * xj;
            }
            *out = hsum(acc) * lut.scale + tail;
        }
    }
}
