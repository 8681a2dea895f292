//! uc-synth: synthetic checkpoints with the exact shapes, dtype and sharding of public
//! models, for benchmarking uc at real size without downloading a model.
//!
//! This is a benchmark tool, not a user command (`uc` does not call it). Data flow:
//! a [`Shape`] (hyper-parameters + the config.json a public model ships, e.g.
//! [`Shape::mistral_7b`], [`Shape::llama32_1b`]) -> [`Shape::tensors`] (every tensor in
//! the order PyTorch's `state_dict()` lists them) -> [`Shape::shards`] (transformers'
//! greedy sharding: a new shard when the next tensor would pass `max_shard_bytes`) ->
//! [`write_checkpoint`]: `config.json`, one `model.safetensors` or
//! `model-0000k-of-0000n.safetensors` + `model.safetensors.index.json`.
//!
//! Weights are random and deterministic: tensor `name`, chunk `c` of 2^20 values is drawn
//! from the workspace's SplitMix64 ([`uc_format::rng`]) seeded by (seed, name, c), so the
//! bytes do not depend on the thread count. Linear and embedding weights are
//! "gaussian-ish" (an Irwin-Hall sum of four 16-bit uniforms, rescaled to mean 0 and
//! standard deviation [`WEIGHT_STD`]; support +-3.46 std), RMSNorm weights are 1.0, all
//! stored as bf16.
//!
//! Streaming: files are written with the `safetensors` crate's `serialize_to_file`,
//! which writes the header from each tensor's dtype, shape and byte length and then
//! asks each tensor for its bytes once, in file order; a tensor's bytes are generated
//! only when asked for and dropped once written, so at most one tensor (the largest:
//! Llama-3.2-1B's 128256 x 2048 embedding, 525 MB in bf16) is in memory, never the model.

use rayon::prelude::*;
use safetensors::{Dtype, View};
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;
use uc_format::rng::SplitMix64;

/// Standard deviation of linear and embedding weights (transformers' `initializer_range`).
pub const WEIGHT_STD: f32 = 0.02;

/// Values per independently seeded chunk.
const CHUNK: usize = 1 << 20;

/// transformers' default `max_shard_size` when Mistral-7B-v0.1 was saved ("10GB" = 10^10
/// bytes; transformers counts decimal gigabytes).
pub const HF_MAX_SHARD_BYTES: u64 = 10_000_000_000;

/// The hyper-parameters of a Llama-family model, and the config.json to write.
#[derive(Debug, Clone)]
pub struct Shape {
    /// A short name (`mistral-7b`, `llama-3.2-1b`, ...).
    pub name: &'static str,
    /// Residual stream width.
    pub hidden: usize,
    /// MLP inner width.
    pub intermediate: usize,
    /// Transformer blocks.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// The head reuses the embedding (no `lm_head.weight`).
    pub tied: bool,
    /// Shard size limit; `None` writes one `model.safetensors`.
    pub max_shard_bytes: Option<u64>,
    /// Mixture of experts (OLMoE's layout): experts per block, each `intermediate` wide,
    /// with a router `mlp.gate` and q/k norms over the whole projection; 0 for a dense
    /// Llama/Mistral MLP.
    pub experts: usize,
    /// The config.json written beside the weights.
    pub config: serde_json::Value,
}

/// What a tensor holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Random weights, std [`WEIGHT_STD`].
    Weight,
    /// RMSNorm weight: all 1.0.
    Norm,
}

/// One tensor of the checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// Hugging Face name.
    pub name: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Content.
    pub kind: Kind,
}

impl TensorSpec {
    /// Elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// Bytes in bf16.
    pub fn bytes(&self) -> u64 {
        2 * self.numel() as u64
    }
}

impl Shape {
    /// Mistral-7B-v0.1 (config.json of the hub repository `mistralai/Mistral-7B-v0.1`;
    /// bf16, two shards as transformers 4.34 cut them at 10 GB: embedding, blocks 0-21
    /// and block 22's attention in the first, 9.94 GB; the rest in the second).
    pub fn mistral_7b() -> Self {
        Shape {
            name: "mistral-7b",
            hidden: 4096,
            intermediate: 14336,
            layers: 32,
            heads: 32,
            kv_heads: 8,
            head_dim: 128,
            vocab: 32000,
            tied: false,
            max_shard_bytes: Some(HF_MAX_SHARD_BYTES),
            experts: 0,
            config: serde_json::json!({
                "architectures": ["MistralForCausalLM"],
                "bos_token_id": 1,
                "eos_token_id": 2,
                "hidden_act": "silu",
                "hidden_size": 4096,
                "initializer_range": 0.02,
                "intermediate_size": 14336,
                "max_position_embeddings": 32768,
                "model_type": "mistral",
                "num_attention_heads": 32,
                "num_hidden_layers": 32,
                "num_key_value_heads": 8,
                "rms_norm_eps": 1e-05,
                "rope_theta": 10000.0,
                "sliding_window": 4096,
                "tie_word_embeddings": false,
                "torch_dtype": "bfloat16",
                "transformers_version": "4.34.0.dev0",
                "use_cache": true,
                "vocab_size": 32000
            }),
        }
    }

    /// Llama-3.2-1B (config.json of `meta-llama/Llama-3.2-1B`: tied embeddings, Llama-3
    /// rotary scaling; bf16, one `model.safetensors`).
    pub fn llama32_1b() -> Self {
        Shape {
            name: "llama-3.2-1b",
            hidden: 2048,
            intermediate: 8192,
            layers: 16,
            heads: 32,
            kv_heads: 8,
            head_dim: 64,
            vocab: 128256,
            tied: true,
            max_shard_bytes: None,
            experts: 0,
            config: serde_json::json!({
                "architectures": ["LlamaForCausalLM"],
                "attention_bias": false,
                "attention_dropout": 0.0,
                "bos_token_id": 128000,
                "eos_token_id": 128001,
                "head_dim": 64,
                "hidden_act": "silu",
                "hidden_size": 2048,
                "initializer_range": 0.02,
                "intermediate_size": 8192,
                "max_position_embeddings": 131072,
                "mlp_bias": false,
                "model_type": "llama",
                "num_attention_heads": 32,
                "num_hidden_layers": 16,
                "num_key_value_heads": 8,
                "pretraining_tp": 1,
                "rms_norm_eps": 1e-05,
                "rope_scaling": {
                    "factor": 32.0,
                    "high_freq_factor": 4.0,
                    "low_freq_factor": 1.0,
                    "original_max_position_embeddings": 8192,
                    "rope_type": "llama3"
                },
                "rope_theta": 500000.0,
                "tie_word_embeddings": true,
                "torch_dtype": "bfloat16",
                "transformers_version": "4.45.0.dev0",
                "use_cache": true,
                "vocab_size": 128256
            }),
        }
    }

    /// OLMoE-1B-7B (config.json of `allenai/OLMoE-1B-7B-0924`: 64 experts 1024 wide per
    /// block, 8 per token; q/k norms over the whole projection; untied head). Written as
    /// one `model.safetensors` (the hub shards it; the sharding does not matter to the
    /// compressor's memory). Use `--layers` for a short stand-in: one block is 1.6 GB of
    /// f32 experts.
    pub fn olmoe_1b_7b() -> Self {
        Shape {
            name: "olmoe-1b-7b",
            hidden: 2048,
            intermediate: 1024,
            layers: 16,
            heads: 16,
            kv_heads: 16,
            head_dim: 128,
            vocab: 50304,
            tied: false,
            max_shard_bytes: None,
            experts: 64,
            config: serde_json::json!({
                "architectures": ["OlmoeForCausalLM"],
                "attention_bias": false,
                "attention_dropout": 0.0,
                "bos_token_id": null,
                "clip_qkv": null,
                "eos_token_id": 50279,
                "hidden_act": "silu",
                "hidden_size": 2048,
                "initializer_range": 0.02,
                "intermediate_size": 1024,
                "max_position_embeddings": 4096,
                "model_type": "olmoe",
                "norm_topk_prob": false,
                "num_attention_heads": 16,
                "num_experts": 64,
                "num_experts_per_tok": 8,
                "num_hidden_layers": 16,
                "num_key_value_heads": 16,
                "pad_token_id": 1,
                "rms_norm_eps": 1e-05,
                "rope_theta": 10000.0,
                "tie_word_embeddings": false,
                "torch_dtype": "bfloat16",
                "vocab_size": 50304
            }),
        }
    }

    /// A tiny Mistral-like shape for tests (hidden 64, 3 blocks, untied head), sharded at
    /// `max_shard_bytes`.
    pub fn tiny(max_shard_bytes: Option<u64>) -> Self {
        Shape {
            name: "tiny",
            hidden: 64,
            intermediate: 96,
            layers: 3,
            heads: 4,
            kv_heads: 2,
            head_dim: 16,
            vocab: 128,
            tied: false,
            max_shard_bytes,
            experts: 0,
            config: serde_json::json!({
                "architectures": ["MistralForCausalLM"],
                "hidden_size": 64,
                "intermediate_size": 96,
                "max_position_embeddings": 256,
                "model_type": "mistral",
                "num_attention_heads": 4,
                "num_hidden_layers": 3,
                "num_key_value_heads": 2,
                "rms_norm_eps": 1e-05,
                "rope_theta": 10000.0,
                "sliding_window": 64,
                "tie_word_embeddings": false,
                "torch_dtype": "bfloat16",
                "vocab_size": 128
            }),
        }
    }

    /// [`Shape::tiny`] with heads of 64 dimensions (two sharing one KV head) and an MLP
    /// of 128: every linear's input a multiple of 64, as the integer prefill GEMM takes
    /// them (the prompt-cache tests).
    pub fn tiny_wide() -> Self {
        let mut s = Self::tiny(None);
        (s.hidden, s.intermediate) = (128, 128);
        (s.heads, s.kv_heads, s.head_dim) = (2, 1, 64);
        for (k, v) in [
            ("hidden_size", 128),
            ("intermediate_size", 128),
            ("num_attention_heads", 2),
            ("num_key_value_heads", 1),
        ] {
            s.config[k] = v.into();
        }
        s
    }

    /// The same shape with only its first `layers` blocks (config.json's
    /// `num_hidden_layers` follows): every block, the embedding and the head keep their
    /// exact shapes and, for a given seed, their weights, so a short model measures the
    /// per-block memory of the full one in a fraction of its time. `None` for 0 or
    /// more blocks than the shape has.
    pub fn with_layers(mut self, layers: usize) -> Option<Self> {
        if layers == 0 || layers > self.layers {
            return None;
        }
        self.layers = layers;
        self.config["num_hidden_layers"] = layers.into();
        Some(self)
    }

    /// The shape named `name` (`mistral-7b`, `llama-3.2-1b`, `olmoe-1b-7b`, `tiny`).
    pub fn by_name(name: &str) -> Option<Self> {
        match name {
            "mistral-7b" => Some(Self::mistral_7b()),
            "llama-3.2-1b" => Some(Self::llama32_1b()),
            "tiny" => Some(Self::tiny(None)),
            "olmoe-1b-7b" => Some(Self::olmoe_1b_7b()),
            _ => None,
        }
    }

    /// Every tensor, in the order PyTorch's `state_dict()` lists a `LlamaForCausalLM` /
    /// `MistralForCausalLM` (module definition order), which is the order transformers
    /// fills shards in.
    pub fn tensors(&self) -> Vec<TensorSpec> {
        let (h, i) = (self.hidden, self.intermediate);
        let (q, kv) = (self.heads * self.head_dim, self.kv_heads * self.head_dim);
        let t = |name: String, shape: Vec<usize>, kind| TensorSpec { name, shape, kind };
        let mut out = vec![t(
            "model.embed_tokens.weight".into(),
            vec![self.vocab, h],
            Kind::Weight,
        )];
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            out.push(t(
                format!("{p}.self_attn.q_proj.weight"),
                vec![q, h],
                Kind::Weight,
            ));
            out.push(t(
                format!("{p}.self_attn.k_proj.weight"),
                vec![kv, h],
                Kind::Weight,
            ));
            out.push(t(
                format!("{p}.self_attn.v_proj.weight"),
                vec![kv, h],
                Kind::Weight,
            ));
            out.push(t(
                format!("{p}.self_attn.o_proj.weight"),
                vec![h, q],
                Kind::Weight,
            ));
            if self.experts > 0 {
                self.moe_tensors(&p, &mut out);
            } else {
                for (name, shape) in [
                    ("gate_proj", [i, h]),
                    ("up_proj", [i, h]),
                    ("down_proj", [h, i]),
                ] {
                    out.push(t(
                        format!("{p}.mlp.{name}.weight"),
                        shape.to_vec(),
                        Kind::Weight,
                    ));
                }
            }
            out.push(t(
                format!("{p}.input_layernorm.weight"),
                vec![h],
                Kind::Norm,
            ));
            out.push(t(
                format!("{p}.post_attention_layernorm.weight"),
                vec![h],
                Kind::Norm,
            ));
        }
        out.push(t("model.norm.weight".into(), vec![h], Kind::Norm));
        if !self.tied {
            out.push(t(
                "lm_head.weight".into(),
                vec![self.vocab, h],
                Kind::Weight,
            ));
        }
        out
    }

    /// A MoE block's q/k norms, router and experts (OLMoE's state-dict order: the norms
    /// after o_proj, then `mlp.gate`, then each expert's gate, up, down).
    fn moe_tensors(&self, p: &str, out: &mut Vec<TensorSpec>) {
        let (h, i) = (self.hidden, self.intermediate);
        let (q, kv) = (self.heads * self.head_dim, self.kv_heads * self.head_dim);
        let mut push =
            |name: String, shape: Vec<usize>, kind| out.push(TensorSpec { name, shape, kind });
        push(format!("{p}.self_attn.q_norm.weight"), vec![q], Kind::Norm);
        push(format!("{p}.self_attn.k_norm.weight"), vec![kv], Kind::Norm);
        push(
            format!("{p}.mlp.gate.weight"),
            vec![self.experts, h],
            Kind::Weight,
        );
        for e in 0..self.experts {
            for (name, shape) in [
                ("gate_proj", [i, h]),
                ("up_proj", [i, h]),
                ("down_proj", [h, i]),
            ] {
                push(
                    format!("{p}.mlp.experts.{e}.{name}.weight"),
                    shape.to_vec(),
                    Kind::Weight,
                );
            }
        }
    }

    /// Parameters.
    pub fn params(&self) -> u64 {
        self.tensors().iter().map(|t| t.numel() as u64).sum()
    }

    /// The tensors split into shards as transformers' `shard_checkpoint` does: in
    /// state-dict order, a new shard starts when adding the next tensor would take the
    /// current (non-empty) one past `max_shard_bytes`.
    pub fn shards(&self) -> Vec<Vec<TensorSpec>> {
        let Some(max) = self.max_shard_bytes else {
            return vec![self.tensors()];
        };
        let mut shards: Vec<Vec<TensorSpec>> = vec![Vec::new()];
        let mut size = 0u64;
        for t in self.tensors() {
            let cur = shards.last_mut().expect("one shard");
            if size + t.bytes() > max && !cur.is_empty() {
                shards.push(Vec::new());
                size = 0;
            }
            size += t.bytes();
            shards.last_mut().expect("one shard").push(t);
        }
        shards
    }
}

/// A 64-bit hash of a tensor name (FNV-1a), to seed its chunks.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The bf16 bytes of tensor `t` under `seed`, generated in parallel chunks whose streams
/// depend only on (seed, name, chunk index).
pub fn tensor_bytes(t: &TensorSpec, seed: u64) -> Vec<u8> {
    let n = t.numel();
    let mut out = vec![0u8; 2 * n];
    match t.kind {
        Kind::Norm => {
            let one = half::bf16::from_f32(1.0).to_le_bytes();
            out.chunks_exact_mut(2)
                .for_each(|c| c.copy_from_slice(&one));
        }
        Kind::Weight => {
            let base = SplitMix64(seed ^ name_hash(&t.name)).next_u64();
            // Irwin-Hall(4) has variance 4/12: scale by sqrt(3) to unit variance.
            let scale = WEIGHT_STD * 3f32.sqrt();
            out.par_chunks_mut(2 * CHUNK)
                .enumerate()
                .for_each(|(c, bytes)| {
                    let mut r = SplitMix64(base ^ (c as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                    for pair in bytes.chunks_exact_mut(2) {
                        let x = r.next_u64();
                        let s =
                            (x & 0xffff) + ((x >> 16) & 0xffff) + ((x >> 32) & 0xffff) + (x >> 48);
                        // Each 16-bit draw + 0.5 over 2^16 is uniform on (0, 1).
                        let u = (s as f32 + 2.0) / 65536.0;
                        let v = (u - 2.0) * scale;
                        pair.copy_from_slice(&half::bf16::from_f32(v).to_le_bytes());
                    }
                });
        }
    }
    out
}

/// A tensor whose bytes are generated when the safetensors writer asks for them.
struct Lazy {
    spec: TensorSpec,
    seed: u64,
}

impl View for Lazy {
    fn dtype(&self) -> Dtype {
        Dtype::BF16
    }
    fn shape(&self) -> &[usize] {
        &self.spec.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Owned(tensor_bytes(&self.spec, self.seed))
    }
    fn data_len(&self) -> usize {
        2 * self.spec.numel()
    }
}

/// What [`write_checkpoint`] wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Written {
    /// Weight files, in order.
    pub files: Vec<String>,
    /// Parameters.
    pub params: u64,
    /// Bytes of tensor data (as the index's `total_size`).
    pub total_size: u64,
}

/// Writes the checkpoint of `shape` into `dir` (created if missing): config.json, the
/// weight file(s) and, when sharded, model.safetensors.index.json. Each file is
/// written as `NAME.tmp` and renamed, so an interrupted run leaves no file that looks
/// complete. `progress` is called with each file name once it is written.
pub fn write_checkpoint(
    dir: &Path,
    shape: &Shape,
    seed: u64,
    progress: &mut dyn FnMut(&str),
) -> std::io::Result<Written> {
    std::fs::create_dir_all(dir)?;
    let shards = shape.shards();
    let n = shards.len();
    let sharded = shape.max_shard_bytes.is_some();
    let mut files = Vec::new();
    let mut weight_map = serde_json::Map::new();
    let mut total_size = 0u64;
    for (k, tensors) in shards.into_iter().enumerate() {
        let file = if sharded {
            format!("model-{:05}-of-{:05}.safetensors", k + 1, n)
        } else {
            "model.safetensors".to_string()
        };
        for t in &tensors {
            weight_map.insert(t.name.clone(), file.clone().into());
            total_size += t.bytes();
        }
        let items: Vec<(String, Lazy)> = tensors
            .into_iter()
            .map(|spec| (spec.name.clone(), Lazy { spec, seed }))
            .collect();
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        let tmp = dir.join(format!("{file}.tmp"));
        safetensors::serialize_to_file(items, Some(meta), &tmp)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        std::fs::rename(&tmp, dir.join(&file))?;
        progress(&file);
        files.push(file);
    }
    if sharded {
        let index = serde_json::json!({
            "metadata": {"total_size": total_size},
            "weight_map": weight_map,
        });
        write_json(&dir.join("model.safetensors.index.json"), &index)?;
    }
    write_json(&dir.join("config.json"), &shape.config)?;
    Ok(Written {
        files,
        params: shape.params(),
        total_size,
    })
}

fn write_json(path: &Path, v: &serde_json::Value) -> std::io::Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(std::io::Error::other)?;
    std::fs::write(path, text + "\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use uc_model::checkpoint::Checkpoint;
    use uc_model::source::WeightSource;

    #[test]
    fn mistral_7b_shards_like_the_hub() {
        let s = Shape::mistral_7b();
        // Mistral-7B-v0.1: 7.24e9 parameters (index total_size 14483464192 bytes), two
        // shards of 9.94 GB and 4.54 GB.
        assert_eq!(2 * s.params(), 14_483_464_192);
        let shards = s.shards();
        assert_eq!(shards.len(), 2);
        let first: u64 = shards[0].iter().map(|t| t.bytes()).sum();
        assert_eq!(first, 9_942_958_080);
        assert_eq!(shards[1][0].name, "model.layers.22.mlp.gate_proj.weight");
        let last = shards[0].last().unwrap();
        assert_eq!(last.name, "model.layers.22.self_attn.o_proj.weight");
        assert_eq!(Shape::llama32_1b().params(), 1_235_814_400);
    }

    #[test]
    fn a_tiny_sharded_checkpoint_round_trips_through_the_loader() {
        let dir = tempfile::tempdir().unwrap();
        let shape = Shape::tiny(Some(40_000));
        let w = write_checkpoint(dir.path(), &shape, 7, &mut |_| {}).unwrap();
        assert!(w.files.len() >= 3, "{:?}", w.files);
        let ck = Checkpoint::open(dir.path()).unwrap();
        let cfg = ck.config();
        assert_eq!(
            (cfg.hidden_size, cfg.intermediate_size, cfg.num_layers),
            (64, 96, 3)
        );
        assert_eq!((cfg.num_heads, cfg.num_kv_heads, cfg.head_dim), (4, 2, 16));
        assert_eq!(cfg.sliding_window, Some(64));
        assert!(!cfg.tie_word_embeddings);
        let specs = shape.tensors();
        assert_eq!(ck.tensors().len(), specs.len());
        for t in &specs {
            let info = &ck.tensors()[&t.name];
            assert_eq!(info.shape, t.shape, "{}", t.name);
            assert_eq!(info.dtype, Dtype::BF16, "{}", t.name);
            let (v, _) = ck.tensor_f32(&t.name).unwrap();
            match t.kind {
                Kind::Norm => assert!(v.iter().all(|&x| x == 1.0)),
                Kind::Weight => {
                    let n = v.len() as f64;
                    let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
                    let sd = (v.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>() / n).sqrt();
                    assert!(mean.abs() < 0.003, "{} mean {mean}", t.name);
                    assert!((sd - 0.02).abs() < 0.002, "{} sd {sd}", t.name);
                }
            }
        }
        // The index names every tensor's shard, and the total size is the data bytes.
        let index: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("model.safetensors.index.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(index["weight_map"].as_object().unwrap().len(), specs.len());
        assert_eq!(index["metadata"]["total_size"], w.total_size);
        // Deterministic: the same seed gives the same bytes, another seed others.
        let again = tempfile::tempdir().unwrap();
        write_checkpoint(again.path(), &shape, 7, &mut |_| {}).unwrap();
        for f in &w.files {
            let a = std::fs::read(dir.path().join(f)).unwrap();
            assert_eq!(a, std::fs::read(again.path().join(f)).unwrap(), "{f}");
        }
        let e = &specs[0];
        assert_ne!(tensor_bytes(e, 7), tensor_bytes(e, 8));
    }

    #[test]
    fn real_configs_parse() {
        for shape in [Shape::mistral_7b(), Shape::llama32_1b()] {
            let cfg = uc_model::config::ModelConfig::from_json_str(
                &shape.config.to_string(),
                Path::new("config.json"),
            )
            .unwrap();
            assert_eq!(cfg.hidden_size, shape.hidden);
            assert_eq!(cfg.head_dim, shape.head_dim);
            assert_eq!(cfg.tie_word_embeddings, shape.tied);
        }
        let l = uc_model::config::ModelConfig::from_json_str(
            &Shape::llama32_1b().config.to_string(),
            Path::new("config.json"),
        )
        .unwrap();
        assert!(l.rope.llama3.is_some());
    }

    #[test]
    fn fewer_layers_keep_the_block_shapes() {
        let full = Shape::llama32_1b();
        let short = full.clone().with_layers(2).unwrap();
        let cfg = uc_model::config::ModelConfig::from_json_str(
            &short.config.to_string(),
            Path::new("config.json"),
        )
        .unwrap();
        assert_eq!(cfg.num_layers, 2);
        let (a, b) = (full.tensors(), short.tensors());
        assert_eq!(b.len(), 1 + 2 * 9 + 1);
        assert!(b
            .iter()
            .all(|t| a.iter().any(|u| u.name == t.name && u.shape == t.shape)));
        assert!(full.clone().with_layers(0).is_none());
        assert!(full.with_layers(17).is_none());
    }
}
