//! The generation loop (prefill, then sample / decode one token at a time until a stop
//! token or the budget), end-of-sequence ids from a model directory, and incremental
//! detokenization for streaming text.

use crate::decoder::{Decoder, Logits};
use crate::sampler::{Sampler, SamplingParams};
use crate::{Result, RuntimeError};
use std::path::Path;
use std::time::Instant;
use uc_model::tokenizer::Tokenizer;

/// What to generate.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    /// Most tokens to generate (stop tokens excluded).
    pub max_tokens: usize,
    /// Sampling settings.
    pub sampling: SamplingParams,
    /// Token ids that end generation (not emitted).
    pub stop: Vec<u32>,
}

/// Timing of one generation.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct GenerationStats {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Tokens emitted.
    pub generated: usize,
    /// Whether a stop token ended generation.
    pub stopped: bool,
    /// Seconds from the start of prefill to the first sampled token.
    pub ttft_s: f64,
    /// Seconds of the prefill forward pass.
    pub prefill_s: f64,
    /// Seconds of the single-token forward passes (and their sampling).
    pub decode_s: f64,
    /// Forward passes of one token.
    pub decode_steps: usize,
}

/// Generates after `prompt`, calling `emit` with each token as soon as it is chosen;
/// `emit` returns `false` to stop early. The decoder continues from its current
/// position (call [`Decoder::reset`] for a fresh sequence).
pub fn generate(
    dec: &mut Decoder,
    prompt: &[u32],
    opts: &GenerateOptions,
    mut emit: impl FnMut(u32) -> Result<bool>,
) -> Result<GenerationStats> {
    if prompt.is_empty() {
        return Err(RuntimeError::Empty("the prompt has no tokens"));
    }
    let mut sampler = Sampler::new(opts.sampling)?;
    let mut st = GenerationStats {
        prompt_tokens: prompt.len(),
        ..Default::default()
    };
    let start = Instant::now();
    let logits = dec.forward(prompt, Logits::Last)?;
    st.prefill_s = start.elapsed().as_secs_f64();
    if opts.max_tokens == 0 {
        return Ok(st);
    }
    let mut tok = sampler.sample(&logits);
    st.ttft_s = start.elapsed().as_secs_f64();
    let t_decode = Instant::now();
    loop {
        if opts.stop.contains(&tok) {
            st.stopped = true;
            break;
        }
        st.generated += 1;
        if !emit(tok)? || st.generated >= opts.max_tokens {
            break;
        }
        let logits = dec.forward(&[tok], Logits::Last)?;
        st.decode_steps += 1;
        tok = sampler.sample(&logits);
    }
    st.decode_s = t_decode.elapsed().as_secs_f64();
    Ok(st)
}

/// End-of-sequence token ids of the model in `dir`: `eos_token_id` of config.json and
/// generation_config.json (a number or a list), and `eos_token` of
/// tokenizer_config.json (a string or `{"content": ...}`), deduplicated and sorted.
/// Missing or malformed files contribute nothing.
pub fn eos_ids(dir: &Path, tok: &Tokenizer) -> Vec<u32> {
    let read = |name: &str| -> Option<serde_json::Value> {
        let bytes = std::fs::read(dir.join(name)).ok()?;
        serde_json::from_slice(&bytes).ok()
    };
    let mut ids = Vec::new();
    for name in ["config.json", "generation_config.json"] {
        match read(name).as_ref().and_then(|v| v.get("eos_token_id")) {
            Some(serde_json::Value::Number(n)) => {
                ids.extend(n.as_u64().and_then(|x| u32::try_from(x).ok()))
            }
            Some(serde_json::Value::Array(a)) => ids.extend(
                a.iter()
                    .filter_map(|x| x.as_u64())
                    .filter_map(|x| u32::try_from(x).ok()),
            ),
            _ => {}
        }
    }
    if let Some(eos) = read("tokenizer_config.json")
        .as_ref()
        .and_then(|v| v.get("eos_token"))
    {
        let text = eos
            .as_str()
            .or_else(|| eos.get("content").and_then(|c| c.as_str()));
        ids.extend(text.and_then(|t| tok.token_id(t)));
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Turns a growing token sequence into text pieces safe to print: a piece is released
/// only when it does not end inside a multi-byte character (U+FFFD at the end means the
/// bytes so far are incomplete).
pub struct TextStream<'a> {
    tok: &'a Tokenizer,
    ids: Vec<u32>,
    /// Tokens before `prefix` are printed and no longer re-decoded.
    prefix: usize,
    /// Tokens before `read` are printed.
    read: usize,
}

impl<'a> TextStream<'a> {
    /// An empty stream over `tok`.
    pub fn new(tok: &'a Tokenizer) -> Self {
        TextStream {
            tok,
            ids: Vec::new(),
            prefix: 0,
            read: 0,
        }
    }

    /// Adds `id`; returns the new text to print (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        // Decoding a few tokens of context keeps word boundaries (leading spaces) right.
        let before = self.tok.decode(&self.ids[self.prefix..self.read])?;
        let now = self.tok.decode(&self.ids[self.prefix..])?;
        if now.len() > before.len()
            && !now.ends_with('\u{FFFD}')
            && now.is_char_boundary(before.len())
        {
            let piece = now[before.len()..].to_string();
            self.prefix = self.read;
            self.read = self.ids.len();
            return Ok(piece);
        }
        Ok(String::new())
    }

    /// Whatever is still held back (at the end of generation).
    pub fn finish(&mut self) -> Result<String> {
        let before = self.tok.decode(&self.ids[self.prefix..self.read])?;
        let now = self.tok.decode(&self.ids[self.prefix..])?;
        self.prefix = self.ids.len();
        self.read = self.ids.len();
        Ok(
            if now.len() > before.len() && now.is_char_boundary(before.len()) {
                now[before.len()..].to_string()
            } else {
                String::new()
            },
        )
    }
}
