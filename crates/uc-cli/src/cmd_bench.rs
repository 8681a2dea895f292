//! `uc bench MODEL`: time to first token, prefill and decode throughput, peak memory,
//! with the machine description; the same JSON for packs and dense checkpoints.

use crate::cmd_run::{inference_allocator, set_threads};
use crate::output;
use anyhow::{Context, Result};
use clap::Args;
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;
use uc_runtime::bench::{self, BenchSettings, BenchTimings, Machine};
use uc_runtime::{weights, Decoder, DecoderOptions, Verify};

/// Arguments of `uc bench`.
#[derive(Args)]
#[command(after_help = "\
Examples:
  uc bench packs/smollm2-q5 --threads 2 --json --out results/bench_pack.json
  uc bench assets/smollm2-135m --prompt-len 128 --gen 32
  uc bench packs/smollm2-q5 --stream-layers --json

The prompt is --prompt-len seeded random token ids, prefilled in one pass; then --gen
tokens are decoded greedily, one per forward pass. After a warm-up, --reps runs are
timed and the medians reported. Peak RSS is the process high-water mark (VmHWM),
model loading and verification included. uc's allocator (mimalloc) backs memory with
transparent huge pages, which count whole in RSS; set MIMALLOC_ALLOW_THP=0 to measure
the memory actually used (scripts/bench_run.sh does, for every configuration).")]
pub struct BenchArgs {
    /// The model: a pack directory or a Hugging Face checkpoint.
    model: PathBuf,
    /// Prompt tokens.
    #[arg(long, default_value_t = 512)]
    prompt_len: usize,
    /// Tokens decoded after the prompt.
    #[arg(long, default_value_t = 128)]
    gen: usize,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Timed repetitions (medians reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Seed of the prompt ids.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Keep weights on disk: one block in memory at a time, the next one prefetched.
    #[arg(long)]
    stream_layers: bool,
    /// Skip the per-tensor reconstruction check of a pack (file hashes are always checked).
    #[arg(long)]
    skip_recon_check: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// A hard memory budget, e.g. 1500M or 2G (K/M/G/T = 1024^k bytes), planned
    /// before loading as for `uc run --max-memory`; reported with the estimate.
    #[arg(long, value_name = "SIZE", value_parser = uc_format::memory::parse_size)]
    max_memory: Option<u64>,
    /// Also write the JSON report to this file.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Identity of the benchmarked model.
#[derive(Serialize)]
struct ModelInfo {
    path: PathBuf,
    /// `pack` or `checkpoint`.
    kind: &'static str,
    fingerprint: String,
    bpw_body: Option<f64>,
    bpw_model: Option<f64>,
    layers: usize,
    hidden_size: usize,
    vocab_size: usize,
    /// Weight bytes the decoder holds in memory (streamed blocks excluded), MiB.
    resident_weights_mib: f64,
}

/// The JSON report of `uc bench`.
#[derive(Serialize)]
struct Report {
    tool: &'static str,
    version: &'static str,
    model: ModelInfo,
    settings: BenchSettings,
    stream_layers: bool,
    /// How the KV cache stores K and V ("f16" on CPUs whose attention kernels read it).
    kv_cache: &'static str,
    /// Seconds to verify and load the weights.
    load_s: f64,
    #[serde(flatten)]
    timings: BenchTimings,
    /// Process peak RSS (VmHWM), MiB.
    peak_rss_mib: Option<f64>,
    /// RSS right after loading, MiB.
    rss_after_load_mib: Option<f64>,
    /// `--max-memory` and the estimated peak (bytes), with its terms.
    memory: serde_json::Value,
    machine: Machine,
}

pub fn run(a: BenchArgs) -> Result<()> {
    inference_allocator();
    set_threads(a.threads)?;
    let settings = BenchSettings {
        prompt_len: a.prompt_len.max(1),
        gen: a.gen,
        reps: a.reps.max(1),
        seed: a.seed,
    };
    let verify = if a.skip_recon_check {
        Verify::FilesOnly
    } else {
        Verify::Full
    };
    let capacity = settings.prompt_len + settings.gen + 1;
    let memory = crate::cmd_run::memory_plan(
        &a.model,
        capacity,
        settings.prompt_len,
        a.stream_layers,
        a.max_memory,
    )?;
    let t = Instant::now();
    let loader = weights::open(&a.model, verify)
        .with_context(|| format!("opening model {}", a.model.display()))?;
    let cfg = loader.config().clone();
    let mut dec = Decoder::new(
        loader.clone(),
        DecoderOptions {
            capacity,
            stream_layers: a.stream_layers,
        },
    )?;
    dec.set_fast_prefill(true)?;
    let load_s = t.elapsed().as_secs_f64();
    let rss_after_load_mib = bench::rss_mib();
    let timings = bench::run(&mut dec, &settings)?;
    let (bpw_body, bpw_model) = loader
        .bits_per_weight()
        .map_or((None, None), |(b, m)| (Some(b), Some(m)));
    let report = Report {
        tool: "uc",
        version: env!("CARGO_PKG_VERSION"),
        model: ModelInfo {
            path: a.model.clone(),
            kind: loader.kind(),
            fingerprint: loader.fingerprint()?,
            bpw_body,
            bpw_model,
            layers: cfg.num_layers,
            hidden_size: cfg.hidden_size,
            vocab_size: cfg.vocab_size,
            resident_weights_mib: dec.resident_weight_bytes() as f64 / (1 << 20) as f64,
        },
        settings,
        stream_layers: a.stream_layers,
        kv_cache: dec.kv_dtype().name(),
        load_s,
        timings,
        peak_rss_mib: bench::peak_rss_mib(),
        rss_after_load_mib,
        memory,
        machine: Machine::detect(rayon::current_num_threads(), dec.isa()),
    };
    if let Some(out) = &a.out {
        output::json_file(out, &report)?;
    }
    if a.json {
        return output::json(&report);
    }
    let t = &report.timings;
    let mib = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{v:.1} MiB"));
    output::line(&format!(
        "{} ({}{}), {} threads, {}",
        a.model.display(),
        report.model.kind,
        if a.stream_layers {
            ", streamed layers"
        } else {
            ""
        },
        report.machine.threads,
        report.machine.cpu_model
    ))?;
    output::line(&format!(
        "prefill {} tokens: {:.1} tok/s   time to first token {:.1} ms",
        settings.prompt_len, t.prefill_tok_s, t.ttft_ms
    ))?;
    output::line(&format!(
        "decode {} tokens: {:.1} tok/s   KV cache {}",
        settings.gen, t.decode_tok_s, report.kv_cache
    ))?;
    output::line(&format!(
        "load {:.2} s   peak RSS {}   resident weights {:.1} MiB",
        report.load_s,
        mib(report.peak_rss_mib),
        report.model.resident_weights_mib
    ))
}
