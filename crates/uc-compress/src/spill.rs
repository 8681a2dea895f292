//! Calibration hidden states on disk ([`crate::Options::spill_activations`]).
//!
//! A calibrated run carries two streams from block to block, the teacher's and the
//! quantized model's hidden states of every calibration window, `(n_seqs * seq_len,
//! hidden)` f32 each (256 MiB together for 64 x 256 tokens of a 2048-wide model). Spilled,
//! each lives in a file under `PACK/.spill/` instead: `block_0003.teacher.f32` and
//! `block_0003.student.f32` are the inputs of block 3, raw f32 in this machine's byte
//! order, row-major. A block reads them one chunk of windows at a time and writes its
//! outputs chunk by chunk to `block_0004.*.f32.tmp`, renamed to `block_0004.*.f32` once
//! complete (so a file under its final name is always whole); then block 3's files are
//! deleted. The values are the ones the in-memory run holds, bit for bit: files change
//! where numbers live, never what they are.
//!
//! Lifetime: the directory is removed when the streams are done (before the pack's
//! manifest is written, since `uc verify` refuses unlisted files) and, best effort, when
//! a run stops on an error. A run killed outright (SIGKILL, power) leaves it behind; the
//! next run on the same pack directory deletes it at its start and, like every resumed
//! run, recomputes the streams through the completed blocks: the spill files are never
//! trusted across runs, so a resumed pack is byte-identical to an uninterrupted one.

use crate::{CompressError, Result};
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The spill directory inside a pack directory.
pub const SPILL_DIR: &str = ".spill";

/// A spill I/O error naming the file.
fn err(path: &Path) -> impl FnOnce(std::io::Error) -> CompressError + '_ {
    move |source| CompressError::Spill {
        path: path.to_path_buf(),
        source,
    }
}

/// Deletes a spill directory left in `pack` by a killed run (nothing if there is none).
pub fn remove_stale(pack: &Path) -> Result<()> {
    let dir = pack.join(SPILL_DIR);
    match std::fs::remove_dir_all(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(err(&dir)(e)),
        _ => Ok(()),
    }
}

/// `PACK/.spill` while a run uses it; removed by [`SpillDir::remove`] or, best effort,
/// when dropped (a run that stops on an error).
pub struct SpillDir {
    dir: PathBuf,
    removed: bool,
}

impl SpillDir {
    /// Creates `pack/.spill` (empty: a stale one is removed first).
    pub fn create(pack: &Path) -> Result<Self> {
        remove_stale(pack)?;
        let dir = pack.join(SPILL_DIR);
        std::fs::create_dir_all(&dir).map_err(err(&dir))?;
        Ok(SpillDir {
            dir,
            removed: false,
        })
    }

    /// The file of stream `stream` (`teacher`, `student`) entering block `layer`.
    pub fn path(&self, layer: usize, stream: &str) -> PathBuf {
        self.dir.join(format!("block_{layer:04}.{stream}.f32"))
    }

    /// Removes the directory and everything in it.
    pub fn remove(mut self) -> Result<()> {
        self.removed = true;
        std::fs::remove_dir_all(&self.dir).map_err(err(&self.dir))
    }
}

impl Drop for SpillDir {
    fn drop(&mut self) {
        if !self.removed {
            // Best effort on an error path: the error being returned matters more, and
            // the next run on this pack deletes what is left ([`remove_stale`]).
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// One stream's hidden states in a file: `values` f32, read back chunk by chunk.
pub struct Spilled {
    path: PathBuf,
    file: File,
    values: usize,
}

impl Spilled {
    /// Total values in the file.
    pub fn len(&self) -> usize {
        self.values
    }

    /// Values `[start, start + len)`, clipped to the file's end.
    pub fn read(&mut self, start: usize, len: usize) -> Result<Vec<f32>> {
        let len = len.min(self.values.saturating_sub(start));
        let mut x = vec![0f32; len];
        self.file
            .seek(SeekFrom::Start((start * 4) as u64))
            .and_then(|_| self.file.read_exact(bytemuck::cast_slice_mut(&mut x[..])))
            .map_err(err(&self.path))?;
        Ok(x)
    }

    /// Deletes the file.
    pub fn remove(self) -> Result<()> {
        let Spilled { path, file, .. } = self;
        drop(file);
        std::fs::remove_file(&path).map_err(err(&path))
    }
}

/// Writes a stream's values chunk by chunk to `PATH.tmp`; [`SpillWriter::commit`] renames
/// it to `PATH`.
pub struct SpillWriter {
    path: PathBuf,
    tmp: PathBuf,
    out: BufWriter<File>,
    values: usize,
}

impl SpillWriter {
    /// Starts `path` (through `path.tmp`).
    pub fn create(path: PathBuf) -> Result<Self> {
        let mut tmp = path.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let file = File::create(&tmp).map_err(err(&tmp))?;
        Ok(SpillWriter {
            path,
            tmp,
            out: BufWriter::with_capacity(1 << 20, file),
            values: 0,
        })
    }

    /// Appends `x`.
    pub fn push(&mut self, x: &[f32]) -> Result<()> {
        self.out
            .write_all(bytemuck::cast_slice(x))
            .map_err(err(&self.tmp))?;
        self.values += x.len();
        Ok(())
    }

    /// Flushes, renames the file to its final name and opens it for reading. (No fsync:
    /// the files are never read by another run, see the module docs.)
    pub fn commit(self) -> Result<Spilled> {
        let SpillWriter {
            path,
            tmp,
            out,
            values,
        } = self;
        out.into_inner().map_err(|e| err(&tmp)(e.into_error()))?;
        std::fs::rename(&tmp, &path).map_err(err(&path))?;
        let file = File::open(&path).map_err(err(&path))?;
        Ok(Spilled { path, file, values })
    }
}

/// `x` written whole to `path` (through `path.tmp`) and opened for reading.
pub fn spill(path: PathBuf, x: &[f32]) -> Result<Spilled> {
    let mut w = SpillWriter::create(path)?;
    w.push(x)?;
    w.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_come_back_bit_for_bit_and_the_directory_goes() {
        let d = tempfile::tempdir().unwrap();
        let dir = SpillDir::create(d.path()).unwrap();
        let x: Vec<f32> = (0..1000)
            .map(|i| f32::from_bits(0x3f80_0000 ^ (i * 2654435761u32)))
            .collect();
        let mut w = SpillWriter::create(dir.path(1, "teacher")).unwrap();
        for c in x.chunks(300) {
            w.push(c).unwrap();
        }
        assert!(
            !dir.path(1, "teacher").exists(),
            "visible only once committed"
        );
        let mut s = w.commit().unwrap();
        assert_eq!(s.len(), 1000);
        let back: Vec<u32> = (0..4)
            .flat_map(|k| s.read(k * 300, 300).unwrap())
            .map(f32::to_bits)
            .collect();
        assert_eq!(back, x.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
        s.remove().unwrap();
        let _stale = spill(dir.path(2, "student"), &x).unwrap();
        dir.remove().unwrap();
        assert!(!d.path().join(SPILL_DIR).exists());
        // A killed run's directory is removed by the next run's start.
        std::fs::create_dir_all(d.path().join(SPILL_DIR)).unwrap();
        std::fs::write(
            d.path().join(SPILL_DIR).join("block_0001.teacher.f32"),
            b"x",
        )
        .unwrap();
        remove_stale(d.path()).unwrap();
        assert!(!d.path().join(SPILL_DIR).exists());
    }

    #[test]
    fn a_short_file_is_an_error_naming_it() {
        let d = tempfile::tempdir().unwrap();
        let dir = SpillDir::create(d.path()).unwrap();
        let mut s = spill(dir.path(0, "teacher"), &[1.0; 10]).unwrap();
        std::fs::write(dir.path(0, "teacher"), [0u8; 8]).unwrap();
        let e = s.read(0, 10).unwrap_err().to_string();
        assert!(e.contains("block_0000.teacher.f32"), "{e}");
    }
}
