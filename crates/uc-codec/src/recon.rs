//! Reconstruction: QuantTensor -> f32 (rows, cols), bit-exact per `docs/format.md`.
//!
//! For each (i, j): s = f32(scale[i][j / group]); q = codebook[code(i, j)];
//! base = s * q; with an overlay, acc = +0.0, then for k = 0..r in order
//! acc = acc + f32(A[i][k]) * f32(B[k][j]) (product rounded, then sum rounded: no FMA);
//! w = base + acc. Every output element sees the same rounding sequence, so kernels
//! that vectorize across j and any split of rows across threads give identical bits.

use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::tensor::{bf16_to_f32, code_at, scale_to_f32};
use crate::{simd, CodecError, QuantTensor, Result};

/// Environment variable that, set to `1`, makes [`Kernel::select`] choose the scalar
/// reference.
pub const FORCE_SCALAR_ENV: &str = "UC_FORCE_SCALAR";

/// A reconstruction kernel. All produce identical bits; they differ only in speed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kernel {
    /// Portable reference (the specification in code).
    Scalar,
    /// x86-64 AVX2, 8 outputs per step.
    Avx2,
    /// x86-64 AVX-512 F+BW, 16 outputs per step.
    Avx512,
    /// AArch64 NEON, 4 outputs per step.
    Neon,
}

impl Kernel {
    /// Every kernel, best last.
    pub const ALL: [Kernel; 4] = [Kernel::Scalar, Kernel::Neon, Kernel::Avx2, Kernel::Avx512];

    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Scalar => "scalar",
            Kernel::Avx2 => "avx2",
            Kernel::Avx512 => "avx512",
            Kernel::Neon => "neon",
        }
    }

    /// Whether this CPU can run the kernel (runtime detection).
    pub fn is_available(self) -> bool {
        simd::available(self)
    }

    /// The kernels this CPU can run, best last.
    pub fn available() -> Vec<Kernel> {
        Self::ALL.into_iter().filter(|k| k.is_available()).collect()
    }

    /// The fastest available kernel, or the scalar reference when `force_scalar` is set
    /// or the environment has `UC_FORCE_SCALAR=1`.
    pub fn select(force_scalar: bool) -> Kernel {
        if force_scalar || std::env::var(FORCE_SCALAR_ENV).is_ok_and(|v| v == "1") {
            return Kernel::Scalar;
        }
        Self::available().last().copied().unwrap_or(Kernel::Scalar)
    }
}

/// A validated tensor with its small per-tensor tables expanded to f32, ready to
/// reconstruct any rows. Kernels index these buffers freely: `new` checked every length.
pub(crate) struct Prepared<'a> {
    /// The tensor as the kernels read it: a trellis tensor expanded to its plain codec
    /// ([`crate::trellis::expand`]), any other borrowed.
    pub qt: std::borrow::Cow<'a, QuantTensor>,
    pub cols: usize,
    pub group: usize,
    pub bits: usize,
    pub row_bytes: usize,
    pub n_groups: usize,
    pub rank: usize,
    /// Codebook padded to 256 entries, so any byte-sized index is in bounds.
    pub codebook: [f32; 256],
    /// (rows, n_groups) scales as f32.
    pub scales: Vec<f32>,
    /// (rows, rank) overlay A as f32.
    pub a: Vec<f32>,
    /// (rank, cols) overlay B as f32.
    pub b: Vec<f32>,
}

impl Prepared<'_> {
    /// Reference value of element (i, j): the specification, one element at a time.
    #[inline]
    pub fn element(&self, i: usize, j: usize) -> f32 {
        let row = &self.qt.codes[i * self.row_bytes..(i + 1) * self.row_bytes];
        let s = self.scales[i * self.n_groups + j / self.group];
        let q = self.codebook[usize::from(code_at(row, j, self.bits as u32))];
        let base = s * q;
        if self.rank == 0 {
            return base;
        }
        let mut acc = 0.0f32;
        for k in 0..self.rank {
            acc += self.a[i * self.rank + k] * self.b[k * self.cols + j];
        }
        base + acc
    }
}

/// Reconstructs a validated tensor with a chosen kernel, whole or in row ranges.
pub struct Reconstructor<'a> {
    p: Prepared<'a>,
    kernel: Kernel,
}

impl<'a> Reconstructor<'a> {
    /// Validates `qt` and prepares its tables. An unavailable `kernel` falls back to the
    /// scalar reference (identical bits, only slower).
    pub fn new(qt: &'a QuantTensor, kernel: Kernel) -> Result<Self> {
        qt.validate()?;
        let qt = if qt.spec.trellis {
            std::borrow::Cow::Owned(crate::trellis::expand(qt)?)
        } else {
            std::borrow::Cow::Borrowed(qt)
        };
        let l = qt.validate()?;
        let mut codebook = [0f32; 256];
        codebook
            .iter_mut()
            .zip(&qt.codebook)
            .for_each(|(d, s)| *d = *s);
        let dt = qt.spec.scale_dtype;
        let (a, b) = match &qt.overlay {
            Some(o) => (
                o.a.iter().map(|&x| bf16_to_f32(x)).collect(),
                o.b.iter().map(|&x| bf16_to_f32(x)).collect(),
            ),
            None => (Vec::new(), Vec::new()),
        };
        let (bits, rank, group) = (
            qt.spec.bits.into(),
            qt.spec.rank as usize,
            qt.spec.group as usize,
        );
        let scales = qt.scales.iter().map(|&s| scale_to_f32(s, dt)).collect();
        let p = Prepared {
            qt,
            cols: l.cols,
            group,
            bits,
            row_bytes: l.row_bytes,
            n_groups: l.n_groups,
            rank,
            codebook,
            scales,
            a,
            b,
        };
        let kernel = if kernel.is_available() {
            kernel
        } else {
            Kernel::Scalar
        };
        Ok(Reconstructor { p, kernel })
    }

    /// The kernel in use.
    pub fn kernel(&self) -> Kernel {
        self.kernel
    }

    /// Reconstructs rows `first_row ..` into `out` (whole rows: len a multiple of cols),
    /// rows in parallel on the current rayon pool.
    pub fn rows_into(&self, first_row: usize, out: &mut [f32]) -> Result<()> {
        let cols = self.p.cols;
        let n = out.len() / cols;
        if !out.len().is_multiple_of(cols)
            || first_row
                .checked_add(n)
                .is_none_or(|end| end > self.p.qt.rows)
        {
            return Err(CodecError::LengthMismatch {
                tensor: String::new(),
                what: "output rows",
                expected: (self.p.qt.rows.saturating_sub(first_row)) * cols,
                found: out.len(),
            });
        }
        out.par_chunks_mut(cols)
            .enumerate()
            .for_each(|(r, row)| simd::row(self.kernel, &self.p, first_row + r, row));
        Ok(())
    }

    /// The whole (rows, cols) tensor.
    pub fn all(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.p.qt.rows * self.p.cols];
        out.par_chunks_mut(self.p.cols)
            .enumerate()
            .for_each(|(i, row)| simd::row(self.kernel, &self.p, i, row));
        out
    }

    /// SHA-256 of the reconstruction as little-endian f32, streamed in ~256 KiB row
    /// chunks (never the whole tensor in memory); hashing of one chunk overlaps the
    /// reconstruction of the next. Fails on the first non-finite output value.
    pub fn digest(&self) -> Result<[u8; 32]> {
        let cols = self.p.cols;
        let rows = self.p.qt.rows;
        let chunk_rows = (65536 / cols).max(1);
        let mut hasher = Sha256::new();
        // Reconstructs the chunk starting at row `start` into `buf`, then checks it.
        let fill = |buf: &mut Vec<f32>, start: usize| -> Result<()> {
            buf.resize(chunk_rows.min(rows - start) * cols, 0.0);
            buf.par_chunks_mut(cols)
                .enumerate()
                .for_each(|(r, row)| simd::row(self.kernel, &self.p, start + r, row));
            // Branch-free OR over exponent bits (vectorizes); locate only on failure.
            const EXP: u32 = 0x7f80_0000;
            if buf
                .iter()
                .fold(0u32, |m, x| m | u32::from(x.to_bits() & EXP == EXP))
                == 0
            {
                return Ok(());
            }
            let k = buf.iter().position(|x| !x.is_finite()).unwrap_or(0);
            Err(CodecError::NonFiniteOutput {
                tensor: String::new(),
                row: start + k / cols,
                col: k % cols,
            })
        };
        let (mut cur, mut next) = (Vec::new(), Vec::new());
        fill(&mut cur, 0)?;
        let mut start = 0;
        while start < rows {
            let next_start = start + chunk_rows;
            if next_start < rows {
                let ((), filled) = rayon::join(
                    || update_le(&mut hasher, &cur),
                    || fill(&mut next, next_start),
                );
                filled?;
            } else {
                update_le(&mut hasher, &cur);
            }
            std::mem::swap(&mut cur, &mut next);
            start = next_start;
        }
        Ok(hasher.finalize().into())
    }
}

/// Feeds f32 values to a hasher as little-endian bytes.
pub(crate) fn update_le(h: &mut Sha256, v: &[f32]) {
    if cfg!(target_endian = "little") {
        h.update(bytemuck::cast_slice::<f32, u8>(v));
    } else {
        v.iter().for_each(|x| h.update(x.to_le_bytes()));
    }
}

/// The scalar reference over the whole tensor, one element at a time, sequentially.
pub fn reconstruct_scalar(qt: &QuantTensor) -> Result<Vec<f32>> {
    let r = Reconstructor::new(qt, Kernel::Scalar)?;
    let (rows, cols) = (qt.rows, qt.cols);
    Ok((0..rows)
        .flat_map(|i| (0..cols).map(move |j| (i, j)))
        .map(|(i, j)| r.p.element(i, j))
        .collect())
}

/// The whole tensor with `kernel`, rows in parallel on the current rayon pool.
pub fn reconstruct(qt: &QuantTensor, kernel: Kernel) -> Result<Vec<f32>> {
    Ok(Reconstructor::new(qt, kernel)?.all())
}
