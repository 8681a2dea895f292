//! GGUF import: a llama.cpp checkpoint to a Hugging Face directory (`uc import gguf`).
//!
//! Data flow: [`import_gguf`] hashes the file, parses its header with candle's
//! `gguf_file::Content` (metadata + tensor table; no weights), checks the
//! hyper-parameters and builds `config.json`, rebuilds `tokenizer.json` from the
//! vocabulary metadata (`tokenizer` module), maps every tensor name and checks its
//! shape against the config (`names` module), and only then writes. Weights stream one
//! tensor at a time: each is dequantized to f32 when the safetensors writer asks for its
//! bytes, so peak memory is one tensor, not the model. Llama Q/K rows are un-permuted
//! on the way ([`unpermute_qk_rows`]).
//!
//! Everything goes to a sibling `OUT.tmp-<pid>` directory renamed into place at the
//! end, so `OUT` is either complete or absent.

mod meta;
mod names;
mod tokenizer;

pub use names::{gguf_name, permute_qk_rows, unpermute_qk_rows, Arch, QkRows};

use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::GgmlDType;
use candle_core::Device;
use meta::{HParams, Meta};
use names::{map_name, required_names, Target, OUTPUT_HEAD};
use serde::Serialize;
use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

/// Everything that can go wrong importing a GGUF file. No input makes the importer
/// panic; each failure is one of these.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The GGUF file could not be opened or read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Not a GGUF file, or its header is truncated or corrupt (candle's parser's words).
    #[error("{path}: bad GGUF: {reason}")]
    BadGguf {
        /// The file.
        path: PathBuf,
        /// What the parser found.
        reason: String,
    },
    /// A metadata key the conversion needs is absent.
    #[error("GGUF metadata key {key} is missing")]
    MissingMetadata {
        /// The full key, e.g. `llama.attention.head_count`.
        key: String,
    },
    /// A metadata value has the wrong type or an impossible value.
    #[error("GGUF metadata key {key}: {reason}")]
    BadMetadata {
        /// The full key.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// `general.architecture` names a model family we do not convert.
    #[error("unsupported architecture {architecture:?} (supported: llama, qwen2, qwen3, gemma3)")]
    UnsupportedArchitecture {
        /// The value found.
        architecture: String,
    },
    /// The tokenizer model (`tokenizer.ggml.model`) or pre-tokenizer
    /// (`tokenizer.ggml.pre`) is not one we can rebuild.
    #[error("unsupported {key} {value:?} (supported: {supported})")]
    UnsupportedTokenizer {
        /// The metadata key.
        key: &'static str,
        /// The value found.
        value: String,
        /// What we accept.
        supported: &'static str,
    },
    /// The tokenizer rebuilt from the metadata does not load (e.g. a merge names a
    /// token that is not in the vocabulary).
    #[error("tokenizer built from GGUF metadata does not load: {reason}")]
    BadTokenizer {
        /// The `tokenizers` error.
        reason: String,
    },
    /// A tensor that is not part of this architecture (never dropped silently).
    #[error("tensor {name}: not a tensor of a {architecture} model")]
    UnknownTensor {
        /// The GGUF tensor name.
        name: String,
        /// The architecture of the file.
        architecture: &'static str,
    },
    /// A tensor the architecture requires is absent.
    #[error("tensor {name}: missing")]
    MissingTensor {
        /// The GGUF tensor name.
        name: String,
    },
    /// A tensor's shape disagrees with the hyper-parameters.
    #[error("tensor {name}: shape {actual:?} (out, in), expected {expected:?} from the metadata")]
    ShapeMismatch {
        /// The GGUF tensor name.
        name: String,
        /// The shape the metadata implies.
        expected: Vec<usize>,
        /// The shape in the file.
        actual: Vec<usize>,
    },
    /// A tensor's data could not be read or dequantized (truncated data,
    /// unsupported quantization type).
    #[error("tensor {name}: {reason}")]
    BadTensor {
        /// The GGUF tensor name.
        name: String,
        /// What failed.
        reason: String,
    },
    /// The output directory already exists; we never overwrite.
    #[error("{path}: already exists")]
    OutputExists {
        /// The output directory.
        path: PathBuf,
    },
    /// Writing the output failed.
    #[error("{path}: write failed: {source}")]
    Write {
        /// The file or directory being written.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// What an import produced; printed by the CLI (`--json` serializes it).
#[derive(Debug, Clone, Serialize)]
pub struct ImportReport {
    /// `general.architecture` (= HF `model_type`).
    pub architecture: String,
    /// Tensors written to `model.safetensors`.
    pub n_tensors: usize,
    /// Parameters written, embeddings and head included.
    pub n_params: u64,
    /// Tensors per GGUF storage type, llama.cpp spelling (`{"Q4_1": 210, "F32": 61}`).
    pub tensor_types: BTreeMap<String, usize>,
    /// No `output.weight`: the head reuses the token embedding.
    pub tied_embeddings: bool,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// SHA-256 of the GGUF file, hex.
    pub source_sha256: String,
}

/// llama.cpp's name for a storage type.
fn type_name(t: GgmlDType) -> &'static str {
    match t {
        GgmlDType::F32 => "F32",
        GgmlDType::F16 => "F16",
        GgmlDType::BF16 => "BF16",
        GgmlDType::Q4_0 => "Q4_0",
        GgmlDType::Q4_1 => "Q4_1",
        GgmlDType::Q5_0 => "Q5_0",
        GgmlDType::Q5_1 => "Q5_1",
        GgmlDType::Q8_0 => "Q8_0",
        GgmlDType::Q8_1 => "Q8_1",
        GgmlDType::Q2K => "Q2_K",
        GgmlDType::Q3K => "Q3_K",
        GgmlDType::Q4K => "Q4_K",
        GgmlDType::Q5K => "Q5_K",
        GgmlDType::Q6K => "Q6_K",
        GgmlDType::Q8K => "Q8_K",
    }
}

/// One tensor to convert.
struct Planned {
    gguf_name: String,
    target: Target,
}

/// Converts `gguf` into a Hugging Face directory `out_dir` (which must not exist):
/// `model.safetensors` (f32), `config.json`, `tokenizer.json`, `tokenizer_config.json`.
pub fn import_gguf(gguf: &Path, out_dir: &Path) -> Result<ImportReport, GgufError> {
    if out_dir.exists() {
        return Err(GgufError::OutputExists {
            path: out_dir.to_path_buf(),
        });
    }
    let io_err = |source| GgufError::Io {
        path: gguf.to_path_buf(),
        source,
    };
    // The workspace's one file-hash helper; its error keeps the io cause as text.
    let (_, source_sha256) =
        uc_format::sha256_file(gguf).map_err(|e| io_err(std::io::Error::other(e)))?;
    let mut reader = BufReader::new(File::open(gguf).map_err(io_err)?);
    let content = Content::read(&mut reader).map_err(|e| GgufError::BadGguf {
        path: gguf.to_path_buf(),
        reason: e.to_string(),
    })?;
    let meta = Meta(&content.metadata);
    let hp = HParams::from_meta(&meta)?;
    let tok = tokenizer::build(&meta, &hp)?;
    let plan = plan_tensors(&content, &hp)?;
    let tied_embeddings = !content.tensor_infos.contains_key(OUTPUT_HEAD);

    let mut tensor_types = BTreeMap::new();
    for info in content.tensor_infos.values() {
        *tensor_types
            .entry(type_name(info.ggml_dtype).to_string())
            .or_insert(0) += 1;
    }
    let report = ImportReport {
        architecture: hp.arch.name().to_string(),
        n_tensors: plan.len(),
        // Shapes were checked against MAX_DIM-bounded metadata, so no overflow.
        n_params: plan
            .iter()
            .map(|p| p.target.shape.iter().product::<usize>() as u64)
            .sum(),
        tensor_types,
        tied_embeddings,
        vocab_size: hp.vocab_size,
        source_sha256,
    };
    let source = Source {
        content: &content,
        reader: RefCell::new(reader),
        failure: RefCell::new(None),
    };
    write_atomically(out_dir, |dir| {
        write_json(&dir.join("config.json"), &hp.config_json(tied_embeddings))?;
        write_json(&dir.join("tokenizer.json"), &tok.tokenizer)?;
        write_json(&dir.join("tokenizer_config.json"), &tok.config)?;
        let st_path = dir.join("model.safetensors");
        // One key only: safetensors writes this map in HashMap order, and the output
        // must be byte-identical run to run. The source hash is in the report.
        let info = HashMap::from([("format".to_string(), "pt".to_string())]);
        let views = plan.iter().map(|p| {
            (
                p.target.hf_name.as_str(),
                Lazy {
                    source: &source,
                    plan: p,
                },
            )
        });
        let written = safetensors::serialize_to_file(views, Some(info), &st_path);
        // A tensor that failed to load left a short file; its error is the real cause.
        if let Some(e) = source.failure.take() {
            return Err(e);
        }
        written.map_err(|e| GgufError::Write {
            path: st_path.clone(),
            source: std::io::Error::other(e),
        })?;
        sync(&st_path)
    })?;
    Ok(report)
}

/// Maps and checks every tensor, in name order; nothing is read yet.
fn plan_tensors(content: &Content, hp: &HParams) -> Result<Vec<Planned>, GgufError> {
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut plan = Vec::with_capacity(names.len());
    for name in names {
        let target = map_name(name, hp).ok_or_else(|| GgufError::UnknownTensor {
            name: name.clone(),
            architecture: hp.arch.name(),
        })?;
        let actual = content
            .tensor_infos
            .get(name)
            .map(|i| i.shape.dims().to_vec())
            .unwrap_or_default();
        if actual != target.shape {
            return Err(GgufError::ShapeMismatch {
                name: name.clone(),
                expected: target.shape,
                actual,
            });
        }
        plan.push(Planned {
            gguf_name: name.clone(),
            target,
        });
    }
    if let Some(name) = required_names(hp)
        .into_iter()
        .find(|n| !content.tensor_infos.contains_key(n))
    {
        return Err(GgufError::MissingTensor { name });
    }
    Ok(plan)
}

/// The open GGUF file, shared by the lazy views.
struct Source<'a> {
    content: &'a Content,
    reader: RefCell<BufReader<File>>,
    /// The first load failure; the safetensors `View` trait cannot return errors.
    failure: RefCell<Option<GgufError>>,
}

impl Source<'_> {
    /// One tensor as little-endian f32 bytes, in HF row order.
    fn load(&self, p: &Planned) -> Result<Vec<u8>, GgufError> {
        let bad = |e: candle_core::Error| GgufError::BadTensor {
            name: p.gguf_name.clone(),
            reason: e.to_string(),
        };
        let mut reader = self.reader.borrow_mut();
        let q = self
            .content
            .tensor(&mut *reader, &p.gguf_name, &Device::Cpu)
            .map_err(bad)?;
        let mut w = q.dequantize(&Device::Cpu).map_err(bad)?; // (out, in) f32
        if let Some(heads) = p.target.unpermute_heads {
            w = unpermute_qk_rows(&w, heads).map_err(bad)?;
        }
        let mut v = w
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(bad)?;
        if p.target.unit_offset {
            v.iter_mut().for_each(|x| *x -= 1.0);
        }
        // Free the tensor before the byte copy: peak is two copies of the largest
        // tensor (the embedding), not three.
        drop((q, w));
        Ok(v.iter().flat_map(|x| x.to_le_bytes()).collect())
    }
}

/// A tensor dequantized only when the writer asks for its bytes.
struct Lazy<'a> {
    source: &'a Source<'a>,
    plan: &'a Planned,
}

impl safetensors::View for Lazy<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        safetensors::Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.plan.target.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        // After a failure, write nothing more: the file is discarded anyway.
        if self.source.failure.borrow().is_some() {
            return Cow::Borrowed(&[]);
        }
        match self.source.load(self.plan) {
            Ok(bytes) => Cow::Owned(bytes),
            Err(e) => {
                self.source.failure.replace(Some(e));
                Cow::Borrowed(&[])
            }
        }
    }
    fn data_len(&self) -> usize {
        self.plan.target.shape.iter().product::<usize>() * 4
    }
}

fn write_err(path: &Path) -> impl Fn(std::io::Error) -> GgufError + '_ {
    move |source| GgufError::Write {
        path: path.to_path_buf(),
        source,
    }
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<(), GgufError> {
    let text =
        serde_json::to_string_pretty(v).map_err(|e| write_err(path)(std::io::Error::other(e)))?;
    std::fs::write(path, text + "\n").map_err(write_err(path))?;
    sync(path)
}

/// Flushes a file to disk, so the rename below never publishes unwritten data.
fn sync(path: &Path) -> Result<(), GgufError> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(write_err(path))
}

/// Runs `fill` on a fresh `OUT.tmp-<pid>` directory, then renames it to `out_dir`;
/// on failure the temporary directory is removed and `out_dir` never appears.
fn write_atomically(
    out_dir: &Path,
    fill: impl FnOnce(&Path) -> Result<(), GgufError>,
) -> Result<(), GgufError> {
    let name = out_dir.file_name().ok_or_else(|| {
        write_err(out_dir)(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "output path has no final component",
        ))
    })?;
    let mut tmp_name = name.to_os_string();
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = out_dir.with_file_name(tmp_name);
    // A leftover from a crashed run that had our pid: ours to replace.
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(write_err(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(write_err(&tmp))?;
    let result =
        fill(&tmp).and_then(|()| std::fs::rename(&tmp, out_dir).map_err(write_err(out_dir)));
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}
