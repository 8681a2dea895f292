//! The memory plan of a compression: an estimate of the peak resident set, made from
//! the model's shapes and the options before anything is computed, so that
//! `uc compress --max-memory SIZE` can refuse a run that would not fit, naming the
//! phase and the terms that do not.
//!
//! The estimate follows what [`crate::compress`] holds at each phase (the terms below
//! name them) plus a margin for what they do not track
//! ([`uc_format::memory::MARGIN_PERCENT`]); it is a model, not a measurement, and
//! `scripts/bench_big.sh` compares it with the measured peak RSS on real-size shapes
//! (results/big_7b.json, results/big_1b.json).
//! When the pipeline changes what it keeps resident, this module must change with it.
//!
//! Calibration activations (the teacher's and the quantized model's hidden states of
//! every window, carried from block to block, and the paused forwards a block holds
//! between its stages) are planned three ways, which `uc compress --max-memory` tries in
//! this order: held as they are; held with down_proj's input recomputed
//! ([`Options::recompute_mlp_input`]); spilled to disk ([`Options::spill_activations`],
//! module `spill`), where only the chunk of windows being computed is resident. A run
//! that does not fit even spilled is refused, naming the terms of the spilled plan.
//! Spilling is not planned for mixture-of-experts models (not built for them).
//!
//! Mixture-of-experts blocks: the compressor reads experts from the checkpoint one at a
//! time (the teacher's and the unencoded student's experts stay in the mapped checkpoint,
//! a row tile read per forward call), so a block's f32 weights are its attention, router
//! and one expert's gate/up/down; the experts already encoded are held as codes (the
//! student's forward runs them, crate `expert`), planned at the widest codes a budget
//! allows.

use crate::{Method, Options};
use uc_codec::CodecSpec;
use uc_format::memory::{MemoryEstimate, Phase, BASE_BYTES};
use uc_model::config::ModelConfig;

/// The linears of the largest block that are resident as f32 at once: name, rows, cols.
/// A MoE block (Mixtral, Qwen3-MoE, OLMoE) counts one expert's gate/up/down (experts
/// are read one at a time; [`moe_experts`] counts the rest as codes); a Mamba block its
/// mixer's four.
fn block_linears(cfg: &ModelConfig) -> Vec<(&'static str, u64, u64)> {
    let (h, i) = (cfg.hidden_size as u64, cfg.intermediate_size as u64);
    if let Some(s) = &cfg.ssm {
        // A Mamba block: the mixer's four linears (its exact tensors are O(d * state)).
        let (d, r, n) = (s.d_inner as u64, s.dt_rank as u64, s.state as u64);
        return vec![
            ("in_proj", 2 * d, h),
            ("x_proj", r + 2 * n, d),
            ("dt_proj", d, r),
            ("out_proj", h, d),
        ];
    }
    let q = (cfg.num_heads * cfg.head_dim) as u64;
    let kv = (cfg.num_kv_heads * cfg.head_dim) as u64;
    let mut lin = vec![
        ("q_proj", q, h),
        ("k_proj", kv, h),
        ("v_proj", kv, h),
        ("o_proj", h, q),
    ];
    let dense = [("gate_proj", i, h), ("up_proj", i, h), ("down_proj", h, i)];
    match moe_experts(cfg) {
        Some((_, mi)) if mi >= i => lin.extend([
            ("expert gate", mi, h),
            ("expert up", mi, h),
            ("expert down", h, mi),
        ]),
        _ => lin.extend(dense),
    }
    lin
}

/// A MoE model's experts per block and expert width, when its MoE blocks outweigh its
/// dense ones (Qwen3-MoE may mix both; the plan takes the larger block).
fn moe_experts(cfg: &ModelConfig) -> Option<(u64, u64)> {
    let m = cfg.moe.as_ref()?;
    (m.num_experts * m.expert_intermediate >= cfg.intermediate_size)
        .then_some((m.num_experts as u64, m.expert_intermediate as u64))
}

/// Stored bytes of a rows x cols tensor under `spec` (codes, scales, codebook).
fn stored(spec: &CodecSpec, rows: u64, cols: u64) -> u64 {
    spec.stored_bytes(rows as usize, cols as usize)
        .unwrap_or(rows * cols)
}

/// Resident bytes while one tensor of `n` elements is encoded without calibration and
/// checked: its f32 weights, the unpacked codes (one byte each) and the packed entries
/// (twice: the encoder's and the container's copy). The error is measured on the
/// reconstruction a few rows at a time (before 2026-12-03 night the whole f32
/// reconstruction was held: 4 more bytes per element). (On SmolLM2-135M, whose peak is
/// its 49152 x 576 embedding, the term with the reconstruction and without the second
/// copy of the entries came out 10% under the measured peak RSS.)
fn rtn_tensor(n: u64, packed: u64) -> u64 {
    4 * n + n + 2 * packed
}

/// The estimate for compressing a model of config `cfg` with `opts`; `calib_tokens` is
/// the number of tokens of the tokenized calibration sources (resident as u32 for the
/// whole run; 0 without calibration).
pub fn estimate(cfg: &ModelConfig, opts: &Options, calib_tokens: u64) -> MemoryEstimate {
    let h = cfg.hidden_size as u64;
    // The MLP's inner activations per token: a MoE block's are top_k experts' wide.
    let i = (cfg.intermediate_size as u64).max(
        cfg.moe
            .as_ref()
            .map_or(0, |m| (m.top_k * m.expert_intermediate) as u64),
    );
    // MoE: the expert being encoded has a Gram matrix of its own beside the pooled one
    // (experts are encoded one at a time, each matrix freed before the next is built).
    let expert_grams = cfg.moe.as_ref().map_or(0, |m| {
        let c = h.max(m.expert_intermediate as u64);
        8 * c * c
    });
    let vocab = cfg.vocab_size as u64;
    let q = (cfg.num_heads * cfg.head_dim) as u64;
    let kv = (cfg.num_kv_heads * cfg.head_dim) as u64;
    let lin = block_linears(cfg);
    let block_params: u64 = lin.iter().map(|(_, r, c)| r * c).sum();
    // What `block_params` covers, for the plan's terms.
    let params_what = if moe_experts(cfg).is_some() {
        format!("{block_params} params: attention and the one expert read at a time")
    } else {
        format!("{block_params} params")
    };
    // With a budget any tensor may get the widest codes; plan for them.
    let body = match opts.budget_bpw {
        Some(_) => CodecSpec {
            bits: *crate::BUDGET_BITS.iter().max().expect("bits"),
            ..opts.body
        },
        None => opts.body,
    };
    // A MoE block's container holds every expert's entries, and its quantized student
    // every encoded expert's codes (crate `expert`: codes, the f32 copies of the scales
    // and, for trellis codes, one bit more per weight).
    let (block_packed, experts_held) = match moe_experts(cfg) {
        Some((n, mi)) => {
            let one: u64 = [(mi, h), (mi, h), (h, mi)]
                .iter()
                .map(|(r, c)| stored(&body, *r, *c))
                .sum();
            let attn: u64 = lin[..4].iter().map(|(_, r, c)| stored(&body, *r, *c)).sum();
            let weights = 3 * mi * h;
            let group = u64::from(body.group.max(1));
            // codes one bit wider (trellis expanded), plus f32 copies of the scales
            let held = n * (one + weights / 8 + 4 * weights / group);
            (attn + n * one, held)
        }
        None => (lin.iter().map(|(_, r, c)| stored(&body, *r, *c)).sum(), 0),
    };
    let (widest_name, wr, wc) = *lin
        .iter()
        .max_by_key(|(_, r, c)| r * c)
        .expect("seven linears");
    let widest = wr * wc;
    let embed_packed = stored(&opts.embed, vocab, h);
    let heads_packed = if cfg.tie_word_embeddings {
        embed_packed
    } else {
        2 * embed_packed
    };
    let base = ("process baseline".to_string(), BASE_BYTES);
    let tokens = (
        "tokenized calibration text (u32)".to_string(),
        4 * calib_tokens,
    );

    let calibrated = opts.method == Method::Gptq;
    let mut phases = Vec::new();
    // Globals: embedding, then the untied head, each as one tensor; the embedding's
    // entries stay in the container while the head is encoded.
    let mut globals = vec![
        base.clone(),
        tokens.clone(),
        (
            format!("encoding the {vocab} x {h} embedding/head (f32 weights + codes)"),
            rtn_tensor(vocab * h, embed_packed) - embed_packed,
        ),
        (
            "embedding/head entries in the globals container".into(),
            heads_packed,
        ),
    ];
    let mut tokens_m = 0;
    let spill = calibrated && opts.spill_activations;
    if let (true, Some(cal)) = (calibrated, &opts.calibration) {
        tokens_m = (cal.n_seqs * cal.seq_len) as u64;
        // The teacher and quantized streams are still held when the globals are encoded
        // (planned so: the allocator may not have returned them); spilled, they were
        // never in memory past the stream start.
        if !spill {
            globals.push((
                format!("teacher + quantized hidden states ({tokens_m} tokens x {h}, f32)"),
                2 * 4 * tokens_m * h,
            ));
        }
        if crate::pipeline::calibrated_head(cfg, opts) {
            // Error feedback on the head: its Gram and cross matrices (the latter becomes
            // the target's right-hand side) and the factor; the target overwrites the
            // weights in place; the feedback's codes are chosen twice (scale refit).
            globals.push((
                format!("the head's Gram, cross and factor matrices ({h} x {h}, f64)"),
                3 * 8 * h * h,
            ));
            globals.push((
                format!("the head's re-chosen codes ({vocab} x {h}, one byte each)"),
                vocab * h,
            ));
        }
    }
    phases.push(Phase::with_margin("globals", globals));

    if !calibrated {
        phases.push(Phase::with_margin(
            "block",
            vec![
                base,
                tokens,
                (
                    format!("encoding the largest block linear, {widest_name} {wr} x {wc} (f32 weights + codes)"),
                    rtn_tensor(widest, stored(&body, wr, wc)) - stored(&body, wr, wc),
                ),
                ("one block's packed entries (container)".into(), block_packed),
            ],
        ));
        return MemoryEstimate::from_phases(phases);
    }

    // Calibrated: the stream start loads the globals dense to embed the windows.
    let dense_globals = if cfg.tie_word_embeddings { 1 } else { 2 } * vocab * h * 4;
    phases.push(Phase::with_margin(
        "stream start",
        vec![
            base.clone(),
            tokens.clone(),
            ("embedding (and head) as f32".into(), dense_globals),
            if spill {
                (
                    format!("embedded windows ({tokens_m} tokens x {h}, f32), once while they are written to the spill files"),
                    4 * tokens_m * h,
                )
            } else {
                (
                    format!("embedded windows ({tokens_m} tokens x {h}, f32)"),
                    2 * 4 * tokens_m * h,
                )
            },
        ],
    ));
    let chunk_tokens = tokens_m.min(4 * opts.calibration.as_ref().map_or(0, |c| c.seq_len as u64));
    let seq = opts.calibration.as_ref().map_or(0, |c| c.seq_len as u64);
    let chunk_windows = chunk_tokens / seq.max(1);
    let cols = h.max(q).max(cfg.max_intermediate() as u64);
    // H (with its two spread arrays under auto shrinkage) and the cross matrix C.
    let h_arrays = if opts.auto_shrink { 3 } else { 1 };
    let gram_count = h_arrays + u64::from(opts.teacher_target);
    // Between stages each chunk's quantized forward is paused holding its residual and
    // its tap's input; the MLP's inner activations (down_proj's input) are dropped and
    // recomputed when `recompute_mlp_input` is set.
    let held = if opts.recompute_mlp_input { 0 } else { i };
    // Planned at down_proj, the widest stage: the teacher's stream is consumed chunk by
    // chunk as its block output is produced (about one stream in all), and the quantized
    // stream's paused forwards hold their residual and, unless recomputed, the MLP's
    // inner activations.
    let (streams, paused) = if spill {
        // Spilled: the streams are files; a stage holds one chunk of each stream (its
        // residual and tap input, the widest being `cols`) and the teacher's output of
        // that chunk on its way to the next block's file (plus its write buffer).
        (
            (
                format!("calibration activations, spilled to disk: one chunk of each stream ({chunk_tokens} tokens: residual, tap input up to {cols} wide, block output; f32) and a 1 MiB write buffer"),
                4 * chunk_tokens * (2 * (h + cols) + h) + (1 << 20),
            ),
            (
                "calibration activations: spilled to disk, none held between stages".to_string(),
                0,
            ),
        )
    } else {
        (
            (
                format!("calibration activations: the teacher's stream, block input and output ({tokens_m} tokens x {h}, f32)"),
                4 * tokens_m * h,
            ),
            (
                format!(
                    "calibration activations: the paused quantized forward (residual{}, {tokens_m} tokens, f32)",
                    if opts.recompute_mlp_input { "; MLP input recomputed" } else { " + MLP inner activations" }
                ),
                4 * tokens_m * (h + held),
            ),
        )
    };
    let packed = (
        "one block's packed entries (container)".to_string(),
        block_packed,
    );
    // While a stage's statistics are summed: both copies of the block, H and C, the
    // forwards of one chunk (f32 tile products are added as they are made).
    phases.push(Phase::with_margin(
        "block statistics",
        vec![
            base.clone(),
            tokens.clone(),
            (
                format!("one block's weights, teacher + quantized copy ({params_what}, f32)"),
                2 * 4 * block_params,
            ),
            streams.clone(),
            paused.clone(),
            (
                // Teacher and student advance chunk by chunk while the Gram matrices are
                // summed, so the teacher's linear inputs are never held for all chunks;
                // attention is tiled (no seq x seq scores), K/V scratch per window.
                format!("forward temporaries of one chunk ({chunk_windows} windows: MLP, projections, K/V scratch)"),
                4 * chunk_tokens * (3 * i + 3 * h + q + 2 * kv) + 4 * chunk_windows * 2 * seq * kv,
            ),
            (
                format!("Gram matrices of the widest stage input ({cols} x {cols}, f64: H{})", if opts.teacher_target { " and C" } else { "" }),
                gram_count * 8 * cols * cols,
            ),
            (
                "MoE: the Gram matrix of the expert being encoded (widest expert input^2, f64)".into(),
                expert_grams,
            ),
            (
                "MoE: the encoded experts' codes, run by the quantized forward".into(),
                experts_held,
            ),
            packed.clone(),
        ],
    ));
    // Encoding the widest linear (down_proj): the teacher block is released, C becomes
    // C - H in place and is freed after the right-hand sides are formed; then error
    // feedback holds H, the damped factor and its inverse (crate uc_codec::chol).
    let target = if opts.teacher_target {
        8 * cols * cols + 2 * 8 * widest
    } else {
        0
    };
    // A rotation encodes against R H R^T. A dense stage's last linear is handed H and
    // rotates it in place (uc_codec::encode_gptq); a MoE expert borrows its Gram matrix,
    // so its rotation is a second H held through error feedback.
    let rotated = if opts.body.rot > 0 && cfg.moe.is_some() {
        8 * cols * cols
    } else {
        0
    };
    phases.push(Phase::with_margin(
        "block solve",
        vec![
            base,
            tokens,
            (
                format!("one block's quantized copy ({params_what}, f32)"),
                4 * block_params,
            ),
            // Spilled: while a linear is solved no chunk is being computed.
            if spill { ("calibration activations: spilled to disk".into(), 0) } else { streams },
            paused,
            (
                format!("H of the widest stage input ({cols} x {cols}, f64)"),
                h_arrays * 8 * cols * cols,
            ),
            (
                "MoE: the Gram matrix of the expert being encoded".into(),
                expert_grams,
            ),
            (
                "MoE: the encoded experts' codes".into(),
                experts_held,
            ),
            (
                format!("solver workspace for {widest_name} (the larger of: teacher target's C - H and two f64 copies of the weight; error feedback's Cholesky factor and inverse, 2 x {cols} x {cols} f64{})", if rotated > 0 { "; plus the rotated H" } else { "" }),
                target.max(2 * 8 * cols * cols) + rotated,
            ),
            (
                format!("{widest_name} as f32 weights, target and reconstruction, and its codes"),
                3 * 4 * widest + widest,
            ),
            packed,
        ],
    ));
    MemoryEstimate::from_phases(phases)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BudgetScope, Calibration, Source};

    /// Llama-3.2-1B's shapes (scripts/bench_big.sh's synthetic 1B).
    const LLAMA_1B: &str = r#"{"model_type": "llama", "hidden_size": 2048,
        "intermediate_size": 8192, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 64, "num_hidden_layers": 16, "vocab_size": 128256,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "tie_word_embeddings": true}"#;

    fn opts(n_seqs: usize, recompute: bool, spill: bool) -> Options {
        Options {
            method: Method::Gptq,
            body: CodecSpec::parse("q5g64-e8").unwrap(),
            budget_bpw: Some(5.0),
            budget_scope: BudgetScope::Model,
            embed: CodecSpec::parse("q8g32").unwrap(),
            calibration: Some(Calibration {
                sources: vec![Source {
                    name: "text".into(),
                    tokens: vec![0; 1000],
                }],
                n_seqs,
                seq_len: 256,
                seed: 0,
                provenance: serde_json::Value::Null,
            }),
            gptq: uc_codec::GptqOptions::default(),
            teacher_target: true,
            target_damp: 0.3,
            auto_shrink: false,
            recompute_mlp_input: recompute,
            spill_activations: spill,
            calibrated_head: true,
        }
    }

    /// OLMoE-1B-7B's shapes (uc-synth's olmoe-1b-7b): 64 experts 1024 wide per block.
    const OLMOE: &str = r#"{"model_type": "olmoe", "hidden_size": 2048,
        "intermediate_size": 1024, "num_attention_heads": 16, "num_key_value_heads": 16,
        "num_hidden_layers": 16, "vocab_size": 50304, "num_experts": 64,
        "num_experts_per_tok": 8, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "tie_word_embeddings": false}"#;

    #[test]
    fn a_moe_block_counts_one_experts_f32_weights_and_the_others_as_codes() {
        let cfg = ModelConfig::from_json_str(OLMOE, std::path::Path::new("config.json")).unwrap();
        let e = estimate(&cfg, &opts(16, false, false), 1000);
        let stats = e
            .phases
            .iter()
            .find(|p| p.name == "block statistics")
            .unwrap();
        let term = |what: &str| {
            stats
                .terms
                .iter()
                .find(|t| t.what.contains(what))
                .unwrap_or_else(|| panic!("{what}: {stats:?}"))
        };
        // Attention (4 x 2048^2) and one expert (3 x 1024 x 2048), teacher + student.
        let one_expert = 3 * 1024 * 2048;
        let weights = term("one block's weights");
        assert_eq!(weights.bytes, 2 * 4 * (4 * 2048 * 2048 + one_expert));
        assert!(weights.what.contains("one expert"), "{}", weights.what);
        // The 64 encoded experts as codes: well under their f32 size (1.6 GB).
        let codes = term("encoded experts' codes").bytes;
        assert!(codes > 0 && codes < 64 * 4 * one_expert / 3, "{codes}");
    }

    #[test]
    fn spilled_plans_hold_one_chunk_of_activations_whatever_the_windows() {
        let cfg =
            ModelConfig::from_json_str(LLAMA_1B, std::path::Path::new("config.json")).unwrap();
        let peak = |n, r, s| estimate(&cfg, &opts(n, r, s), 1000).peak_bytes;
        // Held: each of the three plans is smaller than the one before.
        assert!(peak(64, true, false) < peak(64, false, false));
        assert!(peak(64, true, true) < peak(64, true, false));
        // Spilled: four times the windows change nothing (one chunk is resident).
        assert_eq!(peak(64, true, true), peak(256, true, true));
        assert!(peak(256, true, false) > peak(64, true, false));
        let e = estimate(&cfg, &opts(256, true, true), 1000);
        let solve = e.phases.iter().find(|p| p.name == "block solve").unwrap();
        assert!(
            solve
                .terms
                .iter()
                .all(|t| !t.what.contains("calibration activations")),
            "{solve:?}"
        );
    }
}
