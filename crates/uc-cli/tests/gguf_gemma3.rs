//! `uc import gguf` on a Gemma-3 GGUF written the way llama.cpp's converter writes one,
//! from the tiny gemma3 golden fixture (transformers' weights and logits): every norm
//! stored as `1 + w`, no Q/K permutation, llama.cpp's metadata keys (window, sliding
//! period, local rotary base, linear scaling of the global one), a SentencePiece
//! vocabulary with scores. The import must give the fixture's config and logits back.
//!
//! The GGUF is built here from the committed safetensors fixture rather than committed
//! itself: the fixture stays the one source of truth, and the writer below documents
//! exactly what a llama.cpp Gemma-3 file holds.
//!
//! One thing a llama.cpp Gemma-3 file cannot say is `query_pre_attn_scalar`: llama.cpp
//! uses `head_dim` (except for the 27B model). The fixture uses 24 (head_dim 16) so that
//! its golden test notices a wrong scale; here the reference is the fixture with 16.

mod common;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use common::{fixture, uc};
use std::path::Path;
use std::sync::Arc;
use uc_model::gguf::{gguf_name, Arch};
use uc_runtime::weights::CheckpointLoader;
use uc_runtime::{Decoder, DecoderOptions, Logits, WeightLoader};

/// Max |imported - fixture| over all logits. Not 0: `(1 + w) - 1` loses the low bits
/// of an f32 `w` (a real Gemma's bf16 `w` comes back exactly).
const TOLERANCE: f32 = 1e-4;

/// The tiny SentencePiece vocabulary: (piece, score, llama.cpp token type). "th" scores
/// better than "he" but has the larger id, so ranking merges by id instead of score
/// would tokenize "the" as t|he instead of th|e.
fn vocab() -> Vec<(String, f32, i32)> {
    let mut v: Vec<(String, f32, i32)> = ["<pad>", "<bos>", "<eos>", "<unk>", "<start_of_turn>"]
        .iter()
        .map(|t| (t.to_string(), -1000.0, 3))
        .collect();
    v.push(("he".into(), -5.0, 1));
    v.push(("th".into(), -1.0, 1));
    v.push(("\n\n".into(), -1000.0, 4)); // user-defined, as Gemma's newline runs
    let chars =
        "\u{2581}abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"()-\n";
    for (i, c) in chars.chars().enumerate() {
        v.push((c.to_string(), -100.0 - i as f32, 1));
    }
    let mut i = 0;
    while v.len() < 128 {
        v.push((format!("<unused{i}>"), -1000.0, 3));
        i += 1;
    }
    v
}

fn f32s(view: &safetensors::tensor::TensorView) -> Vec<f32> {
    view.data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Writes the fixture as llama.cpp's `convert_hf_to_gguf.py` (class Gemma3Model) would.
fn write_gguf(path: &Path) {
    let bytes = std::fs::read(fixture("gemma3").join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    for (name, view) in st.tensors() {
        let (gname, qk) = gguf_name(&name, Arch::Gemma3).unwrap();
        assert!(qk.is_none(), "{name}: gemma3 Q/K rows are not permuted");
        let mut vals = f32s(&view);
        if name.ends_with("norm.weight") {
            vals.iter_mut().for_each(|x| *x += 1.0); // the converter's norm_shift
        }
        let t = Tensor::from_vec(vals, view.shape(), &Device::Cpu).unwrap();
        tensors.push((gname, QTensor::quantize(&t, GgmlDType::F32).unwrap()));
    }
    let vocab = vocab();
    let g = |k: &str| format!("gemma3.{k}");
    let meta: Vec<(String, Value)> = vec![
        (
            "general.architecture".into(),
            Value::String("gemma3".into()),
        ),
        (g("block_count"), Value::U32(2)),
        (g("context_length"), Value::U32(256)),
        (g("embedding_length"), Value::U32(32)),
        (g("feed_forward_length"), Value::U32(48)),
        (g("attention.head_count"), Value::U32(4)),
        (g("attention.head_count_kv"), Value::U32(2)),
        (g("attention.key_length"), Value::U32(16)),
        (g("attention.value_length"), Value::U32(16)),
        (g("attention.layer_norm_rms_epsilon"), Value::F32(1e-6)),
        (g("attention.sliding_window"), Value::U32(8)),
        // Period 2: layer 0 slides, layer 1 is global (the fixture's layer_types).
        (g("attention.sliding_window_pattern"), Value::U32(2)),
        (g("rope.freq_base"), Value::F32(1e6)),
        // rope.freq_base_swa absent: llama.cpp's default 10000, the fixture's value.
        (g("rope.scaling.type"), Value::String("linear".into())),
        (g("rope.scaling.factor"), Value::F32(8.0)),
        ("tokenizer.ggml.model".into(), Value::String("llama".into())),
        ("tokenizer.ggml.pre".into(), Value::String("default".into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(vocab.iter().map(|t| Value::String(t.0.clone())).collect()),
        ),
        (
            "tokenizer.ggml.scores".into(),
            Value::Array(vocab.iter().map(|t| Value::F32(t.1)).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(vocab.iter().map(|t| Value::I32(t.2)).collect()),
        ),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
        ("tokenizer.ggml.unknown_token_id".into(), Value::U32(3)),
        ("tokenizer.ggml.padding_token_id".into(), Value::U32(0)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(true)),
        ("tokenizer.ggml.add_eos_token".into(), Value::Bool(false)),
        ("tokenizer.ggml.add_space_prefix".into(), Value::Bool(false)),
    ];
    let meta: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &meta, &tensors).unwrap();
}

/// The fixture with llama.cpp's score scale (see the module doc).
fn reference_dir(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(
        fixture("gemma3").join("model.safetensors"),
        dir.join("model.safetensors"),
    )
    .unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture("gemma3").join("config.json")).unwrap())
            .unwrap();
    cfg["query_pre_attn_scalar"] = 16.into();
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
}

fn logits(dir: &Path, ids: &[u32]) -> Vec<f32> {
    let loader: Arc<dyn WeightLoader> = Arc::new(CheckpointLoader::open(dir).unwrap());
    let mut dec = Decoder::new(
        loader,
        DecoderOptions {
            capacity: 32,
            stream_layers: false,
        },
    )
    .unwrap();
    dec.forward(ids, Logits::All).unwrap()
}

/// The fixture's input ids (two sequences of 24).
fn input_ids() -> Vec<Vec<u32>> {
    let bytes = std::fs::read(fixture("gemma3").join("io.safetensors")).unwrap();
    let io = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let ids = io.tensor("input_ids").unwrap();
    let t = ids.shape()[1];
    let v: Vec<u32> = ids
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32)
        .collect();
    v.chunks(t).map(<[u32]>::to_vec).collect()
}

#[test]
fn llama_cpp_style_gemma3_gguf_imports_to_the_fixture() {
    let tmp = tempfile::tempdir().unwrap();
    let gguf = tmp.path().join("tiny-gemma3.gguf");
    write_gguf(&gguf);
    let out = tmp.path().join("hf");
    let o = uc(
        &[
            "import",
            "gguf",
            gguf.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--json",
        ],
        &[],
    );
    let report = common::json_of(&o);
    assert_eq!(report["architecture"], "gemma3");
    assert_eq!(report["tied_embeddings"], true);

    // config.json: the keys a Gemma-3 text model needs, spelled for transformers.
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["model_type"], "gemma3_text");
    assert_eq!(
        cfg["layer_types"],
        serde_json::json!(["sliding_attention", "full_attention"])
    );
    assert_eq!(cfg["sliding_window"], 8);
    assert_eq!(cfg["query_pre_attn_scalar"], 16);
    assert_eq!(cfg["hidden_activation"], "gelu_pytorch_tanh");
    assert_eq!(
        cfg["rope_parameters"],
        serde_json::json!({
            "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        })
    );

    // uc's parsed config equals the reference's, field by field.
    let reference = tmp.path().join("reference");
    reference_dir(&reference);
    let parse = |d: &Path| {
        serde_json::to_value(
            uc_model::config::ModelConfig::from_file(&d.join("config.json")).unwrap(),
        )
        .unwrap()
    };
    assert_eq!(parse(&out), parse(&reference));

    // Norms came back as w (not 1 + w): logits match the fixture's.
    for ids in input_ids() {
        let (got, want) = (logits(&out, &ids), logits(&reference, &ids));
        let d = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(d <= TOLERANCE, "max |logit diff| {d}");
    }

    // The tokenizer: SentencePiece merges by score, `▁` for spaces, added tokens whole,
    // unknown characters as <unk> (this vocabulary has no byte pieces), BOS on request.
    let tok = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    let ids = |s: &str, special: bool| tok.encode(s, special).unwrap().get_ids().to_vec();
    let id = |s: &str| tok.token_to_id(s).unwrap();
    assert_eq!(ids("the", false), [id("th"), id("e")]);
    assert_eq!(
        ids("a the~", false),
        [id("a"), id("\u{2581}"), id("th"), id("e"), 3]
    );
    assert_eq!(
        ids("<start_of_turn>he\n\n", false),
        [4, id("he"), id("\n\n")]
    );
    assert_eq!(ids("he", true), [1, id("he")]);
    assert_eq!(tok.decode(&ids("a the", false), false).unwrap(), "a the");
}
