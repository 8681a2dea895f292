//! The chat template: the Jinja `chat_template` of the model's `tokenizer_config.json`,
//! rendered by minijinja (with its Python-compatibility methods, since templates are
//! written for transformers' Jinja2: `.strip()`, `.startswith()`, ...).
//!
//! Variables given to the template, as transformers gives them: `messages` (role and
//! content), `add_generation_prompt` (true), `bos_token`, `eos_token`, and a
//! `raise_exception(msg)` function whose message becomes a 400 for the request.

use crate::api::{ApiError, Message};
use serde_json::Value;
use std::path::Path;

/// Why a template could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// tokenizer_config.json exists but is not readable JSON.
    #[error("{path}: {reason}")]
    Config {
        /// The file.
        path: std::path::PathBuf,
        /// What failed.
        reason: String,
    },
    /// The template does not compile.
    #[error("chat_template of {path} does not compile: {reason}")]
    Compile {
        /// The file.
        path: std::path::PathBuf,
        /// minijinja's message.
        reason: String,
    },
}

/// A compiled chat template plus the special tokens it may refer to.
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    bos: String,
    eos: String,
}

/// A special token entry: a string or `{"content": "..."}`.
fn token_text(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(o) => o
            .get("content")
            .and_then(|c| c.as_str())
            .unwrap_or_default()
            .to_string(),
        None => String::new(),
    }
}

impl ChatTemplate {
    /// The template of the model in `dir`; `Ok(None)` when it has no
    /// tokenizer_config.json or no `chat_template` in it (chat requests are then refused).
    pub fn from_dir(dir: &Path) -> Result<Option<Self>, TemplateError> {
        let path = dir.join("tokenizer_config.json");
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(TemplateError::Config {
                    path,
                    reason: e.to_string(),
                })
            }
        };
        let cfg: Value = serde_json::from_slice(&bytes).map_err(|e| TemplateError::Config {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        // A string, or (newer configs) a list of named templates: take "default".
        let source = match cfg.get("chat_template") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(list)) => match list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
            {
                Some(s) => s.to_string(),
                None => return Ok(None),
            },
            _ => return Ok(None),
        };
        let t = Self::new(
            &source,
            &token_text(cfg.get("bos_token")),
            &token_text(cfg.get("eos_token")),
        )
        .map_err(|reason| TemplateError::Compile { path, reason })?;
        Ok(Some(t))
    }

    /// Compiles `source`.
    pub fn new(source: &str, bos: &str, eos: &str) -> Result<Self, String> {
        let mut env = minijinja::Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        // transformers renders with trim_blocks and lstrip_blocks on.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| e.to_string())?;
        Ok(ChatTemplate {
            env,
            bos: bos.to_string(),
            eos: eos.to_string(),
        })
    }

    /// The prompt text for `messages`, ending with the assistant's turn opening.
    pub fn render(&self, messages: &[Message]) -> Result<String, ApiError> {
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| ApiError::internal(e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => self.bos,
            eos_token => self.eos,
        })
        // The template's own checks (e.g. "roles must alternate") are about the request.
        .map_err(|e| {
            ApiError::bad(
                Some("messages".into()),
                format!("the chat template rejected the messages: {e}"),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }

    /// SmolLM2-Instruct's template, as its tokenizer_config.json ships it.
    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn renders_smollm2_template_like_transformers() {
        let t = ChatTemplate::new(SMOLLM2, "<|im_start|>", "<|im_end|>").unwrap();
        // transformers' apply_chat_template(..., add_generation_prompt=True) output.
        assert_eq!(
            t.render(&[msg("user", "Hi")]).unwrap(),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(
            t.render(&[msg("system", "S"), msg("user", "Q")]).unwrap(),
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn python_string_methods_and_raise_exception_work() {
        let t = ChatTemplate::new(
            "{{ bos_token }}{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tools') }}{% endif %}{{ m.content.strip() }}|{% endfor %}",
            "<s>",
            "</s>",
        )
        .unwrap();
        assert_eq!(t.render(&[msg("user", "  a  ")]).unwrap(), "<s>a|");
        let e = t.render(&[msg("tool", "x")]).unwrap_err();
        assert_eq!(e.status, 400);
        assert!(e.message.contains("no tools"), "{}", e.message);
    }

    #[test]
    fn a_template_that_does_not_compile_is_an_error() {
        assert!(ChatTemplate::new("{% for %}", "", "").is_err());
    }

    #[test]
    fn missing_config_or_template_means_no_template() {
        let d = tempfile::tempdir().unwrap();
        assert!(ChatTemplate::from_dir(d.path()).unwrap().is_none());
        std::fs::write(
            d.path().join("tokenizer_config.json"),
            r#"{"eos_token":"x"}"#,
        )
        .unwrap();
        assert!(ChatTemplate::from_dir(d.path()).unwrap().is_none());
        std::fs::write(d.path().join("tokenizer_config.json"), "{").unwrap();
        assert!(ChatTemplate::from_dir(d.path()).is_err());
    }
}
