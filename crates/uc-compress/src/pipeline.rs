//! The per-block loop.
//!
//! Mixture-of-experts blocks (Mixtral, Qwen3-MoE, OLMoE): every expert's gate/up/down is an
//! ordinary body tensor (probed, given bits by the budget, encoded by error feedback).
//! Its Gram matrices are taken on the calibration tokens the (quantized-so-far) student
//! routes to it -- gate/up on those tokens' MLP input, down on their activation in that
//! expert -- so each expert is fitted to the inputs it actually sees. An expert that
//! received fewer tokens than [`expert_min_tokens`] is encoded with the layer's pooled
//! Gram matrices instead (every token entering the MoE MLP for gate/up; every (token,
//! expert) activation of the layer for down), and says so (`fallback` in
//! [`ExpertSummary`]): its own matrix would be singular. Experts are encoded one at a
//! time: the stage's pass over the calibration chunks sums only the pooled matrix and
//! counts tokens; then each expert's matrix is built from the held student inputs,
//! used for its linears and freed, so one expert's statistics and weights are held at
//! once (the same bits as summing all experts in that pass). The experts' weights are
//! read from the checkpoint only then: the teacher and student blocks leave them in the
//! mapped checkpoint (`CheckpointLoader::block_lazy_experts`, a row tile converted per
//! forward call), and an encoded expert is held by the student as its codes
//! (`crate::expert`), not as an f32 reconstruction: the same bits, a fraction of the
//! memory. The router stays dense f32.
//! The teacher target ([`Options::teacher_target`]) is not applied to experts: the
//! teacher may route a token elsewhere, so there is no paired teacher input per expert.

use crate::alloc::{allocate, Sensitivity, PROBE_BITS};
use crate::calib::{Calibration, Cross, Gram};
use crate::expert::PackedExpert;
use crate::spill::{self, SpillDir, SpillWriter, Spilled};
use crate::{CompressError, Result};
use serde::Serialize;
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;
use uc_codec::{CodecSpec, GptqOptions, Kernel, QuantTensor};
use uc_format::{
    block_container, ContainerBuilder, DenseDtype, Manifest, PackWriter, Role, SourceFile,
    SourceInfo, GLOBALS_CONTAINER,
};
use uc_model::checkpoint::Checkpoint;
use uc_model::config::ModelConfig;
use uc_model::names::{
    block_linears, block_prefix, embed as embed_name, final_norm, mamba_exact, moe_router, LM_HEAD,
    MAMBA_NORM,
};
use uc_model::source::WeightSource;
use uc_runtime::linear::{DenseLinear, Linear};
use uc_runtime::staged::{Paused, Stager, Step, Tap};
use uc_runtime::weights::{BlockWeights, CheckpointLoader, WeightLoader};

/// How linear weights are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Round-to-nearest onto a learned codebook, no calibration data.
    Rtn,
    /// Calibrated: per block, activation Gram matrices from the (already quantized)
    /// model's own hidden states, error-feedback encoding, quantized output fed forward.
    Gptq,
}

/// Compression settings.
#[derive(Debug, Clone)]
pub struct Options {
    /// Encoder of the block linears.
    pub method: Method,
    /// Codec of the block linears; with a budget, its group size (and scale dtype) is
    /// kept and only the bits vary per tensor.
    pub body: CodecSpec,
    /// Budget on the block linears' stored bits per weight: bits chosen per tensor from
    /// [`BUDGET_BITS`] by measured sensitivity (see [`crate::alloc`]). Needs calibration.
    pub budget_bpw: Option<f64>,
    /// Where the budget may move bits: across the whole model, or only between the
    /// linears of each block (every block then meets the budget on its own).
    pub budget_scope: BudgetScope,
    /// Codec of the token embedding and (untied) head.
    pub embed: CodecSpec,
    /// Calibration data (required by [`Method::Gptq`]).
    pub calibration: Option<Calibration>,
    /// Error-feedback settings.
    pub gptq: GptqOptions,
    /// Calibrated runs: encode each linear towards the teacher's outputs on the
    /// teacher's inputs rather than towards its weights ([`crate::target`]).
    pub teacher_target: bool,
    /// Damping of the teacher-target solve, as a fraction of the mean Gram diagonal:
    /// larger values keep the correction to the well-measured input directions.
    pub target_damp: f64,
    /// Calibrated runs: estimate each stage's shrinkage towards the diagonal from the
    /// spread of its Gram matrix between calibration chunks ([`Gram::shrinkage`])
    /// instead of using `gptq.shrink` (which stays the fallback).
    pub auto_shrink: bool,
    /// Calibrated runs: once down_proj's statistics are summed, drop each chunk's
    /// quantized-stream input of down_proj (the MLP's inner activations, tokens x
    /// intermediate f32: 512 MiB at 32 windows on a Llama-3.2-1B shape) and recompute
    /// it from the residual to finish the block. The same bits (the recompute runs the
    /// same gate/up weights on the same residual), one more gate/up forward of the
    /// quantized stream per block. The memory plan sets it when a `--max-memory` budget
    /// needs it ([`crate::memory`]).
    pub recompute_mlp_input: bool,
    /// Calibrated runs: keep the calibration hidden states carried between blocks (the
    /// teacher's and the quantized model's, `(n_seqs * seq_len, hidden)` f32 each) in
    /// files under `PACK/.spill/` instead of memory (module `spill`), and hold no
    /// paused forwards between a block's stages: each stage reads the block's inputs
    /// back one chunk of windows at a time and recomputes both forwards from the block
    /// input to the stage's tap (and the quantized one's to the block output at the
    /// end). The same bits: the recomputation runs the same weights on the same inputs
    /// in the same chunks. Not built for mixture-of-experts blocks, whose experts read
    /// their held inputs once per expert. The memory plan sets it when a `--max-memory`
    /// budget needs it ([`crate::memory`]).
    pub spill_activations: bool,
    /// Calibrated runs: encode the head (the tied token embedding, or an untied
    /// `lm_head`) by error feedback on the final-normed calibration states, towards the
    /// teacher's logits ([`Stream::head_stats`]), instead of round-to-nearest. The head
    /// turns its error into logit error directly: on SmolLM2-135M's 5.0 bpw pack the
    /// round-to-nearest q8g32 head alone was ~10% of the KLD (docs/research-log.md,
    /// 2026-12-05).
    pub calibrated_head: bool,
}

/// Where a bit budget may move bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BudgetScope {
    /// Between any two block linears of the model.
    #[default]
    Model,
    /// Only between the linears of one block.
    Block,
}

/// Candidate bits per code when a budget is set.
pub const BUDGET_BITS: [u8; 6] = [2, 3, 4, 5, 6, 8];

/// Calibration windows the sensitivity probe runs on (the first ones drawn).
const PROBE_SEQS: usize = 4;

/// Progress notifications for a front end.
#[derive(Debug, Clone)]
pub enum Event {
    /// The sensitivity probe (budgeted runs) finished block `index` of `blocks`.
    Probed {
        /// Block index.
        index: usize,
        /// Number of blocks.
        blocks: usize,
    },
    /// Work is starting: `blocks` transformer blocks, `resumed` of them already done.
    Start {
        /// Number of blocks.
        blocks: usize,
        /// Blocks found complete from an interrupted run.
        resumed: usize,
    },
    /// Block `index` is written.
    BlockDone {
        /// Block index.
        index: usize,
        /// Seconds it took.
        seconds: f64,
        /// Calibrated runs on a MoE block: calibration tokens routed to each expert.
        expert_tokens: Vec<usize>,
        /// Calibrated methods: relative MSE of the block's output on the quantized
        /// stream against the teacher's on the teacher stream.
        out_rel_mse: Option<f64>,
    },
    /// The globals container is written.
    GlobalsDone,
}

/// Per-tensor outcome.
#[derive(Debug, Clone, Serialize)]
pub struct TensorSummary {
    /// Tensor name.
    pub name: String,
    /// Codec name, or the dense dtype.
    pub encoding: String,
    /// Stored bits per weight.
    pub bpw: f64,
    /// Weights (rows x cols).
    pub elements: u64,
    /// ||W - W_hat||_F / ||W||_F.
    pub rel_err: f64,
    /// Shrinkage of the Gram matrix used by error feedback, when not 0.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shrink: Option<f64>,
}

/// Per-block outcome of a calibrated run.
#[derive(Debug, Clone, Serialize)]
pub struct BlockSummary {
    /// Block index.
    pub index: usize,
    /// Relative MSE of the quantized block stream against the teacher stream.
    pub out_rel_mse: f64,
    /// Stored bits per weight of the block's linears.
    pub bpw: f64,
    /// Seconds.
    pub seconds: f64,
    /// A MoE block's experts, in order (absent for dense blocks).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub experts: Vec<ExpertSummary>,
}

/// What one expert of a MoE block was calibrated on.
#[derive(Debug, Clone, Serialize)]
pub struct ExpertSummary {
    /// Expert index.
    pub expert: usize,
    /// Calibration tokens the quantized-so-far model routed to it (of all windows).
    pub tokens: usize,
    /// Fewer than [`expert_min_tokens`]: encoded with the layer's pooled Gram matrices.
    pub fallback: bool,
}

/// Fewest routed calibration tokens an expert needs for Gram matrices of its own: the
/// widest input of its linears (`max(hidden, expert_intermediate)`). Fewer rows than
/// columns make `X^T X` singular (rank <= rows), and error feedback would then spend the
/// codes on directions the data never measured.
pub fn expert_min_tokens(cfg: &ModelConfig) -> usize {
    let mi = cfg.moe.as_ref().map_or(0, |m| m.expert_intermediate);
    cfg.hidden_size.max(mi)
}

/// What a compression produced.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// The manifest written.
    #[serde(skip)]
    pub manifest: Manifest,
    /// Blocks taken over from an interrupted run.
    pub resumed_blocks: usize,
    /// Every quantized tensor encoded in this run.
    pub tensors: Vec<TensorSummary>,
    /// Calibrated runs: every block's output error.
    pub blocks: Vec<BlockSummary>,
    /// Budgeted runs: every block linear's measured sensitivity, in block order.
    pub sensitivity: Vec<Sensitivity>,
    /// Budgeted runs: seconds the sensitivity probe took.
    pub probe_seconds: f64,
}

/// SHA-256 and size of each file of the source directory that defines the model.
fn source_info(ck: &Checkpoint) -> Result<SourceInfo> {
    let dir = ck.dir();
    let mut names: Vec<String> = [
        "config.json",
        "tokenizer.json",
        "model.safetensors.index.json",
    ]
    .iter()
    .filter(|n| dir.join(n).is_file())
    .map(|n| n.to_string())
    .collect();
    for f in ck.files() {
        if let Some(n) = f.file_name() {
            names.push(n.to_string_lossy().into_owned());
        }
    }
    names.sort();
    let mut files = Vec::with_capacity(names.len());
    for name in names {
        let p = dir.join(&name);
        let (size, sha256) = uc_format::sha256_file(&p)?;
        files.push(SourceFile { name, size, sha256 });
    }
    let config_path = dir.join("config.json");
    let config_text =
        std::fs::read_to_string(&config_path).map_err(|source| CompressError::Io {
            path: config_path.clone(),
            source,
        })?;
    let config = serde_json::from_str(&config_text)
        .map_err(|e| CompressError::Settings(format!("{}: {e}", config_path.display())))?;
    Ok(SourceInfo {
        architecture: serde_json::to_value(ck.config().family)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default(),
        config,
        files,
    })
}

pub(crate) fn codec_err(tensor: &str) -> impl FnOnce(uc_codec::CodecError) -> CompressError + '_ {
    move |error| CompressError::Codec {
        tensor: tensor.to_string(),
        error,
    }
}

/// ||a - b|| / ||a|| in f64.
fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let mut sums = (0f64, 0f64);
    err_sums(a, b, &mut sums);
    err_ratio(sums)
}

/// Adds `||a - b||^2` and `||a||^2` of these elements, in order, to `sums`.
fn err_sums(a: &[f32], b: &[f32], sums: &mut (f64, f64)) {
    for (&x, &y) in a.iter().zip(b) {
        sums.0 += f64::from(x - y).powi(2);
        sums.1 += f64::from(x).powi(2);
    }
}

fn err_ratio((num, den): (f64, f64)) -> f64 {
    if den > 0.0 {
        (num / den).sqrt()
    } else {
        0.0
    }
}

/// [`rel_err`] of `w` (rows x `cols`) against the (model-basis) reconstruction of `qt`, reconstructed
/// ~4 MiB of rows at a time: the same sums in the same order (the same bits), without
/// the whole f32 reconstruction in memory (1 GiB for Llama-3.2-1B's embedding).
fn rel_err_streamed(w: &[f32], qt: &QuantTensor, cols: usize) -> uc_codec::Result<f64> {
    let r = uc_codec::Reconstructor::new(qt, Kernel::select(false))?;
    // Rotated codecs are compared in the model's basis, as `model_recon` does.
    let signs = (qt.spec.rot > 0).then(|| uc_codec::rotation::signs(cols));
    let rows = ((1 << 20) / cols.max(1)).max(1);
    let mut buf = vec![0f32; rows * cols];
    let mut sums = (0f64, 0f64);
    for (k, wc) in w.chunks(rows * cols).enumerate() {
        let out = &mut buf[..wc.len()];
        r.rows_into(k * rows, out)?;
        if let Some(s) = &signs {
            uc_codec::rotation::unrotate(out, cols, qt.spec.rot as usize, s);
        }
        err_sums(wc, out, &mut sums);
    }
    Ok(err_ratio(sums))
}

/// Encodes weight `name` (rows x cols) with `spec` -- by error feedback when a Gram
/// matrix is given -- adds it to `c`, and returns its reconstruction when `keep_recon`
/// (else the error is measured a few rows at a time). A Gram matrix handed over
/// (`Cow::Owned`) is consumed by the encoder in its own storage
/// ([`uc_codec::encode_gptq`]).
#[allow(clippy::too_many_arguments)]
fn quantize_into(
    c: &mut ContainerBuilder,
    name: &str,
    w: &[f32],
    shape: &[usize],
    role: Role,
    spec: &CodecSpec,
    gram: Option<(Cow<'_, [f64]>, GptqOptions)>,
    keep_recon: bool,
) -> Result<(TensorSummary, Option<Vec<f32>>, QuantTensor)> {
    let [rows, cols] = shape[..] else {
        return Err(CompressError::Settings(format!(
            "{name}: expected a 2-D weight, got {shape:?}"
        )));
    };
    // Rotation block and overlay rank as this tensor's shape allows.
    let spec = &crate::alloc::per_tensor(spec, rows, cols);
    if spec.rot > 0 && spec.rank > 0 {
        return Err(CompressError::Settings(format!(
            "{name}: a low-rank overlay together with a rotation is not supported"
        )));
    }
    // Codes first (without overlay), then the overlay fitted to what they left, in the
    // same activation metric.
    let base_spec = CodecSpec { rank: 0, ..*spec };
    let gptq = gram.as_ref().map(|(_, o)| *o);
    // The overlay is fitted in the same metric after the codes: only then is H kept.
    let (qt, h_overlay) = match gram {
        None => (uc_codec::encode_rtn(w, rows, cols, &base_spec, None), None),
        Some((h, o)) if spec.rank == 0 => {
            (uc_codec::encode_gptq(w, rows, cols, &base_spec, h, o), None)
        }
        Some((h, o)) => (
            uc_codec::encode_gptq(w, rows, cols, &base_spec, &*h, o),
            Some(h),
        ),
    };
    let mut qt: QuantTensor = qt.map_err(codec_err(name))?;
    if spec.rank > 0 {
        let base = uc_codec::reconstruct(&qt, Kernel::select(false)).map_err(codec_err(name))?;
        let resid: Vec<f32> = w.iter().zip(&base).map(|(a, b)| a - b).collect();
        let overlay = uc_codec::fit_overlay(
            &resid,
            rows,
            cols,
            spec.rank as usize,
            h_overlay.as_deref(),
            gptq.map_or(0.0, |o| o.damp),
        )
        .map_err(codec_err(name))?;
        qt.spec = *spec;
        qt.overlay = Some(overlay);
    }
    let (err, recon) = if keep_recon {
        let recon = model_recon(name, &qt)?;
        (rel_err(w, &recon), Some(recon))
    } else {
        (
            rel_err_streamed(w, &qt, cols).map_err(codec_err(name))?,
            None,
        )
    };
    let mut stats = serde_json::Map::new();
    stats.insert("rel_err".into(), err.into());
    let shrink = gptq.map(|o| o.shrink).filter(|&s| s > 0.0);
    if let Some(s) = shrink {
        stats.insert("shrink".into(), s.into());
    }
    uc_codec::pack::write_quant_tensor(c, name, role, &qt, Some(stats)).map_err(codec_err(name))?;
    let summary = TensorSummary {
        name: name.to_string(),
        encoding: spec.name(),
        bpw: spec.bits_per_weight(rows, cols).map_err(codec_err(name))?,
        elements: (rows * cols) as u64,
        rel_err: err,
        shrink,
    };
    Ok((summary, recon, qt))
}

/// The model-basis weight a quantized tensor stands for: its exact reconstruction,
/// un-rotated when the codec is rotated ([`uc_codec::rotation`]).
fn model_recon(name: &str, qt: &QuantTensor) -> Result<Vec<f32>> {
    let mut recon = uc_codec::reconstruct(qt, Kernel::select(false)).map_err(codec_err(name))?;
    if qt.spec.rot > 0 {
        let b = qt.spec.rot as usize;
        uc_codec::rotation::unrotate(&mut recon, qt.cols, b, &uc_codec::rotation::signs(qt.cols));
    }
    Ok(recon)
}

/// Reads weight `name` and encodes it (no calibration).
fn quantize_from(
    ck: &Checkpoint,
    c: &mut ContainerBuilder,
    name: &str,
    role: Role,
    spec: &CodecSpec,
) -> Result<TensorSummary> {
    let (w, shape) = ck.tensor_f32(name)?;
    Ok(quantize_into(c, name, &w, &shape, role, spec, None, false)?.0)
}

/// Whether the head is encoded by error feedback ([`Options::calibrated_head`]). A tied
/// embedding only with an 8-bit codec: error feedback shapes the row errors for the
/// head's inputs, and the same rows are the first block's inputs. At 8 bits that side
/// moved SmolLM2-135M's KLD by 0.5% where the head's moved it by 10%; with a 3-bit
/// tied embedding on a test model the calibrated tensor was worse overall
/// (docs/research-log.md, 2026-12-05).
pub(crate) fn calibrated_head(cfg: &ModelConfig, opts: &Options) -> bool {
    opts.method == Method::Gptq
        && opts.calibrated_head
        && (!cfg.tie_word_embeddings || opts.embed.bits >= 8)
}

/// Reads the head weight `name` (vocab x hidden) and encodes it by error feedback with
/// the final-normed calibration states' Gram matrix, towards the teacher's logits when
/// the cross term is given ([`Stream::head_stats`], [`crate::target`]).
fn quantize_head(
    ck: &Checkpoint,
    c: &mut ContainerBuilder,
    name: &str,
    role: Role,
    spec: &CodecSpec,
    (gram, cross): (Gram, Option<Cross>),
    opts: &Options,
) -> Result<TensorSummary> {
    let (mut w, shape) = ck.tensor_f32(name)?;
    let &[rows, cols] = &shape[..] else {
        return Err(CompressError::Settings(format!(
            "{name}: expected a 2-D weight, got {shape:?}"
        )));
    };
    if cols != gram.cols {
        return Err(CompressError::Settings(format!(
            "{name}: {cols} columns, but the final hidden states are {} wide",
            gram.cols
        )));
    }
    // The target replaces the weights in place (a second vocab x hidden f32 copy would
    // set the run's peak on large vocabularies); a failed solve reads them again.
    if let Some(cr) = cross {
        if !crate::target::teacher_target_rows(&mut w, rows, cols, &gram.h, cr.c, opts.target_damp)
        {
            w = ck.tensor_f32(name)?.0;
        }
    }
    // The settings of the block linears (`--shrink auto` estimates per stage from chunk
    // spreads, which the head's statistics do not keep: it takes the fixed value).
    let (mut summary, _, qt) = quantize_into(
        c,
        name,
        &w,
        &shape,
        role,
        spec,
        Some((Cow::Owned(gram.h), opts.gptq)),
        false,
    )?;
    // The error against the checkpoint's weights, as for the block linears.
    drop(w);
    let (w, _) = ck.tensor_f32(name)?;
    summary.rel_err = rel_err_streamed(&w, &qt, cols).map_err(codec_err(name))?;
    Ok(summary)
}

/// Stores tensor `name` of `ck` dense in f32.
fn dense_into(ck: &Checkpoint, c: &mut ContainerBuilder, name: &str, role: Role) -> Result<()> {
    let (w, shape) = ck.tensor_f32(name)?;
    uc_codec::pack::write_dense_tensor(c, name, role, &w, &shape, DenseDtype::F32, None)
        .map_err(codec_err(name))?;
    Ok(())
}

/// Compresses the checkpoint in `src` into a pack in `out`, resuming an interrupted
/// run found there.
pub fn compress(
    src: &Path,
    out: &Path,
    opts: &Options,
    progress: &mut dyn FnMut(Event),
) -> Result<Summary> {
    opts.body.validate().map_err(codec_err("(body codec)"))?;
    opts.embed
        .validate()
        .map_err(codec_err("(embedding codec)"))?;
    let ck = Checkpoint::open(src)?;
    let cfg = ck.config().clone();
    if opts.spill_activations && cfg.moe.is_some() {
        return Err(CompressError::Settings(
            "spilling calibration activations to disk is not built for mixture-of-experts \
             models (each expert reads the held inputs of its tokens)"
                .into(),
        ));
    }
    let mut writer = if out.join(uc_format::JOURNAL_FILE).is_file() {
        PackWriter::resume(out)?
    } else {
        PackWriter::create(out, source_info(&ck)?)?
    };
    // A killed run's spill files: never reused (the streams are recomputed through the
    // completed blocks, as on every resume), so they go now.
    spill::remove_stale(out)?;
    let done =
        |w: &PackWriter, file: &str| w.is_complete(&format!("{}/{file}", uc_format::TENSORS_DIR));
    let resumed = (0..cfg.num_layers)
        .filter(|&i| done(&writer, &block_container(i)))
        .count();
    progress(Event::Start {
        blocks: cfg.num_layers,
        resumed,
    });

    let needs_calibration = opts.method == Method::Gptq || opts.budget_bpw.is_some();
    let windows = match (&opts.calibration, needs_calibration) {
        (Some(cal), true) => Some(cal.windows().map_err(CompressError::Settings)?),
        (None, true) => {
            return Err(CompressError::Settings(
                "the gptq method and a bpw budget need calibration text".into(),
            ))
        }
        (_, false) => None,
    };
    // Per-tensor codecs: the budget's allocation, or the body codec everywhere.
    let mut sensitivity = Vec::new();
    let mut probe_seconds = 0.0;
    let mut specs: HashMap<String, CodecSpec> = HashMap::new();
    let loader = CheckpointLoader::open(src)?;
    if let (Some(budget), Some((ids, record))) = (opts.budget_bpw, &windows) {
        let t = Instant::now();
        sensitivity = probe(&ck, &loader, ids, record.seq_len, &opts.body, progress)?;
        probe_seconds = t.elapsed().as_secs_f64();
        let candidates: Vec<CodecSpec> = BUDGET_BITS
            .iter()
            // Trellis codes stop at 7 bits: the 8-bit candidate stays scalar.
            .map(|&bits| CodecSpec {
                bits,
                trellis: opts.body.trellis && bits <= 7,
                ..opts.body
            })
            .collect();
        let chosen = match opts.budget_scope {
            BudgetScope::Model => allocate(&sensitivity, &candidates, budget)?,
            BudgetScope::Block => {
                let mut all = Vec::with_capacity(sensitivity.len());
                let mut rest = &sensitivity[..];
                for layer in 0..cfg.num_layers {
                    let n = block_linears(&cfg, layer).len().min(rest.len());
                    let (block, tail) = rest.split_at(n);
                    all.extend(allocate(block, &candidates, budget)?);
                    rest = tail;
                }
                all
            }
        };
        specs = sensitivity
            .iter()
            .map(|s| s.name.clone())
            .zip(chosen)
            .collect();
    }
    if let Some((_, record)) = &windows {
        let mut cal = serde_json::to_value(record)
            .map_err(|e| CompressError::Settings(format!("calibration record: {e}")))?;
        if let Some(budget) = opts.budget_bpw {
            cal["allocation"] = serde_json::json!({
                "budget_bpw": budget,
                "scope": opts.budget_scope,
                "candidate_bits": BUDGET_BITS,
                "probe_bits": PROBE_BITS,
                "probe_seqs": PROBE_SEQS,
                "sensitivity": sensitivity,
            });
        }
        if opts.method == Method::Gptq {
            cal["gptq"] = serde_json::json!({
                "damp": opts.gptq.damp,
                "act_order": opts.gptq.act_order,
                "refit_rounds": opts.gptq.refit_rounds,
                "shrink": if opts.auto_shrink {
                    serde_json::json!("auto")
                } else {
                    serde_json::json!(opts.gptq.shrink)
                },
            });
            // Written only when used: packs without it keep their bytes.
            if opts.gptq.descent_passes > 0 {
                cal["gptq"]["descent_passes"] = opts.gptq.descent_passes.into();
            }
            cal["teacher_target"] = opts.teacher_target.into();
            cal["target_damp"] = opts.target_damp.into();
            // Written only when true: a pack without it has the round-to-nearest head of
            // every pack before, and `--plain-head` writes those same bytes.
            if calibrated_head(&cfg, opts) {
                cal["calibrated_head"] = true.into();
            }
        }
        writer.set_calibration(cal)?;
    }
    let spec_of = |name: &str| *specs.get(name).unwrap_or(&opts.body);
    let mut stream = match (opts.method, &windows) {
        (Method::Gptq, Some((ids, record))) => {
            let spill = if opts.spill_activations {
                Some(SpillDir::create(out)?)
            } else {
                None
            };
            Some(Stream::new(&ck, ids, record.seq_len, spill)?)
        }
        _ => None,
    };
    drop(windows);

    let mut tensors = Vec::new();
    let mut blocks = Vec::new();
    for layer in 0..cfg.num_layers {
        let file = block_container(layer);
        let complete = done(&writer, &file);
        if complete && stream.is_none() {
            continue;
        }
        let start = Instant::now();
        let mut c = ContainerBuilder::new(&file)?;
        let p = block_prefix(&cfg, layer);
        let mut out_rel_mse = None;
        let mut expert_tokens = Vec::new();
        match stream.as_mut() {
            None => {
                for lin in block_linears(&cfg, layer) {
                    let name = format!("{p}.{lin}.weight");
                    let spec = spec_of(&name);
                    tensors.push(quantize_from(&ck, &mut c, &name, Role::Body, &spec)?);
                }
            }
            Some(st) => {
                // A resumed block is recomputed (deterministically: the same codes) so
                // the quantized stream can be carried forward; its file is kept.
                let (ts, mse, experts) = st.block(&ck, &loader, layer, &mut c, opts, &spec_of)?;
                expert_tokens = experts.iter().map(|e| e.tokens).collect();
                let bits: f64 = ts.iter().map(|t| t.bpw * t.elements as f64).sum();
                let elements: u64 = ts.iter().map(|t| t.elements).sum();
                if !complete {
                    tensors.extend(ts);
                }
                blocks.push(BlockSummary {
                    index: layer,
                    out_rel_mse: mse,
                    bpw: bits / elements.max(1) as f64,
                    seconds: start.elapsed().as_secs_f64(),
                    experts,
                });
                out_rel_mse = Some(mse);
            }
        }
        if complete {
            continue;
        }
        if cfg.attention_bias {
            for lin in &uc_model::names::BLOCK_LINEARS[..3] {
                dense_into(&ck, &mut c, &format!("{p}.{lin}.bias"), Role::Other)?;
            }
        }
        if cfg.experts_of(layer) > 0 {
            // The router picks experts: kept exact (f32), never quantized.
            let router = format!("{p}.{}.weight", moe_router(cfg.family));
            dense_into(&ck, &mut c, &router, Role::Other)?;
        }
        if cfg.ssm.is_some() {
            // Mamba: the norm, and the mixer's conv, A_log, D and biases, all exact (f32):
            // they are few (O(d_inner * (state + kernel)) per block) and the recurrence
            // compounds their errors over every position.
            dense_into(&ck, &mut c, &format!("{p}.{MAMBA_NORM}"), Role::Norm)?;
            for name in mamba_exact(&cfg) {
                dense_into(&ck, &mut c, &format!("{p}.{name}"), Role::Other)?;
            }
        } else {
            // The family's norms (required: a missing one is an error naming it, not a
            // pack that cannot run), in the order Llama-family packs have always been
            // written.
            let slots = uc_model::names::block_norms(cfg.norm_layout);
            let qk = cfg.qk_norm != uc_model::config::QkNorm::None;
            for norm in [
                "input_layernorm",
                "post_attention_layernorm",
                "pre_feedforward_layernorm",
                "post_feedforward_layernorm",
                "self_attn.q_norm",
                "self_attn.k_norm",
            ] {
                let name = format!("{p}.{norm}.weight");
                let required =
                    slots.contains(&Some(norm)) || (qk && norm.starts_with("self_attn."));
                if required || ck.contains(&name) {
                    dense_into(&ck, &mut c, &name, Role::Norm)?;
                }
            }
        }
        writer.write_container(c)?;
        progress(Event::BlockDone {
            index: layer,
            seconds: start.elapsed().as_secs_f64(),
            out_rel_mse,
            expert_tokens,
        });
    }

    let globals_done = done(&writer, GLOBALS_CONTAINER);
    // The head's statistics from the final states, before the streams go.
    let head_stats = match &mut stream {
        Some(st) if calibrated_head(&cfg, opts) && !globals_done => {
            let norm = loader.final_norm()?;
            Some(st.head_stats(&norm, cfg.rms_norm_eps as f32, opts.teacher_target)?)
        }
        _ => None,
    };
    // The streams' memory, before the embedding is read and encoded; the spill files,
    // before the manifest lists the pack's files.
    stream.map_or(Ok(()), Stream::close)?;
    if !globals_done {
        let mut c = ContainerBuilder::new(GLOBALS_CONTAINER)?;
        // The tied embedding is the head: calibrated as the head (its input side, one
        // row per token, moved KLD by 0.5% where the head's moved it by 10%).
        let mut head_stats = head_stats;
        let mut encode =
            |c: &mut ContainerBuilder, name: &str, role: Role, head: bool| match head_stats
                .take_if(|_| head)
            {
                Some(stats) => quantize_head(&ck, c, name, role, &opts.embed, stats, opts),
                None => quantize_from(&ck, c, name, role, &opts.embed),
            };
        let tied = cfg.tie_word_embeddings;
        tensors.push(encode(&mut c, embed_name(cfg.family), Role::Embed, tied)?);
        if !tied {
            tensors.push(encode(&mut c, LM_HEAD, Role::Head, true)?);
        }
        dense_into(&ck, &mut c, final_norm(cfg.family), Role::Norm)?;
        writer.write_container(c)?;
    }
    progress(Event::GlobalsDone);

    for name in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        let p = src.join(name);
        if p.is_file() && !writer.is_complete(name) {
            writer.copy_file(name, &p)?;
        }
    }
    let manifest = writer.finish()?;
    Ok(Summary {
        manifest,
        resumed_blocks: resumed,
        tensors,
        blocks,
        sensitivity,
        probe_seconds,
    })
}

/// The embedding rows of `ids`, `(ids.len(), hidden)` row-major (the teacher's: the
/// embedding's own quantization error is measured by evaluation, not fed into blocks).
fn embed(ck: &Checkpoint, ids: &[u32]) -> Result<Vec<f32>> {
    let cfg = ck.config();
    let (vocab, h) = (cfg.vocab_size, cfg.hidden_size);
    let name = embed_name(cfg.family);
    let (table, shape) = ck.tensor_f32(name)?;
    if shape != [vocab, h] {
        return Err(uc_model::ModelError::ShapeMismatch {
            name: name.into(),
            file: ck.file_of(name).unwrap_or(ck.dir()).to_path_buf(),
            found: shape,
            expected: vec![vocab, h],
        }
        .into());
    }
    let mut x = Vec::with_capacity(ids.len() * h);
    for (position, &id) in ids.iter().enumerate() {
        let row = table.get(id as usize * h..(id as usize + 1) * h).ok_or(
            uc_model::ModelError::TokenOutOfRange {
                id,
                position,
                vocab,
            },
        )?;
        x.extend_from_slice(row);
    }
    // The decoder's own embedding step (Gemma scales it).
    uc_runtime::scale_embedding(cfg, &mut x);
    Ok(x)
}

/// Linear `k` of `b` as f32 `(rows, cols)`.
fn weight_of(b: &BlockWeights, k: usize) -> (Vec<f32>, usize, usize) {
    let w = &b.linears[k];
    let mut buf = Vec::new();
    let v = w
        .weight_f32(uc_runtime::kernels::Isa::Scalar, &mut buf)
        .to_vec();
    (v, w.rows(), w.cols())
}

/// Linear `k` of teacher block `b` (named `name`) as f32 `(rows, cols)`: a MoE expert,
/// which the block leaves in the checkpoint, read whole from `ck` (a read error names
/// the tensor); anything else copied out of the block.
fn teacher_weight(
    ck: &Checkpoint,
    b: &BlockWeights,
    k: usize,
    name: &str,
) -> Result<(Vec<f32>, usize, usize)> {
    if b.experts() == 0 || k < 4 {
        return Ok(weight_of(b, k));
    }
    let (rows, cols) = (b.linears[k].rows(), b.linears[k].cols());
    let (w, _) = ck.tensor_f32(name)?;
    Ok((w, rows, cols))
}

/// `recon (rows, cols)` as a linear to swap into a block.
fn dense(name: &str, recon: Vec<f32>, rows: usize, cols: usize) -> Result<Box<dyn Linear>> {
    Ok(Box::new(DenseLinear::new(name, recon, rows, cols)?))
}

/// The sensitivity probe: on the teacher stream of the first [`PROBE_SEQS`] calibration
/// windows (`ids`: `(n_seqs, seq_len)` row-major), block by block, the per-channel
/// relative MSE ([`channel_rel_mse`]) that round-to-nearest at [`PROBE_BITS`] bits
/// (group and scale dtype of `body`) of each linear alone adds to the block output. One
/// block's weights resident at a time, like the main pass.
fn probe(
    ck: &Checkpoint,
    loader: &CheckpointLoader,
    ids: &[u32],
    seq_len: usize,
    body: &CodecSpec,
    progress: &mut dyn FnMut(Event),
) -> Result<Vec<Sensitivity>> {
    let cfg = ck.config();
    let h = cfg.hidden_size;
    let n = (ids.len() / seq_len).min(PROBE_SEQS);
    let stager = Stager::new(cfg, seq_len)?;
    // x: (n * seq_len, hidden)
    let mut x = embed(ck, &ids[..n * seq_len])?;
    // The probe measures the codes' error alone: no overlay.
    // Scalar codes: the probe ranks tensors by sensitivity; the trellis gain is about the
    // same factor for every tensor.
    let spec = CodecSpec {
        bits: PROBE_BITS,
        rank: 0,
        trellis: false,
        ..*body
    };
    let mut out = Vec::new();
    for layer in 0..cfg.num_layers {
        // Experts left in the checkpoint, as in the main pass.
        let mut block = loader.block_lazy_experts(layer)?;
        // The teacher's forward paused before each stage: a probed linear's block
        // output is computed from its own stage on (bit-identical to a whole forward,
        // since everything before it is the teacher's).
        let mut stages: Vec<Paused> = Vec::with_capacity(Tap::ALL.len());
        let mut st = stager.begin(&block, x)?;
        let y = loop {
            stages.push(st.clone());
            match stager.resume(&block, st) {
                Step::Paused(next) => st = next,
                Step::Done(y) => break y,
            }
        };
        let p = block_prefix(cfg, layer);
        for (k, lin) in block_linears(cfg, layer).iter().enumerate() {
            let name = format!("{p}.{lin}.weight");
            let (w, rows, cols) = teacher_weight(ck, &block, k, &name)?;
            let spec = crate::alloc::per_tensor(&spec, rows, cols);
            let qt = uc_codec::encode_rtn(&w, rows, cols, &spec, None).map_err(codec_err(&name))?;
            let recon = model_recon(&name, &qt)?;
            let teacher =
                std::mem::replace(&mut block.linears[k], dense(&name, recon, rows, cols)?);
            let tap = Tap::of_block_linear(&block, k);
            let probed = stager.finish(&block, stages[tap.index()].clone());
            block.linears[k] = teacher;
            out.push(Sensitivity {
                name,
                rows,
                cols,
                probe_rel_mse: channel_rel_mse(&probed, &y, h),
            });
        }
        x = y;
        progress(Event::Probed {
            index: layer,
            blocks: cfg.num_layers,
        });
    }
    Ok(out)
}

/// Adds expert `e`'s rows of every paused student forward at MoE tap `tap` to `g`, chunk
/// by chunk: at [`Tap::Mlp`] the MLP-input rows of the tokens routed to `e`, at
/// [`Tap::MlpDown`] its own rows of the (assignments, inter) activations.
fn expert_gram(stud: &[Option<Paused>], tap: Tap, e: usize, g: &mut Gram) -> Result<()> {
    let mut rows = Vec::new();
    for s in stud.iter().flatten() {
        let r = s
            .routes()
            .ok_or_else(|| CompressError::Settings("a MoE tap without routes".into()))?;
        if r.count(e) == 0 {
            continue;
        }
        let (x, cols) = (s.input(), s.cols());
        if tap == Tap::Mlp {
            rows.clear();
            for &t in r.tokens(e) {
                let t = t as usize;
                rows.extend_from_slice(&x[t * cols..(t + 1) * cols]);
            }
            g.add(&rows);
        } else {
            let rg = r.range(e);
            g.add(&x[rg.start * cols..rg.end * cols]);
        }
    }
    Ok(())
}

/// Hidden states of the calibration windows through the teacher and through the
/// quantized model so far, `(n_seqs * seq_len, hidden)` row-major each: in memory, or
/// spilled to disk ([`Options::spill_activations`]).
struct Stream {
    teacher: Held,
    student: Held,
    stager: Stager,
    /// With spilling: the directory of the files.
    spill: Option<SpillDir>,
}

/// Where one stream's hidden states live between blocks.
enum Held {
    /// In memory.
    Ram(Vec<f32>),
    /// In a file under the spill directory.
    Disk(Spilled),
}

impl Held {
    /// Values held.
    fn len(&self) -> usize {
        match self {
            Held::Ram(x) => x.len(),
            Held::Disk(f) => f.len(),
        }
    }

    /// Chunk `i` of `len` values (the last one may be shorter).
    fn chunk(&mut self, i: usize, len: usize) -> Result<Cow<'_, [f32]>> {
        Ok(match self {
            Held::Ram(x) => Cow::Borrowed(&x[i * len..(i * len + len).min(x.len())]),
            Held::Disk(f) => Cow::Owned(f.read(i * len, len)?),
        })
    }
}

/// Where a block's outputs of one stream go, chunk by chunk, in order.
enum Sink {
    /// Into memory.
    Ram(Vec<f32>),
    /// Into the next block's spill file.
    Disk(SpillWriter),
}

impl Sink {
    fn push(&mut self, y: Vec<f32>) -> Result<()> {
        match self {
            Sink::Ram(v) => {
                v.extend(y);
                Ok(())
            }
            Sink::Disk(w) => w.push(&y),
        }
    }

    /// The outputs as the next block's input (a file renamed into place).
    fn done(self) -> Result<Held> {
        Ok(match self {
            Sink::Ram(v) => Held::Ram(v),
            Sink::Disk(w) => Held::Disk(w.commit()?),
        })
    }
}

/// A block's forwards of one stream, by chunk of [`CHUNK`] windows.
enum Forwards {
    /// One paused forward per chunk, held between stages at the last stage's tap.
    Held(Vec<Option<Paused>>),
    /// The block input on disk: each stage recomputes a chunk's forward from it.
    Spilled(Spilled),
}

/// Chunk `i`'s held paused forward, taken out.
fn take_held(v: &mut [Option<Paused>], i: usize) -> Result<Paused> {
    v.get_mut(i)
        .and_then(Option::take)
        .ok_or_else(|| CompressError::Settings("lost a paused forward".into()))
}

impl Forwards {
    /// The forwards of `x` through block `b`, chunks of `len` values: held (begun here)
    /// or left on disk.
    fn new(st: &Stager, b: &BlockWeights, x: Held, len: usize) -> Result<Self> {
        Ok(match x {
            Held::Ram(x) => Forwards::Held(
                chunks_of(x, len)
                    .into_iter()
                    .map(|x| st.begin(b, x).map(Some))
                    .collect::<std::result::Result<_, _>>()?,
            ),
            Held::Disk(f) => Forwards::Spilled(f),
        })
    }

    /// Chunk `i`'s forward through `b`, paused at the tap of stage `stage`: the held one
    /// (taken out) resumed from the previous stage's tap, or recomputed from the block
    /// input. The same bits either way: `b`'s linears before the tap are the ones the
    /// held forward ran through ([`uc_runtime::staged`]).
    fn take(
        &mut self,
        st: &Stager,
        b: &BlockWeights,
        i: usize,
        stage: usize,
        len: usize,
    ) -> Result<Paused> {
        match self {
            Forwards::Held(v) => {
                let p = take_held(v, i)?;
                if stage == 0 {
                    Ok(p)
                } else {
                    paused(st.resume(b, p))
                }
            }
            Forwards::Spilled(f) => {
                let mut p = st.begin(b, f.read(i * len, len)?)?;
                for _ in 0..stage {
                    p = paused(st.resume(b, p))?;
                }
                Ok(p)
            }
        }
    }

    /// Keeps chunk `i`'s paused forward for the next stage (a spilled stream recomputes
    /// it instead).
    fn put(&mut self, i: usize, p: Paused) {
        if let Forwards::Held(v) = self {
            v[i] = Some(p);
        }
    }

    /// Chunk `i`'s block output through `b`.
    fn finish(&mut self, st: &Stager, b: &BlockWeights, i: usize, len: usize) -> Result<Vec<f32>> {
        match self {
            Forwards::Held(v) => Ok(st.finish(b, take_held(v, i)?)),
            Forwards::Spilled(f) => Ok(st.finish(b, st.begin(b, f.read(i * len, len)?)?)),
        }
    }

    /// The held paused forwards (a mixture-of-experts stage reads them once per expert).
    fn held(&mut self) -> Result<&mut [Option<Paused>]> {
        match self {
            Forwards::Held(v) => Ok(v),
            Forwards::Spilled(_) => Err(CompressError::Settings(
                "spilled calibration activations with a mixture-of-experts block".into(),
            )),
        }
    }

    /// Deletes a spilled block input once every stage has read it.
    fn remove(self) -> Result<()> {
        match self {
            Forwards::Held(_) => Ok(()),
            Forwards::Spilled(f) => f.remove(),
        }
    }
}

/// Windows per forward chunk: one chunk is one call of the stager (its activations) and
/// one term of the Gram matrices' chunk-to-chunk spread ([`Gram::shrinkage`]).
const CHUNK: usize = 4;

/// Mean over hidden channels of each channel's MSE relative to its mean square in `b`
/// (`a`, `b`: (rows, hidden) row-major). Unlike the block's output error (the MSE of all
/// values relative to their mean square), a few channels of huge magnitude (the "massive
/// activations" that appear in the residual stream a few blocks in) do not swamp the
/// measure, so errors in different blocks are comparable.
fn channel_rel_mse(a: &[f32], b: &[f32], hidden: usize) -> f64 {
    let (mut err, mut ms) = (vec![0f64; hidden], vec![0f64; hidden]);
    for (ra, rb) in a.chunks_exact(hidden).zip(b.chunks_exact(hidden)) {
        for c in 0..hidden {
            err[c] += f64::from(ra[c] - rb[c]).powi(2);
            ms[c] += f64::from(rb[c]).powi(2);
        }
    }
    let floor = f64::from(f32::MIN_POSITIVE);
    err.iter()
        .zip(&ms)
        .map(|(e, m)| e / m.max(floor))
        .sum::<f64>()
        / hidden.max(1) as f64
}

/// Splits `x` into chunks of `len` values (the last may be shorter), releasing `x`.
fn chunks_of(x: Vec<f32>, len: usize) -> Vec<Vec<f32>> {
    let out = x.chunks(len).map(<[f32]>::to_vec).collect();
    drop(x);
    out
}

/// A paused forward's next state; `Done` is not expected here.
fn paused(step: Step) -> Result<Paused> {
    match step {
        Step::Paused(p) => Ok(p),
        Step::Done(_) => Err(CompressError::Settings(
            "block forward ended before its last tap".into(),
        )),
    }
}

impl Stream {
    /// Both streams at the teacher's embedding of `ids` (`(n_seqs, seq_len)`); with
    /// `spill`, in its files (the embedding is held once, while it is written).
    fn new(ck: &Checkpoint, ids: &[u32], seq_len: usize, spill: Option<SpillDir>) -> Result<Self> {
        let x = embed(ck, ids)?;
        let stager = Stager::new(ck.config(), seq_len)?;
        let (teacher, student) = match &spill {
            None => (Held::Ram(x.clone()), Held::Ram(x)),
            Some(d) => (
                Held::Disk(spill::spill(d.path(0, "teacher"), &x)?),
                Held::Disk(spill::spill(d.path(0, "student"), &x)?),
            ),
        };
        Ok(Stream {
            teacher,
            student,
            stager,
            spill,
        })
    }

    /// Done with the streams: their memory released, the spill directory removed.
    fn close(self) -> Result<()> {
        let Stream { spill, .. } = self;
        spill.map_or(Ok(()), SpillDir::remove)
    }

    /// The head's statistics after the last block: `H = X_s^T X_s` of the quantized
    /// stream's final-normed states `X_s` (`norm`: the final norm's gains) and, with
    /// `cross`, `C = X_s^T X_t` against the teacher's, summed chunk by chunk as a
    /// stage's are.
    fn head_stats(&mut self, norm: &[f32], eps: f32, cross: bool) -> Result<(Gram, Option<Cross>)> {
        let cols = norm.len();
        let len = CHUNK * self.stager.seq_len() * cols;
        let mut gram = Gram::new(cols);
        let mut cr = cross.then(|| Cross::new(cols));
        for i in 0..self.student.len().div_ceil(len) {
            let s = self.student.chunk(i, len)?;
            let mut xs = vec![0f32; s.len()];
            uc_runtime::kernels::math::rms_norm(&s, norm, eps, &mut xs);
            drop(s);
            gram.add(&xs);
            if let Some(cr) = cr.as_mut() {
                let t = self.teacher.chunk(i, len)?;
                let mut xt = vec![0f32; t.len()];
                uc_runtime::kernels::math::rms_norm(&t, norm, eps, &mut xt);
                cr.add(&xs, &xt);
            }
        }
        Ok((gram, cr))
    }

    /// Quantizes block `layer` into `c`, advances both streams, returns the tensor
    /// summaries and the block's output error.
    ///
    /// Sequential within the block: the linears are encoded in four stages by input
    /// (q/k/v, o, gate/up, down), and each stage's Gram matrix is taken on the quantized
    /// stream through the block as quantized so far, so o sees the quantized q/k/v's
    /// context and down the quantized gate/up's activation. With
    /// [`Options::teacher_target`], each stage also pairs its input with the teacher's
    /// (teacher block on the teacher stream) and encodes towards the teacher's outputs
    /// ([`crate::target`]).
    ///
    /// Memory: per chunk of [`CHUNK`] windows, one paused forward of each stream, both
    /// advanced to the stage being encoded chunk by chunk while its statistics are
    /// summed (so no stage's inputs are held for more than the paused state needs); the
    /// teacher's forward is finished as soon as its last tap has been read. Spilled
    /// ([`Options::spill_activations`]): no paused forward is held between stages; each
    /// stage recomputes one chunk at a time from the block inputs on disk, and the
    /// outputs go to the next block's files chunk by chunk.
    fn block(
        &mut self,
        ck: &Checkpoint,
        loader: &CheckpointLoader,
        layer: usize,
        c: &mut ContainerBuilder,
        opts: &Options,
        spec_of: &dyn Fn(&str) -> CodecSpec,
    ) -> Result<(Vec<TensorSummary>, f64, Vec<ExpertSummary>)> {
        // `None` once the last stage has read the teacher's weights. A MoE block's experts
        // stay in the checkpoint, read a row tile per forward call and whole only while
        // that expert is encoded (`CheckpointLoader::block_lazy_experts`).
        let mut teacher_block = Some(loader.block_lazy_experts(layer)?);
        let released =
            || CompressError::Settings("teacher block released before its last stage".into());
        // The student: the teacher's norms, its linears swapped for their
        // reconstructions stage by stage (a MoE block's experts: their codes, see
        // crate::expert; before that, never run, left in the checkpoint).
        let mut student = loader.block_lazy_experts(layer)?;
        let st = &self.stager;
        let len = CHUNK * st.seq_len() * loader.config().hidden_size;
        let keep = opts.teacher_target;
        let total = self.student.len();
        let n_chunks = total.div_ceil(len);
        // The forwards per chunk: paused at the previous stage's tap (both start at the
        // first), or recomputed from the spilled block inputs.
        let teacher = teacher_block.as_ref().ok_or_else(released)?;
        let take_held = |h: &mut Held| std::mem::replace(h, Held::Ram(Vec::new()));
        let mut teach = Forwards::new(st, teacher, take_held(&mut self.teacher), len)?;
        let mut stud = Forwards::new(st, &student, take_held(&mut self.student), len)?;
        // Where the block outputs go: memory, or the next block's spill files.
        let sink = |stream: &str| -> Result<Sink> {
            Ok(match &self.spill {
                None => Sink::Ram(Vec::with_capacity(total)),
                Some(d) => Sink::Disk(SpillWriter::create(d.path(layer + 1, stream))?),
            })
        };
        let mut next_teacher = sink("teacher")?;
        let p = block_prefix(loader.config(), layer);
        let names = block_linears(loader.config(), layer);
        let mut summaries = Vec::with_capacity(names.len());
        let experts = student.experts();
        let min_tokens = expert_min_tokens(loader.config());
        // MoE: calibration tokens routed to each expert (counted at the gate/up tap).
        let mut routed = vec![0usize; experts];
        let new_gram = |cols: usize| {
            if opts.auto_shrink {
                Gram::with_spread(cols)
            } else {
                Gram::new(cols)
            }
        };
        for (stage, tap) in Tap::ALL.into_iter().enumerate() {
            let teacher = teacher_block.as_ref().ok_or_else(released)?;
            let moe_stage = experts > 0 && matches!(tap, Tap::Mlp | Tap::MlpDown);
            // Dense stage: the one Gram matrix of the tap. MoE stage: the pooled one
            // (every row of the tap: the fallback); each expert's own is built after this
            // loop, one expert at a time.
            let mut h: Option<Gram> = None;
            let mut cross: Option<Cross> = None;
            for i in 0..n_chunks {
                // Both to this stage's tap: the student with the stages encoded so far.
                let t = teach.take(st, teacher, i, stage, len)?;
                let s = stud.take(st, &student, i, stage, len)?;
                // H = X_s^T X_s and C = X_s^T X_t of this stage's input.
                let cols = s.cols();
                let h = h.get_or_insert_with(|| new_gram(cols));
                h.add(s.input());
                if moe_stage && tap == Tap::Mlp {
                    let r = s.routes().ok_or_else(|| {
                        CompressError::Settings(format!("block {layer}: MoE tap without routes"))
                    })?;
                    for (e, n) in routed.iter_mut().enumerate() {
                        *n += r.count(e);
                    }
                } else if keep && !moe_stage {
                    cross
                        .get_or_insert_with(|| Cross::new(cols))
                        .add(s.input(), t.input());
                }
                let (mut t, mut s) = (t, s);
                if matches!(tap, Tap::Attention | Tap::Mlp) {
                    // Inputs that are the normed stream: recomputed when resumed. (A MoE
                    // stage keeps the student's until every expert's Gram is taken.)
                    t.compact();
                    if !moe_stage {
                        s.compact();
                    }
                }
                if tap == Tap::MlpDown && opts.recompute_mlp_input && !moe_stage {
                    // gate/up's output, recomputed by `finish` below with the same
                    // (already quantized) gate/up weights: the same bits.
                    s.compact();
                }
                if tap == Tap::MlpDown {
                    // The teacher's last tap is read: finish its forward now.
                    next_teacher.push(st.finish(teacher, t))?;
                } else {
                    teach.put(i, t);
                }
                stud.put(i, s);
            }
            let Some(mut h) = h else {
                return Err(CompressError::Settings("no calibration chunks".into()));
            };
            let gptq = GptqOptions {
                shrink: h.shrinkage().unwrap_or(opts.gptq.shrink),
                ..opts.gptq
            };
            if moe_stage {
                let teacher = teacher_block.as_ref().ok_or_else(released)?;
                #[allow(clippy::needless_range_loop)] // e also names the expert
                for e in 0..experts {
                    // Expert e's Gram matrix from its rows of every chunk (in chunk order),
                    // held only while its linears are encoded; too few tokens: the pooled.
                    let own = if routed[e] >= min_tokens {
                        let mut g = new_gram(h.cols);
                        expert_gram(stud.held()?, tap, e, &mut g)?;
                        Some(g)
                    } else {
                        None
                    };
                    let (gram, gptq) = match &own {
                        Some(g) => (
                            g,
                            GptqOptions {
                                shrink: g.shrinkage().unwrap_or(opts.gptq.shrink),
                                ..opts.gptq
                            },
                        ),
                        None => (&h, gptq),
                    };
                    let ks: &[usize] = match tap {
                        Tap::Mlp => &[4 + 3 * e, 5 + 3 * e],
                        _ => &[6 + 3 * e],
                    };
                    for &k in ks {
                        // The teacher's weights of this expert linear: read from the
                        // checkpoint now, freed after its encode (the teacher block
                        // leaves its experts in the checkpoint).
                        let name = format!("{p}.{}.weight", names[k]);
                        let (w, rows, cols) = teacher_weight(ck, teacher, k, &name)?;
                        let spec = spec_of(&name);
                        // The error is measured on the reconstruction a few rows at a
                        // time (the same bits as on the whole one).
                        let (summary, _, qt) = quantize_into(
                            c,
                            &name,
                            &w,
                            &[rows, cols],
                            Role::Body,
                            &spec,
                            Some((Cow::Borrowed(&gram.h), gptq)),
                            false,
                        )?;
                        // The student keeps the codes, not an f32 copy (crate::expert).
                        student.linears[k] = Box::new(PackedExpert::new(&name, qt)?);
                        summaries.push(summary);
                    }
                }
                // Every expert has read its rows: the held inputs go (recomputed when
                // resumed, as in a dense stage).
                for s in stud.held()?.iter_mut().flatten() {
                    if tap == Tap::Mlp || opts.recompute_mlp_input {
                        s.compact();
                    }
                }
                if tap == Tap::MlpDown {
                    teacher_block = None;
                }
                continue;
            }
            // The teacher's weights of this stage; past the last stage's statistics the
            // teacher block is not needed any more (its forward is finished), and goes
            // before the solves allocate.
            let linears = tap.linears_in(&student);
            let ws: Vec<(Vec<f32>, usize, usize)> =
                linears.iter().map(|&k| weight_of(teacher, k)).collect();
            if tap == Tap::MlpDown {
                teacher_block = None;
            }
            // The teacher-target solves consume C before error feedback starts.
            let targets = match cross.take() {
                Some(cr) => {
                    let refs: Vec<(&[f32], usize)> =
                        ws.iter().map(|(w, rows, _)| (&w[..], *rows)).collect();
                    crate::target::teacher_targets(&refs, h.cols, &h.h, cr.c, opts.target_damp)
                }
                None => vec![None; ws.len()],
            };
            let last = linears.len().saturating_sub(1);
            for (i, ((&k, (w, rows, cols)), target)) in
                linears.iter().zip(ws).zip(targets).enumerate()
            {
                let name = format!("{p}.{}.weight", names[k]);
                let spec = spec_of(&name);
                // The stage's last linear takes H over: nothing reads it afterwards.
                let hk = if i == last {
                    Cow::Owned(std::mem::take(&mut h.h))
                } else {
                    Cow::Borrowed(&h.h[..])
                };
                let (mut summary, recon, _) = quantize_into(
                    c,
                    &name,
                    target.as_deref().unwrap_or(&w),
                    &[rows, cols],
                    Role::Body,
                    &spec,
                    Some((hk, gptq)),
                    true,
                )?;
                drop(target);
                let Some(recon) = recon else {
                    return Err(CompressError::Settings(format!(
                        "{name}: no reconstruction"
                    )));
                };
                summary.rel_err = rel_err(&w, &recon);
                student.linears[k] = dense(&name, recon, rows, cols)?;
                summaries.push(summary);
            }
        }
        // Past the last stage, now quantized: the student's block output, and its error
        // against the teacher's, summed chunk by chunk in value order.
        let mut next_teacher = next_teacher.done()?;
        teach.remove()?;
        let mut next_student = sink("student")?;
        let mut sums = (0f64, 0f64);
        for i in 0..n_chunks {
            let y = stud.finish(st, &student, i, len)?;
            let yt = next_teacher.chunk(i, len)?;
            err_sums(&yt, &y, &mut sums);
            next_student.push(y)?;
        }
        stud.remove()?;
        let mse = sums.0 / sums.1.max(f64::MIN_POSITIVE);
        self.teacher = next_teacher;
        self.student = next_student.done()?;
        let experts = routed
            .into_iter()
            .enumerate()
            .map(|(expert, tokens)| ExpertSummary {
                expert,
                tokens,
                fallback: tokens < min_tokens,
            })
            .collect();
        Ok((summaries, mse, experts))
    }
}
