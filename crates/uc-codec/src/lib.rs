//! The uc weight codec: how one 2-D weight matrix is represented, reconstructed
//! bit-exactly, encoded, and stored in / verified from a pack.
//!
//! Main types, in data-flow order:
//! - [`CodecSpec`] and the table [`CODECS`]: bits per code, columns per scale group,
//!   scale dtype, overlay rank; exact stored size of a tensor under each codec.
//! - [`encode_rtn`]: f32 weights (rows x cols) -> [`QuantTensor`] (codebook fitted by
//!   weighted k-means, group scales refitted by least squares, codes bit-packed).
//! - [`encode_gptq`]: the same with error feedback weighted by the inputs' Gram matrix;
//!   [`fit_overlay`]: the low-rank overlay fitted to what the codes left, in the same
//!   activation metric.
//! - [`rotation`]: the optional randomized block-Hadamard rotation of the input
//!   dimension (a rotated codec stores `W R^T`; the runtime rotates activations).
//! - [`trellis`]: trellis-coded codes (`t<bits>...` codecs): a Viterbi search down each
//!   column's rows picks codes whose subsets follow a 4-state trellis; reconstruction
//!   expands them to the plain codec with one bit more per code.
//! - [`QuantTensor::validate`]: the only gate untrusted bytes pass before math.
//! - [`Reconstructor`] / [`reconstruct`] / [`reconstruct_scalar`]: QuantTensor -> f32,
//!   following the specification in `docs/format.md` with a fixed rounding sequence, so
//!   the scalar reference, the AVX2 / AVX-512 / NEON kernels ([`Kernel`]) and any thread
//!   count produce identical bits.
//! - [`pack`]: QuantTensor <-> container entries through `uc-format`, tensor-level
//!   verification ([`pack::verify_pack`]) and reconstruction of a tensor by name.

#![deny(missing_docs)]

pub mod chol;
mod encode;
mod error;
mod gptq;
mod overlay;
pub mod pack;
mod recon;
pub mod rotation;
mod simd;
#[cfg(target_arch = "x86_64")]
pub use simd::unpack_tables;
mod spec;
mod tensor;
#[cfg(test)]
mod testutil;
pub mod trellis;

pub use encode::encode_rtn;
pub use error::CodecError;
pub use gptq::{encode_gptq, GptqOptions, DEFAULT_DAMP};
pub use overlay::fit_overlay;
pub use recon::{reconstruct, reconstruct_scalar, Kernel, Reconstructor, FORCE_SCALAR_ENV};
pub use spec::{CodecSpec, Layout, CODECS, GROUPS, ROTATIONS};
pub use tensor::{
    bf16_to_f32, code_at, pack_codes, scale_from_f32, scale_to_f32, scales_from_le, scales_to_le,
    Overlay, QuantTensor, E8_MAX,
};
pub use uc_format::ScaleDtype;

/// Result alias for this crate.
pub type Result<T, E = CodecError> = std::result::Result<T, E>;
