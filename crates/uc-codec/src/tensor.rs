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
    /// (rows, n_groups) scale bits (f16 or bf16 per `spec.scale_dtype`), finite.
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

/// Stored scale bits -> f32 (exact for both dtypes, subnormals included).
#[inline]
pub fn scale_to_f32(bits: u16, dtype: ScaleDtype) -> f32 {
    match dtype {
        ScaleDtype::F16 => half::f16::from_bits(bits).to_f32(),
        ScaleDtype::Bf16 => bf16_to_f32(bits),
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
