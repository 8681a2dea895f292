//! [`QuantTensor`]: the in-memory form of one quantized matrix, and its validation.

use uc_format::ScaleDtype;

use crate::{CodecError, CodecSpec, Layout, Result};

/// Low-rank overlay W += A B, factors stored as bf16 bit patterns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Overlay {
    /// Rank r (>= 1; a rank-0 overlay is expressed as no overlay).
    pub rank: usize,
    /// A: (rows, r), row-major bf16 bits.
    pub a: Vec<u16>,
    /// B: (r, cols), row-major bf16 bits.
    pub b: Vec<u16>,
}

/// One quantized weight matrix (rows = out features, cols = in features).
#[derive(Clone, Debug, PartialEq)]
pub struct QuantTensor {
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// Codec parameters.
    pub spec: CodecSpec,
    /// (2^bits,) codebook, ascending, finite.
    pub codebook: Vec<f32>,
    /// (rows, n_groups) scale bits (f16, bf16 or an e8 code per `spec.scale_dtype`),
    /// finite.
    pub scales: Vec<u16>,
    /// (rows, row_bytes) codes, `bits` bits each, LSB-first, rows padded with zero bits.
    pub codes: Vec<u8>,
    /// Optional overlay; present iff `spec.rank > 0`.
    pub overlay: Option<Overlay>,
}

/// bf16 bits -> f32 (exact: bf16 is the top half of an f32).
#[inline]
pub fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

/// Stored scale bits -> f32 (exact for every dtype, subnormals included). An e8 code
/// above 255 (not storable) reads as NaN, so validation rejects it.
#[inline]
pub fn scale_to_f32(bits: u16, dtype: ScaleDtype) -> f32 {
    match dtype {
        ScaleDtype::F16 => half::f16::from_bits(bits).to_f32(),
        ScaleDtype::Bf16 => bf16_to_f32(bits),
        ScaleDtype::E8 if bits > 255 => f32::NAN,
        ScaleDtype::E8 => {
            // (32 + m) * 2^(x - 12): an integer below 64 times a power of two, exact.
            let (x, m) = (u32::from(bits >> 5), f32::from(32 + (bits & 31)));
            m * f32::from_bits((x + 127 - 12) << 23)
        }
    }
}

/// Largest e8 scale value (code 255).
pub const E8_MAX: f32 = 63.0 / 32.0;

/// The stored bits of the scale nearest to `s` (f32 -> f16/bf16 round to nearest even;
/// e8: the nearest of the 256 values, ties to the lower code, clamped into range).
pub fn scale_from_f32(s: f32, dtype: ScaleDtype) -> u16 {
    match dtype {
        ScaleDtype::F16 => half::f16::from_f32(s).to_bits(),
        ScaleDtype::Bf16 => half::bf16::from_f32(s).to_bits(),
        ScaleDtype::E8 => {
            let v = |c: u16| scale_to_f32(c, ScaleDtype::E8);
            // First code whose value is >= s (monotone table), then the nearer neighbour.
            let (mut lo, mut hi) = (0u16, 255u16);
            while lo < hi {
                let mid = (lo + hi) / 2;
                if v(mid) < s {
                    lo = mid + 1;
                } else {
                    hi = mid;
                }
            }
            if lo > 0 && (s - v(lo - 1)) <= (v(lo) - s) {
                lo - 1
            } else {
                lo
            }
        }
    }
}

/// Scale bits from their little-endian stored bytes (`dtype.size()` bytes each).
pub fn scales_from_le(bytes: &[u8], dtype: ScaleDtype) -> Vec<u16> {
    match dtype.size() {
        1 => bytes.iter().map(|&b| u16::from(b)).collect(),
        _ => bytes
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect(),
    }
}

/// Scale bits as their little-endian stored bytes (inverse of [`scales_from_le`]; e8
/// codes above 255 are not storable and are rejected by validation first).
pub fn scales_to_le(scales: &[u16], dtype: ScaleDtype) -> Vec<u8> {
    match dtype.size() {
        1 => scales.iter().map(|&s| s as u8).collect(),
        _ => scales.iter().flat_map(|s| s.to_le_bytes()).collect(),
    }
}

/// Code `j` of a packed code row: bits [j*bits, j*bits + bits) of the row, where bit i
/// of the row is bit (i % 8) of byte i / 8. Bytes past the row's end read as zero.
#[inline]
pub fn code_at(row: &[u8], j: usize, bits: u32) -> u8 {
    let pos = j * bits as usize;
    let byte = |k: usize| u16::from(row.get(k).copied().unwrap_or(0));
    let pair = byte(pos / 8) | (byte(pos / 8 + 1) << 8);
    ((pair >> (pos % 8)) & ((1u16 << bits) - 1)) as u8
}

/// Packs (rows, cols) code indices (each < 2^bits) into (rows, ceil(cols*bits/8)) bytes.
/// Index bits above `bits` are ignored.
pub fn pack_codes(indices: &[u8], rows: usize, cols: usize, bits: u32) -> Vec<u8> {
    let row_bytes = (cols * bits as usize).div_ceil(8);
    let mut out = vec![0u8; rows * row_bytes];
    let mask = ((1u16 << bits) - 1) as u8;
    for (src, dst) in indices
        .chunks(cols.max(1))
        .zip(out.chunks_mut(row_bytes.max(1)))
    {
        for (j, &c) in src.iter().enumerate() {
            let pos = j * bits as usize;
            let v = u16::from(c & mask) << (pos % 8);
            if let Some(b) = dst.get_mut(pos / 8) {
                *b |= v as u8;
            }
            if let Some(b) = dst.get_mut(pos / 8 + 1) {
                *b |= (v >> 8) as u8;
            }
        }
    }
    out
}

fn scale_is_finite(bits: u16, dtype: ScaleDtype) -> bool {
    scale_to_f32(bits, dtype).is_finite()
}

impl QuantTensor {
    /// Checks everything reconstruction relies on: spec and shape, buffer lengths,
    /// overlay rank, codebook ascending and finite, scales and overlay finite, zero
    /// padding bits. Returns the buffer layout.
    pub fn validate(&self) -> Result<Layout> {
        let l = self.spec.layout(self.rows, self.cols)?;
        let len = |what, expected: usize, found: usize| {
            if expected == found {
                Ok(())
            } else {
                Err(CodecError::LengthMismatch {
                    tensor: String::new(),
                    what,
                    expected,
                    found,
                })
            }
        };
        len("codebook", l.codebook, self.codebook.len())?;
        len("scales", l.scales, self.scales.len())?;
        len("codes", l.codes, self.codes.len())?;
        let overlay_rank = self.overlay.as_ref().map_or(0, |o| o.rank);
        if overlay_rank != self.spec.rank as usize {
            return Err(CodecError::OverlayMismatch {
                tensor: String::new(),
                spec_rank: self.spec.rank,
                overlay_rank,
            });
        }
        if let Some(o) = &self.overlay {
            len("overlay_a", l.overlay_a, o.a.len())?;
            len("overlay_b", l.overlay_b, o.b.len())?;
            for (factor, v) in [("a", &o.a), ("b", &o.b)] {
                if let Some(index) = v.iter().position(|&x| !bf16_to_f32(x).is_finite()) {
                    return Err(CodecError::NonFiniteOverlay {
                        tensor: String::new(),
                        factor,
                        index,
                    });
                }
            }
        }
        if let Some(index) = self.codebook.iter().position(|x| !x.is_finite()) {
            return Err(CodecError::NonFiniteCodebook {
                tensor: String::new(),
                index,
            });
        }
        if let Some(index) = self
            .codebook
            .windows(2)
            .position(|w| matches!(w, [a, b] if b < a))
        {
            return Err(CodecError::UnsortedCodebook {
                tensor: String::new(),
                index: index + 1,
            });
        }
        if let Some(i) = self
            .scales
            .iter()
            .position(|&s| !scale_is_finite(s, self.spec.scale_dtype))
        {
            return Err(CodecError::NonFiniteScale {
                tensor: String::new(),
                row: i / l.n_groups,
                group: i % l.n_groups,
            });
        }
        let used_bits = (self.cols * self.spec.bits as usize) % 8;
        if used_bits != 0 {
            let pad_mask = !((1u8 << used_bits) - 1);
            // The last byte of each row holds the padding.
            if let Some(row) = self
                .codes
                .chunks(l.row_bytes)
                .position(|r| r.last().is_some_and(|b| b & pad_mask != 0))
            {
                return Err(CodecError::NonZeroPadding {
                    tensor: String::new(),
                    row,
                });
            }
        }
        Ok(l)
    }
}
