//! `uc_model::gguf::import_gguf` on tiny GGUF files built here with candle's writer:
//! names, shapes and values (llama Q/K un-permuted, quantized tensors dequantized),
//! config.json, tokenizer.json, and one test per error.

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use uc_model::gguf::{import_gguf, permute_qk_rows, GgufError, ImportReport};

const LAYERS: usize = 2;
const HIDDEN: usize = 32;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = HIDDEN / HEADS;
const FFN: usize = 64;

/// Merges of the test vocabulary; `1 2` exists so we can see digits stay split.
const MERGES: [(&str, &str); 6] = [
    ("Ġ", "t"),
    ("h", "e"),
    ("Ġt", "he"),
    ("i", "n"),
    ("Ġ", "a"),
    ("1", "2"),
];
const CONTROL: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
const USER_DEFINED: &str = "<think>";

/// Control tokens, the 256 byte symbols, the merge results, one user-defined token.
fn vocab() -> (Vec<String>, Vec<i32>) {
    let mut bytes: Vec<char> = ByteLevel::alphabet().into_iter().collect();
    bytes.sort();
    let mut tokens: Vec<String> = CONTROL.iter().map(|s| s.to_string()).collect();
    let mut types = vec![3; CONTROL.len()];
    tokens.extend(bytes.iter().map(|c| c.to_string()));
    tokens.extend(MERGES.iter().map(|(a, b)| format!("{a}{b}")));
    tokens.push(USER_DEFINED.into());
    types.resize(tokens.len() - 1, 1);
    types.push(4);
    (tokens, types)
}

/// A GGUF under construction, with the HF tensors the import must produce.
struct Built {
    meta: Vec<(String, Value)>,
    tensors: Vec<(String, QTensor)>,
    /// HF name -> (shape, values).
    expected: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
}

fn values(seed: usize, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7919 + seed * 104_729) % 1999) as f32 / 1999.0 - 0.5)
        .collect()
}

impl Built {
    /// A tiny model of `arch` (llama/qwen2/qwen3): 2 layers, hidden 32, heads 4/2.
    fn tiny(arch: &'static str) -> Built {
        let (tokens, types) = vocab();
        let a = |k: &str| format!("{arch}.{k}");
        let strings = |v: Vec<String>| Value::Array(v.into_iter().map(Value::String).collect());
        let meta = vec![
            ("general.architecture".into(), Value::String(arch.into())),
            (a("block_count"), Value::U32(LAYERS as u32)),
            (a("context_length"), Value::U32(256)),
            (a("embedding_length"), Value::U32(HIDDEN as u32)),
            (a("feed_forward_length"), Value::U32(FFN as u32)),
            (a("attention.head_count"), Value::U32(HEADS as u32)),
            (a("attention.head_count_kv"), Value::U32(KV_HEADS as u32)),
            (a("attention.layer_norm_rms_epsilon"), Value::F32(1e-5)),
            (a("rope.freq_base"), Value::F32(100_000.0)),
            ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
            (
                "tokenizer.ggml.pre".into(),
                Value::String(if arch == "llama" { "smollm" } else { "qwen2" }.into()),
            ),
            (
                "tokenizer.ggml.token_type".into(),
                Value::Array(types.into_iter().map(Value::I32).collect()),
            ),
            (
                "tokenizer.ggml.merges".into(),
                strings(MERGES.iter().map(|(a, b)| format!("{a} {b}")).collect()),
            ),
            ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
            ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
            ("tokenizer.ggml.unknown_token_id".into(), Value::U32(0)),
            ("tokenizer.ggml.padding_token_id".into(), Value::U32(2)),
            ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
            ("tokenizer.ggml.tokens".into(), strings(tokens.clone())),
        ];
        let mut b = Built {
            meta,
            tensors: vec![],
            expected: BTreeMap::new(),
        };
        let (q, kv) = (HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM);
        b.add(
            "token_embd.weight",
            "model.embed_tokens.weight",
            &[tokens.len(), HIDDEN],
            GgmlDType::Q8_0,
            None,
        );
        b.add(
            "output_norm.weight",
            "model.norm.weight",
            &[HIDDEN],
            GgmlDType::F32,
            None,
        );
        let permute = |heads| (arch == "llama").then_some(heads);
        for n in 0..LAYERS {
            let mut layer: Vec<(&str, &str, Vec<usize>, Option<usize>)> = vec![
                (
                    "attn_norm.weight",
                    "input_layernorm.weight",
                    vec![HIDDEN],
                    None,
                ),
                (
                    "ffn_norm.weight",
                    "post_attention_layernorm.weight",
                    vec![HIDDEN],
                    None,
                ),
                (
                    "attn_q.weight",
                    "self_attn.q_proj.weight",
                    vec![q, HIDDEN],
                    permute(HEADS),
                ),
                (
                    "attn_k.weight",
                    "self_attn.k_proj.weight",
                    vec![kv, HIDDEN],
                    permute(KV_HEADS),
                ),
                (
                    "attn_v.weight",
                    "self_attn.v_proj.weight",
                    vec![kv, HIDDEN],
                    None,
                ),
                (
                    "attn_output.weight",
                    "self_attn.o_proj.weight",
                    vec![HIDDEN, q],
                    None,
                ),
                (
                    "ffn_gate.weight",
                    "mlp.gate_proj.weight",
                    vec![FFN, HIDDEN],
                    None,
                ),
                (
                    "ffn_up.weight",
                    "mlp.up_proj.weight",
                    vec![FFN, HIDDEN],
                    None,
                ),
            ];
            match arch {
                "qwen2" => layer.extend([
                    ("attn_q.bias", "self_attn.q_proj.bias", vec![q], None),
                    ("attn_k.bias", "self_attn.k_proj.bias", vec![kv], None),
                    ("attn_v.bias", "self_attn.v_proj.bias", vec![kv], None),
                ]),
                "qwen3" => layer.extend([
                    (
                        "attn_q_norm.weight",
                        "self_attn.q_norm.weight",
                        vec![HEAD_DIM],
                        None,
                    ),
                    (
                        "attn_k_norm.weight",
                        "self_attn.k_norm.weight",
                        vec![HEAD_DIM],
                        None,
                    ),
                ]),
                _ => {}
            }
            for (g, h, shape, heads) in layer {
                b.add(
                    &format!("blk.{n}.{g}"),
                    &format!("model.layers.{n}.{h}"),
                    &shape,
                    GgmlDType::F32,
                    heads,
                );
            }
            // One Q4_1 linear per layer, as in the real SmolLM2 file.
            let (g, h) = (
                format!("blk.{n}.ffn_down.weight"),
                format!("model.layers.{n}.mlp.down_proj.weight"),
            );
            b.add(&g, &h, &[HIDDEN, FFN], GgmlDType::Q4_1, None);
        }
        b
    }

    /// Adds a tensor: HF values `hf`, stored as `dtype`, rows permuted llama.cpp-style
    /// when `permute_heads` is given. The expected import is the dequantized HF tensor.
    fn add(
        &mut self,
        gguf: &str,
        hf: &str,
        shape: &[usize],
        dtype: GgmlDType,
        permute_heads: Option<usize>,
    ) {
        let n: usize = shape.iter().product();
        let t = Tensor::from_vec(values(self.tensors.len(), n), shape, &Device::Cpu).unwrap();
        let stored = match permute_heads {
            Some(h) => permute_qk_rows(&t, h).unwrap(),
            None => t.clone(),
        };
        let q = QTensor::quantize(&stored, dtype).unwrap();
        // What the file really holds, back in HF row order.
        let deq = q.dequantize(&Device::Cpu).unwrap();
        let deq = match permute_heads {
            Some(h) => uc_model::gguf::unpermute_qk_rows(&deq, h).unwrap(),
            None => deq,
        };
        if dtype == GgmlDType::F32 {
            assert_eq!(flat(&deq), flat(&t), "f32 storage is exact");
        }
        self.expected
            .insert(hf.into(), (shape.to_vec(), flat(&deq)));
        self.tensors.push((gguf.into(), q));
    }

    fn set_meta(&mut self, key: &str, v: Value) {
        self.meta.retain(|(k, _)| k != key);
        self.meta.push((key.into(), v));
    }

    fn write(&self, path: &Path) {
        let meta: Vec<(&str, &Value)> = self.meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let tensors: Vec<(&str, &QTensor)> =
            self.tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let mut f = std::fs::File::create(path).unwrap();
        gguf_file::write(&mut f, &meta, &tensors).unwrap();
    }

    /// Writes the GGUF into a temp dir and imports it to `<tmp>/out`.
    fn import(&self) -> (tempfile::TempDir, PathBuf, Result<ImportReport, GgufError>) {
        let tmp = tempfile::tempdir().unwrap();
        let gguf = tmp.path().join("model.gguf");
        self.write(&gguf);
        let out = tmp.path().join("out");
        let r = import_gguf(&gguf, &out);
        (tmp, out, r)
    }
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn read_safetensors(dir: &Path) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, v)| {
            assert_eq!(v.dtype(), safetensors::Dtype::F32, "{name}");
            let vals = v
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (name, (v.shape().to_vec(), vals))
        })
        .collect()
}

fn read_json(path: PathBuf) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn check_tensors_round_trip(
    arch: &'static str,
) -> (Built, PathBuf, ImportReport, tempfile::TempDir) {
    let b = Built::tiny(arch);
    let (tmp, out, r) = b.import();
    let report = r.unwrap();
    let got = read_safetensors(&out);
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        b.expected.keys().collect::<Vec<_>>()
    );
    for (name, (shape, vals)) in &b.expected {
        let (gs, gv) = &got[name];
        assert_eq!(gs, shape, "{name}");
        assert!(gv == vals, "{name}: values differ");
    }
    assert_eq!(report.architecture, arch);
    assert_eq!(report.n_tensors, b.tensors.len());
    let n_params: usize = b.expected.values().map(|(_, v)| v.len()).sum();
    assert_eq!(report.n_params, n_params as u64);
    (b, out, report, tmp)
}

#[test]
fn llama_tensors_are_renamed_unpermuted_and_dequantized_exactly() {
    let (b, out, report, tmp) = check_tensors_round_trip("llama");
    assert!(report.tied_embeddings);
    assert_eq!(
        report.tensor_types,
        BTreeMap::from([("F32".into(), 17), ("Q4_1".into(), 2), ("Q8_0".into(), 1)])
    );
    let mut file = std::fs::File::open(tmp.path().join("model.gguf")).unwrap();
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut file, &mut h).unwrap();
    assert_eq!(report.source_sha256, hex::encode(h.finalize()));
    // The stored q rows really were permuted, so matching the HF order proves the undo.
    let stored = b
        .tensors
        .iter()
        .find(|(n, _)| n == "blk.0.attn_q.weight")
        .unwrap();
    let stored = flat(&stored.1.dequantize(&Device::Cpu).unwrap());
    assert_ne!(
        stored,
        b.expected["model.layers.0.self_attn.q_proj.weight"].1
    );
    // Nothing but the finished directory is left behind.
    let names: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    let mut files: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json"
        ]
    );
}

#[test]
fn qwen2_keeps_row_order_and_maps_qkv_biases() {
    let (_, out, _, _tmp) = check_tensors_round_trip("qwen2");
    let c = read_json(out.join("config.json"));
    assert_eq!(c["architectures"], serde_json::json!(["Qwen2ForCausalLM"]));
    assert_eq!(c["model_type"], "qwen2");
}

#[test]
fn qwen3_maps_q_and_k_head_norms() {
    let (_, out, _, _tmp) = check_tensors_round_trip("qwen3");
    let c = read_json(out.join("config.json"));
    assert_eq!(c["architectures"], serde_json::json!(["Qwen3ForCausalLM"]));
    assert_eq!(c["head_dim"], HEAD_DIM);
}

#[test]
fn output_head_becomes_lm_head_and_unties() {
    let mut b = Built::tiny("llama");
    let n_vocab = vocab().0.len();
    b.add(
        "output.weight",
        "lm_head.weight",
        &[n_vocab, HIDDEN],
        GgmlDType::F32,
        None,
    );
    let (_tmp, out, r) = b.import();
    assert!(!r.unwrap().tied_embeddings);
    assert_eq!(
        read_safetensors(&out)["lm_head.weight"],
        b.expected["lm_head.weight"]
    );
    assert_eq!(
        read_json(out.join("config.json"))["tie_word_embeddings"],
        false
    );
}

#[test]
fn config_json_has_transformers_keys_and_loads_in_uc() {
    let b = Built::tiny("llama");
    let (_tmp, out, r) = b.import();
    r.unwrap();
    let c = read_json(out.join("config.json"));
    let expect = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": FFN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM, "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0, "max_position_embeddings": 256, "vocab_size": vocab().0.len(),
        "tie_word_embeddings": true, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
        "torch_dtype": "float32", "hidden_act": "silu", "attention_bias": false, "mlp_bias": false,
    });
    assert_eq!(c, expect);
    let cfg = uc_model::config::ModelConfig::from_file(&out.join("config.json")).unwrap();
    assert_eq!(
        (cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps),
        (KV_HEADS, HEAD_DIM, 1e-5)
    );
}

#[test]
fn tokenizer_json_loads_splits_digits_and_round_trips_text() {
    let b = Built::tiny("llama");
    let (_tmp, out, r) = b.import();
    r.unwrap();
    let tok = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    let text = "In 2024, the U.S. spent $1,234.56 -- on\n\n  naïve café ☕ “quotes” & emoji 🎉!\tTabs\r\nand CRLF.\n12 + 3 = 15? ";
    let enc = tok.encode(text, false).unwrap();
    assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), text);
    // smollm: digits are split one by one even though the merge "1 2" exists.
    let toks = |s: &str| tok.encode(s, true).unwrap().get_tokens().to_vec();
    assert_eq!(toks("x12"), ["x", "1", "2"]);
    assert_eq!(toks(" the"), ["Ġthe"], "merges apply, and no BOS is added");
    // Control tokens are special and whole; the user-defined one is whole too.
    let ids = tok
        .encode("<|im_start|>hi<think>", false)
        .unwrap()
        .get_ids()
        .to_vec();
    assert_eq!(ids.first(), Some(&1));
    assert_eq!(ids.last().copied(), tok.token_to_id(USER_DEFINED));
    assert_eq!(tok.decode(&ids, true).unwrap(), "hi<think>");
    // And it loads through uc's own tokenizer wrapper.
    let uc = uc_model::tokenizer::Tokenizer::from_dir(&out).unwrap();
    assert_eq!(uc.encode(text).unwrap(), enc.get_ids());
    let cfg = read_json(out.join("tokenizer_config.json"));
    assert_eq!(
        (cfg["bos_token"].as_str(), cfg["eos_token"].as_str()),
        (Some("<|im_start|>"), Some("<|im_end|>"))
    );
}

#[test]
fn qwen2_pre_tokenizer_round_trips_text() {
    let (_tmp, out, r) = Built::tiny("qwen2").import();
    r.unwrap();
    let tok = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    let text = "It's 1999 -- we're \"here\"\n\n\tnaïve 🎉 x12";
    let enc = tok.encode(text, false).unwrap();
    assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), text);
}

#[test]
fn add_bos_token_flag_adds_bos() {
    let mut b = Built::tiny("llama");
    b.set_meta("tokenizer.ggml.add_bos_token", Value::Bool(true));
    let (_tmp, out, r) = b.import();
    r.unwrap();
    let tok = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    assert_eq!(
        tok.encode(" the", true).unwrap().get_tokens(),
        ["<|im_start|>", "Ġthe"]
    );
    assert_eq!(tok.encode(" the", false).unwrap().get_tokens(), ["Ġthe"]);
}

#[test]
fn imported_directory_opens_as_a_checkpoint() {
    let b = Built::tiny("llama");
    let (_tmp, out, r) = b.import();
    r.unwrap();
    let ck = uc_model::checkpoint::Checkpoint::open(&out).unwrap();
    let (v, shape) = ck
        .tensor_f32("model.layers.1.self_attn.k_proj.weight")
        .unwrap();
    assert_eq!(
        (shape, v),
        b.expected["model.layers.1.self_attn.k_proj.weight"].clone()
    );
}

#[test]
fn import_is_byte_identical_across_runs() {
    // Regression: safetensors metadata with two keys came out in HashMap order.
    let tmp = tempfile::tempdir().unwrap();
    let gguf = tmp.path().join("m.gguf");
    Built::tiny("qwen2").write(&gguf);
    let outs: Vec<PathBuf> = (0..3).map(|i| tmp.path().join(format!("o{i}"))).collect();
    for o in &outs {
        import_gguf(&gguf, o).unwrap();
    }
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        let first = std::fs::read(outs[0].join(f)).unwrap();
        for o in &outs[1..] {
            assert!(std::fs::read(o.join(f)).unwrap() == first, "{f} differs");
        }
    }
}

// ---- errors: each is the right variant, nothing panics, no output appears ----

fn import_err(b: &Built) -> GgufError {
    let (_tmp, out, r) = b.import();
    assert!(
        !out.exists(),
        "a failed import must leave no output directory"
    );
    r.unwrap_err()
}

#[test]
fn rejects_missing_metadata_key_naming_it() {
    let mut b = Built::tiny("llama");
    b.meta.retain(|(k, _)| k != "llama.attention.head_count");
    let e = import_err(&b);
    assert!(
        matches!(&e, GgufError::MissingMetadata { key } if key == "llama.attention.head_count"),
        "{e}"
    );
}

#[test]
fn rejects_metadata_of_the_wrong_type() {
    let mut b = Built::tiny("llama");
    b.set_meta("llama.block_count", Value::String("two".into()));
    let e = import_err(&b);
    assert!(
        matches!(&e, GgufError::BadMetadata { key, .. } if key == "llama.block_count"),
        "{e}"
    );
}

#[test]
fn rejects_unknown_architecture() {
    let mut b = Built::tiny("llama");
    b.set_meta("general.architecture", Value::String("gpt2".into()));
    let e = import_err(&b);
    assert!(
        matches!(&e, GgufError::UnsupportedArchitecture { architecture } if architecture == "gpt2"),
        "{e}"
    );
}

#[test]
fn rejects_unknown_tensor_names() {
    // A made-up name, a layer past block_count, and a qwen2-only tensor in a llama file.
    for name in [
        "blk.0.attn_bogus.weight",
        "blk.2.attn_norm.weight",
        "blk.0.attn_q.bias",
        "blk.01.attn_norm.weight",
    ] {
        let mut b = Built::tiny("llama");
        b.add(name, "unused", &[HIDDEN], GgmlDType::F32, None);
        let e = import_err(&b);
        assert!(
            matches!(&e, GgufError::UnknownTensor { name: n, .. } if n == name),
            "{name}: {e}"
        );
    }
}

#[test]
fn rejects_missing_tensor() {
    let mut b = Built::tiny("llama");
    b.tensors.retain(|(n, _)| n != "blk.1.ffn_up.weight");
    let e = import_err(&b);
    assert!(
        matches!(&e, GgufError::MissingTensor { name } if name == "blk.1.ffn_up.weight"),
        "{e}"
    );
}

#[test]
fn rejects_shape_mismatch_naming_the_tensor() {
    let mut b = Built::tiny("llama");
    b.tensors.retain(|(n, _)| n != "blk.0.attn_k.weight");
    b.add(
        "blk.0.attn_k.weight",
        "unused",
        &[HIDDEN, HIDDEN],
        GgmlDType::F32,
        None,
    );
    let e = import_err(&b);
    assert!(
        matches!(&e, GgufError::ShapeMismatch { name, expected, actual }
            if name == "blk.0.attn_k.weight" && expected == &[16, 32] && actual == &[32, 32]),
        "{e}"
    );
}

#[test]
fn rejects_unknown_tokenizer_model_and_pre() {
    for (key, value) in [
        ("tokenizer.ggml.model", "bert"),
        ("tokenizer.ggml.pre", "klingon"),
    ] {
        let mut b = Built::tiny("llama");
        b.set_meta(key, Value::String(value.into()));
        let e = import_err(&b);
        assert!(
            matches!(&e, GgufError::UnsupportedTokenizer { key: k, value: v, .. } if *k == key && v == value),
            "{e}"
        );
    }
}

#[test]
fn rejects_merge_naming_a_token_outside_the_vocabulary() {
    let mut b = Built::tiny("llama");
    let merges = Value::Array(vec![
        Value::String("Ġ t".into()),
        Value::String("zz qq".into()),
    ]);
    b.set_meta("tokenizer.ggml.merges", merges);
    assert!(matches!(import_err(&b), GgufError::BadTokenizer { .. }));
}

#[test]
fn rejects_special_token_id_outside_the_vocabulary() {
    let mut b = Built::tiny("llama");
    b.set_meta("tokenizer.ggml.eos_token_id", Value::U32(1_000_000));
    let e = import_err(&b);
    assert!(
        matches!(&e, GgufError::BadMetadata { key, .. } if key == "tokenizer.ggml.eos_token_id"),
        "{e}"
    );
}

#[test]
fn refuses_to_overwrite_an_existing_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let gguf = tmp.path().join("m.gguf");
    Built::tiny("llama").write(&gguf);
    let e = import_gguf(&gguf, tmp.path()).unwrap_err();
    assert!(matches!(e, GgufError::OutputExists { .. }), "{e}");
}

#[test]
fn rejects_missing_file_and_non_gguf() {
    let tmp = tempfile::tempdir().unwrap();
    let e = import_gguf(&tmp.path().join("nope.gguf"), &tmp.path().join("o")).unwrap_err();
    assert!(matches!(e, GgufError::Io { .. }), "{e}");
    let junk = tmp.path().join("junk.gguf");
    std::fs::write(&junk, b"not a gguf file at all").unwrap();
    let e = import_gguf(&junk, &tmp.path().join("o")).unwrap_err();
    assert!(matches!(e, GgufError::BadGguf { .. }), "{e}");
}

#[test]
fn rejects_every_truncation_without_panicking() {
    let tmp = tempfile::tempdir().unwrap();
    let full = tmp.path().join("full.gguf");
    Built::tiny("llama").write(&full);
    let bytes = std::fs::read(&full).unwrap();
    let cut_path = tmp.path().join("cut.gguf");
    // Past len - 32 only the last tensor's alignment padding would be lost.
    let end = bytes.len() - 32;
    for cut in (0..end).step_by(end / 300 + 1).chain([end - 1]) {
        std::fs::write(&cut_path, &bytes[..cut]).unwrap();
        let out = tmp.path().join(format!("out{cut}"));
        let e = import_gguf(&cut_path, &out).expect_err("truncated file must fail");
        assert!(
            matches!(e, GgufError::BadGguf { .. } | GgufError::BadTensor { .. }),
            "cut {cut}: {e}"
        );
        assert!(!out.exists());
    }
    // Cut inside the last tensor's data: the error names it.
    std::fs::write(&cut_path, &bytes[..bytes.len() - 64]).unwrap();
    let e = import_gguf(&cut_path, &tmp.path().join("o")).unwrap_err();
    assert!(
        matches!(&e, GgufError::BadTensor { name, .. } if name == "blk.1.ffn_down.weight"),
        "{e}"
    );
}

#[test]
fn corrupted_bytes_never_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let full = tmp.path().join("full.gguf");
    Built::tiny("qwen2").write(&full);
    let bytes = std::fs::read(&full).unwrap();
    let bad = tmp.path().join("bad.gguf");
    for (i, pos) in (0..bytes.len()).step_by(bytes.len() / 200 + 1).enumerate() {
        for flip in [0xFF, 0x01, 0x80] {
            let mut b = bytes.clone();
            b[pos] ^= flip;
            std::fs::write(&bad, &b).unwrap();
            // Ok or Err are both fine; a panic fails the test.
            let _ = import_gguf(&bad, &tmp.path().join(format!("o{i}-{flip}")));
        }
    }
}
