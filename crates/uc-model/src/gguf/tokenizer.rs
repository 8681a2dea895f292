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
//!
//! A SentencePiece vocabulary (`tokenizer.ggml.model = llama`: pieces, scores, types,
//! no merges; Gemma-3) becomes what Gemma-3's own `tokenizer.json` is: a BPE model with
//! byte fallback whose merges are derived from the scores ([`spm_merges`]), spaces
//! written as `▁` by the normalizer, no pre-tokenizer. That reproduces llama.cpp's
//! `llm_tokenizer_spm`: it merges, over the whole text between special tokens, the
//! adjacent pair whose concatenation is the best-scored piece; a merge rule's rank
//! here is that piece's score rank.

use super::meta::{HParams, Meta, MAX_TOKENS, TOKENS_KEY};
use super::GgufError;
use serde_json::{json, Map, Value as Json};
use std::str::FromStr;

/// The `tokenizer.ggml.model` values we convert: byte-level BPE, SentencePiece.
const SUPPORTED_MODELS: &str = "gpt2, llama";
/// The `tokenizer.ggml.pre` values we convert.
const SUPPORTED_PRE: &str = "smollm, gpt-2, default, qwen2";

/// Qwen2's split regex as its `tokenizer.json` spells it (llama.cpp's is the same
/// with the case-insensitive group expanded).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// llama.cpp token types (`llama_token_type`): normal pieces, byte pieces `<0xAB>`,
/// and the two that become added tokens.
const TOKEN_TYPE_NORMAL: i128 = 1;
const TOKEN_TYPE_BYTE: i128 = 6;
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

/// Post-processor: BOS/EOS `(token, id)` when the file asks, after byte-level offsets
/// when `byte_offsets` (byte-level BPE); `null` when there is nothing to do.
fn post_processor(
    byte_offsets: bool,
    bos: Option<(&str, usize)>,
    eos: Option<(&str, usize)>,
) -> Json {
    if bos.is_none() && eos.is_none() {
        return if byte_offsets {
            byte_level(true)
        } else {
            Json::Null
        };
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
    let template = json!({"type": "TemplateProcessing", "single": segment("A", 0), "pair": pair,
                          "special_tokens": special_tokens});
    if byte_offsets {
        json!({"type": "Sequence", "processors": [byte_level(true), template]})
    } else {
        template
    }
}

/// The token types, one per token (all normal when the key is absent).
fn token_types(meta: &Meta, n_tokens: usize) -> Result<Vec<i128>, GgufError> {
    let types_key = "tokenizer.ggml.token_type";
    let types: Vec<i128> = match meta.opt_array(types_key, MAX_TOKENS)? {
        None => vec![TOKEN_TYPE_NORMAL; n_tokens],
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
    if types.len() != n_tokens {
        return Err(GgufError::BadMetadata {
            key: types_key.into(),
            reason: format!("{} entries for {n_tokens} tokens", types.len()),
        });
    }
    Ok(types)
}

/// Control and user-defined tokens as `added_tokens` entries. Control tokens are
/// special (never split, skippable on decode); user-defined ones are matched whole in
/// raw text but decode as ordinary text -- both as llama.cpp.
fn added_tokens(tokens: &[&str], types: &[i128]) -> Vec<Json> {
    tokens
        .iter()
        .zip(types)
        .enumerate()
        .filter(|(_, (_, ty))| matches!(**ty, TOKEN_TYPE_CONTROL | TOKEN_TYPE_USER_DEFINED))
        .map(|(id, (t, ty))| {
            json!({"id": id, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": *ty == TOKEN_TYPE_CONTROL})
        })
        .collect()
}

/// The vocabulary as `{text: id}`. A string listed twice keeps its first id, as
/// llama.cpp's text->id map does; the later id stays decodable only through
/// llama.cpp, never produced by encoding.
fn vocab_map(tokens: &[&str]) -> Map<String, Json> {
    let mut vocab = Map::new();
    for (id, t) in tokens.iter().enumerate() {
        vocab.entry(t.to_string()).or_insert(id.into());
    }
    vocab
}

/// Builds both tokenizer files from the metadata; `hp` supplies the checked special ids.
pub(crate) fn build(meta: &Meta, hp: &HParams) -> Result<TokenizerFiles, GgufError> {
    let model = meta.str("tokenizer.ggml.model")?;
    let tokens = meta.strings(TOKENS_KEY, MAX_TOKENS)?;
    let types = token_types(meta, tokens.len())?;
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
    let tokenizer = match model {
        "gpt2" => bpe_tokenizer(meta, &tokens, &types, bos, eos)?,
        "llama" => spm_tokenizer(meta, &tokens, &types, bos, eos)?,
        other => {
            return Err(GgufError::UnsupportedTokenizer {
                key: "tokenizer.ggml.model",
                value: other.to_string(),
                supported: SUPPORTED_MODELS,
            })
        }
    };
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

/// `tokenizer.json` for byte-level BPE (`tokenizer.ggml.model = gpt2`).
fn bpe_tokenizer(
    meta: &Meta,
    tokens: &[&str],
    types: &[i128],
    bos: Option<(&str, usize)>,
    eos: Option<(&str, usize)>,
) -> Result<Json, GgufError> {
    // llama.cpp reads a file without `pre` as "default".
    let (normalizer, pre_tokenizer) =
        pipeline(meta.opt_str("tokenizer.ggml.pre")?.unwrap_or("default"))?;
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

    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens(tokens, types),
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor(true, bos, eos),
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        // No unk token: byte-level BPE spells every input with its 256 byte symbols.
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab_map(tokens), "merges": merges},
    });
    Ok(tokenizer)
}

/// `tokenizer.json` for a SentencePiece vocabulary (`tokenizer.ggml.model = llama`).
fn spm_tokenizer(
    meta: &Meta,
    tokens: &[&str],
    types: &[i128],
    bos: Option<(&str, usize)>,
    eos: Option<(&str, usize)>,
) -> Result<Json, GgufError> {
    // llama.cpp prepends a space to the first fragment unless told not to (its default
    // for SentencePiece is true). That is not rebuilt: only Gemma-3's `false` has been
    // checked against llama.cpp.
    let prefix_key = "tokenizer.ggml.add_space_prefix";
    let prefix = meta.opt_bool(prefix_key)?;
    if prefix != Some(false) {
        return Err(GgufError::UnsupportedTokenizer {
            key: "tokenizer.ggml.add_space_prefix",
            value: prefix.map_or("absent (true)".into(), |b| b.to_string()),
            supported: "false",
        });
    }
    let scores_key = "tokenizer.ggml.scores";
    let scores: Vec<f32> = meta
        .opt_array(scores_key, MAX_TOKENS)?
        .ok_or_else(|| GgufError::MissingMetadata {
            key: scores_key.into(),
        })?
        .iter()
        .map(|v| match *v {
            candle_core::quantized::gguf_file::Value::F32(x) if x.is_finite() => Ok(x),
            _ => Err(GgufError::BadMetadata {
                key: scores_key.into(),
                reason: format!("expected finite f32 values, found {:?}", v.value_type()),
            }),
        })
        .collect::<Result<_, _>>()?;
    if scores.len() != tokens.len() {
        return Err(GgufError::BadMetadata {
            key: scores_key.into(),
            reason: format!("{} entries for {} tokens", scores.len(), tokens.len()),
        });
    }
    // Byte fallback with all 256 `<0xAB>` pieces, as llama.cpp; a vocabulary without
    // any maps an unknown character to `<unk>` (llama.cpp cannot encode it at all). A
    // partial set would fall back differently from llama.cpp, so it is refused.
    let byte_fallback = match types.iter().filter(|&&t| t == TOKEN_TYPE_BYTE).count() {
        256 => true,
        0 => false,
        n => {
            return Err(GgufError::BadMetadata {
                key: "tokenizer.ggml.token_type".into(),
                reason: format!("{n} byte tokens (type 6); byte fallback needs all 256"),
            })
        }
    };
    let merges: Vec<Json> = spm_merges(tokens, types, &scores)
        .into_iter()
        .map(|(l, r)| json!([tokens[l], tokens[r]]))
        .collect();
    let unk = meta
        .opt_uint("tokenizer.ggml.unknown_token_id", MAX_TOKENS)?
        .and_then(|i| tokens.get(i).copied());
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens(tokens, types),
        // SentencePiece's whitespace escape; no prefix space (add_space_prefix false).
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"},
        // None: llama.cpp merges across the whole text between special tokens.
        "pre_tokenizer": null,
        "post_processor": post_processor(false, bos, eos),
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
        ]},
        "model": {"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": byte_fallback,
                  "ignore_merges": false, "vocab": vocab_map(tokens), "merges": merges},
    }))
}

/// BPE merge rules equivalent to SentencePiece's scores: for every normal piece, each
/// split into two normal pieces is a rule, ranked by the whole piece's score (best
/// first; ties by id), and the splits of one piece by (left id, right id) -- the order
/// of transformers' `SentencePieceExtractor`, which wrote Gemma's own tokenizer.json.
///
/// llama.cpp merges the adjacent pair whose concatenation has the highest score, so a
/// rule's rank must follow its result's score; only the order among splits of the same
/// piece is a choice, and two such splits compete only at different positions, where
/// llama.cpp takes the leftmost.
fn spm_merges(tokens: &[&str], types: &[i128], scores: &[f32]) -> Vec<(usize, usize)> {
    let mut id_of = std::collections::HashMap::with_capacity(tokens.len());
    for (id, t) in tokens.iter().enumerate() {
        if types[id] == TOKEN_TYPE_NORMAL {
            id_of.entry(*t).or_insert(id);
        }
    }
    let mut pieces: Vec<usize> = (0..tokens.len())
        .filter(|&id| types[id] == TOKEN_TYPE_NORMAL && id_of.get(tokens[id]) == Some(&id))
        .collect();
    pieces.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    let mut merges = Vec::new();
    for id in pieces {
        let t = tokens[id];
        let mut splits: Vec<(usize, usize)> = t
            .char_indices()
            .skip(1)
            .filter_map(|(i, _)| Some((*id_of.get(&t[..i])?, *id_of.get(&t[i..])?)))
            .collect();
        splits.sort_unstable();
        merges.extend(splits);
    }
    merges
}
