//! Hugging Face names of a dense decoder checkpoint's tensors: the globals, the seven
//! linears of every block and its norms. The one table the loaders, the compressor, the
//! GGUF importer/exporter and the runtime share.
//!
//! Phi-3 stores q/k/v fused as `self_attn.qkv_proj` and gate/up as `mlp.gate_up_proj`;
//! the checkpoint reader presents them under the seven names below (see
//! `checkpoint`), so everything past it (and every pack) sees seven linears.
//!
//! Mixture-of-experts blocks (Mixtral, Qwen3-MoE) have q/k/v/o, a router and per expert
//! a gate/up/down triple under the hub's per-expert names ([`block_linears`],
//! [`moe_router`]): Mixtral `block_sparse_moe.experts.E.{w1,w3,w2}`, Qwen3-MoE
//! `mlp.experts.E.{gate,up,down}_proj`. transformers 5 holds them fused in memory but
//! `save_pretrained` writes these names; the fused 3-D form ([`FUSED_EXPERTS`]) is split
//! on open (see `checkpoint`).
//!
//! Mamba (`MambaForCausalLM`) lives under `backbone.`: `backbone.embeddings.weight`,
//! `backbone.norm_f.weight`, and per block `backbone.layers.N.norm.weight` and the mixer's
//! `mixer.{in_proj, x_proj, dt_proj, out_proj}` linears plus its exact tensors
//! ([`MAMBA_EXACT`]). The names below that depend on the family take it (or the config).

use crate::config::{Family, ModelConfig, NormLayout};

/// Token embedding, `(vocab, hidden)`, of the attention families ([`embed`] for any).
pub const EMBED: &str = "model.embed_tokens.weight";
/// Final norm weight, `(hidden,)`, of the attention families ([`final_norm`] for any).
pub const FINAL_NORM: &str = "model.norm.weight";

/// The token embedding `(vocab, hidden)` of `family`.
pub fn embed(family: Family) -> &'static str {
    match family {
        Family::Mamba => "backbone.embeddings.weight",
        _ => EMBED,
    }
}

/// The final norm weight `(hidden,)` of `family`.
pub fn final_norm(family: Family) -> &'static str {
    match family {
        Family::Mamba => "backbone.norm_f.weight",
        _ => FINAL_NORM,
    }
}

/// A Mamba block's four linears in forward order, relative to `backbone.layers.N.`,
/// without `.weight`: in_proj `(2 d_inner, hidden)`, x_proj `(dt_rank + 2 state,
/// d_inner)`, dt_proj `(d_inner, dt_rank)`, out_proj `(hidden, d_inner)`.
pub const MAMBA_LINEARS: [&str; 4] = [
    "mixer.in_proj",
    "mixer.x_proj",
    "mixer.dt_proj",
    "mixer.out_proj",
];

/// A Mamba block's norm (before the mixer), relative to `backbone.layers.N.`.
pub const MAMBA_NORM: &str = "norm.weight";

/// A Mamba block's tensors stored exact (f32) in packs, relative to `backbone.layers.N.`:
/// conv weight `(d_inner, 1, K)`, conv bias `(d_inner,)` (with `use_conv_bias`), `A_log`
/// `(d_inner, state)`, `D` `(d_inner,)`, dt_proj's bias `(d_inner,)`, in_proj's bias
/// `(2 d_inner,)` and out_proj's `(hidden,)` (with `use_bias`). In this order.
pub const MAMBA_EXACT: [&str; 7] = [
    "mixer.conv1d.weight",
    "mixer.conv1d.bias",
    "mixer.A_log",
    "mixer.D",
    "mixer.dt_proj.bias",
    "mixer.in_proj.bias",
    "mixer.out_proj.bias",
];
/// Untied head weight, `(vocab, hidden)`.
pub const LM_HEAD: &str = "lm_head.weight";

/// Names of the seven linear weights of a block, relative to `model.layers.N.`, in
/// forward order: q, k, v, o, gate, up, down.
pub const BLOCK_LINEARS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// The tensor-name prefix of block `layer` (`model.layers.N`; Mamba: `backbone.layers.N`).
pub fn block_prefix(cfg: &ModelConfig, layer: usize) -> String {
    match cfg.family {
        Family::Mamba => format!("backbone.layers.{layer}"),
        _ => format!("model.layers.{layer}"),
    }
}

/// Which of [`MAMBA_EXACT`] a Mamba block of `cfg` has (the biases are optional).
pub fn mamba_exact(cfg: &ModelConfig) -> Vec<&'static str> {
    let (conv_bias, bias) = cfg
        .ssm
        .as_ref()
        .map_or((false, false), |s| (s.use_conv_bias, s.use_bias));
    MAMBA_EXACT
        .iter()
        .copied()
        .filter(|n| match *n {
            "mixer.conv1d.bias" => conv_bias,
            "mixer.in_proj.bias" | "mixer.out_proj.bias" => bias,
            _ => true,
        })
        .collect()
}

/// Phi-3's fused q/k/v projection, rows `[q; k; v]`, relative to `model.layers.N.`.
pub const FUSED_QKV: &str = "self_attn.qkv_proj";
/// Phi-3's fused gate/up projection, rows `[gate; up]`.
pub const FUSED_GATE_UP: &str = "mlp.gate_up_proj";

/// Names of the four norm slots of a block (relative to `model.layers.N.`, without
/// `.weight`), in forward order: attention input, attention output, MLP input, MLP
/// output; `None` where `layout` has no norm. (Llama's `post_attention_layernorm` is its
/// MLP *input* norm; OLMo-2's and Gemma's is the attention *output* norm.)
pub fn block_norms(layout: NormLayout) -> [Option<&'static str>; 4] {
    match layout {
        NormLayout::Pre => [
            Some("input_layernorm"),
            None,
            Some("post_attention_layernorm"),
            None,
        ],
        NormLayout::Post => [
            None,
            Some("post_attention_layernorm"),
            None,
            Some("post_feedforward_layernorm"),
        ],
        NormLayout::Sandwich => [
            Some("input_layernorm"),
            Some("post_attention_layernorm"),
            Some("pre_feedforward_layernorm"),
            Some("post_feedforward_layernorm"),
        ],
    }
}

/// q and k norm names (relative to `model.layers.N.`, without `.weight`).
pub const QK_NORMS: [&str; 2] = ["self_attn.q_norm", "self_attn.k_norm"];

/// A MoE block's linears in forward order, relative to `model.layers.N.` and without
/// `.weight`: q, k, v, o, then expert `e`'s gate, up, down at `4 + 3e ..= 6 + 3e`. A
/// dense block's are [`BLOCK_LINEARS`] (the one-expert case of the same layout); a Mamba
/// block's [`MAMBA_LINEARS`].
pub fn block_linears(cfg: &ModelConfig, layer: usize) -> Vec<String> {
    if cfg.ssm.is_some() {
        return MAMBA_LINEARS.iter().map(|s| s.to_string()).collect();
    }
    let experts = cfg.experts_of(layer);
    let mut names: Vec<String> = BLOCK_LINEARS.iter().map(|s| s.to_string()).collect();
    if experts == 0 {
        return names;
    }
    names.truncate(4);
    for e in 0..experts {
        names.extend(expert_linears(cfg.family, e));
    }
    names
}

/// Expert `e`'s gate, up and down projections (relative to `model.layers.N.`, without
/// `.weight`).
pub fn expert_linears(family: Family, e: usize) -> [String; 3] {
    match family {
        Family::Mixtral => ["w1", "w3", "w2"].map(|w| format!("block_sparse_moe.experts.{e}.{w}")),
        _ => ["gate_proj", "up_proj", "down_proj"].map(|w| format!("mlp.experts.{e}.{w}")),
    }
}

/// The router of a MoE block, `(experts, hidden)` (relative to `model.layers.N.`, without
/// `.weight`). Stored dense f32 in packs, never quantized.
pub fn moe_router(family: Family) -> &'static str {
    match family {
        Family::Mixtral => "block_sparse_moe.gate",
        _ => "mlp.gate",
    }
}

/// transformers 5's in-memory (and `save_original_format=False`) names of a MoE block's
/// fused experts, relative to `model.layers.N.`: the router, `gate_up_proj`
/// `(experts, 2 * inter, hidden)` (gate rows first) and `down_proj`
/// `(experts, hidden, inter)`. Mixtral's live under `mlp.` there too.
pub const FUSED_EXPERTS: [&str; 3] = [
    "mlp.gate.weight",
    "mlp.experts.gate_up_proj",
    "mlp.experts.down_proj",
];
