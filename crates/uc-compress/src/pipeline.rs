//! The per-block loop.

use crate::{CompressError, Result};
use serde::Serialize;
use std::path::Path;
use std::time::Instant;
use uc_codec::{CodecSpec, Kernel, QuantTensor};
use uc_format::{
    block_container, ContainerBuilder, DenseDtype, Manifest, PackWriter, Role, SourceFile,
    SourceInfo, GLOBALS_CONTAINER,
};
use uc_model::checkpoint::Checkpoint;
use uc_model::llama::{block_prefix, BLOCK_LINEARS, EMBED, FINAL_NORM, LM_HEAD};
use uc_model::source::WeightSource;

/// How linear weights are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Round-to-nearest onto a learned codebook, no calibration data.
    Rtn,
}

/// Compression settings.
#[derive(Debug, Clone)]
pub struct Options {
    /// Encoder of the block linears.
    pub method: Method,
    /// Codec of the block linears.
    pub body: CodecSpec,
    /// Codec of the token embedding and (untied) head.
    pub embed: CodecSpec,
}

/// Progress notifications for a front end.
#[derive(Debug, Clone)]
pub enum Event {
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
    /// ||W - W_hat||_F / ||W||_F.
    pub rel_err: f64,
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

/// Encodes tensor `name` of `ck` with `spec` and adds it to `c`.
fn quantize_into(
    ck: &Checkpoint,
    c: &mut ContainerBuilder,
    name: &str,
    role: Role,
    spec: &CodecSpec,
) -> Result<TensorSummary> {
    let (w, shape) = ck.tensor_f32(name)?;
    let [rows, cols] = shape[..] else {
        return Err(CompressError::Settings(format!(
            "{name}: expected a 2-D weight, got {shape:?}"
        )));
    };
    let qt: QuantTensor =
        uc_codec::encode_rtn(&w, rows, cols, spec, None).map_err(codec_err(name))?;
    let recon = uc_codec::reconstruct(&qt, Kernel::select(false)).map_err(codec_err(name))?;
    let err = rel_err(&w, &recon);
    let mut stats = serde_json::Map::new();
    stats.insert("rel_err".into(), err.into());
    uc_codec::pack::write_quant_tensor(c, name, role, &qt, Some(stats)).map_err(codec_err(name))?;
    Ok(TensorSummary {
        name: name.to_string(),
        encoding: spec.name(),
        bpw: spec.bits_per_weight(rows, cols).map_err(codec_err(name))?,
        rel_err: err,
    })
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

    let mut tensors = Vec::new();
    for layer in 0..cfg.num_layers {
        let file = block_container(layer);
        if done(&writer, &file) {
            continue;
        }
        let start = Instant::now();
        let mut c = ContainerBuilder::new(&file)?;
        let p = block_prefix(layer);
        for (k, lin) in BLOCK_LINEARS.iter().enumerate() {
            let name = format!("{p}.{lin}.weight");
            tensors.push(quantize_into(&ck, &mut c, &name, Role::Body, &opts.body)?);
            let bias = format!("{p}.{lin}.bias");
            if k < 3 && cfg.attention_bias {
                dense_into(&ck, &mut c, &bias, Role::Other)?;
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
        });
    }

    if !done(&writer, GLOBALS_CONTAINER) {
        let mut c = ContainerBuilder::new(GLOBALS_CONTAINER)?;
        tensors.push(quantize_into(&ck, &mut c, EMBED, Role::Embed, &opts.embed)?);
        if !cfg.tie_word_embeddings {
            tensors.push(quantize_into(
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
    })
}
