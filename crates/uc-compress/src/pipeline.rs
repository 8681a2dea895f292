//! The per-block loop.

use crate::alloc::{allocate, Sensitivity, PROBE_BITS};
use crate::calib::{Calibration, Gram};
use crate::{CompressError, Result};
use candle_core::Tensor;
use serde::Serialize;
use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;
use uc_codec::{CodecSpec, GptqOptions, Kernel, QuantTensor};
use uc_format::{
    block_container, ContainerBuilder, DenseDtype, Manifest, PackWriter, Role, SourceFile,
    SourceInfo, GLOBALS_CONTAINER,
};
use uc_model::checkpoint::Checkpoint;
use uc_model::llama::{
    block_prefix, Block, Globals, RotaryTables, Step, Tap, BLOCK_LINEARS, EMBED, FINAL_NORM,
    LM_HEAD,
};
use uc_model::source::WeightSource;

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

fn codec_err(tensor: &str) -> impl FnOnce(uc_codec::CodecError) -> CompressError + '_ {
    move |source| CompressError::Codec {
        tensor: tensor.to_string(),
        source,
    }
}

/// ||a - b|| / ||a|| in f64.
fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        num += f64::from(x - y).powi(2);
        den += f64::from(x).powi(2);
    }
    if den > 0.0 {
        (num / den).sqrt()
    } else {
        0.0
    }
}

/// Encodes weight `name` (rows x cols) with `spec` -- by error feedback when a Gram
/// matrix is given -- adds it to `c`, and returns its reconstruction.
fn quantize_into(
    c: &mut ContainerBuilder,
    name: &str,
    w: &[f32],
    shape: &[usize],
    role: Role,
    spec: &CodecSpec,
    gram: Option<(&Gram, GptqOptions)>,
) -> Result<(TensorSummary, Vec<f32>)> {
    let [rows, cols] = shape[..] else {
        return Err(CompressError::Settings(format!(
            "{name}: expected a 2-D weight, got {shape:?}"
        )));
    };
    // Codes first (without overlay), then the overlay fitted to what they left, in the
    // same activation metric.
    let base_spec = CodecSpec { rank: 0, ..*spec };
    let mut qt: QuantTensor = match gram {
        None => uc_codec::encode_rtn(w, rows, cols, &base_spec, None),
        Some((g, o)) => uc_codec::encode_gptq(w, rows, cols, &base_spec, &g.h, o),
    }
    .map_err(codec_err(name))?;
    if spec.rank > 0 {
        let base = uc_codec::reconstruct(&qt, Kernel::select(false)).map_err(codec_err(name))?;
        let resid: Vec<f32> = w.iter().zip(&base).map(|(a, b)| a - b).collect();
        let overlay = uc_codec::fit_overlay(
            &resid,
            rows,
            cols,
            spec.rank as usize,
            gram.map(|(g, _)| g.h.as_slice()),
            gram.map_or(0.0, |(_, o)| o.damp),
        )
        .map_err(codec_err(name))?;
        qt.spec = *spec;
        qt.overlay = Some(overlay);
    }
    let recon = uc_codec::reconstruct(&qt, Kernel::select(false)).map_err(codec_err(name))?;
    let err = rel_err(w, &recon);
    let mut stats = serde_json::Map::new();
    stats.insert("rel_err".into(), err.into());
    let shrink = gram.map(|(_, o)| o.shrink).filter(|&s| s > 0.0);
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
    Ok((summary, recon))
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
    Ok(quantize_into(c, name, &w, &shape, role, spec, None)?.0)
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
    let mut writer = if out.join(uc_format::JOURNAL_FILE).is_file() {
        PackWriter::resume(out)?
    } else {
        PackWriter::create(out, source_info(&ck)?)?
    };
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
    if let (Some(budget), Some((ids, _))) = (opts.budget_bpw, &windows) {
        let t = Instant::now();
        sensitivity = probe(&ck, ids, &opts.body, progress)?;
        probe_seconds = t.elapsed().as_secs_f64();
        let candidates: Vec<CodecSpec> = BUDGET_BITS
            .iter()
            .map(|&bits| CodecSpec { bits, ..opts.body })
            .collect();
        let chosen = match opts.budget_scope {
            BudgetScope::Model => allocate(&sensitivity, &candidates, budget)?,
            BudgetScope::Block => {
                let mut all = Vec::with_capacity(sensitivity.len());
                for block in sensitivity.chunks(BLOCK_LINEARS.len()) {
                    all.extend(allocate(block, &candidates, budget)?);
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
            cal["teacher_target"] = opts.teacher_target.into();
            cal["target_damp"] = opts.target_damp.into();
        }
        writer.set_calibration(cal)?;
    }
    let spec_of = |name: &str| *specs.get(name).unwrap_or(&opts.body);
    let mut stream = match (opts.method, &windows) {
        (Method::Gptq, Some((ids, _))) => Some(Stream::new(&ck, ids)?),
        _ => None,
    };

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
        let p = block_prefix(layer);
        let mut out_rel_mse = None;
        match stream.as_mut() {
            None => {
                for lin in BLOCK_LINEARS {
                    let name = format!("{p}.{lin}.weight");
                    let spec = spec_of(&name);
                    tensors.push(quantize_from(&ck, &mut c, &name, Role::Body, &spec)?);
                }
            }
            Some(st) => {
                // A resumed block is recomputed (deterministically: the same codes) so
                // the quantized stream can be carried forward; its file is kept.
                let (ts, mse) = st.block(&ck, layer, &mut c, opts, &spec_of)?;
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
                });
                out_rel_mse = Some(mse);
            }
        }
        if complete {
            continue;
        }
        for (k, lin) in BLOCK_LINEARS.iter().enumerate() {
            if k < 3 && cfg.attention_bias {
                dense_into(&ck, &mut c, &format!("{p}.{lin}.bias"), Role::Other)?;
            }
        }
        for norm in [
            "input_layernorm",
            "post_attention_layernorm",
            "self_attn.q_norm",
            "self_attn.k_norm",
        ] {
            let name = format!("{p}.{norm}.weight");
            if ck.contains(&name) {
                dense_into(&ck, &mut c, &name, Role::Norm)?;
            }
        }
        writer.write_container(c)?;
        progress(Event::BlockDone {
            index: layer,
            seconds: start.elapsed().as_secs_f64(),
            out_rel_mse,
        });
    }

    if !done(&writer, GLOBALS_CONTAINER) {
        let mut c = ContainerBuilder::new(GLOBALS_CONTAINER)?;
        tensors.push(quantize_from(&ck, &mut c, EMBED, Role::Embed, &opts.embed)?);
        if !cfg.tie_word_embeddings {
            tensors.push(quantize_from(
                &ck,
                &mut c,
                LM_HEAD,
                Role::Head,
                &opts.embed,
            )?);
        }
        dense_into(&ck, &mut c, FINAL_NORM, Role::Norm)?;
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

/// The sensitivity probe: on the teacher stream of the first [`PROBE_SEQS`] calibration
/// windows, block by block, the per-channel relative MSE ([`channel_rel_mse`]) that
/// round-to-nearest at [`PROBE_BITS`] bits (group and scale dtype of `body`) of each
/// linear alone adds to the block output. One block's weights resident at a time, like
/// the main pass.
fn probe(
    ck: &Checkpoint,
    ids: &Tensor,
    body: &CodecSpec,
    progress: &mut dyn FnMut(Event),
) -> Result<Vec<Sensitivity>> {
    let cfg = ck.config();
    let n = ids.dim(0).map_err(uc_model::ModelError::from)?;
    let sub = ids
        .narrow(0, 0, PROBE_SEQS.min(n))
        .map_err(uc_model::ModelError::from)?;
    let seq = sub.dim(1).map_err(uc_model::ModelError::from)?;
    let rope = RotaryTables::new(&cfg.rope, cfg.head_dim, seq)?;
    let mut x = Globals::load(ck)?.embed(&sub)?;
    // The probe measures the codes' error alone: no overlay.
    let spec = CodecSpec {
        bits: PROBE_BITS,
        rank: 0,
        ..*body
    };
    let mut out = Vec::new();
    for layer in 0..cfg.num_layers {
        let block = Block::load(ck, layer)?;
        // The teacher's forward paused before each stage: a probed linear's block
        // output is computed from its own stage on (bit-identical to a whole forward,
        // since everything before it is the teacher's).
        let mut stages = Vec::with_capacity(STAGES.len());
        let mut st = block.begin(&x)?;
        let y = loop {
            stages.push(st.clone());
            match block.resume(st, &rope)? {
                Step::Paused(next) => st = next,
                Step::Done(y) => break y,
            }
        };
        let p = block_prefix(layer);
        for (k, lin) in BLOCK_LINEARS.iter().enumerate() {
            let name = format!("{p}.{lin}.weight");
            let weight = &block.linears[k].weight;
            let shape = weight.dims().to_vec();
            let [rows, cols] = shape[..] else {
                return Err(CompressError::Settings(format!(
                    "{name}: expected a 2-D weight, got {shape:?}"
                )));
            };
            let w = weight
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(uc_model::ModelError::from)?;
            let qt = uc_codec::encode_rtn(&w, rows, cols, &spec, None).map_err(codec_err(&name))?;
            let recon =
                uc_codec::reconstruct(&qt, Kernel::select(false)).map_err(codec_err(&name))?;
            let mut probed = block.clone();
            probed.linears[k].weight = Tensor::from_vec(recon, shape, weight.device())
                .map_err(uc_model::ModelError::from)?;
            let from = stages[STAGES
                .iter()
                .position(|(_, ls)| ls.contains(&k))
                .unwrap_or(0)]
            .clone();
            out.push(Sensitivity {
                name,
                rows,
                cols,
                probe_rel_mse: channel_rel_mse(&probed.finish(from, &rope)?, &y)?,
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

/// Hidden states of the calibration windows through the teacher and through the
/// quantized model so far, `(n_seqs, seq_len, hidden)` each.
struct Stream {
    teacher: Tensor,
    student: Tensor,
    rope: RotaryTables,
}

/// Windows per forward chunk: bounds the attention buffers (chunk x heads x L x L).
const CHUNK: usize = 4;

/// The encoding stages of a block: each input tap with the linears it feeds (indices
/// into [`BLOCK_LINEARS`]), in forward order.
const STAGES: [(Tap, &[usize]); 4] = [
    (Tap::Attention, &[0, 1, 2]),
    (Tap::AttentionOutput, &[3]),
    (Tap::Mlp, &[4, 5]),
    (Tap::MlpDown, &[6]),
];

/// `f` applied to `x` in chunks of [`CHUNK`] windows, in order.
fn each_chunk(x: &Tensor, mut f: impl FnMut(&Tensor) -> uc_model::error::Result<()>) -> Result<()> {
    let n = x.dim(0).map_err(uc_model::ModelError::from)?;
    for s in (0..n).step_by(CHUNK) {
        let part = x
            .narrow(0, s, CHUNK.min(n - s))
            .map_err(uc_model::ModelError::from)?;
        f(&part)?;
    }
    Ok(())
}

/// `f` applied to `x` in chunks of [`CHUNK`] windows, concatenated.
fn chunked(
    x: &Tensor,
    mut f: impl FnMut(&Tensor) -> uc_model::error::Result<Tensor>,
) -> Result<Tensor> {
    let mut outs = Vec::new();
    each_chunk(x, |part| {
        outs.push(f(part)?);
        Ok(())
    })?;
    Ok(Tensor::cat(&outs, 0).map_err(uc_model::ModelError::from)?)
}

/// Mean squared error of `a` against `b`, relative to the mean square of `b`.
fn rel_mse(a: &Tensor, b: &Tensor) -> Result<f64> {
    let m = |t: Tensor| -> uc_model::error::Result<f64> {
        Ok(f64::from(t.sqr()?.mean_all()?.to_scalar::<f32>()?))
    };
    let diff = (a - b).map_err(uc_model::ModelError::from)?;
    Ok(m(diff)? / m(b.clone())?.max(f64::MIN_POSITIVE))
}

/// Mean over hidden channels of each channel's MSE relative to its mean square in `b`
/// (`a`, `b`: (n, seq, hidden)). Unlike [`rel_mse`], a few channels of huge magnitude
/// (the "massive activations" that appear in the residual stream a few blocks in) do not
/// swamp the measure, so errors in different blocks are comparable.
fn channel_rel_mse(a: &Tensor, b: &Tensor) -> Result<f64> {
    let f = || -> uc_model::error::Result<f64> {
        let h = b.dim(2)?;
        let err = (a - b)?.sqr()?.reshape(((), h))?.mean(0)?;
        let ms = b.sqr()?.reshape(((), h))?.mean(0)?;
        let ratio = err.broadcast_div(&ms.clamp(f32::MIN_POSITIVE, f32::MAX)?)?;
        Ok(f64::from(ratio.mean_all()?.to_scalar::<f32>()?))
    };
    Ok(f()?)
}

impl Stream {
    fn new(ck: &Checkpoint, ids: &Tensor) -> Result<Self> {
        let cfg = ck.config();
        let globals = Globals::load(ck)?;
        // Both streams start from the teacher's embedding; the embedding's own
        // quantization error is measured by evaluation, not fed into the blocks.
        let x = globals.embed(ids)?;
        let seq = ids.dim(1).map_err(uc_model::ModelError::from)?;
        Ok(Stream {
            teacher: x.clone(),
            student: x,
            rope: RotaryTables::new(&cfg.rope, cfg.head_dim, seq)?,
        })
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
    fn block(
        &mut self,
        ck: &Checkpoint,
        layer: usize,
        c: &mut ContainerBuilder,
        opts: &Options,
        spec_of: &dyn Fn(&str) -> CodecSpec,
    ) -> Result<(Vec<TensorSummary>, f64)> {
        let teacher = Block::load(ck, layer)?;
        let rope = &self.rope;
        // The teacher's linear inputs, per chunk, in stage order (only kept for the
        // teacher target), and the teacher stream's next state.
        let mut teacher_taps: Vec<Vec<Tensor>> = Vec::new();
        let keep = opts.teacher_target;
        let next_teacher = chunked(&self.teacher, |x| {
            let mut taps = Vec::with_capacity(STAGES.len());
            let y = teacher.forward_tapped(x, rope, &mut |_, input| {
                if keep {
                    taps.push(input.clone());
                }
                Ok(())
            })?;
            teacher_taps.push(taps);
            Ok(y)
        })?;
        // The student's forward, per chunk, paused before the stage being encoded: each
        // stage's inputs come from the block as quantized so far, and nothing is
        // computed twice.
        let mut paused = Vec::new();
        each_chunk(&self.student, |x| {
            paused.push(teacher.begin(x)?);
            Ok(())
        })?;
        let mut outputs = Vec::with_capacity(paused.len());
        let mut student = teacher.clone();
        let p = block_prefix(layer);
        let mut summaries = Vec::with_capacity(BLOCK_LINEARS.len());
        for (stage, (tap, linears)) in STAGES.iter().enumerate() {
            // H = X_s^T X_s and C = X_s^T X_t of this stage's input.
            let cols = paused[0].input.dim(1).map_err(uc_model::ModelError::from)?;
            let mut h = if opts.auto_shrink {
                Gram::with_spread(cols)
            } else {
                Gram::new(cols)
            };
            let mut cross = keep.then(|| Gram::new(cols));
            for (chunk, st) in paused.iter().enumerate() {
                debug_assert_eq!(st.tap, *tap);
                let mut f = || -> candle_core::Result<()> {
                    h.add(&st.input)?;
                    if let Some(cr) = cross.as_mut() {
                        cr.add_cross(&st.input, &teacher_taps[chunk][stage])?;
                    }
                    Ok(())
                };
                f().map_err(uc_model::ModelError::from)?;
            }
            let gptq = GptqOptions {
                shrink: h.shrinkage().unwrap_or(opts.gptq.shrink),
                ..opts.gptq
            };
            for &k in *linears {
                let name = format!("{p}.{}.weight", BLOCK_LINEARS[k]);
                let weight = &teacher.linears[k].weight;
                let shape = weight.dims().to_vec();
                let w = weight
                    .flatten_all()
                    .and_then(|t| t.to_vec1::<f32>())
                    .map_err(uc_model::ModelError::from)?;
                let (rows, cols) = (shape[0], shape[1]);
                let target = cross.as_ref().and_then(|cr| {
                    crate::target::teacher_target(&w, rows, cols, &h.h, &cr.h, opts.target_damp)
                });
                let spec = spec_of(&name);
                let (mut summary, recon) = quantize_into(
                    c,
                    &name,
                    target.as_deref().unwrap_or(&w),
                    &shape,
                    Role::Body,
                    &spec,
                    Some((&h, gptq)),
                )?;
                summary.rel_err = rel_err(&w, &recon);
                student.linears[k].weight = Tensor::from_vec(recon, shape, weight.device())
                    .map_err(uc_model::ModelError::from)?;
                summaries.push(summary);
            }
            // Past this stage's linears, now quantized.
            let mut next = Vec::with_capacity(paused.len());
            for st in paused {
                match student.resume(st, rope)? {
                    Step::Paused(st) => next.push(st),
                    Step::Done(y) => outputs.push(y),
                }
            }
            paused = next;
        }
        drop(teacher_taps);
        self.teacher = next_teacher;
        self.student = Tensor::cat(&outputs, 0).map_err(uc_model::ModelError::from)?;
        let mse = rel_mse(&self.student, &self.teacher)?;
        Ok((summaries, mse))
    }
}
