//! uc-model: checkpoint intake and the Llama-family forward pass.
//!
//! Data flow: a Hugging Face directory (`config.json`, `*.safetensors`,
//! `tokenizer.json`) is opened by [`checkpoint::Checkpoint`] (mmap, lazy tensors by
//! name). [`config::ModelConfig`] parses `config.json`. [`llama`] holds the
//! per-block forward for llama / mistral / qwen2 / qwen3 / SmolLM; every block
//! takes its weights from a [`source::WeightSource`] -- a dense checkpoint now, a pack
//! later -- so the compressor can run blocks one at a time. [`gguf`] converts a GGUF
//! file to the Hugging Face layout (`uc import gguf`).
#![deny(missing_docs)]

pub mod checkpoint;
pub mod config;
pub mod error;
pub mod gguf;
pub mod kernels;
pub mod llama;
pub mod pack_source;
pub mod source;
pub mod tokenizer;

pub use error::ModelError;
