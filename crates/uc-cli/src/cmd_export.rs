//! `uc export PACK --to safetensors DIR | --to gguf FILE`: a verified pack as dense
//! weights for other tools (crate uc-export).

use crate::output;
use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use std::path::PathBuf;
use uc_export::Dtype;

/// Target formats.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Format {
    /// A Hugging Face checkpoint directory (config.json, tokenizer files, model.safetensors).
    Safetensors,
    /// One llama.cpp GGUF file (f16 or f32 matrices).
    Gguf,
}

/// Matrix element types.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum DtypeArg {
    /// 32-bit float: the pack's reconstruction exactly.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16 (safetensors only).
    Bf16,
}

/// Arguments of `uc export`.
#[derive(Args)]
#[command(after_help = "\
Examples:
  uc export packs/smollm2-q5 --to safetensors exports/smollm2-q5-hf --dtype bf16
  uc export packs/smollm2-q5 --to gguf exports/smollm2-q5.f16.gguf
  uc export packs/smollm2-q5 --to gguf exports/smollm2-q5.f32.gguf --dtype f32 --json

The pack is verified first (as `uc verify`); a failing pack is refused. Weights are the
pack's exact reconstruction, rounded to --dtype (the largest rounding error and its tensor
are reported). The destination must not exist. Default dtype: bf16 for safetensors, f16
for GGUF.")]
pub struct ExportArgs {
    /// The pack directory.
    pack: PathBuf,
    /// Target format.
    #[arg(long = "to", value_enum)]
    format: Format,
    /// The output: a directory (safetensors) or a file (gguf).
    output: PathBuf,
    /// Element type of the matrices.
    #[arg(long, value_enum)]
    dtype: Option<DtypeArg>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(a: ExportArgs) -> Result<()> {
    let dtype = match (a.dtype, a.format) {
        (Some(DtypeArg::F32), _) => Dtype::F32,
        (Some(DtypeArg::F16), _) => Dtype::F16,
        (Some(DtypeArg::Bf16), Format::Safetensors) => Dtype::Bf16,
        (Some(DtypeArg::Bf16), Format::Gguf) => {
            bail!("--dtype bf16: GGUF export writes f16 or f32")
        }
        (None, Format::Safetensors) => Dtype::Bf16,
        (None, Format::Gguf) => Dtype::F16,
    };
    let report = match a.format {
        Format::Safetensors => uc_export::export_safetensors(&a.pack, &a.output, dtype),
        Format::Gguf => uc_export::export_gguf(&a.pack, &a.output, dtype),
    }
    .with_context(|| format!("exporting {}", a.pack.display()))?;
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    if a.json {
        output::json(&report)
    } else {
        output::line(&format!(
            "exported {} tensors ({} parameters, {:.1} MB) to {} as {:?} {}; largest rounding error {:.3e} in {}",
            report.tensors,
            report.params,
            report.bytes as f64 / 1e6,
            report.output.display(),
            report.dtype,
            report.format,
            report.max_rounding_error,
            if report.worst_tensor.is_empty() { "-" } else { &report.worst_tensor },
        ))
    }
}
