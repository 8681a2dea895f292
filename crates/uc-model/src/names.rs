//! Hugging Face names of a Llama-family checkpoint's tensors: the globals and the
//! seven linears of every block. The one table the loaders, the compressor, the GGUF
//! importer/exporter and the runtime share.

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
