//! Throughput measurement: time to first token, prefill and decode tokens per second,
//! peak resident memory, and a description of the machine. One JSON schema
//! ([`BenchReport`]) for packs and dense checkpoints alike.

use crate::decoder::{Decoder, Logits};
use crate::kernels::Isa;
use crate::sampler::{argmax, Rng};
use crate::Result;
use std::time::Instant;

/// What to measure.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct BenchSettings {
    /// Prompt tokens (seeded random ids).
    pub prompt_len: usize,
    /// Tokens generated after the prompt (greedy).
    pub gen: usize,
    /// Measured repetitions (the median is reported); one warm-up run precedes them.
    pub reps: usize,
    /// Seed of the prompt ids.
    pub seed: u64,
}

/// The machine the numbers come from (no personal data).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Machine {
    /// `linux`, ...
    pub os: String,
    /// `x86_64`, ...
    pub arch: String,
    /// CPU model name (`/proc/cpuinfo`).
    pub cpu_model: String,
    /// Logical CPUs available to this process.
    pub logical_cpus: usize,
    /// Worker threads used.
    pub threads: usize,
    /// Kernel instruction set.
    pub isa: Isa,
    /// Detected CPU features relevant to the kernels.
    pub cpu_features: Vec<String>,
    /// Installed memory, MiB (`/proc/meminfo`), when known.
    pub mem_total_mib: Option<f64>,
}

impl Machine {
    /// This machine, with `threads` workers and kernels for `isa`.
    pub fn detect(threads: usize, isa: Isa) -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        #[allow(unused_mut)]
        let mut cpu_features: Vec<String> = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            macro_rules! probe { ($($f:tt),*) => { $( if is_x86_feature_detected!($f) { cpu_features.push($f.into()); } )* } }
            probe!(
                "avx2",
                "fma",
                "f16c",
                "avx512f",
                "avx512bw",
                "avx512vl",
                "avx512vnni",
                "avx512bf16"
            );
        }
        Machine {
            os: std::env::consts::OS.into(),
            arch: std::env::consts::ARCH.into(),
            cpu_model,
            logical_cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            threads,
            isa,
            cpu_features,
            mem_total_mib: proc_kib("/proc/meminfo", "MemTotal:").map(|k| k / 1024.0),
        }
    }
}

/// A `NAME:  123 kB` field of a /proc file, in KiB.
fn proc_kib(path: &str, key: &str) -> Option<f64> {
    let text = std::fs::read_to_string(path).ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    line[key.len()..].split_whitespace().next()?.parse().ok()
}

/// Peak resident set size of this process so far, MiB (Linux `VmHWM`).
pub fn peak_rss_mib() -> Option<f64> {
    proc_kib("/proc/self/status", "VmHWM:").map(|k| k / 1024.0)
}

/// Current resident set size, MiB (Linux `VmRSS`).
pub fn rss_mib() -> Option<f64> {
    proc_kib("/proc/self/status", "VmRSS:").map(|k| k / 1024.0)
}

/// Timings of the measured runs.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BenchTimings {
    /// Median time from prompt submission to the first token, ms.
    pub ttft_ms: f64,
    /// Median prefill throughput, prompt tokens / s.
    pub prefill_tok_s: f64,
    /// Median decode throughput (one token per forward pass, after the prompt), tokens / s.
    pub decode_tok_s: f64,
    /// Every run's prefill seconds.
    pub prefill_s: Vec<f64>,
    /// Every run's decode seconds (for `gen` tokens).
    pub decode_s: Vec<f64>,
    /// Seconds the decoder waited for streamed blocks, over all runs.
    pub stream_wait_s: f64,
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// Seeded random prompt ids in `[0, vocab)` (as llama-bench does: throughput does not
/// depend on the text).
pub fn random_prompt(len: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut rng = Rng::new(seed);
    (0..len)
        .map(|_| (rng.next_u64() % vocab as u64) as u32)
        .collect()
}

/// Runs the benchmark on `dec` (whose capacity must hold `prompt_len + gen` positions):
/// a short warm-up, then `reps` runs of prefill + `gen` greedy decode steps.
pub fn run(dec: &mut Decoder, s: &BenchSettings) -> Result<BenchTimings> {
    let prompt = random_prompt(s.prompt_len.max(1), dec.config().vocab_size, s.seed);
    // Warm-up: page in code and weights, spin up the thread pool.
    dec.reset();
    let warm = &prompt[..prompt.len().min(16)];
    let l = dec.forward(warm, Logits::Last)?;
    dec.forward(&[argmax(&l)], Logits::Last)?;
    let wait0 = dec.stream_wait_seconds();
    let (mut ttft, mut pre, mut decs) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..s.reps.max(1) {
        dec.reset();
        let t = Instant::now();
        let logits = dec.forward(&prompt, Logits::Last)?;
        pre.push(t.elapsed().as_secs_f64());
        let mut tok = argmax(&logits);
        ttft.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        for _ in 0..s.gen {
            tok = argmax(&dec.forward(&[tok], Logits::Last)?);
        }
        decs.push(t.elapsed().as_secs_f64());
    }
    let rate = |n: usize, secs: &[f64]| n as f64 / median(secs);
    Ok(BenchTimings {
        ttft_ms: median(&ttft) * 1e3,
        prefill_tok_s: rate(prompt.len(), &pre),
        decode_tok_s: if s.gen == 0 { 0.0 } else { rate(s.gen, &decs) },
        prefill_s: pre,
        decode_s: decs,
        stream_wait_s: dec.stream_wait_seconds() - wait0,
    })
}
