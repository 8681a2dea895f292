//! `config.json` of a Hugging Face Llama-family checkpoint, parsed and checked.
//!
//! Accepts both spellings of the rotary settings: transformers <= 4 writes
//! `rope_theta` + `rope_scaling`, transformers 5 writes one `rope_parameters` object.

use crate::error::{ModelError, Result};
use serde::Deserialize;
use std::path::Path;

/// The architecture families uc runs. They differ only in small switches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// Llama 1/2/3 and SmolLM.
    Llama,
    /// Mistral (Llama plus an optional sliding window).
    Mistral,
    /// Qwen2 (biases on q/k/v).
    Qwen2,
    /// Qwen3 (RMSNorm on q and k per head).
    Qwen3,
}

const SUPPORTED: &str = "llama, mistral, qwen2, qwen3";

impl Family {
    fn from_model_type(t: &str) -> Option<Self> {
        match t {
            "llama" | "smollm" | "smollm2" => Some(Family::Llama),
            "mistral" => Some(Family::Mistral),
            "qwen2" => Some(Family::Qwen2),
            "qwen3" => Some(Family::Qwen3),
            _ => None,
        }
    }
}

/// Rotary position embedding settings.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Rope {
    /// Base frequency.
    pub theta: f64,
    /// Llama-3 style frequency scaling, when configured.
    pub llama3: Option<Llama3Scaling>,
}

/// Llama-3 rotary scaling (`rope_type: "llama3"`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Llama3Scaling {
    /// Overall factor.
    pub factor: f64,
    /// Low-frequency factor.
    pub low_freq_factor: f64,
    /// High-frequency factor.
    pub high_freq_factor: f64,
    /// Context length the model was trained at.
    pub original_max_position_embeddings: f64,
}

/// The checked model configuration.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelConfig {
    /// Which family of blocks to build.
    pub family: Family,
    /// Residual stream width.
    pub hidden_size: usize,
    /// MLP inner width.
    pub intermediate_size: usize,
    /// Number of transformer blocks.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (GQA: divides `num_heads`).
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Rotary settings.
    pub rope: Rope,
    /// Longest context the model supports.
    pub max_position_embeddings: usize,
    /// The head reuses the token embedding.
    pub tie_word_embeddings: bool,
    /// q/k/v projections have biases (qwen2, or `attention_bias: true`).
    pub attention_bias: bool,
    /// Sliding attention window, when the model uses one.
    pub sliding_window: Option<usize>,
}

/// The raw keys we read; anything else in config.json is ignored.
#[derive(Deserialize)]
struct Raw {
    model_type: Option<String>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<serde_json::Value>,
    rope_parameters: Option<serde_json::Value>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
}

/// Upper bound on any one dimension: a header that asks for more is corrupt, and
/// must not make us allocate.
const MAX_DIM: usize = 1 << 20;

impl ModelConfig {
    /// Reads and checks `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        Self::from_json_str(&text, path)
    }

    /// Parses and checks config JSON; `path` is only used in error messages.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let bad = |reason: String| ModelError::BadConfig {
            path: path.to_path_buf(),
            reason,
        };
        let raw: Raw = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        let model_type = raw
            .model_type
            .clone()
            .ok_or_else(|| bad("missing key model_type".into()))?;
        let family = Family::from_model_type(&model_type).ok_or_else(|| {
            ModelError::UnsupportedArchitecture {
                path: path.to_path_buf(),
                model_type: model_type.clone(),
                supported: SUPPORTED,
            }
        })?;
        let need = |v: Option<usize>, key: &str| -> Result<usize> {
            let v = v.ok_or_else(|| bad(format!("missing key {key}")))?;
            if v == 0 || v > MAX_DIM {
                return Err(bad(format!("{key} = {v} is out of range 1..={MAX_DIM}")));
            }
            Ok(v)
        };
        let hidden_size = need(raw.hidden_size, "hidden_size")?;
        let intermediate_size = need(raw.intermediate_size, "intermediate_size")?;
        let num_layers = need(raw.num_hidden_layers, "num_hidden_layers")?;
        let num_heads = need(raw.num_attention_heads, "num_attention_heads")?;
        let num_kv_heads = need(
            Some(raw.num_key_value_heads.unwrap_or(num_heads)),
            "num_key_value_heads",
        )?;
        let vocab_size = need(raw.vocab_size, "vocab_size")?;
        let max_position_embeddings = need(
            Some(raw.max_position_embeddings.unwrap_or(2048)),
            "max_position_embeddings",
        )?;
        if num_heads % num_kv_heads != 0 {
            return Err(bad(format!(
                "num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}"
            )));
        }
        let head_dim = match raw.head_dim {
            Some(h) => need(Some(h), "head_dim")?,
            None if hidden_size % num_heads == 0 => hidden_size / num_heads,
            None => {
                return Err(bad(format!(
                    "hidden_size {hidden_size} is not a multiple of num_attention_heads {num_heads} and head_dim is not given"
                )))
            }
        };
        if head_dim % 2 != 0 {
            return Err(bad(format!(
                "head_dim {head_dim} must be even for rotary embeddings"
            )));
        }
        let rms_norm_eps = raw.rms_norm_eps.unwrap_or(1e-6);
        if !(rms_norm_eps.is_finite() && rms_norm_eps > 0.0) {
            return Err(bad(format!("rms_norm_eps {rms_norm_eps} must be positive")));
        }
        let rope = parse_rope(&raw).map_err(bad)?;
        let sliding_window = match family {
            Family::Mistral => raw.sliding_window,
            Family::Qwen2 | Family::Qwen3 if raw.use_sliding_window == Some(true) => {
                raw.sliding_window
            }
            _ => None,
        };
        Ok(ModelConfig {
            family,
            hidden_size,
            intermediate_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size,
            rms_norm_eps,
            rope,
            max_position_embeddings,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            attention_bias: raw.attention_bias.unwrap_or(family == Family::Qwen2),
            sliding_window,
        })
    }
}

/// Rotary settings from either config spelling.
fn parse_rope(raw: &Raw) -> std::result::Result<Rope, String> {
    // transformers 5: everything in rope_parameters; transformers 4: rope_theta + rope_scaling.
    let params = raw.rope_parameters.as_ref().or(raw.rope_scaling.as_ref());
    let num = |v: &serde_json::Value, k: &str| v.get(k).and_then(|x| x.as_f64());
    let theta = raw
        .rope_parameters
        .as_ref()
        .and_then(|p| num(p, "rope_theta"))
        .or(raw.rope_theta)
        .unwrap_or(10_000.0);
    if !(theta.is_finite() && theta > 1.0) {
        return Err(format!("rope_theta {theta} must be > 1"));
    }
    let kind = params
        .and_then(|p| p.get("rope_type").or_else(|| p.get("type")))
        .and_then(|t| t.as_str())
        .unwrap_or("default");
    let llama3 = match (kind, params) {
        ("default", _) => None,
        ("llama3", Some(p)) => {
            let get =
                |k: &str| num(p, k).ok_or_else(|| format!("rope scaling llama3: missing {k}"));
            let s = Llama3Scaling {
                factor: get("factor")?,
                low_freq_factor: get("low_freq_factor")?,
                high_freq_factor: get("high_freq_factor")?,
                original_max_position_embeddings: get("original_max_position_embeddings")?,
            };
            let ok = [
                s.factor,
                s.low_freq_factor,
                s.high_freq_factor,
                s.original_max_position_embeddings,
            ]
            .iter()
            .all(|x| x.is_finite() && *x > 0.0)
                && s.high_freq_factor > s.low_freq_factor;
            if !ok {
                return Err(format!("rope scaling llama3: invalid values {s:?}"));
            }
            Some(s)
        }
        (other, _) => return Err(format!("unsupported rope scaling type {other:?}")),
    };
    Ok(Rope { theta, llama3 })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<ModelConfig> {
        ModelConfig::from_json_str(s, Path::new("config.json"))
    }

    const BASE: &str = r#"{"model_type":"llama","hidden_size":64,"intermediate_size":96,
        "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"vocab_size":128"#;

    #[test]
    fn reads_transformers4_and_5_rope_spellings_alike() {
        let v4 = parse(&format!(r#"{BASE},"rope_theta":5e5,"rope_scaling":{{"rope_type":"llama3","factor":8,"low_freq_factor":1,"high_freq_factor":4,"original_max_position_embeddings":64}}}}"#)).unwrap();
        let v5 = parse(&format!(r#"{BASE},"rope_parameters":{{"rope_theta":5e5,"rope_type":"llama3","factor":8,"low_freq_factor":1,"high_freq_factor":4,"original_max_position_embeddings":64}}}}"#)).unwrap();
        assert_eq!(v4.rope, v5.rope);
        assert_eq!(v4.rope.theta, 5e5);
        assert!(v4.rope.llama3.is_some());
        assert_eq!(v4.head_dim, 16);
    }

    #[test]
    fn rejects_unknown_architecture() {
        let e = parse(r#"{"model_type":"gpt2"}"#).unwrap_err();
        assert!(
            matches!(e, ModelError::UnsupportedArchitecture { .. }),
            "{e}"
        );
    }

    #[test]
    fn rejects_missing_key_naming_it() {
        let e = parse(r#"{"model_type":"llama","hidden_size":64}"#).unwrap_err();
        assert!(e.to_string().contains("intermediate_size"), "{e}");
    }

    #[test]
    fn rejects_heads_not_dividing() {
        let e = parse(
            &format!(r#"{BASE},"num_key_value_heads":3}}"#)
                .replace(r#""num_key_value_heads":2,"#, ""),
        )
        .unwrap_err();
        assert!(e.to_string().contains("multiple"), "{e}");
    }

    #[test]
    fn rejects_absurd_dimensions_before_allocating() {
        let e = parse(
            &BASE
                .replace("\"hidden_size\":64", "\"hidden_size\":99999999999")
                .to_string()
                .replace("128", "128}"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("out of range"), "{e}");
    }

    #[test]
    fn rejects_malformed_json() {
        assert!(matches!(
            parse("{not json").unwrap_err(),
            ModelError::BadConfig { .. }
        ));
    }

    #[test]
    fn qwen2_defaults_to_qkv_bias() {
        let c = parse(&format!(
            r#"{},"rope_theta":1e6}}"#,
            BASE.replace("llama", "qwen2")
        ))
        .unwrap();
        assert!(c.attention_bias);
        assert_eq!(c.family, Family::Qwen2);
    }
}
