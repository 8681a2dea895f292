//! The one error type of uc-model: every variant names the file and, where there is
//! one, the tensor.

use std::path::PathBuf;

/// Everything that can go wrong while opening a checkpoint or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be opened or read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A file the checkpoint needs is not there.
    #[error("{path}: missing (a Hugging Face checkpoint needs {what})")]
    MissingFile {
        /// Where it was expected.
        path: PathBuf,
        /// What the file is for.
        what: &'static str,
    },
    /// `config.json` is not valid JSON or lacks a required key.
    #[error("{path}: malformed config: {reason}")]
    BadConfig {
        /// The config file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The architecture named in `config.json` is not one uc can run.
    #[error("{path}: unsupported architecture {model_type:?} (supported: {supported})")]
    UnsupportedArchitecture {
        /// The config file.
        path: PathBuf,
        /// The `model_type` it names.
        model_type: String,
        /// The supported list.
        supported: &'static str,
    },
    /// A safetensors file is truncated, corrupt or inconsistent.
    #[error("{path}: corrupt safetensors: {reason}")]
    BadSafetensors {
        /// The file.
        path: PathBuf,
        /// What the parser found.
        reason: String,
    },
    /// The shard index (`model.safetensors.index.json`) is malformed.
    #[error("{path}: malformed shard index: {reason}")]
    BadIndex {
        /// The index file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A tensor the model needs is in no file of the checkpoint.
    #[error("tensor {name}: not found in {dir}")]
    MissingTensor {
        /// The tensor name.
        name: String,
        /// The checkpoint directory.
        dir: PathBuf,
    },
    /// A tensor has a shape other than the config implies.
    #[error("tensor {name} in {file}: shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        /// The tensor name.
        name: String,
        /// The file holding it.
        file: PathBuf,
        /// The shape in the file.
        found: Vec<usize>,
        /// The shape the config implies.
        expected: Vec<usize>,
    },
    /// A tensor is stored in a dtype uc cannot read as weights.
    #[error("tensor {name} in {path}: unsupported dtype {dtype} (supported: F32, F16, BF16)")]
    UnsupportedDtype {
        /// The tensor name.
        name: String,
        /// The file.
        path: PathBuf,
        /// The dtype found.
        dtype: String,
    },
    /// A tensor holds NaN or infinity.
    #[error("tensor {name}: non-finite value at element {index}")]
    NonFinite {
        /// The tensor name.
        name: String,
        /// Flat index of the first bad element.
        index: usize,
    },
    /// `tokenizer.json` is missing or cannot be loaded.
    #[error("{path}: tokenizer: {reason}")]
    Tokenizer {
        /// The tokenizer file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// A token id is outside the vocabulary.
    #[error("token id {id} at position {position} is outside the vocabulary ({vocab})")]
    TokenOutOfRange {
        /// The id.
        id: u32,
        /// Where it was.
        position: usize,
        /// Vocabulary size.
        vocab: usize,
    },
    /// A weight source other than a checkpoint (a pack) failed.
    #[error("{0}")]
    Source(String),
    /// GGUF import failed.
    #[error(transparent)]
    Gguf(#[from] crate::gguf::GgufError),
    /// A tensor operation failed (a shape bug, not bad input).
    #[error("tensor op: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Shorthand for results of this crate.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.into(),
            source,
        }
    }
}
