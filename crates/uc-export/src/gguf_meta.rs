//! GGUF metadata from a pack's `config.json`, `tokenizer.json` and
//! `tokenizer_config.json`: the hyper-parameter keys llama.cpp (and uc's importer)
//! read, and the byte-level BPE vocabulary, merges, token types and special ids.
//!
//! The pre-tokenizer name (`tokenizer.ggml.pre`) is recognised from the Hugging Face
//! pipeline, the inverse of the table in uc-model's GGUF tokenizer import:
//! `Sequence[Digits(individual), ByteLevel]` is `smollm`, a lone `ByteLevel` is
//! `gpt-2`, NFC + `Split` + `ByteLevel(no regex)` is `qwen2`. Anything else is written
//! as `default` with a warning: llama.cpp will then split text its own way.

use crate::{Dtype, ExportError};
use candle_core::quantized::gguf_file::Value;
use serde_json::Value as Json;
use std::path::Path;
use uc_model::config::ModelConfig;
use uc_model::gguf::Arch;

/// llama.cpp token types.
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

fn read_json(path: &Path) -> Result<Json, ExportError> {
    let bytes = std::fs::read(path).map_err(|e| ExportError::Tokenizer {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    serde_json::from_slice(&bytes).map_err(|e| ExportError::Tokenizer {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// `tokenizer.ggml.pre` for a Hugging Face normalizer + pre-tokenizer, if recognised.
pub fn pre_name(tokenizer: &Json) -> Option<&'static str> {
    let pre = tokenizer.get("pre_tokenizer")?;
    let kind = |v: &Json| v.get("type").and_then(|t| t.as_str()).map(str::to_string);
    match kind(pre)?.as_str() {
        "ByteLevel" => Some("gpt-2"),
        "Sequence" => {
            let parts = pre.get("pretokenizers")?.as_array()?;
            let kinds: Vec<String> = parts.iter().filter_map(kind).collect();
            let kinds: Vec<&str> = kinds.iter().map(String::as_str).collect();
            match kinds.as_slice() {
                ["Digits", "ByteLevel"]
                    if parts.first()?.get("individual_digits")? == &Json::Bool(true) =>
                {
                    Some("smollm")
                }
                ["Split", "ByteLevel"] => Some("qwen2"),
                _ => None,
            }
        }
        _ => None,
    }
}

/// A special token's text in tokenizer_config.json: a string or `{"content": ...}`.
fn special_text(v: Option<&Json>) -> Option<String> {
    match v? {
        Json::String(s) => Some(s.clone()),
        o => o.get("content")?.as_str().map(str::to_string),
    }
}

/// GGUF metadata key-value pairs, and warnings for the user.
type MetaAndWarnings = (Vec<(String, Value)>, Vec<String>);

/// The metadata key-values, and warnings about what GGUF will not carry exactly.
pub fn metadata(
    pack: &Path,
    cfg: &ModelConfig,
    arch: Arch,
    dtype: Dtype,
    fingerprint: &str,
) -> Result<MetaAndWarnings, ExportError> {
    let mut warnings = Vec::new();
    let a = arch.name();
    let u32v = |n: usize| Value::U32(u32::try_from(n).unwrap_or(u32::MAX));
    let mut m: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(a.into())),
        (
            "general.name".into(),
            Value::String(
                pack.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "uc-export".into()),
            ),
        ),
        ("general.alignment".into(), Value::U32(32)),
        // llama_ftype: 0 = all F32, 1 = mostly F16.
        (
            "general.file_type".into(),
            Value::U32(if dtype == Dtype::F16 { 1 } else { 0 }),
        ),
        (
            "general.source.uc_pack_fingerprint".into(),
            Value::String(fingerprint.into()),
        ),
        (
            format!("{a}.context_length"),
            u32v(cfg.max_position_embeddings),
        ),
        (format!("{a}.embedding_length"), u32v(cfg.hidden_size)),
        (format!("{a}.block_count"), u32v(cfg.num_layers)),
        (
            format!("{a}.feed_forward_length"),
            u32v(cfg.intermediate_size),
        ),
        (format!("{a}.attention.head_count"), u32v(cfg.num_heads)),
        (
            format!("{a}.attention.head_count_kv"),
            u32v(cfg.num_kv_heads),
        ),
        (format!("{a}.attention.key_length"), u32v(cfg.head_dim)),
        (format!("{a}.attention.value_length"), u32v(cfg.head_dim)),
        (
            format!("{a}.attention.layer_norm_rms_epsilon"),
            Value::F32(cfg.rms_norm_eps as f32),
        ),
        (
            format!("{a}.rope.freq_base"),
            Value::F32(cfg.rope.theta as f32),
        ),
        (format!("{a}.rope.dimension_count"), u32v(cfg.head_dim)),
        (format!("{a}.vocab_size"), u32v(cfg.vocab_size)),
    ];

    let tok_path = pack.join("tokenizer.json");
    let tok = read_json(&tok_path)?;
    let bad = |reason: String| ExportError::Tokenizer {
        path: tok_path.clone(),
        reason,
    };
    let model = tok.get("model").ok_or_else(|| bad("no `model`".into()))?;
    if model.get("type").and_then(|t| t.as_str()) != Some("BPE") {
        return Err(bad("only BPE tokenizers can be written to GGUF".into()));
    }
    // Token strings by id: the BPE vocabulary, then added tokens; ids the tokenizer
    // leaves empty (the embedding can have more rows than the vocabulary) become
    // unused placeholders, so the token count equals the embedding's rows.
    let mut tokens: Vec<Option<String>> = vec![None; cfg.vocab_size];
    let mut types = vec![NORMAL; cfg.vocab_size];
    let vocab = model
        .get("vocab")
        .and_then(|v| v.as_object())
        .ok_or_else(|| bad("no `model.vocab` object".into()))?;
    let mut place = |id: Option<u64>, text: &str| -> Result<usize, ExportError> {
        let id = id
            .and_then(|i| usize::try_from(i).ok())
            .filter(|&i| i < cfg.vocab_size)
            .ok_or_else(|| {
                bad(format!(
                    "token {text:?} has an id outside the {} rows",
                    cfg.vocab_size
                ))
            })?;
        if let Some(slot) = tokens.get_mut(id) {
            *slot = Some(text.to_string());
        }
        Ok(id)
    };
    for (text, id) in vocab {
        place(id.as_u64(), text)?;
    }
    for t in tok
        .get("added_tokens")
        .and_then(|a| a.as_array())
        .into_iter()
        .flatten()
    {
        let text = t
            .get("content")
            .and_then(|c| c.as_str())
            .unwrap_or_default();
        let id = place(t.get("id").and_then(|i| i.as_u64()), text)?;
        if let Some(ty) = types.get_mut(id) {
            *ty = if t.get("special").and_then(|s| s.as_bool()) == Some(true) {
                CONTROL
            } else {
                USER_DEFINED
            };
        }
    }
    let mut unused = 0;
    let tokens: Vec<Value> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            Value::String(t.unwrap_or_else(|| {
                unused += 1;
                if let Some(ty) = types.get_mut(i) {
                    *ty = UNUSED;
                }
                format!("<|uc_unused_{i}|>")
            }))
        })
        .collect();
    if unused > 0 {
        warnings.push(format!(
            "{unused} embedding rows have no token in tokenizer.json; written as unused placeholders"
        ));
    }
    let merges: Vec<Value> = match model.get("merges").and_then(|m| m.as_array()) {
        None => Vec::new(),
        Some(list) => list
            .iter()
            .enumerate()
            .map(|(i, m)| match m {
                Json::String(s) => Ok(Value::String(s.clone())),
                Json::Array(p) => match (
                    p.first().and_then(|x| x.as_str()),
                    p.get(1).and_then(|x| x.as_str()),
                ) {
                    (Some(x), Some(y)) if p.len() == 2 => Ok(Value::String(format!("{x} {y}"))),
                    _ => Err(bad(format!("merge {i} is not a pair of strings"))),
                },
                _ => Err(bad(format!("merge {i} is not a string or a pair"))),
            })
            .collect::<Result<_, _>>()?,
    };
    let pre = match pre_name(&tok) {
        Some(p) => p,
        None => {
            warnings.push(
                "tokenizer pre-tokenizer not recognised (not smollm / gpt-2 / qwen2 byte-level BPE); written as `default`: llama.cpp may split text differently".into(),
            );
            "default"
        }
    };
    m.push(("tokenizer.ggml.model".into(), Value::String("gpt2".into())));
    m.push(("tokenizer.ggml.pre".into(), Value::String(pre.into())));
    m.push(("tokenizer.ggml.tokens".into(), Value::Array(tokens.clone())));
    m.push((
        "tokenizer.ggml.token_type".into(),
        Value::Array(types.iter().map(|&t| Value::I32(t)).collect()),
    ));
    m.push(("tokenizer.ggml.merges".into(), Value::Array(merges)));

    // Special ids: tokenizer_config.json's strings, else config.json's ids.
    let tc_path = pack.join("tokenizer_config.json");
    let tc = if tc_path.is_file() {
        read_json(&tc_path)?
    } else {
        Json::Null
    };
    let cfg_json = read_json(&pack.join("config.json"))?;
    let id_of = |text: &str| {
        tokens
            .iter()
            .position(|t| matches!(t, Value::String(s) if s == text))
    };
    for (role, key) in [
        ("bos", "bos_token"),
        ("eos", "eos_token"),
        ("unknown", "unk_token"),
        ("padding", "pad_token"),
    ] {
        let from_text = special_text(tc.get(key)).and_then(|t| id_of(&t));
        let from_cfg = cfg_json
            .get(format!("{}_token_id", &key[..3]))
            .and_then(|v| v.as_u64())
            .and_then(|v| usize::try_from(v).ok())
            .filter(|&i| i < cfg.vocab_size);
        if let Some(id) = from_text.or(from_cfg) {
            m.push((format!("tokenizer.ggml.{role}_token_id"), u32v(id)));
        }
    }
    for key in ["add_bos_token", "add_eos_token"] {
        let v = tc.get(key).and_then(|b| b.as_bool()).unwrap_or(false);
        m.push((format!("tokenizer.ggml.{key}"), Value::Bool(v)));
    }
    if let Some(t) = tc.get("chat_template").and_then(|t| t.as_str()) {
        m.push(("tokenizer.chat_template".into(), Value::String(t.into())));
    }
    Ok((m, warnings))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn recognises_the_pipelines_the_importer_builds() {
        let bl = json!({"type": "ByteLevel", "use_regex": true});
        assert_eq!(pre_name(&json!({"pre_tokenizer": bl})), Some("gpt-2"));
        let smol = json!({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, bl]}});
        assert_eq!(pre_name(&smol), Some("smollm"));
        let qwen = json!({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split"}, {"type": "ByteLevel", "use_regex": false}]}});
        assert_eq!(pre_name(&qwen), Some("qwen2"));
        assert_eq!(pre_name(&json!({"pre_tokenizer": null})), None);
        let digits_grouped = json!({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": false}, bl]}});
        assert_eq!(pre_name(&digits_grouped), None);
    }
}
