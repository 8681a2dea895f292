//! Where a model's weights come from: a dense checkpoint or a pack.
//!
//! Blocks ask a [`WeightSource`] for tensors by their Hugging Face name and get f32
//! CPU tensors back, so the same forward code runs the teacher and the compressed
//! model.

use crate::config::ModelConfig;
use crate::error::Result;
use candle_core::Tensor;

/// A provider of named f32 tensors for one model.
pub trait WeightSource: Send + Sync {
    /// The model's configuration.
    fn config(&self) -> &ModelConfig;
    /// The tensor `name` as f32 on the CPU, in Hugging Face layout
    /// (linear weights are `(out_features, in_features)`).
    fn tensor(&self, name: &str) -> Result<Tensor>;
    /// Whether the source holds `name`.
    fn contains(&self, name: &str) -> bool;
    /// A stable identity of these weights (SHA-256 hex), for receipts.
    fn fingerprint(&self) -> Result<String>;
    /// A short description for humans ("checkpoint DIR", "pack DIR").
    fn describe(&self) -> String;
}
