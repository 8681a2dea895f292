//! The dense families beyond Llama (OLMo-2, Phi-3, Gemma-2, Gemma-3 text) end to end on
//! their tiny golden fixtures: calibrated `uc compress` under a bit budget, `uc verify`,
//! `uc eval` of the pack against its checkpoint, `uc run` of checkpoint and pack,
//! resident and with `--stream-layers`; eval digits on 1 and 2 threads; and bad input
//! (unknown `model_type`, a missing config field, a shard missing a tensor, a tensor of
//! the wrong shape) refused by name, with nothing written.

mod common;
use common::*;
use std::path::{Path, PathBuf};

const FAMILIES: [&str; 4] = ["olmo2", "phi3", "gemma2", "gemma3"];

/// Calibrated compress of `model` at a 5.0 bpw budget into `dir`/pack.
fn compress(model: &Path, dir: &Path, text: &Path) -> (PathBuf, serde_json::Value) {
    let pack = dir.join("pack");
    let out = compress_small(
        model,
        &pack,
        text,
        ("6", "40"),
        &["--bpw", "5", "--json"],
        &[],
    );
    let j = json_of(&out);
    (pack, j)
}

/// compress -> verify -> eval -> run (resident and streamed) for one family.
fn end_to_end(name: &str) {
    let m = model_with_tokenizer(name);
    let text = text_file(m.path());
    let tmp = tempfile::tempdir().unwrap();
    let (pack, c) = compress(m.path(), tmp.path(), &text);
    assert_eq!(c["blocks"].as_array().unwrap().len(), 2, "{name}");
    let bpw = c["bpw_body"].as_f64().unwrap();
    assert!(bpw > 4.0 && bpw <= 5.0, "{name}: bpw {bpw}");
    for b in c["blocks"].as_array().unwrap() {
        let e = b["out_rel_mse"].as_f64().unwrap();
        assert!(e.is_finite() && e < 0.05, "{name}: block error {e}");
    }
    let v = uc(&["verify", pack.to_str().unwrap()], &[]);
    assert!(
        String::from_utf8_lossy(&v.stdout).starts_with("VERIFY: PASS"),
        "{name}: {}",
        String::from_utf8_lossy(&v.stdout)
    );
    let e = eval_small(&pack, m.path(), &text, "2");
    let (kld, top1) = (
        e["against"]["kld"].as_f64().unwrap(),
        e["against"]["top1"].as_f64().unwrap(),
    );
    assert!(kld > 0.0 && kld < 0.1, "{name}: kld {kld}");
    assert!(top1 > 0.8, "{name}: top1 {top1}");
    let from_checkpoint = run_text(m.path(), &[]);
    assert!(!from_checkpoint.trim().is_empty(), "{name}: no text");
    let resident = run_text(&pack, &[]);
    assert!(!resident.trim().is_empty(), "{name}: no text from the pack");
    assert_eq!(resident, run_text(&pack, &["--stream-layers"]), "{name}");
}

#[test]
fn olmo2_compresses_verifies_evaluates_and_runs() {
    end_to_end("olmo2");
}

#[test]
fn phi3_compresses_verifies_evaluates_and_runs() {
    end_to_end("phi3");
}

#[test]
fn gemma2_compresses_verifies_evaluates_and_runs() {
    end_to_end("gemma2");
}

#[test]
fn gemma3_compresses_verifies_evaluates_and_runs() {
    end_to_end("gemma3");
}

#[test]
fn eval_digits_are_identical_for_one_and_two_threads_in_every_family() {
    for name in FAMILIES {
        let m = model_with_tokenizer(name);
        let text = text_file(m.path());
        let tmp = tempfile::tempdir().unwrap();
        let (pack, _) = compress(m.path(), tmp.path(), &text);
        let one = eval_small(&pack, m.path(), &text, "1");
        let two = eval_small(&pack, m.path(), &text, "2");
        assert_same_eval_on_1_and_2_threads(&one, &two, name);
    }
}

#[test]
fn an_unknown_model_type_lists_the_supported_families() {
    let m = model_with_tokenizer("gemma3");
    // The multimodal Gemma-3 wrapper, whose text model sits under language_model.
    set_config(m.path(), "model_type", serde_json::json!("gemma3"));
    refused(
        m.path(),
        &["config.json", "\"gemma3\"", "gemma3_text", "olmo2", "phi3"],
    );
}

#[test]
fn a_missing_config_field_is_named_for_each_family() {
    for name in FAMILIES {
        let m = model_with_tokenizer(name);
        set_config(m.path(), "num_attention_heads", serde_json::Value::Null);
        refused(m.path(), &["config.json", "num_attention_heads"]);
    }
}

#[test]
fn a_shard_missing_a_tensor_is_named() {
    for (name, tensor) in [
        ("olmo2", "model.layers.1.post_feedforward_layernorm.weight"),
        ("olmo2", "model.layers.0.self_attn.k_norm.weight"),
        ("phi3", "model.layers.1.self_attn.qkv_proj.weight"),
        ("phi3", "model.layers.0.mlp.gate_up_proj.weight"),
        ("gemma2", "model.layers.0.pre_feedforward_layernorm.weight"),
        ("gemma3", "model.layers.1.self_attn.q_norm.weight"),
    ] {
        let m = model_with_tokenizer(name);
        drop_tensor(m.path(), tensor);
        refused(m.path(), &[tensor]);
    }
}

#[test]
fn a_tensor_of_the_wrong_shape_is_named_with_its_file() {
    for (name, key, value, tensor) in [
        // Phi-3's fused projection no longer holds q + 2 kv rows.
        (
            "phi3",
            "num_key_value_heads",
            4,
            "self_attn.qkv_proj.weight",
        ),
        ("phi3", "intermediate_size", 40, "mlp.gate_up_proj.weight"),
        // OLMo-2's whole-projection k norm is (kv_heads * head_dim,).
        ("olmo2", "num_key_value_heads", 1, "self_attn.k_proj.weight"),
        ("gemma2", "head_dim", 8, "self_attn.q_proj.weight"),
        ("gemma3", "intermediate_size", 40, "mlp.gate_proj.weight"),
    ] {
        let m = model_with_tokenizer(name);
        set_config(m.path(), key, serde_json::json!(value));
        refused(m.path(), &[tensor, "model.safetensors", "shape"]);
    }
}

#[test]
fn phi3_long_context_rope_is_refused_by_name() {
    let m = model_with_tokenizer("phi3");
    set_config(
        m.path(),
        "rope_scaling",
        serde_json::json!({"type": "longrope", "short_factor": [1.0, 1.0],
                           "long_factor": [1.0, 1.0], "original_max_position_embeddings": 64}),
    );
    refused(m.path(), &["config.json", "longrope"]);
}
