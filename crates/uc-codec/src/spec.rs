//! The codec table: every codec is a [`CodecSpec`] value; generic code never switches on
//! a codec name.

use uc_format::{CodecRecord, ScaleDtype};

use crate::{CodecError, Result};

/// Supported scale-group sizes (columns per scale). Multiples of 16 so SIMD chunks of
/// 8 or 16 outputs never straddle a group.
pub const GROUPS: [u32; 4] = [32, 64, 128, 256];

/// Bit widths in the default table.
const TABLE_BITS: [u8; 6] = [2, 3, 4, 5, 6, 8];

/// Parameters of one codec. The canonical name is derived from the fields
/// ([`CodecSpec::name`]) rather than stored, so the two can never disagree.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CodecSpec {
    /// Bits per code, 2..=8; the codebook has 2^bits entries.
    pub bits: u8,
    /// Columns per scale group, one of [`GROUPS`].
    pub group: u32,
    /// Stored dtype of the scales.
    pub scale_dtype: ScaleDtype,
    /// Rank of the low-rank overlay (0 = none).
    pub rank: u32,
    /// Block size of the randomized Hadamard rotation of the input dimension, one of
    /// [`ROTATIONS`], or 0 for none: the stored tensor is `W R^T` and the model's weight
    /// is its reconstruction times `R` ([`crate::rotation`], docs/format.md section 3b).
    pub rot: u32,
    /// Trellis-coded quantization ([`crate::trellis`], docs/format.md section 3c): each
    /// `bits`-bit code is a branch bit and an index into one of four subsets of a
    /// codebook of 2^(bits+1) entries, the subset set by the codes of the two rows above.
    /// Bits 2..=7.
    pub trellis: bool,
}

/// Supported rotation block sizes: powers of 4, so the Hadamard normalisation
/// `1 / sqrt(block)` is a power of two and rotating is exact up to the additions' order.
pub const ROTATIONS: [u32; 3] = [16, 64, 256];

const fn table() -> [CodecSpec; TABLE_BITS.len() * GROUPS.len()] {
    let mut out = [CodecSpec {
        bits: 0,
        group: 0,
        scale_dtype: ScaleDtype::F16,
        rank: 0,
        rot: 0,
        trellis: false,
    }; TABLE_BITS.len() * GROUPS.len()];
    let mut i = 0;
    while i < out.len() {
        out[i] = CodecSpec {
            bits: TABLE_BITS[i / GROUPS.len()],
            group: GROUPS[i % GROUPS.len()],
            scale_dtype: ScaleDtype::F16,
            rank: 0,
            rot: 0,
            trellis: false,
        };
        i += 1;
    }
    out
}

const TABLE: [CodecSpec; TABLE_BITS.len() * GROUPS.len()] = table();

/// The codec table: bits {2,3,4,5,6,8} x group {32,64,128,256}, f16 scales, no overlay.
/// The CLI help, writer, reader and tests iterate over it. Other valid specs (bf16
/// scales, overlays) are reachable through [`CodecSpec::parse`].
pub const CODECS: &[CodecSpec] = &TABLE;

/// Element counts of a tensor's stored buffers under a codec.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Rows (output features).
    pub rows: usize,
    /// Columns (input features).
    pub cols: usize,
    /// Scale groups per row: ceil(cols / group).
    pub n_groups: usize,
    /// Bytes per code row: ceil(cols * bits / 8).
    pub row_bytes: usize,
    /// Codebook entries (f32): 2^bits, or 2^(bits+1) for a trellis codec.
    pub codebook: usize,
    /// Scales: rows * n_groups.
    pub scales: usize,
    /// Bytes per scale (2 for f16/bf16, 1 for e8).
    pub scale_bytes: usize,
    /// Code bytes: rows * row_bytes.
    pub codes: usize,
    /// Overlay A elements (bf16): rows * rank.
    pub overlay_a: usize,
    /// Overlay B elements (bf16): rank * cols.
    pub overlay_b: usize,
}

impl Layout {
    /// Every stored payload byte: codebook + scales + codes + overlay.
    pub fn stored_bytes(&self) -> u64 {
        (self.codebook as u64) * 4
            + (self.scales as u64) * self.scale_bytes as u64
            + self.codes as u64
            + (self.overlay_a as u64 + self.overlay_b as u64) * 2
    }

    /// Stored bits per weight.
    pub fn bits_per_weight(&self) -> f64 {
        self.stored_bytes() as f64 * 8.0 / (self.rows as f64 * self.cols as f64)
    }
}

impl CodecSpec {
    /// A spec with f16 scales and no overlay.
    pub const fn new(bits: u8, group: u32) -> Self {
        CodecSpec {
            bits,
            group,
            scale_dtype: ScaleDtype::F16,
            rank: 0,
            rot: 0,
            trellis: false,
        }
    }

    /// Canonical name: `q<bits>g<group>` (`t<bits>g<group>` for a trellis codec), then `r<rank>` if rank > 0, then `h<block>` if
    /// rotated, then `-bf16` for bf16 scales or `-e8` for 8-bit minifloat scales
    /// (`q5g128`, `q4g64r16-bf16`, `q5g64-e8`, `q4g64h64-e8`).
    pub fn name(&self) -> String {
        let rank = if self.rank > 0 {
            format!("r{}", self.rank)
        } else {
            String::new()
        };
        let rot = if self.rot > 0 {
            format!("h{}", self.rot)
        } else {
            String::new()
        };
        let dt = match self.scale_dtype {
            ScaleDtype::F16 => "",
            ScaleDtype::Bf16 => "-bf16",
            ScaleDtype::E8 => "-e8",
        };
        let kind = if self.trellis { 't' } else { 'q' };
        format!("{kind}{}g{}{rank}{rot}{dt}", self.bits, self.group)
    }

    /// Parses a canonical name (see [`CodecSpec::name`]) and validates it.
    pub fn parse(name: &str) -> Result<Self> {
        let unknown = || CodecError::UnknownCodec { name: name.into() };
        let (body, scale_dtype) = match (name.strip_suffix("-bf16"), name.strip_suffix("-e8")) {
            (Some(b), _) => (b, ScaleDtype::Bf16),
            (None, Some(b)) => (b, ScaleDtype::E8),
            (None, None) => (name, ScaleDtype::F16),
        };
        let (rest, trellis) = match (body.strip_prefix('q'), body.strip_prefix('t')) {
            (Some(r), _) => (r, false),
            (None, Some(r)) => (r, true),
            (None, None) => return Err(unknown()),
        };
        let (bits, rest) = rest.split_once('g').ok_or_else(unknown)?;
        let (rest, rot) = rest.split_once('h').unwrap_or((rest, "0"));
        let (group, rank) = rest.split_once('r').unwrap_or((rest, "0"));
        let num = |s: &str| s.parse::<u32>().map_err(|_| unknown());
        let bits = u8::try_from(num(bits)?).map_err(|_| unknown())?;
        let spec = CodecSpec {
            bits,
            group: num(group)?,
            scale_dtype,
            rank: num(rank)?,
            rot: num(rot)?,
            trellis,
        };
        // Round-trip check rejects non-canonical spellings (`q05g128`, `q5g128r0`).
        if spec.name() != name {
            return Err(unknown());
        }
        spec.validate()?;
        Ok(spec)
    }

    /// Checks bits (2..=8; 2..=7 for a trellis codec, whose codebook has 2^(bits+1)
    /// entries), group (one of [`GROUPS`]) and rotation (0 or one of [`ROTATIONS`]).
    pub fn validate(&self) -> Result<()> {
        if self.rot != 0 && !ROTATIONS.contains(&self.rot) {
            return Err(CodecError::BadRotation {
                tensor: String::new(),
                rot: self.rot,
                cols: 0,
            });
        }
        let max_bits = if self.trellis { 7 } else { 8 };
        if !(2..=max_bits).contains(&self.bits) {
            return Err(CodecError::BadBits {
                tensor: String::new(),
                bits: self.bits.into(),
            });
        }
        if !GROUPS.contains(&self.group) {
            return Err(CodecError::BadGroup {
                tensor: String::new(),
                group: self.group,
            });
        }
        Ok(())
    }

    /// Entries in the codebook: 2^bits, or 2^(bits+1) for a trellis codec.
    pub fn codebook_len(&self) -> usize {
        1usize << (self.bits + u8::from(self.trellis)).min(8)
    }

    /// Buffer sizes for a rows x cols tensor; validates the spec, the shape (non-zero,
    /// no overflow) and the rank (<= min(rows, cols)).
    pub fn layout(&self, rows: usize, cols: usize) -> Result<Layout> {
        self.validate()?;
        let bad_shape = || CodecError::BadShape {
            tensor: String::new(),
            rows,
            cols,
        };
        if rows == 0 || cols == 0 {
            return Err(bad_shape());
        }
        let rank = self.rank as usize;
        if rank > rows.min(cols) {
            return Err(CodecError::RankTooLarge {
                tensor: String::new(),
                rank: self.rank,
                rows,
                cols,
            });
        }
        if self.rot != 0 && !cols.is_multiple_of(self.rot as usize) {
            return Err(CodecError::BadRotation {
                tensor: String::new(),
                rot: self.rot,
                cols,
            });
        }
        let group = self.group as usize;
        let n_groups = cols.div_ceil(group);
        let row_bytes = cols
            .checked_mul(self.bits.into())
            .ok_or_else(bad_shape)?
            .div_ceil(8);
        let mul = |a: usize, b: usize| a.checked_mul(b).ok_or_else(bad_shape);
        // The reconstructed f32 output must be addressable too.
        mul(mul(rows, cols)?, 4)?;
        Ok(Layout {
            rows,
            cols,
            n_groups,
            row_bytes,
            codebook: self.codebook_len(),
            scales: mul(rows, n_groups)?,
            scale_bytes: self.scale_dtype.size(),
            codes: mul(rows, row_bytes)?,
            overlay_a: mul(rows, rank)?,
            overlay_b: mul(rank, cols)?,
        })
    }

    /// Exact stored payload bytes of a rows x cols tensor (see [`Layout::stored_bytes`]).
    pub fn stored_bytes(&self, rows: usize, cols: usize) -> Result<u64> {
        Ok(self.layout(rows, cols)?.stored_bytes())
    }

    /// Stored bits per weight of a rows x cols tensor, every byte counted.
    pub fn bits_per_weight(&self, rows: usize, cols: usize) -> Result<f64> {
        Ok(self.layout(rows, cols)?.bits_per_weight())
    }

    /// The manifest record of this spec.
    pub fn to_record(&self) -> CodecRecord {
        CodecRecord {
            name: self.name(),
            bits: self.bits,
            group: self.group,
            scale_dtype: self.scale_dtype,
            rank: self.rank,
            rot: self.rot,
            trellis: self.trellis,
        }
    }

    /// The spec a manifest record describes; the record's name must be the canonical
    /// name of its fields.
    pub fn from_record(r: &CodecRecord) -> Result<Self> {
        let spec = CodecSpec {
            bits: r.bits,
            group: r.group,
            scale_dtype: r.scale_dtype,
            rank: r.rank,
            rot: r.rot,
            trellis: r.trellis,
        };
        spec.validate()?;
        if spec.name() != r.name {
            return Err(CodecError::RecordMismatch {
                tensor: String::new(),
                reason: format!(
                    "codec name {:?} does not match its fields ({})",
                    r.name,
                    spec.name()
                ),
            });
        }
        Ok(spec)
    }
}
