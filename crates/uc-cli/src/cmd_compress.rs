//! `uc compress SRC -o PACK`.

use crate::output;
use anyhow::{Context, Result};
use clap::Args;
use std::path::PathBuf;
use uc_codec::{CodecSpec, GptqOptions};
use uc_compress::{Calibration, Event, Method, Options};
use uc_eval::corpus::{self, Split};

/// Arguments of `uc compress`.
#[derive(Args)]
#[command(after_help = "\
Examples:
  uc compress assets/smollm2-135m -o packs/smollm2-q5 --calib-sotu assets/sotu
  uc compress assets/smollm2-135m -o packs/smollm2-q4 --calib my_text.txt --bits 4 --group 64
  uc compress assets/smollm2-135m -o packs/smollm2-rtn5 --method rtn --bits 5 --group 128
  uc compress assets/smollm2-135m -o packs/smollm2-rtn4 --method rtn --bits 4 --group 64 --json

An interrupted run is resumed by running the same command again.")]
pub struct CompressArgs {
    /// The source: a Hugging Face checkpoint directory.
    src: PathBuf,
    /// The pack directory to write (or to resume).
    #[arg(short, long)]
    out: PathBuf,
    /// Encoder of the block linears: gptq (calibrated error feedback) or rtn
    /// (round-to-nearest, no calibration data).
    #[arg(long, default_value = "gptq", value_parser = ["gptq", "rtn"])]
    method: String,
    /// Calibration text files (joined by "\n\n").
    #[arg(long, num_args = 1.., conflicts_with = "calib_sotu")]
    calib: Vec<PathBuf>,
    /// Calibrate on the SOTU corpus directory's calibration split (speeches before 2000).
    #[arg(long)]
    calib_sotu: Option<PathBuf>,
    /// Calibration windows.
    #[arg(long, default_value_t = 32)]
    calib_seqs: usize,
    /// Tokens per calibration window.
    #[arg(long, default_value_t = 512)]
    calib_len: usize,
    /// Seed of the calibration window draw.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Error-feedback damping, as a fraction of the mean Gram diagonal.
    #[arg(long, default_value_t = 0.01)]
    damp: f64,
    /// Bits per code of the block linears (2..8).
    #[arg(long, default_value_t = 5)]
    bits: u8,
    /// Columns per scale group (32, 64, 128 or 256).
    #[arg(long, default_value_t = 128)]
    group: u32,
    /// Codec of the token embedding and untied head (a name from `uc codecs`).
    #[arg(long, default_value = "q8g64")]
    embed_codec: String,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(a: CompressArgs) -> Result<()> {
    let body = CodecSpec::parse(&format!("q{}g{}", a.bits, a.group))
        .with_context(|| format!("--bits {} --group {}", a.bits, a.group))?;
    let embed = CodecSpec::parse(&a.embed_codec)
        .with_context(|| format!("--embed-codec {}", a.embed_codec))?;
    let method = if a.method == "rtn" { Method::Rtn } else { Method::Gptq };
    let calibration = match method {
        Method::Rtn => None,
        Method::Gptq => Some(calibration(&a)?),
    };
    let opts = Options {
        method,
        body,
        embed,
        calibration,
        gptq: GptqOptions {
            damp: a.damp,
            ..GptqOptions::default()
        },
    };
    // Test hook: abort (like a SIGKILL: no cleanup, no unwinding) once this many blocks
    // are written, so tests can exercise resume at an exact point.
    let abort_after: Option<usize> = std::env::var("UC_TEST_ABORT_AFTER_BLOCKS").ok().and_then(|v| v.parse().ok());
    let pb = output::progress(0, "compress");
    let start = std::time::Instant::now();
    let summary = uc_compress::compress(&a.src, &a.out, &opts, &mut |e| match e {
        Event::Start { blocks, resumed } => {
            pb.set_length(blocks as u64 + 1);
            pb.set_position(resumed as u64);
            if resumed > 0 {
                pb.println(format!(
                    "resuming: {resumed} of {blocks} blocks already written"
                ));
            }
        }
        Event::BlockDone { index, .. } => {
            if abort_after == Some(index + 1) {
                std::process::abort();
            }
            pb.inc(1)
        }
        Event::GlobalsDone => pb.inc(1),
    })
    .with_context(|| format!("compressing {} into {}", a.src.display(), a.out.display()))?;
    pb.finish_and_clear();
    let m = &summary.manifest;
    let worst = summary
        .tensors
        .iter()
        .max_by(|x, y| x.rel_err.total_cmp(&y.rel_err));
    if a.json {
        return output::json(&serde_json::json!({
            "pack": a.out,
            "fingerprint": m.fingerprint,
            "bpw_body": m.bpw_body,
            "bpw_model": m.bpw_model,
            "seconds": start.elapsed().as_secs_f64(),
            "resumed_blocks": summary.resumed_blocks,
            "tensors": summary.tensors,
            "blocks": summary.blocks,
        }));
    }
    output::line(&format!(
        "wrote {} ({} tensors) in {:.1}s: bpw_body {:.4}, bpw_model {:.4}",
        a.out.display(),
        m.tensors.len(),
        start.elapsed().as_secs_f64(),
        m.bpw_body,
        m.bpw_model
    ))?;
    if !summary.blocks.is_empty() {
        output::line("block  output rel. MSE (quantized stream vs teacher)  seconds")?;
        for b in &summary.blocks {
            output::line(&format!("{:>5}  {:>10.3e}  {:>7.1}", b.index, b.out_rel_mse, b.seconds))?;
        }
    }
    if let Some(w) = worst {
        output::line(&format!(
            "worst relative weight error: {:.4} ({})",
            w.rel_err, w.name
        ))?;
    }
    output::line(&format!("fingerprint {}", m.fingerprint))
}

/// The calibration stream: the text files (or the SOTU calibration split) tokenized
/// with the source checkpoint's own tokenizer.
fn calibration(a: &CompressArgs) -> Result<Calibration> {
    let files = match (&a.calib_sotu, a.calib.is_empty()) {
        (Some(dir), true) => corpus::sotu_files(dir, Split::Calibration)?,
        (None, false) => a.calib.clone(),
        _ => anyhow::bail!(
            "the gptq method needs calibration text: --calib FILE... or --calib-sotu DIR \
             (or --method rtn for calibration-free compression)"
        ),
    };
    let text = corpus::load(&files)?;
    let tokenizer = uc_model::tokenizer::Tokenizer::from_dir(&a.src)?;
    let tokens = tokenizer.encode(&text.text)?;
    Ok(Calibration {
        tokens,
        n_seqs: a.calib_seqs,
        seq_len: a.calib_len,
        seed: a.seed,
        provenance: serde_json::json!({
            "files": files.iter().filter_map(|f| f.file_name()).map(|n| n.to_string_lossy()).collect::<Vec<_>>(),
            "sha256": text.sha256,
            "tokenizer_sha256": tokenizer.sha256(),
        }),
    })
}
