//! `tokenizer.json` (+ `tokenizer_config.json`) from GGUF tokenizer metadata.
//!
//! A GGUF carries the byte-level BPE vocabulary and merges, the token types, the
//! special ids, and in `tokenizer.ggml.pre` the name of llama.cpp's pre-tokenizer
//! (its regex split). We rebuild the Hugging Face pipeline each name stands for:
//!
//! | pre | llama.cpp split | Hugging Face pre-tokenizer |
//! |---|---|---|
//! | `smollm` | `\p{N}`, then the GPT-2 regex | `Digits(individual)`, `ByteLevel(use_regex)` |
//! | `gpt-2`, `default` | the GPT-2 regex | `ByteLevel(use_regex)` |
//! | `qwen2` | the Qwen2 regex | NFC, `Split(Qwen2 regex)`, `ByteLevel(no regex)` |
//!
//! llama.cpp's `default` (also what it assumes when `pre` is absent) additionally
//! isolates punctuation runs and 3-digit groups; we follow transformers, which maps
//! it to plain GPT-2 byte-level splitting, as the original tokenizers of such files do.

use super::meta::{HParams, Meta, MAX_TOKENS, TOKENS_KEY};
use super::GgufError;
use serde_json::{json, Map, Value as Json};
use std::str::FromStr;

/// The only `tokenizer.ggml.model` we convert: byte-level BPE.
const SUPPORTED_MODELS: &str = "gpt2";
/// The `tokenizer.ggml.pre` values we convert.
const SUPPORTED_PRE: &str = "smollm, gpt-2, default, qwen2";

/// Qwen2's split regex as its `tokenizer.json` spells it (llama.cpp's is the same
/// with the case-insensitive group expanded).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// llama.cpp token types (`llama_token_type`) that become added tokens.
const TOKEN_TYPE_CONTROL: i128 = 3;
const TOKEN_TYPE_USER_DEFINED: i128 = 4;

/// The two files written next to the weights.
pub(crate) struct TokenizerFiles {
    /// `tokenizer.json`, already proven to load in `tokenizers`.
    pub tokenizer: Json,
    /// `tokenizer_config.json`: special token strings, BOS/EOS flags, chat template.
    pub config: Json,
}

fn byte_level(use_regex: bool) -> Json {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": use_regex, "use_regex": use_regex})
}

/// `(normalizer, pre_tokenizer)` for a `tokenizer.ggml.pre` name.
fn pipeline(pre: &str) -> Result<(Json, Json), GgufError> {
    Ok(match pre {
        "gpt-2" | "default" => (Json::Null, byte_level(true)),
        "smollm" => (
            Json::Null,
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                byte_level(true),
            ]}),
        ),
        // NFC as in Qwen2's own tokenizer.json (llama.cpp skips it; they differ only
        // on text that is not already NFC).
        "qwen2" => (
            json!({"type": "NFC"}),
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}, "behavior": "Isolated", "invert": false},
                byte_level(false),
            ]}),
        ),
        other => {
            return Err(GgufError::UnsupportedTokenizer {
                key: "tokenizer.ggml.pre",
                value: other.to_string(),
                supported: SUPPORTED_PRE,
            })
        }
    })
}

/// Post-processor: byte-level offsets, plus BOS/EOS `(token, id)` when the file asks.
fn post_processor(bos: Option<(&str, usize)>, eos: Option<(&str, usize)>) -> Json {
    if bos.is_none() && eos.is_none() {
        return byte_level(true);
    }
    let special = |(t, _): (&str, usize), type_id: u32| json!({"SpecialToken": {"id": t, "type_id": type_id}});
    let segment = |s: &str, type_id: u32| -> Vec<Json> {
        let body = json!({"Sequence": {"id": s, "type_id": type_id}});
        let bos = bos.map(|b| special(b, type_id));
        bos.into_iter()
            .chain([body])
            .chain(eos.map(|e| special(e, type_id)))
            .collect()
    };
    let pair: Vec<Json> = segment("A", 0).into_iter().chain(segment("B", 1)).collect();
    let special_tokens: Map<String, Json> = bos
        .into_iter()
        .chain(eos)
        .map(|(t, id)| (t.to_string(), json!({"id": t, "ids": [id], "tokens": [t]})))
        .collect();
    json!({"type": "Sequence", "processors": [
        byte_level(true),
        {"type": "TemplateProcessing", "single": segment("A", 0), "pair": pair, "special_tokens": special_tokens},
    ]})
}

/// Builds both tokenizer files from the metadata; `hp` supplies the checked special ids.
pub(crate) fn build(meta: &Meta, hp: &HParams) -> Result<TokenizerFiles, GgufError> {
    let model = meta.str("tokenizer.ggml.model")?;
    if model != SUPPORTED_MODELS {
        return Err(GgufError::UnsupportedTokenizer {
            key: "tokenizer.ggml.model",
            value: model.to_string(),
            supported: SUPPORTED_MODELS,
        });
    }
    // llama.cpp reads a file without `pre` as "default".
    let (normalizer, pre_tokenizer) =
        pipeline(meta.opt_str("tokenizer.ggml.pre")?.unwrap_or("default"))?;
    let tokens = meta.strings(TOKENS_KEY, MAX_TOKENS)?;
    let types_key = "tokenizer.ggml.token_type";
    let types: Vec<i128> = match meta.opt_array(types_key, MAX_TOKENS)? {
        None => vec![1; tokens.len()],
        Some(a) => a
            .iter()
            .map(|v| match *v {
                candle_core::quantized::gguf_file::Value::I32(t) => Ok(t.into()),
                candle_core::quantized::gguf_file::Value::U32(t) => Ok(t.into()),
                _ => Err(GgufError::BadMetadata {
                    key: types_key.into(),
                    reason: format!("expected integers, found {:?}", v.value_type()),
                }),
            })
            .collect::<Result<_, _>>()?,
    };
    if types.len() != tokens.len() {
        return Err(GgufError::BadMetadata {
            key: types_key.into(),
            reason: format!("{} entries for {} tokens", types.len(), tokens.len()),
        });
    }
    let merges_key = "tokenizer.ggml.merges";
    let merges = meta
        .strings(merges_key, MAX_TOKENS)?
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            m.split_once(' ')
                .map(|(a, b)| json!([a, b]))
                .ok_or_else(|| GgufError::BadMetadata {
                    key: merges_key.into(),
                    reason: format!("entry {i} {m:?} is not two tokens separated by a space"),
                })
        })
        .collect::<Result<Vec<_>, _>>()?;

    // A string listed twice keeps its first id, as llama.cpp's text->id map does; the
    // later id stays decodable only through llama.cpp, never produced by encoding.
    let mut vocab = Map::new();
    for (id, t) in tokens.iter().enumerate() {
        vocab.entry(t.to_string()).or_insert(id.into());
    }
    // Control tokens are special (never split, skippable on decode); user-defined ones
    // are matched whole in raw text but decode as ordinary text -- both as llama.cpp.
    let added: Vec<Json> = tokens
        .iter()
        .zip(&types)
        .enumerate()
        .filter(|(_, (_, ty))| matches!(**ty, TOKEN_TYPE_CONTROL | TOKEN_TYPE_USER_DEFINED))
        .map(|(id, (t, ty))| {
            json!({"id": id, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": *ty == TOKEN_TYPE_CONTROL})
        })
        .collect();

    let token = |id: Option<usize>| id.and_then(|i| Some((*tokens.get(i)?, i)));
    let add_bos = meta
        .opt_bool("tokenizer.ggml.add_bos_token")?
        .unwrap_or(false);
    let add_eos = meta
        .opt_bool("tokenizer.ggml.add_eos_token")?
        .unwrap_or(false);
    let required = |flag: bool, role: &str, id: Option<usize>| match (flag, token(id)) {
        (false, _) => Ok(None),
        (true, Some(t)) => Ok(Some(t)),
        (true, None) => Err(GgufError::MissingMetadata {
            key: format!("tokenizer.ggml.{role}_token_id"),
        }),
    };
    let bos = required(add_bos, "bos", hp.special.bos)?;
    let eos = required(add_eos, "eos", hp.special.eos)?;

    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor(bos, eos),
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        // No unk token: byte-level BPE spells every input with its 256 byte symbols.
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": merges},
    });
    // Prove it loads (e.g. every merge names tokens in the vocabulary) before writing.
    tokenizers::Tokenizer::from_str(&tokenizer.to_string()).map_err(|e| {
        GgufError::BadTokenizer {
            reason: e.to_string(),
        }
    })?;

    let mut config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": false,
    });
    if let Some(obj) = config.as_object_mut() {
        for (role, id) in hp.special.named() {
            if let Some((t, _)) = token(Some(id)) {
                obj.insert(format!("{role}_token"), t.into());
            }
        }
        if let Some(n) = hp.context_length {
            obj.insert("model_max_length".into(), n.into());
        }
        if let Some(t) = meta.opt_str("tokenizer.chat_template")? {
            obj.insert("chat_template".into(), t.into());
        }
    }
    Ok(TokenizerFiles { tokenizer, config })
}
