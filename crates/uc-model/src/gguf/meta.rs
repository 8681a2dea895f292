//! Typed, bounded access to GGUF metadata, the hyper-parameters read from it, and the
//! Hugging Face `config.json` written from them.

use super::names::Arch;
use super::GgufError;
use candle_core::quantized::gguf_file::Value;
use serde_json::{json, Map, Value as Json};
use std::collections::HashMap;

/// Upper bound on any one model dimension (as in `config.rs`): larger is a corrupt
/// header, and must not turn into an allocation.
const MAX_DIM: usize = 1 << 20;
/// Upper bound on the vocabulary (2^24 tokens).
pub(crate) const MAX_TOKENS: usize = 1 << 24;

/// GGUF metadata with typed getters; every failure names the key.
pub(crate) struct Meta<'a>(pub &'a HashMap<String, Value>);

fn as_int(v: &Value) -> Option<i128> {
    Some(match *v {
        Value::U8(x) => x.into(),
        Value::I8(x) => x.into(),
        Value::U16(x) => x.into(),
        Value::I16(x) => x.into(),
        Value::U32(x) => x.into(),
        Value::I32(x) => x.into(),
        Value::U64(x) => x.into(),
        Value::I64(x) => x.into(),
        _ => return None,
    })
}

impl<'a> Meta<'a> {
    fn bad(key: &str, reason: impl Into<String>) -> GgufError {
        GgufError::BadMetadata {
            key: key.to_string(),
            reason: reason.into(),
        }
    }

    /// `Ok(None)` if absent; an error if present with the wrong type.
    fn opt<T>(
        &self,
        key: &str,
        what: &str,
        f: impl Fn(&'a Value) -> Option<T>,
    ) -> Result<Option<T>, GgufError> {
        self.0
            .get(key)
            .map(|v| {
                f(v).ok_or_else(|| {
                    Self::bad(key, format!("expected {what}, found {:?}", v.value_type()))
                })
            })
            .transpose()
    }

    fn need<T>(key: &str, v: Option<T>) -> Result<T, GgufError> {
        v.ok_or_else(|| GgufError::MissingMetadata {
            key: key.to_string(),
        })
    }

    pub fn opt_str(&self, key: &str) -> Result<Option<&'a str>, GgufError> {
        self.opt(key, "a string", |v| match v {
            Value::String(s) => Some(s.as_str()),
            _ => None,
        })
    }

    pub fn str(&self, key: &str) -> Result<&'a str, GgufError> {
        Self::need(key, self.opt_str(key)?)
    }

    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>, GgufError> {
        self.opt(key, "a bool", |v| match v {
            Value::Bool(b) => Some(*b),
            _ => None,
        })
    }

    /// A non-negative integer of any width, at most `max`.
    pub fn opt_uint(&self, key: &str, max: usize) -> Result<Option<usize>, GgufError> {
        match self.opt(key, "an integer", as_int)? {
            None => Ok(None),
            Some(x) => usize::try_from(x)
                .ok()
                .filter(|&x| x <= max)
                .map(Some)
                .ok_or_else(|| Self::bad(key, format!("{x} is out of range 0..={max}"))),
        }
    }

    /// A model dimension: an integer in `1..=MAX_DIM`.
    fn dim(&self, key: &str) -> Result<Option<usize>, GgufError> {
        match self.opt_uint(key, MAX_DIM)? {
            Some(0) => Err(Self::bad(key, "must be positive")),
            d => Ok(d),
        }
    }

    /// A finite positive float (f32 or f64), as the shortest decimal that reads back
    /// as the stored f32 -- so `1e-5` stays `1e-5`, not `9.999999747378752e-6`.
    fn positive(&self, key: &str) -> Result<Option<f64>, GgufError> {
        let v = self.opt(key, "a float", |v| match *v {
            Value::F32(x) => Some(x.to_string().parse::<f64>().unwrap_or(x.into())),
            Value::F64(x) => Some(x),
            _ => None,
        })?;
        match v {
            Some(x) if !(x.is_finite() && x > 0.0) => {
                Err(Self::bad(key, format!("{x} is not a positive number")))
            }
            v => Ok(v),
        }
    }

    /// An array, at most `max` long.
    pub fn opt_array(&self, key: &str, max: usize) -> Result<Option<&'a [Value]>, GgufError> {
        match self.opt(key, "an array", |v| match v {
            Value::Array(a) => Some(a.as_slice()),
            _ => None,
        })? {
            Some(a) if a.len() > max => Err(Self::bad(
                key,
                format!("{} entries, more than {max}", a.len()),
            )),
            a => Ok(a),
        }
    }

    /// An array of strings, at most `max` long.
    pub fn opt_strings(&self, key: &str, max: usize) -> Result<Option<Vec<&'a str>>, GgufError> {
        let Some(a) = self.opt_array(key, max)? else {
            return Ok(None);
        };
        a.iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s.as_str()),
                v => Err(Self::bad(
                    key,
                    format!("entry {i}: expected a string, found {:?}", v.value_type()),
                )),
            })
            .collect::<Result<_, _>>()
            .map(Some)
    }

    pub fn strings(&self, key: &str, max: usize) -> Result<Vec<&'a str>, GgufError> {
        Self::need(key, self.opt_strings(key, max)?)
    }
}

/// The model's shape and settings, checked.
#[derive(Debug, Clone)]
pub struct HParams {
    /// Architecture.
    pub arch: Arch,
    /// Transformer blocks.
    pub n_layer: usize,
    /// Residual width.
    pub hidden: usize,
    /// MLP inner width.
    pub ffn: usize,
    /// Query heads.
    pub n_head: usize,
    /// Key/value heads (divides `n_head`).
    pub n_head_kv: usize,
    /// Width of one head (even, for rotary pairs).
    pub head_dim: usize,
    /// Number of tokens in the vocabulary (= rows of the embedding).
    pub vocab_size: usize,
    /// Training context length, when stated.
    pub context_length: Option<usize>,
    /// RMSNorm epsilon.
    pub rms_eps: f64,
    /// Rotary base, when stated.
    pub rope_theta: Option<f64>,
    /// HF `rope_scaling` object, when the file states a scaling.
    pub rope_scaling: Option<Json>,
    /// Token ids of bos/eos/unk/pad, each `< vocab_size` when present.
    pub special: SpecialIds,
    /// Gemma-3's settings (`Some` exactly when `arch` is Gemma3).
    pub gemma3: Option<Gemma3Params>,
}

/// What a Gemma-3 config needs beyond the common fields. llama.cpp stores only some of
/// it; the rest is what llama.cpp's `llama_model_gemma3` assumes when a key is absent,
/// so the imported model computes what llama.cpp computes on the same file.
#[derive(Debug, Clone, PartialEq)]
pub struct Gemma3Params {
    /// `attention.sliding_window`; `None` (absent or 0) means no layer slides.
    pub sliding_window: Option<usize>,
    /// Per layer: does it attend within the window? From
    /// `attention.sliding_window_pattern` (an array of bools, or a period `p` making
    /// every `p`-th layer global), default period 6 as in llama.cpp.
    pub sliding: Vec<bool>,
    /// Rotary base of the sliding layers (`rope.freq_base_swa`, default 10000).
    pub local_theta: f64,
    /// Scores are `q.k / sqrt(query_pre_attn_scalar)`: llama.cpp uses `head_dim`,
    /// except for the 62-layer (27B) model, `hidden / heads`.
    pub query_pre_attn_scalar: usize,
    /// `final_logit_softcapping`, when the file states one.
    pub final_softcap: Option<f64>,
}

/// The special token ids the tokenizer metadata names.
#[derive(Debug, Clone, Copy, Default)]
pub struct SpecialIds {
    /// Beginning of sequence.
    pub bos: Option<usize>,
    /// End of sequence.
    pub eos: Option<usize>,
    /// Unknown.
    pub unk: Option<usize>,
    /// Padding.
    pub pad: Option<usize>,
}

impl SpecialIds {
    /// `(role, id)` for each present id, role being `bos`/`eos`/`unk`/`pad`.
    pub fn named(&self) -> impl Iterator<Item = (&'static str, usize)> {
        [
            ("bos", self.bos),
            ("eos", self.eos),
            ("unk", self.unk),
            ("pad", self.pad),
        ]
        .into_iter()
        .filter_map(|(k, v)| Some((k, v?)))
    }
}

/// The GGUF key holding the vocabulary.
pub(crate) const TOKENS_KEY: &str = "tokenizer.ggml.tokens";

impl HParams {
    /// Reads and checks the hyper-parameters of `general.architecture`.
    pub fn from_meta(meta: &Meta) -> Result<Self, GgufError> {
        let arch_name = meta.str("general.architecture")?;
        let arch =
            Arch::from_name(arch_name).ok_or_else(|| GgufError::UnsupportedArchitecture {
                architecture: arch_name.to_string(),
            })?;
        let key = |k: &str| format!("{}.{k}", arch.name());
        let dim = |k: &str| -> Result<usize, GgufError> {
            let k = key(k);
            Meta::need(&k, meta.dim(&k)?)
        };
        let n_head = dim("attention.head_count")?;
        let hidden = dim("embedding_length")?;
        let n_head_kv = match meta.dim(&key("attention.head_count_kv"))? {
            Some(n) => n,
            None => n_head,
        };
        if n_head % n_head_kv != 0 {
            return Err(Meta::bad(
                &key("attention.head_count_kv"),
                format!("{n_head_kv} does not divide head_count {n_head}"),
            ));
        }
        let head_dim = match meta.dim(&key("attention.key_length"))? {
            Some(d) => d,
            None if hidden % n_head == 0 => hidden / n_head,
            None => {
                return Err(Meta::bad(
                    &key("attention.head_count"),
                    format!(
                    "{n_head} does not divide embedding_length {hidden} and key_length is absent"
                ),
                ))
            }
        };
        if head_dim % 2 != 0 {
            return Err(Meta::bad(
                &key("attention.key_length"),
                format!("head width {head_dim} is odd"),
            ));
        }
        let vocab_size = meta.opt_array(TOKENS_KEY, MAX_TOKENS)?.map(<[_]>::len);
        let vocab_size = Meta::need(TOKENS_KEY, vocab_size)?;
        let id = |k: &str| -> Result<Option<usize>, GgufError> {
            let k = format!("tokenizer.ggml.{k}_token_id");
            match meta.opt_uint(&k, MAX_TOKENS)? {
                Some(id) if id >= vocab_size => Err(Meta::bad(
                    &k,
                    format!("{id} is not below the {vocab_size} tokens"),
                )),
                id => Ok(id),
            }
        };
        let special = SpecialIds {
            bos: id("bos")?,
            eos: id("eos")?,
            unk: id("unknown")?,
            pad: id("padding")?,
        };
        let rms_key = key("attention.layer_norm_rms_epsilon");
        let n_layer = dim("block_count")?;
        let gemma3 = match arch {
            Arch::Gemma3 => Some(gemma3_params(meta, n_layer, hidden, n_head, head_dim)?),
            _ => None,
        };
        let rope_scaling = rope_scaling(meta, arch)?;
        if arch == Arch::Gemma3 {
            if let Some(kind) = rope_scaling.as_ref().and_then(|r| r.get("rope_type")) {
                if kind != "linear" {
                    return Err(Meta::bad(
                        &key("rope.scaling.type"),
                        format!("{kind} scaling on gemma3 (supported: none, linear)"),
                    ));
                }
            }
        }
        Ok(HParams {
            arch,
            n_layer,
            hidden,
            ffn: dim("feed_forward_length")?,
            n_head,
            n_head_kv,
            head_dim,
            vocab_size,
            context_length: meta.dim(&key("context_length"))?,
            rms_eps: Meta::need(&rms_key, meta.positive(&rms_key)?)?,
            rope_theta: meta.positive(&key("rope.freq_base"))?,
            rope_scaling,
            special,
            gemma3,
        })
    }

    /// The Hugging Face `config.json`, keys as transformers writes them.
    pub fn config_json(&self, tied_embeddings: bool) -> Json {
        if let Some(g) = &self.gemma3 {
            return self.gemma3_config_json(g, tied_embeddings);
        }
        let mut c = json!({
            "architectures": [self.arch.hf_class()],
            "model_type": self.arch.model_type(),
            "hidden_size": self.hidden,
            "intermediate_size": self.ffn,
            "num_hidden_layers": self.n_layer,
            "num_attention_heads": self.n_head,
            "num_key_value_heads": self.n_head_kv,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_eps,
            "vocab_size": self.vocab_size,
            "tie_word_embeddings": tied_embeddings,
            "torch_dtype": "float32",
        });
        let mut put = |k: &str, v: Option<Json>| {
            if let (Some(v), Some(obj)) = (v, c.as_object_mut()) {
                obj.insert(k.to_string(), v);
            }
        };
        put(
            "max_position_embeddings",
            self.context_length.map(Json::from),
        );
        put("rope_theta", self.rope_theta.map(Json::from));
        put("rope_scaling", self.rope_scaling.clone());
        put("bos_token_id", self.special.bos.map(Json::from));
        put("eos_token_id", self.special.eos.map(Json::from));
        put("pad_token_id", self.special.pad.map(Json::from));
        match self.arch {
            // The GGUF name table admits no llama biases, so say so explicitly.
            Arch::Llama => {
                put("attention_bias", Some(false.into()));
                put("mlp_bias", Some(false.into()));
            }
            Arch::Qwen3 => put("attention_bias", Some(false.into())),
            Arch::Qwen2 | Arch::Gemma3 => {}
        }
        if matches!(self.arch, Arch::Qwen2 | Arch::Qwen3) {
            put("use_sliding_window", Some(false.into()));
        }
        c
    }
}

impl HParams {
    /// Gemma-3's `config.json`, in transformers 5's spelling (`rope_parameters` per
    /// layer type, `layer_types`), so that nothing is left to a class default.
    fn gemma3_config_json(&self, g: &Gemma3Params, tied_embeddings: bool) -> Json {
        let layer_types: Vec<&str> = g
            .sliding
            .iter()
            .map(|&s| {
                if s {
                    "sliding_attention"
                } else {
                    "full_attention"
                }
            })
            .collect();
        let mut global = json!({"rope_type": "default"});
        if let (Some(obj), Some(theta)) = (global.as_object_mut(), self.rope_theta) {
            obj.insert("rope_theta".into(), theta.into());
        }
        if let (Some(obj), Some(Json::Object(scaling))) =
            (global.as_object_mut(), self.rope_scaling.as_ref())
        {
            obj.extend(scaling.clone());
        }
        json!({
            "architectures": [self.arch.hf_class()],
            "model_type": self.arch.model_type(),
            "hidden_size": self.hidden,
            "intermediate_size": self.ffn,
            "num_hidden_layers": self.n_layer,
            "num_attention_heads": self.n_head,
            "num_key_value_heads": self.n_head_kv,
            "head_dim": self.head_dim,
            "hidden_activation": "gelu_pytorch_tanh",
            "rms_norm_eps": self.rms_eps,
            "vocab_size": self.vocab_size,
            "tie_word_embeddings": tied_embeddings,
            // f32, not the original bf16: the embedding scale sqrt(hidden) is then the
            // f32 value, which is what llama.cpp multiplies by (transformers would
            // round it to bf16 for a bf16 checkpoint: 25.25 instead of 25.298 at 640).
            "torch_dtype": "float32",
            "max_position_embeddings": self.context_length,
            "sliding_window": g.sliding_window,
            "layer_types": layer_types,
            "rope_parameters": {
                "full_attention": global,
                "sliding_attention": {"rope_type": "default", "rope_theta": g.local_theta},
            },
            "query_pre_attn_scalar": g.query_pre_attn_scalar,
            "attn_logit_softcapping": null,
            "final_logit_softcapping": g.final_softcap,
            "attention_bias": false,
            "use_bidirectional_attention": false,
            "bos_token_id": self.special.bos,
            "eos_token_id": self.special.eos,
            "pad_token_id": self.special.pad,
        })
    }
}

/// Reads Gemma-3's window, pattern, local rotary base, score scale and soft-cap, with
/// llama.cpp's defaults (`src/models/gemma3.cpp`) for the keys it treats as optional.
fn gemma3_params(
    meta: &Meta,
    n_layer: usize,
    hidden: usize,
    n_head: usize,
    head_dim: usize,
) -> Result<Gemma3Params, GgufError> {
    let window_key = "gemma3.attention.sliding_window";
    let sliding_window = meta.opt_uint(window_key, MAX_DIM)?.filter(|&w| w > 0);
    let pattern_key = "gemma3.attention.sliding_window_pattern";
    let sliding = match (sliding_window, meta.0.get(pattern_key)) {
        (None, _) => vec![false; n_layer],
        (Some(_), Some(Value::Array(a))) => {
            if a.len() != n_layer {
                return Err(Meta::bad(
                    pattern_key,
                    format!("{} entries for {n_layer} layers", a.len()),
                ));
            }
            a.iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::Bool(b) => Ok(*b),
                    v => Err(Meta::bad(
                        pattern_key,
                        format!("entry {i}: expected a bool, found {:?}", v.value_type()),
                    )),
                })
                .collect::<Result<_, _>>()?
        }
        (Some(_), _) => {
            // llama_hparams::set_swa_pattern: layer i slides unless i % p == p - 1;
            // p = 0 means every layer slides.
            let p = meta.opt_uint(pattern_key, MAX_DIM)?.unwrap_or(6);
            (0..n_layer).map(|i| p == 0 || i % p < p - 1).collect()
        }
    };
    let local_theta = meta
        .positive("gemma3.rope.freq_base_swa")?
        .unwrap_or(10_000.0);
    let query_pre_attn_scalar = if n_layer == 62 {
        hidden / n_head
    } else {
        head_dim
    };
    Ok(Gemma3Params {
        sliding_window,
        sliding,
        local_theta,
        query_pre_attn_scalar,
        final_softcap: meta.positive("gemma3.final_logit_softcapping")?,
    })
}

/// `{arch}.rope.scaling.*` (or the older `rope.scale_linear`) as HF `rope_scaling`.
fn rope_scaling(meta: &Meta, arch: Arch) -> Result<Option<Json>, GgufError> {
    let key = |k: &str| format!("{}.rope.{k}", arch.name());
    let type_key = key("scaling.type");
    let factor = |k: &str| -> Result<f64, GgufError> {
        let k = key(k);
        Meta::need(&k, meta.positive(&k)?)
    };
    let kind = match meta.opt_str(&type_key)? {
        Some(t) => t,
        None if meta.0.contains_key(&key("scale_linear")) => {
            return Ok(Some(
                json!({"rope_type": "linear", "factor": factor("scale_linear")?}),
            ))
        }
        None => return Ok(None),
    };
    let mut obj = Map::new();
    match kind {
        "none" => return Ok(None),
        "linear" => {}
        "yarn" => {
            let k = key("scaling.original_context_length");
            if let Some(n) = meta.dim(&k)? {
                obj.insert("original_max_position_embeddings".into(), n.into());
            }
        }
        other => {
            return Err(Meta::bad(
                &type_key,
                format!("unsupported rope scaling {other:?} (supported: none, linear, yarn)"),
            ))
        }
    }
    obj.insert("rope_type".into(), kind.into());
    obj.insert("factor".into(), factor("scaling.factor")?.into());
    Ok(Some(Json::Object(obj)))
}
