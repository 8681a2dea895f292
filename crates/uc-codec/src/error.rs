//! The one error type of uc-codec.

use uc_format::FormatError;

/// Everything that can go wrong encoding, decoding, reconstructing or verifying a
/// quantized tensor. `tensor` is the tensor's name (empty until a caller that knows it
/// attaches it with [`CodecError::named`]).
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// A codec name does not parse or is not canonical (`q5g128`, `q4g64r16-bf16`).
    #[error("unknown codec name {name:?} (expected q<bits>g<group>[r<rank>][-bf16])")]
    UnknownCodec {
        /// The name given.
        name: String,
    },
    /// Bits per code outside 2..=8.
    #[error("tensor {tensor:?}: {bits} bits per code (supported: 2..=8)")]
    BadBits {
        /// Tensor name.
        tensor: String,
        /// Bits found.
        bits: u32,
    },
    /// Group size not one of [`crate::GROUPS`].
    #[error("tensor {tensor:?}: group size {group} (supported: 32, 64, 128, 256)")]
    BadGroup {
        /// Tensor name.
        tensor: String,
        /// Group found.
        group: u32,
    },
    /// A rotation block size that is not one of the supported ones, or does not divide
    /// the tensor's columns (`cols` 0: checked without a shape).
    #[error("tensor {tensor:?}: rotation block {rot} is not one of 16, 64, 256 or does not divide {cols} columns")]
    BadRotation {
        /// Tensor name.
        tensor: String,
        /// Block size found.
        rot: u32,
        /// Columns of the tensor (0 when checked without a shape).
        cols: usize,
    },
    /// Overlay rank larger than min(rows, cols).
    #[error("tensor {tensor:?}: overlay rank {rank} exceeds min({rows}, {cols})")]
    RankTooLarge {
        /// Tensor name.
        tensor: String,
        /// Rank found.
        rank: u32,
        /// Rows.
        rows: usize,
        /// Columns.
        cols: usize,
    },
    /// A zero dimension, or a size that overflows the address space.
    #[error("tensor {tensor:?}: unusable shape {rows} x {cols}")]
    BadShape {
        /// Tensor name.
        tensor: String,
        /// Rows.
        rows: usize,
        /// Columns.
        cols: usize,
    },
    /// A buffer's length differs from what the codec and shape imply.
    #[error("tensor {tensor:?}: {what} has {found} elements, expected {expected}")]
    LengthMismatch {
        /// Tensor name.
        tensor: String,
        /// Which buffer (`codes`, `scales`, `weights`, ...).
        what: &'static str,
        /// Expected length.
        expected: usize,
        /// Actual length.
        found: usize,
    },
    /// Overlay presence or rank disagrees with the codec's rank (rank 0 <=> no overlay).
    #[error("tensor {tensor:?}: codec rank {spec_rank} but overlay rank {overlay_rank}")]
    OverlayMismatch {
        /// Tensor name.
        tensor: String,
        /// Rank in the codec spec.
        spec_rank: u32,
        /// Rank of the overlay present (0 = none).
        overlay_rank: usize,
    },
    /// Codebook not sorted ascending.
    #[error("tensor {tensor:?}: codebook not ascending at index {index}")]
    UnsortedCodebook {
        /// Tensor name.
        tensor: String,
        /// First index whose value is below its predecessor.
        index: usize,
    },
    /// Codebook value NaN or infinite.
    #[error("tensor {tensor:?}: codebook value {index} is not finite")]
    NonFiniteCodebook {
        /// Tensor name.
        tensor: String,
        /// Index of the value.
        index: usize,
    },
    /// Scale NaN or infinite.
    #[error("tensor {tensor:?}: scale of row {row}, group {group} is not finite")]
    NonFiniteScale {
        /// Tensor name.
        tensor: String,
        /// Row.
        row: usize,
        /// Group within the row.
        group: usize,
    },
    /// Overlay factor value NaN or infinite.
    #[error("tensor {tensor:?}: overlay factor {factor} value {index} is not finite")]
    NonFiniteOverlay {
        /// Tensor name.
        tensor: String,
        /// `a` or `b`.
        factor: &'static str,
        /// Flat index into the factor.
        index: usize,
    },
    /// Padding bits at the end of a code row are not zero.
    #[error("tensor {tensor:?}: non-zero padding bits at the end of code row {row}")]
    NonZeroPadding {
        /// Tensor name.
        tensor: String,
        /// Row.
        row: usize,
    },
    /// A weight given to the encoder is NaN or infinite.
    #[error("tensor {tensor:?}: weight at row {row}, column {col} is not finite")]
    NonFiniteWeight {
        /// Tensor name.
        tensor: String,
        /// Row.
        row: usize,
        /// Column.
        col: usize,
    },
    /// A column importance is negative, NaN or infinite.
    #[error("tensor {tensor:?}: importance of column {col} is negative or not finite")]
    BadImportance {
        /// Tensor name.
        tensor: String,
        /// Column.
        col: usize,
    },
    /// The Gram matrix of the error-feedback encoder stays singular even after damping
    /// (or holds a non-finite value).
    #[error("tensor {tensor:?}: gram matrix is not positive definite after damping ({reason})")]
    BadGram {
        /// Tensor name.
        tensor: String,
        /// What was found.
        reason: String,
    },
    /// A group scale does not fit the stored scale dtype (f16 max is 65504).
    #[error("tensor {tensor:?}: scale of row {row}, group {group} overflows the scale dtype")]
    ScaleOverflow {
        /// Tensor name.
        tensor: String,
        /// Row.
        row: usize,
        /// Group within the row.
        group: usize,
    },
    /// Reconstruction produced an infinity or NaN (an overflowing scale x codebook or
    /// overlay product). Such tensors are invalid: NaN bit patterns differ between CPU
    /// families, which would break cross-platform digests.
    #[error("tensor {tensor:?}: reconstructed value at row {row}, column {col} is not finite")]
    NonFiniteOutput {
        /// Tensor name.
        tensor: String,
        /// Row.
        row: usize,
        /// Column.
        col: usize,
    },
    /// A manifest record disagrees with the codec table or with the container entries
    /// (encoding kind, codec fields, entry dtype/shape, stored byte count).
    #[error("tensor {tensor:?}: {reason}")]
    RecordMismatch {
        /// Tensor name.
        tensor: String,
        /// What disagrees, with both values.
        reason: String,
    },
    /// A pack-level (bytes) error; it names its file or tensor itself.
    #[error(transparent)]
    Format(#[from] FormatError),
}

impl CodecError {
    /// Attaches the tensor name to an error raised where it was not known.
    pub fn named(mut self, name: &str) -> Self {
        use CodecError::*;
        match &mut self {
            BadBits { tensor, .. }
            | BadGroup { tensor, .. }
            | RankTooLarge { tensor, .. }
            | BadRotation { tensor, .. }
            | BadShape { tensor, .. }
            | LengthMismatch { tensor, .. }
            | OverlayMismatch { tensor, .. }
            | UnsortedCodebook { tensor, .. }
            | NonFiniteCodebook { tensor, .. }
            | NonFiniteScale { tensor, .. }
            | NonFiniteOverlay { tensor, .. }
            | NonZeroPadding { tensor, .. }
            | NonFiniteWeight { tensor, .. }
            | BadImportance { tensor, .. }
            | BadGram { tensor, .. }
            | ScaleOverflow { tensor, .. }
            | NonFiniteOutput { tensor, .. }
            | RecordMismatch { tensor, .. } => {
                if tensor.is_empty() {
                    *tensor = name.into();
                }
            }
            UnknownCodec { .. } | Format(_) => {}
        }
        self
    }
}
