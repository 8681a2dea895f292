//! The one error type of uc-format.

use std::path::PathBuf;

/// Everything that can go wrong reading or writing a pack's bytes. Each variant names
/// the file, entry or tensor concerned.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// An operating-system I/O call on `path` failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// File or directory the call was about.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A JSON file (manifest or journal) is larger than [`crate::MAX_JSON_BYTES`].
    #[error("{}: {size} bytes exceeds the {cap}-byte limit", path.display())]
    TooLarge {
        /// The oversized file.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
        /// The limit.
        cap: u64,
    },
    /// A JSON file does not parse or does not match the schema.
    #[error("{}: {source}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// The parser's message (line and column).
        #[source]
        source: serde_json::Error,
    },
    /// The manifest declares a format major version newer than this build reads.
    #[error("{}: format_version {found} is newer than {supported}, the newest this uc reads; upgrade uc", path.display())]
    UnsupportedVersion {
        /// The manifest or journal.
        path: PathBuf,
        /// Version found in the file.
        found: u64,
        /// Newest version supported.
        supported: u64,
    },
    /// A path in the manifest is absolute, climbs out of the pack, or is not one of the
    /// allowed locations (pack root or `tensors/`).
    #[error("unsafe or non-canonical pack path {path:?}")]
    UnsafePath {
        /// The offending path string.
        path: String,
    },
    /// A container is not a valid safetensors file (bad header, offsets, trailing bytes).
    #[error("{}: invalid safetensors container: {reason}", path.display())]
    Container {
        /// The container file.
        path: PathBuf,
        /// What the safetensors parser objected to.
        reason: String,
    },
    /// A container lacks an entry the reader needs.
    #[error("{}: no entry named {entry:?}", path.display())]
    MissingEntry {
        /// The container file.
        path: PathBuf,
        /// Entry name looked up.
        entry: String,
    },
    /// Two entries, tensors or files share a name where names must be unique.
    #[error("duplicate name {name:?}")]
    Duplicate {
        /// The repeated name.
        name: String,
    },
    /// A tensor name is not in the manifest.
    #[error("no tensor named {name:?} in the manifest")]
    UnknownTensor {
        /// Name looked up.
        name: String,
    },
    /// `PackWriter::create` found an existing pack or journal in the target directory.
    #[error("{}: already holds a pack or an interrupted write (use resume)", path.display())]
    AlreadyExists {
        /// The file that exists.
        path: PathBuf,
    },
    /// `PackWriter::resume` found no journal to resume from.
    #[error("{}: no journal to resume from", path.display())]
    NoJournal {
        /// The journal path that is missing.
        path: PathBuf,
    },
}

impl FormatError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| FormatError::Io { path, source }
    }
}
