//! Fused kernels over the codec's stored form (see `docs/format.md`, section 3):
//! per-tensor codebook of 2^b f32 values, one scale per (row, group of g columns), b-bit
//! codes packed LSB-first per row, rows padded to whole bytes.
//!
//! - [`dot_rows`]: `y[r] = sum_j w(first + r, j) x_j`, reading codes, scales and the
//!   codebook directly. Per group it accumulates `codebook[code] * x` and multiplies by
//!   the group's scale once, so its rounding differs from dotting the reconstructed row;
//!   it agrees with the reference [`dot_rows_scalar`] within [`MATVEC_REL_TOL`].
//! - [`dequant_row`]: the exact reconstruction `w = f32(scale) * codebook[code]` of one
//!   row (overlay excluded), **bit-identical** across ISAs and to uc-codec's reconstructor.
//!
//! Unpacking (both SIMD variants): `L` consecutive codes starting at a column that is a
//! multiple of `L` occupy `L * b / 8` whole bytes starting at byte `j * b / 8` of the row.
//! A byte shuffle moves bytes `(k b / 8, k b / 8 + 1)` into 32-bit lane `k`, a per-lane
//! shift by `k b mod 8` and a mask finish it. Groups are multiples of 16 columns, so a
//! chunk never straddles a scale group; the row's last partial chunk is masked.

use super::Isa;
use uc_codec::code_at;

/// Bytes of zero padding after the last code row, so SIMD kernels may load a 16-byte
/// window at any chunk start without reading past the buffer.
pub const CODE_PAD: usize = 16;

/// Tolerance of the fused mat-vec against [`dot_rows_scalar`], relative to
/// `sum_j |w_ij x_j|`: the sum is regrouped (per scale group, per lane) and the scale
/// multiplies a partial sum instead of each weight.
pub const MATVEC_REL_TOL: f32 = 2e-5;

/// A borrowed, checked view of a quantized matrix's stored buffers (overlay excluded).
#[derive(Clone, Copy)]
pub struct QuantRows<'a> {
    bits: usize,
    group: usize,
    cols: usize,
    rows: usize,
    row_bytes: usize,
    n_groups: usize,
    /// Codebook repeated with period 2^bits over 256 entries (see [`periodic_codebook`]).
    codebook: &'a [f32; 256],
    /// `(rows, n_groups)` scales as f32.
    scales: &'a [f32],
    /// `(rows, row_bytes)` codes followed by [`CODE_PAD`] zero bytes.
    codes: &'a [u8],
}

impl<'a> QuantRows<'a> {
    /// Checks every length the kernels index by and that `codebook` is periodic with
    /// period 2^bits; `None` if anything is inconsistent.
    pub fn new(
        bits: usize,
        group: usize,
        cols: usize,
        codebook: &'a [f32; 256],
        scales: &'a [f32],
        codes: &'a [u8],
    ) -> Option<Self> {
        if !(2..=8).contains(&bits) {
            return None;
        }
        let period = 1usize << bits;
        if codebook
            .iter()
            .enumerate()
            .any(|(i, v)| v.to_bits() != codebook[i % period].to_bits())
        {
            return None;
        }
        Self::with_periodic_codebook(bits, group, cols, codebook, scales, codes)
    }

    /// [`Self::new`] without the codebook check, for a codebook made by
    /// [`periodic_codebook`] (what `PackedLinear` holds): the check reads 256 entries and
    /// the decode path builds a view per 64-row task, ~3800 times a token (~1% of it).
    /// Every length is still checked; a non-periodic codebook would give wrong numbers
    /// for codes whose garbage high bits the kernels do not mask, never unsafe reads
    /// (lookups index a 256-entry array with at most 8 bits).
    pub fn with_periodic_codebook(
        bits: usize,
        group: usize,
        cols: usize,
        codebook: &'a [f32; 256],
        scales: &'a [f32],
        codes: &'a [u8],
    ) -> Option<Self> {
        if !(2..=8).contains(&bits) || group == 0 || !group.is_multiple_of(16) || cols == 0 {
            return None;
        }
        let n_groups = cols.div_ceil(group);
        let row_bytes = (cols * bits).div_ceil(8);
        if !scales.len().is_multiple_of(n_groups) {
            return None;
        }
        let rows = scales.len() / n_groups;
        if codes.len() != rows.checked_mul(row_bytes)?.checked_add(CODE_PAD)? {
            return None;
        }
        Some(QuantRows {
            bits,
            group,
            cols,
            rows,
            row_bytes,
            n_groups,
            codebook,
            scales,
            codes,
        })
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bits per code.
    pub fn bits(&self) -> usize {
        self.bits
    }

    /// Columns per scale group.
    pub fn group(&self) -> usize {
        self.group
    }

    /// Code of element `(i, j)`.
    #[inline]
    pub fn code(&self, i: usize, j: usize) -> u8 {
        code_at(
            &self.codes[i * self.row_bytes..(i + 1) * self.row_bytes],
            j,
            self.bits as u32,
        )
    }

    /// Scale of row `i`, group `g`, as f32.
    #[inline]
    pub fn scale(&self, i: usize, g: usize) -> f32 {
        self.scales[i * self.n_groups + g]
    }

    /// Start of row `i`'s codes; the row's `row_bytes` are followed by at least
    /// [`CODE_PAD`] readable bytes (the next rows, then the padding).
    ///
    /// # Panics
    /// If `i >= rows`.
    #[inline]
    pub fn row_ptr(&self, i: usize) -> *const u8 {
        assert!(i < self.rows, "row out of range");
        self.codes[i * self.row_bytes..].as_ptr()
    }

    /// Start of row `i`'s `n_groups` scales.
    ///
    /// # Panics
    /// If `i >= rows`.
    #[inline]
    pub fn row_scales(&self, i: usize) -> *const f32 {
        assert!(i < self.rows, "row out of range");
        self.scales[i * self.n_groups..].as_ptr()
    }

    /// Reference value of element `(i, j)`: `f32(scale) * codebook[code]`, one rounding.
    #[inline]
    pub fn element(&self, i: usize, j: usize) -> f32 {
        let row = &self.codes[i * self.row_bytes..(i + 1) * self.row_bytes];
        let s = self.scales[i * self.n_groups + j / self.group];
        s * self.codebook[usize::from(code_at(row, j, self.bits as u32))]
    }
}

/// The 2^bits codebook `cb` repeated over 256 entries. Table lookups then need no
/// masking of index bits above `bits` (the SIMD kernels shift each code to the bottom
/// of its lane and let the garbage above it select the same entry).
pub fn periodic_codebook(cb: &[f32]) -> Box<[f32; 256]> {
    let mut out = Box::new([0f32; 256]);
    if !cb.is_empty() {
        out.iter_mut()
            .enumerate()
            .for_each(|(i, d)| *d = cb[i % cb.len()]);
    }
    out
}

/// Reference: `y[r] = sum_j (s * q)_(first+r, j) * x_j`, summed sequentially in f32.
pub fn dot_rows_scalar(q: &QuantRows, x: &[f32], first: usize, y: &mut [f32]) {
    assert!(
        x.len() >= q.cols && first + y.len() <= q.rows,
        "dot_rows: bad range"
    );
    for (r, out) in y.iter_mut().enumerate() {
        let i = first + r;
        *out = (0..q.cols).fold(0.0f32, |s, j| s + q.element(i, j) * x[j]);
    }
}

/// Fused mat-vec over rows `first .. first + y.len()` with `isa`.
pub fn dot_rows(isa: Isa, q: &QuantRows, x: &[f32], first: usize, y: &mut [f32]) {
    assert!(
        x.len() >= q.cols && first + y.len() <= q.rows,
        "dot_rows: bad range"
    );
    match isa {
        // SAFETY (both arms): the ISA is available (checked in the guard); `QuantRows::new`
        // checked the buffer lengths the kernels index by, and the range was checked above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if Isa::Avx512.is_available() => unsafe {
            x86::dot_rows_avx512(q, x, first, y)
        },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if Isa::Avx2.is_available() => unsafe { x86::dot_rows_avx2(q, x, first, y) },
        _ => dot_rows_scalar(q, x, first, y),
    }
}

/// Reference: row `i` reconstructed, `out[j] = f32(scale) * codebook[code]`.
pub fn dequant_row_scalar(q: &QuantRows, i: usize, out: &mut [f32]) {
    assert!(out.len() == q.cols && i < q.rows, "dequant_row: bad range");
    out.iter_mut()
        .enumerate()
        .for_each(|(j, o)| *o = q.element(i, j));
}

/// Row `i` reconstructed with `isa`; bit-identical to [`dequant_row_scalar`].
pub fn dequant_row(isa: Isa, q: &QuantRows, i: usize, out: &mut [f32]) {
    assert!(out.len() == q.cols && i < q.rows, "dequant_row: bad range");
    match isa {
        // SAFETY: as in `dot_rows`.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if Isa::Avx512.is_available() => unsafe { x86::dequant_row_avx512(q, i, out) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if Isa::Avx2.is_available() => unsafe { x86::dequant_row_avx2(q, i, out) },
        _ => dequant_row_scalar(q, i, out),
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::QuantRows;
    use std::arch::x86_64::*;

    /// Shuffle control (bytes) and per-lane shifts, exactly as reconstruction unpacks.
    use uc_codec::unpack_tables as tables;

    /// Codebook registers and unpack tables for AVX-512.
    struct Unpack512 {
        ctrl: __m512i,
        shift: __m512i,
        mask: __m512i,
        cb: [__m512; 4],
    }

    impl Unpack512 {
        #[target_feature(enable = "avx512f,avx512bw")]
        unsafe fn new(q: &QuantRows) -> Self {
            let (ctrl, shift) = tables::<16, 64>(q.bits, 16);
            let cb = q.codebook.as_ptr();
            Unpack512 {
                ctrl: _mm512_loadu_si512(ctrl.as_ptr().cast()),
                shift: _mm512_loadu_si512(shift.as_ptr().cast()),
                mask: _mm512_set1_epi32((1i32 << q.bits) - 1),
                cb: [
                    _mm512_loadu_ps(cb),
                    _mm512_loadu_ps(cb.add(16)),
                    _mm512_loadu_ps(cb.add(32)),
                    _mm512_loadu_ps(cb.add(48)),
                ],
            }
        }

        /// Codebook values of the 16 codes whose bytes start at `p`.
        ///
        /// # Safety
        /// `p .. p + 16` must be readable; `BITS == q.bits`.
        #[target_feature(enable = "avx512f,avx512bw")]
        #[inline]
        unsafe fn values<const BITS: usize>(&self, p: *const u8, cb: *const f32) -> __m512 {
            let v = _mm512_broadcast_i32x4(_mm_loadu_si128(p.cast()));
            let idx = _mm512_and_si512(
                _mm512_srlv_epi32(_mm512_shuffle_epi8(v, self.ctrl), self.shift),
                self.mask,
            );
            match BITS {
                0..=4 => _mm512_permutexvar_ps(idx, self.cb[0]),
                5 => _mm512_permutex2var_ps(self.cb[0], idx, self.cb[1]),
                6 => {
                    let lo = _mm512_permutex2var_ps(self.cb[0], idx, self.cb[1]);
                    let hi = _mm512_permutex2var_ps(self.cb[2], idx, self.cb[3]);
                    _mm512_mask_blend_ps(_mm512_test_epi32_mask(idx, _mm512_set1_epi32(32)), lo, hi)
                }
                // Indices are < 2^BITS <= 256 and the codebook is padded to 256 entries.
                _ => _mm512_i32gather_ps::<4>(idx, cb),
            }
        }
    }

    #[inline(always)]
    fn lanes(n: usize) -> __mmask16 {
        if n >= 16 {
            0xffff
        } else {
            ((1u32 << n) - 1) as u16
        }
    }

    /// # Safety
    /// AVX-512 F+BW available; `x.len() >= q.cols`, `first + y.len() <= q.rows`.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn dot_rows_avx512(q: &QuantRows, x: &[f32], first: usize, y: &mut [f32]) {
        if q.bits == 8 && q.group.is_multiple_of(64) && is_x86_feature_detected!("avx512vbmi") {
            return dot8_planes(q, x, first, y);
        }
        match q.bits {
            2 => dot512::<2>(q, x, first, y),
            3 => dot512::<3>(q, x, first, y),
            4 => dot512::<4>(q, x, first, y),
            5 => dot512::<5>(q, x, first, y),
            6 => dot512::<6>(q, x, first, y),
            7 => dot512::<7>(q, x, first, y),
            _ => dot512::<8>(q, x, first, y),
        }
    }

    thread_local! {
        /// `x` in the lane order of [`dot8_planes`], reused across calls on a thread.
        static XPERM: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }

    /// 8-bit codes without a gather: the 256-entry codebook is split into four byte
    /// planes (byte k of every entry, 256 bytes = 4 registers each). For 64 codes at a
    /// time (one load: the codes are the bytes), each plane is looked up with two
    /// 128-entry byte permutes (`vpermi2b`) and a blend on the code's top bit; byte
    /// unpacks then reassemble the f32 values. The unpacks leave value `16 L + 4 k + m`
    /// (128-bit lane L, output vector k, lane m) in lane `4 L + m` of vector k, so `x` is
    /// permuted into the same order once per call. Same per-group accumulation as
    /// [`dot512`]; columns past the last whole 64 are summed exactly per element.
    ///
    /// # Safety
    /// AVX-512 F+BW+VBMI available; `q.bits == 8`, `q.group % 64 == 0`,
    /// `x.len() >= q.cols`, `first + y.len() <= q.rows`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
    unsafe fn dot8_planes(q: &QuantRows, x: &[f32], first: usize, y: &mut [f32]) {
        let full = q.cols / 64;
        // planes[k][c] = byte k of codebook[c] (little-endian f32).
        let mut planes = [[0u8; 256]; 4];
        for (c, v) in q.codebook.iter().enumerate() {
            for (k, b) in v.to_le_bytes().into_iter().enumerate() {
                planes[k][c] = b;
            }
        }
        let t: [[__m512i; 4]; 4] = std::array::from_fn(|k| {
            std::array::from_fn(|r| _mm512_loadu_si512(planes[k][64 * r..].as_ptr().cast()))
        });
        XPERM.with(|xp| {
            let mut xp = xp.borrow_mut();
            xp.clear();
            for c in 0..full {
                for k in 0..4 {
                    for l in 0..4 {
                        for m in 0..4 {
                            xp.push(x[c * 64 + 16 * l + 4 * k + m]);
                        }
                    }
                }
            }
            let (pxp, chunks_per_group) = (xp.as_ptr(), q.group / 64);
            for (r, out) in y.iter_mut().enumerate() {
                let i = first + r;
                let row = q.codes.as_ptr().add(i * q.row_bytes);
                let scales = q.scales.as_ptr().add(i * q.n_groups);
                let mut acc = _mm512_setzero_ps();
                let mut c = 0;
                while c < full {
                    let (mut ga, mut gb) = (_mm512_setzero_ps(), _mm512_setzero_ps());
                    let g = c / chunks_per_group;
                    let end = (c + chunks_per_group).min(full);
                    while c < end {
                        let idx = _mm512_loadu_si512(row.add(c * 64).cast());
                        let top = _mm512_movepi8_mask(idx);
                        let plane = |k: usize| {
                            let lo = _mm512_permutex2var_epi8(t[k][0], idx, t[k][1]);
                            let hi = _mm512_permutex2var_epi8(t[k][2], idx, t[k][3]);
                            _mm512_mask_blend_epi8(top, lo, hi)
                        };
                        let (p0, p1, p2, p3) = (plane(0), plane(1), plane(2), plane(3));
                        let (a, b) = (_mm512_unpacklo_epi8(p0, p1), _mm512_unpackhi_epi8(p0, p1));
                        let (d, e) = (_mm512_unpacklo_epi8(p2, p3), _mm512_unpackhi_epi8(p2, p3));
                        let f = [
                            _mm512_unpacklo_epi16(a, d),
                            _mm512_unpackhi_epi16(a, d),
                            _mm512_unpacklo_epi16(b, e),
                            _mm512_unpackhi_epi16(b, e),
                        ];
                        let px = pxp.add(c * 64);
                        ga = _mm512_fmadd_ps(_mm512_castsi512_ps(f[0]), _mm512_loadu_ps(px), ga);
                        gb = _mm512_fmadd_ps(
                            _mm512_castsi512_ps(f[1]),
                            _mm512_loadu_ps(px.add(16)),
                            gb,
                        );
                        ga = _mm512_fmadd_ps(
                            _mm512_castsi512_ps(f[2]),
                            _mm512_loadu_ps(px.add(32)),
                            ga,
                        );
                        gb = _mm512_fmadd_ps(
                            _mm512_castsi512_ps(f[3]),
                            _mm512_loadu_ps(px.add(48)),
                            gb,
                        );
                        c += 1;
                    }
                    acc =
                        _mm512_fmadd_ps(_mm512_set1_ps(*scales.add(g)), _mm512_add_ps(ga, gb), acc);
                }
                let mut tail = 0.0f32;
                for (j, xj) in x.iter().enumerate().take(q.cols).skip(full * 64) {
                    tail += q.element(i, j) * xj;
                }
                *out = _mm512_reduce_add_ps(acc) + tail;
            }
        });
    }

    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn dot512<const BITS: usize>(q: &QuantRows, x: &[f32], first: usize, y: &mut [f32]) {
        let u = Unpack512::new(q);
        let cb = q.codebook.as_ptr();
        let px = x.as_ptr();
        let codes = q.codes.as_ptr();
        // Two rows at a time: twice the independent work per loaded x, which keeps the
        // unpack -> lookup -> FMA chains of both rows in flight.
        let pairs = y.len() / 2;
        for p in 0..pairs {
            let i = first + 2 * p;
            let (r0, r1) = (codes.add(i * q.row_bytes), codes.add((i + 1) * q.row_bytes));
            let (s0, s1) = (
                q.scales.as_ptr().add(i * q.n_groups),
                q.scales.as_ptr().add((i + 1) * q.n_groups),
            );
            let (mut acc0, mut acc1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
            for g in 0..q.n_groups {
                let j1 = (g * q.group + q.group).min(q.cols);
                let mut j = g * q.group;
                let (mut a0, mut b0, mut a1, mut b1) = (
                    _mm512_setzero_ps(),
                    _mm512_setzero_ps(),
                    _mm512_setzero_ps(),
                    _mm512_setzero_ps(),
                );
                while j + 32 <= j1 {
                    let (xa, xb) = (_mm512_loadu_ps(px.add(j)), _mm512_loadu_ps(px.add(j + 16)));
                    let (oa, ob) = (j * BITS / 8, (j + 16) * BITS / 8);
                    a0 = _mm512_fmadd_ps(u.values::<BITS>(r0.add(oa), cb), xa, a0);
                    a1 = _mm512_fmadd_ps(u.values::<BITS>(r1.add(oa), cb), xa, a1);
                    b0 = _mm512_fmadd_ps(u.values::<BITS>(r0.add(ob), cb), xb, b0);
                    b1 = _mm512_fmadd_ps(u.values::<BITS>(r1.add(ob), cb), xb, b1);
                    j += 32;
                }
                while j < j1 {
                    let xm = _mm512_maskz_loadu_ps(lanes(j1 - j), px.add(j));
                    a0 = _mm512_fmadd_ps(u.values::<BITS>(r0.add(j * BITS / 8), cb), xm, a0);
                    a1 = _mm512_fmadd_ps(u.values::<BITS>(r1.add(j * BITS / 8), cb), xm, a1);
                    j += 16;
                }
                acc0 = _mm512_fmadd_ps(_mm512_set1_ps(*s0.add(g)), _mm512_add_ps(a0, b0), acc0);
                acc1 = _mm512_fmadd_ps(_mm512_set1_ps(*s1.add(g)), _mm512_add_ps(a1, b1), acc1);
            }
            y[2 * p] = _mm512_reduce_add_ps(acc0);
            y[2 * p + 1] = _mm512_reduce_add_ps(acc1);
        }
        for (r, out) in y.iter_mut().enumerate().skip(2 * pairs) {
            let i = first + r;
            // Bytes of column j's chunk: row start + j * BITS / 8 (j a multiple of 16);
            // at most row_bytes - 1 + 16 < row end + CODE_PAD.
            let row = codes.add(i * q.row_bytes);
            let scales = q.scales.as_ptr().add(i * q.n_groups);
            let mut acc = _mm512_setzero_ps();
            for g in 0..q.n_groups {
                let j1 = (g * q.group + q.group).min(q.cols);
                let mut j = g * q.group;
                let (mut ga, mut gb) = (_mm512_setzero_ps(), _mm512_setzero_ps());
                while j + 32 <= j1 {
                    let va = u.values::<BITS>(row.add(j * BITS / 8), cb);
                    let vb = u.values::<BITS>(row.add((j + 16) * BITS / 8), cb);
                    ga = _mm512_fmadd_ps(va, _mm512_loadu_ps(px.add(j)), ga);
                    gb = _mm512_fmadd_ps(vb, _mm512_loadu_ps(px.add(j + 16)), gb);
                    j += 32;
                }
                while j < j1 {
                    // Lanes past the row's end read x as 0 (masked load), so whatever
                    // finite codebook value they decode to contributes nothing.
                    let m = lanes(j1 - j);
                    let v = u.values::<BITS>(row.add(j * BITS / 8), cb);
                    ga = _mm512_fmadd_ps(v, _mm512_maskz_loadu_ps(m, px.add(j)), ga);
                    j += 16;
                }
                acc = _mm512_fmadd_ps(_mm512_set1_ps(*scales.add(g)), _mm512_add_ps(ga, gb), acc);
            }
            *out = _mm512_reduce_add_ps(acc);
        }
    }

    /// # Safety
    /// AVX-512 F+BW available; `out.len() == q.cols`, `i < q.rows`.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn dequant_row_avx512(q: &QuantRows, i: usize, out: &mut [f32]) {
        match q.bits {
            2 => deq512::<2>(q, i, out),
            3 => deq512::<3>(q, i, out),
            4 => deq512::<4>(q, i, out),
            5 => deq512::<5>(q, i, out),
            6 => deq512::<6>(q, i, out),
            7 => deq512::<7>(q, i, out),
            _ => deq512::<8>(q, i, out),
        }
    }

    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn deq512<const BITS: usize>(q: &QuantRows, i: usize, out: &mut [f32]) {
        let u = Unpack512::new(q);
        let cb = q.codebook.as_ptr();
        let row = q.codes.as_ptr().add(i * q.row_bytes);
        let po = out.as_mut_ptr();
        let mut j = 0;
        while j < q.cols {
            let s = _mm512_set1_ps(*q.scales.get_unchecked(i * q.n_groups + j / q.group));
            // One multiply, no FMA: exactly the specification's rounding.
            let w = _mm512_mul_ps(s, u.values::<BITS>(row.add(j * BITS / 8), cb));
            _mm512_mask_storeu_ps(po.add(j), lanes(q.cols - j), w);
            j += 16;
        }
    }

    /// Codebook registers and unpack tables for AVX2 (8 codes per step).
    struct Unpack256 {
        ctrl: __m256i,
        shift: __m256i,
        mask: __m256i,
        cb: [__m256; 2],
    }

    impl Unpack256 {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn new(q: &QuantRows) -> Self {
            let (ctrl, shift) = tables::<8, 32>(q.bits, 8);
            let cb = q.codebook.as_ptr();
            Unpack256 {
                ctrl: _mm256_loadu_si256(ctrl.as_ptr().cast()),
                shift: _mm256_loadu_si256(shift.as_ptr().cast()),
                mask: _mm256_set1_epi32((1i32 << q.bits) - 1),
                cb: [_mm256_loadu_ps(cb), _mm256_loadu_ps(cb.add(8))],
            }
        }

        /// # Safety
        /// `p .. p + 8` readable; `BITS == q.bits`.
        #[target_feature(enable = "avx2,fma")]
        #[inline]
        unsafe fn values<const BITS: usize>(&self, p: *const u8, cb: *const f32) -> __m256 {
            let word = std::ptr::read_unaligned(p.cast::<i64>());
            let v = _mm256_set1_epi64x(word);
            let idx = _mm256_and_si256(
                _mm256_srlv_epi32(_mm256_shuffle_epi8(v, self.ctrl), self.shift),
                self.mask,
            );
            match BITS {
                0..=3 => _mm256_permutevar8x32_ps(self.cb[0], idx),
                4 => {
                    let lo = _mm256_permutevar8x32_ps(self.cb[0], idx);
                    let hi = _mm256_permutevar8x32_ps(self.cb[1], idx);
                    // Bit 3 of the index selects the upper half: move it to the sign bit.
                    _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)))
                }
                _ => _mm256_i32gather_ps::<4>(cb, idx),
            }
        }
    }

    /// Horizontal sum of 8 lanes.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }

    /// # Safety
    /// AVX2 + FMA available; `x.len() >= q.cols`, `first + y.len() <= q.rows`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_rows_avx2(q: &QuantRows, x: &[f32], first: usize, y: &mut [f32]) {
        match q.bits {
            2 => dot256::<2>(q, x, first, y),
            3 => dot256::<3>(q, x, first, y),
            4 => dot256::<4>(q, x, first, y),
            5 => dot256::<5>(q, x, first, y),
            6 => dot256::<6>(q, x, first, y),
            7 => dot256::<7>(q, x, first, y),
            _ => dot256::<8>(q, x, first, y),
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot256<const BITS: usize>(q: &QuantRows, x: &[f32], first: usize, y: &mut [f32]) {
        let u = Unpack256::new(q);
        let cb = q.codebook.as_ptr();
        let px = x.as_ptr();
        for (r, out) in y.iter_mut().enumerate() {
            let i = first + r;
            let row = q.codes.as_ptr().add(i * q.row_bytes);
            let mut acc = _mm256_setzero_ps();
            let mut tail = 0.0f32;
            for g in 0..q.n_groups {
                let j1 = (g * q.group + q.group).min(q.cols);
                let mut j = g * q.group;
                let (mut ga, mut gb) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                while j + 16 <= j1 {
                    ga = _mm256_fmadd_ps(
                        u.values::<BITS>(row.add(j * BITS / 8), cb),
                        _mm256_loadu_ps(px.add(j)),
                        ga,
                    );
                    let k = j + 8;
                    gb = _mm256_fmadd_ps(
                        u.values::<BITS>(row.add(k * BITS / 8), cb),
                        _mm256_loadu_ps(px.add(k)),
                        gb,
                    );
                    j += 16;
                }
                while j + 8 <= j1 {
                    ga = _mm256_fmadd_ps(
                        u.values::<BITS>(row.add(j * BITS / 8), cb),
                        _mm256_loadu_ps(px.add(j)),
                        ga,
                    );
                    j += 8;
                }
                let s = *q.scales.get_unchecked(i * q.n_groups + g);
                acc = _mm256_fmadd_ps(_mm256_set1_ps(s), _mm256_add_ps(ga, gb), acc);
                while j < j1 {
                    tail += q.element(i, j) * *px.add(j);
                    j += 1;
                }
            }
            *out = hsum(acc) + tail;
        }
    }

    /// # Safety
    /// AVX2 + FMA available; `out.len() == q.cols`, `i < q.rows`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dequant_row_avx2(q: &QuantRows, i: usize, out: &mut [f32]) {
        match q.bits {
            2 => deq256::<2>(q, i, out),
            3 => deq256::<3>(q, i, out),
            4 => deq256::<4>(q, i, out),
            5 => deq256::<5>(q, i, out),
            6 => deq256::<6>(q, i, out),
            7 => deq256::<7>(q, i, out),
            _ => deq256::<8>(q, i, out),
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn deq256<const BITS: usize>(q: &QuantRows, i: usize, out: &mut [f32]) {
        let u = Unpack256::new(q);
        let cb = q.codebook.as_ptr();
        let row = q.codes.as_ptr().add(i * q.row_bytes);
        let mut j = 0;
        while j + 8 <= q.cols {
            let s = _mm256_set1_ps(*q.scales.get_unchecked(i * q.n_groups + j / q.group));
            let w = _mm256_mul_ps(s, u.values::<BITS>(row.add(j * BITS / 8), cb));
            _mm256_storeu_ps(out.as_mut_ptr().add(j), w);
            j += 8;
        }
        for (jj, o) in out.iter_mut().enumerate().skip(j) {
            *o = q.element(i, jj);
        }
    }
}
