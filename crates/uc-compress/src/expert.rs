//! A mixture-of-experts expert as the compressor's quantized student holds it once the
//! expert is encoded: its codes, not an f32 copy.
//!
//! Why codes: the forward that carries the calibration windows to the next block runs
//! every expert (each token goes to `top_k` of them), after all of them are encoded. A
//! dense block could hold its reconstructions as f32, but a MoE block's experts are most
//! of its weights (Mixtral-8x7B: 8 x 176M params, 5.6 GB f32 per block, ~1.2 GB as 5-bit
//! codes with f32 scales), so the student keeps the encoded [`QuantTensor`] and each call
//! reconstructs the rows it multiplies (a 128-row tile in prefill) with the same
//! reconstruction as `model_recon` (exact, un-rotated), then runs [`DenseLinear`]'s
//! arithmetic on them ([`dense_rows`]): the same bits as holding the reconstruction,
//! so the pack is byte-identical. Recomputing each expert's reconstruction per chunk is
//! cheap next to the matrix products it feeds (one pass over the codes per chunk of
//! windows). The other choice, re-encoding or re-reading f32 copies per expert, would
//! either cost an encode per chunk or hold the f32 weights this avoids.
//!
//! [`DenseLinear`]: uc_runtime::linear::DenseLinear

use crate::pipeline::codec_err;
use crate::Result;
use uc_codec::{Kernel, QuantTensor, Reconstructor};
use uc_runtime::kernels::dense::ColBlock;
use uc_runtime::kernels::Isa;
use uc_runtime::linear::{dense_rows, Linear, Prepared};

/// An encoded expert linear `(rows, cols)`: a plain codec (a trellis tensor is expanded
/// once, here, as the runtime does), reconstructed a row tile per call.
pub(crate) struct PackedExpert {
    /// The codes in the rotated basis when `signs` is set.
    qt: QuantTensor,
    /// The rotation's signs (`cols`), when the codec is rotated: rows are un-rotated after
    /// reconstruction, as `model_recon` does.
    signs: Option<Vec<f32>>,
}

impl PackedExpert {
    /// Wraps `qt`, the encoded weight `name`, checking that it reconstructs.
    pub(crate) fn new(name: &str, qt: QuantTensor) -> Result<Self> {
        let qt = if qt.spec.trellis {
            uc_codec::trellis::expand(&qt).map_err(codec_err(name))?
        } else {
            qt
        };
        Reconstructor::new(&qt, Kernel::Scalar).map_err(codec_err(name))?;
        let signs = (qt.spec.rot > 0).then(|| uc_codec::rotation::signs(qt.cols));
        Ok(PackedExpert { qt, signs })
    }

    /// Rows `first .. first + n` of the model-basis reconstruction into `buf`
    /// (`(n, cols)`); NaN if the tensor does not reconstruct (checked in `new`, so not
    /// expected).
    fn rows_into(&self, first: usize, n: usize, buf: &mut Vec<f32>) {
        let cols = self.qt.cols;
        buf.clear();
        buf.resize(n * cols, 0.0);
        let ok = Reconstructor::new(&self.qt, Kernel::select(false))
            .and_then(|r| r.rows_into(first, buf))
            .is_ok();
        if !ok {
            buf.fill(f32::NAN);
        }
        if let Some(s) = &self.signs {
            uc_codec::rotation::unrotate(buf, cols, self.qt.spec.rot as usize, s);
        }
    }
}

impl Linear for PackedExpert {
    fn rows(&self) -> usize {
        self.qt.rows
    }
    fn cols(&self) -> usize {
        self.qt.cols
    }
    fn resident_bytes(&self) -> usize {
        self.qt.codes.len() + 2 * self.qt.scales.len() + 4 * self.qt.codebook.len()
    }
    fn kind(&self) -> String {
        "dense_f32".into()
    }
    fn row_into(&self, _isa: Isa, i: usize, out: &mut [f32]) {
        let mut buf = Vec::new();
        self.rows_into(i, 1, &mut buf);
        out.copy_from_slice(&buf);
    }
    fn weight_f32<'s>(&'s self, _isa: Isa, buf: &'s mut Vec<f32>) -> &'s [f32] {
        self.rows_into(0, self.qt.rows, buf);
        buf
    }
    fn block(
        &self,
        isa: Isa,
        x: &[f32],
        _aux: &[f32],
        _px: Prepared,
        out: &mut ColBlock,
        scratch: &mut Vec<f32>,
    ) {
        self.rows_into(out.first(), out.len(), scratch);
        dense_rows(isa, scratch, self.qt.cols, x, out);
    }
}
