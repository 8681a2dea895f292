//! `uc run MODEL -p TEXT`: text generation with a KV cache, streamed to stdout token by
//! token. MODEL is a pack (verified before it runs) or a Hugging Face checkpoint.

use anyhow::{bail, Context, Result};
use clap::Args;
use std::io::Write;
use std::path::PathBuf;
use uc_model::tokenizer::Tokenizer;
use uc_runtime::generate::{eos_ids, TextStream};
use uc_runtime::{weights, Decoder, DecoderOptions, GenerateOptions, SamplingParams, Verify};

/// Arguments of `uc run`.
#[derive(Args)]
#[command(after_help = "\
Examples:
  uc run packs/smollm2-q5 -p \"The capital of France is\" --max-tokens 32
  uc run packs/smollm2-q5 -p \"What is a pack?\" --chat --temperature 0.7 --top-p 0.9 --seed 7
  uc run assets/smollm2-135m -p \"Once upon a time\" --stream-layers

A pack is verified before it runs: manifest, every file's size and SHA-256 and (unless
--skip-recon-check) every tensor's reconstruction digest. Generation stops at the
model's end-of-sequence token or after --max-tokens.")]
pub struct RunArgs {
    /// The model: a pack directory (has manifest.json) or a Hugging Face checkpoint.
    model: PathBuf,
    /// The prompt text.
    #[arg(short, long)]
    prompt: String,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy (always the most likely token).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Seed of the sampler (same seed, same tokens).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Wrap the prompt in the ChatML turn format (<|im_start|>user ... assistant).
    #[arg(long)]
    chat: bool,
    /// Keep weights on disk: one block in memory at a time, the next one prefetched.
    #[arg(long)]
    stream_layers: bool,
    /// Skip the per-tensor reconstruction check of a pack (file hashes are always checked).
    #[arg(long)]
    skip_recon_check: bool,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Print timings to stderr at the end.
    #[arg(long)]
    stats: bool,
    /// A hard memory budget, e.g. 1500M or 2G (K/M/G/T = 1024^k bytes): the peak
    /// resident set (weights as held, KV cache, activations) is estimated before the
    /// model is loaded, and a run whose estimate exceeds SIZE is refused, naming what
    /// does not fit (try --stream-layers).
    #[arg(long, value_name = "SIZE", value_parser = uc_format::memory::parse_size)]
    max_memory: Option<u64>,
}

/// mimalloc's `mi_option_purge_delay` (see main.rs; the crate does not name it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Restores mimalloc's defaults for inference. `uc` sets it never to return freed
/// memory and to use large OS pages, which suits eval's large transient buffers; for
/// run and bench the resident set is a reported number (and `--stream-layers` exists to
/// keep it small), so freed memory is purged again after mimalloc's default 10 ms and
/// pages are ordinary 4 KiB ones. Called before the model is loaded.
pub fn inference_allocator() {
    // SAFETY: mi_option_set only stores an integer in mimalloc's option table; both
    // options are documented as settable at run time.
    unsafe {
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 10);
        libmimalloc_sys::mi_option_set(libmimalloc_sys::mi_option_large_os_pages, 0);
    }
}

/// Builds the global thread pool with `n` threads (errors if already built).
pub fn set_threads(n: Option<usize>) -> Result<()> {
    if let Some(n) = n {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("setting up the thread pool")?;
    }
    Ok(())
}

/// The memory plan of a decoder over `model`: the estimate, checked against
/// `max_memory` before anything is loaded (a run that does not fit is refused).
pub fn memory_plan(
    model: &std::path::Path,
    capacity: usize,
    prompt: usize,
    stream: bool,
    max_memory: Option<u64>,
) -> Result<serde_json::Value> {
    let cfg = uc_model::config::ModelConfig::from_file(&model.join("config.json"))
        .with_context(|| format!("reading the config of {}", model.display()))?;
    let est = uc_runtime::memory::estimate(model, &cfg, capacity, prompt, stream)
        .map_err(|e| anyhow::anyhow!("{}: {e}", model.display()))?;
    if let Some(budget) = max_memory {
        if let Err(msg) = est.check(budget) {
            let hint = if stream {
                ""
            } else {
                " (--stream-layers keeps weights on disk)"
            };
            bail!("--max-memory: running {} {msg}{hint}", model.display());
        }
    }
    Ok(serde_json::json!({
        "max_memory_bytes": max_memory,
        "estimate_peak_bytes": est.peak_bytes,
        "estimate_phase": est.peak_phase,
        "estimate": est,
    }))
}

/// ChatML: the format of SmolLM2-Instruct and Qwen chat models.
fn chat_prompt(tok: &Tokenizer, user: &str) -> Result<String> {
    if tok.token_id("<|im_start|>").is_none() {
        bail!("--chat: the tokenizer has no <|im_start|> token (not a ChatML model)");
    }
    Ok(format!(
        "<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    ))
}

pub fn run(a: RunArgs) -> Result<()> {
    let sampling = SamplingParams {
        temperature: a.temperature,
        top_p: a.top_p,
        seed: a.seed,
    };
    sampling.validate()?;
    inference_allocator();
    set_threads(a.threads)?;
    let tok = Tokenizer::from_dir(&a.model)
        .with_context(|| format!("loading the tokenizer of {}", a.model.display()))?;
    let text = if a.chat {
        chat_prompt(&tok, &a.prompt)?
    } else {
        a.prompt.clone()
    };
    let ids = tok.encode(&text)?;
    if ids.is_empty() {
        bail!("the prompt is empty");
    }
    let verify = if a.skip_recon_check {
        Verify::FilesOnly
    } else {
        Verify::Full
    };
    let capacity = ids.len() + a.max_tokens;
    let memory = memory_plan(&a.model, capacity, ids.len(), a.stream_layers, a.max_memory)?;
    let loader = weights::open(&a.model, verify)
        .with_context(|| format!("opening model {}", a.model.display()))?;
    let max_ctx = loader.config().max_position_embeddings;
    if capacity > max_ctx {
        bail!("prompt ({} tokens) + --max-tokens {} exceeds the model's context of {max_ctx} positions", ids.len(), a.max_tokens);
    }
    let mut dec = Decoder::new(
        loader,
        DecoderOptions {
            capacity,
            stream_layers: a.stream_layers,
        },
    )?;
    dec.set_fast_prefill(true)?;
    let opts = GenerateOptions {
        max_tokens: a.max_tokens,
        sampling,
        stop: eos_ids(&a.model, &tok),
    };

    let mut out = std::io::stdout().lock();
    let mut stream = TextStream::new(&tok);
    let mut closed = false;
    let write = |out: &mut std::io::StdoutLock, s: &str| -> Result<bool, std::io::Error> {
        match out.write_all(s.as_bytes()).and_then(|_| out.flush()) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
            Err(e) => Err(e),
        }
    };
    let stats = uc_runtime::generate(&mut dec, &ids, &opts, |t| {
        let piece = stream.push(t)?;
        let open = write(&mut out, &piece).map_err(|e| uc_runtime::RuntimeError::Io {
            path: "<stdout>".into(),
            source: e,
        })?;
        closed = !open;
        Ok(open)
    })?;
    if !closed {
        let tail = stream.finish()?;
        if !write(&mut out, &format!("{tail}\n")).context("writing to stdout")? {
            return Ok(());
        }
    }
    if a.stats {
        let decode = if stats.decode_s > 0.0 {
            stats.decode_steps as f64 / stats.decode_s
        } else {
            0.0
        };
        eprintln!(
            "[{} prompt tokens, {} generated{}; prefill {:.1} tok/s, time to first token {:.0} ms, decode {:.1} tok/s]",
            stats.prompt_tokens,
            stats.generated,
            if stats.stopped { ", stopped at end of sequence" } else { "" },
            stats.prompt_tokens as f64 / stats.prefill_s.max(1e-9),
            stats.ttft_s * 1e3,
            decode
        );
        eprintln!(
            "[peak RSS {:.0} MiB; estimated peak {:.0} MiB{}]",
            uc_runtime::bench::peak_rss_mib().unwrap_or(f64::NAN),
            memory["estimate_peak_bytes"].as_f64().unwrap_or(f64::NAN) / (1u64 << 20) as f64,
            match a.max_memory {
                Some(b) => format!(", budget {:.0} MiB", b as f64 / (1u64 << 20) as f64),
                None => String::new(),
            }
        );
    }
    Ok(())
}
