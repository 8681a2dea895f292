//! Reading a pack: [`Pack::open`] and file-level verification.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::manifest::{
    bpw, fingerprint, parse_versioned_json, read_bounded_json, FileEntry, Manifest, TensorRecord,
};
use crate::{
    sha256_file, Container, FormatError, Result, JOURNAL_FILE, MANIFEST_FILE, TENSORS_DIR,
};

/// One verification failure, naming the file or tensor at fault.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    /// Pack path of the file, or the tensor name, or `manifest.json`.
    pub subject: String,
    /// What is wrong, with expected and found values.
    pub problem: String,
}

impl Finding {
    /// Shorthand constructor.
    pub fn new(subject: impl Into<String>, problem: impl Into<String>) -> Self {
        Finding {
            subject: subject.into(),
            problem: problem.into(),
        }
    }
}

/// The outcome of hashing one listed file.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct FileCheck {
    /// Pack path.
    pub path: String,
    /// Bytes read (0 when the file could not be read).
    pub size: u64,
    /// SHA-256 of the bytes read (empty when the file could not be read).
    pub sha256: String,
    /// Size and SHA-256 both match the manifest.
    pub ok: bool,
}

/// Result of [`Pack::verify_files`].
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct FilesReport {
    /// Every listed file, in manifest order.
    pub files: Vec<FileCheck>,
    /// Every problem found (empty = pass).
    pub failures: Vec<Finding>,
}

/// An open pack: parsed manifest plus lazily mapped containers.
pub struct Pack {
    dir: PathBuf,
    manifest: Manifest,
    /// [`fingerprint`] recomputed from the manifest bytes on disk.
    content_fingerprint: String,
    /// Tensor name -> index into `manifest.tensors`.
    by_name: HashMap<String, usize>,
    /// Containers mapped so far, by pack path.
    containers: Mutex<HashMap<String, Arc<Container>>>,
}

impl std::fmt::Debug for Pack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pack")
            .field("dir", &self.dir)
            .field("fingerprint", &self.manifest.fingerprint)
            .finish()
    }
}

/// Checks that `path` is a canonical pack path: `NAME` or `tensors/NAME`, where NAME is
/// made of `[A-Za-z0-9._-]` and does not start with a dot. This keeps an untrusted
/// manifest from naming files outside the pack and keeps fingerprint lines unambiguous.
pub(crate) fn check_pack_path(path: &str) -> Result<()> {
    let ok_name = |n: &str| {
        !n.is_empty()
            && !n.starts_with('.')
            && n.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    };
    let ok = match path.split_once('/') {
        None => ok_name(path) && path != MANIFEST_FILE,
        Some((dir, name)) => dir == TENSORS_DIR && ok_name(name),
    };
    if ok {
        Ok(())
    } else {
        Err(FormatError::UnsafePath { path: path.into() })
    }
}

impl Pack {
    /// Opens the pack in `dir`: reads `manifest.json` (at most [`crate::MAX_JSON_BYTES`]),
    /// refuses newer format versions, unsafe paths and duplicate file or tensor names.
    pub fn open(dir: impl AsRef<Path>) -> Result<Pack> {
        let dir = dir.as_ref().to_path_buf();
        let mpath = dir.join(MANIFEST_FILE);
        let bytes = read_bounded_json(&mpath)?;
        let manifest: Manifest = parse_versioned_json(&mpath, &bytes)?;
        // The fingerprint is over the manifest as written, unknown fields included, so
        // it is computed from the raw JSON rather than from the typed struct.
        let raw: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|source| FormatError::Json {
                path: mpath.clone(),
                source,
            })?;
        let content_fingerprint = fingerprint(&raw);
        let mut paths = BTreeSet::new();
        for f in &manifest.files {
            check_pack_path(&f.path)?;
            if !paths.insert(f.path.as_str()) {
                return Err(FormatError::Duplicate {
                    name: f.path.clone(),
                });
            }
        }
        let mut by_name = HashMap::with_capacity(manifest.tensors.len());
        for (i, t) in manifest.tensors.iter().enumerate() {
            check_pack_path(&t.file)?;
            if by_name.insert(t.name.clone(), i).is_some() {
                return Err(FormatError::Duplicate {
                    name: t.name.clone(),
                });
            }
        }
        Ok(Pack {
            dir,
            manifest,
            content_fingerprint,
            by_name,
            containers: Mutex::new(HashMap::new()),
        })
    }

    /// The pack directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The parsed manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The manifest record of tensor `name`.
    pub fn tensor(&self, name: &str) -> Result<&TensorRecord> {
        self.by_name
            .get(name)
            .and_then(|&i| self.manifest.tensors.get(i))
            .ok_or_else(|| FormatError::UnknownTensor { name: name.into() })
    }

    /// The container at pack path `file` (mapped on first use, then shared). Only paths
    /// listed in the manifest's `files` are opened.
    pub fn container(&self, file: &str) -> Result<Arc<Container>> {
        if !self.manifest.files.iter().any(|f| f.path == file) {
            return Err(FormatError::UnsafePath { path: file.into() });
        }
        // A poisoned lock only means another thread panicked mid-insert; the map is
        // still a valid cache.
        let mut cache = self.containers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = cache.get(file) {
            return Ok(c.clone());
        }
        let c = Arc::new(Container::open(&self.dir.join(file))?);
        cache.insert(file.into(), c.clone());
        Ok(c)
    }

    /// Checks the manifest against itself: fingerprint, bits-per-weight totals, every
    /// tensor's container listed under `tensors/`, shapes without overflow.
    pub fn check_manifest(&self) -> Vec<Finding> {
        let m = &self.manifest;
        let mut out = Vec::new();
        if self.content_fingerprint != m.fingerprint {
            out.push(Finding::new(
                MANIFEST_FILE,
                format!(
                    "fingerprint {} does not match the manifest's content ({}): a field \
                     was edited after the pack was written",
                    m.fingerprint, self.content_fingerprint
                ),
            ));
        }
        let (body, model) = bpw(&m.tensors);
        if body != m.bpw_body || model != m.bpw_model {
            out.push(Finding::new(
                MANIFEST_FILE,
                format!(
                    "bpw_body/bpw_model {}/{} do not match tensor records ({body}/{model})",
                    m.bpw_body, m.bpw_model
                ),
            ));
        }
        for t in &m.tensors {
            if !t.file.starts_with("tensors/") || !m.files.iter().any(|f| f.path == t.file) {
                out.push(Finding::new(
                    &t.name,
                    format!("container {:?} is not a listed tensors/ file", t.file),
                ));
            }
            if t.elements().is_none() {
                out.push(Finding::new(
                    &t.name,
                    format!("shape {:?} overflows", t.shape),
                ));
            }
        }
        out
    }

    /// Hashes one listed file and compares size and SHA-256 with the manifest.
    pub fn check_file(&self, entry: &FileEntry) -> (FileCheck, Option<Finding>) {
        match sha256_file(&self.dir.join(&entry.path)) {
            Err(e) => (
                FileCheck {
                    path: entry.path.clone(),
                    size: 0,
                    sha256: String::new(),
                    ok: false,
                },
                Some(Finding::new(&entry.path, e.to_string())),
            ),
            Ok((size, sha)) => {
                let problem = if size != entry.size {
                    Some(format!("size {size} bytes, manifest says {}", entry.size))
                } else if sha != entry.sha256 {
                    Some(format!("sha256 {sha}, manifest says {}", entry.sha256))
                } else {
                    None
                };
                let check = FileCheck {
                    path: entry.path.clone(),
                    size,
                    ok: problem.is_none(),
                    sha256: sha,
                };
                (check, problem.map(|p| Finding::new(&entry.path, p)))
            }
        }
    }

    /// Files present in the pack root or `tensors/` that the manifest does not list
    /// (`manifest.json` excepted); a leftover journal means an unfinished write.
    pub fn unlisted_files(&self) -> Vec<Finding> {
        let listed: BTreeSet<&str> = self
            .manifest
            .files
            .iter()
            .map(|f| f.path.as_str())
            .collect();
        let mut out = Vec::new();
        let mut scan = |rel: &str, abs: &Path| match std::fs::read_dir(abs) {
            Err(e) => out.push(Finding::new(rel, format!("cannot list directory: {e}"))),
            Ok(rd) => {
                let mut names: Vec<String> = rd
                    .filter_map(|d| d.ok())
                    .map(|d| d.file_name().to_string_lossy().into_owned())
                    .collect();
                names.sort();
                for name in names {
                    let path = if rel.is_empty() {
                        name.clone()
                    } else {
                        format!("{rel}/{name}")
                    };
                    let skip = rel.is_empty() && (name == MANIFEST_FILE || name == TENSORS_DIR);
                    if !skip && !listed.contains(path.as_str()) {
                        let why = if name == JOURNAL_FILE {
                            "journal of an unfinished write"
                        } else {
                            "file not listed in the manifest"
                        };
                        out.push(Finding::new(path, why));
                    }
                }
            }
        };
        scan("", &self.dir);
        scan(TENSORS_DIR, &self.dir.join(TENSORS_DIR));
        out
    }

    /// File-level verification: manifest consistency, every listed file present with the
    /// recorded size and SHA-256, and no unlisted files.
    pub fn verify_files(&self) -> FilesReport {
        let mut report = FilesReport {
            failures: self.check_manifest(),
            ..Default::default()
        };
        for f in &self.manifest.files {
            let (check, finding) = self.check_file(f);
            report.files.push(check);
            report.failures.extend(finding);
        }
        report.failures.extend(self.unlisted_files());
        report
    }
}
