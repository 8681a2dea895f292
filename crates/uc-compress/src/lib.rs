//! uc-compress: the streaming pipeline from a checkpoint to a pack.
//!
//! Data flow: [`uc_model::checkpoint::Checkpoint`] (lazy tensors) -> for each
//! transformer block, its tensors are read, encoded ([`Method`]) and written as one
//! container through [`uc_format::PackWriter`] (temp file + rename, journal) -> the
//! globals container (embedding, head, final norm) -> `manifest.json`. Only one block's
//! source weights are resident at a time. Calibrated runs take their activation
//! statistics from the runtime's engine: [`uc_runtime::staged::Stager`] runs each block
//! on the calibration windows (plain `Vec<f32>` activations), paused at every linear's
//! input; under a tight memory budget the activations carried between blocks live in
//! files instead ([`Options::spill_activations`], module `spill`). An interrupted run resumes from the journal: completed containers (re-hashed)
//! are kept, the rest recomputed, and since encoding is deterministic the final pack is
//! byte-identical to an uninterrupted run's.
#![deny(missing_docs)]

pub mod alloc;
mod calib;
mod expert;
pub mod memory;
mod pipeline;
mod spill;
mod target;

pub use alloc::Sensitivity;
pub use calib::{Calibration, CalibrationRecord, Gram, Source, SourceRecord, TOKENIZATION};
pub use pipeline::{
    compress, BlockSummary, BudgetScope, Event, Method, Options, Summary, TensorSummary,
    BUDGET_BITS,
};
pub use spill::SPILL_DIR;

/// Everything that can stop a compression.
#[derive(Debug, thiserror::Error)]
pub enum CompressError {
    /// The source checkpoint could not be read.
    #[error(transparent)]
    Model(#[from] uc_model::ModelError),
    /// The forward engine (block loading, the staged forward) failed.
    #[error(transparent)]
    Runtime(#[from] uc_runtime::RuntimeError),
    /// Encoding a tensor failed (non-finite weights, bad settings).
    #[error("tensor {tensor}: {error}")]
    Codec {
        /// The tensor.
        tensor: String,
        /// The codec's error (in the message, not a `source`, so error chains do not
        /// print it twice).
        error: uc_codec::CodecError,
    },
    /// Writing the pack failed.
    #[error(transparent)]
    Format(#[from] uc_format::FormatError),
    /// Settings that cannot work.
    #[error("invalid settings: {0}")]
    Settings(String),
    /// Writing or reading calibration activations spilled to disk
    /// ([`Options::spill_activations`]): the file and the error.
    #[error("calibration activations spilled to {path}: {source}")]
    Spill {
        /// The spill file (or directory).
        path: std::path::PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// An I/O error outside the pack writer (reading a source file to hash it).
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// Result alias of this crate.
pub type Result<T, E = CompressError> = std::result::Result<T, E>;
