//! `config.json` of a Hugging Face decoder checkpoint, parsed and checked: the Llama
//! family (llama, mistral, qwen2, qwen3), OLMo-2, Phi-3, Gemma-2, Gemma-3 (text), and the
//! mixture-of-experts families Mixtral, Qwen3-MoE and OLMoE ([`Moe`]), and the state-space
//! family Mamba ([`Ssm`]).
//!
//! Every family difference the engine needs is turned into data here (norm layout, q/k
//! norm width, activation, embedding scale, attention scale and soft-caps, per-layer
//! sliding window and rotary settings), so the forward pass switches on fields, never on
//! the family name.
//!
//! Accepts both spellings of the rotary settings: transformers <= 4 writes
//! `rope_theta` + `rope_scaling` (Gemma-3: + `rope_local_base_freq`, Phi-3: +
//! `partial_rotary_factor`), transformers 5 writes one `rope_parameters` object (Gemma-3:
//! one per layer type, `full_attention` and `sliding_attention`).

use crate::error::{ModelError, Result};
use serde::Deserialize;
use std::path::Path;

/// The architecture families uc runs. They differ only in small switches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// Llama 1/2/3 and SmolLM.
    Llama,
    /// Mistral (Llama plus an optional sliding window).
    Mistral,
    /// Qwen2 (biases on q/k/v).
    Qwen2,
    /// Qwen3 (RMSNorm on q and k per head).
    Qwen3,
    /// OLMo-2: norms on the attention / MLP outputs, q/k RMSNorm over the whole
    /// projection.
    Olmo2,
    /// Phi-3: fused qkv and gate_up projections (split on load), partial rotary.
    Phi3,
    /// Gemma-2: GeGLU, `(1 + w)` sandwich norms, scaled embedding, soft-capping,
    /// alternating sliding-window layers.
    Gemma2,
    /// Gemma-3 (text): Gemma-2's block plus per-head q/k norms and local/global rotary.
    Gemma3,
    /// Mixtral: Mistral's attention, a sparse mixture-of-experts MLP in every block
    /// (softmax router, top-k, renormalized weights).
    Mixtral,
    /// Qwen3-MoE: Qwen3's attention (per-head q/k norms), mixture-of-experts MLPs on the
    /// layers `decoder_sparse_step` / `mlp_only_layers` select, dense MLPs elsewhere.
    #[serde(rename = "qwen3_moe")]
    Qwen3Moe,
    /// OLMoE: Llama's pre-norms, q/k RMSNorm over the whole projection (as OLMo-2), a
    /// mixture-of-experts MLP in every block.
    Olmoe,
    /// Mamba (`MambaForCausalLM`): no attention, no MLP; each block is an RMSNorm and a
    /// selective state-space mixer ([`Ssm`]) added to the residual.
    Mamba,
}

const SUPPORTED: &str =
    "llama, mistral, qwen2, qwen3, olmo2, phi3, gemma2, gemma3_text, mixtral, qwen3_moe, olmoe, mamba";

/// Where a block's RMSNorms sit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NormLayout {
    /// Before attention and before the MLP (Llama family, Phi-3).
    Pre,
    /// After attention and after the MLP, on their outputs before the residual add; no
    /// input norms (OLMo-2).
    Post,
    /// Both: before and after attention and the MLP (Gemma-2/3).
    Sandwich,
}

impl NormLayout {
    /// Which of the four norm slots (attention input, attention output, MLP input, MLP
    /// output) this layout has.
    pub fn slots(self) -> [bool; 4] {
        match self {
            NormLayout::Pre => [true, false, true, false],
            NormLayout::Post => [false, true, false, true],
            NormLayout::Sandwich => [true, true, true, true],
        }
    }
}

/// RMSNorm on the query and key projections before rotary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QkNorm {
    /// None.
    None,
    /// Over each head, weight `(head_dim,)` (qwen3, gemma3).
    PerHead,
    /// Over the whole projection of a token, weights `(heads * head_dim,)` and
    /// `(kv_heads * head_dim,)` (OLMo-2).
    Whole,
}

/// The MLP's gate activation: `act(gate(x)) * up(x)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// SiLU (SwiGLU).
    Silu,
    /// GELU, tanh approximation (`gelu_pytorch_tanh`; GeGLU).
    GeluTanh,
}

impl Family {
    fn from_model_type(t: &str) -> Option<Self> {
        match t {
            "llama" | "smollm" | "smollm2" => Some(Family::Llama),
            "mistral" => Some(Family::Mistral),
            "qwen2" => Some(Family::Qwen2),
            "qwen3" => Some(Family::Qwen3),
            "olmo2" => Some(Family::Olmo2),
            "phi3" => Some(Family::Phi3),
            "gemma2" => Some(Family::Gemma2),
            "gemma3_text" => Some(Family::Gemma3),
            "mixtral" => Some(Family::Mixtral),
            "qwen3_moe" => Some(Family::Qwen3Moe),
            "olmoe" => Some(Family::Olmoe),
            "mamba" => Some(Family::Mamba),
            _ => None,
        }
    }
}

/// Rotary position embedding settings.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Rope {
    /// Base frequency.
    pub theta: f64,
    /// Llama-3 style frequency scaling, when configured.
    pub llama3: Option<Llama3Scaling>,
    /// Linear scaling (`rope_type: "linear"`): frequencies divided by this factor.
    pub linear: Option<f64>,
}

/// Llama-3 rotary scaling (`rope_type: "llama3"`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Llama3Scaling {
    /// Overall factor.
    pub factor: f64,
    /// Low-frequency factor.
    pub low_freq_factor: f64,
    /// High-frequency factor.
    pub high_freq_factor: f64,
    /// Context length the model was trained at.
    pub original_max_position_embeddings: f64,
}

/// A sparse mixture-of-experts MLP (Mixtral, Qwen3-MoE): per token, a router
/// `(experts, hidden)` gives logits, softmax in f32, the `top_k` largest probabilities
/// pick the experts (renormalized to sum 1 when `norm_topk_prob`), and the MLP output is
/// the weighted sum of those experts' SwiGLU MLPs of width `expert_intermediate`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Moe {
    /// Experts per MoE layer (`num_local_experts`; Qwen's hub configs: `num_experts`).
    pub num_experts: usize,
    /// Experts per token (`num_experts_per_tok`).
    pub top_k: usize,
    /// Inner width of one expert (Mixtral: `intermediate_size`; Qwen3-MoE:
    /// `moe_intermediate_size`, while its dense layers use `intermediate_size`).
    pub expert_intermediate: usize,
    /// Renormalize the top-k probabilities to sum 1 (Mixtral always; Qwen3-MoE:
    /// `norm_topk_prob`, default false).
    pub norm_topk_prob: bool,
    /// Per layer: a MoE MLP (`true`) or a dense one.
    pub layers: Vec<bool>,
}

/// A Mamba block's selective state-space mixer (transformers' `MambaMixer`), shapes with
/// `d = d_inner`, `N = state`, `R = dt_rank`, `K = conv_kernel`:
/// `in_proj (2d, hidden)` -> x, z; x through a causal depthwise conv `(d, 1, K)` and SiLU;
/// `x_proj (R + 2N, d)` -> dt, B, C; `dt = softplus(dt_proj (d, R) . dt + dt_bias)`;
/// per channel `h_t = exp(dt A) h_{t-1} + dt B_t x_t`, `y_t = C_t . h_t + D x_t`, with
/// `A = -exp(A_log) (d, N)`; `out_proj (hidden, d)` of `y * silu(z)`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Ssm {
    /// Inner width `d` (`intermediate_size` = `expand * hidden_size`).
    pub d_inner: usize,
    /// State size per channel `N` (`state_size`).
    pub state: usize,
    /// Causal conv width `K` (`conv_kernel`).
    pub conv_kernel: usize,
    /// Rank of the time-step projection `R` (`time_step_rank`; "auto" =
    /// `ceil(hidden / 16)`).
    pub dt_rank: usize,
    /// in_proj and out_proj have biases (`use_bias`).
    pub use_bias: bool,
    /// The conv has a bias (`use_conv_bias`).
    pub use_conv_bias: bool,
}

/// Most experts a config may declare (the largest hub models have 512): a bigger number
/// is a corrupt header, not a model.
pub const MAX_EXPERTS: usize = 4096;

/// The checked model configuration.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelConfig {
    /// Which family of blocks to build.
    pub family: Family,
    /// Residual stream width.
    pub hidden_size: usize,
    /// MLP inner width.
    pub intermediate_size: usize,
    /// Number of transformer blocks.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (GQA: divides `num_heads`).
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Rotary settings.
    pub rope: Rope,
    /// Longest context the model supports.
    pub max_position_embeddings: usize,
    /// The head reuses the token embedding.
    pub tie_word_embeddings: bool,
    /// q/k/v projections have biases (qwen2, or `attention_bias: true`).
    pub attention_bias: bool,
    /// Sliding attention window, when the model uses one (on the layers of
    /// `sliding_layers`).
    pub sliding_window: Option<usize>,
    /// Per layer: whether it attends within `sliding_window` (all layers for mistral,
    /// qwen2/3 with `use_sliding_window`, phi3; alternating for gemma).
    pub sliding_layers: Vec<bool>,
    /// Rotary settings of the sliding layers when they differ (gemma3's local theta).
    pub local_rope: Option<Rope>,
    /// Leading dimensions of each head that are rotated (`head_dim *
    /// partial_rotary_factor`; all of them unless configured).
    pub rotary_dim: usize,
    /// Where the block's norms sit.
    pub norm_layout: NormLayout,
    /// Norm weights are stored as `w` and applied as `1 + w` (gemma).
    pub norm_unit_offset: bool,
    /// q/k RMSNorm.
    pub qk_norm: QkNorm,
    /// MLP activation.
    pub activation: Activation,
    /// Multiplier of the token embedding (gemma: `sqrt(hidden)` rounded to the
    /// checkpoint's dtype, as transformers computes it).
    pub embed_scale: Option<f32>,
    /// Attention scores are `q.k / sqrt(attn_scalar)`: `head_dim`, or gemma's
    /// `query_pre_attn_scalar`.
    pub attn_scalar: f64,
    /// Attention scores soft-capped as `c * tanh(s / c)` (gemma2).
    pub attn_softcap: Option<f64>,
    /// Logits soft-capped likewise (gemma2).
    pub final_softcap: Option<f64>,
    /// Mixture-of-experts MLPs (Mixtral, Qwen3-MoE); `None` for dense models.
    pub moe: Option<Moe>,
    /// Mamba's state-space mixer; `None` for the attention families. A Mamba config has
    /// no heads (`num_heads`, `num_kv_heads`, `head_dim`, `rotary_dim` are 0, so no KV
    /// cache is allocated) and no position limit of its own.
    pub ssm: Option<Ssm>,
}

impl ModelConfig {
    /// The sliding window of block `layer`, if it has one.
    pub fn window(&self, layer: usize) -> Option<usize> {
        match self.sliding_layers.get(layer) {
            Some(true) => self.sliding_window,
            _ => None,
        }
    }

    /// The rotary settings of block `layer`.
    pub fn rope_of(&self, layer: usize) -> &Rope {
        match (&self.local_rope, self.sliding_layers.get(layer)) {
            (Some(local), Some(true)) => local,
            _ => &self.rope,
        }
    }

    /// Whether `q_proj`/`k_proj`/`v_proj` and `gate_proj`/`up_proj` are stored fused in
    /// the checkpoint (`qkv_proj`, `gate_up_proj`; phi3): the checkpoint reader splits
    /// them (see `checkpoint`).
    pub fn fused_projections(&self) -> bool {
        self.family == Family::Phi3
    }

    /// Experts of block `layer`'s MLP: 0 for a dense MLP.
    pub fn experts_of(&self, layer: usize) -> usize {
        match &self.moe {
            Some(m) if m.layers.get(layer) == Some(&true) => m.num_experts,
            _ => 0,
        }
    }

    /// The widest MLP inner width of any block: the dense MLP's or one expert's.
    pub fn max_intermediate(&self) -> usize {
        let e = self.moe.as_ref().map_or(0, |m| m.expert_intermediate);
        self.intermediate_size.max(e)
    }

    /// Weights of the largest block's MLP (all experts of a MoE block, plus its router;
    /// a Mamba block's whole mixer), for memory plans.
    pub fn max_mlp_params(&self) -> usize {
        let h = self.hidden_size;
        if let Some(s) = &self.ssm {
            // A Mamba block's mixer, which stands where the MLP would: in_proj, out_proj,
            // x_proj, dt_proj, and the exact conv, A, D and biases.
            let (d, n, r) = (s.d_inner, s.state, s.dt_rank);
            return 3 * h * d + d * (r + 2 * n) + d * r + d * (s.conv_kernel + n + 5);
        }
        let dense = 3 * h * self.intermediate_size;
        match &self.moe {
            Some(m) if m.layers.iter().any(|&l| l) => dense.max(
                m.num_experts
                    .saturating_mul(3 * h * m.expert_intermediate + h),
            ),
            _ => dense,
        }
    }
}

/// The raw keys we read; anything else in config.json is ignored.
#[derive(Deserialize)]
struct Raw {
    model_type: Option<String>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<serde_json::Value>,
    rope_parameters: Option<serde_json::Value>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    layer_types: Option<Vec<String>>,
    sliding_window_pattern: Option<usize>,
    rope_local_base_freq: Option<f64>,
    partial_rotary_factor: Option<f64>,
    hidden_act: Option<String>,
    hidden_activation: Option<String>,
    query_pre_attn_scalar: Option<f64>,
    attn_logit_softcapping: Option<f64>,
    final_logit_softcapping: Option<f64>,
    use_bidirectional_attention: Option<bool>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
    num_local_experts: Option<usize>,
    num_experts: Option<usize>,
    num_experts_per_tok: Option<usize>,
    moe_intermediate_size: Option<usize>,
    norm_topk_prob: Option<bool>,
    decoder_sparse_step: Option<usize>,
    mlp_only_layers: Option<Vec<usize>>,
    clip_qkv: Option<f64>,
    state_size: Option<usize>,
    expand: Option<usize>,
    conv_kernel: Option<usize>,
    time_step_rank: Option<serde_json::Value>,
    layer_norm_epsilon: Option<f64>,
    use_bias: Option<bool>,
    use_conv_bias: Option<bool>,
}

/// Upper bound on any one dimension: a header that asks for more is corrupt, and
/// must not make us allocate.
const MAX_DIM: usize = 1 << 20;

impl ModelConfig {
    /// Reads and checks `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        Self::from_json_str(&text, path)
    }

    /// Parses and checks config JSON; `path` is only used in error messages.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let bad = |reason: String| ModelError::BadConfig {
            path: path.to_path_buf(),
            reason,
        };
        // serde_path_to_error: a value of the wrong type names its key ("expand: invalid
        // type: floating point `2.5`, expected usize"), not only a line and column.
        let raw: Raw =
            serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_str(text))
                .map_err(|e| match e.path().to_string() {
                    p if p == "." => bad(e.inner().to_string()),
                    p => bad(format!("key {p}: {}", e.inner())),
                })?;
        // Keys whose absence means transformers' class default but whose explicit null
        // means "off" (Gemma's soft-caps and window): looked up in the JSON itself.
        let json: serde_json::Value = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        let absent = |key: &str| json.get(key).is_none();
        let model_type = raw
            .model_type
            .clone()
            .ok_or_else(|| bad("missing key model_type".into()))?;
        let family = Family::from_model_type(&model_type).ok_or_else(|| {
            ModelError::UnsupportedArchitecture {
                path: path.to_path_buf(),
                model_type: model_type.clone(),
                supported: SUPPORTED,
            }
        })?;
        let need = |v: Option<usize>, key: &str| -> Result<usize> {
            let v = v.ok_or_else(|| bad(format!("missing key {key}")))?;
            if v == 0 || v > MAX_DIM {
                return Err(bad(format!("{key} = {v} is out of range 1..={MAX_DIM}")));
            }
            Ok(v)
        };
        if family == Family::Mamba {
            return parse_mamba(&raw, &need, &bad);
        }
        let hidden_size = need(raw.hidden_size, "hidden_size")?;
        let intermediate_size = need(raw.intermediate_size, "intermediate_size")?;
        let num_layers = need(raw.num_hidden_layers, "num_hidden_layers")?;
        let num_heads = need(raw.num_attention_heads, "num_attention_heads")?;
        let num_kv_heads = need(
            Some(raw.num_key_value_heads.unwrap_or(num_heads)),
            "num_key_value_heads",
        )?;
        let vocab_size = need(raw.vocab_size, "vocab_size")?;
        let max_position_embeddings = need(
            Some(raw.max_position_embeddings.unwrap_or(2048)),
            "max_position_embeddings",
        )?;
        if num_heads % num_kv_heads != 0 {
            return Err(bad(format!(
                "num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}"
            )));
        }
        let head_dim = match raw.head_dim {
            Some(h) => need(Some(h), "head_dim")?,
            None if hidden_size % num_heads == 0 => hidden_size / num_heads,
            None => {
                return Err(bad(format!(
                    "hidden_size {hidden_size} is not a multiple of num_attention_heads {num_heads} and head_dim is not given"
                )))
            }
        };
        if head_dim % 2 != 0 {
            return Err(bad(format!(
                "head_dim {head_dim} must be even for rotary embeddings"
            )));
        }
        // transformers' class defaults where a config omits the key.
        let default_eps = match family {
            Family::Olmo2 | Family::Phi3 | Family::Olmoe => 1e-5,
            _ => 1e-6,
        };
        let rms_norm_eps = raw.rms_norm_eps.unwrap_or(default_eps);
        if !(rms_norm_eps.is_finite() && rms_norm_eps > 0.0) {
            return Err(bad(format!("rms_norm_eps {rms_norm_eps} must be positive")));
        }
        let gemma = matches!(family, Family::Gemma2 | Family::Gemma3);
        let (rope, local_rope) = parse_ropes(&raw, family).map_err(&bad)?;
        let sliding_window = match family {
            Family::Mistral | Family::Mixtral | Family::Phi3 => raw.sliding_window,
            Family::Qwen2 | Family::Qwen3 | Family::Qwen3Moe
                if raw.use_sliding_window == Some(true) =>
            {
                raw.sliding_window
            }
            Family::Gemma2 | Family::Gemma3 if absent("sliding_window") => Some(4096),
            Family::Gemma2 | Family::Gemma3 => raw.sliding_window,
            _ => None,
        };
        if sliding_window == Some(0) {
            return Err(bad(
                "sliding_window = 0: a window must hold at least one key".into(),
            ));
        }
        let sliding_layers = sliding_layers(&raw, family, num_layers).map_err(&bad)?;
        let rotary_dim = rotary_dim(&raw, head_dim).map_err(&bad)?;
        let (norm_layout, qk_norm) = match family {
            // (Mamba returned above; its one norm is the pre-mixer slot.)
            Family::Llama
            | Family::Mistral
            | Family::Qwen2
            | Family::Phi3
            | Family::Mixtral
            | Family::Mamba => (NormLayout::Pre, QkNorm::None),
            Family::Qwen3 | Family::Qwen3Moe => (NormLayout::Pre, QkNorm::PerHead),
            Family::Olmo2 => (NormLayout::Post, QkNorm::Whole),
            Family::Olmoe => (NormLayout::Pre, QkNorm::Whole),
            Family::Gemma2 => (NormLayout::Sandwich, QkNorm::None),
            Family::Gemma3 => (NormLayout::Sandwich, QkNorm::PerHead),
        };
        let activation = activation(&raw, family).map_err(&bad)?;
        let attention_bias = raw.attention_bias.unwrap_or(family == Family::Qwen2);
        if attention_bias
            && (gemma || matches!(family, Family::Olmo2 | Family::Phi3 | Family::Olmoe))
        {
            // These families put the bias on o_proj too, which the engine does not carry.
            return Err(bad(format!(
                "attention_bias = true is not supported for model_type {model_type:?} (o_proj bias)"
            )));
        }
        if let (Family::Olmoe, Some(c)) = (family, raw.clip_qkv) {
            // transformers clamps q, k and v to +-clip_qkv; the engine does not.
            return Err(bad(format!("clip_qkv = {c} is not supported (only null)")));
        }
        if gemma && raw.use_bidirectional_attention == Some(true) {
            return Err(bad(
                "use_bidirectional_attention = true is not supported (causal decoders only)".into(),
            ));
        }
        let positive = |v: Option<f64>, key: &str| -> Result<Option<f64>> {
            match v {
                Some(x) if !(x.is_finite() && x > 0.0) => {
                    Err(bad(format!("{key} = {x} must be a positive number")))
                }
                v => Ok(v),
            }
        };
        let (attn_scalar, attn_softcap, final_softcap) = if gemma {
            (
                // Gemma2Config / Gemma3TextConfig defaults: scalar 256; Gemma-2 caps
                // scores at 50 and logits at 30 unless the config says otherwise.
                positive(raw.query_pre_attn_scalar, "query_pre_attn_scalar")?.unwrap_or(256.0),
                match family {
                    Family::Gemma2 if absent("attn_logit_softcapping") => Some(50.0),
                    _ => positive(raw.attn_logit_softcapping, "attn_logit_softcapping")?,
                },
                match family {
                    Family::Gemma2 if absent("final_logit_softcapping") => Some(30.0),
                    _ => positive(raw.final_logit_softcapping, "final_logit_softcapping")?,
                },
            )
        } else {
            (head_dim as f64, None, None)
        };
        let moe = parse_moe(&raw, family, num_layers, intermediate_size).map_err(&bad)?;
        let embed_scale = gemma.then(|| {
            embed_scale(
                hidden_size,
                raw.dtype.as_deref().or(raw.torch_dtype.as_deref()),
            )
        });
        Ok(ModelConfig {
            family,
            hidden_size,
            intermediate_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size,
            rms_norm_eps,
            rope,
            max_position_embeddings,
            // Gemma's configs default to a tied head (and its checkpoints carry no lm_head).
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(gemma),
            attention_bias,
            sliding_window,
            sliding_layers,
            local_rope,
            rotary_dim,
            norm_layout,
            norm_unit_offset: gemma,
            qk_norm,
            activation,
            embed_scale,
            attn_scalar,
            attn_softcap,
            final_softcap,
            moe,
            ssm: None,
        })
    }
}

/// A Mamba `config.json` (transformers' `MambaConfig`; its defaults where a key is
/// absent). The `time_step_*` init fields, `residual_in_fp32` (the engine is f32
/// throughout) and `use_mambapy` / `use_associative_scan` (other ways to run the same scan)
/// do not change the forward and are ignored.
fn parse_mamba(
    raw: &Raw,
    need: &dyn Fn(Option<usize>, &str) -> Result<usize>,
    bad: &dyn Fn(String) -> ModelError,
) -> Result<ModelConfig> {
    let hidden_size = need(raw.hidden_size, "hidden_size")?;
    let num_layers = need(raw.num_hidden_layers, "num_hidden_layers")?;
    let vocab_size = need(raw.vocab_size, "vocab_size")?;
    let state = need(Some(raw.state_size.unwrap_or(16)), "state_size")?;
    let expand = need(Some(raw.expand.unwrap_or(2)), "expand")?;
    let conv_kernel = need(Some(raw.conv_kernel.unwrap_or(4)), "conv_kernel")?;
    // transformers derives intermediate_size = expand * hidden_size (and writes it); a
    // config stating another width describes tensors its own class would not build.
    let d_inner = need(expand.checked_mul(hidden_size), "expand * hidden_size")?;
    if let Some(i) = raw.intermediate_size {
        if i != d_inner {
            return Err(bad(format!(
                "intermediate_size {i} is not expand * hidden_size = {expand} * {hidden_size}"
            )));
        }
    }
    let dt_rank = match &raw.time_step_rank {
        None => hidden_size.div_ceil(16),
        Some(serde_json::Value::String(s)) if s == "auto" => hidden_size.div_ceil(16),
        Some(v) => need(
            v.as_u64().and_then(|r| usize::try_from(r).ok()),
            "time_step_rank (a positive integer or \"auto\")",
        )?,
    };
    let eps = raw.layer_norm_epsilon.unwrap_or(1e-5);
    if !(eps.is_finite() && eps > 0.0) {
        return Err(bad(format!("layer_norm_epsilon {eps} must be positive")));
    }
    match raw.hidden_act.as_deref() {
        None | Some("silu") | Some("swish") => {}
        Some(other) => {
            return Err(bad(format!(
                "hidden_act {other:?} is not supported for mamba (only silu)"
            )))
        }
    }
    Ok(ModelConfig {
        family: Family::Mamba,
        hidden_size,
        intermediate_size: d_inner,
        num_layers,
        num_heads: 0,
        num_kv_heads: 0,
        head_dim: 0,
        vocab_size,
        rms_norm_eps: eps,
        rope: Rope {
            theta: 10000.0,
            llama3: None,
            linear: None,
        },
        // A recurrence has no trained context length; this only bounds a decoder's
        // position counter.
        max_position_embeddings: MAX_DIM,
        // MambaConfig's default: tied (the hub's mamba-*-hf checkpoints have no lm_head).
        tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(true),
        attention_bias: false,
        sliding_window: None,
        sliding_layers: vec![false; num_layers],
        local_rope: None,
        rotary_dim: 0,
        norm_layout: NormLayout::Pre,
        norm_unit_offset: false,
        qk_norm: QkNorm::None,
        activation: Activation::Silu,
        embed_scale: None,
        attn_scalar: 1.0,
        attn_softcap: None,
        final_softcap: None,
        moe: None,
        ssm: Some(Ssm {
            d_inner,
            state,
            conv_kernel,
            dt_rank,
            use_bias: raw.use_bias.unwrap_or(false),
            use_conv_bias: raw.use_conv_bias.unwrap_or(true),
        }),
    })
}

/// The mixture-of-experts settings of Mixtral and Qwen3-MoE (`None` for the dense
/// families, and for a Qwen3-MoE config whose every layer is dense). transformers'
/// class defaults fill absent keys; every out-of-range value is an error naming its key.
fn parse_moe(
    raw: &Raw,
    family: Family,
    layers: usize,
    intermediate: usize,
) -> std::result::Result<Option<Moe>, String> {
    if !matches!(family, Family::Mixtral | Family::Qwen3Moe | Family::Olmoe) {
        return Ok(None);
    }
    let mixtral = family == Family::Mixtral;
    // OLMoE: experts `intermediate_size` wide in every layer (Mixtral's layout), Qwen's
    // key names and unnormalized top-k default.
    let olmoe = family == Family::Olmoe;
    // Mixtral's key is num_local_experts; Qwen's hub configs write num_experts and
    // transformers 5 saves it as num_local_experts. Either, never two different values.
    let num_experts = match (raw.num_local_experts, raw.num_experts) {
        (Some(a), Some(b)) if a != b => {
            return Err(format!(
                "num_local_experts = {a} and num_experts = {b} disagree"
            ))
        }
        (Some(a), _) | (None, Some(a)) => a,
        (None, None) if mixtral => 8,
        (None, None) if olmoe => 64,
        (None, None) => 128,
    };
    let key = if raw.num_local_experts.is_some() || mixtral {
        "num_local_experts"
    } else {
        "num_experts"
    };
    if num_experts > MAX_EXPERTS {
        return Err(format!(
            "{key} = {num_experts} is out of range 0..={MAX_EXPERTS}"
        ));
    }
    if num_experts == 0 {
        if mixtral || olmoe {
            return Err(format!("{key} = 0: this family needs at least one expert"));
        }
        // transformers' Qwen3-MoE builds dense MLPs everywhere then.
        return Ok(None);
    }
    let top_k = raw
        .num_experts_per_tok
        .unwrap_or(if mixtral { 2 } else { 8 });
    if top_k == 0 || top_k > num_experts {
        return Err(format!(
            "num_experts_per_tok = {top_k} must be in 1..={num_experts} ({key})"
        ));
    }
    let expert_intermediate = if mixtral || olmoe {
        intermediate
    } else {
        raw.moe_intermediate_size.unwrap_or(768)
    };
    if expert_intermediate == 0 || expert_intermediate > MAX_DIM {
        return Err(format!(
            "moe_intermediate_size = {expert_intermediate} is out of range 1..={MAX_DIM}"
        ));
    }
    let layers = if mixtral || olmoe {
        vec![true; layers]
    } else {
        let step = raw.decoder_sparse_step.unwrap_or(1);
        if step == 0 {
            return Err("decoder_sparse_step = 0 must be at least 1".into());
        }
        let dense = raw.mlp_only_layers.clone().unwrap_or_default();
        if let Some(bad) = dense.iter().find(|&&l| l >= layers) {
            return Err(format!(
                "mlp_only_layers lists layer {bad} of num_hidden_layers {layers}"
            ));
        }
        (0..layers)
            .map(|l| !dense.contains(&l) && (l + 1) % step == 0)
            .collect()
    };
    if !layers.iter().any(|&l| l) {
        return Ok(None);
    }
    Ok(Some(Moe {
        num_experts,
        top_k,
        expert_intermediate,
        // Mixtral's router always renormalizes.
        norm_topk_prob: mixtral || raw.norm_topk_prob.unwrap_or(false),
        layers,
    }))
}

/// `sqrt(hidden)` as transformers' Gemma computes it: an f32 scalar cast to the
/// embedding's dtype (`dtype` / `torch_dtype` of config.json), e.g. sqrt(2304) = 48 exactly
/// but sqrt(640) = 25.298 -> 25.25 in bf16. The checkpoint was trained with that rounding.
fn embed_scale(hidden: usize, dtype: Option<&str>) -> f32 {
    let s = (hidden as f64).sqrt() as f32;
    match dtype {
        Some("bfloat16") => half::bf16::from_f32(s).to_f32(),
        Some("float16") => half::f16::from_f32(s).to_f32(),
        _ => s,
    }
}

/// The MLP activation; an explicit activation the family does not use is an error,
/// never silently replaced.
fn activation(raw: &Raw, family: Family) -> std::result::Result<Activation, String> {
    let gemma = matches!(family, Family::Gemma2 | Family::Gemma3);
    // Gemma's modeling code reads hidden_activation; configs on the Hub carry both keys.
    let (key, act) = match (gemma, &raw.hidden_activation, &raw.hidden_act) {
        (true, Some(a), _) => ("hidden_activation", a.as_str()),
        (_, _, Some(a)) => ("hidden_act", a.as_str()),
        (true, None, None) => return Ok(Activation::GeluTanh),
        (false, _, None) => return Ok(Activation::Silu),
    };
    match (gemma, act) {
        (false, "silu") => Ok(Activation::Silu),
        (true, "gelu_pytorch_tanh") => Ok(Activation::GeluTanh),
        (false, other) => Err(format!(
            "{key} {other:?} is not supported (this family: silu)"
        )),
        (true, other) => Err(format!(
            "{key} {other:?} is not supported (this family: gelu_pytorch_tanh)"
        )),
    }
}

/// Which layers attend within the sliding window: `layer_types` when the config lists
/// them; else gemma2 alternates (even layers sliding), gemma3 makes every
/// `sliding_window_pattern`-th layer (default 6) global; other families use the window
/// (if any) everywhere.
fn sliding_layers(
    raw: &Raw,
    family: Family,
    layers: usize,
) -> std::result::Result<Vec<bool>, String> {
    if let Some(types) = &raw.layer_types {
        if types.len() != layers {
            return Err(format!(
                "layer_types has {} entries for num_hidden_layers {layers}",
                types.len()
            ));
        }
        return types
            .iter()
            .enumerate()
            .map(|(i, t)| match t.as_str() {
                "sliding_attention" => Ok(true),
                "full_attention" => Ok(false),
                other => Err(format!(
                    "layer_types[{i}] = {other:?} (supported: sliding_attention, full_attention)"
                )),
            })
            .collect();
    }
    Ok(match family {
        Family::Gemma2 => (0..layers).map(|i| i % 2 == 0).collect(),
        Family::Gemma3 => {
            let p = raw.sliding_window_pattern.unwrap_or(6);
            if p == 0 {
                return Err("sliding_window_pattern = 0".into());
            }
            (0..layers).map(|i| (i + 1) % p != 0).collect()
        }
        _ => vec![true; layers],
    })
}

/// `int(head_dim * partial_rotary_factor)` as transformers computes it; even and at least 2.
fn rotary_dim(raw: &Raw, head_dim: usize) -> std::result::Result<usize, String> {
    let factor = raw
        .rope_parameters
        .as_ref()
        .and_then(|p| p.get("partial_rotary_factor"))
        .and_then(|v| v.as_f64())
        .or(raw.partial_rotary_factor)
        .unwrap_or(1.0);
    if !(factor > 0.0 && factor <= 1.0) {
        return Err(format!("partial_rotary_factor {factor} must be in (0, 1]"));
    }
    let dim = (head_dim as f64 * factor) as usize;
    if dim < 2 || !dim.is_multiple_of(2) {
        return Err(format!(
            "partial_rotary_factor {factor} gives {dim} rotated dimensions of head_dim {head_dim}; \
             it must be even and at least 2"
        ));
    }
    Ok(dim)
}

/// The global rotary settings and, for gemma3, those of the sliding (local) layers.
fn parse_ropes(raw: &Raw, family: Family) -> std::result::Result<(Rope, Option<Rope>), String> {
    if family != Family::Gemma3 {
        // transformers 5: everything in rope_parameters; transformers 4: rope_theta +
        // rope_scaling.
        let params = raw.rope_parameters.as_ref().or(raw.rope_scaling.as_ref());
        let rope = parse_rope(
            params,
            raw.rope_theta.unwrap_or(10_000.0),
            "rope_parameters",
        )?;
        return Ok((rope, None));
    }
    // Gemma-3: global layers theta 1e6 (rope_theta, scaled by rope_scaling), local layers
    // theta 1e4 (rope_local_base_freq), or one rope_parameters object per layer type.
    let per_type = raw
        .rope_parameters
        .as_ref()
        .filter(|p| p.get("full_attention").is_some() || p.get("sliding_attention").is_some());
    match per_type {
        Some(p) => Ok((
            parse_rope(
                p.get("full_attention"),
                1_000_000.0,
                "rope_parameters.full_attention",
            )?,
            Some(parse_rope(
                p.get("sliding_attention"),
                10_000.0,
                "rope_parameters.sliding_attention",
            )?),
        )),
        None => {
            let params = raw.rope_parameters.as_ref().or(raw.rope_scaling.as_ref());
            let global = parse_rope(
                params,
                raw.rope_theta.unwrap_or(1_000_000.0),
                "rope_scaling",
            )?;
            let local = parse_rope(
                None,
                raw.rope_local_base_freq.unwrap_or(10_000.0),
                "rope_local_base_freq",
            )?;
            Ok((global, Some(local)))
        }
    }
}

/// One rotary setting from its parameters object (`rope_parameters`, or the legacy
/// `rope_scaling`) and the theta to use when the object has none; `field` names the
/// object in errors.
fn parse_rope(
    params: Option<&serde_json::Value>,
    default_theta: f64,
    field: &str,
) -> std::result::Result<Rope, String> {
    let num = |v: &serde_json::Value, k: &str| v.get(k).and_then(|x| x.as_f64());
    let theta = params
        .and_then(|p| num(p, "rope_theta"))
        .unwrap_or(default_theta);
    if !(theta.is_finite() && theta > 1.0) {
        return Err(format!("rope_theta {theta} must be > 1"));
    }
    let kind = params
        .and_then(|p| p.get("rope_type").or_else(|| p.get("type")))
        .and_then(|t| t.as_str())
        .unwrap_or("default");
    let mut rope = Rope {
        theta,
        llama3: None,
        linear: None,
    };
    match (kind, params) {
        ("default", _) => {}
        ("linear", Some(p)) => {
            let f = num(p, "factor")
                .ok_or_else(|| format!("{field}: rope scaling linear: missing factor"))?;
            if !(f.is_finite() && f > 0.0) {
                return Err(format!(
                    "{field}: rope scaling linear: factor {f} must be > 0"
                ));
            }
            rope.linear = Some(f);
        }
        ("llama3", Some(p)) => {
            let get = |k: &str| {
                num(p, k).ok_or_else(|| format!("{field}: rope scaling llama3: missing {k}"))
            };
            let s = Llama3Scaling {
                factor: get("factor")?,
                low_freq_factor: get("low_freq_factor")?,
                high_freq_factor: get("high_freq_factor")?,
                original_max_position_embeddings: get("original_max_position_embeddings")?,
            };
            let ok = [
                s.factor,
                s.low_freq_factor,
                s.high_freq_factor,
                s.original_max_position_embeddings,
            ]
            .iter()
            .all(|x| x.is_finite() && *x > 0.0)
                && s.high_freq_factor > s.low_freq_factor;
            if !ok {
                return Err(format!("rope scaling llama3: invalid values {s:?}"));
            }
            rope.llama3 = Some(s);
        }
        (other, _) => {
            return Err(format!(
                "{field}: unsupported rope scaling type {other:?} (supported: default, linear, \
                 llama3; Phi-3's long-context longrope/su scaling is not implemented)"
            ))
        }
    }
    Ok(rope)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<ModelConfig> {
        ModelConfig::from_json_str(s, Path::new("config.json"))
    }

    const BASE: &str = r#"{"model_type":"llama","hidden_size":64,"intermediate_size":96,
        "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"vocab_size":128"#;

    #[test]
    fn reads_transformers4_and_5_rope_spellings_alike() {
        let v4 = parse(&format!(r#"{BASE},"rope_theta":5e5,"rope_scaling":{{"rope_type":"llama3","factor":8,"low_freq_factor":1,"high_freq_factor":4,"original_max_position_embeddings":64}}}}"#)).unwrap();
        let v5 = parse(&format!(r#"{BASE},"rope_parameters":{{"rope_theta":5e5,"rope_type":"llama3","factor":8,"low_freq_factor":1,"high_freq_factor":4,"original_max_position_embeddings":64}}}}"#)).unwrap();
        assert_eq!(v4.rope, v5.rope);
        assert_eq!(v4.rope.theta, 5e5);
        assert!(v4.rope.llama3.is_some());
        assert_eq!(v4.head_dim, 16);
    }

    #[test]
    fn rejects_unknown_architecture() {
        let e = parse(r#"{"model_type":"gpt2"}"#).unwrap_err();
        assert!(
            matches!(e, ModelError::UnsupportedArchitecture { .. }),
            "{e}"
        );
    }

    #[test]
    fn rejects_missing_key_naming_it() {
        let e = parse(r#"{"model_type":"llama","hidden_size":64}"#).unwrap_err();
        assert!(e.to_string().contains("intermediate_size"), "{e}");
    }

    #[test]
    fn a_value_of_the_wrong_type_names_its_key() {
        let e = parse(
            &format!(r#"{BASE},"num_hidden_layers":2.5}}"#)
                .replace(r#""num_hidden_layers":2,"#, ""),
        )
        .unwrap_err();
        assert!(e.to_string().contains("key num_hidden_layers"), "{e}");
        assert!(e.to_string().contains("config.json"), "{e}");
    }

    #[test]
    fn rejects_heads_not_dividing() {
        let e = parse(
            &format!(r#"{BASE},"num_key_value_heads":3}}"#)
                .replace(r#""num_key_value_heads":2,"#, ""),
        )
        .unwrap_err();
        assert!(e.to_string().contains("multiple"), "{e}");
    }

    #[test]
    fn rejects_absurd_dimensions_before_allocating() {
        let e = parse(
            &BASE
                .replace("\"hidden_size\":64", "\"hidden_size\":99999999999")
                .to_string()
                .replace("128", "128}"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("out of range"), "{e}");
    }

    #[test]
    fn rejects_malformed_json() {
        assert!(matches!(
            parse("{not json").unwrap_err(),
            ModelError::BadConfig { .. }
        ));
    }

    #[test]
    fn qwen2_defaults_to_qkv_bias() {
        let c = parse(&format!(
            r#"{},"rope_theta":1e6}}"#,
            BASE.replace("llama", "qwen2")
        ))
        .unwrap();
        assert!(c.attention_bias);
        assert_eq!(c.family, Family::Qwen2);
    }

    const SMALL: &str = r#""hidden_size":32,"intermediate_size":48,"num_hidden_layers":6,
        "num_attention_heads":4,"num_key_value_heads":2,"head_dim":16,"vocab_size":128"#;

    #[test]
    fn gemma3_legacy_and_per_layer_type_rope_spellings_agree() {
        let legacy = parse(&format!(
            r#"{{"model_type":"gemma3_text",{SMALL},"rope_theta":1e6,"rope_local_base_freq":1e4,
            "rope_scaling":{{"rope_type":"linear","factor":8}},"sliding_window":512,
            "sliding_window_pattern":3,"query_pre_attn_scalar":24,"torch_dtype":"bfloat16"}}"#
        ))
        .unwrap();
        let v5 = parse(&format!(
            r#"{{"model_type":"gemma3_text",{SMALL},"rope_parameters":{{
            "full_attention":{{"rope_type":"linear","factor":8,"rope_theta":1e6}},
            "sliding_attention":{{"rope_type":"default","rope_theta":1e4}}}},
            "layer_types":["sliding_attention","sliding_attention","full_attention",
            "sliding_attention","sliding_attention","full_attention"],"sliding_window":512,
            "query_pre_attn_scalar":24,"dtype":"bfloat16"}}"#
        ))
        .unwrap();
        for c in [&legacy, &v5] {
            assert_eq!(c.family, Family::Gemma3);
            assert_eq!(c.rope.theta, 1e6);
            assert_eq!(c.rope.linear, Some(8.0));
            assert_eq!(c.local_rope.as_ref().map(|r| r.theta), Some(1e4));
            assert_eq!(c.sliding_layers, [true, true, false, true, true, false]);
            assert_eq!((c.window(0), c.window(2)), (Some(512), None));
            assert_eq!(c.rope_of(0).theta, 1e4);
            assert_eq!(c.rope_of(2).theta, 1e6);
            assert_eq!(c.attn_scalar, 24.0);
            assert_eq!(c.norm_layout, NormLayout::Sandwich);
            assert_eq!(c.qk_norm, QkNorm::PerHead);
            assert_eq!(c.activation, Activation::GeluTanh);
            assert!(c.norm_unit_offset && c.tie_word_embeddings);
        }
    }

    #[test]
    fn gemma_embedding_scale_is_rounded_to_the_checkpoint_dtype() {
        // sqrt(640) = 25.2982...: bf16 keeps 8 significant bits -> 25.25.
        let g = |dtype: &str| {
            parse(&format!(
                r#"{{"model_type":"gemma2","hidden_size":640,"intermediate_size":48,
                "num_hidden_layers":2,"num_attention_heads":4,"head_dim":16,"vocab_size":128,
                "torch_dtype":"{dtype}"}}"#
            ))
            .unwrap()
        };
        assert_eq!(g("bfloat16").embed_scale, Some(25.25));
        assert_eq!(g("float32").embed_scale, Some(640f64.sqrt() as f32));
        // Gemma-2 defaults (transformers' Gemma2Config): alternate layers sliding (even
        // ones) with a 4096 window, scores capped at 50 and logits at 30, scalar 256.
        let c = g("float32");
        assert_eq!(c.sliding_layers, [true, false]);
        assert_eq!(c.sliding_window, Some(4096));
        assert_eq!((c.attn_softcap, c.final_softcap), (Some(50.0), Some(30.0)));
        assert_eq!(c.attn_scalar, 256.0);
        // An explicit null turns a cap (or the window) off.
        let off = parse(
            r#"{"model_type":"gemma2","hidden_size":64,"intermediate_size":48,
            "num_hidden_layers":2,"num_attention_heads":4,"head_dim":16,"vocab_size":128,
            "attn_logit_softcapping":null,"final_logit_softcapping":null,"sliding_window":null}"#,
        )
        .unwrap();
        assert_eq!(
            (off.attn_softcap, off.final_softcap, off.sliding_window),
            (None, None, None)
        );
        assert!(parse(&format!(r#"{{"model_type":"llama",{SMALL}}}"#))
            .unwrap()
            .embed_scale
            .is_none());
    }

    #[test]
    fn phi3_partial_rotary_in_either_spelling() {
        let legacy = parse(&format!(
            r#"{{"model_type":"phi3",{SMALL},"partial_rotary_factor":0.75,"rope_theta":1e4}}"#
        ))
        .unwrap();
        let v5 = parse(&format!(
            r#"{{"model_type":"phi3",{SMALL},"rope_parameters":{{"rope_type":"default",
            "rope_theta":1e4,"partial_rotary_factor":0.75}}}}"#
        ))
        .unwrap();
        assert_eq!((legacy.rotary_dim, v5.rotary_dim), (12, 12));
        assert!(legacy.fused_projections());
        let e = parse(&format!(
            r#"{{"model_type":"phi3",{SMALL},"partial_rotary_factor":0.1}}"#
        ))
        .unwrap_err();
        assert!(e.to_string().contains("partial_rotary_factor"), "{e}");
    }

    #[test]
    fn phi3_longrope_is_a_clear_error_naming_the_file() {
        for kind in ["longrope", "su"] {
            let e = parse(&format!(
                r#"{{"model_type":"phi3",{SMALL},"rope_scaling":{{"type":"{kind}",
                "short_factor":[1.0],"long_factor":[1.0]}}}}"#
            ))
            .unwrap_err();
            let m = e.to_string();
            assert!(m.contains("config.json") && m.contains(kind), "{m}");
            assert!(matches!(e, ModelError::BadConfig { .. }));
        }
    }

    #[test]
    fn olmo2_has_post_norms_and_whole_projection_qk_norm() {
        let c = parse(&format!(r#"{{"model_type":"olmo2",{SMALL}}}"#)).unwrap();
        assert_eq!(c.norm_layout, NormLayout::Post);
        assert_eq!(c.qk_norm, QkNorm::Whole);
        assert_eq!(c.activation, Activation::Silu);
        let e = parse(&format!(
            r#"{{"model_type":"olmo2",{SMALL},"attention_bias":true}}"#
        ))
        .unwrap_err();
        assert!(e.to_string().contains("attention_bias"), "{e}");
    }

    #[test]
    fn new_families_reject_bad_fields_by_name() {
        let cases = [
            (
                r#""model_type":"gemma2","hidden_activation":"gelu""#,
                "hidden_activation",
            ),
            (r#""model_type":"llama","hidden_act":"gelu""#, "hidden_act"),
            (
                r#""model_type":"gemma3_text","layer_types":["full_attention"]"#,
                "layer_types",
            ),
            (
                r#""model_type":"gemma2","query_pre_attn_scalar":0"#,
                "query_pre_attn_scalar",
            ),
            (
                r#""model_type":"gemma2","attn_logit_softcapping":-1"#,
                "attn_logit_softcapping",
            ),
            (
                r#""model_type":"gemma3_text","use_bidirectional_attention":true"#,
                "use_bidirectional_attention",
            ),
        ];
        for (extra, field) in cases {
            let e = parse(&format!("{{{extra},{SMALL}}}")).unwrap_err();
            let m = e.to_string();
            assert!(
                m.contains(field) && m.contains("config.json"),
                "{extra}: {m}"
            );
        }
        // The unknown-type error lists the new families.
        let e = parse(&format!(r#"{{"model_type":"gemma3",{SMALL}}}"#)).unwrap_err();
        assert!(e.to_string().contains("gemma3_text") && e.to_string().contains("olmo2"));
        // A missing field of a new family is named.
        let e = parse(r#"{"model_type":"phi3","hidden_size":64}"#).unwrap_err();
        assert!(e.to_string().contains("intermediate_size"), "{e}");
    }

    const MOE: &str = r#""hidden_size":32,"intermediate_size":48,"num_hidden_layers":4,
        "num_attention_heads":4,"num_key_value_heads":2,"head_dim":16,"vocab_size":128"#;

    #[test]
    fn mixtral_is_moe_in_every_layer_with_renormalized_top_k() {
        let c = parse(&format!(
            r#"{{"model_type":"mixtral",{MOE},"num_local_experts":4,"num_experts_per_tok":2}}"#
        ))
        .unwrap();
        let m = c.moe.as_ref().unwrap();
        assert_eq!((m.num_experts, m.top_k, m.expert_intermediate), (4, 2, 48));
        assert!(m.norm_topk_prob);
        assert_eq!(m.layers, [true; 4]);
        assert_eq!((c.experts_of(3), c.qk_norm), (4, QkNorm::None));
        // transformers' defaults: 8 experts, top-2.
        let d = parse(&format!(r#"{{"model_type":"mixtral",{MOE}}}"#)).unwrap();
        assert_eq!(d.moe.map(|m| (m.num_experts, m.top_k)), Some((8, 2)));
    }

    #[test]
    fn qwen3_moe_layers_follow_sparse_step_and_mlp_only_layers() {
        let c = parse(&format!(
            r#"{{"model_type":"qwen3_moe",{MOE},"num_experts":8,"num_experts_per_tok":2,
            "moe_intermediate_size":24,"decoder_sparse_step":2,"mlp_only_layers":[3]}}"#
        ))
        .unwrap();
        let m = c.moe.as_ref().unwrap();
        // (l + 1) % 2 == 0 -> layers 1 and 3; 3 is dense.
        assert_eq!(m.layers, [false, true, false, false]);
        assert_eq!((m.expert_intermediate, m.norm_topk_prob), (24, false));
        assert_eq!((c.experts_of(0), c.experts_of(1)), (0, 8));
        assert_eq!(c.max_intermediate(), 48);
        assert_eq!(c.qk_norm, QkNorm::PerHead);
        // transformers 5 saves Qwen's num_experts as num_local_experts.
        let v5 = parse(&format!(
            r#"{{"model_type":"qwen3_moe",{MOE},"num_local_experts":8,"num_experts_per_tok":2,
            "moe_intermediate_size":24,"decoder_sparse_step":2,"mlp_only_layers":[3]}}"#
        ))
        .unwrap();
        assert_eq!(v5.moe, c.moe);
        // No MoE layer left: a dense model.
        let dense = parse(&format!(
            r#"{{"model_type":"qwen3_moe",{MOE},"num_experts":0}}"#
        ))
        .unwrap();
        assert!(dense.moe.is_none());
    }

    #[test]
    fn olmoe_has_pre_norms_whole_qk_norm_and_experts_everywhere() {
        let c = parse(&format!(
            r#"{{"model_type":"olmoe",{MOE},"num_experts":4,"num_experts_per_tok":2,"clip_qkv":null}}"#
        ))
        .unwrap();
        assert_eq!((c.norm_layout, c.qk_norm), (NormLayout::Pre, QkNorm::Whole));
        let m = c.moe.as_ref().unwrap();
        assert_eq!((m.num_experts, m.top_k, m.expert_intermediate), (4, 2, 48));
        assert!(!m.norm_topk_prob && m.layers == [true; 4]);
        assert_eq!(c.rms_norm_eps, 1e-5);
        let e = parse(&format!(r#"{{"model_type":"olmoe",{MOE},"clip_qkv":8.0}}"#)).unwrap_err();
        assert!(e.to_string().contains("clip_qkv"), "{e}");
    }

    const MAMBA: &str = r#""model_type":"mamba","hidden_size":40,"num_hidden_layers":2,
        "vocab_size":128"#;

    #[test]
    fn mamba_defaults_and_auto_rank() {
        let c = parse(&format!(r#"{{{MAMBA}}}"#)).unwrap();
        assert_eq!(c.family, Family::Mamba);
        let s = c.ssm.as_ref().unwrap();
        // MambaConfig defaults: state 16, expand 2, conv 4, rank ceil(40 / 16) = 3.
        assert_eq!(
            (s.d_inner, s.state, s.conv_kernel, s.dt_rank),
            (80, 16, 4, 3)
        );
        assert!(!s.use_bias && s.use_conv_bias && c.tie_word_embeddings);
        assert_eq!((c.num_heads, c.num_kv_heads, c.head_dim), (0, 0, 0));
        assert_eq!((c.intermediate_size, c.rms_norm_eps), (80, 1e-5));
        let c = parse(&format!(
            r#"{{{MAMBA},"time_step_rank":5,"state_size":4,"expand":3,"intermediate_size":120,
            "use_bias":true,"layer_norm_epsilon":1e-6,"tie_word_embeddings":false,
            "time_step_min":0.001,"residual_in_fp32":true}}"#
        ))
        .unwrap();
        let s = c.ssm.unwrap();
        assert_eq!(
            (s.d_inner, s.state, s.dt_rank, s.use_bias),
            (120, 4, 5, true)
        );
        assert!(!c.tie_word_embeddings);
        assert!(c.moe.is_none());
        let auto = parse(&format!(r#"{{{MAMBA},"time_step_rank":"auto"}}"#)).unwrap();
        assert_eq!(auto.ssm.unwrap().dt_rank, 3);
    }

    #[test]
    fn mamba_bad_fields_are_named() {
        for (extra, field) in [
            (r#""time_step_rank":"big""#, "time_step_rank"),
            (r#""time_step_rank":0"#, "time_step_rank"),
            (r#""state_size":0"#, "state_size"),
            (r#""conv_kernel":0"#, "conv_kernel"),
            (r#""intermediate_size":64"#, "intermediate_size"),
            (r#""layer_norm_epsilon":-1"#, "layer_norm_epsilon"),
            (r#""hidden_act":"gelu""#, "hidden_act"),
        ] {
            let e = parse(&format!(r#"{{{MAMBA},{extra}}}"#)).unwrap_err();
            let m = e.to_string();
            assert!(
                m.contains(field) && m.contains("config.json"),
                "{extra}: {m}"
            );
            assert!(matches!(e, ModelError::BadConfig { .. }));
        }
        let e = parse(r#"{"model_type":"mamba","hidden_size":64,"vocab_size":8}"#).unwrap_err();
        assert!(e.to_string().contains("num_hidden_layers"), "{e}");
    }

    #[test]
    fn invalid_moe_fields_are_named() {
        for (ty, extra, field) in [
            (
                "mixtral",
                r#""num_experts_per_tok":5,"num_local_experts":4"#,
                "num_experts_per_tok",
            ),
            ("mixtral", r#""num_local_experts":0"#, "num_local_experts"),
            (
                "mixtral",
                r#""num_local_experts":99999"#,
                "num_local_experts",
            ),
            (
                "qwen3_moe",
                r#""num_experts":4,"num_local_experts":8"#,
                "num_experts",
            ),
            (
                "qwen3_moe",
                r#""num_experts_per_tok":0"#,
                "num_experts_per_tok",
            ),
            (
                "qwen3_moe",
                r#""decoder_sparse_step":0"#,
                "decoder_sparse_step",
            ),
            ("qwen3_moe", r#""mlp_only_layers":[4]"#, "mlp_only_layers"),
            (
                "qwen3_moe",
                r#""moe_intermediate_size":0"#,
                "moe_intermediate_size",
            ),
        ] {
            let e = parse(&format!(r#"{{"model_type":"{ty}",{MOE},{extra}}}"#)).unwrap_err();
            let m = e.to_string();
            assert!(
                m.contains(field) && m.contains("config.json"),
                "{extra}: {m}"
            );
            assert!(matches!(e, ModelError::BadConfig { .. }));
        }
    }
}
