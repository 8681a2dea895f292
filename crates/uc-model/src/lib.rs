//! uc-model: checkpoint intake (no forward pass: that is `uc_runtime`, the one engine).
//!
//! Data flow: a Hugging Face directory (`config.json`, `*.safetensors`,
//! `tokenizer.json`) is opened by [`checkpoint::Checkpoint`] (mmap, lazy tensors by
//! name; Phi-3's fused projections split into the usual seven linears).
//! [`config::ModelConfig`] parses `config.json` into the family switches the engine
//! reads. [`names`] is the tensor-name table of every supported family (llama /
//! mistral / qwen2 / qwen3 / SmolLM, OLMo-2, Phi-3, Gemma-2/3). A
//! [`source::WeightSource`] hands out tensors by name from a dense checkpoint or a pack
//! ([`pack_source`], exact reconstruction). [`gguf`] converts a GGUF file to the Hugging
//! Face layout (`uc import gguf`); candle is used only for GGUF file I/O and the
//! `WeightSource` tensors.
#![deny(missing_docs)]

pub mod checkpoint;
pub mod config;
pub mod error;
pub mod gguf;
pub mod names;
pub mod pack_source;
pub mod source;
pub mod tokenizer;

pub use error::ModelError;
