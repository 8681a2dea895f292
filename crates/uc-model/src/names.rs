//! Hugging Face names of a dense decoder checkpoint's tensors: the globals, the seven
//! linears of every block and its norms. The one table the loaders, the compressor, the
//! GGUF importer/exporter and the runtime share.
//!
//! Phi-3 stores q/k/v fused as `self_attn.qkv_proj` and gate/up as `mlp.gate_up_proj`;
//! the checkpoint reader presents them under the seven names below (see
//! `checkpoint`), so everything past it (and every pack) sees seven linears.

use crate::config::NormLayout;

/// Token embedding, `(vocab, hidden)`.
pub const EMBED: &str = "model.embed_tokens.weight";
/// Final norm weight, `(hidden,)`.
pub const FINAL_NORM: &str = "model.norm.weight";
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

/// The tensor-name prefix of block `layer`.
pub fn block_prefix(layer: usize) -> String {
    format!("model.layers.{layer}")
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
