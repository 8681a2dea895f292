//! The memory plan of inference (`uc run` / `uc bench --max-memory SIZE`): the peak
//! resident set estimated from the model's shapes and, for a pack, the stored bytes its
//! manifest lists, before anything is loaded.
//!
//! Terms follow what [`crate::Decoder`] holds: resident, every block and the globals
//! (pack: packed codes; checkpoint: f32) plus the KV cache of every layer; streamed
//! (`--stream-layers`), the unit computing, the one being prefetched and the recycled
//! buffers between them (up to three blocks' containers), head chunks of 2048 rows, one
//! layer's KV cache (the rest stays in its file), plus the activations of one prefill
//! pass (at most 512 tokens when streaming) and the verification pass (streamed, one
//! tensor's row chunk at a time: negligible).

use std::path::Path;
use uc_format::memory::{MemoryEstimate, Phase, BASE_BYTES};
use uc_model::config::ModelConfig;
use uc_model::names::{embed, LM_HEAD};

/// Vocabulary rows per streamed head chunk (as the decoder).
const HEAD_CHUNK_ROWS: u64 = 2048;
/// Tokens per forward pass when streaming (as the decoder).
const STREAM_PREFILL_CHUNK: u64 = 512;
/// Tokens per MLP pass in prefill (as the decoder).
const MLP_TOKENS: u64 = 256;

/// Bytes of the weights as the decoder will hold them.
struct WeightBytes {
    /// Every block, as loaded.
    blocks: u64,
    /// The largest block.
    largest_block: u64,
    /// Embedding + head (+ final norm), as loaded.
    globals: u64,
    /// One head chunk when the head can be streamed (packs), else `None`.
    head_chunk: Option<u64>,
}

/// Bytes a pack tensor occupies once loaded: its stored bytes, plus one bit per weight
/// for a trellis codec (held as its (b+1)-bit expansion, docs/format.md section 3c).
fn held_bytes(t: &uc_format::TensorRecord) -> u64 {
    match (&t.encoding, t.shape.as_slice()) {
        (uc_format::Encoding::Codec(c), &[rows, cols]) if c.trellis => {
            let row_bytes = |bits: u64| (cols * bits).div_ceil(8);
            let b = u64::from(c.bits);
            t.stored_bytes + rows * (row_bytes(b + 1) - row_bytes(b))
        }
        _ => t.stored_bytes,
    }
}

fn weight_bytes(dir: &Path, cfg: &ModelConfig) -> Result<WeightBytes, String> {
    if uc_model::pack_source::is_pack(dir) {
        let pack = uc_format::Pack::open(dir).map_err(|e| e.to_string())?;
        let m = pack.manifest();
        let mut per_file = std::collections::BTreeMap::<&str, u64>::new();
        let mut globals = 0;
        let mut head_chunk = 0;
        for t in &m.tensors {
            let held = held_bytes(t);
            if t.file.starts_with("tensors/block_") {
                *per_file.entry(t.file.as_str()).or_default() += held;
            } else {
                globals += held;
                let head = if cfg.tie_word_embeddings {
                    embed(cfg.family)
                } else {
                    LM_HEAD
                };
                if t.name == head {
                    let rows = t.shape.first().copied().unwrap_or(1).max(1);
                    head_chunk = held.div_ceil(rows) * HEAD_CHUNK_ROWS.min(rows);
                }
            }
        }
        return Ok(WeightBytes {
            blocks: per_file.values().sum(),
            largest_block: per_file.values().copied().max().unwrap_or(0),
            globals,
            head_chunk: Some(head_chunk),
        });
    }
    let h = cfg.hidden_size as u64;
    let q = (cfg.num_heads * cfg.head_dim) as u64;
    let kv = (cfg.num_kv_heads * cfg.head_dim) as u64;
    // The largest block: a MoE block holds every expert (and its router).
    let block = 4 * (2 * h * q + 2 * h * kv + cfg.max_mlp_params() as u64 + 2 * h);
    let heads = if cfg.tie_word_embeddings { 1 } else { 2 };
    Ok(WeightBytes {
        blocks: block * cfg.num_layers as u64,
        largest_block: block,
        globals: 4 * (heads * cfg.vocab_size as u64 * h + h),
        head_chunk: None,
    })
}

/// The estimate for a decoder over the model in `dir` (config `cfg`) with `capacity`
/// positions, prefilling `prompt` tokens, resident or streamed.
pub fn estimate(
    dir: &Path,
    cfg: &ModelConfig,
    capacity: usize,
    prompt: usize,
    stream: bool,
) -> Result<MemoryEstimate, String> {
    let w = weight_bytes(dir, cfg)?;
    let (h, i) = (cfg.hidden_size as u64, cfg.max_intermediate() as u64);
    // MoE: every (token, expert) pair's activation and one expert's gathered rows.
    let moe_act = cfg
        .moe
        .as_ref()
        .map_or(0, |m| (m.top_k * m.expert_intermediate) as u64 + 2 * h);
    let q = (cfg.num_heads * cfg.head_dim) as u64;
    let kv = (cfg.num_kv_heads * cfg.head_dim) as u64;
    let layers = cfg.num_layers as u64;
    let cap = capacity as u64;
    let vocab = cfg.vocab_size as u64;
    // K and V of one layer as generation stores them, page-rounded.
    let kv_dtype = crate::kv::generation_kv_dtype(cfg, crate::kernels::Isa::detect());
    let kv_layer = (2 * kv * cap * kv_dtype.bytes() as u64).div_ceil(4096) * 4096;
    let kv_name = kv_dtype.name();
    let pass = if stream {
        (prompt as u64).min(STREAM_PREFILL_CHUNK)
    } else {
        prompt as u64
    }
    .max(1);
    // x, normed x, q, k, v, attention output, residual; MLP in passes of MLP_TOKENS
    // tokens (gate, up, act); the last position's logits; rotary tables; Mamba's mixer.
    // Mamba: the mixer's buffers over the whole pass (block::SsmWork: xz, u, z, dt, y and
    // x_proj's output), and every layer's recurrent state (conv window + SSM state).
    let ssm = cfg.ssm.as_ref().map_or(0, |s| {
        let (d, n, r) = (s.d_inner as u64, s.state as u64, s.dt_rank as u64);
        4 * pass * (6 * d + 2 * r + 2 * n) + 4 * layers * d * (s.conv_kernel as u64 - 1 + n)
    });
    let activations = 4 * pass * (4 * h + 2 * q + 2 * kv)
        + 4 * pass.min(MLP_TOKENS) * (3 * i + moe_act)
        + 4 * vocab
        + 4 * cap * cfg.head_dim as u64
        + ssm;
    let base = ("process baseline".to_string(), BASE_BYTES);
    let act = (
        format!("activations of one {pass}-token pass + last-position logits"),
        activations,
    );
    let terms = if stream {
        let mut t = vec![
            base,
            (
                "three blocks' weights (computing, prefetched, recycled buffer)".into(),
                3 * w.largest_block,
            ),
            (
                format!("KV cache of one layer ({capacity} positions, {kv_name})"),
                kv_layer,
            ),
            act,
        ];
        match w.head_chunk {
            Some(c) => t.push(("two head chunks of 2048 rows".into(), 2 * c)),
            None => t.push((
                "embedding and head (not streamable from a checkpoint)".into(),
                w.globals,
            )),
        }
        t
    } else {
        vec![
            base,
            ("every block's weights".into(), w.blocks),
            ("embedding, head and final norm".into(), w.globals),
            (
                format!("KV cache of {layers} layers ({capacity} positions, {kv_name})"),
                kv_layer * layers,
            ),
            act,
        ]
    };
    Ok(MemoryEstimate::from_phases(vec![Phase::with_margin(
        if stream {
            "decode (streamed)"
        } else {
            "decode (resident)"
        },
        terms,
    )]))
}
