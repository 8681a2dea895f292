//! A Hugging Face checkpoint directory opened lazily.
//!
//! `config.json` + one `model.safetensors` or shards listed in
//! `model.safetensors.index.json`. Each shard is memory-mapped and its header parsed
//! once (by the `safetensors` crate, which checks offsets and coverage); a tensor's
//! bytes are converted to f32 only when asked for, so a model larger than RAM can be
//! walked one tensor at a time.
//!
//! Fused projections (Phi-3's `qkv_proj` `(q + 2 kv, hidden)` and `gate_up_proj`
//! `(2 inter, hidden)`) are split on open: a row-major tensor's row blocks are contiguous
//! byte ranges, so q/k/v and gate/up become ordinary entries (sub-ranges of the fused
//! tensor's bytes, nothing copied) under the usual seven names, and the fused names
//! disappear. Every reader past this point (runtime loader, compressor, pack) sees seven
//! linears.
//!
//! Mixture-of-experts checkpoints are read under the hub's per-expert names (what
//! transformers' `save_pretrained` writes). A checkpoint in transformers 5's fused form
//! (`mlp.experts.gate_up_proj` `(experts, 2 inter, hidden)`, `mlp.experts.down_proj`
//! `(experts, hidden, inter)`, written with `save_original_format=False`) is split the
//! same way into per-expert entries; Mixtral's fused router `mlp.gate` is renamed to its
//! hub name `block_sparse_moe.gate`.

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::source::WeightSource;
use candle_core::{Device, Tensor};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Where one tensor lives.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// Index into the shard list.
    shard: usize,
    /// Stored dtype.
    pub dtype: Dtype,
    /// Shape as stored.
    pub shape: Vec<usize>,
    /// Byte range inside the shard's mmap.
    range: Range<usize>,
}

struct Shard {
    path: PathBuf,
    map: Mmap,
}

/// An opened checkpoint directory.
pub struct Checkpoint {
    dir: PathBuf,
    config: ModelConfig,
    shards: Vec<Shard>,
    tensors: BTreeMap<String, TensorInfo>,
    fingerprint: OnceLock<String>,
}

impl Checkpoint {
    /// Opens `dir`: parses config.json and every shard header; reads no weights.
    pub fn open(dir: &Path) -> Result<Self> {
        let config_path = dir.join("config.json");
        if !config_path.is_file() {
            return Err(ModelError::MissingFile {
                path: config_path,
                what: "config.json",
            });
        }
        let config = ModelConfig::from_file(&config_path)?;
        let shard_paths = shard_paths(dir)?;
        let mut shards = Vec::with_capacity(shard_paths.len());
        let mut tensors = BTreeMap::new();
        for (i, path) in shard_paths.into_iter().enumerate() {
            let file = File::open(&path).map_err(|e| ModelError::io(&path, e))?;
            // SAFETY: the map is read-only; if another process truncates the file
            // while we hold it, reads may fault -- the usual, accepted mmap contract
            // for model files (every checkpoint loader makes it).
            let map = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(&path, e))?;
            let st = SafeTensors::deserialize(&map).map_err(|e| ModelError::BadSafetensors {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            let (header_len, _) =
                SafeTensors::read_metadata(&map).map_err(|e| ModelError::BadSafetensors {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            // Data starts after the 8-byte length prefix and the header; the crate
            // has already checked these offsets lie inside the file.
            let base = 8 + header_len;
            for (name, view) in st.tensors() {
                let start = view.data().as_ptr() as usize - map.as_ptr() as usize;
                debug_assert!(start >= base);
                let info = TensorInfo {
                    shard: i,
                    dtype: view.dtype(),
                    shape: view.shape().to_vec(),
                    range: start..start + view.data().len(),
                };
                if tensors.insert(name.clone(), info).is_some() {
                    return Err(ModelError::BadSafetensors {
                        path: path.clone(),
                        reason: format!("tensor {name} appears in more than one shard"),
                    });
                }
            }
            shards.push(Shard { path, map });
        }
        if config.fused_projections() {
            split_fused(dir, &config, &shards, &mut tensors)?;
        }
        split_fused_experts(&config, &shards, &mut tensors)?;
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            config,
            shards,
            tensors,
            fingerprint: OnceLock::new(),
        })
    }

    /// The weight file holding tensor `name`, if any.
    pub fn file_of(&self, name: &str) -> Option<&Path> {
        self.tensors
            .get(name)
            .map(|t| self.shards[t.shard].path.as_path())
    }

    /// The checkpoint directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Names and locations of every tensor, sorted by name.
    pub fn tensors(&self) -> &BTreeMap<String, TensorInfo> {
        &self.tensors
    }

    /// The weight files, in index order.
    pub fn files(&self) -> Vec<&Path> {
        self.shards.iter().map(|s| s.path.as_path()).collect()
    }

    /// The tensor `name` converted to f32 values, row-major.
    pub fn tensor_f32(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let info = self.info(name)?;
        let shard = &self.shards[info.shard];
        let bytes =
            shard
                .map
                .get(info.range.clone())
                .ok_or_else(|| ModelError::BadSafetensors {
                    path: shard.path.clone(),
                    reason: format!("tensor {name}: data outside the file"),
                })?;
        let values = to_f32(bytes, info.dtype).ok_or_else(|| ModelError::UnsupportedDtype {
            name: name.to_string(),
            path: shard.path.clone(),
            dtype: format!("{:?}", info.dtype),
        })?;
        // Walking a model larger than memory keeps only the tensors in use resident.
        uc_format::release_pages(&shard.map, info.range.clone());
        if let Some(index) = values.iter().position(|v| !v.is_finite()) {
            return Err(ModelError::NonFinite {
                name: name.to_string(),
                index,
            });
        }
        Ok((values, info.shape.clone()))
    }
}

impl Checkpoint {
    /// The index entry of tensor `name`, or the error naming it and the directory.
    fn info(&self, name: &str) -> Result<&TensorInfo> {
        self.tensors
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                name: name.to_string(),
                dir: self.dir.clone(),
            })
    }

    /// Rows `rows` of the 2-D tensor `name` as f32 into `out` (resized to
    /// `rows.len() * cols`): the same values as those rows of [`Self::tensor_f32`], read
    /// without converting the rest. The compressor reads a mixture-of-experts block's
    /// experts this way, a tile of rows per forward call, so no expert stays resident as
    /// f32 ([`uc_format::release_pages`] drops the pages read).
    pub fn tensor_rows_f32(
        &self,
        name: &str,
        rows: std::ops::Range<usize>,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let info = self.info(name)?;
        let shard = &self.shards[info.shard];
        let bad = |reason: String| ModelError::BadSafetensors {
            path: shard.path.clone(),
            reason,
        };
        let [n_rows, cols] = info.shape[..] else {
            return Err(bad(format!(
                "tensor {name}: rows read from a tensor of shape {:?}",
                info.shape
            )));
        };
        if rows.start > rows.end || rows.end > n_rows {
            return Err(bad(format!("tensor {name}: rows {rows:?} of {n_rows}")));
        }
        let size = info.dtype.bitsize() / 8;
        let range =
            info.range.start + rows.start * cols * size..info.range.start + rows.end * cols * size;
        let bytes = shard
            .map
            .get(range.clone())
            .ok_or_else(|| bad(format!("tensor {name}: data outside the file")))?;
        let values = to_f32(bytes, info.dtype).ok_or_else(|| ModelError::UnsupportedDtype {
            name: name.to_string(),
            path: shard.path.clone(),
            dtype: format!("{:?}", info.dtype),
        })?;
        uc_format::release_pages(&shard.map, range);
        if let Some(index) = values.iter().position(|v| !v.is_finite()) {
            return Err(ModelError::NonFinite {
                name: name.to_string(),
                index: rows.start * cols + index,
            });
        }
        *out = values;
        Ok(())
    }

    /// The shape of tensor `name`, if present.
    pub fn shape_of(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|t| t.shape.as_slice())
    }
}

/// Replaces every block's fused projections by their row blocks (see the module doc):
/// `qkv_proj` -> `q_proj`, `k_proj`, `v_proj`; `gate_up_proj` -> `gate_proj`, `up_proj`.
/// A missing fused tensor or one of the wrong shape is an error naming it and its file.
fn split_fused(
    dir: &Path,
    cfg: &ModelConfig,
    shards: &[Shard],
    tensors: &mut BTreeMap<String, TensorInfo>,
) -> Result<()> {
    use crate::names::{block_prefix, BLOCK_LINEARS, FUSED_GATE_UP, FUSED_QKV};
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let (q, kv) = (
        cfg.num_heads * cfg.head_dim,
        cfg.num_kv_heads * cfg.head_dim,
    );
    for layer in 0..cfg.num_layers {
        let p = block_prefix(cfg, layer);
        for (fused, parts) in [
            (FUSED_QKV, &[(0, q), (1, kv), (2, kv)][..]),
            (FUSED_GATE_UP, &[(4, i), (5, i)][..]),
        ] {
            let name = format!("{p}.{fused}.weight");
            let info = tensors
                .remove(&name)
                .ok_or_else(|| ModelError::MissingTensor {
                    name: name.clone(),
                    dir: dir.to_path_buf(),
                })?;
            let rows: usize = parts.iter().map(|(_, r)| r).sum();
            if info.shape != [rows, h] {
                return Err(ModelError::ShapeMismatch {
                    name,
                    file: shards[info.shard].path.clone(),
                    found: info.shape,
                    expected: vec![rows, h],
                });
            }
            let row_bytes = h * info.dtype.bitsize() / 8;
            let mut start = info.range.start;
            for &(k, r) in parts {
                let part = format!("{p}.{}.weight", BLOCK_LINEARS[k]);
                let entry = TensorInfo {
                    shape: vec![r, h],
                    range: start..start + r * row_bytes,
                    ..info.clone()
                };
                start += r * row_bytes;
                if tensors.insert(part.clone(), entry).is_some() {
                    return Err(ModelError::BadSafetensors {
                        path: shards[info.shard].path.clone(),
                        reason: format!("both {name} and {part} are present"),
                    });
                }
            }
        }
    }
    Ok(())
}
/// transformers 5's fused experts (see the module doc) as per-expert entries, in the
/// MoE blocks that have them; blocks stored per expert are left alone. A fused tensor of
/// the wrong shape is an error naming it and its file.
fn split_fused_experts(
    cfg: &ModelConfig,
    shards: &[Shard],
    tensors: &mut BTreeMap<String, TensorInfo>,
) -> Result<()> {
    use crate::names::{block_prefix, expert_linears, moe_router, FUSED_EXPERTS};
    let Some(moe) = &cfg.moe else {
        return Ok(());
    };
    let (h, i, n) = (cfg.hidden_size, moe.expert_intermediate, moe.num_experts);
    for layer in (0..cfg.num_layers).filter(|&l| cfg.experts_of(l) > 0) {
        let p = block_prefix(cfg, layer);
        let [router, gate_up, down] = FUSED_EXPERTS.map(|f| format!("{p}.{f}"));
        let gate_up_name = gate_up;
        let Some(gu) = tensors.remove(&gate_up_name) else {
            continue;
        };
        let down_info = tensors.remove(&down);
        let file = |t: &TensorInfo| shards[t.shard].path.clone();
        let check = |name: &str, t: &TensorInfo, want: [usize; 3]| {
            if t.shape != want {
                return Err(ModelError::ShapeMismatch {
                    name: name.into(),
                    file: file(t),
                    found: t.shape.clone(),
                    expected: want.to_vec(),
                });
            }
            Ok(())
        };
        check(&gate_up_name, &gu, [n, 2 * i, h])?;
        let dn = down_info.ok_or_else(|| ModelError::BadSafetensors {
            path: file(&gu),
            reason: format!("{gate_up_name} is present but {down} is not"),
        })?;
        check(&down, &dn, [n, h, i])?;
        // Expert e: gate rows [2ie, 2ie + i), up rows [2ie + i, 2i(e + 1)) of gate_up
        // seen as (2 i n, h); down the e-th (h, i) matrix.
        let (gu_row, dn_mat) = (h * gu.dtype.bitsize() / 8, h * i * dn.dtype.bitsize() / 8);
        for e in 0..n {
            let [g, u, d] = expert_linears(cfg.family, e).map(|x| format!("{p}.{x}.weight"));
            let at = gu.range.start + 2 * i * e * gu_row;
            let parts = [
                (g, gu.clone(), vec![i, h], at..at + i * gu_row),
                (
                    u,
                    gu.clone(),
                    vec![i, h],
                    at + i * gu_row..at + 2 * i * gu_row,
                ),
                (
                    d,
                    dn.clone(),
                    vec![h, i],
                    dn.range.start + e * dn_mat..dn.range.start + (e + 1) * dn_mat,
                ),
            ];
            for (name, info, shape, range) in parts {
                let path = file(&info);
                let entry = TensorInfo {
                    shape,
                    range,
                    ..info
                };
                if tensors.insert(name.clone(), entry).is_some() {
                    return Err(ModelError::BadSafetensors {
                        path,
                        reason: format!("both {gate_up_name} and {name} are present"),
                    });
                }
            }
        }
        // The fused form keeps Mixtral's router under `mlp.`; the hub name is canonical.
        let hub_router = format!("{p}.{}.weight", moe_router(cfg.family));
        if router != hub_router {
            if let Some(r) = tensors.remove(&router) {
                tensors.insert(hub_router, r);
            }
        }
    }
    Ok(())
}

/// Little-endian bytes of a float dtype to f32; `None` for non-float dtypes.
fn to_f32(bytes: &[u8], dtype: Dtype) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => return None,
    })
}

/// The shard files of `dir`: from the index if there is one, else model.safetensors.
fn shard_paths(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
        let bad = |reason: String| ModelError::BadIndex {
            path: index.clone(),
            reason,
        };
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| bad("no weight_map object".into()))?;
        let mut files: Vec<String> = Vec::new();
        for (tensor, file) in map {
            let file = file
                .as_str()
                .ok_or_else(|| bad(format!("weight_map[{tensor}] is not a string")))?;
            // A shard name must be a plain file name inside the checkpoint directory.
            if file.contains('/') || file.contains('\\') || file.starts_with('.') {
                return Err(bad(format!("shard name {file:?} is not a plain file name")));
            }
            if !files.iter().any(|f| f == file) {
                files.push(file.to_string());
            }
        }
        files.sort();
        let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
        for p in &paths {
            if !p.is_file() {
                return Err(ModelError::MissingFile {
                    path: p.clone(),
                    what: "every shard named in model.safetensors.index.json",
                });
            }
        }
        return Ok(paths);
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    Err(ModelError::MissingFile {
        path: single,
        what: "model.safetensors or model.safetensors.index.json",
    })
}

impl WeightSource for Checkpoint {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn tensor(&self, name: &str) -> Result<Tensor> {
        let (values, shape) = self.tensor_f32(name)?;
        Ok(Tensor::from_vec(values, shape, &Device::Cpu)?)
    }

    fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// SHA-256 over the weight files' SHA-256s in shard order (computed once).
    fn fingerprint(&self) -> Result<String> {
        if let Some(f) = self.fingerprint.get() {
            return Ok(f.clone());
        }
        let mut outer = Sha256::new();
        for shard in &self.shards {
            outer.update(Sha256::digest(&shard.map[..]));
        }
        let f = hex::encode(outer.finalize());
        Ok(self.fingerprint.get_or_init(|| f).clone())
    }

    fn describe(&self) -> String {
        format!("checkpoint {}", self.dir.display())
    }
}
