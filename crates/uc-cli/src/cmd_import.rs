//! `uc import gguf FILE -o DIR`.

use crate::output;
use anyhow::Result;
use clap::{Args, Subcommand};
use std::path::PathBuf;

/// Import formats.
#[derive(Subcommand)]
pub enum Import {
    /// A llama / qwen2 / qwen3 GGUF file to a Hugging Face directory (f32 safetensors,
    /// config.json, tokenizer.json).
    #[command(
        after_help = "Example:\n  uc import gguf SmolLM2-135M-Instruct.Q4_1.gguf -o assets/smollm2-135m"
    )]
    Gguf(GgufArgs),
}

/// Arguments of `uc import gguf`.
#[derive(Args)]
pub struct GgufArgs {
    /// The GGUF file.
    file: PathBuf,
    /// Output directory (must not exist).
    #[arg(short, long)]
    out: PathBuf,
    /// Print the import report as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(cmd: Import) -> Result<()> {
    match cmd {
        Import::Gguf(a) => {
            let report = uc_model::gguf::import_gguf(&a.file, &a.out)?;
            if a.json {
                output::json(&report)
            } else {
                output::line(&format!(
                    "imported {} -> {}: {}",
                    a.file.display(),
                    a.out.display(),
                    serde_json::to_string(&report)?
                ))
            }
        }
    }
}
