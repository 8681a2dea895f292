//! The uc *pack* as bytes: manifest schema, container I/O, SHA-256 and file-level
//! verification. This crate knows no math; `uc-codec` gives meaning to the entries.
//!
//! A pack is a directory (see `docs/format.md` for the normative description):
//!
//! ```text
//! PACK/manifest.json                  Manifest: files + tensors + provenance (written last)
//! PACK/config.json, tokenizer.json    copied from the source checkpoint
//! PACK/tensors/globals.safetensors    embeddings, head, final norm
//! PACK/tensors/block_0000.safetensors one container per transformer block
//! ```
//!
//! Data flow when writing: [`ContainerBuilder`] collects [`Entry`]s and their
//! [`TensorRecord`]s -> [`PackWriter::write_container`] (temp file, fsync, rename, hash,
//! journal `.progress.json`) -> [`PackWriter::finish`] writes `manifest.json`.
//! When reading: [`Pack::open`] (bounded manifest read, version check, path checks) ->
//! [`Pack::container`] (mmap + safetensors header parse) -> [`Container::entry`];
//! [`Pack::verify_files`] re-hashes every listed file and checks the manifest's own
//! consistency, reporting each problem as a [`Finding`] that names the file or tensor.

#![deny(missing_docs)]

mod container;
mod error;
mod hash;
mod manifest;
pub mod memory;
mod pack;
pub mod rng;
mod writer;

pub use container::{release_pages, Container, Entry, EntryRef};
pub use error::FormatError;
pub use hash::{sha256_file, sha256_hex, Sha256};
pub use manifest::{
    bpw, fingerprint, CodecRecord, DenseDtype, Encoding, FileEntry, Manifest, Role, ScaleDtype,
    SourceFile, SourceInfo, TensorRecord, ToolInfo, FORMAT_VERSION,
};
pub use pack::{FileCheck, FilesReport, Finding, Pack};
pub use rng::SplitMix64;
pub use safetensors::Dtype;
pub use writer::{block_container, ContainerBuilder, PackWriter, GLOBALS_CONTAINER};

/// File name of the manifest at the pack root.
pub const MANIFEST_FILE: &str = "manifest.json";
/// File name of the writer's crash-recovery journal at the pack root.
pub const JOURNAL_FILE: &str = ".progress.json";
/// Directory (relative to the pack root) holding the tensor containers.
pub const TENSORS_DIR: &str = "tensors";
/// Largest manifest or journal this crate will read; bounds the allocation made from an
/// untrusted file (a 70B-parameter model's manifest is a few MiB).
pub const MAX_JSON_BYTES: u64 = 64 << 20;

/// Result alias for this crate.
pub type Result<T, E = FormatError> = std::result::Result<T, E>;
