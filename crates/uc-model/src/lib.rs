//! uc-model: checkpoint intake (no forward pass: that is `uc_runtime`, the one engine).
//!
//! Data flow: a Hugging Face directory (`config.json`, `*.safetensors`,
//! `tokenizer.json`) is opened by [`checkpoint::Checkpoint`] (mmap, lazy tensors by
//! name). [`config::ModelConfig`] parses `config.json`. [`names`] is the tensor-name
//! table of the Llama family (llama / mistral / qwen2 / qwen3 / SmolLM). A
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
