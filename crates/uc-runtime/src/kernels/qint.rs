//! The decode mat-vec on integer lanes: `y[r] = sum_j w(first + r, j) x_j` with the
//! codebook and the activations rounded to 15-bit integers, so that byte shuffles look
//! the weights up and `vpmaddwd` multiplies 16 (AVX2) or 32 (AVX-512) pairs per
//! instruction. Two kernels compute the same integer sums: AVX2 (`vpshufb` XOR chains,
//! described below) and AVX-512 VBMI (`vpermb` over 64-entry byte planes, see
//! `x86::dot_vbmi`), each reading activations in its own lane order ([`Order`]).
//!
//! Why on AVX-512: the f32 kernel's permutes handle up to 6-bit codes (7 and 8 bits
//! gather), one 16-lane FMA per 16 weights; the byte-plane kernel handles 64 codes with
//! one unpack and two (up to 6 bits) byte permutes, and decode from the default pack
//! measured 1.4x faster at one thread (research log, 2026-12-04).
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
/// Bytes ahead of the current code chunk the AVX-512 kernel prefetches.
const PREFETCH: usize = 4096;

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
    /// `[plane][c]`: byte `plane` of `cbq[c]` (the AVX-512 VBMI kernel's tables).
    planes: [[u8; 256]; 2],
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
        let mut planes = [[0u8; 256]; 2];
        for (c, v) in cbq.iter().enumerate() {
            [planes[0][c], planes[1][c]] = v.to_le_bytes();
        }
        I16Lut {
            bits,
            scale,
            cbq,
            tables,
            planes,
        }
    }

    /// `cs`.
    pub fn scale(&self) -> f32 {
        self.scale
    }
}

/// The lane order of [`PreparedX`]: which column of a chunk each rounded activation
/// sits in, as the kernel that reads it unpacks codes (see [`prepare_x`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Order {
    /// AVX2, widths other than 4: 32-column chunks in natural order.
    Natural,
    /// AVX2, 4 bits: 32-column chunks, even columns then odd per 16.
    Nibble,
    /// AVX-512 VBMI (any width): 64-column chunks as the byte-plane unpack leaves them.
    Planes64,
}

impl Order {
    /// Columns per chunk.
    fn chunk(self) -> usize {
        match self {
            Order::Planes64 => 64,
            _ => CHUNK,
        }
    }

    /// [`Self::lane_of`] of every column of a chunk (the first [`Self::chunk`] entries).
    fn lanes(self) -> [u8; 64] {
        std::array::from_fn(|j| self.lane_of(j % self.chunk()) as u8)
    }

    /// Column `j`'s position within its chunk (inverse of the orders documented at
    /// [`prepare_x`]).
    fn lane_of(self, j: usize) -> usize {
        match self {
            Order::Natural => j,
            Order::Nibble => {
                let (half, k) = (j / 16, j % 16);
                16 * half + if k % 2 == 0 { k / 2 } else { 8 + k / 2 }
            }
            Order::Planes64 => {
                let (l, k) = (j / 16, j % 16);
                if k < 8 {
                    8 * l + k
                } else {
                    32 + 8 * l + k - 8
                }
            }
        }
    }
}

/// The lane order (hence kernel) the integer mat-vec uses for a weight of width `bits`
/// and `cols` columns with `isa`: the AVX-512 VBMI kernel when the CPU has it and the
/// columns are whole 64-column chunks, else the AVX2 kernel's.
pub fn order(isa: Isa, bits: usize, cols: usize) -> Order {
    if isa == Isa::Avx512 && vbmi_available() && cols.is_multiple_of(64) {
        Order::Planes64
    } else if bits == 4 {
        Order::Nibble
    } else {
        Order::Natural
    }
}

/// Whether this CPU has the AVX-512 VBMI byte permutes ([`Order::Planes64`]'s kernel).
pub fn vbmi_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        Isa::Avx512.is_available() && is_x86_feature_detected!("avx512vbmi")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Activations of one token rounded for the integer mat-vec (see the module
/// documentation), for one weight group size and lane order.
pub struct PreparedX {
    group: usize,
    order: Order,
    cols: usize,
    /// Whole chunks' values (`cols` rounded down to the chunk), chunk by chunk in the
    /// kernel's lane order.
    xq: Vec<i16>,
    /// `xs_G` per group.
    xs: Vec<f32>,
    /// The largest `|xq|` the rounding allowed (the `levels` of [`prepare_x_levels`]).
    levels: f32,
}

impl PreparedX {
    /// Whether this layout serves a weight with `group`, `bits` and `cols`.
    pub fn fits(&self, group: usize, bits: usize, cols: usize) -> bool {
        let order_ok = match self.order {
            Order::Natural => bits != 4,
            Order::Nibble => bits == 4,
            Order::Planes64 => cols.is_multiple_of(64),
        };
        self.group == group && self.cols == cols && order_ok
    }

    /// The rounded activations, chunk by chunk in the kernel's lane order.
    pub fn xq(&self) -> &[i16] {
        &self.xq
    }

    /// `xs_G` per group.
    pub fn xs(&self) -> &[f32] {
        &self.xs
    }

    /// Activations already rounded (`xq` in `order`, whole chunks only; `xs` per group),
    /// e.g. one token of the prefill GEMM's packed form, for the reference.
    pub(super) fn from_parts(
        group: usize,
        order: Order,
        cols: usize,
        xq: Vec<i16>,
        xs: Vec<f32>,
        levels: f32,
    ) -> Self {
        PreparedX {
            group,
            order,
            cols,
            xq,
            xs,
            levels,
        }
    }

    /// Columns summed by the integer kernel (the rest, if any, in f32).
    fn full(&self) -> usize {
        self.cols / self.order.chunk() * self.order.chunk()
    }
}

/// Whether the integer kernel handles a weight of this shape (group a multiple of the
/// 32-column step; any width 2..=8).
pub fn supports(bits: usize, group: usize) -> bool {
    (2..=8).contains(&bits) && group.is_multiple_of(CHUNK)
}

/// Rounds `x` (`cols`) for weights of group `group` in lane order `order` (from
/// [`order`]).
///
/// - [`Order::Natural`]: 32-column chunks in natural order.
/// - [`Order::Nibble`] (AVX2, 4 bits): the kernel unpacks a 16-byte window as low nibbles
///   (even columns) in the lower 128-bit lane and high nibbles (odd columns) in the
///   upper, so that after the byte-to-word unpacks the two 16-value halves are
///   `[0, 2, .., 14, 1, 3, .., 15]` and `[16, 18, .., 30, 17, .., 31]`.
/// - [`Order::Planes64`] (AVX-512 VBMI): 64-column chunks; the kernel looks 64 codes up
///   as two byte planes and interleaves them per 128-bit lane `L`, so its two int16
///   vectors hold columns `16 L + 0..8` and `16 L + 8..16` for `L = 0..4`.
pub fn prepare_x(x: &[f32], group: usize, order: Order) -> PreparedX {
    prepare_x_levels(x, group, order, I16_LEVELS)
}

/// [`prepare_x`] rounding to `levels` (at most [`I16_LEVELS`]) instead: `xs_G =
/// max_{j in G} |x_j| / levels`. The prefill GEMM ([`super::qgemm`]) rounds to fewer
/// levels so that a whole group's products fit one int32 lane.
pub fn prepare_x_levels(x: &[f32], group: usize, order: Order, levels: f32) -> PreparedX {
    assert!(
        (1.0..=I16_LEVELS).contains(&levels),
        "prepare_x_levels: levels out of range"
    );
    let cols = x.len();
    let n_groups = cols.div_ceil(group);
    let xs: Vec<f32> = (0..n_groups)
        .map(|g| {
            let m = x[g * group..((g + 1) * group).min(cols)]
                .iter()
                .fold(0.0f32, |m, v| m.max(v.abs()));
            if m > 0.0 && m.is_finite() {
                m / levels
            } else {
                0.0
            }
        })
        .collect();
    // One reciprocal per group, then per chunk: round each span of one group (a loop
    // the compiler vectorises), then place the chunk's values in the kernel's lane order.
    // Element for element the arithmetic of `round_i16(x_j * (1 / xs_G))`. This runs on
    // one thread before every decode mat-vec, while the other threads wait; element by
    // element (a division and a lane `match` each) it showed in decode profiles.
    let inv: Vec<f32> = xs
        .iter()
        .map(|&s| if s > 0.0 { 1.0 / s } else { 0.0 })
        .collect();
    let chunk = order.chunk();
    let full = cols / chunk * chunk;
    let lanes = order.lanes();
    let mut xq = vec![0i16; full];
    let mut tmp = [0i16; 64];
    for (c, dst) in xq.chunks_exact_mut(chunk).enumerate() {
        let base = c * chunk;
        let mut k = 0;
        while k < chunk {
            let g = (base + k) / group;
            let end = ((g + 1) * group - base).min(chunk);
            let s = inv[g];
            for (t, &v) in tmp[k..end].iter_mut().zip(&x[base + k..base + end]) {
                *t = round_i16(v * s, levels);
            }
            k = end;
        }
        for (&t, &lane) in tmp[..chunk].iter().zip(&lanes[..chunk]) {
            dst[usize::from(lane)] = t;
        }
    }
    PreparedX::from_parts(group, order, cols, xq, xs, levels)
}

/// `v` rounded half away from zero to an integer in `[-levels, levels]`. By truncating
/// conversion: `f32::round` is a libm call on the baseline x86-64 target (~1% of a
/// decode step here, once per activation).
#[inline]
pub(super) fn round_i16(v: f32, levels: f32) -> i16 {
    let v = v.clamp(-levels, levels);
    (v + 0.5f32.copysign(v)) as i16
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
    let (full, chunk) = (px.full(), px.order.chunk());
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
                let xq = px.xq[j / chunk * chunk + px.order.lane_of(j % chunk)];
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

/// The integer mat-vec over rows `first .. first + y.len()` with the kernel of `px`'s
/// lane order when `isa` and the CPU allow it (AVX-512 VBMI for [`Order::Planes64`],
/// else AVX2), else the reference.
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
    match (isa, px.order) {
        // SAFETY: AVX-512 F+BW+VBMI available (guard); `check` verified the operands
        // agree, and `fits` that the columns are whole 64-column chunks; the kernel's
        // masked loads read only each chunk's own `8 b` code bytes.
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx512, Order::Planes64) if vbmi_available() => unsafe {
            x86::dot_i16_vbmi(q, lut, px, first, y)
        },
        // SAFETY: AVX2 + FMA available (guard); `check` verified the operands agree
        // (widths, groups, lengths); `QuantRows::new` checked the code buffer, padding
        // included, which covers every 16-byte window the kernel loads (see there).
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2 | Isa::Avx512, Order::Natural | Order::Nibble) if Isa::Avx2.is_available() => unsafe {
            x86::dot_i16_avx2(q, lut, px, x, first, y)
        },
        _ => dot_rows_i16_scalar(q, lut, px, x, first, y),
    }
}

/// Reference: `cbq[code]` of rows `first ..` (`out.len() / cols` of them) in
/// [`Order::Planes64`] order, 64-column chunk by chunk: the prefill GEMM's weight tile
/// ([`super::qgemm`]). Columns must be whole 64-column chunks.
pub fn lookup_rows_scalar(q: &QuantRows, lut: &I16Lut, first: usize, out: &mut [i16]) {
    check_lookup(q, lut, first, out);
    let cols = q.cols();
    for (r, dst) in out.chunks_exact_mut(cols).enumerate() {
        for j in 0..cols {
            let c = usize::from(q.code(first + r, j));
            dst[j / 64 * 64 + Order::Planes64.lane_of(j % 64)] = lut.cbq[c];
        }
    }
}

/// [`lookup_rows_scalar`] with the byte-permute lookup on AVX-512 VBMI (same values).
pub fn lookup_rows(isa: Isa, q: &QuantRows, lut: &I16Lut, first: usize, out: &mut [i16]) {
    check_lookup(q, lut, first, out);
    match isa {
        // SAFETY: AVX-512 F+BW+VBMI available (guard); `check_lookup` verified whole
        // 64-column chunks, the rows in range and the width; each masked load reads only
        // a chunk's own `8 b` code bytes.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if vbmi_available() => unsafe { x86::lookup_rows_vbmi(q, lut, first, out) },
        _ => lookup_rows_scalar(q, lut, first, out),
    }
}

fn check_lookup(q: &QuantRows, lut: &I16Lut, first: usize, out: &[i16]) {
    let cols = q.cols();
    assert!(
        cols.is_multiple_of(64)
            && out.len().is_multiple_of(cols.max(1))
            && first + out.len() / cols.max(1) <= q.rows()
            && lut.bits == q.bits(),
        "lookup_rows: inconsistent operands"
    );
}

/// The operands of a several-token call: one PreparedX, x and y per token, at most
/// `max` tokens, each checked as for [`dot_rows_i16`], all in one lane order and with
/// as many rows.
fn check_tokens(
    q: &QuantRows,
    lut: &I16Lut,
    pxs: &[&PreparedX],
    xs: &[&[f32]],
    first: usize,
    ys: &[&mut [f32]],
    max: usize,
) {
    assert!(
        pxs.len() == xs.len() && xs.len() == ys.len() && ys.len() <= max,
        "dot_rows_i16: one PreparedX, x and y per token, at most {max} tokens"
    );
    for ((px, x), y) in pxs.iter().zip(xs).zip(ys.iter()) {
        check(q, lut, px, x, first, y);
        assert!(
            px.order == pxs[0].order && y.len() == ys[0].len(),
            "dot_rows_i16: tokens differ in lane order or rows"
        );
    }
}

/// Tokens one call of [`dot_rows_i16_multi`] takes (its accumulators stay in registers).
pub const MULTI: usize = 8;

/// [`dot_rows_i16`] for up to [`MULTI`] tokens at once: `ys[t]` gets token `t`'s rows
/// (`pxs[t]`, `xs[t]`), bit for bit what [`dot_rows_i16`] gives that token alone. On
/// AVX-512 VBMI each 64-code chunk is looked up once for all tokens (the lookup is half
/// the kernel's work, and a batched decode step pays it once instead of per token);
/// elsewhere the tokens go through [`dot_rows_i16`] one by one.
pub fn dot_rows_i16_multi(
    isa: Isa,
    q: &QuantRows,
    lut: &I16Lut,
    pxs: &[&PreparedX],
    xs: &[&[f32]],
    first: usize,
    ys: &mut [&mut [f32]],
) {
    check_tokens(q, lut, pxs, xs, first, ys, MULTI);
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 && pxs.len() > 1 && pxs[0].order == Order::Planes64 && vbmi_available() {
        // SAFETY: AVX-512 F+BW+VBMI available (guard); every token's operands checked
        // as for `dot_rows_i16`, all in the same lane order and with as many rows.
        unsafe { x86::dot_i16_vbmi_multi(q, lut, pxs, first, ys) };
        return;
    }
    for ((px, x), y) in pxs.iter().zip(xs).zip(ys.iter_mut()) {
        dot_rows_i16(isa, q, lut, px, x, first, y);
    }
}

// The prefill GEMM's activation rounding keeps a 64-column span's sum of products
// within an int32, which `dot_rows_i16_spec` relies on.
const _: () = assert!(64.0 * I16_LEVELS * super::qgemm::X_LEVELS < 2_147_483_648.0);

/// [`dot_rows_i16_scalar`]'s arithmetic exactly, for up to [`FUSED_MAX_SPEC`] tokens
/// sharing each chunk's lookup: the bits the prefill GEMM ([`super::qgemm`]) gives each
/// token, at the cost of the decode kernels for a few tokens (the GEMM computes 16
/// token lanes whatever the count). Each span's integer sum is reduced exactly across
/// lanes (int32: the activations must be rounded to at most
/// [`super::qgemm::X_LEVELS`], as the GEMM rounds them), then scaled and added in f32 in the
/// reference's order, for 16 rows at a time.
///
/// On AVX-512 VBMI with [`Order::Planes64`], groups of whole 64-column chunks and no
/// column tail; everything else (and rows past a multiple of 16) runs the reference.
pub fn dot_rows_i16_spec(
    isa: Isa,
    q: &QuantRows,
    lut: &I16Lut,
    pxs: &[&PreparedX],
    xs: &[&[f32]],
    first: usize,
    ys: &mut [&mut [f32]],
) {
    check_tokens(q, lut, pxs, xs, first, ys, FUSED_MAX_SPEC);
    let rows = ys.first().map_or(0, |y| y.len());
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    {
        let fits = |px: &&PreparedX| {
            px.order == Order::Planes64
                && px.full() == q.cols()
                && px.levels <= super::qgemm::X_LEVELS
        };
        if isa == Isa::Avx512
            && vbmi_available()
            && q.group().is_multiple_of(64)
            && !pxs.is_empty()
            && pxs.iter().all(fits)
        {
            done = rows / 16 * 16;
            // SAFETY: AVX-512 F+BW+VBMI available (guard); every token's operands checked
            // as for `dot_rows_i16`, in Planes64 order with whole 64-column chunks and
            // activations within qgemm::X_LEVELS; the kernel writes rows 0..done of each y.
            unsafe { x86::dot_i16_spec_vbmi(q, lut, pxs, first, done, ys) };
        }
    }
    for ((px, x), y) in pxs.iter().zip(xs).zip(ys.iter_mut()) {
        dot_rows_i16_scalar(q, lut, px, x, first + done, &mut y[done..]);
    }
}

/// Most tokens per [`dot_rows_i16_spec`] call.
pub const FUSED_MAX_SPEC: usize = 4;

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
        e.cols == q.cols() && e.w.len() == q.rows() * q.cols() && px.order == Order::Natural,
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
    use super::{I16Lut, PreparedX, CHUNK, PREFETCH, SEGMENT, SPAN};

    /// `$go!(B)` with `B` the code width `$bits` as a literal (2..=7, else 8), so that a
    /// kernel generic over the width is picked at run time.
    macro_rules! by_bits {
        ($bits:expr, $go:ident) => {
            match $bits {
                2 => $go!(2),
                3 => $go!(3),
                4 => $go!(4),
                5 => $go!(5),
                6 => $go!(6),
                7 => $go!(7),
                _ => $go!(8),
            }
        };
    }
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

    /// # Safety
    /// AVX-512 F+BW+VBMI available; operands checked by `super::check`, columns a
    /// multiple of 64 (`px` in [`super::Order::Planes64`]).
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
    pub(super) unsafe fn dot_i16_vbmi(
        q: &QuantRows,
        lut: &I16Lut,
        px: &PreparedX,
        first: usize,
        y: &mut [f32],
    ) {
        let ys = &mut [y];
        macro_rules! one {
            ($bits:literal) => {
                dot_vbmi::<$bits, 1>(q, lut, &[px], first, ys)
            };
        }
        by_bits!(q.bits(), one)
    }

    /// # Safety
    /// As [`dot_i16_vbmi`], for every token; 2 to `MULTI` tokens, same rows.
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
    pub(super) unsafe fn dot_i16_vbmi_multi(
        q: &QuantRows,
        lut: &I16Lut,
        pxs: &[&PreparedX],
        first: usize,
        ys: &mut [&mut [f32]],
    ) {
        macro_rules! by_tokens {
            ($bits:literal) => {
                match pxs.len() {
                    2 => dot_vbmi::<$bits, 2>(q, lut, pxs, first, ys),
                    3 => dot_vbmi::<$bits, 3>(q, lut, pxs, first, ys),
                    4 => dot_vbmi::<$bits, 4>(q, lut, pxs, first, ys),
                    5 => dot_vbmi::<$bits, 5>(q, lut, pxs, first, ys),
                    6 => dot_vbmi::<$bits, 6>(q, lut, pxs, first, ys),
                    7 => dot_vbmi::<$bits, 7>(q, lut, pxs, first, ys),
                    _ => dot_vbmi::<$bits, 8>(q, lut, pxs, first, ys),
                }
            };
        }
        by_bits!(q.bits(), by_tokens)
    }

    /// # Safety
    /// As [`dot_i16_vbmi_multi`] for 1 to `FUSED_MAX_SPEC` tokens; besides, groups of
    /// whole 64-column chunks, no column tail, activations within `qgemm::X_LEVELS`, and
    /// `rows` a multiple of 16 within every `ys[t]`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
    pub(super) unsafe fn dot_i16_spec_vbmi(
        q: &QuantRows,
        lut: &I16Lut,
        pxs: &[&PreparedX],
        first: usize,
        rows: usize,
        ys: &mut [&mut [f32]],
    ) {
        macro_rules! by_tokens {
            ($bits:literal) => {
                match pxs.len() {
                    1 => spec_vbmi::<$bits, 1>(q, lut, pxs, first, rows, ys),
                    2 => spec_vbmi::<$bits, 2>(q, lut, pxs, first, rows, ys),
                    3 => spec_vbmi::<$bits, 3>(q, lut, pxs, first, rows, ys),
                    _ => spec_vbmi::<$bits, 4>(q, lut, pxs, first, rows, ys),
                }
            };
        }
        by_bits!(q.bits(), by_tokens)
    }

    /// [`super::dot_rows_i16_spec`] for `M` tokens, 16 rows at a time: each row's 64
    /// codes of a chunk looked up once (kept for the tokens), then per token the 16 rows'
    /// span sums -- `vpmaddwd` lanes, reduced across lanes by a shuffle tree (int32 adds
    /// are exact in any order) into one vector, lane `k` = row `k` -- converted to f32,
    /// multiplied by `scale(row, G) * xs_G` and added to the row totals, span after
    /// span: the reference's operations on every row.
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
    unsafe fn spec_vbmi<const BITS: usize, const M: usize>(
        q: &QuantRows,
        lut: &I16Lut,
        pxs: &[&PreparedX],
        first: usize,
        rows: usize,
        ys: &mut [&mut [f32]],
    ) {
        let (cols, group) = (q.cols(), q.group());
        let n_groups = cols.div_ceil(group);
        let look = Lookup64::<BITS>::new(lut);
        // Lane 4k + m of the tree's result holds row 4m + k.
        let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
        // Row k's scale of a group is k * n_groups floats after row 0's.
        let stride = _mm512_mullo_epi32(
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
            _mm512_set1_epi32(n_groups as i32),
        );
        let cs = _mm512_set1_ps(lut.scale);
        let row_bytes = cols / 64 * 8 * BITS;
        let mut w = [[_mm512_setzero_si512(); 2]; 16];
        for r0 in (0..rows).step_by(16) {
            let mut total = [_mm512_setzero_ps(); M];
            for c in 0..cols / 64 {
                let block = q.row_ptr(first + r0).add(c * 8 * BITS);
                for (k, wk) in w.iter_mut().enumerate() {
                    let at = block.add(k * row_bytes);
                    // Sixteen rows are read side by side, which the hardware prefetcher
                    // does not follow: fetch the next block's chunk (a hint, which never
                    // faults; past the matrix it is wasted).
                    _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(16 * row_bytes).cast());
                    let (w0, w1) = look.get(at);
                    *wk = [w0, w1];
                }
                let g = 64 * c / group;
                let sv = _mm512_i32gather_ps::<4>(stride, q.row_scales(first + r0).add(g));
                for t in 0..M {
                    let xq = pxs[t].xq.as_ptr().add(64 * c);
                    let x0 = _mm512_loadu_si512(xq.cast());
                    let x1 = _mm512_loadu_si512(xq.add(32).cast());
                    let sums = span_sums(&w, x0, x1);
                    let rowsum = _mm512_permutexvar_epi32(order, sums);
                    let f = _mm512_mul_ps(sv, _mm512_set1_ps(*pxs[t].xs.as_ptr().add(g)));
                    total[t] =
                        _mm512_add_ps(total[t], _mm512_mul_ps(_mm512_cvtepi32_ps(rowsum), f));
                }
            }
            for t in 0..M {
                // `total * cs + tail`, the tail an empty sum (+0.0), as the reference.
                let y = _mm512_add_ps(_mm512_mul_ps(total[t], cs), _mm512_setzero_ps());
                _mm512_storeu_ps(ys[t].as_mut_ptr().add(r0), y);
            }
        }
    }

    /// Row `k`'s span sum `sum_lanes (w[k][0] . x0 + w[k][1] . x1)` for 16 rows in one
    /// vector, row `4m + k` in lane `4k + m`: per row its `vpmaddwd` lanes, then a halving
    /// shuffle tree over the 16 rows (int32 adds: exact in any order).
    #[target_feature(enable = "avx512f,avx512bw")]
    #[inline]
    unsafe fn span_sums(w: &[[__m512i; 2]; 16], x0: __m512i, x1: __m512i) -> __m512i {
        let zero = _mm512_setzero_si512();
        let mut l8 = [zero; 8];
        for (m, l) in l8.iter_mut().enumerate() {
            let (wa, wb) = (&w[2 * m], &w[2 * m + 1]);
            let a = _mm512_add_epi32(_mm512_madd_epi16(wa[0], x0), _mm512_madd_epi16(wa[1], x1));
            let b = _mm512_add_epi32(_mm512_madd_epi16(wb[0], x0), _mm512_madd_epi16(wb[1], x1));
            *l = _mm512_add_epi32(
                _mm512_shuffle_i32x4::<0x44>(a, b),
                _mm512_shuffle_i32x4::<0xEE>(a, b),
            );
        }
        let mut l4 = [zero; 4];
        for (m, l) in l4.iter_mut().enumerate() {
            let (a, b) = (l8[2 * m], l8[2 * m + 1]);
            *l = _mm512_add_epi32(
                _mm512_shuffle_i32x4::<0x88>(a, b),
                _mm512_shuffle_i32x4::<0xDD>(a, b),
            );
        }
        // Within 128-bit lanes: the float shuffle moves the int32 bits unchanged.
        let mut l2 = [zero; 2];
        for (m, l) in l2.iter_mut().enumerate() {
            let (a, b) = (
                _mm512_castsi512_ps(l4[2 * m]),
                _mm512_castsi512_ps(l4[2 * m + 1]),
            );
            *l = _mm512_add_epi32(
                _mm512_castps_si512(_mm512_shuffle_ps::<0x44>(a, b)),
                _mm512_castps_si512(_mm512_shuffle_ps::<0xEE>(a, b)),
            );
        }
        let (a, b) = (_mm512_castsi512_ps(l2[0]), _mm512_castsi512_ps(l2[1]));
        _mm512_add_epi32(
            _mm512_castps_si512(_mm512_shuffle_ps::<0x88>(a, b)),
            _mm512_castps_si512(_mm512_shuffle_ps::<0xDD>(a, b)),
        )
    }

    /// The byte-plane lookup of 64 `BITS`-bit codes (see [`dot_vbmi`]): the codebook's
    /// byte tables and the unpack constants, in registers.
    pub(super) struct Lookup64<const BITS: usize> {
        t: [[__m512i; 4]; 2],
        spread: __m512i,
        shift: __m512i,
        load: __mmask64,
    }

    impl<const BITS: usize> Lookup64<BITS> {
        #[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
        pub(super) unsafe fn new(lut: &I16Lut) -> Self {
            let t: [[__m512i; 4]; 2] = std::array::from_fn(|p| {
                std::array::from_fn(|r| _mm512_loadu_si512(lut.planes[p][64 * r..].as_ptr().cast()))
            });
            let (mut spread, mut shift) = ([0u8; 64], [0u8; 64]);
            for k in 0..8 {
                for m in 0..8 {
                    spread[8 * k + m] = (k * BITS + m.min(BITS - 1)) as u8;
                    shift[8 * k + m] = (m * BITS) as u8;
                }
            }
            Lookup64 {
                t,
                spread: _mm512_loadu_si512(spread.as_ptr().cast()),
                shift: _mm512_loadu_si512(shift.as_ptr().cast()),
                load: if BITS == 8 {
                    !0
                } else {
                    (1u64 << (8 * BITS)) - 1
                },
            }
        }

        /// `cbq` of the 64 codes whose `8 BITS` bytes start at `at`, as two int16
        /// vectors in [`super::Order::Planes64`] order (columns `16 L + 0..8`, then
        /// `16 L + 8..16`, for 128-bit lanes `L = 0..4`).
        ///
        /// # Safety
        /// `at .. at + 8 BITS` readable (a masked load: nothing past them is read).
        #[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
        #[inline]
        pub(super) unsafe fn get(&self, at: *const u8) -> (__m512i, __m512i) {
            let raw = _mm512_maskz_loadu_epi8(self.load, at.cast());
            let idx = if BITS == 8 {
                raw
            } else {
                _mm512_multishift_epi64_epi8(self.shift, _mm512_permutexvar_epi8(self.spread, raw))
            };
            let t = &self.t;
            let plane = |p: usize| match BITS {
                0..=6 => _mm512_permutexvar_epi8(idx, t[p][0]),
                7 => _mm512_permutex2var_epi8(t[p][0], idx, t[p][1]),
                _ => _mm512_mask_blend_epi8(
                    _mm512_movepi8_mask(idx),
                    _mm512_permutex2var_epi8(t[p][0], idx, t[p][1]),
                    _mm512_permutex2var_epi8(t[p][2], idx, t[p][3]),
                ),
            };
            let (lo, hi) = (plane(0), plane(1));
            (_mm512_unpacklo_epi8(lo, hi), _mm512_unpackhi_epi8(lo, hi))
        }
    }

    /// `cbq[code]` of rows `first ..` (as many as `out` holds, `cols` each) in
    /// [`super::Order::Planes64`] order: the prefill GEMM's weight tile.
    ///
    /// # Safety
    /// AVX-512 F+BW+VBMI available; columns a multiple of 64; rows in range.
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
    pub(super) unsafe fn lookup_rows_vbmi(
        q: &QuantRows,
        lut: &I16Lut,
        first: usize,
        out: &mut [i16],
    ) {
        macro_rules! go {
            ($bits:literal) => {
                lookup_rows::<$bits>(q, lut, first, out)
            };
        }
        by_bits!(q.bits(), go)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
    unsafe fn lookup_rows<const BITS: usize>(
        q: &QuantRows,
        lut: &I16Lut,
        first: usize,
        out: &mut [i16],
    ) {
        let cols = q.cols();
        let look = Lookup64::<BITS>::new(lut);
        for (r, dst) in out.chunks_exact_mut(cols).enumerate() {
            let row = q.row_ptr(first + r);
            for (c, d) in dst.chunks_exact_mut(64).enumerate() {
                let (w0, w1) = look.get(row.add(c * 8 * BITS));
                _mm512_storeu_si512(d.as_mut_ptr().cast(), w0);
                _mm512_storeu_si512(d.as_mut_ptr().add(32).cast(), w1);
            }
        }
    }

    /// 64 `BITS`-bit codes per step, on byte lanes:
    /// - unpack: the `8 BITS` code bytes (one masked load: nothing past them is read)
    ///   are spread so that qword `k` holds bytes `k BITS .. (k + 1) BITS`, i.e. codes
    ///   `8k .. 8k + 8` (`vpermb`), and `vpmultishiftqb` moves code `8k + m` to byte `m`
    ///   of qword `k` (bits above the code hold its neighbour's: the lookups below read
    ///   only the low 6, 7 or 8 index bits, of tables periodic in 2^BITS);
    /// - lookup: the low and high bytes of `cbq[code]` from two 64/128/256-entry byte
    ///   tables (`vpermb` up to 6 bits, `vpermi2b` for 7, two and a blend on bit 7 for 8);
    /// - the byte unpacks interleave them to int16 per 128-bit lane, in the order
    ///   [`super::Order::Planes64`] prepared `x` in; `vpmaddwd` and int32 adds: 4
    ///   products per lane per chunk (exact, see `I16_LEVELS`).
    ///
    /// Each 64-column chunk is one `SPAN`: its int32 lanes convert to f32 and are scaled
    /// by `scale(row, G) xs_G`. With 32-column groups, lanes 0..8 hold columns 0..32 of
    /// the chunk (128-bit lanes 0, 1) and lanes 8..16 columns 32..64: two factors.
    ///
    /// `M` tokens (`pxs`, `ys`) share each chunk's lookup; every token's arithmetic
    /// after it (products, int32 sums, scale, f32 accumulation, reduction) is the same
    /// sequence of operations as with `M = 1`, so its bits do not depend on `M`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
    unsafe fn dot_vbmi<const BITS: usize, const M: usize>(
        q: &QuantRows,
        lut: &I16Lut,
        pxs: &[&PreparedX],
        first: usize,
        ys: &mut [&mut [f32]],
    ) {
        let (cols, group) = (q.cols(), q.group());
        let chunks = cols / 64;
        let look = Lookup64::<BITS>::new(lut);
        let xq: [*const i16; M] = std::array::from_fn(|t| pxs[t].xq.as_ptr());
        let xs: [*const f32; M] = std::array::from_fn(|t| pxs[t].xs.as_ptr());
        for r in 0..ys[0].len() {
            let i = first + r;
            let row = q.row_ptr(i);
            let scales = q.row_scales(i);
            let mut acc = [_mm512_setzero_ps(); M];
            for c in 0..chunks {
                let at = row.add(c * 8 * BITS);
                // The weights stream from memory once per token; the hardware prefetcher
                // alone left the loads waiting (research log, 2026-12-04).
                _mm_prefetch::<_MM_HINT_T0>(at.add(PREFETCH).cast());
                let (w0, w1) = look.get(at);
                for t in 0..M {
                    let (xq, xs) = (xq[t], xs[t]);
                    let x0 = _mm512_loadu_si512(xq.add(64 * c).cast());
                    let x1 = _mm512_loadu_si512(xq.add(64 * c + 32).cast());
                    let isum =
                        _mm512_add_epi32(_mm512_madd_epi16(w0, x0), _mm512_madd_epi16(w1, x1));
                    let f = if group == 32 {
                        let (g0, g1) = (2 * c, 2 * c + 1);
                        _mm512_mask_blend_ps(
                            0xff00,
                            _mm512_set1_ps(*scales.add(g0) * *xs.add(g0)),
                            _mm512_set1_ps(*scales.add(g1) * *xs.add(g1)),
                        )
                    } else {
                        let g = 64 * c / group;
                        _mm512_set1_ps(*scales.add(g) * *xs.add(g))
                    };
                    acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), f, acc[t]);
                }
            }
            for t in 0..M {
                ys[t][r] = _mm512_reduce_add_ps(acc[t]) * lut.scale;
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// [`prepare_x_levels`] against its definition element by element: `xq` at the
    /// column's lane holds `round_i16(x_j * (1 / xs_G))`, for every order, group and
    /// a width with a tail past the last whole chunk.
    #[test]
    fn prepare_x_is_its_definition() {
        let mut rng = uc_format::SplitMix64(7);
        for order in [Order::Natural, Order::Nibble, Order::Planes64] {
            for group in [32, 64, 128] {
                for cols in [64, 192, 576, 1536 + 40] {
                    let x: Vec<f32> = (0..cols)
                        .map(|j| {
                            // A zero group, and an outlier channel.
                            if (64..96).contains(&j) {
                                0.0
                            } else if j == 7 {
                                300.0
                            } else {
                                rng.sym()
                            }
                        })
                        .collect();
                    for levels in [I16_LEVELS, 127.0] {
                        let px = prepare_x_levels(&x, group, order, levels);
                        let chunk = order.chunk();
                        assert_eq!(px.xq().len(), cols / chunk * chunk);
                        for (j, &v) in x[..px.xq().len()].iter().enumerate() {
                            let s = px.xs()[j / group];
                            let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
                            let at = j / chunk * chunk + order.lane_of(j % chunk);
                            assert_eq!(
                                px.xq()[at],
                                round_i16(v * inv, levels),
                                "{order:?} group {group} cols {cols} column {j}"
                            );
                        }
                    }
                }
            }
        }
    }
}
