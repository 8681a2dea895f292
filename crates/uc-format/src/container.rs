//! Containers: ordinary safetensors files, read through a memory map.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::View;
use safetensors::{Dtype, SafeTensors};

use crate::{FormatError, Result};

/// One named array to write into a container.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    /// Entry name (`model.layers.0.mlp.up_proj.weight.codes`).
    pub name: String,
    /// Element dtype.
    pub dtype: Dtype,
    /// Shape; `data.len()` must equal the element count times the dtype size.
    pub shape: Vec<usize>,
    /// Raw little-endian element bytes.
    pub data: Vec<u8>,
}

impl View for &Entry {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// A borrowed view of one entry of an open [`Container`].
#[derive(Clone, Copy, Debug)]
pub struct EntryRef<'a> {
    /// Element dtype as declared in the header.
    pub dtype: Dtype,
    /// Shape as declared in the header (consistent with `data.len()`; checked at open).
    pub shape: &'a [usize],
    /// Raw bytes of the entry.
    pub data: &'a [u8],
}

/// Bytes backing a container: a read-only map of the file, or owned bytes (fuzzing).
enum Backing {
    Map(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Backing {
    fn bytes(&self) -> &[u8] {
        match self {
            Backing::Map(m) => m,
            Backing::Owned(v) => v,
        }
    }
}

/// One entry's header record: dtype, shape and absolute byte range in the backing.
struct Slot {
    dtype: Dtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// An open, header-validated safetensors container.
pub struct Container {
    path: PathBuf,
    backing: Backing,
    /// Entries by name (sorted, so listings are deterministic).
    slots: BTreeMap<String, Slot>,
}

impl std::fmt::Debug for Container {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Container")
            .field("path", &self.path)
            .field("entries", &self.names())
            .finish()
    }
}

impl Container {
    /// Maps `path` and validates its header: offsets contiguous, every entry's size
    /// consistent with dtype x shape, data section ending exactly at the end of the file
    /// (trailing bytes are an error).
    pub fn open(path: &Path) -> Result<Container> {
        let file = std::fs::File::open(path).map_err(FormatError::io(path))?;
        // SAFETY: the map is read-only and private to this process. A concurrent writer
        // truncating the file could fault the process (SIGBUS); packs are written via
        // temp file + rename, so a completed container is never modified in place.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(FormatError::io(path))?;
        Self::from_backing(path.to_path_buf(), Backing::Map(map))
    }

    /// Parses container bytes held in memory; `label` names them in errors.
    pub fn from_bytes(label: &Path, bytes: Vec<u8>) -> Result<Container> {
        Self::from_backing(label.to_path_buf(), Backing::Owned(bytes))
    }

    fn from_backing(path: PathBuf, backing: Backing) -> Result<Container> {
        let bad = |reason: String| FormatError::Container {
            path: path.clone(),
            reason,
        };
        let (n, meta) =
            SafeTensors::read_metadata(backing.bytes()).map_err(|e| bad(e.to_string()))?;
        // read_metadata checked 8 + n + data_len == file length, so these cannot overflow;
        // checked anyway because the bound lives in another crate.
        let data_start = n
            .checked_add(8)
            .ok_or_else(|| bad("header length overflows".into()))?;
        let mut slots = BTreeMap::new();
        for (name, info) in meta.tensors() {
            let (s, e) = info.data_offsets;
            let (start, end) = match (data_start.checked_add(s), data_start.checked_add(e)) {
                (Some(a), Some(b)) if a <= b && b <= backing.bytes().len() => (a, b),
                _ => return Err(bad(format!("entry {name:?} lies outside the file"))),
            };
            slots.insert(
                name,
                Slot {
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    start,
                    end,
                },
            );
        }
        Ok(Container {
            path,
            backing,
            slots,
        })
    }

    /// The container's path (or label).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Entry names, sorted.
    pub fn names(&self) -> Vec<&str> {
        self.slots.keys().map(String::as_str).collect()
    }

    /// The entry `name`, if present.
    pub fn get(&self, name: &str) -> Option<EntryRef<'_>> {
        let slot = self.slots.get(name)?;
        let data = self.backing.bytes().get(slot.start..slot.end)?;
        Some(EntryRef {
            dtype: slot.dtype,
            shape: &slot.shape,
            data,
        })
    }

    /// The entry `name`, or [`FormatError::MissingEntry`].
    pub fn entry(&self, name: &str) -> Result<EntryRef<'_>> {
        self.get(name).ok_or_else(|| FormatError::MissingEntry {
            path: self.path.clone(),
            entry: name.into(),
        })
    }
    /// Drops the pages of entry `name` from the resident set (a mapped container; owned
    /// bytes stay): for a reader that is done with it, e.g. `uc verify` after checking a
    /// tensor, so walking a pack larger than memory keeps only the entries in use
    /// resident. A later read maps the same bytes in again. Unknown names are ignored.
    pub fn release(&self, name: &str) {
        if let (Backing::Map(map), Some(slot)) = (&self.backing, self.slots.get(name)) {
            release_pages(map, slot.start..slot.end);
        }
    }
}

/// Drops the mapped pages of `range` of a read-only file map from the resident set once
/// its bytes have been used: without it every page read stays mapped and counts in RSS
/// until the map is closed. Advisory; failures are ignored. (Shared by the checkpoint
/// reader in uc-model and [`Container::release`].)
pub fn release_pages(map: &memmap2::Mmap, range: std::ops::Range<usize>) {
    #[cfg(unix)]
    // SAFETY: the mapping is read-only and file-backed and never written through, so
    // MADV_DONTNEED only discards clean pages; a later read faults them in again from the
    // file with the same contents (also for the neighbouring bytes of a page that `range`
    // only partly covers). memmap2 aligns the range to whole pages.
    unsafe {
        let _ = map.unchecked_advise_range(
            memmap2::UncheckedAdvice::DontNeed,
            range.start,
            range.len(),
        );
    }
    #[cfg(not(unix))]
    let _ = (map, range);
}

/// Writes `entries` as a safetensors file at `path` (sorted by dtype alignment then
/// name by the safetensors writer, header padded: the same entries give the same bytes).
pub(crate) fn write_entries(path: &Path, entries: &[Entry]) -> Result<()> {
    let items = entries.iter().map(|e| (e.name.as_str(), e));
    safetensors::serialize_to_file(items, None, path).map_err(|e| match e {
        safetensors::SafeTensorError::IoError(source) => FormatError::Io {
            path: path.into(),
            source,
        },
        other => FormatError::Container {
            path: path.into(),
            reason: other.to_string(),
        },
    })
}
