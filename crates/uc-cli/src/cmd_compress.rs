//! `uc compress SRC -o PACK`.

use crate::output;
use anyhow::{Context, Result};
use clap::Args;
use std::path::PathBuf;
use uc_codec::CodecSpec;
use uc_compress::{Event, Method, Options};

/// Arguments of `uc compress`.
#[derive(Args)]
#[command(after_help = "\
Examples:
  uc compress assets/smollm2-135m -o packs/smollm2-rtn5 --method rtn --bits 5 --group 128
  uc compress assets/smollm2-135m -o packs/smollm2-rtn4 --method rtn --bits 4 --group 64 --json

An interrupted run is resumed by running the same command again.")]
pub struct CompressArgs {
    /// The source: a Hugging Face checkpoint directory.
    src: PathBuf,
    /// The pack directory to write (or to resume).
    #[arg(short, long)]
    out: PathBuf,
    /// Encoder of the block linears.
    #[arg(long, default_value = "rtn", value_parser = ["rtn"])]
    method: String,
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
    let opts = Options {
        method: match a.method.as_str() {
            _ => Method::Rtn,
        },
        body,
        embed,
    };
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
        Event::BlockDone { .. } | Event::GlobalsDone => pb.inc(1),
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
    if let Some(w) = worst {
        output::line(&format!(
            "worst relative weight error: {:.4} ({})",
            w.rel_err, w.name
        ))?;
    }
    output::line(&format!("fingerprint {}", m.fingerprint))
}
