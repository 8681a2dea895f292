//! The one error type of uc-runtime: every variant names what it is about.

use std::path::PathBuf;

/// Everything that can go wrong loading weights or generating text.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// Checkpoint intake, config or tokenizer (from uc-model).
    #[error(transparent)]
    Model(#[from] uc_model::ModelError),
    /// The pack's manifest or a container could not be read.
    #[error("pack {dir}: {source}")]
    Format {
        /// The pack directory.
        dir: PathBuf,
        /// What uc-format reported.
        source: uc_format::FormatError,
    },
    /// A quantized tensor is malformed (from uc-codec's validation).
    #[error("tensor {tensor}: {source}")]
    Codec {
        /// The tensor name.
        tensor: String,
        /// What uc-codec reported.
        source: uc_codec::CodecError,
    },
    /// A tensor's stored entries disagree with its manifest record or the config.
    #[error("tensor {tensor}: {reason}")]
    BadTensor {
        /// The tensor name.
        tensor: String,
        /// What is wrong, with expected and found values.
        reason: String,
    },
    /// The pack failed verification; the message is the verify report.
    #[error("VERIFY: FAIL -- refusing to run this pack\n{report}")]
    Verify {
        /// One line per finding: subject and problem.
        report: String,
    },
    /// A token id is outside the model's vocabulary.
    #[error("token id {id} at position {position} is outside the vocabulary ({vocab})")]
    TokenOutOfRange {
        /// The id.
        id: u32,
        /// Its index in the input.
        position: usize,
        /// Vocabulary size.
        vocab: usize,
    },
    /// The KV cache cannot hold more positions.
    #[error("context full: {needed} positions needed, the decoder was built for {capacity}")]
    ContextFull {
        /// Positions the request needs.
        needed: usize,
        /// Positions the cache holds.
        capacity: usize,
    },
    /// An empty token sequence was given where at least one token is needed.
    #[error("empty input: {0}")]
    Empty(&'static str),
    /// An argument is out of its valid range.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Decoders that [`crate::Decoder::forward_batch`] cannot step together (streamed
    /// or state-space models, different weights, capacities or instruction sets).
    #[error("batched decode: {0}")]
    Unbatchable(String),
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The background prefetch thread died.
    #[error("layer prefetch thread: {0}")]
    Prefetch(String),
}

/// Shorthand for results of this crate.
pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;

impl RuntimeError {
    pub(crate) fn bad(tensor: &str, reason: impl Into<String>) -> Self {
        RuntimeError::BadTensor {
            tensor: tensor.to_string(),
            reason: reason.into(),
        }
    }
}
