//! Writing a pack: atomic file writes, a crash journal, and the manifest last.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::container::write_entries;
use crate::manifest::{
    bpw, fingerprint, read_versioned_json, FileEntry, Manifest, SourceInfo, TensorRecord, ToolInfo,
};
use crate::pack::check_pack_path;
use crate::{
    sha256_file, Entry, FormatError, Result, FORMAT_VERSION, JOURNAL_FILE, MANIFEST_FILE,
    TENSORS_DIR,
};

/// File name of the container holding embeddings, head and final norm.
pub const GLOBALS_CONTAINER: &str = "globals.safetensors";

/// File name of transformer block `i`'s container (`block_0007.safetensors`).
pub fn block_container(i: usize) -> String {
    format!("block_{i:04}.safetensors")
}

/// The entries and tensor records of one container, before it is written.
#[derive(Debug)]
pub struct ContainerBuilder {
    path: String,
    entries: Vec<Entry>,
    records: Vec<TensorRecord>,
}

impl ContainerBuilder {
    /// A builder for container `file_name` (e.g. [`block_container`]`(3)`), stored at
    /// `tensors/<file_name>`.
    pub fn new(file_name: &str) -> Result<Self> {
        let path = format!("{TENSORS_DIR}/{file_name}");
        check_pack_path(&path)?;
        Ok(ContainerBuilder {
            path,
            entries: Vec::new(),
            records: Vec::new(),
        })
    }

    /// Pack path of the container (`tensors/block_0003.safetensors`).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Adds one tensor: its entries and its manifest record (whose `file` is set here).
    /// Refuses an entry or tensor name already present.
    pub fn push(&mut self, entries: Vec<Entry>, mut record: TensorRecord) -> Result<()> {
        let dup = |name: &str| FormatError::Duplicate { name: name.into() };
        if self.records.iter().any(|r| r.name == record.name) {
            return Err(dup(&record.name));
        }
        for (i, e) in entries.iter().enumerate() {
            if self
                .entries
                .iter()
                .chain(entries.iter().take(i))
                .any(|x| x.name == e.name)
            {
                return Err(dup(&e.name));
            }
        }
        record.file = self.path.clone();
        self.entries.extend(entries);
        self.records.push(record);
        Ok(())
    }
}

/// The crash journal `.progress.json`: everything `finish` needs, saved after every
/// completed file so `resume` can continue.
#[derive(Serialize, Deserialize, Clone, Debug)]
struct Journal {
    format_version: u64,
    tool: ToolInfo,
    source: SourceInfo,
    #[serde(default)]
    calibration: Option<Value>,
    /// Completed files, each already renamed into place.
    files: Vec<FileEntry>,
    /// Tensor records of completed containers.
    tensors: Vec<TensorRecord>,
}

/// Writes a pack into a directory, one container at a time.
#[derive(Debug)]
pub struct PackWriter {
    dir: PathBuf,
    journal: Journal,
    dropped: Vec<String>,
}

/// Writes `bytes` to `path` atomically: temp file in the same directory, fsync, rename,
/// fsync of the directory (so the rename itself survives a crash).
fn atomic_write<T>(path: &Path, write: impl FnOnce(&Path) -> Result<T>) -> Result<T> {
    let tmp = path.with_extension("tmp");
    let out = write(&tmp)?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(FormatError::io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(FormatError::io(path))?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))?;
    Ok(out)
}

fn sync_dir(dir: &Path) -> Result<()> {
    // Directory fsync is how POSIX persists a rename; other platforms do not need it.
    #[cfg(unix)]
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(FormatError::io(dir))?;
    let _ = dir;
    Ok(())
}

fn write_bytes(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::File::create(path)
        .and_then(|mut f| f.write_all(bytes))
        .map_err(FormatError::io(path))
}

impl PackWriter {
    /// Starts a new pack in `dir` (created if missing). Fails if `dir` already holds a
    /// manifest or a journal.
    pub fn create(dir: impl AsRef<Path>, source: SourceInfo) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        for name in [MANIFEST_FILE, JOURNAL_FILE] {
            let p = dir.join(name);
            if p.exists() {
                return Err(FormatError::AlreadyExists { path: p });
            }
        }
        let tensors = dir.join(TENSORS_DIR);
        std::fs::create_dir_all(&tensors).map_err(FormatError::io(&tensors))?;
        let journal = Journal {
            format_version: FORMAT_VERSION,
            tool: ToolInfo::this(),
            source,
            calibration: None,
            files: Vec::new(),
            tensors: Vec::new(),
        };
        let w = PackWriter {
            dir,
            journal,
            dropped: Vec::new(),
        };
        w.save_journal()?;
        Ok(w)
    }

    /// Continues an interrupted write in `dir`: reloads the journal, re-hashes every
    /// completed file and forgets (and deletes) those that no longer match, so the caller
    /// rewrites them; removes leftover temp files.
    pub fn resume(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let jpath = dir.join(JOURNAL_FILE);
        if !jpath.exists() {
            return Err(FormatError::NoJournal { path: jpath });
        }
        let mut journal: Journal = read_versioned_json(&jpath)?;
        let mut dropped = Vec::new();
        let mut kept = Vec::new();
        for f in std::mem::take(&mut journal.files) {
            check_pack_path(&f.path)?;
            let p = dir.join(&f.path);
            match sha256_file(&p) {
                Ok((size, sha)) if size == f.size && sha == f.sha256 => kept.push(f),
                _ => {
                    let _ = std::fs::remove_file(&p);
                    dropped.push(f.path);
                }
            }
        }
        journal.files = kept;
        journal.tensors.retain(|t| !dropped.contains(&t.file));
        for sub in [dir.clone(), dir.join(TENSORS_DIR)] {
            if let Ok(rd) = std::fs::read_dir(&sub) {
                for d in rd.filter_map(|d| d.ok()) {
                    if d.path().extension().is_some_and(|e| e == "tmp") {
                        let _ = std::fs::remove_file(d.path());
                    }
                }
            }
        }
        let w = PackWriter {
            dir,
            journal,
            dropped,
        };
        w.save_journal()?;
        Ok(w)
    }

    /// Pack paths that `resume` found corrupt or missing and discarded.
    pub fn dropped_on_resume(&self) -> &[String] {
        &self.dropped
    }

    /// Whether pack path `path` (`config.json`, `tensors/block_0002.safetensors`) is
    /// already complete; a resumed compressor skips those.
    pub fn is_complete(&self, path: &str) -> bool {
        self.journal.files.iter().any(|f| f.path == path)
    }

    /// Sets the free-form calibration record (persisted in the journal).
    pub fn set_calibration(&mut self, calibration: Value) -> Result<()> {
        self.journal.calibration = Some(calibration);
        self.save_journal()
    }

    /// Writes a root-level file (`config.json`) atomically and records it.
    pub fn write_file(&mut self, path: &str, bytes: &[u8]) -> Result<FileEntry> {
        check_pack_path(path)?;
        self.commit(path, |tmp| write_bytes(tmp, bytes), Vec::new())
    }

    /// Copies `src` into the pack as root-level file `path` (`tokenizer.json`).
    pub fn copy_file(&mut self, path: &str, src: &Path) -> Result<FileEntry> {
        check_pack_path(path)?;
        self.commit(
            path,
            |tmp| {
                std::fs::copy(src, tmp)
                    .map(drop)
                    .map_err(FormatError::io(src))
            },
            Vec::new(),
        )
    }

    /// Writes a container atomically, records its hash and tensor records, and updates
    /// the journal. Rewriting a container replaces its earlier records.
    pub fn write_container(&mut self, c: ContainerBuilder) -> Result<FileEntry> {
        let ContainerBuilder {
            path,
            entries,
            records,
        } = c;
        self.commit(&path, |tmp| write_entries(tmp, &entries), records)
    }

    fn commit(
        &mut self,
        path: &str,
        write: impl FnOnce(&Path) -> Result<()>,
        records: Vec<TensorRecord>,
    ) -> Result<FileEntry> {
        // Tensor names are unique across the pack, not only within one container.
        let others: BTreeSet<&str> = self
            .journal
            .tensors
            .iter()
            .filter(|t| t.file != path)
            .map(|t| t.name.as_str())
            .collect();
        if let Some(t) = records.iter().find(|t| others.contains(t.name.as_str())) {
            return Err(FormatError::Duplicate {
                name: t.name.clone(),
            });
        }
        let (size, sha256) = atomic_write(&self.dir.join(path), |tmp| {
            write(tmp)?;
            // Hash what landed on disk, not what we meant to write.
            sha256_file(tmp)
        })?;
        let entry = FileEntry {
            path: path.into(),
            size,
            sha256,
        };
        self.journal.files.retain(|f| f.path != path);
        self.journal.files.push(entry.clone());
        self.journal.tensors.retain(|t| t.file != path);
        self.journal.tensors.extend(records);
        self.save_journal()?;
        Ok(entry)
    }

    fn save_journal(&self) -> Result<()> {
        let bytes = serde_json::to_vec(&self.journal).map_err(|source| FormatError::Json {
            path: self.dir.join(JOURNAL_FILE),
            source,
        })?;
        atomic_write(&self.dir.join(JOURNAL_FILE), |tmp| write_bytes(tmp, &bytes))
    }

    /// Writes `manifest.json` atomically (files sorted by path, tensors by (file, name),
    /// bits-per-weight totals, fingerprint) and removes the journal.
    pub fn finish(self) -> Result<Manifest> {
        let Journal {
            tool,
            source,
            calibration,
            mut files,
            mut tensors,
            ..
        } = self.journal;
        files.sort_by(|a, b| a.path.as_bytes().cmp(b.path.as_bytes()));
        tensors.sort_by(|a, b| (&a.file, &a.name).cmp(&(&b.file, &b.name)));
        let (bpw_body, bpw_model) = bpw(&tensors);
        let mut manifest = Manifest {
            format_version: FORMAT_VERSION,
            tool,
            source,
            calibration,
            fingerprint: String::new(),
            files,
            tensors,
            bpw_body,
            bpw_model,
        };
        let mpath = self.dir.join(MANIFEST_FILE);
        let json_err = |source| FormatError::Json {
            path: mpath.clone(),
            source,
        };
        manifest.fingerprint = fingerprint(&serde_json::to_value(&manifest).map_err(json_err)?);
        let mut bytes =
            serde_json::to_vec_pretty(&manifest).map_err(|source| FormatError::Json {
                path: mpath.clone(),
                source,
            })?;
        bytes.push(b'\n');
        atomic_write(&mpath, |tmp| write_bytes(tmp, &bytes))?;
        let jpath = self.dir.join(JOURNAL_FILE);
        std::fs::remove_file(&jpath).map_err(FormatError::io(&jpath))?;
        sync_dir(&self.dir)?;
        Ok(manifest)
    }
}
