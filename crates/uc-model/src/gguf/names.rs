//! GGUF tensor names -> Hugging Face names, the shape each must have, and the
//! llama.cpp Q/K row permutation and its inverse.
//!
//! GGUF stores a matrix with `ne = [in, out]`; candle's reader reverses the dims, so a
//! tensor arrives as `(out, in)` -- the Hugging Face `nn.Linear` convention. The shapes
//! below are written in that order.

use super::meta::HParams;
use candle_core::Tensor;

/// The architectures `uc import gguf` converts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// `llama` (Llama 1/2, SmolLM, ...): Q/K rows are permuted by the converter.
    Llama,
    /// `qwen2`: biases on q/k/v, no permutation.
    Qwen2,
    /// `qwen3`: RMSNorm on each q/k head, no permutation.
    Qwen3,
    /// `gemma3` (text part): sandwich norms and q/k norms, each stored by llama.cpp's
    /// converter as `1 + w`; no permutation (the converter's Gemma-3 class does not
    /// permute Q/K: its rotary is applied in the NeoX / rotate-half layout).
    Gemma3,
}

impl Arch {
    /// Every supported architecture, in the order error messages list them.
    pub const ALL: [Arch; 4] = [Arch::Llama, Arch::Qwen2, Arch::Qwen3, Arch::Gemma3];

    /// The `general.architecture` value.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Gemma3 => "gemma3",
        }
    }

    /// The HF `model_type`: the architecture's name, except Gemma-3, whose text-only
    /// model is `gemma3_text` (`gemma3` is the multimodal wrapper in transformers).
    pub fn model_type(self) -> &'static str {
        match self {
            Arch::Gemma3 => "gemma3_text",
            a => a.name(),
        }
    }

    /// The transformers model class (`architectures` in config.json).
    pub fn hf_class(self) -> &'static str {
        match self {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
            Arch::Qwen3 => "Qwen3ForCausalLM",
            Arch::Gemma3 => "Gemma3ForCausalLM",
        }
    }

    /// Parses `general.architecture`.
    pub fn from_name(name: &str) -> Option<Arch> {
        Arch::ALL.into_iter().find(|a| a.name() == name)
    }

    /// Whether this architecture has tensors of kind `k`.
    fn has(self, k: Kind) -> bool {
        match k {
            Kind::QBias | Kind::KvBias => self == Arch::Qwen2,
            Kind::HeadNorm => matches!(self, Arch::Qwen3 | Arch::Gemma3),
            _ => true,
        }
    }
}

/// What a tensor is, which fixes its shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Embedding,
    Norm,
    Q,
    K,
    V,
    O,
    QBias,
    KvBias,
    HeadNorm,
    GateUp,
    Down,
}

impl Kind {
    /// The HF shape, `(out, in)` for matrices.
    fn shape(self, hp: &HParams) -> Vec<usize> {
        let q = hp.n_head * hp.head_dim;
        let kv = hp.n_head_kv * hp.head_dim;
        match self {
            Kind::Embedding => vec![hp.vocab_size, hp.hidden],
            Kind::Norm => vec![hp.hidden],
            Kind::Q => vec![q, hp.hidden],
            Kind::K | Kind::V => vec![kv, hp.hidden],
            Kind::O => vec![hp.hidden, q],
            Kind::QBias => vec![q],
            Kind::KvBias => vec![kv],
            Kind::HeadNorm => vec![hp.head_dim],
            Kind::GateUp => vec![hp.ffn, hp.hidden],
            Kind::Down => vec![hp.hidden, hp.ffn],
        }
    }
}

/// Per-block tensors: GGUF suffix after `blk.N.`, HF suffix after `model.layers.N.`.
/// The norms differ by family ([`NORMS_PRE`], [`NORMS_SANDWICH`]); these are shared.
const BLOCK: &[(&str, &str, Kind)] = &[
    ("attn_q.weight", "self_attn.q_proj.weight", Kind::Q),
    ("attn_k.weight", "self_attn.k_proj.weight", Kind::K),
    ("attn_v.weight", "self_attn.v_proj.weight", Kind::V),
    ("attn_output.weight", "self_attn.o_proj.weight", Kind::O),
    ("attn_q.bias", "self_attn.q_proj.bias", Kind::QBias),
    ("attn_k.bias", "self_attn.k_proj.bias", Kind::KvBias),
    ("attn_v.bias", "self_attn.v_proj.bias", Kind::KvBias),
    (
        "attn_q_norm.weight",
        "self_attn.q_norm.weight",
        Kind::HeadNorm,
    ),
    (
        "attn_k_norm.weight",
        "self_attn.k_norm.weight",
        Kind::HeadNorm,
    ),
    ("ffn_gate.weight", "mlp.gate_proj.weight", Kind::GateUp),
    ("ffn_up.weight", "mlp.up_proj.weight", Kind::GateUp),
    ("ffn_down.weight", "mlp.down_proj.weight", Kind::Down),
];

/// Block norms of the Llama family: `ffn_norm` is the norm before the MLP, which
/// transformers calls `post_attention_layernorm`.
const NORMS_PRE: &[(&str, &str, Kind)] = &[
    ("attn_norm.weight", "input_layernorm.weight", Kind::Norm),
    (
        "ffn_norm.weight",
        "post_attention_layernorm.weight",
        Kind::Norm,
    ),
];

/// Block norms of Gemma-3 (llama.cpp's `LLM_TENSOR_*` names for its four norms):
/// here `ffn_norm` is `pre_feedforward_layernorm`, and `post_attention_layernorm`
/// really is after attention.
const NORMS_SANDWICH: &[(&str, &str, Kind)] = &[
    ("attn_norm.weight", "input_layernorm.weight", Kind::Norm),
    (
        "post_attention_norm.weight",
        "post_attention_layernorm.weight",
        Kind::Norm,
    ),
    (
        "ffn_norm.weight",
        "pre_feedforward_layernorm.weight",
        Kind::Norm,
    ),
    (
        "post_ffw_norm.weight",
        "post_feedforward_layernorm.weight",
        Kind::Norm,
    ),
];

/// Every per-block tensor `arch` may have: its norms, then the shared table filtered
/// by [`Arch::has`].
fn block_table(arch: Arch) -> impl Iterator<Item = &'static (&'static str, &'static str, Kind)> {
    let norms = match arch {
        Arch::Gemma3 => NORMS_SANDWICH,
        Arch::Llama | Arch::Qwen2 | Arch::Qwen3 => NORMS_PRE,
    };
    norms
        .iter()
        .chain(BLOCK.iter().filter(move |(_, _, k)| arch.has(*k)))
}

/// Tensors outside the blocks. `output.weight` is optional (absent = tied head).
const GLOBAL: &[(&str, &str, Kind)] = &[
    (
        "token_embd.weight",
        "model.embed_tokens.weight",
        Kind::Embedding,
    ),
    ("output_norm.weight", "model.norm.weight", Kind::Norm),
    ("output.weight", "lm_head.weight", Kind::Embedding),
];

/// The GGUF name of the untied output head.
pub const OUTPUT_HEAD: &str = "output.weight";

/// Where one GGUF tensor goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The Hugging Face tensor name.
    pub hf_name: String,
    /// The shape it must have, `(out, in)` for matrices.
    pub shape: Vec<usize>,
    /// `Some(n_heads)` when the rows must be un-permuted (llama Q and K).
    pub unpermute_heads: Option<usize>,
    /// Subtract 1 from every value: a Gemma norm weight, which Hugging Face stores as
    /// `w` (applied as `x * (1 + w)`) and llama.cpp's converter wrote as `1 + w` (in
    /// f32, from the checkpoint's bf16 `w`, so the subtraction recovers `w` exactly).
    pub unit_offset: bool,
}

fn target(hf_name: String, kind: Kind, hp: &HParams) -> Target {
    let unpermute_heads = match (hp.arch, kind) {
        (Arch::Llama, Kind::Q) => Some(hp.n_head),
        (Arch::Llama, Kind::K) => Some(hp.n_head_kv),
        _ => None,
    };
    Target {
        hf_name,
        shape: kind.shape(hp),
        unpermute_heads,
        unit_offset: hp.arch == Arch::Gemma3 && matches!(kind, Kind::Norm | Kind::HeadNorm),
    }
}

/// Maps a GGUF tensor name, or `None` if `hp.arch` has no such tensor.
pub fn map_name(name: &str, hp: &HParams) -> Option<Target> {
    if let Some(&(_, hf, kind)) = GLOBAL.iter().find(|(g, _, _)| *g == name) {
        return Some(target(hf.to_string(), kind, hp));
    }
    let (layer, suffix) = name.strip_prefix("blk.")?.split_once('.')?;
    // Reject "01" or "+1": the name must round-trip, or two tensors could map to one.
    let n: usize = layer
        .parse()
        .ok()
        .filter(|n: &usize| n.to_string() == layer)?;
    if n >= hp.n_layer {
        return None;
    }
    let &(_, hf, kind) = block_table(hp.arch).find(|(g, _, _)| *g == suffix)?;
    Some(target(format!("model.layers.{n}.{hf}"), kind, hp))
}

/// Which llama.cpp row permutation a tensor takes on export ([`permute_qk_rows`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkRows {
    /// Q: permuted over the attention heads.
    Q,
    /// K: permuted over the KV heads.
    K,
}

/// The inverse of [`map_name`], from the same tables: the GGUF name of Hugging Face
/// tensor `hf_name` in an `arch` model, and the row permutation llama.cpp's converter
/// applies to it (llama Q and K only); `None` if `arch` has no such tensor.
pub fn gguf_name(hf_name: &str, arch: Arch) -> Option<(String, Option<QkRows>)> {
    let permute = |kind: Kind| match (arch, kind) {
        (Arch::Llama, Kind::Q) => Some(QkRows::Q),
        (Arch::Llama, Kind::K) => Some(QkRows::K),
        _ => None,
    };
    if let Some(&(g, _, kind)) = GLOBAL.iter().find(|(_, h, _)| *h == hf_name) {
        return Some((g.to_string(), permute(kind)));
    }
    let (layer, suffix) = hf_name.strip_prefix("model.layers.")?.split_once('.')?;
    let n: usize = layer
        .parse()
        .ok()
        .filter(|n: &usize| n.to_string() == layer)?;
    let &(g, _, kind) = block_table(arch).find(|(_, h, _)| *h == suffix)?;
    Some((format!("blk.{n}.{g}"), permute(kind)))
}

/// Every GGUF tensor `hp.arch` must have (all but the optional output head).
pub fn required_names(hp: &HParams) -> Vec<String> {
    let global = GLOBAL
        .iter()
        .filter(|(g, _, _)| *g != OUTPUT_HEAD)
        .map(|(g, _, _)| g.to_string());
    let blocks = (0..hp.n_layer)
        .flat_map(|n| block_table(hp.arch).map(move |(g, _, _)| format!("blk.{n}.{g}")));
    global.chain(blocks).collect()
}

/// llama.cpp's converter permutation of Q/K rows, applied to a HF weight.
///
/// `w` is `(n_heads * head_dim, ...)`. Per head, HF orders rotary pairs as
/// `(i, i + head_dim/2)` (rotate-half); llama.cpp wants them adjacent `(2i, 2i+1)`.
/// The converter views the rows as `(n_heads, 2, head_dim/2)` and swaps the last two.
/// Used by tests to build fixtures, and by anyone exporting back to GGUF.
pub fn permute_qk_rows(w: &Tensor, n_heads: usize) -> candle_core::Result<Tensor> {
    swap_row_axes(w, n_heads, true)
}

/// The inverse of [`permute_qk_rows`]: a GGUF llama Q/K weight back to HF row order.
pub fn unpermute_qk_rows(w: &Tensor, n_heads: usize) -> candle_core::Result<Tensor> {
    swap_row_axes(w, n_heads, false)
}

/// Views rows as `(n_heads, a, b)` and swaps `a` and `b`, where `(a, b)` is
/// `(2, head_dim/2)` to permute and `(head_dim/2, 2)` to undo it.
fn swap_row_axes(w: &Tensor, n_heads: usize, forward: bool) -> candle_core::Result<Tensor> {
    let dims = w.dims();
    let rows = dims.first().copied().unwrap_or(0);
    if rows == 0 || n_heads == 0 || rows % (2 * n_heads) != 0 {
        candle_core::bail!("{rows} rows do not split into {n_heads} heads of even width");
    }
    let half = rows / n_heads / 2;
    let cols = w.elem_count() / rows;
    let (a, b) = if forward { (2, half) } else { (half, 2) };
    w.reshape((n_heads, a, b, cols))? // (head, a, b, in)
        .transpose(1, 2)? // (head, b, a, in)
        .contiguous()?
        .reshape(dims)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn rows(n: usize, cols: usize) -> Tensor {
        let v: Vec<f32> = (0..n * cols).map(|x| x as f32).collect();
        Tensor::from_vec(v, (n, cols), &Device::Cpu).unwrap()
    }

    #[test]
    fn gguf_name_inverts_map_name_for_every_tensor() {
        for arch in Arch::ALL {
            let hp = HParams {
                arch,
                n_layer: 3,
                hidden: 8,
                ffn: 12,
                n_head: 2,
                n_head_kv: 1,
                head_dim: 4,
                vocab_size: 10,
                context_length: None,
                rms_eps: 1e-5,
                rope_theta: None,
                rope_scaling: None,
                special: Default::default(),
                gemma3: None,
            };
            for g in required_names(&hp)
                .into_iter()
                .chain([OUTPUT_HEAD.to_string()])
            {
                let t = map_name(&g, &hp).unwrap();
                let (back, qk) = gguf_name(&t.hf_name, arch).unwrap();
                assert_eq!(back, g);
                assert_eq!(qk.is_some(), t.unpermute_heads.is_some(), "{g}");
            }
        }
        assert_eq!(
            gguf_name("model.layers.01.mlp.up_proj.weight", Arch::Llama),
            None
        );
        assert_eq!(
            gguf_name("model.layers.0.self_attn.q_norm.weight", Arch::Llama),
            None
        );
    }

    #[test]
    fn permute_matches_llama_cpp_on_a_hand_worked_head() {
        // One head of width 4, one column: HF rows [0,1,2,3] = pairs (0,2),(1,3);
        // llama.cpp stores them adjacent: [0,2,1,3].
        let p = permute_qk_rows(&rows(4, 1), 1).unwrap();
        assert_eq!(
            p.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [0., 2., 1., 3.]
        );
    }

    #[test]
    fn unpermute_inverts_permute_and_neither_is_the_identity() {
        for (n_heads, head_dim, cols) in [(4, 8, 3), (2, 8, 5), (3, 64, 2)] {
            let w = rows(n_heads * head_dim, cols);
            let p = permute_qk_rows(&w, n_heads).unwrap();
            let u = unpermute_qk_rows(&p, n_heads).unwrap();
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(flat(&u), flat(&w));
            assert_ne!(flat(&p), flat(&w), "permute alone must move rows");
            assert_ne!(flat(&unpermute_qk_rows(&w, n_heads).unwrap()), flat(&w));
            assert_eq!(u.dims(), w.dims());
        }
    }

    #[test]
    fn permute_handles_bias_vectors() {
        let b = Tensor::arange(0f32, 8., &Device::Cpu).unwrap();
        let p = permute_qk_rows(&b, 2).unwrap();
        assert_eq!(
            p.to_vec1::<f32>().unwrap(),
            [0., 2., 1., 3., 4., 6., 5., 7.]
        );
        assert_eq!(
            unpermute_qk_rows(&p, 2).unwrap().to_vec1::<f32>().unwrap(),
            b.to_vec1::<f32>().unwrap()
        );
    }

    #[test]
    fn permute_rejects_rows_not_splitting_into_heads() {
        assert!(unpermute_qk_rows(&rows(6, 2), 4).is_err());
        assert!(unpermute_qk_rows(&rows(6, 2), 0).is_err());
    }
}
