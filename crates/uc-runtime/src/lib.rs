//! uc-runtime: inference for dense checkpoints and packs.
//!
//! Data flow, in order:
//! - [`weights`]: a model directory -> [`weights::WeightLoader`] ([`weights::PackLoader`]
//!   verifies the pack first; [`weights::CheckpointLoader`] reads safetensors) -> per
//!   block [`weights::BlockWeights`] whose linears are [`linear::Linear`] trait objects:
//!   [`linear::DenseLinear`] (f32) or [`linear::PackedLinear`] (codebook + scales + codes
//!   + overlay, never expanded to f32 as a whole).
//! - [`kernels`]: the compute -- fused quantized mat-vec, exact tile dequantization,
//!   GEMM, exp/softmax/RMSNorm/rotary -- each SIMD kernel beside its scalar reference.
//! - `block` (private): the block math, once -- five pieces (attention-in norm,
//!   q/k/v + rotary + attention, o + residual, gate/up + SiLU/GELU, down + residual),
//!   with the family differences as data (which norms exist, q/k norm width, scales,
//!   soft-caps, windows and rotary per layer) that both of the following run.
//! - [`decoder::Decoder`]: dense decoder blocks over a KV cache; prefill in one pass,
//!   then one token at a time; blocks resident or streamed from disk ([`stream`], the
//!   next block prefetched on a background thread). Serves eval, run, bench, serve.
//!   [`decoder::Decoder::forward_batch`] steps several decoders sharing one model's
//!   weights by one token each in one pass over the weights (`uc serve`'s continuous
//!   batching), each with exactly the logits of its own one-token forward.
//! - [`staged::Stager`]: the same blocks on batches of independent calibration windows,
//!   paused at each linear's input ([`staged::Tap`]) so `uc compress` can take its
//!   statistics and swap weights stage by stage. [`rotary`]: the rotary tables.
//! - [`kv`]: the KV cache, in memory or (streaming) in an unlinked file whose pages
//!   leave the resident set after each layer.
//! - [`team`]: spinning worker threads for the decode step's short parallel loops.
//! - [`sampler`]: greedy / temperature / top-p with a seeded PRNG.
//! - [`generate`]: the generation loop, stop tokens, streaming detokenization.
//! - [`bench`]: time to first token, prefill / decode throughput, peak RSS, machine.
//! - [`memory`]: the peak resident set estimated before loading (`--max-memory`).
#![deny(missing_docs)]

pub mod bench;
mod block;
pub mod decoder;
pub mod error;
pub mod generate;
pub mod kernels;
pub mod kv;
pub mod linear;
pub mod memory;
pub mod moe;
pub mod rotary;
pub mod sampler;
mod ssm;
pub mod staged;
pub mod stream;
pub mod team;
pub mod weights;

pub use decoder::{Decoder, DecoderOptions, Logits};
pub use error::{Result, RuntimeError};
pub use generate::{generate, GenerateOptions, GenerationStats};
pub use sampler::{Sampler, SamplingParams};
pub use weights::{Verify, WeightLoader};

/// Scales token embeddings `x (n, hidden)` in place by the model's embedding multiplier
/// (Gemma: `sqrt(hidden)` in the checkpoint's dtype); a no-op for other families. The
/// decoder and the compressor's calibration streams both start with it.
pub fn scale_embedding(cfg: &uc_model::config::ModelConfig, x: &mut [f32]) {
    if let Some(s) = cfg.embed_scale {
        x.iter_mut().for_each(|v| *v *= s);
    }
}
