//! uc-export: a verified pack back to dense weights that other tools load.
//!
//! Data flow: [`export_safetensors`] / [`export_gguf`] first verify the pack (every
//! file hash and every tensor's reconstruction digest, as `uc verify`; a failing pack
//! is refused), then reconstruct each tensor exactly as the pack's format specifies
//! (`uc_model::pack_source::PackSource`) and write it dense:
//! - **safetensors**: a Hugging Face directory (`config.json` with the dtype,
//!   `tokenizer.json`, `tokenizer_config.json`, `model.safetensors` in f32, f16 or bf16);
//! - **GGUF**: one llama.cpp file, matrices in f16 or f32, 1-D tensors (norms, biases)
//!   in f32 as llama.cpp's converter writes them; tensor names from uc-model's GGUF
//!   name table ([`uc_model::gguf::gguf_name`], the inverse of the importer's mapping),
//!   llama Q/K rows permuted as llama.cpp expects, hyper-parameters and the byte-level
//!   BPE tokenizer ([`gguf_meta`]) as metadata.
//!
//! Output goes to a sibling temporary path renamed into place at the end, so the
//! destination is either complete or absent; an existing destination is never
//! overwritten.
#![deny(missing_docs)]

pub mod gguf_meta;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Tensor};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use uc_model::config::{Family, ModelConfig};
use uc_model::gguf::{gguf_name, permute_qk_rows, Arch, QkRows};
use uc_model::pack_source::PackSource;
use uc_model::source::WeightSource;

/// Everything that can go wrong exporting.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The pack failed verification; one line per finding.
    #[error("VERIFY: FAIL -- refusing to export this pack\n{0}")]
    Verify(String),
    /// The pack, its config or a tensor could not be read.
    #[error(transparent)]
    Model(#[from] uc_model::ModelError),
    /// A tensor operation failed (conversion, permutation, GGUF encoding).
    #[error("tensor {name}: {reason}")]
    Tensor {
        /// The tensor.
        name: String,
        /// What failed.
        reason: String,
    },
    /// The model or an option is something this exporter does not write.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A tokenizer file is missing or not what GGUF can carry.
    #[error("{path}: {reason}")]
    Tokenizer {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The destination exists; we never overwrite.
    #[error("{0}: already exists")]
    OutputExists(PathBuf),
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> ExportError + '_ {
    move |source| ExportError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn tensor_err(name: &str) -> impl Fn(candle_core::Error) -> ExportError + '_ {
    move |e| ExportError::Tensor {
        name: name.to_string(),
        reason: e.to_string(),
    }
}

/// The element type of exported matrices.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    /// 32-bit float: the pack's reconstruction exactly.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16 (safetensors only).
    Bf16,
}

impl Dtype {
    /// transformers' `torch_dtype` spelling.
    pub fn torch_name(self) -> &'static str {
        match self {
            Dtype::F32 => "float32",
            Dtype::F16 => "float16",
            Dtype::Bf16 => "bfloat16",
        }
    }
}

/// What an export wrote (the CLI prints it; `--json` serializes it).
#[derive(Clone, Debug, Serialize)]
pub struct ExportReport {
    /// `safetensors` or `gguf`.
    pub format: &'static str,
    /// Element type of the matrices.
    pub dtype: Dtype,
    /// The destination.
    pub output: PathBuf,
    /// Fingerprint of the verified pack the weights came from.
    pub pack_fingerprint: String,
    /// Tensors written.
    pub tensors: usize,
    /// Parameters written.
    pub params: u64,
    /// Bytes of the weights file.
    pub bytes: u64,
    /// The largest |exported - reconstructed| over all weights (0 for f32), and the
    /// tensor it is in: the rounding cost of the chosen dtype.
    pub max_rounding_error: f32,
    /// The tensor with that error.
    pub worst_tensor: String,
    /// Things the target format cannot carry exactly (e.g. an unrecognised tokenizer).
    pub warnings: Vec<String>,
}

/// Verifies the pack in `dir` (files and reconstruction digests) and opens it.
fn verified(dir: &Path) -> Result<(PackSource, String), ExportError> {
    let report = uc_codec::pack::verify_dir(dir, 0);
    if !report.pass {
        let lines: Vec<String> = report
            .failures
            .iter()
            .map(|f| format!("  {}: {}", f.subject, f.problem))
            .collect();
        return Err(ExportError::Verify(lines.join("\n")));
    }
    Ok((PackSource::open(dir)?, report.fingerprint))
}

/// Tensor names of the pack, in manifest order.
fn tensor_names(src: &PackSource) -> Vec<String> {
    src.pack()
        .manifest()
        .tensors
        .iter()
        .map(|t| t.name.clone())
        .collect()
}

/// Converts `t` (f32) to `dtype`; returns it and the largest rounding error.
fn convert(name: &str, t: &Tensor, dtype: DType) -> Result<(Tensor, f32), ExportError> {
    if dtype == DType::F32 {
        return Ok((t.clone(), 0.0));
    }
    let e = tensor_err(name);
    let c = t.to_dtype(dtype).map_err(&e)?;
    let back = c.to_dtype(DType::F32).map_err(&e)?;
    let err = (&back - t)
        .map_err(&e)?
        .abs()
        .map_err(&e)?
        .flatten_all()
        .map_err(&e)?
        .max(0)
        .map_err(&e)?
        .to_scalar::<f32>()
        .map_err(&e)?;
    Ok((c, err))
}

/// A sibling temporary path of `out`, and a check that `out` does not exist.
fn staging(out: &Path) -> Result<PathBuf, ExportError> {
    if out.exists() {
        return Err(ExportError::OutputExists(out.to_path_buf()));
    }
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "export".into());
    Ok(out.with_file_name(format!("{name}.tmp-{}", std::process::id())))
}

/// Writes the pack in `pack` as a Hugging Face checkpoint directory `out`.
pub fn export_safetensors(
    pack: &Path,
    out: &Path,
    dtype: Dtype,
) -> Result<ExportReport, ExportError> {
    let (src, fingerprint) = verified(pack)?;
    if src.config().fused_projections() {
        // The pack holds Phi-3's fused projections split (uc-model's checkpoint reader
        // splits them on load); transformers' Phi3 reads only qkv_proj / gate_up_proj.
        return Err(ExportError::Unsupported(
            "Phi-3 checkpoints (re-fusing q/k/v into qkv_proj and gate/up into gate_up_proj \
             is not built)"
                .into(),
        ));
    }
    let tmp = staging(out)?;
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    let result = write_safetensors(&src, pack, &tmp, dtype, &fingerprint, out);
    match result {
        Ok(r) => {
            std::fs::rename(&tmp, out).map_err(io(out))?;
            Ok(r)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

fn write_safetensors(
    src: &PackSource,
    pack: &Path,
    tmp: &Path,
    dtype: Dtype,
    fingerprint: &str,
    out: &Path,
) -> Result<ExportReport, ExportError> {
    let (cdt, sdt) = match dtype {
        Dtype::F32 => (DType::F32, safetensors::Dtype::F32),
        Dtype::F16 => (DType::F16, safetensors::Dtype::F16),
        Dtype::Bf16 => (DType::BF16, safetensors::Dtype::BF16),
    };
    let mut data: BTreeMap<String, (Vec<usize>, Vec<u8>)> = BTreeMap::new();
    let (mut params, mut worst) = (0u64, (0f32, String::new()));
    for name in tensor_names(src) {
        let t = src.tensor(&name)?;
        let (c, err) = convert(&name, &t, cdt)?;
        if err > worst.0 {
            worst = (err, name.clone());
        }
        params += t.elem_count() as u64;
        let bytes = tensor_bytes(&name, &c)?;
        data.insert(name, (t.dims().to_vec(), bytes));
    }
    let views = data
        .iter()
        .map(|(n, (shape, bytes))| {
            safetensors::tensor::TensorView::new(sdt, shape.clone(), bytes)
                .map(|v| (n.clone(), v))
                .map_err(|e| ExportError::Tensor {
                    name: n.clone(),
                    reason: e.to_string(),
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let weights = tmp.join("model.safetensors");
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    meta.insert("uc_pack_fingerprint".to_string(), fingerprint.to_string());
    safetensors::serialize_to_file(views, Some(meta), &weights).map_err(|e| {
        ExportError::Tensor {
            name: "model.safetensors".into(),
            reason: e.to_string(),
        }
    })?;
    // config.json as the pack holds it, with the exported dtype.
    let cfg_path = pack.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&cfg_path).map_err(io(&cfg_path))?).map_err(|e| {
            ExportError::Tokenizer {
                path: cfg_path.clone(),
                reason: e.to_string(),
            }
        })?;
    if let Some(o) = cfg.as_object_mut() {
        o.insert("torch_dtype".into(), dtype.torch_name().into());
        if o.contains_key("dtype") {
            o.insert("dtype".into(), dtype.torch_name().into());
        }
    }
    let p = tmp.join("config.json");
    std::fs::write(
        &p,
        serde_json::to_string_pretty(&cfg).unwrap_or_default() + "\n",
    )
    .map_err(io(&p))?;
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        let from = pack.join(f);
        if from.is_file() {
            std::fs::copy(&from, tmp.join(f)).map_err(io(&from))?;
        }
    }
    let bytes = std::fs::metadata(&weights).map_err(io(&weights))?.len();
    Ok(ExportReport {
        format: "safetensors",
        dtype,
        output: out.to_path_buf(),
        pack_fingerprint: fingerprint.to_string(),
        tensors: data.len(),
        params,
        bytes,
        max_rounding_error: worst.0,
        worst_tensor: worst.1,
        warnings: Vec::new(),
    })
}

/// Little-endian bytes of a contiguous f32/f16/bf16 tensor.
fn tensor_bytes(name: &str, t: &Tensor) -> Result<Vec<u8>, ExportError> {
    let e = tensor_err(name);
    let flat = t.flatten_all().map_err(&e)?;
    Ok(match t.dtype() {
        DType::F32 => flat
            .to_vec1::<f32>()
            .map_err(&e)?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::F16 => flat
            .to_vec1::<half::f16>()
            .map_err(&e)?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::BF16 => flat
            .to_vec1::<half::bf16>()
            .map_err(&e)?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        other => {
            return Err(ExportError::Tensor {
                name: name.into(),
                reason: format!("unexpected dtype {other:?}"),
            })
        }
    })
}

/// The GGUF architecture of a config, or why it cannot be written.
fn gguf_arch(cfg: &ModelConfig) -> Result<Arch, ExportError> {
    if cfg.rope.llama3.is_some() {
        return Err(ExportError::Unsupported(
            "Llama-3 rotary scaling (llama.cpp takes it as a rope_freqs tensor, not written yet)"
                .into(),
        ));
    }
    match cfg.family {
        Family::Llama => Ok(Arch::Llama),
        Family::Mistral if cfg.sliding_window.is_none() => Ok(Arch::Llama),
        Family::Mistral => Err(ExportError::Unsupported(
            "a sliding attention window (llama.cpp's llama architecture has none)".into(),
        )),
        Family::Qwen2 => Ok(Arch::Qwen2),
        Family::Qwen3 => Ok(Arch::Qwen3),
        Family::Olmo2
        | Family::Phi3
        | Family::Gemma2
        | Family::Gemma3
        | Family::Mixtral
        | Family::Qwen3Moe
        | Family::Olmoe
        | Family::Mamba => Err(ExportError::Unsupported(format!(
            "GGUF export of {:?} (only the Llama family: llama, mistral, qwen2, qwen3)",
            cfg.family
        ))),
    }
}

/// Writes the pack in `pack` as one GGUF file `out` (matrices in `dtype`: f16 or f32).
pub fn export_gguf(pack: &Path, out: &Path, dtype: Dtype) -> Result<ExportReport, ExportError> {
    let ggml = match dtype {
        Dtype::F32 => GgmlDType::F32,
        Dtype::F16 => GgmlDType::F16,
        Dtype::Bf16 => {
            return Err(ExportError::Unsupported(
                "bf16 GGUF (choose f16 or f32)".into(),
            ))
        }
    };
    let (src, fingerprint) = verified(pack)?;
    let cfg = src.config().clone();
    let arch = gguf_arch(&cfg)?;
    let (metadata, warnings) = gguf_meta::metadata(pack, &cfg, arch, dtype, &fingerprint)?;

    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let (mut params, mut worst) = (0u64, (0f32, String::new()));
    for name in tensor_names(&src) {
        if cfg.tie_word_embeddings && name == uc_model::names::LM_HEAD {
            continue; // llama.cpp reuses token_embd when output.weight is absent
        }
        let (gname, qk) = gguf_name(&name, arch).ok_or_else(|| {
            ExportError::Unsupported(format!(
                "tensor {name} has no GGUF name for {}",
                arch.name()
            ))
        })?;
        let mut t = src.tensor(&name)?;
        let e = tensor_err(&name);
        t = match qk {
            Some(QkRows::Q) => permute_qk_rows(&t, cfg.num_heads).map_err(&e)?,
            Some(QkRows::K) => permute_qk_rows(&t, cfg.num_kv_heads).map_err(&e)?,
            None => t,
        };
        // 1-D tensors stay f32, as llama.cpp's converter writes them.
        let (q, err) = if t.rank() == 1 || ggml == GgmlDType::F32 {
            (QTensor::quantize(&t, GgmlDType::F32).map_err(&e)?, 0.0)
        } else {
            let (_, err) = convert(&name, &t, DType::F16)?;
            (QTensor::quantize(&t, ggml).map_err(&e)?, err)
        };
        if err > worst.0 {
            worst = (err, name.clone());
        }
        params += t.elem_count() as u64;
        tensors.push((gname, q));
    }
    let tmp = staging(out)?;
    let write = || -> Result<(), ExportError> {
        let file = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        let mut w = std::io::BufWriter::new(file);
        let meta: Vec<(&str, &gguf_file::Value)> =
            metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        gguf_file::write(&mut w, &meta, &ts).map_err(|e| ExportError::Tensor {
            name: out.display().to_string(),
            reason: e.to_string(),
        })?;
        use std::io::Write;
        w.flush().map_err(io(&tmp))?;
        Ok(())
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, out).map_err(io(out))?;
    let bytes = std::fs::metadata(out).map_err(io(out))?.len();
    Ok(ExportReport {
        format: "gguf",
        dtype,
        output: out.to_path_buf(),
        pack_fingerprint: fingerprint,
        tensors: tensors.len(),
        params,
        bytes,
        max_rounding_error: worst.0,
        worst_tensor: worst.1,
        warnings,
    })
}
