//! `uc-synth SHAPE -o DIR`: a synthetic checkpoint with the exact shapes, dtype and
//! sharding of a public model (see the library's overview). A benchmark tool, driven by
//! `scripts/bench_big.sh`.

use anyhow::{Context, Result};
use clap::Parser;
use std::path::PathBuf;
use std::time::Instant;

/// Writes a synthetic bf16 checkpoint: random deterministic weights, real shapes.
#[derive(Parser)]
#[command(after_help = "\
Examples:
  uc-synth mistral-7b -o /work/scratch/big/mistral-7b
  uc-synth llama-3.2-1b -o /work/scratch/big/llama-1b --tokenizer assets/smollm2-135m/tokenizer.json")]
struct Args {
    /// mistral-7b, llama-3.2-1b, olmoe-1b-7b or tiny.
    shape: String,
    /// Output directory.
    #[arg(short, long)]
    out: PathBuf,
    /// Seed of the weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// A tokenizer.json to copy beside the weights (its ids must be < the vocab size).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Keep only the first N blocks (same shapes and weights per block; a cheaper
    /// stand-in for measuring one block's memory).
    #[arg(long)]
    layers: Option<usize>,
}

fn main() -> Result<()> {
    let a = Args::parse();
    let shape = uc_synth::Shape::by_name(&a.shape).with_context(|| {
        format!(
            "unknown shape {} (mistral-7b, llama-3.2-1b, olmoe-1b-7b, tiny)",
            a.shape
        )
    })?;
    let shape = match a.layers {
        None => shape,
        Some(n) => {
            let full = shape.layers;
            shape
                .with_layers(n)
                .with_context(|| format!("--layers {n}: the shape has 1..={full} blocks"))?
        }
    };
    let t = Instant::now();
    let w = uc_synth::write_checkpoint(&a.out, &shape, a.seed, &mut |f| {
        eprintln!("[{:.0}s] wrote {f}", t.elapsed().as_secs_f64())
    })
    .with_context(|| format!("writing {}", a.out.display()))?;
    if let Some(tok) = &a.tokenizer {
        std::fs::copy(tok, a.out.join("tokenizer.json"))
            .with_context(|| format!("copying {}", tok.display()))?;
    }
    let report = serde_json::json!({
        "shape": shape.name,
        "dir": a.out,
        "seed": a.seed,
        "params": w.params,
        "total_size": w.total_size,
        "files": w.files,
        "seconds": t.elapsed().as_secs_f64(),
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
